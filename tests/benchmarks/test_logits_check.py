"""``benchmarks/_logits_check.py``, the shared part of the GPU logits checks, on the CPU: the command line, the probes
(GPU, packages, megatron-core release), and the layout loop with the gathered logits of a TP-split model, run in
spawned gloo worlds with a toy vocabulary-parallel model against a plain-torch reference: a passing layout at TP1 and
TP2, a failing one, a failing world. The four check scripts import and stop, naming what is missing, without a GPU."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

import _logits_check as lc  # noqa: E402

from megatron_bridge_ext.mcore.versions import installed_megatron_core  # noqa: E402

VOCAB, PADDED, HIDDEN = 10, 12, 8


class _VocabParallelToy(torch.nn.Module):
    """An embedding and this rank's rows of a (padded) output projection: ``[b, s, PADDED / world]`` logits, as a
    TP-split model's last stage gives them; records the attention mask it is given."""

    def __init__(self, embedding: torch.Tensor, output: torch.Tensor, rank: int, world: int) -> None:
        super().__init__()
        rows = PADDED // world
        self.embedding = torch.nn.Parameter(embedding.clone())
        self.output = torch.nn.Parameter(output[rank * rows:(rank + 1) * rows].clone())
        self.mask = "not called"

    def forward(self, input_ids, position_ids, attention_mask):
        assert torch.equal(position_ids[0], torch.arange(input_ids.shape[1]))
        self.mask = attention_mask
        return self.embedding[input_ids] @ self.output.T


def _worker(rank: int, world: int, embedding, output, tokens, causal: bool, broken: str) -> dict:
    if broken == "world" and world > 1 and rank == world - 1:  # a world of one rank runs
        raise RuntimeError(f"rank {rank} broke on purpose")
    chunk = _VocabParallelToy(embedding, output, rank, world)
    logits = lc.tp_logits(chunk, tokens, VOCAB, causal_mask=causal)
    return {"logits": logits + (1.0 if broken == "logits" else 0.0), "mask": chunk.mask, "world": world}


def _toy():
    g = torch.Generator().manual_seed(0)
    embedding, output = torch.randn(PADDED, HIDDEN, generator=g), torch.randn(PADDED, HIDDEN, generator=g)
    tokens = torch.randint(0, VOCAB, (2, 5), generator=g)
    return embedding, output, tokens, embedding[tokens] @ output[:VOCAB].T  # the unsplit model, plain torch


def test_check_layouts_gathers_tp_logits_and_reports_every_layout(capsys):
    embedding, output, tokens, expected = _toy()
    seen = []

    def describe(r):
        seen.append(r)
        return f"toy world {r['world']}"

    # causal mask: the one the CPU proofs pass (True = masked); TP1 and TP2 both give the unsplit logits
    assert lc.check_layouts("toy", "1,2", _worker, (embedding, output, tokens, True, ""), expected, 1e-5,
                            describe) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in out] == ["ok   toy TP1 (gloo)", "ok   toy TP2 (gloo)"], out
    assert all("max |logit diff| vs transformers" in ln and "(atol 1e-05)" in ln for ln in out), out
    assert [r["world"] for r in seen] == [1, 2]
    causal = torch.triu(torch.ones(1, 1, 5, 5, dtype=torch.bool), diagonal=1)
    assert all(torch.equal(r["mask"], causal) for r in seen)
    assert all(r["logits"].shape == (2, 5, VOCAB) and r["logits"].dtype == torch.float32 for r in seen)

    # no mask; logits off by 1 at TP2: one FAIL line naming the difference; a world that fails: reported, the loop
    # goes on to the next layout
    seen.clear()
    assert lc.check_layouts("off", "2", _worker, (embedding, output, tokens, False, "logits"), expected, 1e-5,
                            describe) == 1
    assert seen[0]["mask"] is None
    line = capsys.readouterr().out.strip()
    assert line.startswith("FAIL off TP2 (gloo): toy world 2, max |logit diff| vs transformers 1.00e+00"), line
    assert lc.check_layouts("broken", "2,1", _worker, (embedding, output, tokens, False, "world"), expected, 1e-5,
                            describe) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("FAIL broken TP2 (gloo): "), out  # the last line of the world's error
    assert out[1].startswith("ok   broken TP1 (gloo): "), out


def test_parse_args(capsys):
    args = lc.parse_args("A check.\n\nMore.", [])
    assert (args.layouts, args.atol) == ("1,2", 1e-3)
    args = lc.parse_args("A check.", ["--layouts", "1", "--atol", "5e-4"], atol=2e-3)
    assert (args.layouts, args.atol) == ("1", 5e-4)
    assert lc.parse_args("A check.", [], atol=2e-3).atol == 2e-3
    with pytest.raises(SystemExit) as e:
        lc.parse_args("  A check of logits.\nMore.", ["--help"], atol=2e-3)
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width
    assert "A check of logits." in help_text and "More." not in help_text and "(default 0.002)" in help_text
    for bad in ("1,x", "0", "2,,1"):
        with pytest.raises(SystemExit) as e:
            lc.parse_args("A check.", ["--layouts", bad])
        assert e.value.code == 2
        assert f"--layouts {bad!r}: expected comma-separated positive TP sizes" in capsys.readouterr().err


def test_preflight_names_what_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not lc.preflight("x_check", ["json"])
    assert capsys.readouterr().out == "x_check: no GPU (torch.cuda.is_available() is False)\n"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert lc.preflight("x_check", ["json"], (0, 0, 1))
    assert capsys.readouterr().out == ""
    monkeypatch.setitem(lc.INSTALL, "no_such_module_of_x_check", "x-check-kernels")
    assert not lc.preflight("x_check", ["json", "no_such_module_of_x_check"])
    out = capsys.readouterr().out
    assert out.startswith("x_check: no_such_module_of_x_check does not import (") and \
        out.endswith("; install x-check-kernels\n"), out
    assert not lc.preflight("x_check", ["json"], (99, 0, 0), "the x layers")
    assert capsys.readouterr().out == (f"x_check: the x layers needs megatron-core >= 99.0.0; "
                                       f"{installed_megatron_core()} is installed\n")


@pytest.mark.parametrize("name", ["te_check", "dsa_check", "gdn_check", "hybrid_check"])
def test_check_scripts_stop_without_a_gpu(name, monkeypatch, capsys):
    """Each script imports, reads its arguments and stops before any work, naming what is missing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    script = importlib.import_module(name)
    assert script.main(["--layouts", "1"]) == 1
    assert capsys.readouterr().out == f"{name}: no GPU (torch.cuda.is_available() is False)\n"
    with pytest.raises(SystemExit):
        script.main(["--layouts", "one"])

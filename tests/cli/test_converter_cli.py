"""The converter as a user runs it: ``import``, ``export``, ``verify`` and ``inspect`` in subprocesses (their own
local gloo ranks, and under ``torchrun --nproc-per-node 2`` with gloo), on tiny transformers checkpoints with random
weights. Outputs are compared with the source checkpoint (key set, dtypes, ``torch.equal``) and with transformers
loading the result."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from megatron_bridge_ext.testing.parity import compare_checkpoints, hf_logits  # noqa: E402
from megatron_bridge_ext.testing.tiny_models import make_tiny_checkpoint  # noqa: E402
from megatron_bridge_ext.testing.tolerances import SAME_MODEL_ATOL, max_abs_diff  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAMA = dict(vocab_size=1003, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False)
MIXTRAL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=64, num_local_experts=4,
               num_experts_per_tok=2, tie_word_embeddings=False, rms_norm_eps=1e-5)
NOISE = ("Apex", "UserWarning", "Transformer Engine", "Loading weights", "warnings.warn")


def _env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}


def _cli(*args: str, torchrun: bool = False, timeout: int = 600) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if torchrun \
        else [sys.executable]
    res = subprocess.run([*launcher, "-m", "megatron_bridge_ext", *args], capture_output=True, text=True,
                         timeout=timeout, env=_env(), cwd=ROOT)
    return res


def _quiet(res: subprocess.CompletedProcess) -> None:
    """No third-party noise reaches the user by default."""
    for word in NOISE:
        assert word not in res.stderr and word not in res.stdout, f"{word!r} in the output:\n{res.stderr}"


def _make(path: str, arch: str, config: dict, seed: int) -> str:
    make_tiny_checkpoint(path, arch, config, seed)  # random norms, the rest as transformers initialises it
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_llama")
    src = _make(str(root / "hf"), "Llama", LLAMA, seed=0)
    return root, src


@pytest.fixture(scope="module")
def imported(llama):
    """The Llama imported at TP2 PP2 from a copy of the source that is deleted right after."""
    root, src = llama
    copy = str(root / "hf_copy")
    shutil.copytree(src, copy)
    meg = str(root / "megatron")
    res = _cli("import", copy, meg, "--tp", "2", "--pp", "2")
    shutil.rmtree(copy)
    return res, meg


def test_import_tp2_pp2_writes_a_checkpoint(imported):
    res, meg = imported
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"^import: 39 tensors, [\d.]+ GB in [\d.]+ s \([\d.]+ GB/s\) -> .*iter_0000000", res.stdout,
                     re.M), res.stdout
    assert len(res.stdout.strip().splitlines()) == 1, res.stdout  # one summary line and nothing else
    _quiet(res)
    assert open(os.path.join(meg, "latest_checkpointed_iteration.txt")).read().strip() == "0"
    assert os.path.isfile(os.path.join(meg, "iter_0000000", "metadata.json"))


def test_export_without_the_hf_source_is_bit_exact(llama, imported, tmp_path):
    """The source directory the checkpoint was imported from is gone: the model comes from the checkpoint's stored
    config, config.json from the Megatron side; the result reads at TP1 (resharded from TP2 PP2)."""
    root, src = llama
    _, meg = imported
    out = str(tmp_path / "hf_out")
    res = _cli("export", meg, out)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"^export: 39 tensors, [\d.]+ GB in [\d.]+ s \([\d.]+ GB/s\)", res.stdout, re.M), res.stdout
    _quiet(res)
    cmp = compare_checkpoints(src, out)
    assert cmp["same_keys"] and cmp["bit_exact"], cmp
    tokens = torch.randint(0, 1003, (2, 10), generator=torch.Generator().manual_seed(5))
    # the bytes are equal (above); two loads of them may still reduce in another order (testing/tolerances.py)
    diff = max_abs_diff(hf_logits(out, tokens), hf_logits(src, tokens))
    assert diff <= SAME_MODEL_ATOL, f"max |logit diff| {diff:.3e}"
    again = _cli("export", meg, out)  # an existing checkpoint is never replaced silently
    assert again.returncode != 0 and "--overwrite" in again.stderr


@pytest.mark.parametrize("path,rule,block", [("stream", None, None), ("via-model", "deepseek", (64, 96))])
def test_export_quantize_fp8(llama, imported, tmp_path, path, rule, block):
    """``--quantize fp8`` on both export paths: every 2-D linear weight is the plain-torch per-block quantization of the
    source tensor (the plain export is the source, bit for bit) with its weight_scale_inv; everything else is the
    source's; config.json says how. The 352-row MLP weights end in partial blocks (352 = 2 x 128 + 96)."""
    from reference import fp8_quant

    from megatron_bridge_ext.io import SafeTensorsSource

    root, src = llama
    _, meg = imported
    out = str(tmp_path / "hf_fp8")
    args = ["--quantize", "fp8"] + (["--via-model"] if path == "via-model" else [])
    args += ["--quantize-rule", rule] if rule else []
    args += ["--quantize-block-size", *map(str, block)] if block else []
    res = _cli("export", meg, out, *args)
    assert res.returncode == 0, res.stdout + res.stderr
    block = block or (128, 128)
    assert f"fp8 weights, rule {rule or 'transformers'}, block {block[0]}x{block[1]}" in res.stdout, res.stdout
    with SafeTensorsSource(src) as s, SafeTensorsSource(out) as o:
        want = {k: s[k].clone() for k in s.keys()}
        got = {k: o[k].clone() for k in o.keys()}
    linear = {k for k, v in want.items() if v.dim() == 2 and k not in ("model.embed_tokens.weight", "lm_head.weight")}
    assert len(linear) == 7 * LLAMA["num_hidden_layers"]
    assert set(got) == set(want) | {k + "_scale_inv" for k in linear}
    for k, v in want.items():
        if k in linear:
            q, sc = fp8_quant(v, block, rule or "transformers")
            assert torch.equal(got[k].view(torch.uint8), q.view(torch.uint8)) and torch.equal(got[k + "_scale_inv"], sc), k
        else:
            assert torch.equal(got[k], v), k
    with open(os.path.join(out, "config.json")) as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == list(block), qc


def test_verify_passes_then_names_the_changed_tensor(llama, imported, tmp_path):
    from safetensors.torch import load_file, save_file

    _, src = llama
    _, meg = imported
    good = _cli("verify", src, meg, "--tp", "2")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "PASS" in good.stdout and "max |logit diff|" in good.stdout and "MISMATCH" not in good.stdout
    _quiet(good)
    bad = str(tmp_path / "hf_bad")
    shutil.copytree(src, bad)
    tensors = load_file(os.path.join(bad, "model.safetensors"))
    tensors["model.layers.2.mlp.down_proj.weight"][3, 7] += 1.0  # one value
    save_file(tensors, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    res = _cli("verify", bad, meg)
    assert res.returncode == 1, res.stdout + res.stderr
    mismatches = [ln for ln in res.stdout.splitlines() if ln.startswith("MISMATCH")]
    assert mismatches == ["MISMATCH model.layers.2.mlp.down_proj.weight (1 of 45056 values differ)"], res.stdout
    assert "FAIL" in res.stdout


def test_streamed_verify_reads_without_a_model(llama, imported, tmp_path):
    """``verify --no-logits`` streams: one process reads the checkpoint's files bucket by bucket (no model, every
    stored byte read once), compares every tensor and names the changed one, as the model path does; with a layout it
    loads the model (``--tp 2``), and a stream that asks for logits is refused by name."""
    from safetensors.torch import load_file, save_file

    _, src = llama
    _, meg = imported
    good = _cli("verify", src, meg, "--no-logits", "--bucket-bytes", str(256 << 10))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "PASS" in good.stdout and "streamed (no model)" in good.stdout, good.stdout
    assert "max |logit diff|" not in good.stdout, good.stdout
    _quiet(good)
    stored = sum(os.path.getsize(os.path.join(meg, "iter_0000000", f)) for f in os.listdir(os.path.join(
        meg, "iter_0000000")) if f.endswith(".distcp"))
    read = re.search(r"streamed \(no model\)\s*│\s*([\d,]+) bytes read", good.stdout)
    read = int(read.group(1).replace(",", ""))
    assert 0 < read <= stored, (read, stored)  # each stored chunk once at most (fp32 here: nothing is cast)
    laid_out = _cli("verify", src, meg, "--no-logits", "--tp", "2")
    assert laid_out.returncode == 0 and "PASS" in laid_out.stdout and "streamed (no model)" not in laid_out.stdout, \
        laid_out.stdout + laid_out.stderr
    bad = str(tmp_path / "hf_bad")
    shutil.copytree(src, bad)
    tensors = load_file(os.path.join(bad, "model.safetensors"))
    tensors["model.layers.1.self_attn.k_proj.weight"][5, 2] -= 0.5
    save_file(tensors, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    res = _cli("verify", bad, meg, "--no-logits")
    assert res.returncode == 1 and "streamed (no model)" in res.stdout, res.stdout + res.stderr
    mismatches = [ln for ln in res.stdout.splitlines() if ln.startswith("MISMATCH")]
    assert mismatches == ["MISMATCH model.layers.1.self_attn.k_proj.weight (1 of 4096 values differ)"], res.stdout


_HOLD_PROBE = r"""
import sys, weakref
from megatron_bridge_ext.mcore import stream
from megatron_bridge_ext.cli.export import export_checkpoint

loaded, held = [], []
load = stream.CheckpointParams.load


def probe(self, tensors):
    held.append(sum(r() is not None for r in loaded))  # tensors of earlier buckets still alive at this read
    out = load(self, tensors)
    loaded.extend(weakref.ref(t) for t in out)
    return out


stream.CheckpointParams.load = probe

from megatron_bridge_ext.io.dcp_reader import TorchDistCheckpoint

asked, read = [], []
read_ahead, read_chunk = TorchDistCheckpoint.read_ahead, TorchDistCheckpoint.read_chunk


def ask(self, chunks):
    asked.extend(chunks)
    return read_ahead(self, chunks)


def reads(self, chunk, out=None):
    read.append(chunk)
    return read_chunk(self, chunk, out=out)


TorchDistCheckpoint.read_ahead, TorchDistCheckpoint.read_chunk = ask, reads
export_checkpoint(sys.argv[1], sys.argv[2], bucket_bytes=1, show=sys.argv[3] == "1")
print("HELD", len(held), max(held))
first = lambda xs: list(dict.fromkeys(xs))
print("AHEAD", len(first(read)), int(first(asked) == first(read)))
"""


@pytest.mark.parametrize("show", [False, True], ids=["quiet", "progress"])
def test_streamed_export_holds_no_earlier_bucket_while_reading(llama, imported, tmp_path, show):
    """The streamed export's memory is one bucket (plus the converter's scratch): with one parameter per bucket, no
    tensor read for an earlier bucket is alive when the next bucket is read, with and without the progress bar
    (before, the transport's last read, the export loop's last tensor and the writer loop's kept the previous bucket
    alive, so a 1-layer Qwen3-235B-shaped slice peaked at its embedding and output layer together); the export is
    still bit-exact. The stored chunks are read ahead of the conversion: every chunk the export reads was asked for,
    in the order of the reads, and nothing else."""
    _, src = llama
    _, meg = imported
    out = str(tmp_path / f"hf_{int(show)}")
    res = subprocess.run([sys.executable, "-c", _HOLD_PROBE, meg, out, str(int(show))], capture_output=True,
                         text=True, timeout=600, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("HELD"))
    reads, most = map(int, line.split()[1:])
    assert reads > 10 and most == 0, line
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("AHEAD"))
    chunks, same_order = map(int, line.split()[1:])
    assert chunks > 10 and same_order == 1, line
    diff = compare_checkpoints(src, out)
    assert diff["bit_exact"], diff


def test_streamed_verify_refuses_logits():
    from megatron_bridge_ext.cli.verify import verify_checkpoint

    with pytest.raises(ValueError, match="the logits need the model"):
        verify_checkpoint(ROOT, ROOT, via_model=False)


def test_under_torchrun_in_bf16(llama, tmp_path):
    """The same commands under torchrun (2 processes, gloo): the world torchrun started, one summary line. Imported
    with --dtype bf16 from fp32, the checkpoint holds bf16 only (norms included, as a bf16 training model has them),
    and the export without a source is the source cast to bf16, bit for bit."""
    from megatron_bridge_ext.io import SafeTensorsSource

    _, src = llama
    meg, out = str(tmp_path / "megatron"), str(tmp_path / "hf_out")
    res = _cli("import", src, meg, "--tp", "2", "--dtype", "bf16", torchrun=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(re.findall(r"^import: ", res.stdout, re.M)) == 1, res.stdout
    res = _cli("export", meg, out, "--tp", "2", torchrun=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(re.findall(r"^export: ", res.stdout, re.M)) == 1, res.stdout
    with SafeTensorsSource(src) as a, SafeTensorsSource(out) as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert b.dtype(k) == torch.bfloat16 and torch.equal(b[k], a[k].to(torch.bfloat16)), k
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"


def test_mixtral_ep2_round_trip_with_source_side_files(tmp_path):
    """Mixtral imported at EP2, exported at EP1 with the source's side files."""
    src = _make(str(tmp_path / "hf"), "Mixtral", MIXTRAL, seed=1)
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 64, "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    meg, out = str(tmp_path / "megatron"), str(tmp_path / "hf_out")
    res = _cli("import", src, meg, "--ep", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    res = _cli("export", meg, out, "--hf-source", src)  # read at EP1: the experts reshard from EP2
    assert res.returncode == 0, res.stdout + res.stderr
    cmp = compare_checkpoints(src, out)
    assert cmp["same_keys"] and cmp["bit_exact"], cmp
    for side in ("tokenizer_config.json", "config.json", "generation_config.json"):
        assert open(os.path.join(out, side)).read() == open(os.path.join(src, side)).read(), side


def test_inspect_plan(llama, tmp_path):
    """Every HF key is planned; per-rank bytes match the arithmetic of the layout; an extra HF key is reported."""
    from safetensors.torch import load_file, save_file

    _, src = llama
    extra = str(tmp_path / "hf_extra")
    shutil.copytree(src, extra)
    tensors = load_file(os.path.join(extra, "model.safetensors"))
    tensors["model.unused_adapter.weight"] = torch.zeros(3)
    save_file(tensors, os.path.join(extra, "model.safetensors"), metadata={"format": "pt"})
    res = _cli("inspect", extra, "--tp", "2", "--pp", "2", "--json", "-")
    assert res.returncode == 0, res.stdout + res.stderr
    plan = json.loads(res.stdout)
    planned = {k for row in plan["rows"] for k in row["hf"]}
    assert planned == set(tensors) - {"model.unused_adapter.weight"}
    assert plan["unmapped_hf"] == ["model.unused_adapter.weight"]
    assert plan["unmapped_megatron"] == [] and plan["missing_hf"] == []
    qkv = next(r for r in plan["rows"] if "model.layers.3.self_attn.q_proj.weight" in r["hf"])
    assert qkv["megatron"] == "decoder.layers.3.self_attention.linear_qkv.weight" and qkv["layout"] == "column"
    assert qkv["stages"] == ["pp1"] and qkv["shards"] == {"tp0": [96, 128], "tp1": [96, 128]}
    # reference: fp32, D=128, F=352, H*d=128, G*d=32, vocabulary 1003 padded to 1004 at TP2, two layers per stage
    D, F, q, kv, V = 128, 352, 128, 32, 1004
    layer = D + (q + 2 * kv) // 2 * D + D * (q // 2) + D + 2 * F // 2 * D + D * (F // 2)
    stage0 = V // 2 * D + 2 * layer
    stage1 = 2 * layer + D + V // 2 * D
    assert [r["bytes"] for r in plan["ranks"]] == [4 * stage0, 4 * stage0, 4 * stage1, 4 * stage1]
    assert all(r["import_peak_bytes"] >= r["bytes"] for r in plan["ranks"])


def test_streamed_conversions_do_not_load_the_compiler_stack(llama, tmp_path):
    """The streamed import and export run no model, so megatron-core's ``torch.compile``-wrapped fused functions
    stay eager there: torch's compiler stack (``torch._inductor``, ~1 s of start-up) is never imported, and the
    round trip is still bit-exact. Neither command leaves anything in the temporary directory (their one-process
    world has no rendezvous file)."""
    _, src = llama
    meg, out, tmp = str(tmp_path / "meg"), str(tmp_path / "hf"), tmp_path / "tmp"
    tmp.mkdir()
    for args in (["import", src, meg], ["export", meg, out]):
        res = subprocess.run([sys.executable, "-X", "importtime", "-m", "megatron_bridge_ext", *args, "--quiet"],
                             capture_output=True, text=True, timeout=600, env={**_env(), "TMPDIR": str(tmp)},
                             cwd=ROOT)
        assert res.returncode == 0, res.stdout + res.stderr[-3000:]
        imported_modules = {ln.split("|")[-1].strip() for ln in res.stderr.splitlines() if ln.startswith("import time")}
        assert "megatron.core" in imported_modules and "torch._inductor" not in imported_modules, args
        assert sorted(os.listdir(tmp)) == [], args
    assert compare_checkpoints(src, out)["bit_exact"]


def test_eager_functions_restores_torch_compile():
    from megatron_bridge_ext.cli.common import eager_functions

    real = torch.compile

    def f(x):
        return x + 1

    with pytest.raises(RuntimeError, match="inside"):
        with eager_functions():
            assert torch.compile(f) is f and torch.compile(mode="max-autotune")(f) is f
            raise RuntimeError("inside")
    assert torch.compile is real


def test_the_command_flushes_its_output_and_keeps_its_exit_status(tmp_path):
    """The command exits without the interpreter's teardown: what it printed into a pipe still arrives whole, and
    a failure still exits with status 1 and its message."""
    from megatron_bridge_ext.auto_bridge import AutoBridge

    res = subprocess.run([sys.executable, "-m", "megatron_bridge_ext", "list-models"], capture_output=True,
                         text=True, timeout=300, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert all(arch in res.stdout for arch in AutoBridge.list_supported_models()), res.stdout
    res = _cli("import", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert res.returncode == 1 and "does not exist" in res.stderr, res.stdout + res.stderr


def test_checksum_check_beside_the_conversion_names_a_changed_file(imported, tmp_path):
    """The streamed export's checksum check (on its own thread, beside the conversion) finds what the collective
    check finds: every file of the manifest, a flipped byte named by its file, no manifest said as None."""
    from megatron_bridge_ext.io.checksums import MANIFEST_NAME, IntegrityError
    from megatron_bridge_ext.io.megatron_checkpoint import ChecksumCheck, check_checksums, resolve_checkpoint

    _, meg = imported
    assert ChecksumCheck(meg).result() == check_checksums(meg, required=True) > 0
    bad = str(tmp_path / "bad")
    shutil.copytree(meg, bad)
    sub, _ = resolve_checkpoint(bad)
    name = max((n for n in os.listdir(sub) if n.endswith(".distcp")),
               key=lambda n: os.path.getsize(os.path.join(sub, n)))
    with open(os.path.join(sub, name), "r+b") as f:
        f.seek(-100, os.SEEK_END)
        b = f.read(1)
        f.seek(-100, os.SEEK_END)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(IntegrityError, match=re.escape(name)):
        ChecksumCheck(bad).result()
    os.remove(os.path.join(sub, MANIFEST_NAME))
    assert ChecksumCheck(bad).result() is None

"""The test-support helpers' own contracts that need no world: layout names must be unique (each names an export
directory and a results key), a config round trip reports exactly the Megatron fields that changed, and the expert
check finds a local expert that holds another global expert's or another expert-TP rank's slice. The worlds
themselves run in the family tests (tests/distributed/)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_bridge_ext.testing.parity import ConfigRoundTrip, local_expert_mismatches
from megatron_bridge_ext.testing.worlds import Layout, spawn_layouts


def test_repeated_layout_names_are_refused_before_any_rank_starts(tmp_path):
    layouts = [Layout("tp2", "a", tp=2), Layout("pp2", "a", pp=2), Layout("tp2", "b", tp=2)]
    with pytest.raises(ValueError, match=r"layout names repeat: \['tp2'\]"):
        spawn_layouts({"a": str(tmp_path), "b": str(tmp_path)}, layouts, torch.zeros(1, 2, dtype=torch.long),
                      str(tmp_path), timeout=5)


def test_config_round_trip_names_the_changed_fields():
    before = SimpleNamespace(num_layers=4, rotary_base=10000.0, window_size=(5, 0))
    after = SimpleNamespace(num_layers=4, rotary_base=20000.0, window_size=None)
    rt = ConfigRoundTrip(megatron=before, regenerated={}, config=None, model=torch.nn.Identity(), logit_diff=0.0,
                         again=after)
    assert rt.changed(["num_layers", "rotary_base", "window_size"]) == ["rotary_base", "window_size"]
    assert rt.changed(["num_layers"]) == []


def _expert(fc1: torch.Tensor, fc2: torch.Tensor) -> torch.nn.Module:
    m = torch.nn.Module()
    m.linear_fc1, m.linear_fc2 = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    m.linear_fc1.weight, m.linear_fc2.weight = torch.nn.Parameter(fc1), torch.nn.Parameter(fc2)
    return m


def _moe_layer(local) -> SimpleNamespace:
    return SimpleNamespace(mlp=SimpleNamespace(experts=SimpleNamespace(local_experts=local)))


def test_local_expert_mismatches_finds_a_wrong_global_expert_or_slice():
    """4 experts over EP2 (this rank: globals 2 and 3), expert-TP rank 1 of 2; HF layer 1 and the MTP layer (HF 2)
    hold experts, HF layer 0 none."""
    g = torch.Generator().manual_seed(0)
    sd = {f"model.layers.{n}.mlp.experts.{e}.{w}.weight": torch.randn(*shape, generator=g)
          for n in (1, 2) for e in range(4) for w, shape in (("gate_proj", (4, 3)), ("up_proj", (4, 3)),
                                                              ("down_proj", (3, 4)))}

    def local(n, globals_, t=1):
        out = []
        for e in globals_:
            gate, up, down = (sd[f"model.layers.{n}.mlp.experts.{e}.{w}.weight"] for w in ("gate_proj", "up_proj",
                                                                                             "down_proj"))
            out.append(_expert(torch.cat([gate[2 * t:2 * t + 2], up[2 * t:2 * t + 2]]), down[:, 2 * t:2 * t + 2]))
        return out

    def chunk(layer1, mtp):
        dense = SimpleNamespace(layer_number=1, mlp=SimpleNamespace())
        moe = _moe_layer(layer1)
        moe.layer_number = 2
        return SimpleNamespace(decoder=SimpleNamespace(layers=[dense, moe]),
                               mtp=SimpleNamespace(layers=[SimpleNamespace(transformer_layer=_moe_layer(mtp))]))

    args = (4, 1, 2, 1, 2)  # experts, EP rank, EP, expert-TP rank, expert TP
    right = chunk(local(1, (2, 3)), local(2, (2, 3)))
    assert local_expert_mismatches([right], sd, *args, mtp_index=2) == ([], 2)
    assert local_expert_mismatches([right], sd, *args) == ([], 1)  # the MTP layer only with its HF index
    swapped = chunk(local(1, (3, 2)), local(2, (2, 3)))
    bad, layers = local_expert_mismatches([swapped], sd, *args, mtp_index=2)
    assert layers == 2 and bad == [f"HF layer 1 local expert {e} (global {e + 2}) linear_fc{i}.weight"
                                   for e in (0, 1) for i in (1, 2)]
    other_slice = chunk(local(1, (2, 3)), local(2, (2, 3), t=0))
    bad, _ = local_expert_mismatches([other_slice], sd, *args, mtp_index=2)
    assert bad == [f"HF layer 2 local expert {e} (global {e + 2}) linear_fc{i}.weight" for e in (0, 1) for i in (1, 2)]

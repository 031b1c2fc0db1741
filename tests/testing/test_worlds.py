"""The test-support helpers' own contracts that need no world: layout names must be unique (each names an export
directory and a results key), and a config round trip reports exactly the Megatron fields that changed. The worlds
themselves run in the family tests (tests/distributed/)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megatron_bridge_ext.testing.parity import ConfigRoundTrip
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

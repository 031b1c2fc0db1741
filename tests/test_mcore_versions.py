"""What differs between the supported megatron-core versions, behind ``mcore/versions.py``: layer-spec entries that
are ``ModuleSpec`` objects (0.16) or ``functools.partial`` builders (0.18+), read and replaced by one helper. Runs on
the installed megatron-core, with real spec objects of both forms."""

from __future__ import annotations

import dataclasses
import functools

import pytest

pytest.importorskip("megatron.core")

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules  # noqa: E402
from megatron.core.transformer.moe.router import TopKRouter  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec  # noqa: E402

from megatron_bridge_ext.mcore.modules import FP32WeightRouter  # noqa: E402
from megatron_bridge_ext.mcore.versions import replace_submodules, spec_submodules  # noqa: E402


def _moe_entries():
    subs = MoESubmodules(experts=None, shared_experts=None)
    return [ModuleSpec(module=MoELayer, submodules=subs), functools.partial(MoELayer, submodules=subs)]


@pytest.mark.parametrize("form", [0, 1], ids=["ModuleSpec", "partial"])
def test_replace_submodules_keeps_the_entry_form(form):
    entry = _moe_entries()[form]
    new = replace_submodules(entry, router=FP32WeightRouter)
    assert type(new) is type(entry)
    assert spec_submodules(new).router is FP32WeightRouter
    assert spec_submodules(entry).router is TopKRouter  # the original is not changed
    if isinstance(new, functools.partial):
        assert new.func is MoELayer and set(new.keywords) == set(entry.keywords)
    else:
        assert new.module is MoELayer
    assert {f.name: getattr(spec_submodules(new), f.name) for f in dataclasses.fields(MoESubmodules)
            if f.name != "router"} == {f.name: getattr(spec_submodules(entry), f.name)
                                      for f in dataclasses.fields(MoESubmodules) if f.name != "router"}


def test_installed_local_spec_entries_are_read_and_replaced():
    """The installed megatron-core's own local spec (its MLP / MoE entries are ModuleSpec on 0.16, partials on 0.18+):
    the layer, its attention, dense MLP and MoE entries all go through the helpers."""
    from megatron.core.transformer.mlp import MLPSubmodules

    from megatron_bridge_ext.mcore.modules import PostNormRowParallelLinear

    for num_experts in (None, 4):
        layer = get_gpt_layer_local_spec(num_experts=num_experts, qk_layernorm=True, normalization="RMSNorm")
        mlp = spec_submodules(layer).mlp
        if num_experts:
            new_mlp = replace_submodules(mlp, router=FP32WeightRouter)
            assert spec_submodules(new_mlp).router is FP32WeightRouter
        else:
            assert isinstance(spec_submodules(mlp), MLPSubmodules)
            new_mlp = replace_submodules(mlp, linear_fc2=PostNormRowParallelLinear)
            assert spec_submodules(new_mlp).linear_fc2 is PostNormRowParallelLinear
        new_layer = replace_submodules(layer, mlp=new_mlp)
        assert spec_submodules(new_layer).mlp is new_mlp
        assert spec_submodules(new_layer).self_attention is spec_submodules(layer).self_attention


def test_entries_of_another_kind_are_refused_by_name():
    with pytest.raises(TypeError, match="without a 'submodules' keyword"):
        spec_submodules(functools.partial(MoELayer))
    with pytest.raises(TypeError, match="neither a ModuleSpec nor a functools.partial"):
        spec_submodules(MoELayer)

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


# ---------------------------------------------------------------------------------------------------------------------
# the supported megatron-core releases
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version,ok", [
    ("0.16.1", True), ("0.16.2", True), ("0.19.0", True), ("0.19.2", True),
    ("0.19.2+8f3c2a1", True),  # megatron-core's package_info appends the git hash of a checkout it sits in
    ("0.16.1.post1", True),
    ("0.16.0", False), ("0.17.1", False), ("0.18.2", False), ("0.20.0", False), ("1.0.0", False),
    ("0.19.0rc1", False), ("0.19.3.dev0", False), ("nightly", False),
])
def test_version_strings_against_the_supported_range(version, ok):
    from megatron_bridge_ext.mcore.versions import (
        SUPPORTED_MEGATRON_CORE,
        UnsupportedMegatronCoreError,
        check_megatron_core_version,
    )

    if ok:
        check_megatron_core_version(version)
        return
    with pytest.raises(UnsupportedMegatronCoreError) as info:
        check_megatron_core_version(version)
    assert version in str(info.value) and SUPPORTED_MEGATRON_CORE in str(info.value)


def _pyproject() -> dict:
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[2] / "pyproject.toml"
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads(path.read_text())


def test_pyproject_declares_the_tested_ranges_and_python_versions():
    """pyproject.toml's megatron-core range is the one the package checks at run time, the interpreters named in its
    classifiers are 3.10-3.12, and what this environment runs (torch, transformers, megatron-core) lies inside the
    declared ranges."""
    import importlib.metadata

    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    from megatron_bridge_ext.mcore.versions import SUPPORTED_MEGATRON_CORE, installed_megatron_core

    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    for extra in ("megatron", "test"):
        found = [Requirement(r).specifier for r in extras[extra] if Requirement(r).name == "megatron-core"]
        assert found == [SpecifierSet(SUPPORTED_MEGATRON_CORE)], (extra, found)
    pythons = {c.rsplit(" ", 1)[-1] for c in project["classifiers"]
               if c.startswith("Programming Language :: Python ::")}
    assert {"3.10", "3.11", "3.12"} <= pythons and project["requires-python"] == ">=3.10"
    declared = [Requirement(r) for r in project["dependencies"] + extras["megatron"]]
    installed = {"torch": importlib.metadata.version("torch"),
                 "transformers": importlib.metadata.version("transformers"), "megatron-core": installed_megatron_core()}
    for req in declared:
        if req.name in installed:
            version = installed[req.name].split("+")[0]
            assert req.specifier.contains(version), (req, installed[req.name])


def test_an_unsupported_megatron_core_fails_with_one_error_before_megatron_is_imported(tmp_path):
    """A megatron-core outside the range (here 0.18.0 as its distribution metadata says, found first on sys.path)
    gets one UnsupportedMegatronCoreError naming the installed and the supported versions at the first use of the
    package's Megatron side (AutoBridge.from_hf_pretrained -> to_megatron_model), before megatron-core is even
    imported; MEGATRON_BRIDGE_EXT_ALLOW_UNSUPPORTED_MCORE=1 lets it through."""
    import os
    import subprocess
    import sys

    from megatron_bridge_ext.mcore.versions import SKIP_VERSION_CHECK_ENV, SUPPORTED_MEGATRON_CORE
    from megatron_bridge_ext.testing.tiny_models import make_tiny_llama

    fake = tmp_path / "site"
    info = fake / "megatron_core-0.18.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: megatron-core\nVersion: 0.18.0\n")
    src = make_tiny_llama(str(tmp_path / "hf"), num_hidden_layers=1)
    script = (
        "import sys\n"
        "try:\n"
        "    from megatron_bridge_ext import AutoBridge\n"
        f"    AutoBridge.from_hf_pretrained({src!r}).to_megatron_model()\n"
        "except Exception as e:\n"
        "    print('ERROR', type(e).__name__, e)\n"
        "    print('MEGATRON_IMPORTED', any(m.startswith('megatron.core') for m in sys.modules))\n"
        "import importlib.metadata\n"
        "print('INSTALLED', importlib.metadata.version('megatron-core'))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != SKIP_VERSION_CHECK_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(fake), root, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "INSTALLED 0.18.0" in res.stdout, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("ERROR")]
    assert len(lines) == 1 and lines[0].startswith("ERROR UnsupportedMegatronCoreError"), res.stdout + res.stderr
    assert "megatron-core 0.18.0 is installed" in lines[0] and SUPPORTED_MEGATRON_CORE in lines[0]
    assert "0.16.1" in lines[0] and "0.19.2" in lines[0] and SKIP_VERSION_CHECK_ENV in lines[0]
    assert "MEGATRON_IMPORTED False" in res.stdout

    env[SKIP_VERSION_CHECK_ENV] = "1"
    res = subprocess.run([sys.executable, "-c", "import megatron_bridge_ext.mcore.config; print('IMPORTED')"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "IMPORTED" in res.stdout, res.stderr


# ---------------------------------------------------------------------------------------------------------------------
# the opt-in layouts of 0.17-0.19, where no model is needed: Megatron-LM args, stored configs
# ---------------------------------------------------------------------------------------------------------------------

def test_opt_in_layouts_in_megatron_lm_args_and_stored_configs_are_refused():
    import argparse

    from megatron_bridge_ext.mcore.config import config_from_dict
    from megatron_bridge_ext.mcore.versions import check_opt_in_layouts

    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, tensor_model_parallel_size=2)
    check_opt_in_layouts(argparse.Namespace(**base, tensor_parallel_num_weight_shards=2,
                                            moe_mlp_glu_interleave_size=None, mtp_use_repeated_layer=True,
                                            mtp_num_layers=1), "ckpt")  # all equivalent to the plain layout
    with pytest.raises(ValueError, match=r"ckpt: .*tensor_parallel_num_weight_shards=4 with "
                                         r"tensor_model_parallel_size=2: it splits every weight"):
        check_opt_in_layouts(argparse.Namespace(**base, tensor_parallel_num_weight_shards=4), "ckpt")
    with pytest.raises(ValueError, match=r"moe_single_grouped_weight=True.*moe_mlp_glu_interleave_size=64"):
        check_opt_in_layouts({**base, "moe_single_grouped_weight": True, "moe_mlp_glu_interleave_size": 64}, "x")
    stored = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "mla_down_proj_fusion": True}
    with pytest.raises(ValueError, match=r"stored model config: .*mla_down_proj_fusion=True.*convert with "
                                         r"mla_down_proj_fusion=False"):
        config_from_dict(stored)

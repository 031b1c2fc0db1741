"""The family contract's megatron-core check (``MegatronModelBridge.min_megatron_core``): one refusal naming the
architecture, what the family needs, the release and the installed one; ``transformer_config`` checks it before the
family translates anything; a family without a minimum is never refused. With the installed version reported as
0.16.1 (whatever is installed), and with the installed one."""

from __future__ import annotations

import pytest

from megatron_bridge_ext.engine import MegatronModelBridge
from megatron_bridge_ext.mcore import versions


class _Family(MegatronModelBridge):
    hf_architecture = "ToyForCausalLM"
    min_megatron_core = (0, 19, 0)
    min_megatron_core_feature = "the toy layers"

    def hf_config_to_megatron_kwargs(self, hf_config):
        raise AssertionError("translated before the megatron-core check")


class _Plain(MegatronModelBridge):
    pass


def test_a_family_is_refused_under_an_older_megatron_core(monkeypatch):
    monkeypatch.setattr(versions, "megatron_core_version", lambda: (0, 16, 1))
    monkeypatch.setattr(versions, "installed_megatron_core", lambda: "0.16.1")
    refusal = (r"^ToyForCausalLM: the toy layers needs megatron-core >= 0\.19\.0; megatron-core 0\.16\.1 is "
               r"installed$")
    with pytest.raises(ValueError, match=refusal):
        _Family().require_megatron_core()
    with pytest.raises(ValueError, match=refusal):
        _Family().transformer_config({})
    assert _Family.unmet_megatron_core() == "needs megatron-core >= 0.19.0; 0.16.1 is installed"
    _Plain().require_megatron_core()  # no minimum: nothing to refuse
    assert _Plain.unmet_megatron_core() is None
    anonymous = type("AnonymousBridge", (_Family,), {"hf_architecture": None, "min_megatron_core_feature": "x"})
    with pytest.raises(ValueError, match=r"^AnonymousBridge: x needs megatron-core >= 0\.19\.0"):
        anonymous().require_megatron_core()


def test_the_installed_megatron_core_against_the_minimum():
    installed = versions.megatron_core_version()
    family = type("F", (_Family,), {"min_megatron_core": installed})
    family().require_megatron_core()  # the installed release itself is enough
    assert family.unmet_megatron_core() is None
    newer = type("G", (_Family,), {"min_megatron_core": (installed[0], installed[1] + 1, 0)})
    with pytest.raises(ValueError, match=rf"ToyForCausalLM: the toy layers needs megatron-core >= "
                                         rf"{installed[0]}\.{installed[1] + 1}\.0; megatron-core "
                                         rf"{versions.installed_megatron_core()} is installed"):
        newer().require_megatron_core()

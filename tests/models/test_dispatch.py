"""Bridge dispatch by HF architecture: exact class, subclass, string name, unknown."""

from __future__ import annotations

import pytest

from megatron_bridge_ext import dispatch
from megatron_bridge_ext.dispatch import (
    bridge_target,
    get_bridge_class,
    get_model_bridge,
    register_bridge,
    supported_architectures,
    unregister_bridge,
)


class ZzFakeGPT:
    pass


class ZzFakeMamba:
    pass


class ZzFakeLlamaForCausalLM:
    pass


class ZzFakeLlamaChild(ZzFakeLlamaForCausalLM):
    pass


class ZzFakeLlamaGrandChild(ZzFakeLlamaChild):
    pass


class ZzFakeQwenForCausalLM(ZzFakeLlamaForCausalLM):
    pass


@pytest.fixture
def bridges():
    registered = []

    def reg(source, target, name):
        cls = type(name, (), {"__module__": __name__})
        register_bridge(source=source, target=target)(cls)
        registered.append(source)
        return cls

    yield reg
    for s in registered:
        unregister_bridge(s)


def test_exact_subclass_and_instance(bridges):
    llama = bridges(ZzFakeLlamaForCausalLM, ZzFakeGPT, "LlamaBridge")
    qwen = bridges(ZzFakeQwenForCausalLM, ZzFakeGPT, "QwenBridge")
    b = get_model_bridge(ZzFakeLlamaForCausalLM)
    assert type(b) is llama
    assert get_model_bridge(ZzFakeLlamaForCausalLM) is not b  # a new instance each time
    assert type(get_model_bridge(ZzFakeLlamaForCausalLM())) is llama  # instance
    assert type(get_model_bridge(ZzFakeLlamaGrandChild)) is llama  # via the MRO
    assert type(get_model_bridge(ZzFakeLlamaGrandChild())) is llama
    assert type(get_model_bridge(ZzFakeQwenForCausalLM)) is qwen  # exact type beats the registered base
    assert get_bridge_class(ZzFakeQwenForCausalLM) is qwen
    assert bridge_target(ZzFakeQwenForCausalLM) is ZzFakeGPT
    # by name, a class registration answers too
    assert type(get_model_bridge("ZzFakeLlamaForCausalLM")) is llama


def test_nearest_registered_base_wins(bridges):
    base = bridges(ZzFakeLlamaForCausalLM, ZzFakeGPT, "BaseBridge")
    child = bridges(ZzFakeLlamaChild, ZzFakeMamba, "ChildBridge")
    assert type(get_model_bridge(ZzFakeLlamaGrandChild)) is child
    assert bridge_target(ZzFakeLlamaGrandChild) is ZzFakeMamba
    assert type(get_model_bridge(ZzFakeQwenForCausalLM)) is base


def test_string_registration(bridges):
    ds = bridges("ZzDeepseekV3ForCausalLM", ZzFakeMamba, "DeepseekBridge")
    assert type(get_model_bridge("ZzDeepseekV3ForCausalLM")) is ds
    assert bridge_target("ZzDeepseekV3ForCausalLM") is ZzFakeMamba
    # a class known only by name (e.g. loaded from auto_map code) resolves through its name
    dynamic = type("ZzDeepseekV3ForCausalLM", (), {})
    assert type(get_model_bridge(dynamic)) is ds
    assert type(get_model_bridge(dynamic())) is ds
    # and a subclass of it through its MRO names
    sub = type("ZzDeepseekV3Sub", (dynamic,), {})
    assert type(get_model_bridge(sub)) is ds
    assert "ZzDeepseekV3ForCausalLM" in supported_architectures()


def test_unknown_architecture_lists_supported(bridges):
    bridges(ZzFakeLlamaForCausalLM, ZzFakeGPT, "LlamaBridge")
    bridges("ZzAaaForCausalLM", ZzFakeGPT, "AaaBridge")
    names = supported_architectures()
    assert names == sorted(names)
    assert {"ZzAaaForCausalLM", "ZzFakeLlamaForCausalLM"} <= set(names)
    with pytest.raises(ValueError, match=r"'NopeForCausalLM'.*supported: .*ZzAaaForCausalLM, .*ZzFakeLlamaForCausalLM"):
        get_model_bridge("NopeForCausalLM")
    with pytest.raises(ValueError, match="ZzFakeMamba"):
        get_model_bridge(ZzFakeMamba)
    with pytest.raises(ValueError, match="no model bridge"):
        bridge_target(ZzFakeMamba())


def test_registration_errors(bridges):
    bridges(ZzFakeLlamaForCausalLM, ZzFakeGPT, "LlamaBridge")

    class Other:
        pass

    with pytest.raises(ValueError, match="already bridged by LlamaBridge"):
        register_bridge(source=ZzFakeLlamaForCausalLM, target=ZzFakeGPT)(Other)
    # re-registering the same bridge (e.g. after a module reload) is allowed
    again = type("LlamaBridge", (), {"__module__": __name__})
    register_bridge(source=ZzFakeLlamaForCausalLM, target=ZzFakeGPT)(again)
    assert get_bridge_class(ZzFakeLlamaForCausalLM) is again
    with pytest.raises(ValueError, match="source must be"):
        register_bridge(source=3, target=ZzFakeGPT)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target must be"):
        register_bridge(source="X", target="GPTModel")  # type: ignore[arg-type]


def test_decorator_returns_class_and_unregister():
    @register_bridge(source="ZzTempArch", target=ZzFakeGPT)
    class TempBridge:
        pass

    try:
        assert isinstance(TempBridge, type)
        assert type(get_model_bridge("ZzTempArch")) is TempBridge
    finally:
        unregister_bridge("ZzTempArch")
    assert "ZzTempArch" not in supported_architectures()
    with pytest.raises(ValueError):
        get_model_bridge("ZzTempArch")
    assert dispatch.supported_architectures is supported_architectures

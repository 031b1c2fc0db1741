"""param_sort_key and local_to_global_name against Python ``re`` references written from conversion_semantics.md §5.

The references match ASCII digits only (``re.ASCII``): Megatron indices are ASCII, and the ops parse ASCII.
"""

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import megatron_bridge_ext  # noqa: F401  (registers torch.ops.bridge)
from megatron_bridge_ext import ops

# ---------------------------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------------------------

_LAYER = re.compile(r"layers\.(\d+)", re.ASCII)
_EXPERT = re.compile(r"(?:bias|weight)(\d+)", re.ASCII)
_LOCAL_EXPERT = re.compile(r"local_experts\.(\d+)", re.ASCII)


def ref_sort_key(name: str):
    """layer: first `layers\\.(\\d+)`; expert: first `(?:bias|weight)(\\d+)` else `local_experts\\.(\\d+)`; else -1."""
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else -1
    m = _EXPERT.search(name) or _LOCAL_EXPERT.search(name)
    expert = int(m.group(1)) if m else -1
    return layer, expert


def _shift(name: str, m: "re.Match", offset: int) -> str:
    return name[: m.start(1)] + str(int(m.group(1)) + offset) + name[m.end(1):]


def ref_local_to_global(name: str, layer_offset: int, expert_offset: int) -> str:
    """First `layers.{i}.` -> i + layer_offset; grouped `.weight{e}`/`.bias{e}` (name ends there, inside
    `.mlp.experts.linear_fc`) and sequential `.mlp.experts.local_experts.{e}.` -> e + expert_offset; `.adapter.` names
    keep their expert index. A zero offset leaves its part untouched."""
    if layer_offset:
        m = re.search(r"layers\.(\d+)\.", name, re.ASCII)
        if m:
            name = _shift(name, m, layer_offset)
    if expert_offset and ".adapter." not in name:
        if ".mlp.experts.linear_fc" in name:
            m = re.search(r"\.(?:weight|bias)(\d+)\Z", name, re.ASCII)
            if m:
                name = _shift(name, m, expert_offset)
        m = re.search(r"\.mlp\.experts\.local_experts\.(\d+)\.", name, re.ASCII)
        if m:
            name = _shift(name, m, expert_offset)
    return name


def seed_local_to_global(name: str, layer_offset: int, expert_offset: int) -> str:
    """The string handling of the reference bridge's `_megatron_local_name_to_global` (grouped experts only), with the
    module lookup replaced by the offsets; valid on the well-formed names of `megatron_names` below."""
    if "layers." in name and layer_offset:
        assert re.match(r"^(.+?\.layers\.\d+)", name)
        local = int(name.split("layers.")[1].split(".")[0])
        name = name.replace(f"layers.{local}.", f"layers.{local + layer_offset}.")
    if ".mlp.experts.linear_fc" in name and expert_offset and ".adapter." not in name:
        kind = "weight" if ".weight" in name else "bias"
        local = int(name.split(f".{kind}")[-1])
        name = name.replace(f".{kind}{local}", f".{kind}{local + expert_offset}")
    return name


# ---------------------------------------------------------------------------------------------------------------------
# Name strategies
# ---------------------------------------------------------------------------------------------------------------------

_idx = st.integers(0, 10**6)
_prefix = st.sampled_from(["decoder", "mtp", "vision_model.decoder", "language_model.decoder", "encoder"])
_dense = st.sampled_from([
    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "self_attention.linear_proj.weight",
    "self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight",
    "mlp.linear_fc1.layer_norm_weight", "mlp.router.weight", "mlp.router.expert_bias",
    "mlp.shared_experts.linear_fc1.weight", "pre_mlp_layernorm.weight", "self_attention.q_layernorm.weight",
])


@st.composite
def megatron_names(draw):
    """Well-formed Megatron-Core parameter names (dense, grouped and sequential experts, adapters, no layer)."""
    kind = draw(st.sampled_from(["dense", "grouped", "sequential", "adapter", "global"]))
    layer = f"{draw(_prefix)}.layers.{draw(_idx)}"
    e = draw(_idx)
    fc = draw(st.sampled_from(["linear_fc1", "linear_fc2"]))
    if kind == "dense":
        return f"{layer}.{draw(_dense)}"
    if kind == "grouped":
        return f"{layer}.mlp.experts.{fc}.{draw(st.sampled_from(['weight', 'bias']))}{e}"
    if kind == "sequential":
        return f"{layer}.mlp.experts.local_experts.{e}.{fc}.{draw(st.sampled_from(['weight', 'bias']))}"
    if kind == "adapter":
        return f"{layer}.mlp.experts.{fc}.adapter.linear_in.weight{e}"
    return draw(st.sampled_from([
        "embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight",
        "embedding.position_embeddings.weight", "mtp.layers.0.enorm.weight",
    ]))


# Tokens with optional ASCII (or other) digits and separators glued at random: they exercise overlapping, repeated and
# partial matches of every pattern.
_number = st.one_of(st.none(), st.integers(0, 10**5).map(str), st.sampled_from(["007", "٣", ""]))
_segment = st.tuples(
    st.sampled_from([
        "layers.", "layers", "weight", "bias", "local_experts.", ".mlp.experts.linear_fc",
        ".mlp.experts.local_experts.", ".adapter.", "decoder.", "x", "é", "日本", "\n", "\x00",
    ]),
    _number,
    st.sampled_from([".", "", "_", "\n"]),
).map(lambda t: t[0] + (t[1] or "") + t[2])
_key_segment = st.tuples(
    st.sampled_from(["layers.", "weight", "bias", "local_experts."]), _number, st.sampled_from([".", "", "x."])
).map(lambda t: t[0] + (t[1] or "") + t[2])
_fragments = st.lists(st.one_of(_segment, _key_segment), min_size=1, max_size=6).map("".join)
_any_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
any_name = st.one_of(megatron_names(), _fragments, _any_text)

_settings = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------------------------------
# param_sort_key
# ---------------------------------------------------------------------------------------------------------------------


@_settings
@given(any_name)
def test_sort_key_matches_reference(name):
    assert ops.param_sort_key(name) == ref_sort_key(name)
    assert tuple(torch.ops.bridge.param_sort_key(name)) == ref_sort_key(name)


@pytest.mark.parametrize(
    "name, key",
    [
        ("embedding.word_embeddings.weight", (-1, -1)),
        ("output_layer.weight", (-1, -1)),
        ("decoder.layers.12.self_attention.linear_qkv.weight", (12, -1)),
        ("decoder.layers.12.mlp.linear_fc1.layer_norm_weight", (12, -1)),
        ("decoder.layers.3.mlp.experts.linear_fc1.weight7", (3, 7)),  # `weight(\d+)`, no dot
        ("decoder.layers.3.mlp.experts.linear_fc2.bias15", (3, 15)),
        ("linear_fc1.weight7", (-1, 7)),
        ("decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight", (0, 3)),
        ("decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight5", (0, 5)),  # bias|weight wins
        ("local_experts.4.x.bias2", (-1, 2)),
        ("xbias9y", (-1, 9)),
        ("weight1bias2", (-1, 1)),  # leftmost alternative
        ("bias1weight2", (-1, 1)),
        ("layers.x.layers.8.y", (8, -1)),
        ("sublayers.5", (5, -1)),
        ("decoder.layers.007.w", (7, -1)),
        ("decoder.layers.٣.w", (-1, -1)),  # non-ASCII digit
        ("layers.", (-1, -1)),
        ("", (-1, -1)),
        ("日本.layers.2.weight3", (2, 3)),
        ("decoder.layers." + "9" * 18 + ".w", (10**18 - 1, -1)),
    ],
)
def test_sort_key_cases(name, key):
    assert ref_sort_key(name) == key
    assert ops.param_sort_key(name) == key


def test_sort_key_rejects_huge_index():
    name = "decoder.layers." + "1" * 19 + ".w"
    with pytest.raises(RuntimeError, match=re.escape(name)):
        ops.param_sort_key(name)


# ---------------------------------------------------------------------------------------------------------------------
# local_to_global_name
# ---------------------------------------------------------------------------------------------------------------------

_offset = st.one_of(st.just(0), st.integers(1, 10**6))


@_settings
@given(any_name, _offset, _offset)
def test_local_to_global_matches_reference(name, layer_offset, expert_offset):
    assert ops.local_to_global_name(name, layer_offset, expert_offset) == ref_local_to_global(
        name, layer_offset, expert_offset)


@_settings
@given(megatron_names(), _offset, _offset)
def test_local_to_global_matches_seed_bridge(name, layer_offset, expert_offset):
    if ".local_experts." in name:  # the seed bridge leaves sequential experts local; see test_local_to_global_cases
        expert_offset = 0
    assert ops.local_to_global_name(name, layer_offset, expert_offset) == seed_local_to_global(
        name, layer_offset, expert_offset)


@pytest.mark.parametrize(
    "name, lo, eo, out",
    [
        ("decoder.layers.3.mlp.experts.linear_fc1.weight7", 10, 16,
         "decoder.layers.13.mlp.experts.linear_fc1.weight23"),
        ("decoder.layers.3.mlp.experts.linear_fc2.bias0", 0, 4, "decoder.layers.3.mlp.experts.linear_fc2.bias4"),
        ("decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight", 2, 8,
         "decoder.layers.5.mlp.experts.local_experts.13.linear_fc1.weight"),
        ("decoder.layers.3.mlp.experts.linear_fc1.adapter.linear_in.weight2", 1, 8,
         "decoder.layers.4.mlp.experts.linear_fc1.adapter.linear_in.weight2"),
        ("decoder.layers.3.mlp.experts.local_experts.5.adapter.linear_in.weight", 1, 8,
         "decoder.layers.4.mlp.experts.local_experts.5.adapter.linear_in.weight"),
        ("decoder.layers.9.mlp.linear_fc1.weight", 0, 0, "decoder.layers.9.mlp.linear_fc1.weight"),
        ("decoder.layers.9.mlp.experts.linear_fc1.weight", 1, 3, "decoder.layers.10.mlp.experts.linear_fc1.weight"),
        ("decoder.layers.9.mlp.shared_experts.linear_fc1.weight", 1, 3,
         "decoder.layers.10.mlp.shared_experts.linear_fc1.weight"),
        # only the first `layers.{i}.` is a layer index
        ("decoder.layers.1.self_attention.layers.1.w", 5, 0, "decoder.layers.6.self_attention.layers.1.w"),
        ("embedding.word_embeddings.weight", 7, 7, "embedding.word_embeddings.weight"),
        ("decoder.final_layernorm.weight", 7, 7, "decoder.final_layernorm.weight"),
        ("decoder.layers.3", 1, 0, "decoder.layers.3"),  # no `layers.{i}.`
        ("decoder.layers.07.w", 1, 0, "decoder.layers.8.w"),
        ("décodeur.layers.2.mlp.experts.linear_fc1.weight1", 1, 1,
         "décodeur.layers.3.mlp.experts.linear_fc1.weight2"),
        ("decoder.layers.3.mlp.experts.linear_fc1.weight7", -3, -7, "decoder.layers.0.mlp.experts.linear_fc1.weight0"),
    ],
)
def test_local_to_global_cases(name, lo, eo, out):
    assert ref_local_to_global(name, lo, eo) == out
    assert ops.local_to_global_name(name, lo, eo) == out
    assert torch.ops.bridge.local_to_global_name(name, lo, eo) == out


def test_local_to_global_rejects_negative_index():
    name = "decoder.layers.2.mlp.experts.linear_fc1.weight1"
    with pytest.raises(RuntimeError, match=r"layer index 2 \+ offset -3 is negative .*" + re.escape(name)):
        ops.local_to_global_name(name, -3, 0)
    with pytest.raises(RuntimeError, match=r"expert index 1 \+ offset -2 is negative"):
        ops.local_to_global_name(name, 0, -2)


def test_gather_param_names_unknown_group():
    with pytest.raises(RuntimeError, match="'no_such_group'"):
        torch.ops.bridge.gather_param_names(["decoder.layers.0.w"], "no_such_group", None)


# ---------------------------------------------------------------------------------------------------------------------
# megatron_bridge_ext.naming: the Python statement of the rules the compiled ops implement
# ---------------------------------------------------------------------------------------------------------------------


@_settings
@given(any_name, _offset, _offset)
def test_naming_states_the_rules_of_the_compiled_ops(name, layer_offset, expert_offset):
    from megatron_bridge_ext import naming

    assert naming.sort_key(name) == ops.param_sort_key(name)
    assert naming.local_to_global(name, layer_offset, expert_offset) == ops.local_to_global_name(
        name, layer_offset, expert_offset)


def test_naming_rejects_a_negative_index():
    from megatron_bridge_ext import naming

    name = "decoder.layers.2.mlp.experts.linear_fc1.weight1"
    with pytest.raises(ValueError, match=r"layer index 2 \+ offset -3 is negative .*" + re.escape(name)):
        naming.local_to_global(name, -3, 0)
    with pytest.raises(ValueError, match=r"expert index 1 \+ offset -2 is negative"):
        naming.local_to_global(name, 0, -2)

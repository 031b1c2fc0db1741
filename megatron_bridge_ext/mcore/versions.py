"""What differs between the megatron-core versions this package supports, behind named helpers.

The rest of the package calls these and never compares version numbers itself. Each helper works on the structure
it is given (a spec entry's type, a field's presence) where it can, and on the installed version only where the
structure cannot tell.

- supported releases (0.16.1+, 0.19.x): :data:`SUPPORTED_MEGATRON_CORE`, :func:`require_supported_megatron_core`
  (``mcore/__init__`` calls it: one error before any model is built);
- layer-spec entries: the local spec's dense MLP and MoE entries are ``ModuleSpec`` in 0.16 and
  ``functools.partial(builder, submodules=...)`` from 0.18 on: :func:`spec_submodules`, :func:`replace_submodules`
  (either form);
- config fields of runtime features renamed or added (CUDA graphs: 0.19 has ``cuda_graph_modules`` beside the
  deprecated ``cuda_graph_scope``, and ``inference_cuda_graph_scope``): :data:`RUNTIME_ONLY_CONFIG_FIELDS`,
  :func:`drop_runtime_only_fields` (never stored with a checkpoint's model config, dropped when one is read, so either
  version reads what the other wrote);
- the common state of a distributed checkpoint (``common.pt`` in 0.16, a ``common_state`` object inside the DCP
  files from 0.19 on): :func:`common_state_in_checkpoint_files` (``dist_checkpointing.save`` writes the installed
  version's layout; 0.19's ``load_common_state_dict`` reads both);
- the decoder layer of a multi-token-prediction layer (``transformer_layer`` in 0.16, ``mtp_model_layer`` in 0.19):
  :func:`mtp_layer_module` (parameter names only: 0.19 maps its checkpoint keys back to ``transformer_layer``);
- opt-in layouts of 0.17-0.19 that rename or reshape parameters: :func:`check_opt_in_layouts` (refused with the
  setting named and what to do instead; ``mtp_use_repeated_layer`` with one MTP layer is the same model and
  accepted).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import re
from typing import Any, Iterable, Mapping, Optional, Tuple

__all__ = [
    "SUPPORTED_MEGATRON_CORE",
    "TESTED_MEGATRON_CORE",
    "SKIP_VERSION_CHECK_ENV",
    "UnsupportedMegatronCoreError",
    "parse_version",
    "installed_megatron_core",
    "megatron_core_version",
    "unmet_megatron_core",
    "require_megatron_core_for",
    "check_megatron_core_version",
    "require_supported_megatron_core",
    "spec_submodules",
    "megatron_core_minor",
    "release_for_installed",
    "MEGATRON_CORE_0_19",
    "mtp_block_saves_plain_state",
    "replace_submodules",
    "OPT_IN_LAYOUT_SETTINGS",
    "check_opt_in_layouts",
    "RUNTIME_ONLY_CONFIG_FIELDS",
    "drop_runtime_only_fields",
    "common_state_in_checkpoint_files",
    "mtp_layer_module",
]

# ----------------------------------------------------------------------------------------------------------------------
# Which megatron-core versions this package supports
# ----------------------------------------------------------------------------------------------------------------------

#: the supported megatron-core releases, as pip reads them; ``pyproject.toml`` declares the same (a test checks it)
SUPPORTED_MEGATRON_CORE = ">=0.16.1,!=0.17.*,!=0.18.*,<0.20"
#: the versions CI runs the whole suite against (one environment each, see the Makefile)
TESTED_MEGATRON_CORE = ("0.16.1", "0.19.2")
#: set to 1 to build models on a megatron-core outside :data:`SUPPORTED_MEGATRON_CORE` anyway (untested)
SKIP_VERSION_CHECK_ENV = "MEGATRON_BRIDGE_EXT_ALLOW_UNSUPPORTED_MCORE"
# [low, high) release ranges equal to SUPPORTED_MEGATRON_CORE (0.17 and 0.18 are not tested)
_SUPPORTED_RANGES = (((0, 16, 1), (0, 17, 0)), ((0, 19, 0), (0, 20, 0)))
_VERSION_RE = re.compile(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?(.*)$")


class UnsupportedMegatronCoreError(ImportError):
    """The installed megatron-core is outside :data:`SUPPORTED_MEGATRON_CORE` (the message names both)."""


def parse_version(text: str) -> Tuple[Tuple[int, int, int], str]:
    """``((major, minor, patch), rest)`` of a version string: ``"0.19.2"``, ``"0.19.2+8f3c2a1"`` (the local git
    hash megatron-core's ``package_info`` appends when it finds a git checkout), ``"0.20.0rc1"`` (rest ``"rc1"``).

    Raises:
        ValueError: a string that does not start with ``major.minor`` numbers.
    """
    m = _VERSION_RE.match(str(text))
    if m is None:
        raise ValueError(f"cannot read a megatron-core version from {text!r} (expected major.minor[.patch])")
    release = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    return release, m.group(4).strip()


def installed_megatron_core() -> Optional[str]:
    """The installed megatron-core's version from its distribution metadata (no import of megatron), or None when
    megatron-core is not installed as a distribution."""
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def megatron_core_version() -> Tuple[int, int, int]:
    """The installed megatron-core's ``(major, minor, patch)``: from its distribution metadata, else from
    ``megatron.core.package_info`` (a source checkout on ``PYTHONPATH``).

    Raises:
        ModuleNotFoundError: megatron-core is not installed.
    """
    text = installed_megatron_core()
    if text is None:
        from megatron.core import package_info

        text = package_info.__version__
    return parse_version(text)[0]


def _is_prerelease(rest: str) -> bool:
    # "+local" (a git hash) and ".postN" are the release itself; "rcN", "aN", "bN", ".devN" come before it
    rest = rest.split("+", 1)[0].lower()
    return bool(rest) and not rest.lstrip(".").startswith("post")


def check_megatron_core_version(version: str) -> None:
    """Check a megatron-core version string against :data:`SUPPORTED_MEGATRON_CORE`.

    Raises:
        UnsupportedMegatronCoreError: outside the supported releases (or a pre-release of one), naming the installed
            version, the supported range and the tested versions.
    """
    try:
        release, rest = parse_version(version)
    except ValueError as e:
        raise UnsupportedMegatronCoreError(f"{e}; megatron_bridge_ext supports megatron-core "
                                           f"{SUPPORTED_MEGATRON_CORE}") from None
    ok = any(low <= release < high for low, high in _SUPPORTED_RANGES) and not _is_prerelease(rest)
    if not ok:
        raise UnsupportedMegatronCoreError(
            f"megatron-core {version} is installed; megatron_bridge_ext supports megatron-core "
            f"{SUPPORTED_MEGATRON_CORE} (tested: {', '.join(TESTED_MEGATRON_CORE)}). Install a supported release, "
            f"e.g. pip install 'megatron-core{SUPPORTED_MEGATRON_CORE}' (0.17+ declares Python >= 3.12: add "
            f"--ignore-requires-python on 3.11), or set {SKIP_VERSION_CHECK_ENV}=1 to try this one untested")


_CHECKED = False


def require_supported_megatron_core() -> None:
    """Check the installed megatron-core once per process (without importing it); nothing when it is not installed
    (the import of megatron then fails on its own) or when ``$MEGATRON_BRIDGE_EXT_ALLOW_UNSUPPORTED_MCORE=1``.

    Raises:
        UnsupportedMegatronCoreError: see :func:`check_megatron_core_version`.
    """
    global _CHECKED
    if _CHECKED or os.environ.get(SKIP_VERSION_CHECK_ENV, "") == "1":
        return
    version = installed_megatron_core()
    if version is not None:
        check_megatron_core_version(version)
    _CHECKED = True


def megatron_core_minor() -> str:
    """The installed megatron-core's ``major.minor`` (``"0.19"``): the key of per-release tables."""
    major, minor, _ = megatron_core_version()
    return f"{major}.{minor}"


#: the first megatron-core release with the layers of the hybrid (``megatron.core.models.hybrid.HybridModel``), gated
#: delta-net (``ssm/gated_delta_net``) and DeepSeek sparse attention (``experimental_attention_variant="dsa"``)
#: families: their bridges' ``min_megatron_core`` (0.16.1 has an earlier ``GatedDeltaNet`` module, with the same
#: parameters, that this package neither builds nor tests)
MEGATRON_CORE_0_19 = (0, 19, 0)


def unmet_megatron_core(minimum: Optional[Tuple[int, int, int]]) -> Optional[str]:
    """``"needs megatron-core >= X; Y is installed"`` when the installed megatron-core is older than ``minimum``, else
    None (also for no minimum)."""
    version = megatron_core_version()
    if minimum is None or version >= tuple(minimum):
        return None
    installed = installed_megatron_core() or ".".join(map(str, version))
    return f"needs megatron-core >= {'.'.join(map(str, minimum))}; {installed} is installed"


def require_megatron_core_for(minimum: Tuple[int, int, int], architecture: str, feature: str) -> None:
    """Refuse ``architecture`` when the installed megatron-core is older than ``minimum`` (its ``feature`` is not
    there).

    Raises:
        ValueError: naming the architecture, the feature, the minimum and the installed version.
    """
    version = megatron_core_version()
    if version < tuple(minimum):
        installed = installed_megatron_core() or ".".join(map(str, version))
        raise ValueError(f"{architecture}: {feature} needs megatron-core >= {'.'.join(map(str, minimum))}; "
                         f"megatron-core {installed} is installed")


def release_for_installed(releases: Iterable[str]) -> str:
    """Of ``releases`` (``"major.minor"`` keys of per-release tables), the newest not newer than the installed
    megatron-core; the oldest when every one is newer."""
    ordered = sorted(releases, key=lambda v: tuple(int(x) for x in v.split(".")))
    if not ordered:
        raise ValueError("no releases to choose from")
    have = megatron_core_version()[:2]
    chosen = ordered[0]
    for v in ordered:
        if tuple(int(x) for x in v.split(".")) <= have:
            chosen = v
    return chosen


def common_state_in_checkpoint_files() -> bool:
    """Whether the installed megatron-core's ``dist_checkpointing.save`` writes the common state (``args``, the
    iteration, this package's entry) as a ``common_state`` object inside the torch.distributed.checkpoint files
    (0.19 on) rather than as ``common.pt`` (up to 0.18)."""
    return megatron_core_version() >= (0, 19, 0)


def mtp_block_saves_plain_state() -> bool:
    """Whether megatron-core's ``MultiTokenPredictionBlock.sharded_state_dict`` starts from ``MegatronModule``'s
    default, which also saves each MTP layer's plain state dict (up to 0.18): with Transformer Engine layers that adds
    the ``_extra_state`` of each MTP layer's core attention, a TE ``DotProductAttention`` holding no tensor. From
    0.19 the block saves only its layers' own sharded state dicts, and that object is not in the checkpoint."""
    return megatron_core_version() < (0, 19, 0)


@functools.lru_cache(maxsize=None)
def mtp_layer_module() -> str:
    """The attribute of megatron-core's ``MultiTokenPredictionLayer`` that holds its decoder layer, so its
    parameters are ``mtp.layers.{i}.<this>.*``: ``transformer_layer`` (0.16), ``mtp_model_layer`` (0.19), read from
    the fields of ``MultiTokenPredictionLayerSubmodules``."""
    from megatron.core.transformer.multi_token_prediction import MultiTokenPredictionLayerSubmodules

    fields = {f.name for f in dataclasses.fields(MultiTokenPredictionLayerSubmodules)}
    for name in ("mtp_model_layer", "transformer_layer"):
        if name in fields:
            return name
    raise RuntimeError(f"megatron-core's MultiTokenPredictionLayerSubmodules has neither mtp_model_layer nor "
                       f"transformer_layer (fields {sorted(fields)}); this megatron-core is not supported")


# ----------------------------------------------------------------------------------------------------------------------
# Layer specs
# ----------------------------------------------------------------------------------------------------------------------


def spec_submodules(spec: Any) -> Any:
    """The submodules dataclass of a layer-spec entry: ``spec.submodules`` of a ``ModuleSpec``, or the
    ``submodules`` keyword of a ``functools.partial`` (megatron-core >= 0.18's MLP / MoE builders).

    Raises:
        TypeError: an entry of neither form, or a partial without a ``submodules`` keyword (named).
    """
    if isinstance(spec, functools.partial):
        if "submodules" not in spec.keywords:
            raise TypeError(f"layer-spec entry {spec!r} is a functools.partial without a 'submodules' keyword")
        return spec.keywords["submodules"]
    if hasattr(spec, "submodules") and dataclasses.is_dataclass(spec):
        return spec.submodules
    raise TypeError(f"layer-spec entry {spec!r} ({type(spec).__name__}) is neither a ModuleSpec nor a "
                    "functools.partial with 'submodules'")


def replace_submodules(spec: Any, **submodules: Any) -> Any:
    """A copy of a layer-spec entry with some of its submodules replaced (the entry's form is kept).

    Args:
        spec: a ``ModuleSpec`` or a ``functools.partial(builder, submodules=<dataclass>, ...)``.
        submodules: fields of its submodules dataclass to replace.

    Raises:
        TypeError: see :func:`spec_submodules`; a field the submodules dataclass lacks (``dataclasses.replace``).
    """
    new = dataclasses.replace(spec_submodules(spec), **submodules)
    if isinstance(spec, functools.partial):
        return functools.partial(spec.func, *spec.args, **{**spec.keywords, "submodules": new})
    return dataclasses.replace(spec, submodules=new)


# ----------------------------------------------------------------------------------------------------------------------
# Opt-in layouts of megatron-core 0.17-0.19 that rename or reshape parameters
# ----------------------------------------------------------------------------------------------------------------------

def _get(settings: Any, name: str, default: Any = None) -> Any:
    if isinstance(settings, Mapping):
        return settings.get(name, default)
    return getattr(settings, name, default)


def _shards_beyond_tp(settings: Any, shards: str, remat: str, tp: str) -> Optional[str]:
    """Generalized tensor parallelism is on: weights split into more shards than the (expert-)TP size."""
    n, r = _get(settings, shards), _get(settings, remat)
    size = _get(settings, tp) or 1
    if r is not None and int(r) > 1:
        return f"{remat}={r}"
    if n is not None and int(n) != int(size):
        return f"{shards}={n} with {tp}={size}"
    return None


def _truthy(name: str):
    def check(settings: Any) -> Optional[str]:
        value = _get(settings, name)
        return f"{name}={value!r}" if value else None
    return check


def _set(name: str):
    def check(settings: Any) -> Optional[str]:
        value = _get(settings, name)
        return f"{name}={value!r}" if value is not None else None
    return check


def _repeated_mtp(settings: Any) -> Optional[str]:
    # one MTP layer used for every depth: the same model as without the flag when there is one depth
    if _get(settings, "mtp_use_repeated_layer") and int(_get(settings, "mtp_num_layers") or 0) > 1:
        return f"mtp_use_repeated_layer=True with mtp_num_layers={_get(settings, 'mtp_num_layers')}"
    return None


#: (what is set, why it cannot be converted, what to do instead) of every opt-in layout; the check takes the
#: settings and returns a description of the offending values, or None
_OPT_IN_LAYOUTS: Tuple[Tuple[Any, str, str], ...] = (
    (_truthy("moe_single_grouped_weight"),
     "stores each layer's routed experts as one Transformer Engine GroupedTensor (a TE op-fuser model); the "
     "conversion reads and writes one weight per expert",
     "convert with moe_single_grouped_weight=False (the default), then enable it in the training job"),
    (_truthy("moe_single_grouped_bias"),
     "stores each layer's expert biases as one Transformer Engine GroupedTensor",
     "convert with moe_single_grouped_bias=False (the default), then enable it in the training job"),
    (_set("moe_mlp_glu_interleave_size"),
     "stores the routed experts' linear_fc1 with gate and up rows interleaved in blocks (Transformer Engine's "
     "grouped MLP reads it that way; the local experts built here would read it as [gate; up])",
     "convert with moe_mlp_glu_interleave_size=None (the default: [gate; up] halves)"),
    (_set("moe_shared_expert_glu_interleave_size"),
     "stores the shared experts' linear_fc1 with gate and up rows interleaved in blocks (the TE grouped-GEMM shared "
     "expert)",
     "convert with moe_shared_expert_glu_interleave_size=None (the default: [gate; up] halves)"),
    (_truthy("mla_down_proj_fusion"),
     "fuses multi-latent attention's q and kv down-projections (and the input norm) into one "
     "linear_qkv_down_proj parameter, which the local layer spec does not build",
     "convert with mla_down_proj_fusion=False (separate linear_q_down_proj / linear_kv_down_proj)"),
    (lambda s: _shards_beyond_tp(s, "tensor_parallel_num_weight_shards", "gtp_weight_remat_size",
                                 "tensor_model_parallel_size"),
     "splits every weight into more shards than the tensor-parallel size (generalized tensor parallelism)",
     "convert with tensor_parallel_num_weight_shards unset (or equal to tensor_model_parallel_size)"),
    (lambda s: _shards_beyond_tp(s, "expert_tensor_parallel_num_weight_shards", "expert_gtp_weight_remat_size",
                                 "expert_tensor_parallel_size"),
     "splits every expert weight into more shards than the expert-tensor-parallel size (generalized tensor "
     "parallelism)",
     "convert with expert_tensor_parallel_num_weight_shards unset (or equal to expert_tensor_parallel_size)"),
    (_truthy("use_grouped_gemm_for_dense_mlp"),
     "builds the dense MLP as a Transformer Engine op-fuser grouped linear, which the local layer spec does not "
     "build",
     "convert with use_grouped_gemm_for_dense_mlp=False (the default)"),
    (_repeated_mtp,
     "keeps one multi-token-prediction layer for every depth, while an HF checkpoint stores one layer per depth",
     "convert with mtp_use_repeated_layer=False (with one MTP layer, as DeepSeek-V3 and GLM-4.5 have, the flag "
     "changes nothing and is accepted)"),
)

#: the settings :func:`check_opt_in_layouts` looks at
OPT_IN_LAYOUT_SETTINGS = (
    "moe_single_grouped_weight", "moe_single_grouped_bias", "moe_mlp_glu_interleave_size",
    "moe_shared_expert_glu_interleave_size", "mla_down_proj_fusion", "tensor_parallel_num_weight_shards",
    "expert_tensor_parallel_num_weight_shards", "use_grouped_gemm_for_dense_mlp", "mtp_use_repeated_layer",
)


def check_opt_in_layouts(settings: Any, where: str) -> None:
    """Refuse the opt-in parameter layouts of megatron-core 0.17-0.19 that this package does not convert
    (:data:`OPT_IN_LAYOUT_SETTINGS`); a setting the installed megatron-core lacks counts as off.

    Args:
        settings: a ``TransformerConfig``, the keyword arguments that will build one, or Megatron-LM's ``args``
            (a namespace or a mapping).
        where: what is being converted (for the message), e.g. ``"import"`` or the checkpoint's path.

    Raises:
        ValueError: naming every offending setting, why it cannot be converted, and what to do instead.
    """
    problems = []
    for check, why, instead in _OPT_IN_LAYOUTS:
        found = check(settings)
        if found:
            problems.append(f"{found}: it {why}; {instead}")
    if problems:
        raise ValueError(f"{where}: megatron-core layout setting(s) this package does not convert: "
                         + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------------------------
# Config fields that differ between versions and do not define the converted model
# ----------------------------------------------------------------------------------------------------------------------

#: ``TransformerConfig`` fields of runtime features (CUDA graphs, activation recomputation) whose names or normal
#: forms differ between the supported versions (0.16.1 normalises ``cuda_graph_scope`` to ``[]``; 0.19 has
#: ``cuda_graph_modules`` and ``inference_cuda_graph_scope`` beside it) and that change neither a converted model's
#: parameters nor its forward: a stored model config leaves them out, and reading one drops them.
RUNTIME_ONLY_CONFIG_FIELDS = frozenset({
    "cuda_graph_scope", "cuda_graph_modules", "inference_cuda_graph_scope", "recompute_modules",
})


def drop_runtime_only_fields(fields: Mapping[str, Any]) -> dict:
    """``fields`` (a stored model config) without :data:`RUNTIME_ONLY_CONFIG_FIELDS`."""
    return {k: v for k, v in fields.items() if k not in RUNTIME_ONLY_CONFIG_FIELDS}

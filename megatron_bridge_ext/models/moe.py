"""Mixture of experts: how a checkpoint stores its routed experts (layouts, read from the keys), their mapping
tables (routed experts, routers, shared experts), and the config translation of experts, routers and dense / MoE
layer patterns. Every MoE family (Mixtral, Qwen2-MoE, Qwen3-MoE, GLM-4.5, DeepSeek-V3, GPT-OSS) builds on these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from megatron_bridge_ext.mappings import (
    AutoMapping,
    ExpertFC1Mapping,
    ExpertFC2Mapping,
    ExpertUpMapping,
    GatedMLPMapping,
    MegatronParamMapping,
    ReplicatedMapping,
)
from megatron_bridge_ext.models.hf_config import config_get
from megatron_bridge_ext.models.tables import H, L

if TYPE_CHECKING:  # the MTP layers an ExpertLayout may carry
    from megatron_bridge_ext.models.mtp import MTPLayers

__all__ = ["ExpertLayout", "PER_EXPERT", "detect_expert_layout", "family_expert_layout", "routed_expert_mappings",
           "router_mappings", "shared_expert_mappings", "moe_runtime_kwargs", "moe_hf_fields", "megatron_moe_pattern",
           "softmax_router_kwargs", "softmax_router_hf_fields", "sigmoid_router_kwargs", "sigmoid_router_hf_fields",
           "qwen_moe_pattern", "qwen_moe_pattern_hf_fields", "first_k_dense_pattern", "first_k_dense_hf_field",
           "shared_expert_size", "ungated_shared_experts_hf_field"]

@dataclass(frozen=True)
class ExpertLayout:
    """How an HF mixture-of-experts checkpoint stores a layer's routed experts (and, DeepSeek-V3 / GLM-4.5, its
    multi-token-prediction layers).

    Attributes:
        fused: one tensor per layer and role (``gate_up_proj``, ``down_proj``), else one tensor per expert.
        fc1_transposed: fused ``gate_up_proj`` is ``[E, D, 2F]`` (else ``[E, 2F, D]``).
        fc2_transposed: fused ``down_proj`` is ``[E, F, D]`` (else ``[E, D, F]``).
        mtp: the multi-token-prediction layers the checkpoint (or the model) holds; None: none.
    """

    fused: bool = False
    fc1_transposed: bool = False
    fc2_transposed: bool = False
    mtp: Optional["MTPLayers"] = None

    def describe(self) -> str:
        if not self.fused:
            text = "one tensor per expert"
        else:
            text = (f"fused expert tensors (gate_up_proj {'[E, D, 2F]' if self.fc1_transposed else '[E, 2F, D]'}, "
                    f"down_proj {'[E, F, D]' if self.fc2_transposed else '[E, D, F]'})")
        return text if self.mtp is None else f"{text}, {self.mtp.describe()}"


#: one HF tensor per expert (what transformers 5.24's save_pretrained writes for the Qwen / DeepSeek / GLM families)
PER_EXPERT = ExpertLayout()


def _shape(hf_state: Mapping[str, Any], key: str) -> Tuple[int, ...]:
    shape = getattr(hf_state, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(hf_state[key].shape)


def _orientation(hf_state, keys: Sequence[str], normal: Tuple[int, int], transposed: Tuple[int, int],
                 default: bool, family: str, what: str, num_experts: Optional[int]) -> bool:
    """Whether the fused tensors ``keys`` (each ``[E, a, b]``) are stored transposed; ``default`` when the shapes
    cannot tell (``normal == transposed``, e.g. hidden_size == 2 * ffn)."""
    found = set()
    e = num_experts if num_experts is not None else "E"
    for key in keys:
        shape = _shape(hf_state, key)
        if len(shape) != 3 or shape[1:] not in (normal, transposed) or (
                num_experts is not None and shape[0] != num_experts):
            raise ValueError(f"{family}: fused expert tensor {key} has shape {list(shape)}; expected [{e}, "
                             f"{normal[0]}, {normal[1]}] or [{e}, {transposed[0]}, {transposed[1]}] ({what})")
        found.add(default if normal == transposed else shape[1:] == transposed)
    if len(found) > 1:
        raise ValueError(f"{family}: fused expert tensors {what} are stored in both orientations "
                         f"(e.g. {keys[0]} {list(_shape(hf_state, keys[0]))}); one orientation per checkpoint")
    return found.pop() if found else default


def detect_expert_layout(hf_state: Mapping[str, Any], family: str, *, hidden_size: int, expert_ffn: int,
                         num_experts: Optional[int] = None, default: ExpertLayout = PER_EXPERT,
                         experts: str = "mlp.experts", gate: str = "gate_proj", up: str = "up_proj",
                         down: str = "down_proj", gate_up: str = "gate_up_proj", fused_down: str = "down_proj"
                         ) -> ExpertLayout:
    """The expert layout of a checkpoint, from its keys (per-expert ``model.layers.L.<experts>.E.<gate>.weight``
    or fused ``model.layers.L.<experts>.<gate_up>``) and, for fused tensors, their shapes (orientation; with
    ``num_experts``, the expert count too). A checkpoint without expert tensors gets ``default``; so do orientations
    the shapes cannot tell apart.

    Raises:
        ValueError: a checkpoint holding both layouts (naming a tensor of each), or fused tensors of unexpected shape.
    """
    e = re.escape(experts)
    per_re = re.compile(rf"^model\.layers\.\d+\.{e}\.\d+\.(?:{gate}|{up}|{down})\.weight$")
    fc1_re = re.compile(rf"^model\.layers\.\d+\.{e}\.{re.escape(gate_up)}$")
    fc2_re = re.compile(rf"^model\.layers\.\d+\.{e}\.{re.escape(fused_down)}$")
    per, fc1, fc2 = [], [], []
    for key in hf_state.keys():
        if per_re.match(key):
            per.append(key)
        elif fc1_re.match(key):
            fc1.append(key)
        elif fc2_re.match(key):
            fc2.append(key)
    if per and (fc1 or fc2):
        raise ValueError(f"{family}: the checkpoint mixes expert layouts: one tensor per expert (e.g. {per[0]}) and "
                         f"fused expert tensors (e.g. {(fc1 or fc2)[0]}); convert it to one layout first")
    if per:
        return PER_EXPERT
    if not (fc1 or fc2):
        return default
    d, f = hidden_size, expert_ffn
    return ExpertLayout(
        fused=True,
        fc1_transposed=_orientation(hf_state, sorted(fc1), (2 * f, d), (d, 2 * f), default.fc1_transposed, family,
                                    f"{gate_up} (hidden_size {d}, expert ffn {f})", num_experts),
        fc2_transposed=_orientation(hf_state, sorted(fc2), (d, f), (f, d), default.fc2_transposed, family,
                                    f"{fused_down} (hidden_size {d}, expert ffn {f})", num_experts),
    )


def routed_expert_mappings(layout: ExpertLayout, *, experts: str = f"{H}.mlp.experts", gate: str = "gate_proj",
                           up: str = "up_proj", down: str = "down_proj", gate_up: str = "gate_up_proj",
                           fused_down: str = "down_proj", interleaved: bool = False, bias: bool = False,
                           gated: bool = True) -> List[MegatronParamMapping]:
    """A layer's routed experts in ``layout``: sequential-expert names (``local_experts.{e}``, local spec) and
    grouped-GEMM names (``linear_fc1.weight{e}``, Transformer Engine spec), weights and (with ``bias``) biases.
    Fused biases are ``<gate_up>_bias`` ``[E, 2F]`` and ``<fused_down>_bias`` ``[E, D]`` (GPT-OSS). Non-gated
    experts (``gated=False``, NemotronH) have one ``<up>`` tensor per expert as ``linear_fc1``.

    Raises:
        ValueError: non-gated experts in a fused layout or with biases (no family stores them so).
    """
    if not gated and (layout.fused or bias):
        raise ValueError(f"non-gated routed experts are converted from one tensor per expert without biases, not "
                         f"from {layout.describe()}{' with biases' if bias else ''}")
    out: List[MegatronParamMapping] = []
    suffixes = ("weight", "bias") if bias else ("weight",)
    for suffix in suffixes:
        for fc1, fc2 in ((f"{L}.mlp.experts.local_experts.*.linear_fc1.{suffix}",
                          f"{L}.mlp.experts.local_experts.*.linear_fc2.{suffix}"),
                         (f"{L}.mlp.experts.linear_fc1.{suffix}*", f"{L}.mlp.experts.linear_fc2.{suffix}*")):
            if layout.fused:
                tail = "" if suffix == "weight" else "_bias"
                out.append(ExpertFC1Mapping(fc1, gate_up=f"{experts}.{gate_up}{tail}", interleaved=interleaved,
                                            transposed=layout.fc1_transposed))
                out.append(ExpertFC2Mapping(fc2, f"{experts}.{fused_down}{tail}", fused=True,
                                            transposed=layout.fc2_transposed))
            else:
                out.append(ExpertFC1Mapping(fc1, gate=f"{experts}.*.{gate}.{suffix}", up=f"{experts}.*.{up}.{suffix}")
                           if gated else ExpertUpMapping(fc1, f"{experts}.*.{up}.{suffix}"))
                out.append(ExpertFC2Mapping(fc2, f"{experts}.*.{down}.{suffix}"))
    return out


def router_mappings(gate: str = f"{H}.mlp.gate", correction_bias: Optional[str] = None
                    ) -> List[MegatronParamMapping]:
    """The router (replicated): weight, bias (GPT-OSS) and the fp32 routing-correction bias (megatron
    ``router.expert_bias``, HF ``e_score_correction_bias``, under the gate unless ``correction_bias`` names it
    elsewhere, e.g. MiniMax-M2's ``block_sparse_moe.e_score_correction_bias``; kept in its dtype)."""
    return [
        ReplicatedMapping(f"{L}.mlp.router.weight", f"{gate}.weight"),
        ReplicatedMapping(f"{L}.mlp.router.bias", f"{gate}.bias"),
        ReplicatedMapping(f"{L}.mlp.router.expert_bias", correction_bias or f"{gate}.e_score_correction_bias"),
    ]


def shared_expert_mappings(shared: str = f"{H}.mlp.shared_experts", gate: Optional[str] = None
                           ) -> List[MegatronParamMapping]:
    """Shared experts (a dense gated MLP, TP-sharded) and, with ``gate``, their sigmoid gate ``[1, D]`` (Qwen2-MoE's
    ``shared_expert_gate``; megatron ``moe_shared_expert_gate``)."""
    out: List[MegatronParamMapping] = [
        GatedMLPMapping(f"{L}.mlp.shared_experts.linear_fc1.weight", gate=f"{shared}.gate_proj.weight",
                        up=f"{shared}.up_proj.weight"),
        AutoMapping(f"{L}.mlp.shared_experts.linear_fc2.weight", f"{shared}.down_proj.weight"),
    ]
    if gate is not None:
        out.append(ReplicatedMapping(f"{L}.mlp.shared_experts.gate_weight", gate))
    return out


def moe_runtime_kwargs(num_experts: int, topk: int, expert_ffn: int, pattern: Sequence[int]) -> Dict[str, Any]:
    """``GPTConfig`` fields of every routed-expert model: sizes, the dense / MoE layer pattern (``moe_layer_freq``,
    a list only when some layers are dense), no load-balancing loss (conversion and eval), sequential experts and the
    all-gather dispatcher (both run on CPU and GPU)."""
    return dict(
        num_moe_experts=int(num_experts),
        moe_router_topk=int(topk),
        moe_ffn_hidden_size=int(expert_ffn),
        moe_layer_freq=1 if all(pattern) else [int(bool(p)) for p in pattern],
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_grouped_gemm=False,
        moe_token_dispatcher_type="allgather",
    )


def moe_hf_fields(config: Any, experts_field: str, ffn_field: str = "moe_intermediate_size") -> Dict[str, Any]:
    """HF expert count (under the family's field name), top-k and expert ffn size of a Megatron config."""
    if not config.num_moe_experts:
        raise ValueError(f"the Megatron config has no routed experts (num_moe_experts={config.num_moe_experts})")
    return {experts_field: config.num_moe_experts, "num_experts_per_tok": config.moe_router_topk,
            ffn_field: config.moe_ffn_hidden_size}


def megatron_moe_pattern(config: Any) -> List[int]:
    """Per layer 1 (routed experts) or 0 (dense) of a Megatron config's ``moe_layer_freq``."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(config.num_layers)]
    return [int(bool(x)) for x in freq]


def softmax_router_kwargs(norm_topk_prob: bool) -> Dict[str, Any]:
    """Softmax top-k routing: HF ``norm_topk_prob`` renormalises the top-k probabilities, which is megatron's
    softmax over the top-k logits (``moe_router_pre_softmax=False``); without it the probabilities of the softmax over
    every expert are kept (``pre_softmax=True``)."""
    return dict(moe_router_score_function="softmax", moe_router_pre_softmax=not norm_topk_prob)


def softmax_router_hf_fields(config: Any, family: str) -> Dict[str, Any]:
    """HF ``norm_topk_prob`` of a Megatron softmax router (the reverse of :func:`softmax_router_kwargs`).

    Raises:
        ValueError: another score function.
    """
    if config.moe_router_score_function != "softmax" or config.moe_router_enable_expert_bias:
        raise ValueError(f"{family}: moe_router_score_function={config.moe_router_score_function!r} (expert bias "
                         f"{config.moe_router_enable_expert_bias}); HF routes with a softmax over the router logits")
    return {"norm_topk_prob": not config.moe_router_pre_softmax}


def sigmoid_router_kwargs(hf_config: Any, family: str, *, fp32_weight: bool = True) -> Dict[str, Any]:
    """DeepSeek-V3 / GLM-4.5 routing: sigmoid scores, top-k chosen on scores + ``e_score_correction_bias`` (megatron
    ``moe_router_enable_expert_bias``, an fp32 buffer) within the ``topk_group`` best of ``n_group`` expert groups
    (a group's score: the sum of its two best), weights from the plain scores renormalised and multiplied by
    ``routed_scaling_factor``; router logits in fp32 (as HF computes them), and (``fp32_weight``) the router weight
    kept in fp32 in bf16 models, as HF DeepSeek-V3 / GLM-4.5 keep it (``mcore.modules.FP32WeightRouter``; MiniMax-M2
    keeps its gate in the model's dtype).

    Raises:
        ValueError: ``norm_topk_prob=False`` with top-k > 1 (megatron renormalises sigmoid weights always), top-1
            with ``norm_topk_prob=True`` (megatron keeps a single weight as it is; HF divides it by itself), or groups
            whose score is not the sum of top-2 (megatron sums the top ``topk / topk_group``).
    """
    topk = int(config_get(hf_config, "num_experts_per_tok"))
    if not config_get(hf_config, "norm_topk_prob", True) and topk > 1:
        raise ValueError(f"{family}: norm_topk_prob=False with sigmoid routing and num_experts_per_tok={topk} > 1 is "
                         "not supported (megatron-core 0.16.1 always renormalises the top-k sigmoid weights)")
    if topk == 1 and config_get(hf_config, "norm_topk_prob", True):
        raise ValueError(f"{family}: num_experts_per_tok=1 with norm_topk_prob=True is not supported (HF divides the "
                         "one sigmoid weight by itself, megatron-core keeps a single top-k weight as it is)")
    groups = int(config_get(hf_config, "n_group", 1) or 1)
    group_topk = int(config_get(hf_config, "topk_group", 1) or 1)
    kw: Dict[str, Any] = dict(
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=float(config_get(hf_config, "routed_scaling_factor", 1.0) or 1.0),
        moe_router_dtype="fp32",
        moe_router_fp32_weight=fp32_weight,  # HF DeepSeek-V3 / GLM-4.5: _keep_in_fp32_modules_strict
    )
    if groups > 1:
        if topk // group_topk != 2:
            raise ValueError(f"{family}: n_group={groups} with num_experts_per_tok={topk}, topk_group={group_topk}: "
                             "HF scores a group by its top-2 experts, megatron-core 0.16.1 by its top "
                             f"num_experts_per_tok // topk_group = {topk // group_topk}; only equal ones convert")
        kw.update(moe_router_num_groups=groups, moe_router_group_topk=group_topk)
    return kw


def sigmoid_router_hf_fields(config: Any, family: str) -> Dict[str, Any]:
    """HF fields of :func:`sigmoid_router_kwargs` (the reverse).

    Raises:
        ValueError: a Megatron router that HF's sigmoid router cannot express.
    """
    if config.moe_router_score_function != "sigmoid" or not config.moe_router_enable_expert_bias:
        raise ValueError(f"{family}: moe_router_score_function={config.moe_router_score_function!r}, "
                         f"moe_router_enable_expert_bias={config.moe_router_enable_expert_bias}; HF routes with "
                         "sigmoid scores and an e_score_correction_bias")
    groups = config.moe_router_num_groups or 1
    group_topk = config.moe_router_group_topk or 1
    if groups > 1 and config.moe_router_topk // group_topk != 2:
        raise ValueError(f"{family}: moe_router_topk // moe_router_group_topk = {config.moe_router_topk // group_topk}"
                         "; HF scores a group by its top-2 experts")
    # megatron renormalises the top-k sigmoid weights when k > 1 and keeps a single one as it is
    return dict(n_group=groups, topk_group=group_topk, norm_topk_prob=config.moe_router_topk > 1,
                routed_scaling_factor=float(config.moe_router_topk_scaling_factor or 1.0))


def qwen_moe_pattern(hf_config: Any) -> List[int]:
    """Qwen2-MoE / Qwen3-MoE layers with experts: not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step ==
    0``."""
    layers = int(config_get(hf_config, "num_hidden_layers"))
    step = int(config_get(hf_config, "decoder_sparse_step", 1) or 1)
    dense = set(config_get(hf_config, "mlp_only_layers", None) or [])
    return [0 if i in dense or (i + 1) % step else 1 for i in range(layers)]


def qwen_moe_pattern_hf_fields(config: Any) -> Dict[str, Any]:
    """HF ``decoder_sparse_step`` / ``mlp_only_layers`` for a Megatron layer pattern (a step when one fits)."""
    pattern = megatron_moe_pattern(config)
    for step in range(1, len(pattern) + 1):
        if pattern == [0 if (i + 1) % step else 1 for i in range(len(pattern))]:
            return {"decoder_sparse_step": step, "mlp_only_layers": []}
    return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i, p in enumerate(pattern) if not p]}


def first_k_dense_pattern(hf_config: Any) -> List[int]:
    """DeepSeek-V3 / GLM-4.5 layers with experts: every layer from ``first_k_dense_replace`` on."""
    layers = int(config_get(hf_config, "num_hidden_layers"))
    k = int(config_get(hf_config, "first_k_dense_replace", 0) or 0)
    return [0 if i < k else 1 for i in range(layers)]


def first_k_dense_hf_field(config: Any, family: str) -> int:
    """HF ``first_k_dense_replace`` of a Megatron layer pattern.

    Raises:
        ValueError: dense layers that are not the leading ones.
    """
    pattern = megatron_moe_pattern(config)
    k = pattern.index(1) if 1 in pattern else len(pattern)
    if pattern != [0] * k + [1] * (len(pattern) - k):
        raise ValueError(f"{family}: moe_layer_freq={config.moe_layer_freq}: HF has dense layers only before the "
                         "first MoE layer (first_k_dense_replace)")
    return k


def shared_expert_size(hf_config: Any, family: str, field: str = "n_shared_experts") -> Optional[int]:
    """The shared experts' ffn size (``n_shared_experts * moe_intermediate_size``); None without shared experts."""
    n = int(config_get(hf_config, field, 0) or 0)
    return n * int(config_get(hf_config, "moe_intermediate_size")) if n else None


def family_expert_layout(bridge: Any, hf_state: Mapping[str, Any], hf_config: Any, *, experts_field: str,
                         ffn_field: str = "moe_intermediate_size") -> ExpertLayout:
    """A family bridge's ``detect_hf_layout``: the expert layout from the checkpoint's keys, with the expert count and
    width read from the family's ``config.json`` fields."""
    return detect_expert_layout(hf_state, type(bridge).__name__, hidden_size=config_get(hf_config, "hidden_size"),
                                expert_ffn=config_get(hf_config, ffn_field),
                                num_experts=config_get(hf_config, experts_field), default=bridge.default_hf_layout)


def ungated_shared_experts_hf_field(config: Any, family: str) -> int:
    """HF ``n_shared_experts`` (DeepSeek-V3, GLM-4.5 layouts): Megatron's shared-expert width as a whole number of
    routed experts, ungated.

    Raises:
        ValueError: a width that is not a multiple of ``moe_ffn_hidden_size``, or a shared-expert gate.
    """
    shared = config.moe_shared_expert_intermediate_size or 0
    if shared % config.moe_ffn_hidden_size or config.moe_shared_expert_gate:
        raise ValueError(f"{family}: shared experts of {shared} (gate {config.moe_shared_expert_gate}) are not a "
                         f"whole number of ungated experts of {config.moe_ffn_hidden_size}")
    return shared // config.moe_ffn_hidden_size

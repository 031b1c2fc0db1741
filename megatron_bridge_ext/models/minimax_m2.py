"""MiniMax-M2 (``MiniMaxM2ForCausalLM``): Llama's pre-norm layout with GQA attention whose query / key RMSNorms run
over the whole projection (HF ``q_norm`` ``[H*d]``, ``k_norm`` ``[G*d]``, ``head_dim`` independent of
``hidden_size``; megatron ``qk_layernorm_whole_projection``, see ``models/olmo2.py``), partial RoPE (``rotary_dim`` of
each head's ``head_dim`` channels, halves rotated: megatron ``rotary_percent``) and on every layer a mixture of
SwiGLU experts behind a sigmoid router: top-k chosen on sigmoid scores + ``e_score_correction_bias`` (megatron
``moe_router_enable_expert_bias``), weights from the plain scores renormalised over the top-k (megatron always
renormalises sigmoid weights), no groups, no routed scaling, no shared experts. The gate weight stays in the
model's dtype (HF keeps no MiniMax-M2 tensor in fp32); megatron takes the router logits and scores in fp32, HF the
logits in the model's dtype and the scores in fp32 (equal in fp32 models; bf16 logits may differ by their rounding).

HF checkpoints (the release and transformers' ``save_pretrained``, which writes the release's names) hold Mixtral's
per-expert ``block_sparse_moe.experts.{e}.w1/w3/w2`` (gate, up, down), the router ``block_sparse_moe.gate`` and the
correction bias beside it, ``block_sparse_moe.e_score_correction_bias``.

The release's ``config.json`` carries fields of MiniMax's own code that transformers' ``MiniMaxM2Config`` does not
read; those that would change the model from the one transformers builds are refused by name (ValueError naming the
setting and value): ``use_qk_norm=False``, ``qk_norm_type`` other than ``"per_layer"``, ``scoring_func`` other than
``"sigmoid"``, ``use_routing_bias=False``, ``norm_topk_prob=False``, groups (``num_expert_group`` / ``n_group`` /
``topk_group`` > 1), ``routed_scaling_factor`` != 1, ``shared_intermediate_size`` > 0, linear-attention layers
(``attn_type_list`` entries 0), a ``sliding_window`` / ``attn_window_size``, ``layernorm_full_attention_beta`` /
``layernorm_mlp_beta`` != 1, and ``rotary_dim`` disagreeing with ``partial_rotary_factor``. Multi-token prediction
(``use_mtp`` / ``num_mtp_modules``, fields of MiniMax's own config code): transformers builds no MTP layers, so the
fields are accepted; a checkpoint holding MTP tensors (names with ``mtp``, or layers from ``num_hidden_layers`` on) is
refused, naming the fields and a tensor.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping

from megatron_bridge_ext.models.hf_config import config_get, refuse_megatron_settings
from megatron_bridge_ext.models.llama import LlamaBridge
from megatron_bridge_ext.models.moe import (
    PER_EXPERT,
    moe_hf_fields,
    moe_runtime_kwargs,
    routed_expert_mappings,
    router_mappings,
    sigmoid_router_hf_fields,
    sigmoid_router_kwargs,
)
from megatron_bridge_ext.models.olmo2 import WHOLE_QK_NORMS, check_whole_qk_norms
from megatron_bridge_ext.models.tables import (
    GPT_MODEL,
    H,
    attention_mappings,
    embedding_mappings,
    pre_mlp_norm_mappings,
    whole_qk_norm_mappings,
)
from megatron_bridge_ext.registry import MegatronMappingRegistry

__all__ = ["MiniMaxM2Bridge"]

#: MiniMaxM2Config's rope theta when a raw config.json gives none
DEFAULT_ROPE_THETA = 5000000.0
_MOE = f"{H}.block_sparse_moe"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _one(value: Any) -> bool:
    return value is None or float(value) == 1.0


#: fields of MiniMax's config.json that transformers' MiniMaxM2 ignores: (field, accepted(value), what HF computes)
_IGNORED_BY_HF = (
    ("use_qk_norm", lambda v: v is None or bool(v), "q / k RMSNorms on every layer"),
    ("qk_norm_type", lambda v: v in (None, "per_layer"), "q / k RMSNorms over the whole projection ('per_layer')"),
    ("scoring_func", lambda v: v in (None, "sigmoid"), "sigmoid router scores"),
    ("use_routing_bias", lambda v: v is None or bool(v), "an e_score_correction_bias on every router"),
    ("norm_topk_prob", lambda v: v is None or bool(v), "top-k weights renormalised"),
    ("num_expert_group", lambda v: v is None or int(v) <= 1, "no expert groups"),
    ("n_group", lambda v: v is None or int(v) <= 1, "no expert groups"),
    ("topk_group", lambda v: v is None or int(v) <= 1, "no expert groups"),
    ("routed_scaling_factor", _one, "no routed scaling"),
    ("shared_intermediate_size", lambda v: not v, "no shared experts"),
    ("attn_type_list", lambda v: v is None or all(int(t) == 1 for t in v), "softmax attention on every layer (1)"),
    ("sliding_window", lambda v: v is None, "no sliding window"),
    ("attn_window_size", lambda v: v is None, "no sliding window"),
    ("layernorm_full_attention_beta", _one, "plain residual adds"),
    ("layernorm_mlp_beta", _one, "plain residual adds"),
)


def _rope_kwargs(hf_config: Any, kw: Dict[str, Any], family: str) -> Dict[str, Any]:
    """``rotary_percent`` from ``rotary_dim`` (transformers derives ``partial_rotary_factor = rotary_dim / head_dim``)
    and MiniMaxM2Config's rope theta for a raw config.json without one."""
    out: Dict[str, Any] = {}
    params = config_get(hf_config, "rope_parameters")
    if config_get(hf_config, "rope_theta") is None and not (isinstance(params, Mapping) and "rope_theta" in params):
        out["rotary_base"] = DEFAULT_ROPE_THETA
    rotary_dim = config_get(hf_config, "rotary_dim")
    if rotary_dim is not None:
        derived = int(rotary_dim) / kw["kv_channels"]
        given = kw.get("rotary_percent")
        if given is not None and int(kw["kv_channels"] * given) != int(rotary_dim):
            raise ValueError(f"{family}: rotary_dim={rotary_dim} disagrees with partial_rotary_factor={given} "
                             f"(head_dim {kw['kv_channels']})")
        out["rotary_percent"] = given if given is not None else derived
    return out


@LlamaBridge.register_bridge(source="MiniMaxM2ForCausalLM", target=GPT_MODEL)
class MiniMaxM2Bridge(LlamaBridge):
    """HF MiniMaxM2ForCausalLM <-> Megatron-Core GPTModel with whole-projection q/k norms and sigmoid-routed MoE."""

    hf_model_type = "minimax_m2"
    default_hf_layout = PER_EXPERT
    required_hf_fields = LlamaBridge.required_hf_fields + ("num_local_experts", "num_experts_per_tok")

    def hf_config_to_megatron_kwargs(self, hf_config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        for field, accepted, hf_does in _IGNORED_BY_HF:
            value = config_get(hf_config, field)
            if not accepted(value):
                raise ValueError(f"{family}: {field}={value!r} is not supported (transformers' MiniMax-M2 computes "
                                 f"{hf_does})")
        kw = self.dense_megatron_kwargs(hf_config)  # no biases in MiniMax-M2
        return {
            **kw,
            **_rope_kwargs(hf_config, kw, family),
            **WHOLE_QK_NORMS,
            "add_bias_linear": False,
            **moe_runtime_kwargs(config_get(hf_config, "num_local_experts"),
                                 config_get(hf_config, "num_experts_per_tok"),
                                 config_get(hf_config, "intermediate_size"),
                                 [1] * int(config_get(hf_config, "num_hidden_layers"))),
            **sigmoid_router_kwargs(hf_config, family, fp32_weight=False),
        }

    def megatron_to_hf_config(self, config: Any) -> Dict[str, Any]:
        family = type(self).__name__
        check_whole_qk_norms(config, family)
        sigmoid_router_hf_fields(config, family)  # sigmoid scores with a correction bias, else refused
        if config.moe_router_topk == 1:
            raise ValueError(f"{family}: moe_router_topk=1: MiniMax-M2 always renormalises its top-k weights (a "
                             "single one becomes 1), megatron-core keeps a single sigmoid weight as it is")
        refuse_megatron_settings(config, family, "MiniMax-M2", (
            ("add_bias_linear", False), ("add_qkv_bias", False)), also={
            "window_size": (tuple(config.window_size) if config.window_size else None, None),
            "moe_layer_freq": (config.moe_layer_freq, 1),
            "moe_shared_expert_intermediate_size": (config.moe_shared_expert_intermediate_size, None),
            "moe_router_num_groups": (config.moe_router_num_groups or None, None),
            "moe_router_topk_scaling_factor": (float(config.moe_router_topk_scaling_factor or 1.0), 1.0),
        })
        hf = self.dense_hf_fields(config)
        hf.update(**moe_hf_fields(config, "num_local_experts", ffn_field="intermediate_size"),
                  rotary_dim=int(config.kv_channels * config.rotary_percent))
        return hf

    def detect_hf_layout(self, hf_state: Mapping[str, Any], hf_config: Any) -> Any:
        """One layout (per-expert tensors); checks that the checkpoint holds no multi-token-prediction tensors.

        Raises:
            ValueError: tensors whose names hold ``mtp`` or of layers from ``num_hidden_layers`` on, naming
                ``use_mtp`` / ``num_mtp_modules`` and one of them.
        """
        layers = int(config_get(hf_config, "num_hidden_layers"))
        extra = sorted(k for k in hf_state.keys()
                       if "mtp" in k or ((m := _LAYER.match(k)) is not None and int(m.group(1)) >= layers))
        if extra:
            raise ValueError(f"{type(self).__name__}: use_mtp={config_get(hf_config, 'use_mtp')!r}, num_mtp_modules="
                             f"{config_get(hf_config, 'num_mtp_modules')!r}: the checkpoint holds {len(extra)} "
                             f"multi-token-prediction tensor(s) (e.g. {extra[0]}) that transformers' MiniMax-M2 does "
                             "not build; not converted")
        return PER_EXPERT

    def mapping_registry(self) -> MegatronMappingRegistry:
        return MegatronMappingRegistry(
            *embedding_mappings(),
            *attention_mappings(),
            *whole_qk_norm_mappings(),
            *pre_mlp_norm_mappings(),
            *router_mappings(f"{_MOE}.gate", correction_bias=f"{_MOE}.e_score_correction_bias"),
            *routed_expert_mappings(PER_EXPERT, experts=f"{_MOE}.experts", gate="w1", up="w3", down="w2"),
        )

"""Parity helpers: an HF model's own logits, a tensor-by-tensor comparison of two HF (or Megatron) checkpoints, and
a config's round trip HF -> Megatron -> HF."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_bridge_ext.io import SafeTensorsSource

__all__ = ["hf_logits", "mtp_reference_logits", "local_expert_mismatches", "compare_checkpoints",
           "compare_megatron_checkpoints", "ConfigRoundTrip", "config_round_trip"]


def hf_logits(path: str, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the transformers model saved at ``path`` (no cache); the config read as the converter reads it
    (:func:`~megatron_bridge_ext.io.hf_checkpoint.hf_config_of`: a Kimi-K2 config.json as DeepSeek-V3's)."""
    from transformers import AutoModelForCausalLM

    from megatron_bridge_ext.io.hf_checkpoint import hf_config_of

    model = AutoModelForCausalLM.from_pretrained(path, config=hf_config_of(path), dtype=torch.float32,
                                                 use_safetensors=True, local_files_only=True).eval()
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits.float()


def mtp_reference_logits(model: torch.nn.Module, layer: torch.nn.Module, mtp: Dict[str, torch.Tensor],
                         tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a DeepSeek-V3-style multi-token-prediction layer (HF layer ``num_hidden_layers``, tensors
    ``mtp`` as :func:`~megatron_bridge_ext.testing.tiny_models.write_mtp_layer` writes them) in plain torch around
    the transformers decoder ``layer``: the ids shifted left by one (the last position id 0, as megatron-core fills
    it), ``eh_proj([enorm(embed(ids)); hnorm(h)])`` with ``h`` the main ``model``'s final (normed) hidden states, the
    decoder layer (causal, positions 0..s-1), ``shared_head``."""
    p, d = f"model.layers.{model.config.num_hidden_layers}", model.config.hidden_size

    def norm(key):
        m = type(model.model.norm)(d, eps=model.config.rms_norm_eps)
        m.weight.data.copy_(mtp[key])
        return m

    b, s = tokens.shape
    with torch.no_grad():
        h = model.model(tokens).last_hidden_state
        ids = torch.roll(tokens, -1, dims=1)
        ids[:, -1] = 0
        x = torch.cat([norm(f"{p}.enorm.weight")(model.model.embed_tokens(ids)), norm(f"{p}.hnorm.weight")(h)], -1)
        x = x @ mtp[f"{p}.eh_proj.weight"].t()
        pos = torch.arange(s).unsqueeze(0).expand(b, s)
        mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
        out = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=model.model.rotary_emb(x, pos))
        out = out[0] if isinstance(out, tuple) else out
        return (norm(f"{p}.shared_head.norm.weight")(out) @ mtp[f"{p}.shared_head.head.weight"].t()).float()


def local_expert_mismatches(chunks: Sequence[torch.nn.Module], sd: Dict[str, torch.Tensor], n_experts: int,
                            ep_rank: int, ep: int, etp_rank: int, etp: int,
                            mtp_index: Optional[int] = None) -> Tuple[List[str], int]:
    """This rank's sequential experts against a plain reading ``sd`` of the HF tensors (one tensor per expert,
    DeepSeek-V3 names): local expert ``e`` on expert-parallel rank ``ep_rank`` is global expert
    ``ep_rank * n_experts / ep + e``, sliced for expert-TP rank ``etp_rank`` of ``etp``: ``linear_fc1`` is
    ``[gate_t; up_t]``, ``linear_fc2`` the t-th column block of ``down_proj`` (``torch.equal``).

    Args:
        mtp_index: the HF layer index of the first multi-token-prediction layer, whose experts the chunks' MTP layers
            hold (None: decoder layers only).

    Returns:
        (mismatches, MoE layers seen on this rank).
    """
    bad: List[str] = []
    layers = 0
    for chunk in chunks:
        found = [(layer.layer_number - 1, layer) for layer in chunk.decoder.layers]
        mtp = getattr(chunk, "mtp", None)
        if mtp is not None and mtp_index is not None:
            found += [(mtp_index + i, getattr(m, next(n for n in ("transformer_layer", "mtp_model_layer")
                                                      if hasattr(m, n)))) for i, m in enumerate(mtp.layers)]
        for hf_layer, layer in found:
            experts = getattr(layer.mlp, "experts", None)
            if experts is None:
                continue
            layers += 1
            for e, expert in enumerate(experts.local_experts):
                g = ep_rank * (n_experts // ep) + e
                p = f"model.layers.{hf_layer}.mlp.experts.{g}"
                gate, up, down = (sd[f"{p}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
                f = gate.shape[0] // etp
                rows = slice(etp_rank * f, (etp_rank + 1) * f)
                want = {"linear_fc1.weight": torch.cat([gate[rows], up[rows]]), "linear_fc2.weight": down[:, rows]}
                for name, w in want.items():
                    if not torch.equal(expert.get_parameter(name), w):
                        bad.append(f"HF layer {hf_layer} local expert {e} (global {g}) {name}")
    return bad, layers


def compare_checkpoints(a: str, b: str) -> Dict[str, Any]:
    """Key sets, dtypes, shapes and bytes of two HF checkpoints compared with ``torch.equal``."""
    with SafeTensorsSource(a) as src, SafeTensorsSource(b) as dst:
        ka, kb = set(src.keys()), set(dst.keys())
        same_keys = ka == kb
        exact = same_keys
        mismatched = []
        nbytes = 0
        for k in sorted(ka & kb):
            x, y = src[k], dst[k]
            nbytes += x.numel() * x.element_size()
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                exact = False
                mismatched.append(k)
        return {"tensors": len(ka), "bytes": nbytes, "same_keys": same_keys, "bit_exact": exact,
                "mismatched": mismatched, "missing": sorted(ka - kb), "unexpected": sorted(kb - ka)}


def _plain(x: Any, roots: Any) -> Any:
    """A common-state value as plain data for comparison: namespaces as dicts, the checkpoints' own directories
    replaced by a placeholder (the tokenizer path Megatron-LM's args name)."""
    import argparse

    if isinstance(x, argparse.Namespace):
        x = vars(x)
    if isinstance(x, dict):
        return {k: _plain(v, roots) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v, roots) for v in x)
    if isinstance(x, str):
        for root in roots:
            x = x.replace(root, "<checkpoint root>")
        return x
    if hasattr(x, "value") and type(x).__name__ == "StoredObject":
        return repr(x)
    return x


def compare_megatron_checkpoints(a: str, b: str, *, values: bool = True) -> List[str]:
    """Every difference between two Megatron ``torch_dist`` checkpoints (root or iteration directories), read with
    the restricted reader, one line each: tensor keys, global shapes, dtypes and (``values``) contents
    (``torch.equal``); sharded-object keys and contents; the common state (``common.pt`` or megatron-core 0.19's
    ``common_state`` object; the checkpoints' own root directories, which the stored args name, made equal)."""
    import os

    from megatron_bridge_ext.io.megatron_checkpoint import open_checkpoint, resolve_checkpoint

    out: List[str] = []
    roots = []
    for path in (a, b):
        sub, _ = resolve_checkpoint(path)
        roots.append(os.path.dirname(os.path.abspath(sub)))
    with open_checkpoint(a) as x, open_checkpoint(b) as y:
        for key in sorted(set(x.tensors) | set(y.tensors)):
            ex, ey = x.tensors.get(key), y.tensors.get(key)
            if ex is None or ey is None:
                out.append(f"tensor {key}: only in {'b' if ex is None else 'a'}")
                continue
            if ex.shape != ey.shape or ex.dtype != ey.dtype:
                out.append(f"tensor {key}: a {ex.shape} {ex.dtype}, b {ey.shape} {ey.dtype}")
            elif values and not torch.equal(x.read_tensor(key), y.read_tensor(key)):
                out.append(f"tensor {key}: values differ")
        objs = (set(x.objects) | set(y.objects)) - {k for k in set(x.objects) | set(y.objects)
                                                    if k.startswith("common_state")}
        for key in sorted(objs):
            if key not in x.objects or key not in y.objects:
                out.append(f"object {key}: only in {'b' if key not in x.objects else 'a'}")
                continue
            va, vb = x.read_object(key), y.read_object(key)
            same = torch.equal(va, vb) if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and \
                va.dtype == vb.dtype and va.shape == vb.shape else repr(va) == repr(vb)
            if not same:
                out.append(f"object {key}: a {va!r:.80} b {vb!r:.80}")
        if x.has_common_file() != y.has_common_file():
            out.append(f"common state: common.pt in {'a' if x.has_common_file() else 'b'} only")
        ca, cb = _plain(x.common_state(), roots), _plain(y.common_state(), roots)
        for key in sorted(set(ca) | set(cb)):
            if key not in ca or key not in cb:
                out.append(f"common {key}: only in {'b' if key not in ca else 'a'}")
            elif isinstance(ca[key], dict) and isinstance(cb[key], dict):
                for k2 in sorted(set(ca[key]) | set(cb[key])):
                    if ca[key].get(k2, "<missing>") != cb[key].get(k2, "<missing>"):
                        out.append(f"common {key}.{k2}: a {ca[key].get(k2, '<missing>')!r:.120} "
                                   f"b {cb[key].get(k2, '<missing>')!r:.120}")
            elif ca[key] != cb[key]:
                out.append(f"common {key}: a {ca[key]!r:.120} b {cb[key]!r:.120}")
    return out


@dataclasses.dataclass
class ConfigRoundTrip:
    """What :func:`config_round_trip` found (the test asserts on it).

    Attributes:
        megatron: the bridge's Megatron config of the model's HF config.
        regenerated: the HF config dict the bridge writes back from ``megatron``.
        config: transformers' config built from ``regenerated`` (``AutoConfig.for_model``).
        model: transformers' model built from ``config`` holding the original model's weights (strict load).
        logit_diff: ``max |logits(model) - logits(original)|`` on fixed random tokens (fp32).
        again: the bridge's Megatron config of ``config``.
    """

    megatron: Any
    regenerated: Dict[str, Any]
    config: Any
    model: torch.nn.Module
    logit_diff: float
    again: Any

    def changed(self, fields: Sequence[str]) -> List[str]:
        """The Megatron config fields whose value differs between ``megatron`` and ``again``."""
        return [f for f in fields if getattr(self.again, f) != getattr(self.megatron, f)]


def config_round_trip(model: torch.nn.Module, bridge: Any, *, seq: int = 24,
                      attn_implementation: Optional[str] = None) -> ConfigRoundTrip:
    """HF config -> Megatron config -> HF config -> transformers model with ``model``'s weights -> Megatron config.

    Args:
        model: a transformers causal LM (fp32, eval) whose config the round trip starts from.
        bridge: the family's model bridge (``transformer_config`` / ``megatron_to_hf_config``).
        seq: length of the two rows of token ids (``randint(0, vocab)`` from seed 1) the logits are compared on.
        attn_implementation: the regenerated model's attention implementation (default transformers').
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    megatron = bridge.transformer_config(model.config)
    regenerated = bridge.megatron_to_hf_config(megatron)
    config = AutoConfig.for_model(**regenerated)
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model2 = AutoModelForCausalLM.from_config(config, **kw).float().eval()
    model2.load_state_dict(model.state_dict(), strict=True)
    ids = torch.randint(0, model.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model2(ids, use_cache=False).logits.float() - model(ids, use_cache=False).logits.float()).abs().max()
    return ConfigRoundTrip(megatron, regenerated, config, model2, float(diff), bridge.transformer_config(config))

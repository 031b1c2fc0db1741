"""Tiny transformers checkpoints with random weights (fixed seed), for the demo, the tests and the benchmarks."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["TINY_LLAMA", "make_tiny_llama", "tiny_hf_model", "randomise", "make_tiny_checkpoint",
           "save_transformers_bf16", "write_mtp_layer"]

TINY_LLAMA = dict(
    vocab_size=1003,  # odd on purpose: exercises vocabulary padding and trimming
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)

# (mean, std) of a normal draw
Draw = Tuple[float, float]
# (does this parameter name match, mean, std)
Rule = Tuple[Callable[[str], bool], float, float]


def tiny_hf_model(prefix: str, config: Dict[str, Any], seed: int, arch: Optional[str] = None) -> torch.nn.Module:
    """transformers' ``{arch or prefix}ForCausalLM`` built from ``{prefix}Config(**config)`` with transformers' own
    random initialisation, right after ``torch.manual_seed(seed)``.

    Args:
        prefix: the transformers config class prefix (``"Llama"``, ``"DeepseekV3"``, ...).
        config: keyword arguments of the config.
        seed: the torch seed set before the model is built.
        arch: the model class prefix where it differs from the config's (``Gemma3`` text models: ``Gemma3Text``
            config, ``Gemma3`` model).

    Returns:
        The model (fp32, as transformers initialises it).
    """
    import transformers

    torch.manual_seed(seed)
    hf_config = getattr(transformers, f"{prefix}Config")(**config)
    return getattr(transformers, f"{arch or prefix}ForCausalLM")(hf_config)


def randomise(module: torch.nn.Module, norm: Draw = (1.0, 0.1), *, rules: Sequence[Rule] = (),
              rest: Optional[Draw] = None, correction_bias: Optional[float] = None) -> torch.nn.Module:
    """Redraw ``module``'s parameters in place, in ``named_parameters`` order, from the current torch seed.

    A parameter whose name holds ``"norm"`` is drawn from N(``norm``) (random norms make a mix-up between norms
    visible), else from the first of ``rules`` that matches its name, else from N(``rest``) (kept as initialised when
    ``rest`` is None). With ``correction_bias``, the ``e_score_correction_bias`` buffers (DeepSeek-V3's router) are
    drawn from N(0, ``correction_bias``) after the parameters.

    Returns:
        ``module``.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.normal_(*norm)
                continue
            for matches, mean, std in rules:
                if matches(name):
                    p.normal_(mean, std)
                    break
            else:
                if rest is not None:
                    p.normal_(*rest)
        if correction_bias is not None:
            for name, b in module.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.normal_(0.0, correction_bias)
    return module


def make_tiny_checkpoint(path: str, prefix: str, config: Dict[str, Any], seed: int, *, arch: Optional[str] = None,
                         dtype: torch.dtype = torch.float32, norm: Draw = (1.0, 0.1), rules: Sequence[Rule] = (),
                         rest: Optional[Draw] = None, correction_bias: Optional[float] = None) -> torch.nn.Module:
    """Write a random-weight tiny transformers checkpoint to ``path`` (safetensors).

    The model is :func:`tiny_hf_model` ``(prefix, config, seed, arch)``, redrawn by :func:`randomise` (``norm``,
    ``rules``, ``rest``, ``correction_bias``) and saved in ``dtype``.

    Returns:
        The model, in ``dtype``.
    """
    model = tiny_hf_model(prefix, config, seed, arch)
    randomise(model, norm, rules=rules, rest=rest, correction_bias=correction_bias)
    model = model.to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    return model


def save_transformers_bf16(model: torch.nn.Module, path: str) -> str:
    """transformers' own bf16 checkpoint of ``model``: saved as it is at ``path + "_fp32"``, then loaded with
    ``from_pretrained(dtype=torch.bfloat16)`` (the tensors transformers keeps in fp32, such as DeepSeek-V3's
    routers, stay fp32) and saved at ``path``; returns ``path``."""
    import transformers

    fp32 = path + "_fp32"
    model.save_pretrained(fp32)
    transformers.AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16).save_pretrained(path)
    return path


def make_tiny_llama(path: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> str:
    """Write a random-weight transformers LlamaForCausalLM (fixed seed) to ``path``; returns ``path``."""
    model = tiny_hf_model("Llama", {**TINY_LLAMA, **overrides}, seed).to(dtype)
    randomise(model)  # norms only, drawn in ``dtype``
    model.save_pretrained(path, safe_serialization=True)
    return path


def write_mtp_layer(src: str, dst: str, layer: torch.nn.Module, index: int) -> Dict[str, torch.Tensor]:
    """Write ``dst/model.safetensors``: the tensors of ``src/model.safetensors`` plus one DeepSeek-V3-style
    multi-token-prediction layer at HF layer ``index`` (config files are the caller's).

    The MTP layer: the transformers decoder ``layer``'s tensors (fused experts ``gate_up_proj`` ``[E, 2F, D]`` and
    ``down_proj`` ``[E, D, F]`` written one tensor per expert), then ``enorm`` / ``hnorm`` N(1, 0.2), ``eh_proj``
    N(0, 0.15) and ``shared_head.norm`` N(1, 0.2) drawn in that order from the current torch seed, and copies of
    ``model.embed_tokens`` and ``lm_head`` as its ``embed_tokens`` / ``shared_head.head``.

    Returns:
        The MTP layer's tensors (HF names).

    Raises:
        ValueError: a layer tensor under ``.experts.`` other than the two fused ones, or an MTP name already in
            ``src``.
    """
    import os

    from safetensors.torch import load_file, save_file

    sd = load_file(os.path.join(src, "model.safetensors"))
    p = f"model.layers.{index}"
    d = sd["model.embed_tokens.weight"].shape[1]
    mtp: Dict[str, torch.Tensor] = {}
    for k, v in layer.state_dict().items():
        if k == "mlp.experts.gate_up_proj":  # [E, 2F, D] = [gate; up] per expert
            f = v.shape[1] // 2
            for e in range(v.shape[0]):
                mtp[f"{p}.mlp.experts.{e}.gate_proj.weight"] = v[e, :f].clone()
                mtp[f"{p}.mlp.experts.{e}.up_proj.weight"] = v[e, f:].clone()
        elif k == "mlp.experts.down_proj":  # [E, D, F]
            for e in range(v.shape[0]):
                mtp[f"{p}.mlp.experts.{e}.down_proj.weight"] = v[e].clone()
        elif ".experts." in k:
            raise ValueError(f"write_mtp_layer: layer tensor {k} {list(v.shape)} is in no expert layout it knows")
        else:
            mtp[f"{p}.{k}"] = v.clone()
    mtp[f"{p}.enorm.weight"] = 1.0 + 0.2 * torch.randn(d)
    mtp[f"{p}.hnorm.weight"] = 1.0 + 0.2 * torch.randn(d)
    mtp[f"{p}.eh_proj.weight"] = 0.15 * torch.randn(d, 2 * d)
    mtp[f"{p}.shared_head.norm.weight"] = 1.0 + 0.2 * torch.randn(d)
    mtp[f"{p}.embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
    mtp[f"{p}.shared_head.head.weight"] = sd["lm_head.weight"].clone()
    clash = sorted(set(mtp) & set(sd))
    if clash:
        raise ValueError(f"write_mtp_layer: {src} already holds MTP tensors of layer {index}: {clash[:4]}")
    os.makedirs(dst, exist_ok=True)
    save_file({**sd, **mtp}, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return mtp

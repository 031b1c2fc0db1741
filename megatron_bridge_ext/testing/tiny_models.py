"""Tiny transformers checkpoints with random weights (fixed seed), for the demo, the tests and the benchmarks."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["TINY_LLAMA", "make_tiny_llama", "tiny_hf_model", "randomise", "make_tiny_checkpoint",
           "save_transformers_bf16"]

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

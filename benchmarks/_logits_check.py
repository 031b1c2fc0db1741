"""What the GPU logits checks share (``te_check.py``, ``dsa_check.py``, ``gdn_check.py``, ``hybrid_check.py``): their
command line, the probes of what they need (a GPU, packages, a megatron-core release), the rank setup, the load of an
imported checkpoint into megatron-core's TE model, the gathered logits of a TP-split model, transformers' reference
logits, and the layout loop: read a checkpoint at each TP size in a spawned world, compare rank 0's logits with
transformers' and print one ``ok`` / ``FAIL`` line per layout. Each check states only its checkpoints, its model and
its tolerance.

Importing this module puts ``tests/`` and ``tests/distributed/`` on ``sys.path`` (the checks build their checkpoints
with the tests' makers and their TE models with ``tests/te_models.py``); spawned ranks inherit it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (os.path.join(ROOT, "tests", "distributed"), os.path.join(ROOT, "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

#: the packages the checks may need -> what to install
INSTALL = {"transformer_engine": "transformer-engine[pytorch]", "fla": "flash-linear-attention",
           "mamba_ssm": "mamba-ssm (megatron-core's Mamba layers need it to run)"}


def parse_args(doc: str, argv: Optional[Sequence[str]] = None, *, atol: float = 1e-3) -> argparse.Namespace:
    """``--layouts`` (TP sizes to read at, ``"1,2"``) and ``--atol`` (max |logit difference| against transformers,
    default ``atol``); the description is the first line of ``doc`` (the check's docstring).

    Raises:
        SystemExit: a bad argument (argparse's message), or a layout that is not a positive integer.
    """
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--layouts", default="1,2", help="TP sizes to read the checkpoints at (default 1,2)")
    parser.add_argument("--atol", type=float, default=atol,
                        help=f"max |logit difference| against transformers (default {atol:g})")
    args = parser.parse_args(argv)
    sizes = [x.strip() for x in args.layouts.split(",")]
    if not all(x.isdigit() and int(x) > 0 for x in sizes):
        parser.error(f"--layouts {args.layouts!r}: expected comma-separated positive TP sizes, e.g. 1,2")
    return args


def preflight(name: str, modules: Sequence[str] = (), min_megatron_core: Optional[Tuple[int, int, int]] = None,
              feature: str = "") -> bool:
    """Whether the check can run: a GPU, every module of ``modules`` importable, megatron-core not older than
    ``min_megatron_core`` (its ``feature`` is not in older ones). Prints ``"<name>: <what is missing>"`` and returns
    False at the first thing missing."""
    if not torch.cuda.is_available():
        print(f"{name}: no GPU (torch.cuda.is_available() is False)")
        return False
    for module in modules:
        try:
            __import__(module)
        except ImportError as e:
            print(f"{name}: {module} does not import ({e}); install {INSTALL.get(module, module)}")
            return False
    if min_megatron_core is not None:
        from megatron_bridge_ext.mcore.versions import unmet_megatron_core

        unmet = unmet_megatron_core(min_megatron_core)
        if unmet:
            print(f"{name}: {feature or 'this check'} {unmet}")
            return False
    return True


def init_rank(rank: int, world: int) -> torch.device:
    """This rank's GPU (its own under NCCL, else ``cuda:0``) and megatron's parallel state at TP ``world``."""
    import torch.distributed as dist

    from megatron_bridge_ext.mcore.model_builder import init_parallel

    torch.cuda.set_device(rank % torch.cuda.device_count() if dist.get_backend() == "nccl" else 0)
    init_parallel(tp=world, pp=1)
    return torch.device("cuda", torch.cuda.current_device())


def load_te_chunk(ckpt: str, device: torch.device, **config_overrides: Any):
    """megatron-core's TE-spec model (``tests/te_models.py``) of a checkpoint's stored config (with
    ``config_overrides``), built on ``device`` with every parameter NaN, then filled by ``dist_checkpointing.load``
    with ``strict=StrictHandling.RAISE_ALL`` and ``load_state_dict`` (TE's core attention leaves its own extra state
    out of its sharded state dict; as Megatron-LM does, those keys are ignored). Returns the chunk in eval mode.

    Raises:
        RuntimeError: ``load_state_dict`` left other keys missing or unexpected (the first ten named).
    """
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.validation import StrictHandling
    from te_models import build_te_chunks

    from megatron_bridge_ext.io.megatron_checkpoint import read_checkpoint_info
    from megatron_bridge_ext.mcore.checkpoint import config_from_checkpoint

    info = read_checkpoint_info(ckpt)
    config = config_from_checkpoint(info, **config_overrides)
    chunk = build_te_chunks(config, device=device)[0]
    for p in chunk.parameters():
        p.data.fill_(float("nan"))
    md = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    loaded = dist_checkpointing.load({"model": chunk.sharded_state_dict(metadata=md)}, info.path,
                                     strict=StrictHandling.RAISE_ALL)
    res = chunk.load_state_dict(loaded["model"], strict=False)
    left = [k for k in res.missing_keys if not k.endswith(".core_attention._extra_state")] + res.unexpected_keys
    if left:
        raise RuntimeError(f"load_state_dict left {left[:10]}")
    return chunk.eval()


def tp_logits(chunk: torch.nn.Module, tokens: torch.Tensor, vocab: int, group: Any = None, *,
              causal_mask: bool = False) -> torch.Tensor:
    """Full logits ``[b, s, vocab]`` (fp32, on the CPU) of a TP-split model (one pipeline stage) on ``tokens``: its
    vocabulary slices gathered over ``group`` (None: the world), the padding cut. ``causal_mask``: pass the causal
    mask as the CPU proofs do (``mcore/forward.py``: True = masked); else none (TE's causal attention needs none)."""
    import torch.distributed as dist

    device = next(chunk.parameters()).device
    ids = tokens.to(device)
    pos = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
    mask = None
    if causal_mask:
        mask = torch.triu(torch.ones(1, 1, ids.shape[1], ids.shape[1], dtype=torch.bool, device=device), diagonal=1)
    with torch.no_grad():
        out = chunk(input_ids=ids, position_ids=pos, attention_mask=mask)  # [b, s, padded vocab / tp]
    parts = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, out.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :vocab].float().cpu()


def hf_reference(path: str, seq: int, *, device: str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, logits)``: a fixed batch of 2 x ``seq`` tokens (seed 0) and the fp32 logits of the transformers
    model of the HF checkpoint at ``path`` on them (on ``device``; returned on the CPU)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    tokens = torch.randint(0, hf.config.vocab_size, (2, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens.to(device), use_cache=False).logits.float().cpu()
    return tokens, expected


def import_te(hf_path: str, out: str, name: str, **layout: int) -> str:
    """``import`` of an HF checkpoint into ``out`` at ``layout`` (local gloo ranks on the CPU, ``--spec te``, the
    default); prints one line. Returns ``out``."""
    from megatron_bridge_ext.cli.import_hf import import_checkpoint

    import_checkpoint(hf_path, out, **layout, backend="gloo")
    print(f"import {name} at {layout} (CPU, gloo, --spec te): written")
    return out


def check_layouts(what: str, layouts: str, worker: Callable[..., Dict[str, Any]], worker_args: tuple,
                  expected: torch.Tensor, atol: float, describe: Callable[[Dict[str, Any]], str]) -> int:
    """``worker(rank, world, *worker_args)`` at each TP size of ``layouts`` (``"1,2"``; NCCL where there are enough
    GPUs, else gloo); its rank 0 result's ``"logits"`` against ``expected``. A failing world is reported and the
    other layouts still run. Returns the number of failed layouts."""
    from megatron_bridge_ext.launch import spawn_local

    failures = 0
    for tp in (int(x) for x in layouts.split(",")):
        backend = "nccl" if torch.cuda.device_count() >= tp else "gloo"
        label = f"{what} TP{tp} ({backend})"
        try:
            res = spawn_local(worker, tp, worker_args, backend=backend, timeout=900)
        except Exception as e:  # noqa: BLE001  (reported; the other layouts still run)
            failures += 1
            print(f"FAIL {label}: {str(e).strip().splitlines()[-1]}")
            continue
        diff = float((res[0]["logits"] - expected).abs().max())
        ok = diff <= atol
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {label}: {describe(res[0])}, max |logit diff| vs transformers "
              f"{diff:.2e} (atol {atol:g})")
    return failures


def finish(name: str, failures: int) -> int:
    """Print the summary line; the exit status (1 when any check failed)."""
    print(f"{name}: all checks passed" if not failures else f"{name}: {failures} check(s) failed")
    return 1 if failures else 0

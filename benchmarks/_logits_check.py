"""The layout loop the GPU logits checks share (``te_check.py``, ``dsa_check.py``, ``gdn_check.py``,
``hybrid_check.py``): read a checkpoint at each TP size in a spawned world, compare rank 0's logits with transformers'
and print one ``ok`` / ``FAIL`` line per layout."""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch


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

"""Progress bars of the conversion loops (rich, on global rank 0)."""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

import torch.distributed as dist

__all__ = ["progress"]


def progress(items: Iterable[Any], description: str, show: bool, total: Optional[int] = None) -> Iterator[Any]:
    """``items`` with a rich progress bar on global rank 0 when ``show`` (``total`` for iterators)."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    total = len(items) if total is None else total  # type: ignore[arg-type]
    if not show or not rank0 or not total:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        tid = bar.add_task(description, total=total)
        for item in items:
            yield item
            item = None  # not held while the next item is made (a bucket of the streamed export: memory bound)
            bar.advance(tid)

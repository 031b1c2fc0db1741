"""The export's scratch memory: one task's HF tensors never overlap, later tasks reuse the same memory, and a task
larger than the buffer gets its own tensors, after which the buffer holds the largest task."""

import torch

from megatron_bridge_ext.engine.transport import Scratch


def _span(t: torch.Tensor):
    start = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
    return start, start + t.numel() * t.element_size()


def test_one_task_never_overlaps_and_the_next_reuses_the_memory():
    s = Scratch()
    a = s.alloc((100, 3), torch.bfloat16, torch.device("cpu"))  # first task: nothing to reuse yet
    b = s.alloc((7,), torch.float32, torch.device("cpu"))
    s.reset()  # the buffer now holds the first task's size
    x = s.alloc((100, 3), torch.bfloat16, torch.device("cpu"))
    y = s.alloc((7,), torch.float32, torch.device("cpu"))
    z = s.alloc((5, 2), torch.int64, torch.device("cpu"))  # beyond the buffer: a tensor of its own
    spans = sorted(_span(t) for t in (x, y, z))
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:])), spans
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()  # one buffer
    assert _span(y)[0] % 64 == 0 and x.shape == (100, 3) and z.dtype == torch.int64
    x.fill_(1), y.fill_(2), z.fill_(3)
    assert bool((x == 1).all() and (y == 2).all() and (z == 3).all())  # no tensor clobbered another
    s.reset()  # grows to the largest task
    x2 = s.alloc((100, 3), torch.bfloat16, torch.device("cpu"))
    z2 = s.alloc((5, 2), torch.int64, torch.device("cpu"))
    assert x2.untyped_storage().data_ptr() == z2.untyped_storage().data_ptr() == x2.data_ptr()
    assert a.shape == (100, 3) and b.shape == (7,)

"""The streamed import's read-ahead (``engine.stream._ReadAhead``): while task ``i`` converts, the HF tensors of the
tasks after it are asked for, never more than the window past it, each tensor once, in conversion order; a source
without ``read_ahead`` is asked nothing. Checked against a plain recount of the window on a recording source."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

from megatron_bridge_ext.engine.stream import _ReadAhead  # noqa: E402


class Recording:
    def __init__(self, sizes):
        self.sizes = dict(sizes)
        self.asked = []

    def __contains__(self, key):
        return key in self.sizes

    def nbytes(self, key):
        return self.sizes[key]

    def read_ahead(self, keys):
        self.asked.extend(keys)
        return sum(self.sizes[k] for k in keys)


def test_window_past_the_current_task():
    names = [["e"], ["q", "k", "v"], ["o"], ["gate", "up"], ["down"], ["n"], ["lm"]]
    sizes = {"e": 50, "q": 10, "k": 5, "v": 5, "o": 10, "gate": 30, "up": 30, "down": 30, "n": 1, "lm": 50,
             "unused": 7}
    window = 40
    src = Recording(sizes)
    ahead = _ReadAhead(src, names + [["missing"]], window)
    flat = [(p, k) for p, keys in enumerate(names) for k in keys]
    try:
        for pos in [0, 1, 2, 3, 5, 6]:  # task 4 is skipped (already written, e.g. on resume)
            ahead.at(pos)
            ahead._queue.join()
            asked = list(src.asked)
            # this task's keys and those of every earlier task converted have been asked for
            assert all(k in asked for p, k in flat if p <= pos and p != 4), (pos, asked)
            # past this task: a prefix of the later keys, the last one started while under the window
            later = [k for p, k in flat if p > pos]
            past = [k for k in asked if k in later]
            assert past == later[:len(past)], (pos, asked)
            if past:
                assert sum(sizes[k] for k in past[:-1]) < window, (pos, past)
            if len(past) < len(later):
                assert sum(sizes[k] for k in past) >= window, (pos, past)
        assert len(src.asked) == len(set(src.asked))  # each tensor once
        assert "unused" not in src.asked and "missing" not in src.asked
    finally:
        ahead.close()


def test_a_source_without_read_ahead_is_asked_nothing():
    ahead = _ReadAhead({"a": object()}, [["a"]], 10)
    ahead.at(0)
    ahead.close()
    assert ahead._thread is None

"""``io.read_ahead``: the streamed conversions' read-ahead. While position ``i`` converts, the items of the positions
after it are asked for, never more than the window past it, each item once, in conversion order, and the thread ends
once everything is asked for. Checked against a plain recount of the window on a recording ``ask``; ``will_need``
against the page cache itself (``mincore``)."""

from __future__ import annotations

import os

import pytest

from megatron_bridge_ext.io.read_ahead import ReadAhead, will_need
from page_cache import cached_fraction, evicted_file, wait_cached


def test_window_past_the_current_position():
    names = [["e"], ["q", "k", "v"], ["o"], ["gate", "up"], ["down"], ["n"], ["lm", "e"]]
    sizes = {"e": 50, "q": 10, "k": 5, "v": 5, "o": 10, "gate": 30, "up": 30, "down": 30, "n": 1, "lm": 50}
    window = 40
    asked = []
    ahead = ReadAhead(asked.extend, [[(k, sizes[k]) for k in keys] for keys in names], window)
    flat, seen = [], set()
    for p, keys in enumerate(names):
        for k in keys:
            if k not in seen:
                seen.add(k)
                flat.append((p, k))
    try:
        for pos in [0, 1, 2, 3, 5, 6]:  # position 4 is skipped (already written, e.g. on resume)
            ahead.at(pos)
            ahead.wait()
            # this position's items and those of every earlier one converted have been asked for
            assert all(k in asked for p, k in flat if p <= pos and p != 4), (pos, asked)
            # past it: a prefix of the later items, the last one started while under the window
            later = [k for p, k in flat if p > pos]
            past = [k for k in asked if k in later]
            assert past == later[:len(past)], (pos, asked)
            if past:
                assert sum(sizes[k] for k in past[:-1]) < window, (pos, past)
            if len(past) < len(later):
                assert sum(sizes[k] for k in past) >= window, (pos, past)
        assert asked.count("e") == 1 and len(asked) == len(set(asked)) == len(flat)  # each item once
    finally:
        ahead.close()
    assert not ahead._calls._thread.is_alive()


def test_nothing_to_read_starts_no_thread_and_errors_are_hints():
    empty = ReadAhead(lambda items: None, [], 10)
    empty.at(0)
    assert empty._calls is None

    def fails(items):
        raise OSError("no read-ahead here")

    ahead = ReadAhead(fails, [[("a", 1)], [("b", 1)]], 10)
    thread = ahead._calls._thread
    ahead.at(0)  # everything is asked for at once: the thread ends by itself
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_call_queue_keeps_order_and_raises_what_it_was_not_told_to_ignore():
    from megatron_bridge_ext.io.read_ahead import CallQueue

    seen = []
    calls = CallQueue(seen.append, "probe")
    for i in range(100):
        calls.put(i)
    calls.join()
    assert seen == list(range(100))
    calls.close()
    assert not calls._thread.is_alive()

    def boom(item):
        raise ValueError(f"bad item {item}")

    failing = CallQueue(boom, "probe")
    failing.put(7)
    with pytest.raises(ValueError, match="bad item 7"):
        failing.close()


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise (Linux)")
def test_will_need_reads_the_whole_range(tmp_path):
    """The whole range reaches the page cache, larger than what one kernel read-ahead request reads (8 MiB here)
    and on the second half only."""
    path = str(tmp_path / "f.bin")
    n = 48 << 20
    evictable = evicted_file(path, n)
    fd = os.open(path, os.O_RDONLY)
    try:
        will_need(fd, n // 2, n // 2)
    finally:
        os.close(fd)
    assert wait_cached(path, n // 2, n) >= 0.99
    if evictable:
        assert cached_fraction(path, 0, n // 2 - (1 << 20)) < 0.5

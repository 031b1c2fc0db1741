"""Saving never destroys the checkpoint already in the output directory: after a failure or a crash at any point the
directory holds the old complete checkpoint (unchanged, loadable) or the new complete one, never a mix; leftovers of
killed saves are cleaned by the next save; stale weights are named; "no space left" names the path and the bytes.

Failures are injected where they cannot be produced directly: an exception from the tensor stream or at a named
step of the save (``io.staging._crash_point``), and a real crash (``os._exit`` in a child process) at each step.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_bridge_ext.io import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, SafeTensorsSource, save_hf_tensors
from megatron_bridge_ext.io import staging
from megatron_bridge_ext.io.staging import StagedCheckpoint

ALL_STEPS = ["shard_done#1", "shard_done#2", "before_index", "after_index", "before_carry", "before_swap",
             "after_swap"]


def _tensors(seed: int, n: int = 6) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.w": torch.randn(16, generator=g) for i in range(n)}  # 64 bytes each


def _specs(tensors: dict) -> dict:
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


def _save(path, tensors, **kw):
    return save_hf_tensors(path, list(tensors.items()), _specs(tensors), max_shard_bytes=128, **kw)  # 3 shards


def _snapshot(path) -> dict:
    """name -> sha1 of every file under ``path`` (the directory's exact content)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = hashlib.sha1(open(p, "rb").read()).hexdigest()
    return out


def _loads_as(path, tensors) -> bool:
    with SafeTensorsSource(path) as src:
        return set(src.keys()) == set(tensors) and all(torch.equal(src[k], t) for k, t in tensors.items())


def _leftovers(path) -> list:
    parent, name = os.path.split(os.path.realpath(path))
    return sorted(f for f in os.listdir(parent) if f.startswith(f".{name}."))


@pytest.fixture
def old(tmp_path):
    """An existing checkpoint (3 shards + index) with a side file of the user's."""
    path = tmp_path / "ckpt"
    tensors = _tensors(0)
    _save(path, tensors)
    (path / "config.json").write_text(json.dumps({"model": "old"}))
    (path / "NOTES.txt").write_text("the user's notes")
    return str(path), tensors


# ---- failures (exceptions) at every point ---------------------------------------------------------------------------


def _failing_stream(tensors, fail_after: int):
    for i, item in enumerate(tensors.items()):
        if i == fail_after:
            raise RuntimeError(f"injected failure after {i} tensors")
        yield item
    raise RuntimeError(f"injected failure after all {len(tensors)} tensors (every shard complete)")


@pytest.mark.parametrize("fail_after", [0, 3, 6], ids=["early", "midway", "after_last_shard"])
def test_failed_save_leaves_the_old_checkpoint_unchanged(old, fail_after):
    path, tensors = old
    before = _snapshot(path)
    new = _tensors(1)
    with pytest.raises(RuntimeError, match="injected failure"):
        save_hf_tensors(path, _failing_stream(new, fail_after), _specs(new), max_shard_bytes=128)
    assert _snapshot(path) == before and _loads_as(path, tensors)
    assert _leftovers(path) == []


@pytest.mark.parametrize("step", ["shard_done", "before_index", "after_index", "before_carry", "before_swap",
                                  "between_renames"])
def test_failure_at_each_step_leaves_the_old_checkpoint_unchanged(old, monkeypatch, step):
    path, tensors = old
    before = _snapshot(path)

    def fail(name):
        if name == step:
            raise RuntimeError(f"injected failure at {name}")

    monkeypatch.setattr(staging, "_crash_point", fail)
    if step == "between_renames":
        monkeypatch.setattr(staging, "_exchange", lambda a, b: False)  # a kernel without RENAME_EXCHANGE
    with pytest.raises(RuntimeError, match=f"injected failure at {step}"):
        _save(path, _tensors(1))
    assert _snapshot(path) == before and _loads_as(path, tensors)
    assert _leftovers(path) == []


def test_the_swap_itself_failing_leaves_the_old_checkpoint(old, monkeypatch):
    path, tensors = old
    before = _snapshot(path)

    def broken(a, b):
        raise OSError(errno.EIO, "injected I/O error during the exchange")

    monkeypatch.setattr(staging, "_exchange", broken)
    with pytest.raises(OSError, match="injected I/O error"):
        _save(path, _tensors(1))
    assert _snapshot(path) == before and _loads_as(path, tensors)
    assert _leftovers(path) == []


@pytest.mark.parametrize("exchange", [True, False], ids=["rename_exchange", "two_renames"])
def test_successful_save_replaces_weights_and_keeps_other_files(old, monkeypatch, exchange):
    path, _ = old
    if not exchange:
        monkeypatch.setattr(staging, "_exchange", lambda a, b: False)
    new = _tensors(1, n=2)  # one shard now: the three old shards and the index must go
    summary = save_hf_tensors(path, list(new.items()), _specs(new))
    assert sorted(os.listdir(path)) == ["NOTES.txt", "config.json", SAFE_WEIGHTS_NAME]
    assert (open(os.path.join(path, "NOTES.txt")).read() == "the user's notes")
    assert _loads_as(path, new)
    assert set(summary["replaced"]) == {SAFE_WEIGHTS_INDEX_NAME, "model-00001-of-00003.safetensors",
                                        "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"}
    assert set(summary["carried"]) == {"NOTES.txt", "config.json"}
    assert _leftovers(path) == []


def test_stale_weights_of_another_format_and_temp_files_are_cleaned_and_named(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "pytorch_model.bin").write_bytes(b"old pickle weights")
    (path / "pytorch_model.bin.index.json").write_text("{}")
    (path / ".model-00001-of-00002.safetensors.tmp-4242").write_bytes(b"half a shard of a killed save")
    (path / "tokenizer.json").write_text("{}")
    new = _tensors(1, n=2)
    summary = save_hf_tensors(path, list(new.items()), _specs(new))
    assert sorted(os.listdir(path)) == [SAFE_WEIGHTS_NAME, "tokenizer.json"]
    assert summary["replaced"] == ["pytorch_model.bin", "pytorch_model.bin.index.json"]
    assert summary["cleaned"] == [str(path / ".model-00001-of-00002.safetensors.tmp-4242")]


def test_mode_and_symlinked_output_directory(tmp_path):
    real = tmp_path / "disk" / "ckpt"
    _save(real, _tensors(0))
    os.chmod(real, 0o750)
    link = tmp_path / "link"
    os.symlink(real, link)
    new = _tensors(1)
    _save(link, new)
    assert os.path.islink(link) and os.path.realpath(link) == str(real)  # the link is kept, the data lands there
    assert _loads_as(real, new) and (os.stat(real).st_mode & 0o777) == 0o750


# ---- refusals ----------------------------------------------------------------------------------------------------------


def test_saving_into_the_source_directory_is_refused(old, tmp_path):
    path, tensors = old
    before = _snapshot(path)
    for out in (path, os.path.dirname(path)):
        with pytest.raises(ValueError, match="source checkpoint"):
            StagedCheckpoint(out, protect=[path])
    assert _snapshot(path) == before


def test_a_mount_point_or_a_file_is_refused(tmp_path):
    if os.path.isdir("/proc") and os.path.ismount("/proc"):
        with pytest.raises(ValueError, match="mount point.*subdirectory"):
            StagedCheckpoint("/proc")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        StagedCheckpoint(tmp_path / "file")


def test_a_save_in_progress_is_named_and_not_interleaved(old):
    path, _ = old
    parent, name = os.path.split(path)
    live = os.getppid()  # a live process that is not this one
    busy = os.path.join(parent, f".{name}.saving-{staging._host_tag()}-{live}-abcd1234")
    os.mkdir(busy)
    with pytest.raises(RuntimeError, match=rf"another save into {path} is in progress \(process {live}"):
        _save(path, _tensors(1))
    os.rmdir(busy)
    other = os.path.join(parent, f".{name}.saving-00000000-1-abcd1234")
    os.mkdir(other)
    with pytest.raises(RuntimeError, match=r"from another host"):
        _save(path, _tensors(1))


# ---- no space left ---------------------------------------------------------------------------------------------------


def test_no_space_is_named_before_writing(old, monkeypatch):
    path, tensors = old
    before = _snapshot(path)
    import megatron_bridge_ext.io.hf_writer as hf_writer

    monkeypatch.setattr(hf_writer.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(OSError) as e:
        _save(path, _tensors(1))
    assert e.value.errno == errno.ENOSPC
    msg = str(e.value)
    assert "no space left" in msg and os.path.basename(path) in msg and "100 free" in msg and "bytes" in msg
    assert _snapshot(path) == before and _leftovers(path) == []


def test_no_space_while_writing_names_path_and_bytes(old, monkeypatch):
    path, tensors = old
    before = _snapshot(path)
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 5:  # in the middle of the second shard
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OSError) as e:
        _save(path, _tensors(1))
    monkeypatch.undo()
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC
    assert "no space left" in msg and os.path.join(path, "model-00002-of-00003.safetensors") in msg
    assert "more bytes are needed" in msg and "'layers.2.w'" in msg
    assert _snapshot(path) == before and _loads_as(path, tensors) and _leftovers(path) == []


# ---- real crashes: the process is killed at each step ---------------------------------------------------------------

_CRASH = textwrap.dedent("""
    import os, sys, torch
    from megatron_bridge_ext.io import save_hf_tensors, staging
    path, step, exchange = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    name, _, nth = step.partition("#")
    seen = {"n": 0}

    def crash(point):
        if point == name:
            seen["n"] += 1
            if seen["n"] == int(nth or 1):
                os._exit(17)  # killed: no clean-up runs

    staging._crash_point = crash
    if not exchange:
        staging._exchange = lambda a, b: False
    g = torch.Generator().manual_seed(1)
    new = {f"layers.{i}.w": torch.randn(16, generator=g) for i in range(6)}
    save_hf_tensors(path, list(new.items()), {k: (tuple(t.shape), t.dtype) for k, t in new.items()},
                    max_shard_bytes=128)
""")


@pytest.mark.parametrize("exchange", [True, False], ids=["rename_exchange", "two_renames"])
def test_crash_at_every_step_leaves_old_or_new_and_the_next_save_recovers(tmp_path, exchange):
    steps = ALL_STEPS + ([] if exchange else ["between_renames"])
    for step in steps:
        path = str(tmp_path / f"ckpt_{step.replace('#', '_')}")
        old_tensors, new_tensors = _tensors(0), _tensors(1)
        _save(path, old_tensors)
        before = _snapshot(path)
        proc = subprocess.run([sys.executable, "-c", _CRASH, path, step, "1" if exchange else "0"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 17, (step, proc.stderr)
        if step == "between_renames":
            # the only window without an output directory (no RENAME_EXCHANGE): a load names the intact backup
            assert not os.path.exists(path)
            with pytest.raises(FileNotFoundError, match=r"interrupted while swapping: the previous checkpoint is "
                                                        r"intact at .*\.replaced-"):
                SafeTensorsSource(path)
        elif step == "after_swap":
            assert _loads_as(path, new_tensors), step  # the new one is complete; the old one is a hidden leftover
        else:
            assert _snapshot(path) == before and _loads_as(path, old_tensors), step
        assert _leftovers(path), step  # something hidden is left beside it
        # the next save cleans up (restoring the backup first where the swap was cut) and succeeds
        summary = _save(path, _tensors(2))
        assert _loads_as(path, _tensors(2)) and _leftovers(path) == [], step
        assert summary["cleaned"], step

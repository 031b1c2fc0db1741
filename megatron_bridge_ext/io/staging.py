"""Saving a checkpoint directory without ever destroying the one already there: the new checkpoint is written into a
sibling staging directory and swapped in, whole, once it is complete.

:class:`StagedCheckpoint` is the transaction. Its guarantee: after any failure, at any point, the output directory
holds either the old complete checkpoint (unchanged) or the new complete one, never a mix and never nothing.

How, step by step, and what a crash at each step leaves:

1. **Start**: leftovers of earlier saves into the same directory are dealt with first (see *Recovery*); a staging
   directory ``.<name>.saving-<host>-<pid>-<random>`` is created beside the output directory (same file system, so
   the swap is a rename). A crash from here to step 4 leaves the output directory untouched and a staging directory
   that the next save removes.
2. **Write**: side files first (config.json, tokenizer, ...), then the weights, the index last, each file flushed to
   disk (fsync). Nothing outside the staging directory changes.
3. **Carry over**: the files of the old directory that the new checkpoint does not replace and that are not weights
   (notes, a tokenizer the source lacks, subdirectories) are hard-linked (copied where links are impossible) into the
   staging directory, so nothing of the user's is lost. Old weights and indexes of any format (``*.safetensors``,
   ``*.bin``, ``*.pt``, ...) and temporary files of killed saves are *not* carried: they are named in the summary
   (``replaced``, ``cleaned``). The old directory is only read.
4. **Swap**: on Linux one ``renameat2(RENAME_EXCHANGE)`` exchanges the two directories atomically: before it the
   old checkpoint is in place, after it the new one; no instant in between. Where the kernel or the file system
   lacks it, two renames: the old directory to ``.<name>.replaced-<host>-<pid>-<random>``, then the staging directory
   to the output path; an error in between renames the old one back at once, and a crash in between (the only
   window where the output path is missing) is undone by the next save or named by the next load (see *Recovery*).
   A new output directory is one plain rename.
5. **Finish**: the old checkpoint (now under the staging or backup name) is removed; a crash before that leaves the
   new checkpoint in place and a hidden leftover that the next save removes.

**Recovery** (at the start of every save into the same directory): a leftover whose owning process is gone (same
host, by pid) is cleaned: a backup of the old checkpoint is renamed back when the output path is missing (the swap
was cut between its renames), else removed; a staging directory is removed (an unfinished new checkpoint, or the old
one after an exchange). A leftover whose process is alive (a save in progress) or of another host is named and the
save refused. A load of a missing output path names a backup it finds.

Also refused up front: an output directory that is a mount point (a rename cannot swap it: save into a subdirectory)
and, through ``protect``, saving into the source checkpoint directory or one of its ancestors.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import sys
from typing import Any, Dict, List, Sequence, Tuple, Union

__all__ = ["StagedCheckpoint", "WEIGHT_SUFFIXES", "is_weight_file", "interrupted_save_hint", "no_space_error",
           "fsync_dir", "pid_alive"]

#: files at the top of a checkpoint directory that are weights (of any format) or their indexes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5", ".gguf")
_WEIGHT_INDEX_RE = re.compile(r".+\.(safetensors|bin|pt|pth|msgpack|h5)\.index\.json$")
#: temporary files of this package's writers (and of older versions that wrote in place)
_TEMP_RE = re.compile(r"^\..+\.tmp-\d+(\.compact)?$|.+\.tmp-\d+$")
_LEFTOVER_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>saving|replaced)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]+$")


def _crash_point(name: str) -> None:
    """A named step of a save; tests replace this to kill the process there (crash injection). A no-op."""


def is_weight_file(name: str) -> bool:
    """A weight file or a weight index, by name (top level of a checkpoint directory)."""
    return name.endswith(WEIGHT_SUFFIXES) or bool(_WEIGHT_INDEX_RE.match(name))


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host is running (a zombie, exited but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def fsync_dir(path: str) -> None:
    """Flush a directory's entries (renames, new files) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def no_space_error(e: OSError, path: str, needed: int, what: str) -> OSError:
    """An ``ENOSPC``/``EDQUOT`` error that names the path, the bytes still needed and the free space."""
    try:
        free = shutil.disk_usage(os.path.dirname(path) or ".").free
    except OSError:
        free = None
    kind = "disk quota exceeded" if e.errno == errno.EDQUOT else "no space left on the device"
    return OSError(e.errno, f"{kind} while writing {what} to {path}: {needed:,} more bytes are needed"
                            + (f", {free:,} bytes are free" if free is not None else "")
                            + " (the existing checkpoint, if any, is left as it was)")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange two directories (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    global _libc
    if not sys.platform.startswith("linux"):
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.renameat2  # noqa: B018 (glibc >= 2.28)
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def _leftovers(target: str) -> List[Tuple[str, Dict[str, str]]]:
    parent, name = os.path.split(target)
    out = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return out
    for entry in sorted(entries):
        m = _LEFTOVER_RE.match(entry)
        if m and m.group("name") == name:
            out.append((os.path.join(parent, entry), m.groupdict()))
    return out


def interrupted_save_hint(path: Union[str, os.PathLike]) -> str:
    """For a missing checkpoint path: a sentence naming a backup that an interrupted save left beside it, or ''."""
    target = os.path.abspath(os.fspath(path))
    backups = [p for p, info in _leftovers(target) if info["kind"] == "replaced"]
    if not backups:
        return ""
    return (f"; a save into it was interrupted while swapping: the previous checkpoint is intact at {backups[0]} "
            "(the next save into this path restores it first, or rename it back yourself)")


def _rmtree(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        os.remove(path)
    else:
        shutil.rmtree(path)


def _link_tree(src: str, dst: str) -> None:
    """``dst`` as a copy of ``src`` made of hard links (files), symlinks as they are, and new directories."""
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), dst)
    elif stat.S_ISDIR(st.st_mode):
        os.mkdir(dst)
        for entry in os.listdir(src):
            _link_tree(os.path.join(src, entry), os.path.join(dst, entry))
        shutil.copystat(src, dst)
    elif stat.S_ISREG(st.st_mode):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    # sockets, pipes and devices are not checkpoint content: not carried


class StagedCheckpoint:
    """A checkpoint directory written beside ``out_dir`` and swapped in whole when complete (see the module doc).

    Args:
        out_dir: the output directory (created by the swap; a symlink to a directory is resolved, so the checkpoint
            lands where the link points).
        protect: directories the save must not replace (the source checkpoint): ``out_dir`` may be neither one of
            them nor an ancestor of one.
        overwrite: when False, an ``out_dir`` that already holds weights is an error.

    Attributes:
        path: the staging directory to write into.
        target: the output directory (resolved).
        cleaned: leftovers of earlier saves removed or restored at the start.

    Raises:
        ValueError: ``out_dir`` is a protected directory or an ancestor of one, a file, or a mount point.
        FileExistsError: ``overwrite=False`` and ``out_dir`` holds weights.
        RuntimeError: a save into ``out_dir`` is in progress (or a leftover of another host's save is there).
        OSError: the staging directory cannot be created beside ``out_dir`` (the parent directory named).
    """

    def __init__(self, out_dir: Union[str, os.PathLike], *, protect: Sequence[Union[str, os.PathLike]] = (),
                 overwrite: bool = True) -> None:
        target = os.path.realpath(os.fspath(out_dir))
        self.target = target
        for src in protect:
            src_real = os.path.realpath(os.fspath(src))
            if src_real == target or src_real.startswith(target.rstrip(os.sep) + os.sep):
                raise ValueError(
                    f"refusing to save into {out_dir}: it {'is' if src_real == target else 'contains'} the source "
                    f"checkpoint {src}, which the swap would replace; save into another directory"
                )
        if os.path.lexists(target) and not os.path.isdir(target):
            raise ValueError(f"cannot save a checkpoint into {out_dir}: it exists and is not a directory")
        if os.path.isdir(target) and os.path.ismount(target):
            raise ValueError(
                f"cannot save into {out_dir}: it is a mount point, which cannot be swapped atomically with a new "
                "directory; save into a subdirectory of it"
            )
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        self.cleaned: List[str] = self._recover()
        if not overwrite and os.path.isdir(target):
            existing = sorted(f for f in os.listdir(target) if is_weight_file(f))
            if existing:
                raise FileExistsError(f"{target} already holds checkpoint files: {existing}")
        name = os.path.basename(target)
        tag = f".{name}.saving-{_host_tag()}-{os.getpid()}-"
        while True:
            path = os.path.join(parent, tag + secrets.token_hex(4))
            try:
                os.mkdir(path, 0o777)  # the umask applies, as for any new directory
                break
            except FileExistsError:
                continue
            except OSError as e:
                raise OSError(e.errno, f"cannot create the staging directory of a save into {target} in {parent}: "
                                       f"{e.strerror} (a save writes beside the output directory first and swaps "
                                       "it in when complete)") from None
        if os.path.isdir(target):
            os.chmod(path, stat.S_IMODE(os.stat(target).st_mode))
        self.path = path
        self.done = False

    # ---- leftovers of earlier saves ---------------------------------------------------------------------------------

    def _recover(self) -> List[str]:
        target = self.target
        cleaned: List[str] = []
        mine = _host_tag()
        found = _leftovers(target)
        for path, info in found:
            pid = int(info["pid"])
            if info["host"] != mine:
                raise RuntimeError(
                    f"{path} is left by a save into {target} from another host (pid {pid}); remove it if no save "
                    "is running there (if the output directory is missing, it is the previous checkpoint: rename "
                    "it back)"
                )
            if pid != os.getpid() and pid_alive(pid):
                raise RuntimeError(
                    f"another save into {target} is in progress (process {pid}, staging directory {path}); "
                    "refusing to interleave two saves (if no save is running, remove that directory)"
                )
        # restore a backup first (a swap cut between its two renames), then remove the rest
        for path, info in found:
            if info["kind"] == "replaced" and not os.path.lexists(target):
                os.rename(path, target)
                fsync_dir(os.path.dirname(target))
                cleaned.append(f"{path} (the previous checkpoint, renamed back to {target})")
        for path, info in found:
            if os.path.lexists(path):
                _rmtree(path)
                cleaned.append(path)
        return cleaned

    # ---- commit / abort ---------------------------------------------------------------------------------------------

    def commit(self) -> Dict[str, Any]:
        """Swaps the staging directory in as the output directory.

        Returns:
            ``{"path": target, "replaced": [old weight files not in the new checkpoint], "carried": [old entries
            kept], "cleaned": [leftovers removed]}``.
        """
        if self.done:
            raise ValueError(f"StagedCheckpoint({self.target!r}) is already committed or aborted")
        target, path = self.target, self.path
        parent = os.path.dirname(target)
        new = set(os.listdir(path))
        replaced: List[str] = []
        carried: List[str] = []
        cleaned = list(self.cleaned)
        try:
            _crash_point("before_carry")
            if os.path.isdir(target):
                for entry in sorted(os.listdir(target)):
                    if entry in new:
                        continue  # the new checkpoint's file of that name replaces it
                    if is_weight_file(entry):
                        replaced.append(entry)  # stale weights (another format or shard count): not carried
                    elif _TEMP_RE.match(entry):
                        cleaned.append(os.path.join(target, entry))
                    else:
                        _link_tree(os.path.join(target, entry), os.path.join(path, entry))
                        carried.append(entry)
            fsync_dir(path)
            _crash_point("before_swap")
            if not os.path.lexists(target):
                os.rename(path, target)
                old = None
            elif _exchange(path, target):
                old = path  # the old checkpoint now lives under the staging name
            else:
                old = self._two_renames()
            fsync_dir(parent)
            self.done = True
        except BaseException:
            if not self.done:
                self.abort()
            raise
        _crash_point("after_swap")
        if old is not None:
            try:
                _rmtree(old)
            except OSError:
                pass  # a leftover the next save removes
            fsync_dir(parent)
        return {"path": target, "replaced": replaced, "carried": carried, "cleaned": cleaned}

    def _two_renames(self) -> str:
        """The swap without ``RENAME_EXCHANGE``: old aside, new in place; the old one renamed back on an error."""
        target, path = self.target, self.path
        backup = os.path.join(os.path.dirname(target),
                              f".{os.path.basename(target)}.replaced-{_host_tag()}-{os.getpid()}-"
                              f"{secrets.token_hex(4)}")
        os.rename(target, backup)
        try:
            _crash_point("between_renames")
            os.rename(path, target)
        except BaseException:
            os.rename(backup, target)
            raise
        return backup

    def abort(self) -> None:
        """Removes the staging directory; the output directory was never touched."""
        self.done = True
        if os.path.lexists(self.path):
            try:
                _rmtree(self.path)
            except OSError:
                pass  # a leftover the next save removes

    def __enter__(self) -> "StagedCheckpoint":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if not self.done:
            self.abort()

    def __repr__(self) -> str:
        return f"StagedCheckpoint({self.target!r}, staging {self.path!r})"

"""Reading a Megatron checkpoint safely, on the 1.1B Llama: the cost of its checksum manifest (``integrity.json``,
SHA-256 of every file) and of the restricted reader against megatron-core's own loader.

A TinyLlama-1.1B-shaped bf16 checkpoint (``bench_convert.make_checkpoint``, fixed seed) is imported at ``--tp`` (the
``import`` command's function: it writes the manifest), then, ``--repeats`` times, alternating, each step with the page
cache dropped before it (``--drop-caches``; the checkpoint is *not* read back in, so every step starts from disk):

* plain read: every file of the checkpoint read once, sequentially, into one reused buffer (the floor of any check);
* checksums: every file hashed and compared with the manifest, a thread per core (``verify --checksums``);
* model load, restricted reader: ``load_megatron_checkpoint`` into GPTModel chunks at ``--tp`` (a local gloo world;
  the chunks built first, not timed), between two barriers, slowest rank;
* model load, megatron-core: ``dist_checkpointing.load`` of the same chunks' sharded state dict, then
  ``load_state_dict``, as this package loaded before the restricted reader; the two loads' parameters are compared;
* export without / with the check: the ``export`` command's function, ``--no-checksums`` vs the default (the ranks
  share the files to hash; the check also brings the files into the page cache the read then uses).

Also measured once, right after the import (the files still cached, as ``import`` meets them): writing the manifest
(hashing every file) against a plain read of the same cached bytes. Ratios are of medians in the same run.

    python benchmarks/bench_megatron_read.py                        # 22 layers (~1.1B), TP 1
    sudo python benchmarks/bench_megatron_read.py --drop-caches      # the README's numbers
    python benchmarks/bench_megatron_read.py --layers 4 --repeats 1  # quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from _memio import drop_page_cache  # noqa: E402
from bench_convert import make_checkpoint  # noqa: E402


def _load_rank(rank: int, world: int, meg: str, tp: int, which: str) -> Dict[str, float]:
    """Build the chunks (not timed), then load them from ``meg`` with ``which`` loader; a digest of the parameters."""
    from megatron_bridge_ext.mcore.cpu_compat import apply_cpu_patches

    apply_cpu_patches()
    import torch
    import torch.distributed as dist

    from megatron_bridge_ext.io.megatron_checkpoint import read_checkpoint_info
    from megatron_bridge_ext.mcore.checkpoint import (
        cast_to_params_dtype,
        config_from_checkpoint,
        load_megatron_checkpoint,
        sharded_model_state,
    )
    from megatron_bridge_ext.mcore.model_builder import build_model_chunks, destroy_parallel, init_parallel

    init_parallel(tp=tp, pp=1)
    try:
        info = read_checkpoint_info(meg)
        chunks = cast_to_params_dtype(build_model_chunks(config_from_checkpoint(info)))
        for c in chunks:  # touch the parameters first: both loaders then write into resident memory
            for p in c.parameters():
                p.data.zero_()
        dist.barrier()
        t0 = time.perf_counter()
        if which == "reader":
            load_megatron_checkpoint(chunks, info.path)
        else:
            from megatron.core import dist_checkpointing

            state = sharded_model_state(chunks)
            loaded = dist_checkpointing.load(state, info.path)
            for key, chunk in zip(state, chunks):
                chunk.load_state_dict(loaded[key], strict=True)
        dist.barrier()
        seconds = time.perf_counter() - t0
        digest = sum(float(p.detach().double().sum()) + float((p.detach().double() ** 2).sum())
                     for c in chunks for p in c.parameters())
        return {"seconds": seconds, "digest": digest}
    finally:
        destroy_parallel()


def model_load(meg: str, tp: int, which: str) -> Dict[str, float]:
    from megatron_bridge_ext.launch import spawn_local

    threads = max(1, (os.cpu_count() or 1) // tp)
    res = spawn_local(_load_rank, tp, (meg, tp, which), timeout=3600, threads=threads)
    return {"seconds": max(r["seconds"] for r in res), "digest": sum(r["digest"] for r in res)}


def read_dir_once(path: str) -> float:
    """Seconds to read every regular file of ``path`` once, sequentially, into one reused buffer."""
    buf = bytearray(64 * 1024 * 1024)
    t0 = time.perf_counter()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        with open(full, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=22, help="decoder layers (22: ~1.1B parameters)")
    ap.add_argument("--tp", type=int, default=1, help="the layout the checkpoint is imported and exported at")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache before every measured step")
    args = ap.parse_args(argv)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

    from megatron_bridge_ext.cli.export import export_checkpoint
    from megatron_bridge_ext.cli.import_hf import import_checkpoint
    from megatron_bridge_ext.io import checksums
    from megatron_bridge_ext.io.megatron_checkpoint import write_checksums

    work = args.dir or tempfile.mkdtemp(prefix="bench_megatron_read_")
    try:
        hf, meg, out = (os.path.join(work, n) for n in ("hf", "megatron", "out"))
        info = make_checkpoint(hf, args.layers)
        res = import_checkpoint(hf, meg, tp=args.tp)
        it = res["path"]
        files = checksums.manifest_files(it)
        nbytes = sum(os.path.getsize(os.path.join(it, n)) for n in files)
        print(f"checkpoint: {info['params'] / 1e9:.2f} B parameters, {len(files)} files, {nbytes / 1e9:.3f} GB at "
              f"TP{args.tp}; import {res['total_s']:.2f} s inside the ranks (manifest included); page cache dropped "
              f"before each step: {'yes' if args.drop_caches else 'no'}")

        # the import's case: the files are cached right after writing
        warm_read = min(read_dir_once(it) for _ in range(2))
        t0 = time.perf_counter()
        write_checksums(it)
        warm_hash = time.perf_counter() - t0
        print(f"cached: plain read {warm_read:.2f} s, manifest write (hash every file, one process) "
              f"{warm_hash:.2f} s = {warm_hash / warm_read:.2f}x the read")

        times: Dict[str, List[float]] = {k: [] for k in ("read", "checksums", "load_reader", "load_megatron",
                                                          "export", "export_checked")}
        digests: Dict[str, float] = {}
        threads = os.cpu_count() or 1
        for _ in range(args.repeats):
            for step in times:
                if args.drop_caches:
                    drop_page_cache()
                if step == "read":
                    times[step].append(read_dir_once(it))
                elif step == "checksums":
                    t0 = time.perf_counter()
                    checksums.verify_manifest(it, threads=threads)
                    times[step].append(time.perf_counter() - t0)
                elif step.startswith("load_"):
                    r = model_load(meg, args.tp, step[len("load_"):])
                    times[step].append(r["seconds"])
                    digests[step] = r["digest"]
                else:
                    shutil.rmtree(out, ignore_errors=True)
                    t0 = time.perf_counter()
                    export_checkpoint(meg, out, tp=args.tp, checksums=step == "export_checked")
                    times[step].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"medians of {args.repeats} (from disk): plain read {med['read']:.2f} s "
              f"({nbytes / med['read'] / 1e9:.2f} GB/s); checksums {med['checksums']:.2f} s = "
              f"{med['checksums'] / med['read']:.2f}x the read ({nbytes / med['checksums'] / 1e9:.2f} GB/s, "
              f"{threads} threads)")
        print(f"model load at TP{args.tp} (slowest rank): restricted reader {med['load_reader']:.2f} s, megatron-core's "
              f"dist_checkpointing.load {med['load_megatron']:.2f} s = {med['load_megatron'] / med['load_reader']:.2f}x "
              f"the reader's time; same parameters: {digests['load_reader'] == digests['load_megatron']}")
        print(f"export TP{args.tp} (command function, wall clock): without the check {med['export']:.2f} s, with it "
              f"{med['export_checked']:.2f} s: +{med['export_checked'] - med['export']:.2f} s "
              f"({med['export_checked'] / med['export']:.2f}x)")
        print("all runs:", {k: [round(x, 2) for x in v] for k, v in times.items()})
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

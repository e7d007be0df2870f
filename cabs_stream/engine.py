"""Chunk tasks and their scheduling with Dask.

A merge is a map over m-aligned chunks: ``run_chunk`` reads the same element range of the base
and every fine-tuned model through memory maps, runs ``kernels.merge_chunk``, writes the result
into the preallocated output shard with ``pwrite`` and records the chunk's counts in the
Zarr state. Chunks are independent, so Dask runs them in any order on threads or processes
and the output bytes do not depend on the chunk size, worker count or scheduler.
"""

from __future__ import annotations

import os
import pickle
import threading
from dataclasses import dataclass

import dask
import dask.multiprocessing
import dask.threaded
import numpy as np

from . import baseline_kernels as BK
from . import checkpoint, kernels, state
from . import stats as chunk_stats
from .dtypes import FLOAT_CODES, ITEMSIZE
from .errors import CheckpointError, OutputError
from .plan import Plan
from .published import published_2024
from .selection import TensorSelection, tensor_selection

SCHEDULERS = ("threads", "processes", "synchronous")


@dataclass
class Job:
    """What every chunk task needs, small enough to pickle once per process."""

    plan: Plan
    shard_paths: list[str]
    state_path: str
    save_masks: bool
    allow_nonfinite: bool
    sel: list[TensorSelection | None]  # per tensor (None for copied tensors)
    thr: np.ndarray | None = None  # (n_chunks, k, 2) thresholds of SEL_TOP / SEL_BAND
    bud: np.ndarray | None = None  # (n_chunks, k, 2) tie budgets
    dry: bool = False  # statistics (and masks) only: nothing is written to output shards

    @classmethod
    def create(cls, plan: Plan, shard_paths: list[str], state_path: str, save_masks: bool,
               allow_nonfinite: bool) -> "Job":
        sel = [tensor_selection(plan.config, t) if t.merged else None for t in plan.tensors]
        return cls(plan, shard_paths, state_path, save_masks, allow_nonfinite, sel)

    @property
    def fused(self) -> bool:
        """CABS and task arithmetic run in the fused kernel (kernels.merge_chunk)."""
        cfg = self.plan.config
        return cfg.method in ("cabs", "task_arithmetic") and cfg.shared.get("variant") != "published-2024"


# Per-process caches: the job (loaded once from its pickle), output fds, scratch buffers.
_jobs: dict[str, Job] = {}
_fds: dict[str, int] = {}
_lock = threading.Lock()
_local = threading.local()


def _job(path: str) -> Job:
    job = _jobs.get(path)
    if job is None:
        with _lock:
            if path not in _jobs:
                with open(path, "rb") as f:
                    _jobs[path] = pickle.load(f)
            job = _jobs[path]
    return job


def _fd(path: str) -> int:
    fd = _fds.get(path)
    if fd is None:
        with _lock:
            fd = _fds.get(path)
            if fd is None:
                fd = _fds[path] = os.open(path, os.O_WRONLY)
    return fd


def _scratch(name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A per-thread buffer reused across chunks (grown when needed)."""
    buf = getattr(_local, name, None)
    size = int(np.prod(shape))
    if buf is None or buf.size < size:
        buf = np.empty(size, dtype)
        setattr(_local, name, buf)
    return buf[:size].reshape(shape)


def _pwrite_all(fd: int, data: memoryview, offset: int, path: str) -> None:
    try:
        while data:
            n = os.pwrite(fd, data, offset)
            data, offset = data[n:], offset + n
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None


def _tail_quota(n: int, m: int, count: int) -> int:
    """Quota of a chunk's final short group of count % m elements: floor(n * r / m + 1/2)."""
    return (2 * n * (count % m) + m) // (2 * m)


def _fused(job: Job, t, ch, base, fts, codes, out, masks, stats) -> None:
    cfg = job.plan.config
    tail_n = _tail_quota(cfg.n, cfg.m, ch.count)
    mode = kernels.NM_CA if cfg.method == "cabs" else kernels.KEEP_ALL
    kernels.merge_chunk(base, FLOAT_CODES[t.base.dtype], fts, codes, job.sel[ch.tensor].weight,
                        np.array(cfg.order, np.int64), ch.count, cfg.n, cfg.m, tail_n, mode,
                        cfg.overlap == "fill", out, FLOAT_CODES[t.out_dtype], masks, stats)


def _published(job: Job, t, ch, base, fts, codes, out, masks, stats) -> None:
    """cabs variant published-2024 (fp16 arithmetic and the scripts' rules, published.py)."""
    cfg = job.plan.config
    k = len(fts)
    b = _scratch("b", (ch.count,), np.float32)
    vals = _scratch("vals", (k, ch.count), np.float32)
    BK.decode_chunk(base, FLOAT_CODES[t.base.dtype], fts, codes, ch.count, b, vals, True)
    res, kept = published_2024(b, vals, job.sel[ch.tensor].weight, cfg.n, cfg.m, cfg.order)
    kernels.encode(res, FLOAT_CODES[t.out_dtype], out)
    masks[:] = np.packbits(kept, axis=1, bitorder="little")
    stats[:k] = kept.sum(axis=1)
    stats[k:2 * k] = (vals.astype(np.float16) != b.astype(np.float16)).sum(axis=1)
    stats[2 * k:3 * k] = (~np.isfinite(vals)).sum(axis=1)
    stats[3 * k + 1] = (kept[0] & kept[1]).sum()


def _baseline(job: Job, index: int, t, ch, base, fts, codes, out, masks, stats) -> None:
    cfg = job.plan.config
    spec = cfg.spec
    sel = job.sel[ch.tensor]
    k = len(fts)
    b = _scratch("b", (ch.count,), np.float32)
    vals = _scratch("vals", (k, ch.count), np.float32)
    keep = _scratch("keep", (k, ch.count), np.uint8)
    BK.decode_chunk(base, FLOAT_CODES[t.base.dtype], fts, codes, ch.count, b, vals, spec.linear)
    seed = int(cfg.shared_param("random_seed", t.name, 0))
    cols = t.shape[-1] if len(t.shape) >= 2 else t.numel
    thr = job.thr[index] if job.thr is not None else np.full((k, 2), 0xFFFFFFFF, np.uint32)
    bud = job.bud[index] if job.bud is not None else np.zeros((k, 2), np.int64)
    ca = spec.selection == "ca"
    used = np.zeros(ch.count, bool) if ca else None
    svals = vals.copy() if ca else vals  # what selection sees
    for i in (cfg.order if ca else range(k)):
        if ca:  # conflict-aware: positions kept by earlier task vectors are not available
            svals[i][used] = 0
        if sel.mode == BK.SEL_MASK:  # n:m of this task vector alone, by the CABS kernel with k = 1
            one = _scratch("one", (-(-ch.count // 8),), np.uint8)
            one[:] = 0
            kernels.merge_chunk(base, FLOAT_CODES[t.base.dtype], (fts[i],), codes[i:i + 1], sel.weight[i:i + 1],
                                np.zeros(1, np.int64), ch.count, cfg.n, cfg.m, _tail_quota(cfg.n, cfg.m, ch.count),
                                kernels.NM_CA, True,
                                _scratch("tmp", (2 * ch.count,), np.uint16), 2, one.reshape(1, -1),
                                np.zeros(chunk_stats.kernel_width(1), np.int64))
            keep[i] = np.unpackbits(one, bitorder="little")[:ch.count]
        BK.select(svals, i, ch.count, sel.mode, thr[i, 0], bud[i, 0], thr[i, 1], bud[i, 1], cols,
                  sel.row_k[i], sel.density[i], seed, i, sel.tensor_key, ch.start, keep)
        if ca:
            used |= keep[i].astype(bool)
    normalize = bool(cfg.shared_param("normalize", t.name, spec.normalize))
    lam = np.float32(cfg.shared_param("lambda", t.name, 1.0))
    BK.combine(b, vals, keep, sel.weight, sel.scale, spec.consensus, normalize, lam, spec.linear, ch.count,
               out, FLOAT_CODES[t.out_dtype], masks, stats)


def run_chunk(job_path: str, index: int) -> np.ndarray:
    """Merge one chunk; returns its stats row (also recorded in the state)."""
    job = _job(job_path)
    plan = job.plan
    ch = plan.chunks[index]
    t = plan.tensors[ch.tensor]
    cfg = plan.config
    k = len(t.fts)
    base, fts = checkpoint.read_chunk(t.base, t.fts, ch.start, ch.count)
    codes = np.array([FLOAT_CODES[f.dtype] for f in t.fts], np.int64)
    if index + 1 < len(plan.chunks):  # overlap I/O with compute: start reading the next chunk
        nxt = plan.chunks[index + 1]
        for info in (plan.tensors[nxt.tensor].base, *plan.tensors[nxt.tensor].fts):
            checkpoint.prefetch(info, nxt.start, nxt.count)
    out = _scratch("out", (ch.count * ITEMSIZE[t.out_dtype] // 2,), np.uint16)
    masks = _scratch("masks", (k, -(-ch.count // 8)), np.uint8)
    masks[:] = 0
    stats = np.zeros(chunk_stats.width(k), np.int64)
    kstats = stats[:chunk_stats.kernel_width(k)]
    if job.fused:
        _fused(job, t, ch, base, fts, codes, out, masks, kstats)
    elif cfg.method == "cabs":
        _published(job, t, ch, base, fts, codes, out, masks, kstats)
    else:
        _baseline(job, index, t, ch, base, fts, codes, out, masks, kstats)
    checkpoint.release_chunk((t.base, *t.fts), ch.start, ch.count)
    del base, fts
    stats[chunk_stats.kernel_width(k):] = chunk_stats.balance(masks, ch.start, ch.count, cfg.m, t.shape)

    bad = stats[2 * k:3 * k]
    if bad.any() and not job.allow_nonfinite:
        i = int(np.flatnonzero(bad)[0])
        raise CheckpointError(f"task vector has {int(bad[i])} NaN/Inf values in elements "
                              f"[{ch.start}, {ch.start + ch.count}); pass --allow-nonfinite to merge anyway",
                              model=cfg.models[i].path, file=t.fts[i].file, tensor=t.name)
    if not job.dry:
        shard_path = job.shard_paths[t.shard]
        _pwrite_all(_fd(shard_path), memoryview(out).cast("B"),
                    t.out_start + ch.start * ITEMSIZE[t.out_dtype], shard_path)
    g = state.group(job.state_path)
    if job.save_masks:
        g["masks"][t.name][:, ch.start // 8: ch.start // 8 + masks.shape[1]] = masks
    g["stats"][index] = stats
    return stats


def copy_tensor(job_path: str, index: int) -> None:
    """Copy a tensor's bytes from the base into the output (integer buffers)."""
    job = _job(job_path)
    t = job.plan.tensors[index]
    shard_path = job.shard_paths[t.shard]
    with open(t.base.file, "rb") as src:
        data = os.pread(src.fileno(), t.base.nbytes, t.base.start)
    _pwrite_all(_fd(shard_path), memoryview(data), t.out_start, shard_path)


def close() -> None:
    """Close cached files (end of a merge in this process)."""
    with _lock:
        for fd in _fds.values():
            os.close(fd)
        _fds.clear()
        _jobs.clear()
    checkpoint.close_maps()


def _get(scheduler: str):
    return {"threads": dask.threaded.get, "processes": dask.multiprocessing.get, "synchronous": dask.get}[scheduler]


def run_map(fn, args_list: list[tuple], workers: int, scheduler: str) -> list:
    """Run fn(*args) for each args in parallel with Dask (threads for the threshold passes)."""
    dsk = {("map", i): (fn, *args) for i, args in enumerate(args_list)}
    kwargs = {} if scheduler == "synchronous" else {"num_workers": workers}
    sched = "threads" if scheduler == "processes" else scheduler  # the passes share the plan in memory
    try:
        return list(_get(sched)(dsk, list(dsk), **kwargs)) if dsk else []
    finally:
        checkpoint.close_maps()


def execute(job: Job, job_path: str, todo: list[int], workers: int, scheduler: str,
            callbacks: tuple = ()) -> dict[int, np.ndarray]:
    """Run the chunk tasks ``todo`` plus the tensor copies; returns stats rows by chunk index."""
    with open(job_path, "wb") as f:
        pickle.dump(job, f)
    dsk: dict = {("chunk", i): (run_chunk, job_path, i) for i in todo}
    if not job.dry:
        dsk.update({("copy", t): (copy_tensor, job_path, t)
                    for t, tj in enumerate(job.plan.tensors) if not tj.merged})
    keys = list(dsk)
    get = _get(scheduler)
    kwargs = {} if scheduler == "synchronous" else {"num_workers": workers}
    try:
        results = get(dsk, keys, callbacks=[c._callback for c in callbacks], **kwargs)
    finally:
        close()
    return {key[1]: r for key, r in zip(keys, results) if key[0] == "chunk"}

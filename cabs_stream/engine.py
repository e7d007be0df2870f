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

from . import checkpoint, kernels, state, stats as chunk_stats
from .dtypes import FLOAT_CODES, ITEMSIZE, numpy_float
from .errors import CheckpointError, OutputError
from .plan import Plan

SCHEDULERS = ("threads", "processes", "synchronous")


@dataclass
class Job:
    """What every chunk task needs, small enough to pickle once per process."""

    plan: Plan
    shard_paths: list[str]
    state_path: str
    save_masks: bool
    allow_nonfinite: bool
    codes: np.ndarray
    lam: np.ndarray
    order: np.ndarray
    mode: int
    fill: bool

    @classmethod
    def create(cls, plan: Plan, shard_paths: list[str], state_path: str, save_masks: bool,
               allow_nonfinite: bool) -> "Job":
        cfg = plan.config
        return cls(plan, shard_paths, state_path, save_masks, allow_nonfinite,
                   codes=np.zeros(len(cfg.models), np.int64),  # per tensor, filled in run_chunk
                   lam=np.array([s.weight for s in cfg.models], np.float32),
                   order=np.array(cfg.order, np.int64),
                   mode=kernels.NM_CA if cfg.method == "cabs" else kernels.KEEP_ALL,
                   fill=cfg.overlap == "fill")


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


def run_chunk(job_path: str, index: int) -> np.ndarray:
    """Merge one chunk; returns its stats row (also recorded in the state)."""
    job = _job(job_path)
    plan = job.plan
    ch = plan.chunks[index]
    t = plan.tensors[ch.tensor]
    cfg = plan.config
    k = len(t.fts)
    base = checkpoint.read_words(t.base, ch.start, ch.count, np.dtype(np.uint16))
    fts = tuple(checkpoint.read_words(f, ch.start, ch.count, np.dtype(np.uint16)) for f in t.fts)
    codes = np.array([FLOAT_CODES[f.dtype] for f in t.fts], np.int64)
    out_words = ch.count * ITEMSIZE[t.out_dtype] // 2
    out = _scratch("out", (out_words,), np.uint16)
    masks = _scratch("masks", (k, -(-ch.count // 8)), np.uint8)
    masks[:] = 0
    stats = np.zeros(chunk_stats.width(k), np.int64)
    tail_n = (2 * cfg.n * (ch.count % cfg.m) + cfg.m) // (2 * cfg.m)
    kernels.merge_chunk(base, FLOAT_CODES[t.base.dtype], fts, codes, job.lam, job.order, ch.count,
                        cfg.n, cfg.m, tail_n, job.mode, job.fill, out, FLOAT_CODES[t.out_dtype], masks,
                        stats[:chunk_stats.kernel_width(k)])
    stats[chunk_stats.kernel_width(k):] = chunk_stats.balance(masks, ch.start, ch.count, cfg.m, t.shape)
    for info in (t.base, *t.fts):
        checkpoint.release(info, ch.start, ch.count)
    del base, fts

    bad = stats[2 * k:3 * k]
    if bad.any() and not job.allow_nonfinite:
        i = int(np.flatnonzero(bad)[0])
        raise CheckpointError(f"task vector has {int(bad[i])} NaN/Inf values in elements "
                              f"[{ch.start}, {ch.start + ch.count}); pass --allow-nonfinite to merge anyway",
                              model=cfg.models[i].path, file=t.fts[i].file, tensor=t.name)
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


def execute(job: Job, job_path: str, todo: list[int], workers: int, scheduler: str,
            callbacks: tuple = ()) -> dict[int, np.ndarray]:
    """Run the chunk tasks ``todo`` plus the tensor copies; returns stats rows by chunk index."""
    with open(job_path, "wb") as f:
        pickle.dump(job, f)
    dsk: dict = {("chunk", i): (run_chunk, job_path, i) for i in todo}
    dsk.update({("copy", t): (copy_tensor, job_path, t)
                for t, tj in enumerate(job.plan.tensors) if not tj.merged})
    keys = list(dsk)
    get = {"threads": dask.threaded.get, "processes": dask.multiprocessing.get,
           "synchronous": dask.get}[scheduler]
    kwargs = {} if scheduler == "synchronous" else {"num_workers": workers}
    try:
        results = get(dsk, keys, callbacks=[c._callback for c in callbacks], **kwargs)
    finally:
        close()
    return {key[1]: r for key, r in zip(keys, results) if key[0] == "chunk"}

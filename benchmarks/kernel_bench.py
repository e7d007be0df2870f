"""Throughput of the merge kernel (``methods.nm_kernel.merge_chunk``) beside a plain-numpy baseline.

usage:
    /work/venv/bin/python benchmarks/kernel_bench.py
    /work/venv/bin/python benchmarks/kernel_bench.py --elements 16777216 --models 2 4 8 --threads 1 2

Measures the whole in-memory kernel path per chunk: decode bf16 words, task vectors, n:m
selection with CA (fill on; or every non-zero entry for ``--method task_arithmetic``), the
weighted sum, bf16 encoding, packed masks and counts. Chunks run on a ThreadPoolExecutor (the
kernel releases the GIL). The baseline does the same in numpy: decode via a uint32 shift,
``reshape(-1, m)``, ``np.argpartition`` per group row on |tau| for the top n, CA exclusion of
used positions and a fill top-up, the weighted sum and bf16 round-to-nearest-even; it breaks
ties in argpartition's order, so a few output words can differ from the kernel's (reported).

Inputs are synthetic and in memory (no I/O): base ~ N(0, 0.02) and fine-tuned = base +
N(0, 0.002), all rounded to bf16, so task vectors are quantized and ties are common, as in real
bf16 checkpoints. ``kernel M/s`` is M elements per second of wall time (best of ``--repeats``);
other processes on the machine lower it (the load average is printed). ``per CPU-s`` divides by
the CPU time the kernel's threads got instead: the per-thread speed, less sensitive to sharing
the cores. Nothing is asserted about timing.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cabs_stream.methods import nm_kernel as kernels
from cabs_stream.dtypes import BF16


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 words, round to nearest even (finite inputs)."""
    bits = x.view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def make_inputs(elements: int, k: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(elements, dtype=np.float32) * np.float32(0.02)
    fts = [to_bf16(base + rng.standard_normal(elements, dtype=np.float32) * np.float32(0.002))
           for _ in range(k)]
    return to_bf16(base), fts


# --------------------------------------------------------------------------- the kernel
class KernelRun:
    """All chunks of one configuration through ``merge_chunk``."""

    def __init__(self, base, fts, n, m, chunk, mode):
        self.base, self.fts, self.n, self.m, self.chunk, self.mode = base, tuple(fts), n, m, chunk, mode
        k = len(fts)
        self.k = k
        self.codes = np.full(k, BF16, np.int64)
        self.lam = np.ones(k, np.float32)
        self.order = np.arange(k, dtype=np.int64)
        self.out = np.empty(base.size, np.uint16)
        self.masks = np.zeros((k, -(-base.size // 8)), np.uint8)
        self.starts = list(range(0, base.size, chunk))
        self.stats = np.zeros((len(self.starts), 3 * k + k * k), np.int64)
        self.cpu = np.zeros(len(self.starts))  # CPU seconds of each chunk's thread

    def one(self, c: int) -> None:
        cpu = time.thread_time()
        s = self.starts[c]
        e = min(s + self.chunk, self.base.size)
        count = e - s
        k = len(self.fts)
        tail_n = (2 * self.n * (count % self.m) + self.m) // (2 * self.m)
        kernels.merge_chunk(self.base[s:e], BF16, tuple(f[s:e] for f in self.fts), self.codes,
                            self.lam, self.order, count, np.full(k, self.n, np.int64), self.m,
                            np.full(k, tail_n, np.int64), self.mode, True,
                            self.out[s:e], BF16, self.masks[:, s // 8:-(-e // 8)], self.stats[c])
        self.cpu[c] = time.thread_time() - cpu

    def __call__(self, pool: ThreadPoolExecutor | None) -> float:
        self.masks[:] = 0
        self.stats[:] = 0
        t = time.perf_counter()
        if pool is None:
            for c in range(len(self.starts)):
                self.one(c)
        else:
            list(pool.map(self.one, range(len(self.starts))))
        return time.perf_counter() - t


# --------------------------------------------------------------------------- numpy baseline
def numpy_chunk(base: np.ndarray, fts: list[np.ndarray], lam: np.ndarray, n: int, m: int,
                cabs: bool) -> np.ndarray:
    """Plain-numpy merge of one chunk (a multiple of m elements) -> bf16 words."""
    b = (base.astype(np.uint32) << 16).view(np.float32)
    taus = [((f.astype(np.uint32) << 16).view(np.float32) - b).reshape(-1, m) for f in fts]
    groups = taus[0].shape[0]
    rows = np.arange(groups)[:, None]
    sels = []
    used = np.zeros((groups, m), bool)
    for t in taus:  # pruning order = listed order
        mag = np.abs(t)
        if not cabs:
            sels.append(mag > 0)
            continue
        free = np.where(used, np.float32(0), mag)  # used positions rank last
        top = np.argpartition(free, m - n, axis=1)[:, m - n:]
        sel = np.zeros((groups, m), bool)
        sel[rows, top] = True
        sel &= free > 0  # zeros are never kept
        short = np.flatnonzero(sel.sum(1) < n)
        if short.size:  # fill: top up short groups from used positions by |tau|
            need = n - sel[short].sum(1)
            prev = np.where(used[short], mag[short], np.float32(0))
            rank = np.argsort(-prev, axis=1, kind="stable")
            extra = np.zeros((short.size, m), bool)
            extra[np.arange(short.size)[:, None], rank] = np.arange(m)[None, :] < need[:, None]
            sel[short] |= extra & (prev > 0)
        used |= sel
        sels.append(sel)
    acc = np.zeros((groups, m), np.float32)
    for t, sel, w in zip(taus, sels, lam):
        acc = np.where(sel, acc + w * t, acc)
    anyk = np.logical_or.reduce(sels)
    v = np.where(anyk, b.reshape(-1, m) + acc, b.reshape(-1, m)).ravel()
    bits = v.view(np.uint32)
    rne = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rne)


class NumpyRun:
    """The baseline over the first ``elements`` elements, chunk by chunk."""

    def __init__(self, base, fts, n, m, chunk, cabs, elements):
        self.base, self.fts, self.n, self.m, self.chunk, self.cabs = base, fts, n, m, chunk, cabs
        self.lam = np.ones(len(fts), np.float32)
        self.elements = elements
        self.out = np.empty(elements, np.uint16)
        self.starts = list(range(0, elements, chunk))

    def one(self, s: int) -> None:
        e = min(s + self.chunk, self.elements)
        self.out[s:e] = numpy_chunk(self.base[s:e], [f[s:e] for f in self.fts], self.lam,
                                    self.n, self.m, self.cabs)

    def __call__(self, pool: ThreadPoolExecutor | None) -> float:
        t = time.perf_counter()
        if pool is None:
            for s in self.starts:
                self.one(s)
        else:
            list(pool.map(self.one, self.starts))
        return time.perf_counter() - t


def best_of(run, pool, repeats: int) -> tuple[float, float]:
    """Best wall time of ``repeats`` runs, and the CPU seconds the kernel threads used in it
    (0 for the numpy baseline)."""
    best = (np.inf, 0.0)
    for _ in range(repeats):
        wall = run(pool)
        best = min(best, (wall, float(getattr(run, "cpu", np.zeros(1)).sum())))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", type=int, default=1 << 24, help="elements per tensor (16M)")
    ap.add_argument("--chunk", type=int, default=1 << 20, help="elements per chunk (1M)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--models", type=int, nargs="+", default=[2, 4, 8], help="values of k")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--method", nargs="+", default=["cabs", "task_arithmetic"],
                    choices=["cabs", "task_arithmetic"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--numpy-elements", type=int, default=1 << 22,
                    help="elements the (slow) numpy baseline runs on (4M; 0 = skip it)")
    args = ap.parse_args()
    m = args.m
    chunk = max(m * 8, args.chunk // (m * 8) * (m * 8))  # whole groups and whole mask bytes
    np_elements = min(args.numpy_elements, args.elements) // chunk * chunk

    print(f"kernel_bench: {args.elements:,} elements, bf16 -> bf16, {args.n}:{m}, chunks of "
          f"{chunk:,}, best of {args.repeats}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}")
    base, all_fts = make_inputs(args.elements, max(args.models))
    pools = {t: (None if t == 1 else ThreadPoolExecutor(t)) for t in args.threads}
    header = (f"{'method':16} {'k':>2} {'threads':>7} {'kernel M/s':>11} {'per CPU-s':>10} "
              f"{'numpy M/s':>10} {'speedup':>8}  notes")
    print(header)
    print("-" * len(header))
    for method in args.method:
        mode = kernels.NM_CA if method == "cabs" else kernels.KEEP_ALL
        for k in args.models:
            fts = all_fts[:k]
            kr = KernelRun(base, fts, args.n, m, chunk, mode)
            kr.one(0)  # compile or load the cached machine code
            nr = NumpyRun(base, fts, args.n, m, chunk, mode == kernels.NM_CA, np_elements) \
                if np_elements else None
            outs = []
            for t in args.threads:
                dt, cpu = best_of(kr, pools[t], args.repeats)
                outs.append(kr.out.copy())
                k_rate = args.elements / dt / 1e6
                row = f"{method:16} {k:>2} {t:>7} {k_rate:>11.1f} {args.elements / cpu / 1e6:>10.1f}"
                if nr is not None:
                    n_rate = np_elements / best_of(nr, pools[t], 1)[0] / 1e6
                    same = np.mean(nr.out == kr.out[:np_elements])
                    print(f"{row} {n_rate:>10.1f} {k_rate / n_rate:>7.1f}x  "
                          f"numpy output = kernel's on {100 * same:.2f}% of words")
                else:
                    print(f"{row} {'-':>10} {'-':>8}")
            if len(outs) > 1:
                same = all(np.array_equal(outs[0], o) for o in outs[1:])
                print(f"{'':16} {'':>2} output identical across thread counts: {same}")
    for p in pools.values():
        if p is not None:
            p.shutdown()


if __name__ == "__main__":
    main()

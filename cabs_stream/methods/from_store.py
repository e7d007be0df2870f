"""Merging from a task-vector store (``merge --from``): the stored method's own combination,
with its selection read back from the store instead of recomputed, so any lambda costs one
pass over the base and the store. Bit-identical to a fresh merge with the same weights: the
n:m methods sum exactly as the fused kernel does; the others run the same ``combine``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import trailing_zeros

from ..codec import FLOAT_CODES, ITEMSIZE, decode
from .nm_kernel import load_group, store_group
from . import gta_kernels as GK
from .base import Chunk, Method, Needs

if TYPE_CHECKING:  # pragma: no cover
    from ..config import MergeConfig
    from ..io.store import TaskVectorStore
    from ..plan import TensorJob
    from ..run.context import RunContext


_POP = np.array([bin(x).count("1") for x in range(256)], np.int64)


@njit(nogil=True, cache=True)
def sum_nm(base, base_code, vals, codes, masks, lam, count, m, ns, out, out_code, stats):
    """W = W0 + sum_i lam_i * tau_i over kept positions, in listed order, float32 (as
    ``nm_kernel.merge_chunk``); tau_i = (model i's stored word, decoded) - W0. Each group's
    ns[i] stored values of model i are decoded at once (dtype branch hoisted), then added at
    the kept positions, found set bit by set bit in 64-bit words (n per group, not m). Adds
    kept_i and kept-by-both counts to ``stats`` (layout of ``nm_kernel.merge_chunk``)."""
    k = len(vals)
    b = np.empty(m, np.float32)
    acc = np.empty(m, np.float32)
    anyk = np.empty(m, np.uint8)
    v = np.empty(max(ns.max(), 1), np.float32)
    one = np.uint64(1)
    for g0 in range(0, count, m):
        g = min(m, count - g0)
        load_group(base, base_code, g0, g, b)
        acc[:g] = 0.0
        anyk[:g] = 0
        e1 = g0 + g
        last = (e1 - 1) >> 3  # the group's last mask byte
        for i in range(k):
            n = ns[i]
            load_group(vals[i], codes[i], (g0 // m) * n, n, v)
            w = lam[i]
            p = 0
            mi = masks[i]
            for byte in range(g0 >> 3, last + 1, 8):
                lo = byte << 3
                bits = np.uint64(0)
                for q in range(min(8, last + 1 - byte)):
                    bits |= np.uint64(mi[byte + q]) << np.uint64(8 * q)
                if lo < g0:
                    bits &= ~((one << np.uint64(g0 - lo)) - one)
                if lo + 64 > e1:
                    bits &= (one << np.uint64(e1 - lo)) - one
                while bits != 0:
                    j = lo + trailing_zeros(bits) - g0
                    acc[j] = acc[j] + w * (v[p] - b[j])
                    anyk[j] = 1
                    p += 1
                    bits &= bits - one
            stats[i] += p
        store_group(out, out_code, g0, g, b, acc, anyk)
    for i in range(k):
        for l in range(i + 1, k):
            both = 0
            for byte in range((count + 7) >> 3):
                both += _POP[masks[i, byte] & masks[l, byte]]
            stats[3 * k + i * k + l] += both


class FromStore(Method):
    """The stored method, reading its kept task vectors from ``store``."""

    store_fingerprint: str | None = None  # the store's, part of the run's fingerprint

    def __init__(self, inner: Method, store: "TaskVectorStore", dtypes: dict[str, list[str]],
                 whole_rows: bool) -> None:
        self.inner, self.store, self.dtypes, self.whole_rows = inner, store, dtypes, whole_rows
        self.codes = {t: np.array([FLOAT_CODES[d] for d in ds], np.int64) for t, ds in dtypes.items()}
        self.wpv = {t: [ITEMSIZE[d] // 2 for d in ds] for t, ds in dtypes.items()}  # words per value
        self.ns = np.array(store.nm[0], np.int64) if store.nm is not None else None
        self.name, self.params, self.summary, self.paper = inner.name, inner.params, inner.summary, inner.paper

    def needs(self, cfg: "MergeConfig") -> Needs:
        return Needs(whole_rows=self.whole_rows, scratch_bytes=4 + 5 * len(cfg.models))

    def prepare(self, cfg: "MergeConfig", t: "TensorJob") -> Any:
        return self.inner.prepare(cfg, t)

    def describe(self, cfg: "MergeConfig") -> dict[str, Any]:
        return self.inner.describe(cfg)

    def known_counts(self, n_chunks: int) -> np.ndarray | None:
        """Counts per chunk recorded by the prune (the masks are the same)."""
        return self.store.known_counts(n_chunks)

    def merge_chunk(self, run: "RunContext", c: Chunk) -> None:
        p = c.prep
        k = c.k
        name = c.tensor.name
        masks, vals = self.store.read(name, c.start, c.count, k, self.wpv[name], c.scratch)
        if self.ns is not None:
            sum_nm(c.base, c.base_code, tuple(vals), self.codes[name], masks, p.weight, c.count, self.store.nm[1],
                   self.ns, c.out, c.out_code, c.stats)
            c.masks[:] = masks
            return
        b = decode(c.base, c.base_code, c.count)
        keep = np.unpackbits(masks, axis=1, bitorder="little")[:, :c.count]
        GK.combine(b, vals[0], keep, p.weight, p.scale, self.inner.consensus, p.normalize, p.lam, False, c.count,
                   c.out, c.out_code, c.masks, c.stats)

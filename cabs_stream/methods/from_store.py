"""Merging from a task-vector store (``merge --from``): the stored method's own combination,
with its selection read back from the store instead of recomputed, so any lambda costs one
pass over the base and the store. Bit-identical to a fresh merge with the same weights: the
n:m methods sum exactly as the fused kernel does; the others run the same ``combine``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit

from ..codec import FLOAT_CODES, ITEMSIZE, decode, load, store
from ..report.counts import _POPCOUNT
from . import gta_kernels as GK
from .base import Chunk, Method, Needs

if TYPE_CHECKING:  # pragma: no cover
    from ..config import MergeConfig
    from ..io.store import TaskVectorStore
    from ..plan import TensorJob
    from ..run.context import RunContext


@njit(nogil=True, cache=True)
def sum_nm(base, base_code, vals, codes, masks, lam, count, m, n, out, out_code):
    """W = W0 + sum_i lam_i * tau_i over kept positions, in listed order, float32 (as
    ``nm_kernel.merge_chunk``); tau_i = (model i's stored word, decoded) - W0."""
    k = len(vals)
    b = np.empty(m, np.float32)
    acc = np.empty(m, np.float32)
    anyk = np.zeros(m, np.uint8)
    for g0 in range(0, count, m):
        g = min(m, count - g0)
        for j in range(g):
            b[j] = load(base, base_code, g0 + j)
            acc[j] = 0.0
            anyk[j] = 0
        for i in range(k):
            p = (g0 // m) * n
            w = lam[i]
            for j in range(g):
                e = g0 + j
                if (masks[i, e >> 3] >> (e & 7)) & 1:
                    acc[j] = acc[j] + w * (load(vals[i], codes[i], p) - b[j])
                    anyk[j] = 1
                    p += 1
        for j in range(g):
            store(out, out_code, g0 + j, b[j] + acc[j] if anyk[j] != 0 else b[j])


class FromStore(Method):
    """The stored method, reading its kept task vectors from ``store``."""

    store_fingerprint: str | None = None  # the store's, part of the run's fingerprint

    def __init__(self, inner: Method, store: "TaskVectorStore", dtypes: dict[str, list[str]],
                 whole_rows: bool) -> None:
        self.inner, self.store, self.dtypes, self.whole_rows = inner, store, dtypes, whole_rows
        self.name, self.params, self.summary, self.paper = inner.name, inner.params, inner.summary, inner.paper

    def needs(self, cfg: "MergeConfig") -> Needs:
        return Needs(whole_rows=self.whole_rows, scratch_bytes=4 + 5 * len(cfg.models))

    def prepare(self, cfg: "MergeConfig", t: "TensorJob") -> Any:
        return self.inner.prepare(cfg, t)

    def describe(self, cfg: "MergeConfig") -> dict[str, Any]:
        return self.inner.describe(cfg)

    def merge_chunk(self, run: "RunContext", c: Chunk) -> None:
        p = c.prep
        k = c.k
        name = c.tensor.name
        dtypes = self.dtypes[name]
        masks, vals = self.store.read(name, c.start, c.count, k, [ITEMSIZE[d] // 2 for d in dtypes])
        if self.store.nm is not None:
            n, m = self.store.nm
            sum_nm(c.base, c.base_code, tuple(vals), np.array([FLOAT_CODES[d] for d in dtypes], np.int64), masks,
                   p.weight, c.count, m, n, c.out, c.out_code)
            c.masks[:] = masks
            bits = _POPCOUNT[masks].sum(axis=1, dtype=np.int64)
            c.stats[:k] = bits
            for i in range(k):
                for j in range(i + 1, k):
                    c.stats[3 * k + i * k + j] = int(_POPCOUNT[masks[i] & masks[j]].sum())
            return
        b = decode(c.base, c.base_code, c.count)
        keep = np.unpackbits(masks, axis=1, bitorder="little")[:, :c.count]
        GK.combine(b, vals[0], keep, p.weight, p.scale, self.inner.consensus, p.normalize, p.lam, False, c.count,
                   c.out, c.out_code, c.masks, c.stats)

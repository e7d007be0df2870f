"""Merging from a task-vector store (``merge --from``): the stored method's own combination,
with its selection read back from the store instead of recomputed, so any lambda costs one
pass over the base and the store. Bit-identical to a fresh merge with the same weights: the
n:m layout sums exactly as the fused kernel does (``nm_kernel.sum_nm``); the dense layout runs
the stored method's own ``merge_stored``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..dtypes import FLOAT_CODES, ITEMSIZE
from ..io.store import TaskVectorStore
from ..layout import TensorJob
from .base import ChunkData, Method, Needs, ParamValues


class FromStore(Method):
    """The stored method, reading its kept task vectors from ``store``."""

    def __init__(self, inner: Method, store: TaskVectorStore, dtypes: dict[str, list[str]],
                 whole_rows: bool, fingerprint: str) -> None:
        self.inner, self.store, self.dtypes, self.whole_rows = inner, store, dtypes, whole_rows
        self.store_fingerprint = fingerprint  # the store's, part of the run's fingerprint
        self.codes = {t: np.array([FLOAT_CODES[d] for d in ds], np.int64) for t, ds in dtypes.items()}
        self.wpv = {t: [ITEMSIZE[d] // 2 for d in ds] for t, ds in dtypes.items()}  # words per value
        self.ns = np.array(store.nm[0], np.int64) if store.nm is not None else None
        self.name, self.params, self.summary, self.paper = inner.name, inner.params, inner.summary, inner.paper

    def needs(self, cfg: ParamValues) -> Needs:
        return Needs(whole_rows=self.whole_rows, scratch_bytes=4 + 5 * cfg.k)

    def prepare(self, cfg: ParamValues, t: TensorJob) -> Any:
        return self.inner.prepare(cfg, t)

    def describe(self, cfg: ParamValues) -> dict[str, Any]:
        return self.inner.describe(cfg)

    def known_counts(self, n_chunks: int) -> np.ndarray | None:
        """Counts per chunk recorded by the prune (the masks are the same)."""
        return self.store.known_counts(n_chunks)

    def merge_chunk(self, c: ChunkData) -> None:
        from ..codec import decode
        from .nm_kernel import sum_nm

        p = c.prep
        name = c.tensor.name
        masks, vals = self.store.read(name, c.start, c.count, c.k, self.wpv[name], c.scratch)
        if self.store.nm is not None and self.ns is not None:
            sum_nm(c.base, c.base_code, tuple(vals), self.codes[name], masks, p.weight, c.count, self.store.nm[1],
                   self.ns, c.out, c.out_code, c.stats)
            c.masks[:] = masks
            return
        b = decode(c.base, c.base_code, c.count)
        keep = np.unpackbits(masks, axis=1, bitorder="little")[:, :c.count]
        self.inner.merge_stored(c, b, vals[0], keep)

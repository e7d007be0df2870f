"""``sce`` (mergekit's Select, Calculate, Erase; FuseChat 2.0): per tensor,

1. select: keep the elements whose variance across the task vectors is in the top
   ``select_topk`` fraction of the elements with non-zero variance (exact streaming threshold;
   ties to the lower index), the same positions for every model;
2. calculate: weight each model by the mean square of its selected task vector over the
   tensor, normalized to sum 1 (uniform when that sum is below 1e-6, as mergekit does);
3. erase: keep only entries whose sign agrees with the sign of the summed task vectors, and
   W = W0 + sum_i w_i tau_i [agree] / max(sum_i w_i [agree], 1e-6).

Steps 1 and 2 are the tensor's prepass (the sums of squares are accumulated in float64 in
element order, so they do not depend on chunking); step 3 is chunk-local.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..layout import TensorJob
from .base import INT8_MASK, ChunkData, ChunkSource, Method, Needs, Param, ParamValues

SELECT_TOPK = Param("select_topk", "float", 1.0, "sce: fraction of the elements (by variance across models) kept",
                    lo=0.0, hi=1.0)


@dataclass(frozen=True)
class SceParams:
    topk: float
    k: int


class Sce(Method):
    name = "sce"
    summary = "select top-variance elements, weight models by mean square, erase minority signs"
    paper = "https://arxiv.org/abs/2408.07990"
    params = (SELECT_TOPK, INT8_MASK)

    def needs(self, cfg: ParamValues) -> Needs:
        k = cfg.k  # a chunk (base, values, variance, flags) and a prepass beside it (values, variance)
        return Needs(prepass=True, scratch_bytes=(12 + 4 * k) + (8 + 4 * k))

    def prepare(self, cfg: ParamValues, t: TensorJob) -> SceParams:
        return SceParams(float(cfg.value("select_topk", t.name)), cfg.k)

    def _selected(self, vals: np.ndarray, pre: Any, ordinal: int) -> np.ndarray:
        """(1, count) uint8: the positions step 1 keeps in this chunk."""
        from . import gta_kernels as GK
        from .sce_kernels import variance

        count = vals.shape[1]
        sel = np.zeros((1, count), np.uint8)
        if pre is None:  # select_topk >= 1: every position
            sel[:] = 1
            return sel
        thr, bud = pre[0], pre[1]
        var = np.empty((1, count), np.float32)
        variance(vals, count, var[0])
        GK.select(var, 0, count, GK.SEL_TOP, thr[ordinal, 0, 0], bud[ordinal, 0, 0], thr[ordinal, 0, 1],
                  bud[ordinal, 0, 1], 1, 0, 1.0, 0, 0, 0, 0, sel)
        return sel

    def prepass(self, source: ChunkSource, tensor: TensorJob, chunks: list[int], prep: SceParams) -> Any:
        from .. import thresholds
        from .sce_kernels import sum_squares, variance

        sel_pre = None
        if prep.topk < 1:
            def keys(c: int) -> np.ndarray:
                taus = source.taus(c)
                var = np.empty((1, taus.shape[1]), np.float32)
                variance(taus, taus.shape[1], var[0])
                return var.view(np.uint32) & np.uint32(0x7FFFFFFF)

            thr, bud = thresholds.find(keys, chunks, lambda totals: [(int(totals[0] * max(prep.topk, 0)), -1)],
                                       rows=1)
            sel_pre = (thr, bud)
        acc = np.zeros(prep.k, np.float64)
        numel = 0
        for n, c in enumerate(chunks):
            taus = source.taus(c)
            sel = self._selected(taus, sel_pre, n)
            sum_squares(taus, sel, taus.shape[1], acc)
            numel += taus.shape[1]
        ms = acc / max(numel, 1)
        total = ms.sum()
        w = np.full(prep.k, 1.0 / prep.k) if abs(total) < 1e-6 else ms / total
        return sel_pre, w.astype(np.float32)

    def merge_chunk(self, c: ChunkData) -> None:
        from .sce_kernels import erase_combine

        sel_pre, w = c.pre
        b, vals = c.decode()
        sel = self._selected(vals, sel_pre, c.ordinal)
        erase_combine(b, vals, sel, w, c.count, c.out, c.out_code, c.masks, c.stats)


METHODS = [Sce()]

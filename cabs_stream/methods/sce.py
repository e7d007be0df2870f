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
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit

from .. import thresholds
from ..codec import store
from . import gta_kernels as GK
from .base import INT8_MASK, Chunk, Method, Needs, Param
from .gta import tau_keys

if TYPE_CHECKING:  # pragma: no cover
    from ..config import MergeConfig
    from ..plan import TensorJob
    from ..run.context import RunContext

SELECT_TOPK = Param("select_topk", "float", 1.0, "sce: fraction of the elements (by variance across models) kept",
                    lo=0.0, hi=1.0)
_U32 = np.uint32


@njit(nogil=True, cache=True)
def variance(vals, count, var):
    """var[j] = population variance of vals[:, j] over the models (float32, two passes)."""
    k = vals.shape[0]
    for j in range(count):
        s = np.float32(0.0)
        for i in range(k):
            s += vals[i, j]
        mean = s / np.float32(k)
        q = np.float32(0.0)
        for i in range(k):
            d = vals[i, j] - mean
            q += d * d
        var[j] = q / np.float32(k)


@njit(nogil=True, cache=True)
def sum_squares(vals, sel, count, acc):
    """acc[i] += sum of vals[i, j]**2 over selected j, in float64, in element order."""
    for i in range(vals.shape[0]):
        a = acc[i]
        for j in range(count):
            if sel[0, j] != 0:
                v = np.float64(vals[i, j])
                a += v * v
        acc[i] = a


@njit(nogil=True, cache=True)
def erase_combine(b, vals, sel, w, count, out, out_code, masks, stats):
    """Step 3 on one chunk (stats layout as in nm_kernel.merge_chunk)."""
    k = vals.shape[0]
    for j in range(count):
        s = np.float32(0.0)
        for i in range(k):
            v = vals[i, j]
            bits = np.float32(v).view(_U32) & _U32(0x7FFFFFFF)
            if bits != 0:
                stats[k + i] += 1
            if bits >= _U32(0x7F800000):
                stats[2 * k + i] += 1
            if sel[0, j] != 0:
                s += v
        if sel[0, j] == 0:
            store(out, out_code, j, b[j])
            continue
        positive = s >= 0
        mixed = np.float32(0.0)
        div = np.float32(0.0)
        anyk = False
        for i in range(k):
            v = vals[i, j]
            if (v > 0 and positive) or (v < 0 and not positive):
                mixed += v * w[i]
                div += w[i]
                anyk = True
                stats[i] += 1
                masks[i, j >> 3] |= np.uint8(1 << (j & 7))
                for l in range(i + 1, k):
                    x = vals[l, j]
                    if (x > 0 and positive) or (x < 0 and not positive):
                        stats[3 * k + i * k + l] += 1
        if not anyk:
            store(out, out_code, j, b[j])
            continue
        store(out, out_code, j, b[j] + mixed / max(div, np.float32(1e-6)))


@dataclass(frozen=True)
class SceParams:
    topk: float
    k: int


class Sce(Method):
    name = "sce"
    summary = "select top-variance elements, weight models by mean square, erase minority signs"
    paper = "https://arxiv.org/abs/2408.07990"
    params = (SELECT_TOPK, INT8_MASK)
    store_layout = None  # no lambda-independent pruned task vectors

    def needs(self, cfg: "MergeConfig") -> Needs:
        k = len(cfg.models)  # a chunk (base, values, variance, flags) and a prepass beside it (values, variance)
        return Needs(prepass=True, scratch_bytes=(12 + 4 * k) + (8 + 4 * k))

    def prepare(self, cfg: "MergeConfig", t: "TensorJob") -> SceParams:
        return SceParams(float(cfg.value("select_topk", t.name)), len(cfg.models))

    def _selected(self, run: "RunContext", index: int, vals: np.ndarray, pre: Any, ordinal: int) -> np.ndarray:
        """(1, count) uint8: the positions step 1 keeps in this chunk."""
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

    def prepass(self, run: "RunContext", tensor: int, chunks: list[int], prep: SceParams) -> Any:
        sel_pre = None
        if prep.topk < 1:
            def keys(c: int) -> np.ndarray:
                taus = tau_keys(run, c, taus_out=True)
                var = np.empty((1, taus.shape[1]), np.float32)
                variance(taus, taus.shape[1], var[0])
                return var.view(np.uint32) & _U32(0x7FFFFFFF)

            thr, bud = thresholds.find(keys, chunks, lambda totals: [(int(totals[0] * max(prep.topk, 0)), -1)],
                                       rows=1)
            sel_pre = (thr, bud)
        acc = np.zeros(prep.k, np.float64)
        numel = 0
        for n, c in enumerate(chunks):
            taus = tau_keys(run, c, taus_out=True)
            sel = self._selected(run, c, taus, sel_pre, n)
            sum_squares(taus, sel, taus.shape[1], acc)
            numel += taus.shape[1]
        ms = acc / max(numel, 1)
        total = ms.sum()
        w = np.full(prep.k, 1.0 / prep.k) if abs(total) < 1e-6 else ms / total
        return sel_pre, w.astype(np.float32)

    def merge_chunk(self, run: "RunContext", c: Chunk) -> None:
        sel_pre, w = c.pre
        b, vals = c.decode()
        sel = self._selected(run, c.index, vals, sel_pre, c.ordinal)
        erase_combine(b, vals, sel, w, c.count, c.out, c.out_code, c.masks, c.stats)


METHODS = [Sce()]

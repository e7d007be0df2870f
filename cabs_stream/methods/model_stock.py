"""``model_stock`` (Model Stock, Jang et al. 2024), as mergekit 0.1.5 computes it, per tensor:

cos = the mean over model pairs of cos(tau_i, tau_j) (each clamped to [-1, 1], the norm
product clamped below at 1e-6), t = N cos / (1 + (N - 1) cos) (0 where the denominator is
below 1e-6), W = t * mean_i(W_i) + (1 - t) * W0. One cosine per tensor, or per row of the
last dimension with ``filter_wise``. The dot products are the tensor's prepass, accumulated
in float64 in element order (so they do not depend on chunking); the rest is chunk-local.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import njit

from ..codec import store
from ..errors import ConfigError
from .base import Chunk, Method, Needs, Param, row_length
from .gta import tau_keys

if TYPE_CHECKING:  # pragma: no cover
    from ..config import MergeConfig
    from ..plan import TensorJob
    from ..run.context import RunContext

FILTER_WISE = Param("filter_wise", "bool", False, "model_stock: one interpolation ratio per row instead of per "
                    "tensor", filterable=False)
_U32 = np.uint32


@njit(nogil=True, cache=True)
def dot_products(taus, start, cols, per_row, dots):
    """dots[r, i, l] += sum of tau_i * tau_l (i <= l) over the chunk's elements of row r
    (row 0 for everything unless ``per_row``), in float64, in element order."""
    k = taus.shape[0]
    for j in range(taus.shape[1]):
        r = (start + j) // cols if per_row else 0
        for i in range(k):
            a = np.float64(taus[i, j])
            for l in range(i, k):
                dots[r, i, l] += a * np.float64(taus[l, j])


@njit(nogil=True, cache=True)
def interpolate(b, vals, t, start, cols, per_row, count, out, out_code, masks, stats):
    """W = t * mean_i(W_i) + (1 - t) * W0 in float32 (vals hold the models' weights);
    every non-zero task-vector entry counts as kept."""
    k = vals.shape[0]
    for j in range(count):
        tt = t[(start + j) // cols] if per_row else t[0]
        s = np.float32(0.0)
        for i in range(k):
            v = vals[i, j]
            s += v
            d = np.float32(v - b[j])
            bits = d.view(_U32) & _U32(0x7FFFFFFF)
            if bits != 0:
                stats[i] += 1
                stats[k + i] += 1
                masks[i, j >> 3] |= np.uint8(1 << (j & 7))
                for l in range(i + 1, k):
                    if np.float32(vals[l, j] - b[j]) != 0:
                        stats[3 * k + i * k + l] += 1
            if bits >= _U32(0x7F800000):
                stats[2 * k + i] += 1
        avg = s / np.float32(k)
        store(out, out_code, j, tt * avg + (np.float32(1.0) - tt) * b[j])


def ratio(dots: np.ndarray) -> np.ndarray:
    """t per row from the (rows, k, k) dot products (upper triangle and diagonal)."""
    k = dots.shape[1]
    norms = np.sqrt(np.stack([dots[:, i, i] for i in range(k)], axis=1))
    cos = []
    for i in range(k):
        for l in range(i + 1, k):
            cos.append(np.clip(dots[:, i, l] / np.maximum(norms[:, i] * norms[:, l], 1e-6), -1.0, 1.0))
    c = np.mean(cos, axis=0)
    den = 1 + (k - 1) * c
    return np.where(np.abs(den) < 1e-6, 0.0, k * c / np.where(np.abs(den) < 1e-6, 1.0, den)).astype(np.float32)


@dataclass(frozen=True)
class StockParams:
    per_row: bool
    cols: int


class ModelStock(Method):
    name = "model_stock"
    summary = "interpolate base and model average by the task vectors' mean pairwise cosine"
    paper = "https://arxiv.org/abs/2403.19522"
    params = (FILTER_WISE,)
    store_layout = None  # no lambda-independent pruned task vectors

    def resolve(self, params: dict[str, Any], k: int) -> dict[str, Any]:
        if k < 2:
            raise ConfigError("model_stock needs at least two fine-tuned models (the cosine is taken between "
                              f"task vectors), got {k}")
        return params

    def needs(self, cfg: "MergeConfig") -> Needs:
        k = len(cfg.models)  # a chunk (base, weights) and a prepass beside it (base, task vectors)
        return Needs(prepass=True, scratch_bytes=(4 + 4 * k) + (4 + 4 * k))

    def prepare(self, cfg: "MergeConfig", t: "TensorJob") -> StockParams:
        per_row = bool(cfg.value("filter_wise"))
        return StockParams(per_row, row_length(t.shape) if per_row else max(t.numel, 1))

    def prepass(self, run: "RunContext", tensor: int, chunks: list[int], prep: StockParams) -> Any:
        t = run.plan.tensors[tensor]
        k = len(t.fts)
        rows = t.numel // prep.cols if prep.per_row else 1
        dots = np.zeros((max(rows, 1), k, k), np.float64)
        for c in chunks:
            ch = run.plan.chunks[c]
            dot_products(tau_keys(run, c, taus_out=True), ch.start, prep.cols, prep.per_row, dots)
        return ratio(dots)

    def merge_chunk(self, run: "RunContext", c: Chunk) -> None:
        p: StockParams = c.prep
        b, vals = c.decode(values=True)
        interpolate(b, vals, c.pre, c.start, p.cols, p.per_row, c.count, c.out, c.out_code, c.masks, c.stats)


METHODS = [ModelStock()]

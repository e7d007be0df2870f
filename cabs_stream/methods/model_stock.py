"""``model_stock`` (Model Stock, Jang et al. 2024), as mergekit 0.1.5 computes it, per tensor:

cos = the mean over model pairs of cos(tau_i, tau_j) (each clamped to [-1, 1], the norm
product clamped below at 1e-6), t = N cos / (1 + (N - 1) cos) (0 where the denominator is
below 1e-6), W = t * mean_i(W_i) + (1 - t) * W0. One cosine per tensor, or per row of the
last dimension with ``filter_wise``. The dot products are the tensor's prepass, accumulated
in float64 in element order (so they do not depend on chunking); the rest is chunk-local.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..layout import TensorJob
from .base import ChunkData, ChunkSource, Method, Needs, Param, ParamValues, row_length

FILTER_WISE = Param("filter_wise", "bool", False, "model_stock: one interpolation ratio per row instead of per "
                    "tensor", filterable=False)


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

    def resolve(self, params: dict[str, Any], k: int) -> dict[str, Any]:
        if k < 2:
            raise ConfigError("model_stock needs at least two fine-tuned models (the cosine is taken between "
                              f"task vectors), got {k}")
        return params

    def needs(self, cfg: ParamValues) -> Needs:
        k = cfg.k  # a chunk (base, weights) and a prepass beside it (base, task vectors)
        return Needs(prepass=True, scratch_bytes=(4 + 4 * k) + (4 + 4 * k))

    def prepare(self, cfg: ParamValues, t: TensorJob) -> StockParams:
        per_row = bool(cfg.value("filter_wise"))
        return StockParams(per_row, row_length(t.shape) if per_row else max(t.numel, 1))

    def prepass(self, source: ChunkSource, t: TensorJob, chunks: list[int], prep: StockParams) -> Any:
        from .stock_kernels import dot_products

        k = len(t.fts)
        rows = t.numel // prep.cols if prep.per_row else 1
        dots = np.zeros((max(rows, 1), k, k), np.float64)
        for c in chunks:
            dot_products(source.taus(c), source.start(c), prep.cols, prep.per_row, dots)
        return ratio(dots)

    def merge_chunk(self, c: ChunkData) -> None:
        from .stock_kernels import interpolate

        p: StockParams = c.prep
        b, vals = c.decode(values=True)
        interpolate(b, vals, c.pre, c.start, p.cols, p.per_row, c.count, c.out, c.out_code, c.masks, c.stats)


METHODS = [ModelStock()]

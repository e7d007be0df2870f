"""Generalized task arithmetic, as mergekit defines it: one sparsifier per method, then the
weighted combination with optional TIES sign consensus, normalization and lambda.

task_arithmetic, ties, dare_linear, dare_ties, della, della_linear, breadcrumbs,
breadcrumbs_ties (mergekit's names, parameters and defaults), and the paper's baselines
magnitude (scope tensor | row | global) and random. Differences from mergekit 0.1.5: sums in
float32 rounded once; ties at a threshold go to the lower index; ``rescale`` divides kept
values by their keep probability (1/density; DELLA: 1/p per element) where mergekit matches
the L1 norm; randomness is a counter-based hash of (seed, model, tensor, element).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..layout import TensorJob
from .base import (DENSITY, INT8_MASK, LAMBDA, NORMALIZE, RESCALE, SEED, WEIGHT, ChunkData, ChunkSource, Method,
                   Needs, Param, ParamValues, row_length, top_count, weights)

GAMMA = Param("gamma", "float", 0.01, "breadcrumbs: fraction of the largest entries dropped", per_model=True,
              lo=0.0, hi=1.0)
EPSILON = Param("epsilon", "float", 0.15, "della: keep probabilities span density +- epsilon by rank in a row",
                per_model=True, lo=0.0, hi=1.0)
SCOPE = Param("scope", "choice", "tensor", "over what the top density is taken: tensor, row or global (the model)",
              choices=("tensor", "row", "global"))

#: The threshold pair that keeps nothing (``thresholds.NONE_KEPT``) with no tie budget: a model
#: without a threshold selects by its mode alone.
NO_THRESHOLD = (np.full((1, 2), 0xFFFFFFFF, np.uint32), np.zeros((1, 2), np.int64))


@dataclass(frozen=True)
class GTAParams:
    """Per-tensor parameters (arrays over the k models)."""

    mode: int  # GK.SEL_*; -1 = della
    weight: np.ndarray  # float32
    scale: np.ndarray  # float32: 1/density with rescale, else 1
    density: np.ndarray  # float64
    epsilon: np.ndarray  # float64
    row_k: np.ndarray  # int64: kept per row (row scope)
    ranks: list[tuple[int, int]]  # per model: (K_lo, K_hi) rank targets (-1: none)
    order: tuple[int, ...]  # the pruning order (ca_only)
    tensor_key: int
    seed: int
    normalize: bool
    rescale: bool
    lam: np.float32
    cols: int
    fused: bool  # plain task arithmetic: the fused kernel


class GTA(Method):
    """One member of the family: a sparsifier (None, magnitude, random, outliers, della),
    TIES consensus or not, and mergekit's defaults of normalize and rescale."""

    def __init__(self, name: str, summary: str, sparsifier: str | None, consensus: bool, normalize: bool,
                 rescale: bool, paper: str = "", scope: bool = False) -> None:
        self.name, self.summary, self.paper = name, summary, paper
        self.sparsifier, self.consensus = sparsifier, consensus
        params = [WEIGHT]
        if sparsifier:
            params.append(DENSITY)
        if sparsifier == "outliers":
            params.append(GAMMA)
        if sparsifier == "della":
            params.append(EPSILON)
        params += [Param(NORMALIZE.name, "bool", normalize, NORMALIZE.help)]
        if sparsifier:
            params.append(Param(RESCALE.name, "bool", rescale, RESCALE.help))
        params.append(LAMBDA)
        if sparsifier in ("random", "della"):
            params.append(SEED)
        if scope:
            params.append(SCOPE)
        params.append(INT8_MASK)
        self.params = tuple(params)

    def resolve(self, params: dict[str, Any], k: int) -> dict[str, Any]:
        return params

    def needs(self, cfg: ParamValues) -> Needs:
        scope = cfg.value("scope", default="tensor")
        top = self.sparsifier in ("magnitude", "outliers") and scope != "row"
        fused = self.sparsifier is None and _fusable(cfg, "")
        k = cfg.k
        # a chunk: base, values and keep flags; a threshold pass alongside it: base, values and keys
        return Needs(whole_rows=(self.sparsifier == "magnitude" and scope == "row") or self.sparsifier == "della",
                     prepass=top and scope != "global", global_thresholds=top and scope == "global",
                     scratch_bytes=0.0 if fused else (4 + 5 * k) + ((4 + 8 * k) if top else 0))

    def prepare(self, cfg: ParamValues, t: TensorJob) -> GTAParams:
        from . import gta_kernels as GK

        k = cfg.k
        n = t.numel
        density = np.array([cfg.value("density", t.name, i, 1.0) for i in range(k)], np.float64)
        epsilon = np.array([cfg.value("epsilon", t.name, i, 0.0) for i in range(k)], np.float64)
        rescale = bool(cfg.value("rescale", t.name, default=False))
        scale = np.array([1.0 / d if rescale and d > 0 and self.sparsifier != "della" else 1.0 for d in density],
                         np.float32)
        cols = row_length(t.shape)
        ranks = [(-1, -1)] * k
        mode = GK.SEL_ALL
        if self.sparsifier == "magnitude":
            mode = GK.SEL_ROW if cfg.value("scope", t.name, default="tensor") == "row" else GK.SEL_TOP
            ranks = [(top_count(d, n), -1) for d in density]
        elif self.sparsifier == "outliers":
            mode = GK.SEL_BAND
            ranks = []
            for i, d in enumerate(density):
                g = cfg.value("gamma", t.name, i, 0.01)
                target, n_top = int(d * n), int(g * n)
                top = n - max(0, n - target - n_top) - target if d < 1 else 0
                ranks.append((top + target, top) if d < 1 else (n, 0))
        elif self.sparsifier == "random":
            mode = GK.SEL_RANDOM
        elif self.sparsifier == "della":
            mode = -1
            for i, (d, e) in enumerate(zip(density, epsilon)):
                if 0 < d < 1 and not (0 < d - e and d + e < 1):
                    raise ConfigError(f"della: density {d:g} +- epsilon {e:g} of {cfg.model_paths[i]} must lie "
                                      f"in (0, 1) (tensor {t.name})")
        return GTAParams(mode, weights(cfg, t), scale, density, epsilon,
                         np.array([top_count(d, cols) for d in density], np.int64), ranks, cfg.order,
                         zlib.crc32(t.name.encode()), int(cfg.value("random_seed", t.name, default=0)),
                         bool(cfg.value("normalize", t.name, default=False)), rescale,
                         np.float32(cfg.value("lambda", t.name, default=1.0)), cols,
                         self.sparsifier is None and _fusable(cfg, t.name))

    def prepass(self, source: ChunkSource, tensor: TensorJob, chunks: list[int], prep: GTAParams) -> Any:
        from .. import thresholds

        return thresholds.find(source.keys, chunks, prep.ranks)

    def global_ranks(self, cfg: ParamValues, numels: list[int]) -> list[tuple[int, int]]:
        """Rank targets over all the tensors together (scope: global)."""
        total = sum(numels)
        return [(top_count(cfg.value("density", "", i, 1.0), total), -1) for i in range(cfg.k)]

    def store_layout(self, cfg: ParamValues) -> str | None:
        return "dense"

    def merge_stored(self, c: ChunkData, b: np.ndarray, vals: np.ndarray, keep: np.ndarray) -> None:
        from . import gta_kernels as GK

        p: GTAParams = c.prep
        GK.combine(b, vals, keep, p.weight, p.scale, self.consensus, p.normalize, p.lam, False, c.count,
                   c.out, c.out_code, c.masks, c.stats)

    def merge_chunk(self, c: ChunkData) -> None:
        from . import gta_kernels as GK
        from . import nm_kernel

        p: GTAParams = c.prep
        k = c.k
        if p.fused:
            nm_kernel.merge_chunk(c.base, c.base_code, c.fts, c.codes, p.weight, np.arange(k, dtype=np.int64),
                                  c.count, np.ones(k, np.int64), 256, np.ones(k, np.int64), nm_kernel.KEEP_ALL, False,
                                  c.out, c.out_code, c.masks, c.stats)
            if c.store is not None:
                _, vals = c.decode()
                c.store_dense(vals, vals != 0)
            return
        keep = c.scratch("keep", (k, c.count), np.uint8)
        b, vals = c.decode()
        thr, bud = chunk_thresholds(c)
        for i in range(k):
            if p.mode == -1:
                GK.della_select(vals, i, c.count, p.cols, p.density[i], p.epsilon[i], p.rescale, p.seed, i,
                                p.tensor_key, c.start, keep)
            else:
                GK.select(vals, i, c.count, p.mode, thr[i, 0], bud[i, 0], thr[i, 1], bud[i, 1], p.cols,
                          p.row_k[i], p.density[i], p.seed, i, p.tensor_key, c.start, keep)
        self.merge_stored(c, b, vals, keep)
        c.store_dense(vals, keep)


def chunk_thresholds(c: ChunkData) -> tuple[np.ndarray, np.ndarray]:
    """This chunk's (k, 2) thresholds and tie budgets from its tensor's prepass (if any)."""
    if c.pre is None:
        return (np.broadcast_to(NO_THRESHOLD[0], (c.k, 2)), np.broadcast_to(NO_THRESHOLD[1], (c.k, 2)))
    thr, bud = c.pre
    return thr[c.ordinal], bud[c.ordinal]


def _fusable(cfg: ParamValues, tensor: str) -> bool:
    """Plain task arithmetic (no normalize, lambda 1) runs in the fused kernel."""
    return not cfg.value("normalize", tensor, default=False) and cfg.value("lambda", tensor, default=1.0) == 1.0


METHODS = [
    GTA("task_arithmetic", "W0 + sum w_i tau_i (no pruning)", None, False, False, False,
        paper="https://arxiv.org/abs/2212.04089"),
    GTA("ties", "top density of |tau| per tensor, sign election by summed mass, disjoint mean", "magnitude",
        True, True, False, paper="https://arxiv.org/abs/2306.01708", scope=True),
    GTA("dare_linear", "keep each entry with probability density, rescale by 1/density, weighted sum", "random",
        False, False, True, paper="https://arxiv.org/abs/2311.03099"),
    GTA("dare_ties", "DARE pruning, then TIES sign election", "random", True, False, True,
        paper="https://arxiv.org/abs/2311.03099"),
    GTA("della", "MAGPRUNE: keep probability by magnitude rank in each row, rescale 1/p, TIES sign election",
        "della", True, True, True, paper="https://arxiv.org/abs/2406.11617"),
    GTA("della_linear", "MAGPRUNE (della) pruning, then the weighted sum", "della", False, False, True,
        paper="https://arxiv.org/abs/2406.11617"),
    GTA("magnitude", "top density of |tau| (scope tensor, row or global), then the weighted sum", "magnitude",
        False, False, False, paper="https://arxiv.org/abs/2503.01874", scope=True),
    GTA("random", "keep each entry with probability density (no rescale), then the weighted sum", "random",
        False, False, False, paper="https://arxiv.org/abs/2503.01874"),
    GTA("breadcrumbs", "drop the largest gamma and the smallest, keep density; weighted sum", "outliers",
        False, False, False, paper="https://arxiv.org/abs/2312.06795"),
    GTA("breadcrumbs_ties", "breadcrumbs pruning with TIES sign election", "outliers", True, False, False,
        paper="https://arxiv.org/abs/2312.06795"),
]

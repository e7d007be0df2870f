"""The paper's ablations: BS without CA (``bs_only``), and CA without BS (``ca_only``).

``bs_only``: n:m on each task vector alone (the CABS kernel with k = 1 per model), weighted
sum. ``ca_only``: models pruned one after another in ``pruning_order``, each among the
positions earlier ones did not keep, by magnitude (exact per-tensor thresholds, found model by
model over the free positions) or at random (each free entry with probability
density / (1 - density already taken)); strict: a model keeps fewer when its free non-zero
entries run out. Both combine with the weighted sum (no normalize, lambda 1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..layout import TensorJob
from .base import (DENSITY, SEED, WEIGHT, ChunkData, ChunkSource, Method, Needs, Param, ParamValues, top_count,
                   weights)
from .cabs import M, N, ORDER, SPARSITY, describe_nm, quotas, resolve_model_nm, resolve_nm
from .gta import GTA, GTAParams, chunk_thresholds

SELECTION = Param("selection", "choice", "magnitude", "ca_only: how each model selects among the free positions",
                  choices=("magnitude", "random"))


@dataclass(frozen=True)
class BSParams:
    weight: np.ndarray
    ns: np.ndarray  # n per model
    m: int


class BSOnly(Method):
    name = "bs_only"
    summary = "ablation: n:m on each task vector alone, no conflict awareness"
    paper = "https://arxiv.org/abs/2503.01874"
    params = (WEIGHT, N, M, SPARSITY)

    def resolve(self, params: dict[str, Any], k: int) -> dict[str, Any]:
        return resolve_nm(params)

    def resolve_model(self, own: dict[str, Any], shared: dict[str, Any], where: str) -> dict[str, Any]:
        return resolve_model_nm(own, shared, where)

    def needs(self, cfg: ParamValues) -> Needs:
        return Needs(scratch_bytes=4 + 5 * cfg.k + 4.25)

    def store_layout(self, cfg: ParamValues) -> str | None:
        return "nm"

    def prepare(self, cfg: ParamValues, t: TensorJob) -> BSParams:
        return BSParams(weights(cfg, t), np.array(cfg.ns, np.int64), cfg.m)

    def merge_chunk(self, c: ChunkData) -> None:
        from . import gta_kernels as GK
        from . import nm_kernel

        p: BSParams = c.prep
        k = c.k
        keep = c.scratch("keep", (k, c.count), np.uint8)
        one = c.scratch("one", (1, -(-c.count // 8)), np.uint8)
        tmp = c.scratch("tmp", (2 * c.count,), np.uint16)
        b, vals = c.decode()
        for i in range(k):  # n:m of this task vector alone: the CABS kernel with k = 1
            one[:] = 0
            ns, tails = quotas(p.ns[i:i + 1], p.m, c.count)
            nm_kernel.merge_chunk(c.base, c.base_code, (c.fts[i],), c.codes[i:i + 1], p.weight[i:i + 1],
                                  np.zeros(1, np.int64), c.count, ns, p.m, tails,
                                  nm_kernel.NM_CA, True, tmp, 0, one, np.zeros(3 + 1, np.int64))
            keep[i] = np.unpackbits(one[0], bitorder="little")[:c.count]
        GK.combine(b, vals, keep, p.weight, np.ones(k, np.float32), False, False, np.float32(1), False, c.count,
                   c.out, c.out_code, c.masks, c.stats)
        c.store_nm()

    def describe(self, cfg: ParamValues) -> dict[str, Any]:
        return describe_nm(cfg)


def exclude_prior(taus: np.ndarray, done: list[int], thr: np.ndarray, bud: np.ndarray, count: int) -> np.ndarray:
    """CA over thresholds: zero each task vector where earlier ones (``done``, in pruning order,
    selected by their thresholds ``thr``/``bud`` (k, 2) of this chunk) kept; returns the used positions."""
    from . import gta_kernels as GK

    used = np.zeros(count, bool)
    keep = np.zeros((taus.shape[0], count), np.uint8)
    for i in done:
        taus[i][used] = 0
        GK.select(taus, i, count, GK.SEL_TOP, thr[i, 0], bud[i, 0], thr[i, 1], bud[i, 1], 1, 0, 1.0, 0, i, 0, 0,
                  keep)
        used |= keep[i].astype(bool)
    return used


class CAOnly(GTA):
    def __init__(self) -> None:
        self.name = "ca_only"
        self.summary = "ablation: conflict-aware magnitude or random selection per tensor, no n:m"
        self.paper = "https://arxiv.org/abs/2503.01874"
        self.sparsifier, self.consensus = "ca", False
        self.params = (WEIGHT, DENSITY, ORDER, SELECTION, SEED)

    def needs(self, cfg: ParamValues) -> Needs:
        k = cfg.k  # a chunk (values, what selection sees, flags) and a threshold pass beside it
        return Needs(prepass=cfg.value("selection") == "magnitude", scratch_bytes=(9 + 9 * k) + (4 + 12 * k))

    def prepare(self, cfg: ParamValues, t: TensorJob) -> GTAParams:
        from . import gta_kernels as GK

        k = cfg.k
        p = GTA.prepare(self, cfg, t)
        density = p.density.copy()
        if cfg.value("selection", t.name) == "magnitude":
            return replace(p, mode=GK.SEL_TOP, ranks=[(top_count(d, t.numel), -1) for d in density])
        taken = 0.0  # random among the free positions, at the rate that keeps each model's density
        for i in cfg.order:
            d = density[i]
            density[i] = min(1.0, d / (1.0 - taken)) if taken < 1 else 0.0
            taken += d
        return replace(p, mode=GK.SEL_RANDOM, density=density, ranks=[(-1, -1)] * k)

    def prepass(self, source: ChunkSource, tensor: TensorJob, chunks: list[int], prep: GTAParams) -> Any:
        from .. import thresholds

        order = list(prep.order)
        k = len(order)
        thr = np.full((len(chunks), k, 2), thresholds.NONE_KEPT, np.uint32)
        bud = np.zeros((len(chunks), k, 2), np.int64)
        first = chunks[0]
        for p, i in enumerate(order):
            done = order[:p]

            def keys(c: int, i: int = i, done: list[int] = done) -> np.ndarray:
                taus = source.taus(c)
                used = exclude_prior(taus, done, thr[c - first], bud[c - first], taus.shape[1])
                taus[i][used] = 0
                return taus[i:i + 1].view(np.uint32) & np.uint32(0x7FFFFFFF)

            t_i, b_i = thresholds.find(keys, chunks, [prep.ranks[i]])
            thr[:, i], bud[:, i] = t_i[:, 0], b_i[:, 0]
        return thr, bud

    def merge_chunk(self, c: ChunkData) -> None:
        from . import gta_kernels as GK

        p: GTAParams = c.prep
        k = c.k
        svals = c.scratch("svals", (k, c.count), np.float32)  # what selection sees
        keep = c.scratch("keep", (k, c.count), np.uint8)
        b, vals = c.decode()
        svals[:] = vals
        thr, bud = chunk_thresholds(c)
        used = np.zeros(c.count, bool)
        for i in p.order:  # positions kept by earlier task vectors are not available
            svals[i][used] = 0
            GK.select(svals, i, c.count, p.mode, thr[i, 0], bud[i, 0], thr[i, 1], bud[i, 1], p.cols, p.row_k[i],
                      p.density[i], p.seed, i, p.tensor_key, c.start, keep)
            used |= keep[i].astype(bool)
        GK.combine(b, vals, keep, p.weight, np.ones(k, np.float32), False, False, np.float32(1), False, c.count,
                   c.out, c.out_code, c.masks, c.stats)
        c.store_dense(vals, keep)


METHODS = [BSOnly(), CAOnly()]

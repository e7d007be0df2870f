"""CABS (ICML 2025): balanced n:m sparsification with conflict-aware, sequential pruning.

Each task vector keeps its n largest |tau| in every group of m consecutive elements; task
vectors are pruned in ``pruning_order``, each among the positions no earlier one kept
(``overlap: fill`` tops a short group up from used positions, ``strict`` keeps fewer). The
whole chunk runs in the fused kernel (``nm_kernel.merge_chunk``). ``variant:
published-2024`` reproduces the authors' 2024 scripts instead (``published.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..layout import TensorJob
from .base import WEIGHT, ChunkData, Method, Needs, Param, ParamValues, weights
from .published import published_2024

N = Param("n", "int", 64, "weights kept in every group of m (per model or for all)", per_model=True,
          filterable=False)
M = Param("m", "int", 256, "group size: n of every m consecutive weights are kept", filterable=False)
SPARSITY = Param("sparsity", "float", None, "fraction dropped; sets n = round(m * (1 - sparsity))",
                 per_model=True, filterable=False)
OVERLAP = Param("overlap", "choice", "fill", "a group with fewer than n free non-zero positions: fill tops up "
                "from used positions (paper Alg. 2), strict keeps fewer (Alg. 1)", choices=("fill", "strict"))
ORDER = Param("pruning_order", "models", None, "the order task vectors are pruned in (default: listed order)",
              filterable=False)
VARIANT = Param("variant", "choice", "paper", "published-2024 reproduces the authors' 2024 scripts (fp16, two "
                "models)", choices=("paper", "published-2024"))
MAX_M = 1 << 20


def _sparsity_to_n(params: dict[str, Any], m: int, where: str) -> None:
    """n = round(m * (1 - sparsity)) in place of a given sparsity."""
    if params.get("sparsity") is None:
        return
    s = params.pop("sparsity")
    if params.get("n") is not None:
        raise ConfigError(f"{where}: give either n or sparsity, not both")
    if not 0 <= s < 1:
        raise ConfigError(f"{where}: sparsity must be in [0, 1), got {s}")
    params["n"] = round(m * (1 - s))
    if params["n"] < 1:
        raise ConfigError(f"{where}: sparsity {s} keeps no weight in a group of m={m}; lower it or raise m")


def resolve_nm(params: dict[str, Any]) -> dict[str, Any]:
    """The shared n:m: m (one for every model) and n (for the models without their own), validated."""
    m = params.get("m", M.default)
    if not 1 <= m <= MAX_M:
        raise ConfigError(f"m must be at least 1 (and at most {MAX_M}), got {m}")
    _sparsity_to_n(params, m, "parameters")
    if "n" in params and not 1 <= params["n"] <= m:
        raise ConfigError(f"parameters: n must be between 1 and m={m}, got {params['n']}")
    params["m"] = m
    return params


def resolve_model_nm(own: dict[str, Any], shared: dict[str, Any], where: str) -> dict[str, Any]:
    """A model's own n (or sparsity), after ``resolve_nm`` of the shared ones: its effective n
    (own, else shared, else the default) must lie in [1, m]."""
    m = shared["m"]
    _sparsity_to_n(own, m, where)
    n = own.get("n", shared.get("n"))
    if not 1 <= (N.default if n is None else n) <= m:
        raise ConfigError(f"{where}: n must be between 1 and m={m}, got "
                          + (f"the default n={N.default}; give n (or sparsity)" if n is None else str(n)))
    return own


def tail_quota(n: int, m: int, count: int) -> int:
    """Quota of a chunk's final short group of count % m elements: floor(n * r / m + 1/2)."""
    return (2 * n * (count % m) + m) // (2 * m)


def quotas(ns: np.ndarray, m: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(n per model, tail quota per model) for a chunk of ``count`` elements, as the kernel takes them."""
    return ns, np.array([tail_quota(int(n), m, count) for n in ns], np.int64)


def describe_nm(cfg: ParamValues) -> dict[str, Any]:
    """n (one value, or one per model when they differ), m and density for the manifest."""
    ns = cfg.ns
    one = len(set(ns)) == 1
    return {"n": ns[0] if one else list(ns), "m": cfg.m,
            "density": ns[0] / cfg.m if one else [n / cfg.m for n in ns]}


@dataclass(frozen=True)
class CabsParams:
    weight: np.ndarray
    order: np.ndarray
    ns: np.ndarray  # n per model
    m: int
    fill: bool
    published: bool


class Cabs(Method):
    name = "cabs"
    summary = "n:m balanced selection with conflict-aware exclusion (the CABS paper)"
    paper = "https://arxiv.org/abs/2503.01874"
    params = (WEIGHT, N, M, SPARSITY, OVERLAP, ORDER, VARIANT)

    def resolve(self, params: dict[str, Any], k: int) -> dict[str, Any]:
        params = resolve_nm(params)
        if params.get("variant") == "published-2024" and k != 2:
            raise ConfigError("variant published-2024 merges exactly two models, as the published scripts did")
        return params

    def resolve_model(self, own: dict[str, Any], shared: dict[str, Any], where: str) -> dict[str, Any]:
        own = resolve_model_nm(own, shared, where)
        if "n" in own and shared.get("variant") == "published-2024":
            raise ConfigError(f"{where}: variant published-2024 uses one n for both models, as the published "
                              "scripts did")
        return own

    def needs(self, cfg: ParamValues) -> Needs:
        published = cfg.value("variant") == "published-2024"
        return Needs(scratch_bytes=(16 + 8 * cfg.k) if published else 0.0)

    def store_layout(self, cfg: ParamValues) -> str | None:
        # the published scripts' fp16 sums are not a weighted sum of stored task vectors
        return None if cfg.value("variant") == "published-2024" else "nm"

    def prepare(self, cfg: ParamValues, t: TensorJob) -> CabsParams:
        return CabsParams(weights(cfg, t), np.array(cfg.order, np.int64), np.array(cfg.ns, np.int64), cfg.m,
                          cfg.value("overlap") == "fill", cfg.value("variant") == "published-2024")

    def merge_chunk(self, c: ChunkData) -> None:
        from ..codec import encode
        from . import nm_kernel

        p: CabsParams = c.prep
        if not p.published:
            ns, tails = quotas(p.ns, p.m, c.count)
            nm_kernel.merge_chunk(c.base, c.base_code, c.fts, c.codes, p.weight, p.order, c.count, ns, p.m,
                                  tails, nm_kernel.NM_CA, p.fill, c.out, c.out_code, c.masks, c.stats)
            c.store_nm()
            return
        k = c.k
        b, vals = c.decode(values=True)
        res, kept = published_2024(b, vals, p.weight, int(p.ns[0]), p.m, tuple(p.order))
        encode(res, c.out_code, c.out)
        c.masks[:] = np.packbits(kept, axis=1, bitorder="little")
        c.stats[:k] = kept.sum(axis=1)
        c.stats[k:2 * k] = (vals.astype(np.float16) != b.astype(np.float16)).sum(axis=1)
        c.stats[2 * k:3 * k] = (~np.isfinite(vals)).sum(axis=1)
        c.stats[3 * k + 1] = (kept[0] & kept[1]).sum()

    def describe(self, cfg: ParamValues) -> dict[str, Any]:
        return {**describe_nm(cfg), "overlap": cfg.value("overlap"),
                "pruning_order": [cfg.model_paths[i] for i in cfg.order]}


METHODS = [Cabs()]

"""The merge report: per-tensor and overall density, overlap and balance from the chunk counts."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..plan import Plan
from . import counts


def summarize(plan: Plan, rows: dict[int, np.ndarray]) -> dict[str, Any]:
    """Per-tensor and overall density, overlap and balance of the kept task-vector entries."""
    k = len(plan.models)
    per_tensor: dict[int, np.ndarray] = {}
    for i, row in rows.items():
        t = plan.chunks[i].tensor
        per_tensor[t] = per_tensor.get(t, 0) + row
    total = np.zeros(counts.width(k), np.int64)
    tensors = {}
    for t, row in sorted(per_tensor.items()):
        tensors[plan.tensors[t].name] = counts.describe(row, k, plan.tensors[t].numel)
        total += row
    overall = counts.describe(total, k, plan.merged_elements)
    for key in ("cv_rows", "cv_groups"):  # rows differ in length between tensors: average per-tensor CVs
        overall[key] = [_weighted([(d[key][i], d["numel"]) for d in tensors.values()]) for i in range(k)]
    return {**overall, "tensors": tensors}


def _weighted(pairs: list[tuple[float | None, int]]) -> float | None:
    """numel-weighted mean of the defined values."""
    pairs = [(v, w) for v, w in pairs if v is not None]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None

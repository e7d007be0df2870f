"""The merge report: per-tensor and overall density, overlap and balance from the chunk counts."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..plan import Plan
from .. import stats


def summarize(plan: Plan, rows: dict[int, np.ndarray]) -> dict[str, Any]:
    """Per-tensor and overall density, overlap and balance of the kept task-vector entries."""
    k = len(plan.models)
    per_tensor: dict[int, np.ndarray] = {}
    for i, row in rows.items():
        t = plan.chunks[i].tensor
        per_tensor[t] = per_tensor.get(t, 0) + row
    total = np.zeros(stats.width(k), np.int64)
    tensors = {}
    for t, row in sorted(per_tensor.items()):
        tensors[plan.tensors[t].name] = stats.describe(row, k, plan.tensors[t].numel)
        total += row
    overall = stats.describe(total, k, plan.merged_elements)
    for key in ("cv_rows", "cv_groups"):  # rows differ in length between tensors: average per-tensor CVs
        overall[key] = [_weighted([(d[key][i], d["numel"]) for d in tensors.values()]) for i in range(k)]
    return {**overall, "classes": by_class(tensors, k), "tensors": tensors}


#: Tensor classes, tried in this order on the lower-cased name (norms first: BERT's
#: ``attention.output.LayerNorm`` is a norm).
CLASSES = (("norms", ("norm", "ln_", ".ln")), ("embeddings", ("embed", "wte", "wpe", "lm_head", "token_type")),
           ("attention", ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")),
           ("mlp", ("mlp", "ffn", "fc", "gate_proj", "up_proj", "down_proj", "intermediate", "output.dense",
                    "w1", "w2", "w3", "experts")))


def tensor_class(name: str) -> str:
    low = name.lower()
    return next((cls for cls, keys in CLASSES if any(key in low for key in keys)), "other")


def by_class(tensors: dict[str, dict], k: int) -> dict[str, dict]:
    """Density (of all entries and of the non-zero ones) and balance per tensor class: a few
    embedding rows of tokens no fine-tune saw (all-zero task vectors) must not hide how evenly
    every other tensor is pruned."""
    out: dict[str, list[dict]] = {}
    for name, d in tensors.items():
        out.setdefault(tensor_class(name), []).append(d)
    result = {}
    for cls, ds in out.items():
        numel = sum(d["numel"] for d in ds)
        kept = [sum(d["kept"][i] for d in ds) for i in range(k)]
        nonzero = [sum(d["nonzero"][i] for d in ds) for i in range(k)]
        result[cls] = {"tensors": len(ds), "numel": numel, "kept": kept, "nonzero": nonzero,
                       "density": [x / max(numel, 1) for x in kept],
                       "density_of_nonzero": [x / z if z else None for x, z in zip(kept, nonzero)],
                       "cv_rows": [_weighted([(d["cv_rows"][i], d["numel"]) for d in ds]) for i in range(k)],
                       "cv_groups": [_weighted([(d["cv_groups"][i], d["numel"]) for d in ds]) for i in range(k)]}
    return dict(sorted(result.items()))


def _weighted(pairs: list[tuple[float | None, int]]) -> float | None:
    """numel-weighted mean of the defined values."""
    defined = [(v, w) for v, w in pairs if v is not None]
    total = sum(w for _, w in defined)
    return sum(v * w for v, w in defined) / total if total else None

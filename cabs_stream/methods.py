"""The merge methods: one table row each, naming how task vectors are pruned and combined.

Names follow mergekit where it has the method. Every method runs on the same chunk map; the
ones that prune by a threshold over a whole tensor or model (magnitude, TIES, breadcrumbs)
first find exact thresholds with a streaming histogram pass (thresholds.py).
"""

from __future__ import annotations

from dataclasses import dataclass

# Selections (how each task vector is pruned)
ALL = "all"  # every non-zero entry
NM_CA = "nm_ca"  # CABS: n:m per group, conflict-aware (sequential, excluding used positions)
NM = "nm"  # n:m per group, each task vector alone (BS without CA)
MAGNITUDE = "magnitude"  # top density by |tau|, per tensor / row / whole model
RANDOM = "random"  # keep with probability density (counter-based, reproducible)
OUTLIERS = "outliers"  # breadcrumbs: drop the top gamma, keep the next density by |tau|
CA = "ca"  # conflict-aware only: magnitude or random at each model's density, excluding used positions


@dataclass(frozen=True)
class Method:
    name: str
    selection: str
    consensus: bool = False  # TIES sign election and disjoint mean
    normalize: bool = False  # default of ``parameters.normalize``
    rescale: bool = False  # DARE: kept values times 1/density
    linear: bool = False  # weighted average of the models' weights, not of task vectors
    doc: str = ""


METHODS = {m.name: m for m in [
    Method("cabs", NM_CA, doc="n:m balanced selection with conflict-aware exclusion (the paper)"),
    Method("task_arithmetic", ALL, doc="W0 + sum w_i tau_i"),
    Method("linear", ALL, normalize=True, linear=True, doc="sum w_i W_i / sum w_i (normalize)"),
    Method("ties", MAGNITUDE, consensus=True, normalize=True,
           doc="top density per tensor, sign election by summed mass, disjoint mean"),
    Method("dare_linear", RANDOM, rescale=True, doc="drop with probability 1 - density, rescale by 1/density"),
    Method("dare_ties", RANDOM, consensus=True, rescale=True, doc="DARE pruning, then TIES sign election"),
    Method("magnitude", MAGNITUDE, doc="top density by |tau| (scope tensor, row or global), then the weighted sum"),
    Method("random", RANDOM, doc="keep with probability density, no rescale, then the weighted sum"),
    Method("breadcrumbs", OUTLIERS, doc="drop the largest gamma and the smallest, keep density"),
    Method("breadcrumbs_ties", OUTLIERS, consensus=True, doc="breadcrumbs pruning with TIES sign election"),
    Method("bs_only", NM, doc="ablation: n:m on each task vector, no conflict awareness"),
    Method("ca_only", CA, doc="ablation: conflict-aware magnitude or random selection per tensor, no n:m"),
]}

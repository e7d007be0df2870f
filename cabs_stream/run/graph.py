"""Building the Dask graph of a run (``schedule.py`` runs it).

Nodes: one ``merge_chunk`` per chunk still to do, one ``copy_tensor`` per copied tensor, and
what the method needs before a tensor's chunks: its ``prepass`` (thresholds or statistics of
that tensor: the tensor's chunk tasks depend on it alone, so the prepass of one tensor runs
while other tensors merge) or, for ``scope: global``, the threshold passes over every tensor
as per-tensor partial tasks joined by one small reduction per pass.
"""

from __future__ import annotations

from typing import Any

from ..methods.base import Needs
from ..plan import Plan
from . import tasks


def build(ref: tasks.Ref, plan: Plan, needs: Needs, todo: list[int], dry: bool) -> dict:
    """The graph of the chunks ``todo`` (indices into ``plan.chunks``) and the tensor copies."""
    dsk: dict = {}
    by_tensor = plan.tensor_chunks()
    wanted = sorted({plan.chunks[i].tensor for i in todo})
    pre: dict[int, Any] = {}
    if needs.prepass:
        for t in wanted:
            dsk[("prepass", t)] = (tasks.prepass, ref, t, by_tensor[t])
            pre[t] = ("prepass", t)
    elif needs.global_thresholds and wanted:
        tensors = list(by_tensor)  # every merged tensor takes part in the ranks, in model order
        ranks = ref.get().method.global_ranks(plan.config, [plan.tensors[t].numel for t in tensors])
        rows = len(ranks)
        for t in tensors:
            dsk[("high", t)] = (tasks.high_part, ref, by_tensor[t], rows)
        dsk[("global", "high")] = (tasks.locate_high, ranks, [("high", t) for t in tensors])
        for t in tensors:
            dsk[("low", t)] = (tasks.low_part, ref, by_tensor[t], ("global", "high"))
        dsk[("global", "low")] = (tasks.locate_low, ("global", "high"), ranks, [("low", t) for t in tensors])
        for t in tensors:
            dsk[("eq", t)] = (tasks.eq_part, ref, by_tensor[t], ("global", "low"))
        dsk[("global", "share")] = (tasks.share_global, ("global", "low"), [("eq", t) for t in tensors])
        for n, t in enumerate(tensors):
            dsk[("thresholds", t)] = (tasks.pick, ("global", "share"), n)
            pre[t] = ("thresholds", t)
    for i in todo:
        dsk[("chunk", i)] = (tasks.merge_chunk, ref, i, pre.get(plan.chunks[i].tensor))
    if not dry:
        dsk.update({("copy", t): (tasks.copy_tensor, ref, t) for t, tj in enumerate(plan.tensors) if not tj.merged})
    return dsk

"""``linear``: the weighted average of the fine-tuned models' weights (not of task vectors).

W = sum_i w_i W_i / sum_i w_i (``normalize``, default true, as in mergekit), accumulated in
float32 in the models' listed order. The base defines the output's tensors and layout; as in
mergekit, it may be left out, and the first listed model then does.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from ..layout import TensorJob
from .base import INT8_MASK, NORMALIZE, WEIGHT, ChunkData, Method, Needs, Param, ParamValues, weights


@dataclass(frozen=True)
class LinearParams:
    weight: np.ndarray
    normalize: bool


class Linear(Method):
    name = "linear"
    summary = "sum w_i W_i / sum w_i (a weighted average of the models)"
    paper = "https://arxiv.org/abs/2203.05482"
    params = (WEIGHT, Param(NORMALIZE.name, "bool", True, NORMALIZE.help), INT8_MASK)
    base_optional = True

    def needs(self, cfg: ParamValues) -> Needs:
        return Needs(scratch_bytes=4 + 5 * cfg.k)

    def prepare(self, cfg: ParamValues, t: TensorJob) -> LinearParams:
        return LinearParams(weights(cfg, t), bool(cfg.value("normalize", t.name)))

    def merge_chunk(self, c: ChunkData) -> None:
        from . import gta_kernels as GK

        p: LinearParams = c.prep
        k = c.k
        keep = c.scratch("keep", (k, c.count), np.uint8)
        b, vals = c.decode(values=True)
        GK.combine(b, vals, keep, p.weight, np.ones(k, np.float32), False, p.normalize, np.float32(1), True,
                   c.count, c.out, c.out_code, c.masks, c.stats)


METHODS = [Linear()]

"""The layout of a merge: each output tensor (where its inputs are, where its bytes go), the
output shards, and the chunk grid's cells. Plain frozen dataclasses, made by ``plan.py`` and
read by every layer above it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .io.inputs import Computed
from .io.safetensors_format import TensorInfo


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: where its inputs are and where its bytes go."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    base: TensorInfo | Computed  # a vocabulary tensor's aligned rows are computed (vocab.RowsTensor)
    fts: tuple[TensorInfo | Computed, ...]  # empty for tensors copied from the base
    shard: int
    out_start: int  # absolute byte offset in the output shard
    chunk: int  # elements per chunk of this tensor (the last one may be shorter)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def merged(self) -> bool:
        return bool(self.fts)


@dataclass(frozen=True)
class OutShard:
    name: str
    header: bytes
    size: int


@dataclass(frozen=True)
class ChunkSpec:
    """Elements [start, start + count) of tensor ``tensor`` (start is a multiple of m)."""

    tensor: int
    start: int
    count: int
    ordinal: int  # position among the tensor's chunks

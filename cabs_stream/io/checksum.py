"""The checksum of every record a run keeps (chunk bytes, masks, store contents): CRC-32."""

from __future__ import annotations

import zlib

import numpy as np


def crc(data: np.ndarray | bytes | memoryview) -> int:
    """CRC-32 of the bytes of ``data``."""
    if isinstance(data, bytes):
        return zlib.crc32(data)
    # an array's .data is memoryview(array) (numpy's stubs give ndarray the buffer protocol on 3.12+ only)
    return zlib.crc32((data.data if isinstance(data, np.ndarray) else memoryview(data)).cast("B"))


def combine(first: int, parts: list[np.ndarray]) -> int:
    """One CRC for a record made of ``first`` (a CRC) and ``parts`` in order (the rule a
    task-vector store uses for a chunk's masks and each model's values)."""
    c = first
    for i, p in enumerate(parts):
        c = crc(p) ^ (c * 31 + i) & 0xFFFFFFFF
    return c

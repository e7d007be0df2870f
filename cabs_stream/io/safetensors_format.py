"""The safetensors container: strict header parsing and header building.

cabs-stream reads tensors as raw byte ranges of memory-mapped files, so it needs each tensor's
offset, which the ``safetensors`` library does not expose. This module parses the header (an
8-byte little-endian length, then a JSON object) and checks every rule of the format, so a
damaged or hostile file fails here with a ``CheckpointError`` and never reaches the kernels.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass

from ..dtypes import ITEMSIZE
from ..errors import CheckpointError

#: Same cap as the reference implementation: larger headers are refused.
MAX_HEADER_BYTES = 100_000_000
#: Tensors per file (the largest real checkpoints hold a few thousand per shard).
MAX_TENSORS = 200_000
#: Dimensions per tensor.
MAX_DIMS = 16


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: dtype, shape and absolute byte range inside its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: str
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: str, model: str | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of a safetensors file.

    Returns the tensors (in file order) and the ``__metadata__`` strings. Raises
    ``CheckpointError`` naming the model, file and tensor for every violation.
    """
    def fail(msg: str, tensor: str | None = None) -> CheckpointError:
        return CheckpointError(msg, model=model, file=path, tensor=tensor)

    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise fail("not a regular file (a FIFO, device or folder where a file is expected)")
        size = st.st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise fail(f"truncated: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise fail(f"header length {n} is larger than the file ({size} bytes): truncated or not safetensors")
            if n > MAX_HEADER_BYTES:
                raise fail(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
            raw = f.read(n)
    except OSError as e:
        raise fail(f"cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"header is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise fail(f"header is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise fail("header is not a JSON object")
    if len(obj) > MAX_TENSORS:
        raise fail(f"header lists {len(obj)} entries, more than the {MAX_TENSORS} accepted per file")

    data_start = 8 + n
    data_len = size - data_start
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise fail("__metadata__ must map strings to strings")

    tensors: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, entry in obj.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise fail("entry must have exactly dtype, shape and data_offsets", name)
        dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise fail(f"unknown dtype {dtype!r}", name)
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(_is_int(d) and 0 <= d < 2**48 for d in shape)):
            raise fail(f"invalid shape {shape!r}", name)
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)
                or not 0 <= offs[0] <= offs[1]):
            raise fail(f"invalid data_offsets {offs!r}", name)
        expected = math.prod(shape) * ITEMSIZE[dtype]
        if offs[1] - offs[0] != expected:
            raise fail(f"data_offsets {offs} span {offs[1] - offs[0]} bytes but {dtype}{shape} needs {expected}", name)
        if offs[1] > data_len:
            raise fail(f"data_offsets {offs} run past the end of the data ({data_len} bytes): file truncated?", name)
        tensors.append((offs[0], offs[1], name, dtype, tuple(shape)))

    tensors.sort()
    pos, prev = 0, None
    for begin, end, name, _, _ in tensors:
        if begin < pos:
            raise fail(f"data overlaps tensor {prev!r}", name)
        if begin > pos:
            raise fail(f"gap of {begin - pos} unassigned bytes before this tensor's data", name)
        pos, prev = end, name
    if pos != data_len:
        raise fail(f"tensor data covers {pos} bytes but the file holds {data_len} after the header")

    infos = {name: TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
             for begin, end, name, dtype, shape in tensors}
    # Restore the header's own order (readers and writers keep it).
    return {name: infos[name] for name in obj}, meta


def build_header(entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """Serialize a header for tensors laid out back to back in the given order.

    Returns the complete prefix (8-byte length + JSON padded with spaces to 8-byte alignment)
    and the relative data offset of each tensor.
    """
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = dict(metadata)
    offsets, pos = [], 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    text = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text, offsets

"""Zarr v3 stores of a run: the resume record, and the optional bit-packed masks.

- ``WorkState`` (``state.zarr`` in the work folder): ``records`` holds one row per chunk,
  written only after the chunk's bytes are in the output file (and, with ``--durable``, on
  disk): the chunk's counts, a CRC-32 of its output bytes, a CRC-32 of its packed masks and a
  CRC-32 of the row itself keyed by the run's fingerprint. ``attrs['fingerprint']`` names the
  configuration and the identity of every input (path, size, mtime, ctime, inode); a state
  with another fingerprint, or one that cannot be read, is discarded with a one-line note. On
  resume every reused chunk is verified (its row, and its bytes read back from the partial
  output); what cannot be verified is merged again.
- ``SavedMasks``: one array per merged tensor, shape (k, ceil(numel / 8)) uint8, chunked like
  the merge, bit j of byte j // 8 (little-endian bit order) = element j kept by model i.
  With ``--save-masks`` it is written as ``cabs_masks.zarr`` inside the output folder.

Both open their Zarr group lazily in each process that writes to them; nothing is cached
beyond the object, which belongs to one run. No pickles: rows are int64, attrs are JSON.
"""

from __future__ import annotations

import os
import shutil
import threading
import warnings
import zlib
from typing import cast

import numpy as np
import zarr

from ..stats import width as stats_width

MASKS_NAME = "cabs_masks.zarr"
EXTRA = 3  # output CRC, masks CRC, row CRC


class LazyGroup:
    def __init__(self, path: str) -> None:
        self.path = path
        self._group: zarr.Group | None = None
        self._lock = threading.Lock()

    def group(self) -> zarr.Group:
        if self._group is None:
            with self._lock:
                if self._group is None:
                    self._group = zarr.open_group(self.path, mode="r+")
        return self._group

    def __getstate__(self) -> dict:  # a process opens its own handles
        return {k: v for k, v in self.__dict__.items() if k not in ("_group", "_lock", "_records")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._group = None
        self._lock = threading.Lock()


class WorkState(LazyGroup):
    """The per-chunk completion record of one run."""

    def __init__(self, path: str, fingerprint: str = "") -> None:
        super().__init__(path)
        self.fingerprint = fingerprint
        self._records: zarr.Array | None = None

    @classmethod
    def open(cls, path: str, fingerprint: str, n_chunks: int, k: int) -> tuple["WorkState", np.ndarray, bool]:
        """Reopen the state of ``fingerprint``, or create it afresh. Returns the state, the
        rows recorded so far (row[0] < 0: chunk not done) and whether it was reopened."""
        width = stats_width(k) + EXTRA
        if os.path.lexists(path):
            try:
                g = zarr.open_group(path, mode="r+")
                if g.attrs.get("fingerprint") == fingerprint:
                    rows = np.asarray(cast(zarr.Array, g["records"])[:], np.int64)
                    if rows.shape == (max(n_chunks, 1), width):
                        return cls(path, fingerprint), rows, True
                else:
                    warnings.warn("the work folder held another configuration's (or older inputs') state; "
                                  "starting clean", stacklevel=2)
            except Exception as e:  # noqa: BLE001 - any unreadable state is discarded, never trusted
                warnings.warn(f"the work state could not be read ({type(e).__name__}); starting clean", stacklevel=2)
            shutil.rmtree(path, ignore_errors=True)
        g = zarr.open_group(path, mode="w")
        g.create_array("records", shape=(max(n_chunks, 1), width), chunks=(1, width), dtype="int64",
                       fill_value=-1, compressors=None)
        g.attrs["fingerprint"] = fingerprint  # written last: a state without it is incomplete
        return cls(path, fingerprint), np.full((max(n_chunks, 1), width), -1, np.int64), False

    def _row_crc(self, index: int, row: np.ndarray) -> int:
        return zlib.crc32(np.ascontiguousarray(row, np.int64).tobytes(),
                          zlib.crc32(f"{self.fingerprint}:{index}".encode()))

    def record(self, index: int, stats: np.ndarray, out_crc: int, masks_crc: int) -> None:
        row = np.concatenate([stats, [out_crc, masks_crc]]).astype(np.int64)
        if getattr(self, "_records", None) is None:  # opened once per run and process
            self._records = cast(zarr.Array, self.group()["records"])
        assert self._records is not None  # opened just above, or earlier in this process
        self._records[index] = np.concatenate([row, [self._row_crc(index, row)]])

    def intact(self, index: int, row: np.ndarray) -> bool:
        """The row was written by this run's configuration for this chunk and is undamaged."""
        return row[0] >= 0 and int(row[-1]) == self._row_crc(index, row[:-1])

    def invalidate(self) -> None:
        """Forget every record (before the output is moved into place)."""
        shutil.rmtree(self.path, ignore_errors=True)


class SavedMasks(LazyGroup):
    """Bit-packed masks per tensor (for ``--save-masks`` and ``analyze``)."""

    @classmethod
    def create(cls, path: str, k: int, tensors: dict[str, tuple[int, int]], attrs: dict, keep: bool) -> "SavedMasks":
        """``tensors`` maps name -> (numel, elements per chunk); with ``keep`` an existing store of
        the same fingerprint is reopened (a resume; its chunks are verified by CRC)."""
        if keep:
            try:
                g = zarr.open_group(path, mode="r+")
                if g.attrs.get("fingerprint") == attrs.get("fingerprint"):
                    return cls(path)
            except Exception:  # noqa: BLE001 - unreadable: recreated, and every chunk redone
                pass
        shutil.rmtree(path, ignore_errors=True)
        g = zarr.open_group(path, mode="w")
        for name, (numel, chunk) in tensors.items():
            g.create_array(name, shape=(k, -(-numel // 8)), chunks=(k, max(chunk // 8, 1)), dtype="uint8",
                           fill_value=0)
        g.attrs.update(attrs)  # fingerprint last
        return cls(path)

    def write(self, tensor: str, start: int, masks: np.ndarray) -> None:
        cast(zarr.Array, self.group()[tensor])[:, start // 8: start // 8 + masks.shape[1]] = masks

    def read(self, tensor: str, start: int, nbytes: int) -> np.ndarray:
        return np.ascontiguousarray(cast(zarr.Array, self.group()[tensor])[:, start // 8: start // 8 + nbytes])

"""Zarr v3 stores of a run: the resume record, and the optional bit-packed masks.

- ``WorkState`` (``state.zarr`` in the work folder): ``stats`` holds one row of counts per
  chunk, written after the chunk's bytes are in the output file; a row that is present marks
  the chunk complete. ``attrs['fingerprint']`` names the configuration and inputs the state
  belongs to; a state with another fingerprint is discarded, so two configurations never mix.
- ``MaskStore``: one array per merged tensor, shape (k, ceil(numel / 8)) uint8, chunked like
  the merge, bit j of byte j // 8 (little-endian bit order) = element j kept by model i.
  With ``--save-masks`` it is written as ``cabs_masks.zarr`` inside the output folder.

Both open their Zarr group lazily in each process that writes to them; nothing is cached
beyond the object, which belongs to one run.
"""

from __future__ import annotations

import shutil
import threading

import numpy as np
import zarr

from ..report.counts import width as stats_width

MASKS_NAME = "cabs_masks.zarr"


class _LazyGroup:
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

    def __getstate__(self) -> dict:  # a process opens its own handle
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


class WorkState(_LazyGroup):
    """The per-chunk completion record of one run."""

    @classmethod
    def open(cls, path: str, fingerprint: str, n_chunks: int, k: int) -> tuple["WorkState", np.ndarray]:
        """Reopen the state of ``fingerprint``, or create it afresh. Returns the state and
        the rows recorded so far (row[0] < 0: chunk not done)."""
        g = None
        try:
            g = zarr.open_group(path, mode="r+")
            if g.attrs.get("fingerprint") != fingerprint:
                g = None
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError):
            g = None
        if g is None:
            shutil.rmtree(path, ignore_errors=True)
            g = zarr.open_group(path, mode="w")
            g.create_array("stats", shape=(max(n_chunks, 1), stats_width(k)), chunks=(1, stats_width(k)),
                           dtype="int64", fill_value=-1, compressors=None)
            g.attrs["fingerprint"] = fingerprint  # written last: a state without it is incomplete
        rows = g["stats"][:] if n_chunks else np.zeros((0, stats_width(k)), np.int64)
        return cls(path), rows

    def record(self, index: int, stats: np.ndarray) -> None:
        self.group()["stats"][index] = stats


class MaskStore(_LazyGroup):
    """Bit-packed masks per tensor (for ``--save-masks`` and ``analyze``)."""

    @classmethod
    def create(cls, path: str, k: int, tensors: dict[str, tuple[int, int]], attrs: dict) -> "MaskStore":
        """``tensors`` maps name -> (numel, elements per chunk); reopened as is when complete."""
        try:
            g = zarr.open_group(path, mode="r+")
            if g.attrs.get("fingerprint") == attrs.get("fingerprint"):
                return cls(path)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError):
            pass
        shutil.rmtree(path, ignore_errors=True)
        g = zarr.open_group(path, mode="w")
        for name, (numel, chunk) in tensors.items():
            g.create_array(name, shape=(k, -(-numel // 8)), chunks=(k, max(chunk // 8, 1)), dtype="uint8",
                           fill_value=0)
        g.attrs.update(attrs)  # fingerprint last
        return cls(path)

    def write(self, tensor: str, start: int, masks: np.ndarray) -> None:
        self.group()[tensor][:, start // 8: start // 8 + masks.shape[1]] = masks

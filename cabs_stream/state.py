"""The merge's working state, a Zarr v3 store beside the partial output.

- ``stats``: one row of counts per chunk, written after the chunk's bytes are in the output
  file; a row that is present marks the chunk complete (the resume record).
- ``masks/<tensor>``: optional bit-packed masks, shape (k, ceil(numel / 8)), chunked like the
  merge, bit j of byte j // 8 (little-endian bit order) = element j kept.
- ``attrs['fingerprint']``: the configuration and inputs the state belongs to; a state with a
  different fingerprint is discarded, so two configurations never mix.
"""

from __future__ import annotations

import shutil
import threading

import zarr

from .stats import width as stats_width

_open: dict[str, zarr.Group] = {}
_lock = threading.Lock()


def create(path: str, fingerprint: str, n_chunks: int, k: int,
           masks: dict[str, tuple[int, int]] | None) -> zarr.Group:
    """(Re)create the state, or reopen it if it belongs to the same fingerprint.

    ``masks`` maps tensor name -> (numel, chunk elements) for the mask arrays to keep.
    """
    try:
        g = zarr.open_group(path, mode="r+")
        if g.attrs.get("fingerprint") == fingerprint:
            return g
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError):
        pass
    shutil.rmtree(path, ignore_errors=True)
    g = zarr.open_group(path, mode="w")
    g.create_array("stats", shape=(max(n_chunks, 1), stats_width(k)), chunks=(1, stats_width(k)),
                   dtype="int64", fill_value=-1, compressors=None)
    if masks:
        mg = g.require_group("masks")
        for name, (numel, chunk) in masks.items():
            mg.create_array(name, shape=(k, -(-numel // 8)), chunks=(k, chunk // 8), dtype="uint8",
                            fill_value=0)
    g.attrs["fingerprint"] = fingerprint  # written last: a state without it is incomplete
    return g


def group(path: str) -> zarr.Group:
    """The state group, opened once per process."""
    g = _open.get(path)
    if g is None:
        with _lock:
            g = _open.setdefault(path, zarr.open_group(path, mode="r+"))
    return g


def forget(path: str) -> None:
    _open.pop(path, None)

"""The task-vector store: pruned task vectors kept once, merged again for any lambda.

A Zarr v3 group (``STORE.zarr``), one subgroup per merged tensor:

- ``<tensor>/mask``: uint8 (k, ceil(numel / 8)), bit j of byte j // 8 (little-endian) = element j
  kept by model i (the masks the method chose; they do not depend on lambda);
- n:m methods (cabs, bs_only), compact: ``<tensor>/values_<i>``: uint16 raw words of model i's
  own weights at its kept positions, n per group of m in position order (a group keeping fewer
  is padded with zeros): n/m of the model's bytes, 0.5 bytes per parameter at 64:256 in bf16;
- other methods: ``<tensor>/values``: float32 (k, numel), the kept task-vector entries (after
  DELLA's 1/p; DARE's 1/density is applied at merge time), 0 elsewhere, zstd-compressed.

``chunk_counts`` (one row per chunk, written as chunks finish, for resume) and ``counts`` (the
same rows in one chunk, written once the prune is complete) hold the lambda-independent counts
of the report. Chunks are those of the merge that wrote it (multiples of m). ``attrs`` hold the
recipe (the configuration, without the weights that a later merge gives), the layout, and the
identity of the base and every input, checked before a merge from the store. A complete store
has every array's metadata consolidated into the root ``zarr.json``
(``zarr.consolidate_metadata``), so zarr opens them all with one read.
"""

from __future__ import annotations

import math
import mmap
import os
import warnings
from typing import TYPE_CHECKING, Any, Protocol, Sequence, cast

import numpy as np
import zarr
from numba import njit

from ..dtypes import ITEMSIZE
from ..errors import ConfigError
from ..stats import width as counts_width
from .checksum import combine, crc
from .workstate import LazyGroup

if TYPE_CHECKING:
    from zarr.core.metadata import ArrayV3Metadata

FORMAT = "cabs-stream task-vector store 1"


class HasDtype(Protocol):
    @property
    def dtype(self) -> str: ...


class StoredTensor(Protocol):
    """What the store needs of a tensor (``layout.TensorJob`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def numel(self) -> int: ...

    @property
    def chunk(self) -> int: ...

    @property
    def fts(self) -> Sequence[HasDtype]: ...


@njit(nogil=True, cache=True)
def pack_nm(words, wpv, mask, count, m, n, out):
    """Copy the raw words (``wpv`` per value) of the kept elements of each group of m into
    ``out``, n values per group in position order, zero-padded."""
    for g in range((count + m - 1) // m):
        o = g * n * wpv
        got = 0
        for j in range(g * m, min(count, (g + 1) * m)):
            if (mask[j >> 3] >> (j & 7)) & 1:
                for w in range(wpv):
                    out[o + got * wpv + w] = words[j * wpv + w]
                got += 1
        for x in range(got * wpv, n * wpv):
            out[o + x] = 0


class TaskVectorStore(LazyGroup):
    """Writes (during prune) and reads (during merge --from) one store."""

    def __init__(self, path: str, nm: tuple[tuple[int, ...], int] | None = None) -> None:
        super().__init__(path)
        self.nm = nm  # (n per model, m) for the compact layout, else None
        self._arrays: dict[tuple[str, ...], zarr.Array] = {}

    def array(self, tensor: str, name: str) -> zarr.Array:
        """An array of the store, opened once per run and process (its metadata read once)."""
        key = (tensor, name)
        arr = self._arrays.get(key)
        if arr is None:
            g = self.group()
            with self._lock:
                if not self._arrays:  # all of them at once: one concurrent metadata pass, not one per chunk
                    self._arrays.update({tuple(p.split("/")): a for p, a in g.members(max_depth=None)
                                         if isinstance(a, zarr.Array) and p.count("/") == 1})
            arr = self._arrays.get(key)
            if arr is None:
                arr = self._arrays[key] = cast(zarr.Array, cast(zarr.Group, g[tensor])[name])
        return arr

    def __getstate__(self) -> dict:
        d = super().__getstate__()
        d.pop("_arrays", None)
        d.pop("_counts", None)
        return d

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._arrays = {}

    @classmethod
    def create(cls, path: str, tensors: Sequence[StoredTensor], n_chunks: int, k: int, attrs: dict,
               nm: tuple[tuple[int, ...], int] | None, keep: bool) -> "TaskVectorStore":
        """Create the arrays of ``tensors`` (those merged) for ``n_chunks`` chunks of ``k``
        models (or reopen them when resuming the same run)."""
        if keep:
            try:
                g = zarr.open_group(path, mode="r+")
                if g.attrs.get("fingerprint") == attrs["fingerprint"]:
                    return cls(path, nm)
            except Exception:  # noqa: BLE001 - unreadable: recreated, every chunk redone
                pass
        g = zarr.open_group(path, mode="w")
        width = counts_width(k)
        g.create_array("chunk_counts", shape=(max(n_chunks, 1), width), chunks=(1, width), dtype="int64",
                       fill_value=-1, compressors=None)
        for t in tensors:
            tg = g.create_group(t.name)
            nbytes = -(-t.numel // 8)
            tg.create_array("mask", shape=(k, nbytes), chunks=(k, max(min(t.chunk // 8, nbytes), 1)), dtype="uint8",
                            fill_value=0, compressors=None)
            if nm is None:
                tg.create_array("values", shape=(k, t.numel), chunks=(k, max(min(t.chunk, t.numel), 1)),
                                dtype="float32", fill_value=0.0)
            else:
                ns, m = nm
                for i, f in enumerate(t.fts):
                    n, wpv = ns[i], ITEMSIZE[f.dtype] // 2
                    size = -(-t.numel // m) * n * wpv
                    per_chunk = -(-t.chunk // m) * n * wpv
                    tg.create_array(f"values_{i}", shape=(size,), chunks=(max(min(per_chunk, size), 1),),
                                    dtype="uint16", fill_value=0, compressors=None)
        g.attrs.update(attrs)  # fingerprint last: a store without it is incomplete
        return cls(path, nm)

    # ------------------------------------------------------------------ writing (prune)
    def write_counts(self, index: int, row: np.ndarray) -> None:
        """A chunk's counts (kept, overlap, balance): lambda-independent, reused by every point."""
        cast(zarr.Array, self.group()["chunk_counts"])[index] = row

    def finish(self, rows: list[np.ndarray]) -> None:
        """Once the prune is complete: every chunk's counts in one array of one chunk
        (``counts``), and the metadata of every array consolidated into the root's
        ``zarr.json``, so a merge from the store reads one file for each, not one per chunk
        (counts) or three per tensor (metadata)."""
        table = np.asarray(rows, np.int64)
        counts = self.group().create_array("counts", shape=table.shape, chunks=table.shape, dtype="int64",
                                           overwrite=True)
        counts[:] = table
        with warnings.catch_warnings():  # "not part of the Zarr v3 specification": a reader
            warnings.simplefilter("ignore")  # without it reads each array's own zarr.json
            zarr.consolidate_metadata(self.path)

    def known_counts(self, n_chunks: int) -> np.ndarray | None:
        """The counts of every chunk as pruned (None if they do not cover ``n_chunks``)."""
        g = self.group()
        with self._lock:  # read once per run, by the first chunk that asks
            if getattr(self, "_counts", None) is None:
                try:
                    self._counts = np.asarray(cast(zarr.Array, g["counts"])[:] if "counts" in g
                                              else cast(zarr.Array, g["chunk_counts"])[:], np.int64)
                except KeyError:
                    return None
        c = self._counts
        return c if c.shape[0] == n_chunks and (c[:, 0] >= 0).all() else None

    def write_nm(self, tensor: StoredTensor, start: int, fts: tuple[np.ndarray, ...], masks: np.ndarray) -> int:
        """Compact layout: pack each model's kept raw words; returns the CRC of what was written."""
        assert self.nm is not None
        ns, m = self.nm
        count = self._count(tensor, start)
        self.array(tensor.name, "mask")[:, start // 8: start // 8 + masks.shape[1]] = masks
        packed = []
        for i, (words, f) in enumerate(zip(fts, tensor.fts)):
            n, wpv = ns[i], ITEMSIZE[f.dtype] // 2
            out = np.empty(-(-count // m) * n * wpv, np.uint16)
            pack_nm(words, wpv, masks[i], count, m, n, out)
            o = start // m * n * wpv
            self.array(tensor.name, f"values_{i}")[o:o + len(out)] = out
            packed.append(out)
        return self._crc(masks, packed)

    def write_dense(self, tensor: StoredTensor, start: int, vals: np.ndarray, keep: np.ndarray,
                    masks: np.ndarray) -> int:
        """Dense layout: kept values (float32), 0 elsewhere; returns the CRC of what was written."""
        dense = np.where(keep.astype(bool), vals, np.float32(0)).astype(np.float32)
        self.array(tensor.name, "mask")[:, start // 8: start // 8 + masks.shape[1]] = masks
        self.array(tensor.name, "values")[:, start:start + dense.shape[1]] = dense
        return self._crc(masks, [dense])

    def _crc(self, masks: np.ndarray, values: list[np.ndarray]) -> int:
        """The CRC of a chunk's record in the store (when written, and when verified)."""
        if self.nm is None:
            return crc(masks) ^ crc(values[0])
        return combine(crc(masks), values)

    def _count(self, tensor: StoredTensor, start: int) -> int:
        return min(tensor.chunk, tensor.numel - start)

    # ------------------------------------------------------------------ reading (merge --from)
    def _files(self, tensor: str, name: str, start: int, stop: int) -> tuple[Any, list[tuple[int, int, int, str]]]:
        """The array and, when it is uncompressed little-endian raw words with full leading
        chunks, the chunk files holding ``[..., start:stop]`` as (chunk, a, b, path) (else [])."""
        arr = self.array(tensor, name)
        endian = getattr(arr.serializer, "endian", None)
        little = endian is None or str(getattr(endian, "value", endian)) == "little"
        encoding = cast("ArrayV3Metadata", arr.metadata).chunk_key_encoding  # the store is always Zarr v3
        lead = arr.shape[:-1]
        if (arr.compressors or arr.filters or not little or getattr(encoding, "separator", None) != "/"
                or (lead and arr.chunks[:-1] != lead)):
            return arr, []
        width = arr.chunks[-1]
        folder = os.path.join(self.path, tensor, name)
        return arr, [(c, max(start, c * width), min(stop, (c + 1) * width),
                      os.path.join(folder, *encoding.encode_chunk_key((*(0 for _ in lead), c)).split("/")))
                     for c in range(start // width, -(-stop // width))]

    def _slice(self, tensor: str, name: str, start: int, stop: int, scratch: Any = None) -> np.ndarray:
        """``array[..., start:stop]``. An uncompressed array (the masks and the compact values) is
        read straight from its chunk files, which hold the raw little-endian words in C order,
        into a buffer of ``scratch`` (the run's per-thread buffers) when given: one read per
        chunk file instead of a pass through Zarr's event loop; others via Zarr."""
        arr, files = self._files(tensor, name, start, stop)
        if not files:
            return np.ascontiguousarray(arr[..., start:stop])
        lead, width, dtype = arr.shape[:-1], arr.chunks[-1], arr.dtype
        if len(files) == 1 and (not lead or (start, stop) == (files[0][0] * width, (files[0][0] + 1) * width)):
            view = self._mapped(files[0][3], dtype, (*lead, width))  # one chunk file: no copy at all
            if view is not None:
                c = files[0][0]
                return view[..., start - c * width:stop - c * width]
        shape = (*lead, stop - start)
        out = scratch(f"store:{name}", shape, dtype) if scratch is not None else np.empty(shape, dtype)
        for c, a, b, path in files:
            try:
                with open(path, "rb") as f:
                    if not lead or (a, b) == (c * width, (c + 1) * width) == (start, stop):
                        # contiguous in the file and in ``out``: read in place
                        f.seek((a - c * width) * dtype.itemsize)
                        target = out[..., a - start:b - start].data.cast("B")  # .data is memoryview(array)
                        if f.readinto(target) != target.nbytes:
                            raise ConfigError(f"task-vector store {self.path}: {path} is truncated; prune again")
                        continue
                    block = np.frombuffer(f.read(), dtype)
            except FileNotFoundError:  # never written: the fill value
                out[..., a - start:b - start] = arr.fill_value
                continue
            out[..., a - start:b - start] = block.reshape(*lead, width)[..., a - c * width:b - c * width]
        return out

    def _mapped(self, path: str, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray | None:
        """A read-only view of a whole chunk file through a memory map (unmapped with the view),
        or None when it is missing (fill value) or cannot be mapped."""
        try:
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None
        if len(mm) < math.prod(shape) * dtype.itemsize:
            mm.close()
            raise ConfigError(f"task-vector store {self.path}: {path} is truncated; prune again")
        return np.frombuffer(mm, dtype, math.prod(shape)).reshape(shape)

    def _arrays_of(self, start: int, count: int, k: int, wpv: list[int]) -> list[tuple[str, int, int]]:
        """(array, start, stop) of each array a chunk of elements [start, start + count) reads."""
        out = [("mask", start // 8, start // 8 + -(-count // 8))]
        if self.nm is None:
            return out + [("values", start, start + count)]
        ns, m = self.nm
        return out + [(f"values_{i}", start // m * ns[i] * wpv[i], (start // m + -(-count // m)) * ns[i] * wpv[i])
                      for i in range(k)]

    def read(self, name: str, start: int, count: int, k: int, wpv: list[int], scratch: Any = None) \
            -> tuple[np.ndarray, list[np.ndarray]]:
        """(packed masks (k, ceil(count/8)), values): the compact raw words per model, or the
        dense float32 (k, count) block as a one-element list; in buffers of ``scratch`` if given."""
        (_, a, b), *values = self._arrays_of(start, count, k, wpv)
        masks = self._slice(name, "mask", a, b, scratch)
        if self.nm is None:
            return masks, [np.ascontiguousarray(self.array(name, "values")[:, start:start + count])]
        # read-only, as the mapped chunk files are: a chunk never written (all zeros) read into a
        # buffer beside a mapped one would give the kernels a tuple of two array types
        return masks, [_read_only(self._slice(name, array, a, b, scratch)) for array, a, b in values]

    def written_crc(self, tensor: StoredTensor, start: int, k: int) -> int:
        """The CRC of a chunk as stored (resume verification)."""
        count = self._count(tensor, start)
        masks, vals = self.read(tensor.name, start, count, k, [ITEMSIZE[f.dtype] // 2 for f in tensor.fts])
        return self._crc(masks, vals)


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def open_store(path: str) -> tuple[TaskVectorStore, dict]:
    """Open a finished store for reading; returns it and its attributes."""
    if not os.path.isdir(path):
        raise ConfigError(f"task-vector store {path} does not exist (write one with `cabs-stream prune`)")
    try:
        g = zarr.open_group(path, mode="r")
        attrs: dict[str, Any] = dict(g.attrs)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{path} is not a readable task-vector store ({type(e).__name__})") from None
    if attrs.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a cabs-stream task-vector store (format {attrs.get('format')!r})")
    nm = None
    if attrs.get("nm"):
        ns, m = attrs["nm"]
        nm = (tuple(ns) if isinstance(ns, list) else (ns,) * len(attrs["config"]["models"]), m)
    return TaskVectorStore(path, nm), attrs

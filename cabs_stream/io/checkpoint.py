"""Opening checkpoints: Hugging Face folders, sharded or not, and single safetensors files.

A ``Checkpoint`` knows where every tensor lives (file, byte offset, dtype, shape); the data
itself is read through the run's memory maps (``inputs.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from . import torch_bin
from ..errors import CheckpointError
from .safetensors_format import TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass
class Checkpoint:
    """One model: its label (the path the user gave), folder, files and tensors by name."""

    label: str
    root: str  # folder holding config/tokenizer files ("" for a bare file)
    files: list[str]
    tensors: dict[str, TensorInfo] = field(repr=False)


def open_checkpoint(path: str, convert_dir: str | None = None) -> Checkpoint:
    """Resolve ``path`` (a folder, a ``.safetensors`` file or a PyTorch ``.bin``) and parse
    every header. ``.bin`` checkpoints are converted into ``convert_dir`` first (torch_bin.py)."""
    label = str(path)
    path = os.path.abspath(path)
    has_safetensors = os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path))
    bins = None if has_safetensors else torch_bin.bin_files(path)
    if bins:
        if convert_dir is None:
            raise CheckpointError("PyTorch .bin checkpoint: merge it through cabs_stream.merge, which converts it",
                                  model=label, file=bins[0])
        converted = open_checkpoint(torch_bin.convert(label, bins, convert_dir))
        return Checkpoint(label, path if os.path.isdir(path) else "", converted.files, converted.tensors)
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise CheckpointError("not a .safetensors file (give a Hugging Face folder or a .safetensors file)",
                                  model=label, file=path)
        tensors, _ = read_header(path, label)
        return Checkpoint(label, "", [path], tensors)
    if not os.path.isdir(path):
        raise CheckpointError("no such file or folder", model=label)

    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        return _open_indexed(label, path, index)
    single = os.path.join(path, SINGLE_NAME)
    files = [single] if os.path.exists(single) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError("no safetensors weights found (expected model.safetensors or "
                              f"{INDEX_NAME} with shards)", model=label, file=path)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f, label)[0].items():
            if name in tensors:
                raise CheckpointError(f"tensor appears in two files ({tensors[name].file} and {f})",
                                      model=label, file=f, tensor=name)
            tensors[name] = info
    return Checkpoint(label, path, files, tensors)


def _open_indexed(label: str, root: str, index: str) -> Checkpoint:
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError("index is not valid JSON with a 'weight_map' of tensor -> shard",
                              model=label, file=index) from None
    shards = sorted(set(weight_map.values()))
    headers = {}
    for shard in shards:
        p = os.path.join(root, shard)
        if os.path.basename(shard) != shard or not os.path.isfile(p):
            missing = [n for n, s in weight_map.items() if s == shard][:1]
            raise CheckpointError(f"index points to missing shard {shard!r}", model=label, file=index,
                                  tensor=missing[0] if missing else None)
        headers[shard] = read_header(p, label)[0]
    tensors: dict[str, TensorInfo] = {}
    for name, shard in weight_map.items():
        if name not in headers[shard]:
            raise CheckpointError(f"index places this tensor in {shard!r} but that shard lacks it",
                                  model=label, file=index, tensor=name)
        tensors[name] = headers[shard][name]
    return Checkpoint(label, root, [os.path.join(root, s) for s in shards], tensors)

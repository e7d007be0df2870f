"""Opening checkpoints: Hugging Face folders, sharded or not, and single safetensors files.

A ``Checkpoint`` knows where every tensor lives (file, byte offset, dtype, shape); the data
itself is read through the run's memory maps (``inputs.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

from . import hub, torch_bin
from ..errors import CheckpointError
from .model_files import load_json, regular_file, shard_names
from .safetensors_format import TensorInfo, read_header

if TYPE_CHECKING:  # pragma: no cover
    from .inputs import Computed

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass
class Checkpoint:
    """One model: its label (the path the user gave), folder, files and tensors by name (a
    LoRA model's are partly ``inputs.Computed``: computed chunk by chunk)."""

    label: str
    root: str  # folder holding config/tokenizer files ("" for a bare file)
    files: list[str]  # every file the model's identity covers (an adapter's config and weights too)
    tensors: Mapping[str, "TensorInfo | Computed"] = field(repr=False)


def open_checkpoint(path: str, convert_dir: str | None = None) -> Checkpoint:
    """Resolve ``path`` (a folder, a ``.safetensors`` file or a PyTorch ``.bin``) and parse
    every header. ``.bin`` checkpoints are converted into ``convert_dir`` first (torch_bin.py)."""
    label = str(path)
    path = os.path.abspath(hub.local_path(label))
    if os.path.exists(path) and not (os.path.isdir(path) or os.path.isfile(path)):
        regular_file(path, label)
    has_safetensors = os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path))
    bins = None if has_safetensors else torch_bin.bin_files(path, label)
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
        header, _ = read_header(path, label)
        return Checkpoint(label, "", [path], header)
    if not os.path.isdir(path):
        raise CheckpointError("no such file or folder", model=label)

    config = os.path.join(path, "config.json")
    if os.path.lexists(config) and not isinstance(load_json(config, label, "config.json"), dict):
        raise CheckpointError("config.json is not a JSON object", model=label, file=config)
    index = os.path.join(path, INDEX_NAME)
    if os.path.lexists(index):
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
    doc = load_json(index, label, "index")
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    shards = shard_names(weight_map, label, index)
    assert isinstance(weight_map, dict)  # shard_names raised otherwise
    headers = {}
    for shard in shards:
        p = os.path.join(root, shard)
        if not os.path.lexists(p):
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

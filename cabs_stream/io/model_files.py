"""The small files of a model folder (index, config), read safely: regular files only, a size
cap, UTF-8 JSON, shard names that stay inside the folder. Errors name the model and the file."""

from __future__ import annotations

import json
import os
import stat

from ..errors import CheckpointError

MAX_JSON_BYTES = 64 << 20  # index and config files larger than this are refused


def regular_file(path: str, label: str) -> None:
    """Refuse anything but a regular file (a FIFO or device would block or never end)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror}", model=label, file=path) from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError("not a regular file (a FIFO, device or folder where a file is expected)",
                              model=label, file=path)


def load_json(path: str, label: str, what: str) -> object:
    """A small JSON file of a checkpoint, read safely: regular file, size cap, UTF-8 JSON."""
    regular_file(path, label)
    if os.path.getsize(path) > MAX_JSON_BYTES:
        raise CheckpointError(f"{what} is larger than {MAX_JSON_BYTES >> 20} MiB", model=label, file=path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{what} is not valid JSON ({str(e).splitlines()[0][:120]})", model=label,
                              file=path) from None


def config_value(folder: str, key: str) -> object:
    """A top-level value of a model folder's config.json (None without one; open_checkpoint
    has already refused a config.json that is not a JSON object)."""
    path = os.path.join(folder, "config.json")
    if not folder or not os.path.isfile(path):
        return None
    doc = load_json(path, folder, "config.json")
    return doc.get(key) if isinstance(doc, dict) else None


def shard_names(weight_map: object, label: str, index: str) -> list[str]:
    """The shard files of an index's ``weight_map`` (tensor -> file in the same folder)."""
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError("index needs a 'weight_map' object of tensor name -> shard file", model=label,
                              file=index)
    if not weight_map:
        raise CheckpointError("index lists no tensors (empty weight_map)", model=label, file=index)
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"index points outside its folder: {shard!r}", model=label, file=index)
    return shards

"""PyTorch ``.bin`` checkpoints, read safely and converted to safetensors once.

Pickles can run code, so ``.bin`` files are opened only with
``torch.load(weights_only=True, mmap=True)``: anything but tensors is refused. Each file is
rewritten tensor by tensor as a safetensors file in the merge's work folder, after which the
merge reads it like any other checkpoint. torch is needed only here.
"""

from __future__ import annotations

import hashlib
import os

from ..errors import CheckpointError
from .model_files import load_json, regular_file, shard_names
from .safetensors_format import build_header

BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SUFFIXES = (".bin", ".pt", ".pth")


def bin_files(path: str, label: str) -> list[str] | None:
    """The .bin files of a checkpoint, or None if it is not a .bin checkpoint."""
    if os.path.isfile(path):
        return [path] if path.endswith(BIN_SUFFIXES) else None
    index = os.path.join(path, BIN_INDEX)
    files: list[str] | None
    if os.path.lexists(index):
        doc = load_json(index, label, "index")
        files = [os.path.join(path, s) for s in shard_names(doc.get("weight_map") if isinstance(doc, dict) else None,
                                                            label, index)]
    else:
        single = os.path.join(path, "pytorch_model.bin")
        files = [single] if os.path.lexists(single) else None
    for f in files or ():
        if not os.path.lexists(f):
            raise CheckpointError("index points to a missing file", model=label, file=f)
        regular_file(f, label)
    return files


def convert(label: str, files: list[str], dest_root: str) -> str:
    """Write the tensors of ``files`` into ``dest_root/<hash>/`` as safetensors; return that folder."""
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading .bin checkpoints needs torch (pip install torch==2.13.0); "
                              "safetensors checkpoints do not", model=label, file=files[0]) from None
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}
    key = hashlib.sha256("\0".join(f"{f}:{os.stat(f).st_mtime_ns}" for f in files).encode()).hexdigest()[:16]
    dest = os.path.join(dest_root, key)
    os.makedirs(dest, exist_ok=True)
    for n, f in enumerate(files):
        target = os.path.join(dest, f"model-{n + 1:05d}.safetensors")
        if os.path.exists(target):
            continue
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # UnpicklingError for code, RuntimeError for damaged zips
            raise CheckpointError(f"refused to load with torch.load(weights_only=True): {str(e).splitlines()[0]}",
                                  model=label, file=f) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError("expected a dict of tensors (a state_dict)", model=label, file=f)
        for name, t in state.items():
            if t.dtype not in names:
                raise CheckpointError(f"unsupported dtype {t.dtype}", model=label, file=f, tensor=name)
        header, _ = build_header([(k, names[t.dtype], tuple(t.shape)) for k, t in state.items()], {"format": "pt"})
        tmp = target + ".tmp"
        with open(tmp, "wb") as out:
            out.write(header)
            for t in state.values():
                out.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        os.replace(tmp, target)
    return dest

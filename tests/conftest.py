"""Shared helpers: small checkpoints written with the official safetensors library."""

from __future__ import annotations

import contextlib
import glob
import json
import os

import numpy as np
import pytest
import torch
from hypothesis import settings

# The suite draws the same examples on every run (a red CI is a real bug, never luck of the
# draw); `--hypothesis-profile=explore` draws new ones.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
from safetensors.torch import load_file, save_file


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never reaches for the network
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def to_torch(values: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype in TORCH_DTYPES:
        return torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(TORCH_DTYPES[dtype])
    return torch.from_numpy(np.ascontiguousarray(values))


def write_model(path: str, tensors: dict[str, tuple[np.ndarray, str]], shards: int = 1,
                config: dict | None = None) -> str:
    """Write a Hugging Face folder; ``tensors`` maps name -> (values, safetensors dtype or 'int')."""
    os.makedirs(path, exist_ok=True)
    items = {n: to_torch(v, d) for n, (v, d) in tensors.items()}
    names = list(items)
    if shards == 1:
        save_file(items, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s in range(shards):
            part = names[s::shards]
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: items[n] for n in part}, os.path.join(path, fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config or {"model_type": "test"}, f)
    return path


def load_model(path: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def as_f32(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float32).numpy().ravel()


@pytest.fixture
def family(tmp_path):
    """A small mixed-dtype family: bf16 base in 2 shards + index, ft1 fp32, ft2 bf16, ft3 fp16.

    Values are quantized so that ties are common; some task-vector entries are exactly zero,
    one tensor is frozen, one has a tail (numel not a multiple of m), and an integer buffer rides along.
    """
    rng = np.random.default_rng(7)
    shapes = {"embed.weight": (40, 24), "layer.0.w": (24, 24), "layer.0.norm": (24,),
              "layer.1.w": (13, 17), "frozen.w": (8, 32), "head.weight": (40, 24)}
    base = {n: np.round(rng.standard_normal(s) * 8) / 64 for n, s in shapes.items()}
    dtypes = ["F32", "BF16", "F16"]
    paths = {}
    write_model(str(tmp_path / "base"),
                {**{n: (v, "BF16") for n, v in base.items()},
                 "buffer.position_ids": (np.arange(10, dtype=np.int64), "int")},
                shards=2, config={"model_type": "test", "torch_dtype": "bfloat16"})
    with open(tmp_path / "base" / "tokenizer.json", "w") as f:
        f.write('{"version": "1.0"}')
    for i, dt in enumerate(dtypes):
        ft = {}
        for n, v in base.items():
            delta = np.round(rng.standard_normal(v.shape) * 4) / 128
            delta[rng.random(v.shape) < 0.3] = 0
            ft[n] = (v if n == "frozen.w" else v + delta, dt)
        paths[f"ft{i + 1}"] = write_model(str(tmp_path / f"ft{i + 1}"), ft)
    paths["base"] = str(tmp_path / "base")
    return paths


_TORCH_TO_ST = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def rewrite_model(path: str, changes: dict[str, tuple[np.ndarray, str] | None]) -> None:
    """Rewrite a folder as one model.safetensors with some tensors replaced (None = removed)."""
    current = load_model(path)
    tensors = {n: (t.to(torch.float32).numpy() if t.is_floating_point() else t.numpy(),
                   _TORCH_TO_ST.get(t.dtype, "int")) for n, t in current.items()}
    for n, v in changes.items():
        if v is None:
            tensors.pop(n)
        else:
            tensors[n] = v
    for f in os.listdir(path):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(path, f))
    config = json.load(open(os.path.join(path, "config.json")))
    write_model(path, tensors, config=config)


def work_folder(out) -> str:
    """The private work folder of a merge into ``out`` (as this user)."""
    from cabs_stream.io.output import work_dir
    return work_dir(str(out))


def no_work_folder(parent) -> bool:
    """No work folder of any output is left in ``parent``."""
    return not [p for p in os.listdir(parent) if ".cabs-partial" in p]


def shard_bytes(out: str) -> dict[str, str]:
    """sha256 of every safetensors shard of a folder, by file name."""
    import hashlib
    return {f: hashlib.sha256(open(os.path.join(out, f), "rb").read()).hexdigest()
            for f in sorted(os.listdir(out)) if f.endswith(".safetensors")}


def digest_folder(path: str) -> dict[str, str]:
    import hashlib
    return {os.path.join(r, f): hashlib.sha256(open(os.path.join(r, f), "rb").read()).hexdigest()
            for r, _, fs in os.walk(path) for f in fs}


@pytest.fixture
def inputs_unchanged(family):
    """Hash every input file before the test and check none changed after it."""
    before = {k: digest_folder(v) for k, v in family.items()}
    yield
    assert {k: digest_folder(v) for k, v in family.items()} == before, "an input was modified"


@contextlib.contextmanager
def killed_after(chunks: int):
    """Within the block, a run stops (KeyboardInterrupt, as Ctrl-C or a kill would) after
    ``chunks`` chunk tasks; run it with scheduler="synchronous" for a deterministic cut."""
    from cabs_stream.run import tasks
    real, done = tasks.merge_chunk, []

    def stop(*args):
        if len(done) >= chunks:
            raise KeyboardInterrupt
        done.append(1)
        return real(*args)

    tasks.merge_chunk = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        tasks.merge_chunk = real


@pytest.fixture
def small_shards(monkeypatch):
    """Lower the 1 MB shard floor so that the tiny test models still span several shards."""
    from cabs_stream import plan

    monkeypatch.setattr(plan, "MIN_SHARD_BYTES", 1)

"""Generate a synthetic model family (a base and K fine-tuned models) of any Llama-like shape.

usage: python benchmarks/generate_family.py --shape 1.1b --models 2 --out /work/bench-data/1.1b-k2
       python benchmarks/generate_family.py --hidden 1024 --layers 8 --intermediate 2816 --out DIR

Writes ``OUT/base`` and ``OUT/ft1..ftK`` (Hugging Face folders of sharded safetensors) with
``cabs_stream.synthetic.generate_family``, which produces the tensors block by block: memory
stays around a hundred MB whatever the shape. ``OUT/family.json`` records what was made; an
existing complete family with the same description is kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import sys
import time

from cabs_stream.synthetic import SHAPES, LlamaShape, generate_family

FIELDS = ("hidden", "layers", "intermediate", "vocab", "heads", "kv_heads")
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}


def family_spec(shape: LlamaShape, k: int, dtype: str, seed: int) -> dict:
    """The JSON description of a family (also used to decide whether it must be regenerated)."""
    per = shape.params * ITEMSIZE[dtype]
    return {"shape": dataclasses.asdict(shape), "params": shape.params, "models": k, "dtype": dtype,
            "seed": seed, "bytes_per_checkpoint": per}


def is_complete(out: str, spec: dict) -> bool:
    """True when ``out`` holds a finished family described by ``spec``."""
    try:
        with open(os.path.join(out, "family.json"), encoding="utf-8") as f:
            have = json.load(f)
    except (OSError, ValueError):
        return False
    return {key: have.get(key) for key in spec} == spec


def make_family(out: str, shape: LlamaShape, k: int, dtype: str = "BF16", seed: int = 0,
                shard_size: int = 2_000_000_000, force: bool = False, log=print) -> dict:
    """Generate (or reuse) a family at ``out``; returns its description."""
    spec = family_spec(shape, k, dtype, seed)
    if not force and is_complete(out, spec):
        log(f"{out}: already complete ({shape.params / 1e9:.2f} B parameters, k={k}), kept")
        return spec
    need = spec["bytes_per_checkpoint"] * (k + 1)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(out)) or ".").free
    if need > free:
        raise SystemExit(f"not enough disk: {need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    t0 = time.monotonic()
    generate_family(out, shape, k=k, dtype=dtype, seed=seed, shard_size=shard_size)
    os.sync()
    spec_written = dict(spec, generate_seconds=round(time.monotonic() - t0, 1))
    with open(os.path.join(out, "family.json"), "w", encoding="utf-8") as f:
        json.dump(spec_written, f, indent=2)  # written last: its presence marks a complete family
    log(f"{out}: {shape.params / 1e9:.2f} B parameters x {k + 1} checkpoints, "
        f"{need / 1e9:.2f} GB in {spec_written['generate_seconds']} s, peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return spec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="named shape (fields below override it); default: the 1.1b shape")
    for name in FIELDS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--models", type=int, default=2, help="fine-tuned models K (default 2)")
    p.add_argument("--dtype", choices=sorted(ITEMSIZE), default="BF16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=2_000_000_000, help="bytes per safetensors shard")
    p.add_argument("--out", required=True, help="folder to create (base/, ft1/ .. ftK/)")
    p.add_argument("--force", action="store_true", help="regenerate even if a complete family is there")
    a = p.parse_args(argv)
    shape = SHAPES[a.shape or "1.1b"]
    shape = dataclasses.replace(shape, **{f: getattr(a, f) for f in FIELDS if getattr(a, f) is not None})
    make_family(a.out, shape, a.models, a.dtype, a.seed, a.shard_size, a.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())

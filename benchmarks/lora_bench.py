"""Merging LoRA adapters against merging full fine-tunes: time and memory, in one run.

usage: python benchmarks/lora_bench.py --family /work/bench-data/2.7b-k2 --cap 1GiB --repeat 3
       python benchmarks/lora_bench.py --family /work/bench-data/7b-base --cap 2GiB --repeat 1

Writes K PEFT LoRA adapters for the family's base (``--rank``, on q/k/v/o/gate/up/down of every
layer, float32 factors with random values) under --out-root, then, under a hard memory cap
and from a cold page cache each time (benchlib.run_capped), interleaved per repeat: the I/O
floor (reading the base and the adapters, writing an output-sized file), a CABS merge of the
base with the adapters (``cabs-stream merge --base B --model ADAPTER ...``: each chunk
computes its slice of W + scaling * B @ A, nothing is materialised) and, when the family has
ft1..ftK, the same merge of the full fine-tunes. Reports walls, CPU, anon peak and the ratios,
and writes benchmarks/results/<tag>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np
from safetensors.numpy import save_file

import benchlib as bl

CLI = [sys.executable, "-m", "cabs_stream_cli.main"]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shapes(base: str) -> dict[str, tuple[int, int]]:
    """The 2-D weights of the base whose module name ends in one of TARGETS, with their shapes."""
    from cabs_stream.io.checkpoint import open_checkpoint

    ck = open_checkpoint(base)
    return {n: tuple(t.shape) for n, t in ck.tensors.items()
            if len(t.shape) == 2 and n.endswith(".weight") and n.rsplit(".", 2)[-2] in TARGETS}


def write_adapter(folder: str, base: str, targets: dict[str, tuple[int, int]], rank: int, seed: int) -> int:
    """A PEFT LoRA adapter folder for ``base``; returns its bytes."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, (out, inp) in targets.items():
        key = "base_model.model." + name[: -len(".weight")]
        tensors[key + ".lora_A.weight"] = (rng.standard_normal((rank, inp), np.float32) / np.sqrt(inp)).astype(np.float32)
        tensors[key + ".lora_B.weight"] = (rng.standard_normal((out, rank), np.float32) * 1e-3).astype(np.float32)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": rank,
                   "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": list(TARGETS), "bias": "none",
                   "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
                   "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}, f, indent=2)
    return sum(t.nbytes for t in tensors.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.interleaved_options(p, "folder with base/ (and ft1..ftK/ for the full-merge baseline)")
    p.add_argument("--models", type=int, default=2, help="adapters K (default 2)")
    p.add_argument("--rank", type=int, default=16)
    a = p.parse_args()
    base = os.path.join(a.family, "base")
    fts = sorted(os.path.join(a.family, d) for d in os.listdir(a.family) if d.startswith("ft"))[:a.models]
    root = os.path.join(a.out_root, "lora-bench")
    shutil.rmtree(root, ignore_errors=True)
    targets = shapes(base)
    adapters = [os.path.join(root, f"adapter{i + 1}") for i in range(a.models)]
    adapter_bytes = [write_adapter(d, base, targets, a.rank, seed=i) for i, d in enumerate(adapters)]
    out = os.path.join(root, "merged")
    common = ["--n", str(a.n), "--m", str(a.m), "--memory", str(a.cap), "--quiet", "--overwrite", "-o", out]
    runs = {"lora": [*CLI, "merge", "--base", base, *[x for d in adapters for x in ("--model", d)], *common]}
    if len(fts) == a.models:
        runs["full"] = [*CLI, "merge", "--base", base, *[x for d in fts for x in ("--model", d)], *common]
    inputs = bl.family_files([base]) + [os.path.join(d, "adapter_model.safetensors") for d in adapters]
    rows: dict[str, list[bl.Measured]] = {"floor": [], **{k: [] for k in runs}}
    out_bytes = bl.tree_bytes(base)
    for r in range(a.repeat):
        m, _ = bl.io_floor(inputs, out_bytes, a.out_root, a.cap)
        rows["floor"].append(m)
        for key, cmd in (runs.items() if r % 2 == 0 else reversed(runs.items())):
            shutil.rmtree(out, ignore_errors=True)
            m = bl.run_capped(cmd, a.cap, name=f"lora-{key}")
            if not m.ok:
                raise SystemExit(f"{key} failed ({m.status}): {m.stderr[-2000:]}")
            rows[key].append(m)
            print(f"[{time.strftime('%H:%M:%S')}] repeat {r + 1} {key}: {m.wall:.1f} s, anon peak "
                  f"{m.peak_anon / 2**20:.0f} MiB", flush=True)
    med = {k: statistics.median(x.wall for x in v) for k, v in rows.items()}
    with open(os.path.join(out, "cabs_report.json")) as f:
        numel = json.load(f)["numel"]
    lines = [f"# LoRA bench: {a.family}, cap {bl.size_label(a.cap)}, CABS {a.n}:{a.m}, k={a.models} adapters of "
             f"rank {a.rank} ({len(targets)} targets, {sum(adapter_bytes) / 1e6:.0f} MB of factors)", "",
             *bl.runs_table(rows)]
    lines += ["", f"- merged parameters: {numel / 1e9:.2f} B; floor = reading the base and the adapters and "
                  "writing an output-sized file",
              f"- LoRA merge / I/O floor: **{med['lora'] / med['floor']:.2f}x**"]
    if "full" in med:
        lines.append(f"- LoRA merge / merge of {a.models} full fine-tunes: **{med['lora'] / med['full']:.2f}x**")
    text = "\n".join(lines) + "\n"
    print(text)
    bl.save_runs(a.tag or f"lora-{time.strftime('%Y%m%d-%H%M')}", text,
                 {"family": a.family, "cap": a.cap, "n": a.n, "m": a.m, "rank": a.rank, "models": a.models,
                  "targets": len(targets), "adapter_bytes": adapter_bytes, "numel": numel, "median": med}, rows)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

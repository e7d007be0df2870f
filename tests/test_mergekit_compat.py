"""Side by side with mergekit 0.1.5 (skipped unless its CLI is found).

mergekit lives in its own environment (it pins its own torch); point the tests at it with
MERGEKIT_YAML=/path/to/venv/bin/mergekit-yaml, or have mergekit-yaml on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml

from cabs_stream import load_config, merge
from cabs_stream.synthetic import LlamaShape, generate_family
from conftest import load_model

MERGEKIT = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")
pytestmark = pytest.mark.skipif(not MERGEKIT, reason="mergekit-yaml not found (set MERGEKIT_YAML)")
SHAPE = LlamaShape(hidden=64, layers=2, intermediate=160, vocab=256, heads=4, kv_heads=2)


def run_both(tmp_path, dtype: str, method: str, params: dict, model_params: list[dict]):
    base, fts = generate_family(str(tmp_path / "fam"), SHAPE, k=2, dtype=dtype, zero_fraction=0.2)
    doc = {"merge_method": method, "base_model": base,
           "models": [{"model": f, "parameters": p} for f, p in zip(fts, model_params)],
           "parameters": params, "dtype": {"F32": "float32", "BF16": "bfloat16"}[dtype]}
    cfg_path = tmp_path / "cfg.yml"
    cfg_path.write_text(yaml.safe_dump(doc))
    merge(load_config(str(cfg_path)), str(tmp_path / "ours"))
    r = subprocess.run([MERGEKIT, str(cfg_path), str(tmp_path / "theirs"), "--lazy-unpickle", "--low-cpu-memory",
                        "--allow-crimes"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return load_model(str(tmp_path / "ours")), load_model(str(tmp_path / "theirs"))


@pytest.mark.parametrize("method, params, mp", [
    ("task_arithmetic", {}, [{"weight": 1.2}, {"weight": 1.0}]),
    ("ties", {"normalize": True}, [{"weight": 1.2, "density": 0.3}, {"weight": 1.0, "density": 0.5}]),
])
def test_float32_matches_mergekit(tmp_path, method, params, mp):
    ours, theirs = run_both(tmp_path, "F32", method, params, mp)
    assert set(ours) <= set(theirs)
    for name, t in ours.items():
        a, b = t.numpy(), theirs[name].to(torch.float32).numpy()
        scale = np.maximum(np.abs(b), 1e-30)
        assert (np.abs(a - b) / scale <= 1e-6).all(), name


@pytest.mark.parametrize("method, params, mp", [
    ("task_arithmetic", {}, [{"weight": 1.2}, {"weight": 1.0}]),
    ("ties", {"normalize": True}, [{"weight": 1.2, "density": 0.3}, {"weight": 1.0, "density": 0.5}]),
])
def test_bfloat16_difference_is_reported(tmp_path, method, params, mp, capsys):
    ours, theirs = run_both(tmp_path, "BF16", method, params, mp)
    total = diff = 0
    for name, t in ours.items():
        a, b = t.view(torch.int16).numpy(), theirs[name].view(torch.int16).numpy()
        total += a.size
        diff += int((a != b).sum())
    with capsys.disabled():
        print(f"\n[mergekit bf16 {method}] {diff} of {total} elements differ ({100 * diff / total:.3f}%)")
    assert diff < total  # same method: most elements agree

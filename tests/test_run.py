"""A run is an object: nothing it opens or caches outlives it.

In one process: a failed merge and its retry, two merges into the same output one after the
other, two merges at once in two threads; each equals the same merge run in a fresh process,
byte for byte, 20 times over. Also: --save-masks keeps a readable Zarr store, and a second run
on an output being written fails at once while the first is unharmed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from cabs_stream import CheckpointError, OutputError, build_config, merge
from conftest import load_model, no_work_folder, rewrite_model, shard_bytes, work_folder

REPEAT = 20


def fresh_process_digests(cfg_kwargs: dict, out: str, **merge_kwargs) -> dict[str, str]:
    """The merge run in a new interpreter; returns its shards' digests."""
    code = ("import json, sys; from cabs_stream import build_config, merge; "
            "a = json.loads(sys.argv[1]); merge(build_config(**a['cfg']), a['out'], **a['kw'])")
    subprocess.run([sys.executable, "-c", code, json.dumps({"cfg": cfg_kwargs, "out": out, "kw": merge_kwargs})],
                   check=True, timeout=300)
    return shard_bytes(out)


def test_failed_merge_then_retry_equals_fresh_process(family, tmp_path):
    w = load_model(family["ft1"])["layer.1.w"].float().numpy()
    w[2, 3] = np.nan
    rewrite_model(family["ft1"], {"layer.1.w": (w, "F32")})
    args = dict(base=family["base"], models=[family["ft1"], family["ft2"]], n=3, m=8)
    expect = fresh_process_digests(args, str(tmp_path / "fresh"), allow_nonfinite=True, chunk_size=64)
    for i in range(REPEAT):
        out = str(tmp_path / f"out{i}")
        with pytest.raises(CheckpointError, match="NaN/Inf"):
            merge(build_config(**args), out, chunk_size=64, workers=4)
        merge(build_config(**args), out, chunk_size=64, workers=4, allow_nonfinite=True)
        assert shard_bytes(out) == expect, f"retry {i} differs from a fresh process"


def test_two_merges_into_one_output_equal_fresh_processes(family, tmp_path):
    args = [dict(base=family["base"], models=[family["ft1"], family["ft2"]], n=3, m=8, weights=w)
            for w in ([1.2, 0.8], [0.5, 1.5])]
    expect = [fresh_process_digests(a, str(tmp_path / f"fresh{j}"), chunk_size=64) for j, a in enumerate(args)]
    out = str(tmp_path / "out")
    for i in range(REPEAT):
        for a, e in zip(args, expect):
            merge(build_config(**a), out, chunk_size=64, overwrite=True)
            assert shard_bytes(out) == e, f"round {i}"


def test_two_merges_at_once_in_two_threads(family, tmp_path):
    args = [dict(method="ties", base=family["base"], models=[family["ft1"], family["ft3"]], density=0.4),
            dict(base=family["base"], models=[family["ft2"], family["ft3"]], n=2, m=8)]
    expect = [fresh_process_digests(a, str(tmp_path / f"fresh{j}"), chunk_size=64) for j, a in enumerate(args)]
    for i in range(REPEAT):
        outs = [str(tmp_path / f"r{i}-{j}") for j in range(2)]
        errors: list[BaseException] = []

        def one(j: int) -> None:
            try:
                merge(build_config(**args[j]), outs[j], chunk_size=64, workers=2)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=one, args=(j,)) for j in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert [shard_bytes(o) for o in outs] == expect, f"round {i}"


def test_save_masks_keeps_a_readable_zarr_store(family, tmp_path):
    out = str(tmp_path / "out")
    cfg = build_config(base=family["base"], models=[family["ft1"], family["ft2"], family["ft3"]], n=3, m=8)
    rep = merge(cfg, out, chunk_size=16, save_masks=True).report
    store = zarr.open_group(os.path.join(out, "cabs_masks.zarr"), mode="r")
    assert json.load(open(os.path.join(out, "cabs_manifest.json")))["masks"] == "cabs_masks.zarr"
    assert sorted(store.keys()) == sorted(rep["tensors"])
    for name, t in rep["tensors"].items():
        packed = store[name][:]
        assert packed.shape == (3, -(-t["numel"] // 8))
        bits = np.unpackbits(packed, axis=1, bitorder="little")[:, :t["numel"]]
        assert bits.sum(axis=1).tolist() == t["kept"], name
    assert no_work_folder(tmp_path)


def test_second_run_on_an_output_being_written_fails_at_once(tmp_path):
    from cabs_stream.synthetic import SHAPES, generate_family
    base, fts = generate_family(str(tmp_path / "fam"), SHAPES["demo"], k=2, shard_size=3_000_000)
    out = str(tmp_path / "out")
    ref = str(tmp_path / "ref")
    merge(build_config(base=base, models=fts, n=64, m=256), ref)
    cmd = [sys.executable, "-m", "cabs_stream_cli.main", "merge", "--base", base, "--model", fts[0], "--model",
           fts[1], "-o", out, "--chunk-size", "1024", "--workers", "1", "--quiet"]
    first = subprocess.Popen(cmd)
    lock = Path(work_folder(out)) / "lock"
    deadline = time.monotonic() + 60
    while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.poll() is None, "the first run ended before the second could start"
    t0 = time.monotonic()
    with pytest.raises(OutputError, match=rf"being written by process {first.pid} \(started"):
        merge(build_config(base=base, models=fts, n=32, m=256), out, chunk_size=1024)
    assert time.monotonic() - t0 < 10
    assert first.wait(timeout=300) == 0
    assert shard_bytes(out) == shard_bytes(ref)

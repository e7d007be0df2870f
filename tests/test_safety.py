"""Nothing lost, nothing run: inputs are never replaced, an interrupted run's leftovers never
produce a wrong model, the work folder is private, and hostile input gets one clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from cabs_stream import CheckpointError, ConfigError, OutputError, build_config, merge
from conftest import killed_after, load_model, no_work_folder, shard_bytes, work_folder

untouched = pytest.mark.usefixtures("inputs_unchanged")  # tests that must leave every input as it was


def cfg_of(family, **kw):
    return build_config(base=family["base"], models=[family["ft1"], family["ft2"]], n=3, m=8, **kw)


def interrupted(family, out, after: int, **kw) -> None:
    """A merge stopped after ``after`` chunks, as a kill would (the chunks done are recorded)."""
    with killed_after(after):
        merge(cfg_of(family), out, chunk_size=16, scheduler="synchronous", **kw)
    assert not os.path.exists(out)


@pytest.fixture
def reference(family, tmp_path):
    ref = str(tmp_path / "ref")
    merge(cfg_of(family), ref, chunk_size=16)
    return ref


def same_tensors(a: str, b: str) -> bool:
    ta, tb = load_model(a), load_model(b)
    return set(ta) == set(tb) and all(ta[n].dtype == tb[n].dtype and (ta[n] == tb[n]).all() for n in ta)


# ------------------------------------------------------------------ inputs are sacred
@untouched
def test_overwrite_never_replaces_a_folder_holding_inputs(family, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path), family["base"], os.path.join(family["ft1"], "sub")):
        with pytest.raises(OutputError, match="contains input|inside input"):
            merge(cfg_of(family), out, overwrite=True)
    os.symlink(tmp_path, tmp_path / "link")  # through a symlink too
    with pytest.raises(OutputError, match="contains input"):
        merge(cfg_of(family), str(tmp_path / "link"), overwrite=True)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    with pytest.raises(OutputError, match="inside input"):
        merge(cfg_of(family, tokenizer_source=str(tok)), str(tok / "out"), overwrite=True)
    assert (tok / "tokenizer.json").exists()


@untouched
def test_output_paths_that_cannot_be_used(family, tmp_path):
    (tmp_path / "afile").write_text("x")
    for out, msg in ((tmp_path / "afile", "not a folder"), (tmp_path / "afile" / "out", "afile is not a folder"),
                     (tmp_path / "afile" / "deeper" / "out", "afile is not a folder"),
                     (tmp_path / ("x" * 240), "too long")):
        with pytest.raises(OutputError, match=msg):
            merge(cfg_of(family), str(out), overwrite=True)
    merge(cfg_of(family), str(tmp_path / "new" / "parents" / "out"))  # missing folders are created
    assert os.path.isfile(tmp_path / "new" / "parents" / "out" / "model.safetensors.index.json")


# ------------------------------------------------------------------ leftovers never make a wrong model
@untouched
def test_kill_after_the_final_rename_then_overwrite(family, tmp_path, reference, monkeypatch):
    """Killed between moving the output into place and removing the work folder: the rerun
    with --overwrite rebuilds the model, it does not "resume" against empty shards."""
    out = str(tmp_path / "out")
    from cabs_stream.io import output
    real = output.shutil.rmtree

    def die_after_rename(path, *a, **k):
        if os.path.basename(path).startswith(".out.cabs-partial"):
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(output.shutil, "rmtree", die_after_rename)
    with pytest.raises(KeyboardInterrupt):
        merge(cfg_of(family), out, chunk_size=16)
    monkeypatch.setattr(output.shutil, "rmtree", real)
    assert os.path.isdir(work_folder(out))
    rep = merge(cfg_of(family), out, chunk_size=16, overwrite=True).report
    assert shard_bytes(out) == shard_bytes(reference)
    assert rep["resumed_chunks"] == 0 and rep["density"] == json.load(open(f"{reference}/cabs_report.json"))["density"]
    assert no_work_folder(tmp_path)


@untouched
@pytest.mark.parametrize("damage", ["delete", "truncate", "zero"])
def test_damaged_partial_shard_is_redone(family, tmp_path, reference, damage):
    out = str(tmp_path / "out")
    interrupted(family, out, 40)
    model = os.path.join(work_folder(out), "model")
    shard = sorted(f for f in os.listdir(model) if f.endswith(".safetensors"))[0]
    path = os.path.join(model, shard)
    if damage == "delete":
        os.remove(path)
    elif damage == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    else:
        with open(path, "r+b") as f:  # every data byte: the chunks recorded done in it too
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n)
            f.write(b"\x55" * (os.path.getsize(path) - 8 - n))
    with pytest.warns(UserWarning, match="could not be verified"):
        rep = merge(cfg_of(family), out, chunk_size=16).report
    assert shard_bytes(out) == shard_bytes(reference)
    assert 0 <= rep["resumed_chunks"] < 40


@untouched
def test_forged_or_damaged_records_are_not_trusted(family, tmp_path, reference):
    out = str(tmp_path / "out")
    interrupted(family, out, 30)
    records = os.path.join(work_folder(out), "state.zarr", "records", "c")
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(records) for f in fs)
    for path in files[:5]:  # damaged
        data = bytearray(open(path, "rb").read())
        data[3] ^= 0xFF
        open(path, "wb").write(bytes(data))
    row = np.frombuffer(open(files[6], "rb").read(), np.int64).copy()  # forged: a plausible row elsewhere
    open(files[-1], "wb").write(row.tobytes())
    with pytest.warns(UserWarning, match="could not be verified"):
        merge(cfg_of(family), out, chunk_size=16)
    assert shard_bytes(out) == shard_bytes(reference)


@untouched
def test_unreadable_state_is_discarded_with_a_note(family, tmp_path, reference):
    out = str(tmp_path / "out")
    interrupted(family, out, 30)
    zarr_json = os.path.join(work_folder(out), "state.zarr", "zarr.json")
    open(zarr_json, "w").write("{not json")
    with pytest.warns(UserWarning, match="could not be read.*starting clean"):
        rep = merge(cfg_of(family), out, chunk_size=16).report
    assert rep["resumed_chunks"] == 0 and shard_bytes(out) == shard_bytes(reference)


@untouched
def test_rerun_with_another_shard_size_leaves_no_stale_shard(family, tmp_path, reference, small_shards):
    out = str(tmp_path / "out")
    interrupted(family, out, 40, shard_size="2KB")
    merge(cfg_of(family), out, chunk_size=16, shard_size="5GB")
    assert sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == ["model-00001-of-00001.safetensors"]
    assert same_tensors(out, reference)


def test_input_rewritten_with_size_and_mtime_kept_starts_clean(family, tmp_path):
    out = str(tmp_path / "out")
    interrupted(family, out, 40)
    path = os.path.join(family["ft2"], "model.safetensors")
    st = os.stat(path)
    original = open(path, "rb").read()
    data = bytearray(original)
    data[-4:] = b"\x11\x22\x33\x44"  # same size, then the old mtime back (as cp -p / rsync -t do)
    open(path, "wb").write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    try:
        with pytest.warns(UserWarning, match="another configuration's \\(or older inputs'\\) state"):
            rep = merge(cfg_of(family), out, chunk_size=16).report
        fresh = str(tmp_path / "fresh")
        merge(cfg_of(family), fresh, chunk_size=16)
        assert rep["resumed_chunks"] == 0 and shard_bytes(out) == shard_bytes(fresh)
    finally:
        open(path, "wb").write(original)


# ------------------------------------------------------------------ the work folder
@untouched
def test_work_folder_is_private_and_never_followed(family, tmp_path):
    out = str(tmp_path / "out")
    work = work_folder(out)
    assert ".out.cabs-partial-" in work and work != work_folder(str(tmp_path / "other"))
    os.symlink(tmp_path / "elsewhere", work)  # planted symlink
    with pytest.raises(OutputError, match="not a folder \\(a symlink\\?\\)"):
        merge(cfg_of(family), out)
    os.remove(work)
    os.mkdir(work, 0o777)
    os.chmod(work, 0o777)
    with pytest.raises(OutputError, match="open to others"):
        merge(cfg_of(family), out)
    os.chmod(work, 0o700)
    os.chown(work, 65534, 65534)
    with pytest.raises(OutputError, match="belongs to another user"):
        merge(cfg_of(family), out)
    shutil.rmtree(work)
    interrupted(family, out, 20)
    assert os.stat(work).st_mode & 0o777 == 0o700
    for r, _, fs in os.walk(work):  # no pickles anywhere: nothing a swapped file could run
        for f in fs:
            assert not open(os.path.join(r, f), "rb").read(2).startswith(b"\x80"), f
    merge(cfg_of(family), out)


# ------------------------------------------------------------------ one clear error, not a crash
def test_special_files_are_refused(family, tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        merge(build_config(base=family["base"], models=[str(fifo)], n=3, m=8), str(tmp_path / "out"))
    os.mkfifo(tmp_path / "cfg.yml")
    from cabs_stream import load_config
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(str(tmp_path / "cfg.yml"))


def test_broken_base_config_json_fails_before_the_merge(family, tmp_path):
    open(os.path.join(family["base"], "config.json"), "w").write("{broken")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        merge(cfg_of(family, dtype="float32"), str(tmp_path / "out"))
    assert no_work_folder(tmp_path) and not os.path.exists(tmp_path / "out")


def test_empty_weight_map_and_index_outside_the_folder(family, tmp_path):
    index = os.path.join(family["base"], "model.safetensors.index.json")
    doc = json.load(open(index))
    json.dump({"weight_map": {}}, open(index, "w"))
    with pytest.raises(CheckpointError, match="lists no tensors"):
        merge(cfg_of(family), str(tmp_path / "out"))
    doc["weight_map"] = {k: "../" + os.path.basename(family["ft1"]) + "/model.safetensors" for k in doc["weight_map"]}
    json.dump(doc, open(index, "w"))
    with pytest.raises(CheckpointError, match="points outside its folder"):
        merge(cfg_of(family), str(tmp_path / "out"))


def test_bin_index_malformed_or_outside(family, tmp_path):
    folder = tmp_path / "binmodel"
    folder.mkdir()
    for doc, msg in (("{nope", "not valid JSON"), (json.dumps({"weight_map": {"w": "../../etc/passwd"}}),
                                                     "points outside its folder"),
                     (json.dumps({"weight_map": []}), "weight_map")):
        (folder / "pytorch_model.bin.index.json").write_text(doc)
        with pytest.raises(CheckpointError, match=msg):
            merge(build_config(base=family["base"], models=[str(folder)], n=3, m=8), str(tmp_path / "out"))


@untouched
def test_missing_tokenizer_source_is_an_error(family, tmp_path):
    with pytest.raises(OutputError, match="tokenizer_source .* is not a folder"):
        merge(cfg_of(family, tokenizer_source=str(tmp_path / "nope")), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputError, match="holds no tokenizer file"):
        merge(cfg_of(family, tokenizer_source=str(tmp_path / "empty")), str(tmp_path / "out"))


def test_million_tensor_header_is_refused(tmp_path):
    import struct

    from cabs_stream.io.safetensors_format import read_header
    head = json.dumps({f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}
                       for i in range(1_000_000)}).encode()
    p = tmp_path / "many.safetensors"
    p.write_bytes(struct.pack("<Q", len(head)) + head)
    with pytest.raises(CheckpointError, match="more than the 200000 accepted"):
        read_header(str(p), "m")


def test_yaml_alias_bomb_and_huge_file_are_refused(tmp_path):
    from cabs_stream import load_config
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    (tmp_path / "bomb.yml").write_text("\n".join(lines) + "\nmerge_method: cabs\n")
    with pytest.raises(ConfigError, match="expands to more than"):
        load_config(str(tmp_path / "bomb.yml"))
    (tmp_path / "big.yml").write_text("# " + "x" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(str(tmp_path / "big.yml"))


@pytest.mark.parametrize("kw, msg", [
    (dict(n=2**40, m=2**41), "m must be at least 1 \\(and at most"), (dict(weights=[1e39, 1.0]), "fit in float32"),
    (dict(params={"overlap": 3}), "overlap must be one of"), (dict(method=["cabs"]), "unknown merge_method"),
    (dict(dtype=5), "dtype must be a string"),
])
def test_values_out_of_range_or_of_the_wrong_type(family, kw, msg):
    args = dict(base=family["base"], models=[family["ft1"], family["ft2"]], **kw)
    with pytest.raises(ConfigError, match=msg):
        build_config(**args)


@untouched
def test_engine_limits(family, tmp_path):
    with pytest.raises(ConfigError, match="`chunk_size` must be between"):
        merge(cfg_of(family), str(tmp_path / "o"), chunk_size=2**40)
    with pytest.raises(ConfigError, match="`workers` must be between"):
        merge(cfg_of(family), str(tmp_path / "o"), workers=10**6)
    with pytest.raises(ConfigError, match="too large"):
        merge(cfg_of(family), str(tmp_path / "o"), memory="9" * 400 + "GB")


def test_input_truncated_during_the_merge_is_a_clean_error(tmp_path):
    """Another process truncates an input mid-merge: the read lease holds it back until this
    run has stopped cleanly (no SIGBUS), exit code 2, one line naming the file."""
    from cabs_stream.synthetic import SHAPES, generate_family
    base, fts = generate_family(str(tmp_path / "fam"), SHAPES["demo"], k=2, shard_size=3_000_000)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "cabs_stream_cli.main", "merge", "--base", base, "--model", fts[0], "--model",
           fts[1], "-o", out, "--chunk-size", "1024", "--workers", "2", "--quiet"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    records = os.path.join(work_folder(out), "state.zarr", "records", "c")
    deadline = time.monotonic() + 120
    while not (os.path.isdir(records) and len(os.listdir(records)) > 20) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the merge ended before the input could be truncated"
    victim = os.path.join(fts[0], sorted(f for f in os.listdir(fts[0]) if f.endswith(".safetensors"))[-1])
    os.truncate(victim, 1000)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and victim in lines[0] and "changed during" in lines[0]
    assert not os.path.exists(out)


def test_out_of_file_descriptors_is_one_line(tmp_path, family):
    """RLIMIT_NOFILE so low that the run cannot open what it needs: exit code 2 and one line, at
    whatever point it runs out (the limits below fail at different steps)."""
    import resource
    outcomes = []
    for limit in (24, 16, 13, 11, 9):
        def few_files(limit=limit):
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        out = tmp_path / f"out{limit}"
        cmd = [sys.executable, "-m", "cabs_stream_cli.main", "merge", "--base", family["base"], "--model",
               family["ft1"], "--model", family["ft2"], "--n", "3", "--m", "8", "-o", str(out), "--quiet"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=few_files)
        outcomes.append(r.returncode)
        assert r.returncode in (0, 2), r.stderr[-2000:]
        if r.returncode == 2:
            assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:"), r.stderr
            assert not out.exists()
    assert 2 in outcomes, outcomes


@untouched
def test_durable_syncs_every_chunk_before_recording_it(family, tmp_path, reference, monkeypatch):
    from cabs_stream.io import output
    synced = []
    real = os.fdatasync
    monkeypatch.setattr(output.os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    rep = merge(cfg_of(family), str(tmp_path / "out"), chunk_size=16, durable=True).report
    n_chunks = sum(-(-t["numel"] // 16) for t in rep["tensors"].values())
    assert len(synced) >= n_chunks
    assert shard_bytes(str(tmp_path / "out")) == shard_bytes(reference)


def test_shard_size_under_1mb_is_an_error(family, tmp_path):
    """`--shard-size 1B` (pasted from mergekit's --out-shard-size) once meant 1-byte shards."""
    from cabs_stream import merge_from_store, prune

    with pytest.raises(ConfigError, match=r"`shard_size` '1B' is 1 bytes, under the 1 MB floor.*cabs-stream-yaml"):
        merge(cfg_of(family), str(tmp_path / "out"), shard_size="1B")
    prune(cfg_of(family), str(tmp_path / "store.zarr"))
    with pytest.raises(ConfigError, match="under the 1 MB floor"):
        merge_from_store(str(tmp_path / "store.zarr"), str(tmp_path / "point"), shard_size=999_999)
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "point")

"""Bad input stops the merge before anything is written, with an error naming model, file and tensor."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from cabs_stream import CheckpointError, ConfigError, OutputError, build_config, merge
from cabs_stream.io.safetensors_format import read_header
from conftest import load_model, rewrite_model


def nothing_written(tmp_path) -> bool:
    return not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


def run(family, tmp_path, models=("ft1", "ft2"), **kw):
    cfg = build_config(base=family["base"], models=[family[m] for m in models], n=3, m=8, **kw)
    return merge(cfg, str(tmp_path / "out"))


def shard_of(path, tensor):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        return os.path.join(path, json.load(open(index))["weight_map"][tensor])
    return os.path.join(path, "model.safetensors")


def test_shape_mismatch(family, tmp_path):
    rewrite_model(family["ft2"], {"layer.0.w": (np.zeros((24, 23)), "BF16")})
    with pytest.raises(CheckpointError, match=r"ft2.*model.safetensors.*'layer.0.w'.*shape \[24, 23\]"):
        run(family, tmp_path)
    assert nothing_written(tmp_path)


def test_missing_tensor_and_allow_missing(family, tmp_path):
    rewrite_model(family["ft1"], {"head.weight": None})
    with pytest.raises(CheckpointError, match=r"ft1.*'head.weight'.*missing.*`allow_missing=True`"):
        run(family, tmp_path)
    assert nothing_written(tmp_path)
    res = run(family, tmp_path, allow_missing=True)
    assert res.report["tensors"]["head.weight"]["kept"][0] == 0


def test_unsupported_dtype(family, tmp_path):
    w = load_model(family["base"])["layer.0.w"].double().numpy()
    rewrite_model(family["base"], {"layer.0.w": (w, "int")})  # stored as F64
    with pytest.raises(CheckpointError, match=r"base.*'layer.0.w'.*unsupported dtype F64"):
        run(family, tmp_path)
    assert nothing_written(tmp_path)


def test_integer_where_float_expected(family, tmp_path):
    rewrite_model(family["ft1"], {"layer.0.w": (np.zeros((24, 24), np.int32), "int")})
    with pytest.raises(CheckpointError, match=r"ft1.*'layer.0.w'.*dtype I32"):
        run(family, tmp_path)


def test_corrupt_header(family, tmp_path):
    path = shard_of(family["ft1"], "layer.0.w")
    data = bytearray(open(path, "rb").read())
    data[8:9] = b"#"
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match=r"ft1.*model.safetensors.*not valid JSON"):
        run(family, tmp_path)
    assert nothing_written(tmp_path)


def test_truncated_shard(family, tmp_path):
    path = shard_of(family["base"], "layer.0.w")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(CheckpointError, match=r"base.*model-0000.-of-00002.safetensors.*run past the end.*truncated"):
        run(family, tmp_path)
    assert nothing_written(tmp_path)


def test_header_length_past_end(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CheckpointError, match="header length 1000 is larger than the file"):
        read_header(str(p), "m")


def test_missing_shard_in_index(family, tmp_path):
    os.remove(os.path.join(family["base"], "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match=r"base.*index.*missing shard 'model-00002-of-00002.safetensors'"):
        run(family, tmp_path)


def test_nonfinite_task_vector(family, tmp_path):
    w = load_model(family["ft1"])["layer.1.w"].float().numpy()
    w[2, 3] = np.nan
    rewrite_model(family["ft1"], {"layer.1.w": (w, "F32")})
    with pytest.raises(CheckpointError, match=r"ft1.*'layer.1.w'.*NaN/Inf.*`allow_nonfinite=True`"):
        run(family, tmp_path)
    assert not os.path.exists(tmp_path / "out")
    cfg = build_config(base=family["base"], models=[family["ft1"], family["ft2"]], n=3, m=8)
    merge(cfg, str(tmp_path / "out"), allow_nonfinite=True)
    assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")


@pytest.mark.parametrize("kw, msg", [
    (dict(n=0), "n must be between 1 and m"), (dict(n=9), "n must be between 1 and m"),
    (dict(m=0), "m must be at least 1"), (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=0.5, n=2), "either n or sparsity"), (dict(weights=[1.0]), "1 weights given for 2 models"),
    (dict(weights=[1.0, float("nan")]), "finite number"), (dict(overlap="maybe"), "overlap must be"),
    (dict(method="slerp"), "unknown merge_method"),
])
def test_invalid_parameters(family, kw, msg):
    args = dict(base=family["base"], models=[family["ft1"], family["ft2"]], n=3, m=8)
    args.update(kw)
    if "sparsity" in kw and "n" not in kw:
        del args["n"]
    with pytest.raises(ConfigError, match=msg):
        build_config(**args)


def test_same_model_twice_or_base_as_model(family):
    with pytest.raises(ConfigError, match="listed twice"):
        build_config(base=family["base"], models=[family["ft1"], family["ft1"]])
    with pytest.raises(ConfigError, match="the base model"):
        build_config(base=family["base"], models=[family["base"], family["ft1"]])


def test_output_exists_or_inside_input(family, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="already exists.*`overwrite=True`"):
        run(family, tmp_path)
    cfg = build_config(base=family["base"], models=[family["ft1"]], n=3, m=8)
    with pytest.raises(OutputError, match="inside input"):
        merge(cfg, os.path.join(family["base"], "merged"))


def _raw(tmp_path, header: dict | bytes, data: bytes = b"") -> str:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return str(p)


@pytest.mark.parametrize("header, data, msg", [
    (b"\xff\xfe{}", b"", "header is not UTF-8"),
    (b"[1, 2]", b"", "not a JSON object"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, r"'b'.*overlaps tensor 'a'"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, r"'a'.*run past the end"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, r"'a'.*gap of 4"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 16, "covers 8 bytes but the file holds 16"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, r"'a'.*needs 12"),
    ({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, r"'a'.*unknown dtype 'Q7'"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, r"'a'.*invalid shape"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, r"'a'.*exactly dtype, shape and data_offsets"),
])
def test_damaged_headers_are_named(tmp_path, header, data, msg):
    path = _raw(tmp_path, header, data)
    with pytest.raises(CheckpointError, match=msg) as e:
        read_header(path, "ftX")
    assert "model ftX" in str(e.value) and path in str(e.value)


def test_damaged_input_stops_merge_before_writing(family, tmp_path):
    path = shard_of(family["ft2"], "layer.0.w")
    head = json.dumps({"layer.0.w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    open(path, "wb").write(struct.pack("<Q", len(head)) + head + b"\0" * 4)
    with pytest.raises(CheckpointError, match=r"ft2.*'layer.0.w'.*run past the end"):
        run(family, tmp_path)
    assert nothing_written(tmp_path)


def test_errors_speak_of_the_callers_keyword(family, tmp_path):
    """The Python API names its own keyword; the command line shows the flag."""
    from click.testing import CliRunner

    from cabs_stream.errors import cli_words
    from cabs_stream_cli.main import main as cli

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputError, match="pass `overwrite=True` to replace it"):
        merge(build_config(base=family["base"], models=[family["ft1"]], n=3, m=8), str(out))
    res = CliRunner().invoke(cli, ["merge", "--base", family["base"], "--model", family["ft1"], "-o", str(out),
                                   "--n", "3", "--m", "8"])
    assert res.exit_code == 2 and "pass --overwrite to replace it" in res.output and "`" not in res.output
    assert cli_words("lower `memory`, `chunk_size`; `plots=False`; `evaluate`") == \
        "lower --memory, --chunk-size; --no-plots; --eval"

"""The safetensors header parser survives arbitrary headers, raising only CheckpointError.

The suite runs a small number of examples; for the long run (10,000+ examples):

    CABS_FUZZ_EXAMPLES=10000 python -m pytest -q tests/test_header_fuzz.py
"""

from __future__ import annotations

import json
import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cabs_stream.errors import CheckpointError
from cabs_stream.io.safetensors_format import read_header

EXAMPLES = int(os.environ.get("CABS_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8))
dtypes = st.one_of(st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "BOOL", "F64", "XX", ""]), json_scalars)
shapes = st.one_of(st.lists(st.integers(-3, 40), max_size=4), json_scalars)
offsets = st.one_of(st.lists(st.integers(-10, 5000), min_size=0, max_size=3), json_scalars)
entry = st.one_of(st.fixed_dictionaries({"dtype": dtypes, "shape": shapes, "data_offsets": offsets}),
                  st.dictionaries(st.text(max_size=12), json_scalars, max_size=4), json_scalars)
header_obj = st.dictionaries(st.text(max_size=10), entry, max_size=6)


def _check(tmp_path, blob: bytes) -> None:
    p = tmp_path / "fuzz.safetensors"
    p.write_bytes(blob)
    try:
        read_header(str(p), "fuzz")
    except CheckpointError:
        pass


@FUZZ
@given(header_obj, st.integers(0, 4096), st.sampled_from(["exact", "short", "long", "huge"]))
def test_structured_headers(tmp_path, obj, data_len, length_mode):
    text = json.dumps(obj).encode()
    n = {"exact": len(text), "short": max(len(text) - 3, 0), "long": len(text) + 5, "huge": 2**63}[length_mode]
    _check(tmp_path, struct.pack("<Q", n % 2**64) + text + b"\0" * data_len)


@FUZZ
@given(st.binary(max_size=300))
def test_raw_bytes(tmp_path, blob):
    _check(tmp_path, blob)
    _check(tmp_path, struct.pack("<Q", len(blob)) + blob)


def test_valid_header_is_accepted(tmp_path):
    from cabs_stream.io.safetensors_format import build_header
    head, _ = build_header([("a", "F32", (2, 3)), ("b", "BF16", (5,))], {"format": "pt"})
    p = tmp_path / "ok.safetensors"
    p.write_bytes(head + b"\0" * (24 + 10))
    tensors, meta = read_header(str(p))
    assert list(tensors) == ["a", "b"] and tensors["b"].start == len(head) + 24 and meta == {"format": "pt"}

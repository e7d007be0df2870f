"""PyTorch .bin inputs are read only with torch.load(weights_only=True): tensors yes, code no."""

from __future__ import annotations

import os

import pytest
import torch

from cabs_stream import CheckpointError, build_config, merge
from conftest import load_model, no_work_folder


def to_bin(src: str, dst: str) -> str:
    os.makedirs(dst, exist_ok=True)
    torch.save(load_model(src), os.path.join(dst, "pytorch_model.bin"))
    for f in ("config.json", "tokenizer.json"):
        if os.path.exists(os.path.join(src, f)):
            open(os.path.join(dst, f), "w").write(open(os.path.join(src, f)).read())
    return dst


def test_bin_inputs_merge_like_safetensors(family, tmp_path):
    bins = {k: to_bin(v, str(tmp_path / "bin" / k)) for k, v in family.items()}
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    merge(build_config(base=family["base"], models=[family["ft1"], family["ft2"]], n=3, m=8), a)
    merge(build_config(base=bins["base"], models=[bins["ft1"], bins["ft2"]], n=3, m=8), b)
    ta, tb = load_model(a), load_model(b)  # same tensors (the layout follows each base's order)
    assert set(ta) == set(tb) and all(torch.equal(ta[n], tb[n]) and ta[n].dtype == tb[n].dtype for n in ta)
    assert os.path.exists(os.path.join(b, "tokenizer.json"))
    assert no_work_folder(tmp_path)


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {EVIL_MARK}",))


EVIL_MARK = "/tmp/cabs-stream-pwned"


def test_crafted_pickle_is_refused(family, tmp_path):
    if os.path.exists(EVIL_MARK):
        os.remove(EVIL_MARK)
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"layer.0.w": torch.zeros(3), "payload": Evil()}, evil / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"evil.*pytorch_model.bin.*refused to load with torch.load\(weights_only=True\)"):
        merge(build_config(base=family["base"], models=[str(evil)], n=3, m=8), str(tmp_path / "out"))
    assert not os.path.exists(EVIL_MARK)
    assert not os.path.exists(tmp_path / "out")

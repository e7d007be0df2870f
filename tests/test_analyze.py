"""``cabs-stream analyze``: overlap, balance and per-layer density without a merge, and the plots."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from cabs_stream_cli.main import main as cli
from conftest import write_model

pytest.importorskip("matplotlib")


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_analyze_by_hand_and_plots(tmp_path):
    a = np.array([[4, 3, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 2]], float)
    b = np.array([[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 3, 3]], float)
    for name, v in (("base", np.zeros((2, 8))), ("a", a), ("b", b)):
        write_model(str(tmp_path / name), {"model.layers.0.w": (v, "F32"), "model.layers.1.w": (v, "F32")})
    cfg = {"merge_method": "cabs", "base_model": str(tmp_path / "base"),
           "models": [{"model": str(tmp_path / "a")}, {"model": str(tmp_path / "b")}],
           "parameters": {"overlap": "strict"}}
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "analysis"
    r = CliRunner().invoke(cli, ["analyze", str(path), "-o", str(out), "--method", "magnitude", "--method", "cabs",
                                 "--sparsity", "0.5", "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.load(open(out / "analysis.json"))
    mag, cabs = res["points"]
    # magnitude at density 0.5 keeps the top 8 of 16: all 7 non-zeros of a, all 6 of b;
    # they share positions 0, 1 and 15 -> overlap 3/7 and 3/6
    assert mag["density"] == [7 / 16, 6 / 16]
    assert mag["overlap"][0][1] == pytest.approx(3 / 7) and mag["overlap"][1][0] == pytest.approx(3 / 6)
    # CABS strict (tail rule: 16 elements of m=256 keep 8): b only gets the free non-zeros 2, 3, 14
    assert cabs["density"] == [7 / 16, 3 / 16] and cabs["overlap"][0][1] == 0
    # rows of a keep 6 and 1 -> mean 3.5, std 2.5
    assert mag["cv_rows"][0] == pytest.approx(2.5 / 3.5)
    assert mag["per_layer_kept"] == {"0": 7 / 16, "1": 7 / 16}
    assert not os.path.exists(out / ".analysis-work")
    sizes = {f: png_size(str(out / f)) for f in ("overlap_vs_sparsity.png", "density_heatmap.png", "per_layer_kept.png")}
    assert sizes == {"overlap_vs_sparsity.png": (600, 400), "density_heatmap.png": (800, 400),
                     "per_layer_kept.png": (600, 400)}
    assert all(os.path.getsize(out / f) > 5000 for f in sizes)

"""Inputs refused cleanly, or handled, instead of a traceback or a wrong output: zero-element
tensors, Hub revisions shaped like paths, tokenizers a parser rejects, and names or recipe
values that would leave their block of the model card."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

from cabs_stream import CheckpointError, ConfigError, build_config, load_config, merge, prune
from cabs_stream.report.model_card import model_card


def write_model(folder, tensors: dict[str, np.ndarray]) -> str:
    from safetensors.numpy import save_file
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    return str(folder)


def test_zero_element_tensors_are_merged(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((8, 16)).astype(np.float32)
    paths = [write_model(tmp_path / name, {"w": base + d, "empty": np.zeros((0, 16), np.float32),
                                           "none": np.zeros((0,), np.float32)})
             for name, d in (("base", 0), ("ft1", 0.1), ("ft2", -0.2))]
    res = merge(build_config(base=paths[0], models=paths[1:], n=2, m=8), str(tmp_path / "out"))
    from safetensors.numpy import load_file
    out = load_file(os.path.join(res.out_dir, "model-00001-of-00001.safetensors"))
    assert out["empty"].shape == (0, 16) and out["none"].shape == (0,) and out["w"].shape == (8, 16)
    prune(build_config(base=paths[0], models=paths[1:], n=2, m=8), str(tmp_path / "store"))


@pytest.mark.parametrize("revision", ["/etc/hostname", "../../../etc", "main/../x", "a//b", "./x", "main/"])
def test_hub_revisions_shaped_like_paths_are_refused(tmp_path, revision):
    from cabs_stream.io import hub
    with pytest.raises(CheckpointError, match="is not a branch, tag or commit name"):
        hub.local_path(f"someorg/somemodel@{revision}")
    hub.check_revision("someorg/somemodel@refs/pr/1")  # a real ref passes
    hub.check_revision("someorg/somemodel@v1.0-rc_2")


def test_a_tokenizer_the_parser_rejects_is_one_line(tmp_path):
    pytest.importorskip("transformers")
    from test_vocab import make_model, recipe
    paths = {k: str(tmp_path / k) for k in ("base", "ft1", "ft2")}
    base = make_model(paths["base"], 0, [])
    make_model(paths["ft1"], 1, ["<tool>"], base)
    make_model(paths["ft2"], 2, ["<img>"], base)
    with open(os.path.join(paths["ft1"], "tokenizer.json"), "w") as f:
        f.write('{"version": "1.0", "model": {"type": "Nonsense"}}')
    with pytest.raises(ConfigError, match=r"cannot read the tokenizer of .*ft1"):
        merge(load_config(recipe(tmp_path, paths, "task_arithmetic", tokenizer_source="union")),
              str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


HOSTILE = ["/x/a|b`c", "/x/``d``", "/x/e\n```\n[click](javascript:alert(1))\n<script>alert(1)</script>",
           "/x/<img src=x onerror=alert(1)>", "/x/**f**_|_[g](http://evil)"]


def test_model_card_keeps_every_input_inside_its_block():
    markdown_it = pytest.importorskip("markdown_it")
    cfg = build_config(method="cabs", base=HOSTILE[0], models=HOSTILE[1:], n=2, m=8)
    k = len(HOSTILE) - 1
    report = {"models": list(HOSTILE[1:]), "density": [0.25] * k,
              "overlap": [[None if i == j else 0.1 for j in range(k)] for i in range(k)]}
    title = "out `x` <b>|</b> [y](javascript:1) # *z*"
    card = model_card(cfg, report, title)
    body = card.split("---", 2)[2]  # after the front matter
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(body)
    flat = [t for tok in tokens for t in ([tok] + list(tok.children or []))]
    assert not [t for t in flat if t.type in ("html_inline", "html_block")]
    links = [t.attrGet("href") for t in flat if t.type == "link_open"]
    assert links == [cfg.spec.paper]
    fences = [t for t in tokens if t.type == "fence"]
    assert len(fences) == 1 and fences[0].info == "yaml"
    recipe = yaml.safe_load(fences[0].content)
    assert recipe["base_model"] == HOSTILE[0] and [m["model"] for m in recipe["models"]] == HOSTILE[1:]
    heading = next(tokens[i + 1] for i, t in enumerate(tokens) if t.type == "heading_open")
    assert heading.content.replace("\\", "") == title.replace("\\", "") or heading.children[0].content == title
    cells = [tokens[i + 1] for i, t in enumerate(tokens) if t.type == "td_open"]
    assert len(cells) == 2 * k  # every row has its two cells: no name split a row
    names = [c.children[0].content for c in cells[::2]]
    assert [n.replace("\\n", "\n") for n in names] == HOSTILE[1:]

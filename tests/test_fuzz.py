"""Hostile input never escapes as anything but the project's own errors (API) or one line and
exit code 2 (CLI): random YAML configs, CLI flags, index files and output paths.

More examples: CABS_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import shutil
import string

import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cabs_stream import CabsError, load_config, merge
from cabs_stream.io.checkpoint import open_checkpoint
from cabs_stream_cli.main import main as cli

EXAMPLES = int(os.environ.get("CABS_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=12),
                    st.sampled_from(["cabs", "ties", "fill", "strict", "bfloat16", "tensor", "global", "", "*"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
KEYS = ["merge_method", "base_model", "models", "parameters", "dtype", "tokenizer_source", "exclude"]
PARAMS = ["n", "m", "sparsity", "overlap", "pruning_order", "weight", "density", "gamma", "epsilon", "lambda",
          "normalize", "rescale", "random_seed", "scope", "select_topk", "filter_wise", "selection", "variant",
          "int8_mask"]


@st.composite
def configs(draw, family):
    doc = {}
    for key in draw(st.lists(st.sampled_from(KEYS + ["slices", "unknown"]), max_size=7, unique=True)):
        doc[key] = draw(values)
    if draw(st.booleans()):  # a plausible skeleton, with random parameters
        doc["base_model"] = family["base"]
        doc["models"] = [{"model": family[m], "parameters": draw(st.dictionaries(st.sampled_from(PARAMS), values,
                                                                                  max_size=3))}
                         for m in draw(st.lists(st.sampled_from(["ft1", "ft2", "ft3"]), max_size=3, unique=True))]
        doc["parameters"] = draw(st.dictionaries(st.sampled_from(PARAMS), values, max_size=4))
        doc["merge_method"] = draw(st.sampled_from(["cabs", "ties", "dare_ties", "della", "sce", "model_stock",
                                                    "linear", "magnitude", "ca_only", "bs_only", "slerp"]))
    return doc


@FUZZ
@given(st.data())
def test_yaml_configs(family, tmp_path, data):
    doc = data.draw(configs(family))
    path = tmp_path / "cfg.yml"
    try:
        text = yaml.safe_dump(doc)
    except yaml.YAMLError:
        return
    if data.draw(st.booleans()):  # aliases and raw damage
        text = data.draw(st.sampled_from(["a: &x [1, 2]\nb: *x\n", "base_model: *nope\n", "{", "- - -",
                                          "models: !!python/object:os.system ls\n", "\t\x00"])) + text
    path.write_text(text, encoding="utf-8", errors="surrogatepass") if "\ud800" not in text else None
    if not path.exists():
        return
    try:
        load_config(str(path))
    except CabsError:
        pass


FLAGS = ["--n", "--m", "--sparsity", "--overlap", "--density", "--gamma", "--epsilon", "--lambda", "--scope",
         "--random-seed", "--select-topk", "--selection", "--variant", "--weight", "--dtype", "--chunk-size",
         "--workers", "--memory", "--shard-size", "--method", "--pruning-order", "--exclude", "--tokenizer-source"]
BOOL_FLAGS = ["--normalize", "--no-normalize", "--rescale", "--filter-wise", "--allow-missing", "--allow-nonfinite",
              "--overwrite", "--save-masks", "--durable", "--quiet"]
flag_values = st.one_of(st.integers(-10, 300).map(str), st.sampled_from(["0.5", "1e400", "nan", "-1", "abc", "",
                                                                         "cabs", "ties", "1KB", "3", "8", "1GiB"]),
                        st.text(alphabet=string.printable, max_size=6))


@FUZZ
@given(st.data())
def test_cli_flags(family, tmp_path, data):
    args = ["merge", "--base", family["base"], "--model", family["ft1"], "--model", family["ft2"],
            "-o", str(tmp_path / "out"), "--quiet", "--overwrite"]
    for flag in data.draw(st.lists(st.sampled_from(FLAGS), max_size=4)):
        args += [flag, data.draw(flag_values)]
    args += data.draw(st.lists(st.sampled_from(BOOL_FLAGS), max_size=2, unique=True))
    r = CliRunner().invoke(cli, args)
    assert r.exit_code in (0, 2), (args, r.output, r.exception)
    if r.exit_code == 2:
        assert r.output.strip().splitlines()[-1].startswith(("error:", "Error:")), (args, r.output)


@FUZZ
@given(st.one_of(values, st.fixed_dictionaries({"weight_map": values}),
                 st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=10),
                                                                      st.sampled_from(["model.safetensors", "..",
                                                                                       "../x", "/etc/passwd", "",
                                                                                       "model-00001-of-00002.safetensors"]),
                                                                      max_size=4)})))
def test_index_files(family, tmp_path, doc):
    folder = tmp_path / "m"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(family["base"], folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps(doc))
    try:
        open_checkpoint(str(folder))
    except CabsError:
        pass


@FUZZ
@given(st.lists(st.one_of(st.text(min_size=1, max_size=40), st.sampled_from(["..", ".", "afile", "x" * 300])),
                min_size=1, max_size=4))
def test_output_paths(family, tmp_path, parts):
    afile = tmp_path / "afile"
    if not afile.exists():
        afile.write_text("x")
    out = os.path.join(str(tmp_path), *parts)
    from cabs_stream import build_config
    cfg = build_config(base=family["base"], models=[family["ft1"]], n=3, m=8)
    try:
        merge(cfg, out, overwrite=True, chunk_size=1024)
    except CabsError:
        pass
    assert afile.is_file() and afile.read_text() == "x", f"{out!r} replaced a file that was not an output"

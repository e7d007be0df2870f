"""Baseline methods end to end against the numpy reference, bit for bit, and independent of
chunking, workers and scheduler (including DARE's counter-based randomness)."""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np
import pytest
import yaml

from cabs_stream import build_config, load_config, merge
from conftest import as_f32, load_model
from reference import (combine_methods_ref, decode_ref, encode_ref, nm_masks_ref, select_ref, top_count,
                       uniform_ref)
from conftest import shard_bytes
from test_merge import assert_matches

pytestmark = pytest.mark.usefixtures("inputs_unchanged")
MODELS = ["ft1", "ft2", "ft3"]
W = [1.2, 0.8, 0.5]
D = [0.3, 0.5, 0.7]


class Spec(NamedTuple):
    """What each method does, as the test reads mergekit and the paper (independent of the code)."""
    selection: str
    consensus: bool = False
    normalize: bool = False
    rescale: bool = False
    linear: bool = False


SPEC = {
    "task_arithmetic": Spec("all"), "linear": Spec("all", normalize=True, linear=True),
    "ties": Spec("magnitude", consensus=True, normalize=True), "dare_linear": Spec("random", rescale=True),
    "dare_ties": Spec("random", consensus=True, rescale=True), "magnitude": Spec("magnitude"),
    "random": Spec("random"), "breadcrumbs": Spec("outliers"), "breadcrumbs_ties": Spec("outliers", consensus=True),
    "bs_only": Spec("nm"),
}


def reference(family, method, *, scope="tensor", seed=0, gamma=0.1, normalize=None, lam=1.0, n=3, m=8,
              exclude=()):
    spec = SPEC[method]
    normalize = spec.normalize if normalize is None else normalize
    base = load_model(family["base"])
    fts = [load_model(family[x]) for x in MODELS]
    import json
    import os
    order = json.load(open(os.path.join(family["base"], "model.safetensors.index.json")))["weight_map"]
    names = [n_ for n_ in order if base[n_].is_floating_point()]  # the model's order (global ties)
    taus = {nm: [as_f32(f[nm]) - as_f32(base[nm]) for f in fts] for nm in names}
    glob = {}
    if scope == "global" and spec.selection == "magnitude":
        flat = [np.concatenate([taus[nm][i] for nm in names]) for i in range(3)]
        masks = [select_ref(flat[i], "magnitude", density=D[i]) for i in range(3)]
        pos = 0
        for nm in names:
            size = taus[nm][0].size
            glob[nm] = [mk[pos:pos + size] for mk in masks]
            pos += size
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b.numpy()
            continue
        bf = as_f32(b)
        tv = taus[name]
        if any(p in name for p in exclude):
            res = bf
        else:
            key = zlib.crc32(name.encode())
            cols = b.shape[-1] if b.dim() >= 2 else b.numel()
            if spec.selection == "magnitude":
                keeps = glob.get(name) or [select_ref(tv[i], "row" if scope == "row" else "magnitude", density=D[i],
                                                      cols=cols) for i in range(3)]
            elif spec.selection == "outliers":
                keeps = [select_ref(tv[i], "band", density=D[i], gamma=gamma) for i in range(3)]
            elif spec.selection == "random":
                keeps = [select_ref(tv[i], "random", density=D[i], seed=seed, model=i, tensor_key=key) for i in range(3)]
            elif spec.selection == "nm":
                keeps = [nm_masks_ref([tv[i]], n, m)[0] for i in range(3)]
            else:
                keeps = [t != 0 for t in tv]
            vals = [as_f32(f[name]) for f in fts] if spec.linear else tv
            scale = [1 / d if spec.rescale else 1.0 for d in D]
            res = combine_methods_ref(bf, vals, keeps, W, scale, spec.consensus, normalize, lam, spec.linear)
        out[name] = decode_ref(encode_ref(res, "BF16"), "BF16").reshape(tuple(b.shape))
    return out


def config(family, method, **params):
    """The test's settings, keeping only the parameters ``method`` takes (others are errors)."""
    from cabs_stream.config import ModelSpec
    from cabs_stream.methods import registry
    takes = registry.get(method).param
    models = [ModelSpec(family[x], weight=w if takes("weight") else None, density=d if takes("density") else None)
              for x, w, d in zip(MODELS, W, D)]
    extra = {k: params.pop(k) for k in ("n", "m", "exclude") if k in params}
    params = {k: v for k, v in params.items() if takes(k)}
    return build_config(method=method, base=family["base"], models=models, params=params, **extra)


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "dare_ties", "magnitude", "random",
                                    "breadcrumbs", "breadcrumbs_ties", "bs_only", "task_arithmetic"])
def test_method_equals_reference(family, tmp_path, method):
    params = {"gamma": 0.1, "random_seed": 5} if method != "bs_only" else {"n": 3, "m": 8}
    out = str(tmp_path / "out")
    merge(config(family, method, **params), out, chunk_size=16)
    assert_matches(out, reference(family, method, seed=5, gamma=0.1))


@pytest.mark.parametrize("scope", ["tensor", "row", "global"])
def test_magnitude_scopes_exact(family, tmp_path, scope):
    out = str(tmp_path / "out")
    rep = merge(config(family, "magnitude", scope=scope), out, chunk_size=16).report
    assert_matches(out, reference(family, "magnitude", scope=scope))
    if scope == "global":
        total = rep["numel"]
        assert rep["kept"] == [min(top_count(d, total), nz) for d, nz in zip(D, rep["nonzero"])]


def test_ties_with_lambda_normalize_and_exclude(family, tmp_path):
    out = str(tmp_path / "out")
    merge(config(family, "ties", normalize=False, **{"lambda": 0.7}, exclude=["embed", "head"]), out)
    assert_matches(out, reference(family, "ties", normalize=False, lam=0.7, exclude=("embed", "head")))


@pytest.mark.parametrize("method", ["dare_ties", "ties", "breadcrumbs"])
def test_identical_across_chunking_and_workers(family, tmp_path, method):
    digests = []
    for i, (chunk, workers, sched) in enumerate([(8, 1, "threads"), (40, 2, "threads"), (1000, 2, "processes")]):
        out = str(tmp_path / f"o{i}")
        merge(config(family, method, random_seed=3), out, chunk_size=chunk, workers=workers, scheduler=sched)
        digests.append(shard_bytes(out))
    assert digests[0] == digests[1] == digests[2]


def test_dare_seed_changes_result_and_draws_match_reference():
    from cabs_stream.methods.gta_kernels import uniforms
    got = uniforms(7, 1, 12345, 1000, 50)
    assert np.array_equal(got, [uniform_ref(7, 1, 12345, 1000 + j) for j in range(50)])
    assert not np.array_equal(got, uniforms(8, 1, 12345, 1000, 50))
    big = uniforms(0, 0, 1, 0, 200_000)
    assert abs(big.mean() - 0.5) < 0.005 and abs((big < 0.3).mean() - 0.3) < 0.005


def test_mergekit_yaml_runs_unchanged(family, tmp_path):
    doc = {"merge_method": "ties", "base_model": family["base"],
           "models": [{"model": family["ft1"], "parameters": {"weight": 1.2, "density": 0.3}},
                      {"model": family["ft2"], "parameters": {"weight": [{"filter": "layer.0", "value": 0.0},
                                                                          {"value": 0.8}], "density": 0.5}}],
           "parameters": {"normalize": True, "int8_mask": True}, "dtype": "bfloat16"}
    path = tmp_path / "ties.yml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.warns(UserWarning, match="int8_mask"):
        cfg = load_config(str(path))
    assert cfg.value("weight", "layer.0.w", 1) == 0.0 and cfg.value("weight", "head.weight", 1) == 0.8
    merge(cfg, str(tmp_path / "out"))
    doc["parameters"]["not_a_key"] = 1
    path.write_text(yaml.safe_dump(doc))
    from cabs_stream import ConfigError
    with pytest.raises(ConfigError, match="unknown key 'not_a_key' in parameters"):
        load_config(str(path))


def test_published_2024_rules_by_hand():
    from cabs_stream.methods.published import published_2024
    m, n = 4, 3  # n >= m/2: rule 5 (complement plus top m//2 inside the first mask)
    base = np.zeros(10, np.float32)
    t1 = np.array([4, 3, 0, 1, 5, 0, 0, 0, 9, 9], np.float32)  # second group: zeros claimed by topk
    t2 = np.array([1, 2, 3, 4, 1, 1, 1, 1, 9, 9], np.float32)
    res, keep = published_2024(base, np.stack([t1, t2]), np.array([1.0, 1.0], np.float32), n, m, (0, 1))
    assert keep[0].tolist() == [1, 1, 0, 1, 1, 1, 1, 0, 0, 0]  # ties to the lower index; zeros claimed
    # model 2: complement {2} and {7}, plus its top 2 inside mask 1: {3, 1} and {4, 5}
    assert keep[1].tolist() == [0, 1, 1, 1, 1, 1, 0, 1, 0, 0]
    assert res[8:].tolist() == [0, 0]  # incomplete tail group: nothing selected
    assert res[:4].tolist() == [4, 5, 3, 5]  # fp16 sums
    # n < m/2: the second model takes its top n outside the first mask
    _, keep = published_2024(base[:4], np.stack([t1[:4], t2[:4]]), np.ones(2, np.float32), 1, 4, (1, 0))
    assert keep[1].tolist() == [0, 0, 0, 1] and keep[0].tolist() == [1, 0, 0, 0]


def test_published_2024_runs_end_to_end(family, tmp_path):
    from cabs_stream import ConfigError
    models = [family["ft1"], family["ft2"]]
    cfg = build_config(base=family["base"], models=models, weights=[1.2, 1.2], n=3, m=8,
                       params={"variant": "published-2024"})
    rep = merge(cfg, str(tmp_path / "out"), chunk_size=16).report
    assert rep["config"]["parameters"]["variant"] == "published-2024"
    assert merge(cfg, str(tmp_path / "out2"), chunk_size=1000).report["kept"] == rep["kept"]
    assert shard_bytes(str(tmp_path / "out")) == shard_bytes(str(tmp_path / "out2"))
    with pytest.raises(ConfigError, match="exactly two models"):
        build_config(base=family["base"], models=models + [family["ft3"]], params={"variant": "published-2024"})


@pytest.mark.parametrize("selection", ["magnitude", "random"])
def test_ca_only_equals_reference(family, tmp_path, selection):
    order = [2, 0, 1]
    cfg = build_config(method="ca_only", base=family["base"],
                       models=[__import__("cabs_stream").ModelSpec(family[x], weight=w, density=d)
                               for x, w, d in zip(MODELS, W, D)],
                       pruning_order=[family[MODELS[i]] for i in order],
                       params={"selection": selection, "random_seed": 9})
    out = str(tmp_path / "out")
    rep = merge(cfg, out, chunk_size=16).report
    base = load_model(family["base"])
    fts = [load_model(family[x]) for x in MODELS]
    exp = {}
    for name, b in base.items():
        if not b.is_floating_point():
            exp[name] = b.numpy()
            continue
        bf = as_f32(b)
        tv = [as_f32(f[name]) - bf for f in fts]
        used = np.zeros(bf.size, bool)
        keeps = [None] * 3
        taken = 0.0
        for i in order:
            t = np.where(used, 0, tv[i]).astype(np.float32)
            if selection == "magnitude":
                keeps[i] = select_ref(t, "magnitude", density=D[i])
            else:
                p = min(1.0, D[i] / (1 - taken)) if taken < 1 else 0.0
                taken += D[i]
                keeps[i] = select_ref(t, "random", density=p, seed=9, model=i, tensor_key=zlib.crc32(name.encode()))
            used |= keeps[i]
        res = combine_methods_ref(bf, tv, keeps, W, [1, 1, 1])
        exp[name] = decode_ref(encode_ref(res, "BF16"), "BF16").reshape(tuple(b.shape))
    assert_matches(out, exp)
    assert all(o is None or o == 0 for row in rep["overlap"] for o in row)


# ------------------------------------------------------------------ della, sce, model_stock
def _per_tensor(family, fn):
    """Expected output: ``fn(name, base_f32, [model_f32], shape)`` per float tensor, rounded to BF16."""
    base = load_model(family["base"])
    fts = [load_model(family[x]) for x in MODELS]
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b.numpy()
            continue
        res = fn(name, as_f32(b), [as_f32(f[name]) for f in fts], tuple(b.shape))
        out[name] = decode_ref(encode_ref(res, "BF16"), "BF16").reshape(tuple(b.shape))
    return out


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_equals_reference(family, tmp_path, method):
    from reference import della_ref
    eps = 0.1
    out = str(tmp_path / "out")
    merge(config(family, method, random_seed=4, epsilon=eps), out, chunk_size=16)

    def expect(name, b, fts, shape):
        cols = shape[-1] if len(shape) >= 2 else b.size
        key = zlib.crc32(name.encode())
        kv = [della_ref(f - b, cols, D[i], eps, seed=4, model=i, tensor_key=key) for i, f in enumerate(fts)]
        return combine_methods_ref(b, [v for _, v in kv], [k for k, _ in kv], W, [1, 1, 1],
                                   consensus=method == "della", normalize=method == "della")
    assert_matches(out, _per_tensor(family, expect))


def test_della_keeps_density_in_distribution():
    """Kept fraction per row is density on average, and a kept value is tau / p with p in density +- epsilon."""
    from reference import della_ref
    rng = np.random.default_rng(0)
    tau = rng.standard_normal(200 * 500).astype(np.float32)
    keep, vals = della_ref(tau, 500, 0.3, 0.1, seed=1)
    assert abs(keep.mean() - 0.3) < 0.01
    p = tau[keep] / vals[keep]
    assert p.min() >= 0.2 - 1e-6 and p.max() <= 0.4 + 1e-6
    big = np.abs(tau) > np.quantile(np.abs(tau), 0.9)  # large magnitudes are kept more often
    assert keep[big].mean() > 0.37 and keep[~big].mean() < 0.3


def test_della_epsilon_out_of_range_is_an_error(family, tmp_path):
    from cabs_stream import ConfigError
    with pytest.raises(ConfigError, match=r"density 0.3 \+- epsilon 0.4 of .*ft1 must lie in \(0, 1\)"):
        merge(config(family, "della", epsilon=0.4), str(tmp_path / "out"))
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("topk", [1.0, 0.4, 0.0])
def test_sce_equals_reference(family, tmp_path, topk):
    from cabs_stream import ModelSpec
    from reference import sce_ref
    cfg = build_config(method="sce", base=family["base"], models=[ModelSpec(family[x]) for x in MODELS],
                       params={"select_topk": topk})
    out = str(tmp_path / "out")
    merge(cfg, out, chunk_size=16)
    assert_matches(out, _per_tensor(family, lambda name, b, fts, shape: sce_ref(b, fts, topk)[0]))


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_equals_reference(family, tmp_path, filter_wise):
    from reference import model_stock_ref
    cfg = build_config(method="model_stock", base=family["base"], models=[family[x] for x in MODELS],
                       params={"filter_wise": filter_wise})
    out = str(tmp_path / "out")
    merge(cfg, out, chunk_size=16)

    def expect(name, b, fts, shape):
        cols = (shape[-1] if len(shape) >= 2 else b.size) if filter_wise else None
        return model_stock_ref(b, fts, cols)
    assert_matches(out, _per_tensor(family, expect))


def test_model_stock_needs_two_models(family):
    from cabs_stream import ConfigError
    with pytest.raises(ConfigError, match="at least two fine-tuned models"):
        build_config(method="model_stock", base=family["base"], models=[family["ft1"]])


@pytest.mark.parametrize("method, params", [("della", {"random_seed": 2}), ("sce", {"select_topk": 0.3}),
                                            ("model_stock", {"filter_wise": True})])
def test_new_methods_identical_across_chunking_and_workers(family, tmp_path, method, params):
    digests = []
    for i, (chunk, workers, sched) in enumerate([(8, 1, "threads"), (40, 2, "threads"), (1000, 2, "processes")]):
        out = str(tmp_path / f"o{i}")
        merge(config(family, method, **params), out, chunk_size=chunk, workers=workers, scheduler=sched)
        digests.append(shard_bytes(out))
    assert digests[0] == digests[1] == digests[2]


def test_parameter_of_another_method_is_an_error(family):
    from cabs_stream import ConfigError
    with pytest.raises(ConfigError, match="'density' .* does not apply to merge_method cabs"):
        build_config(method="cabs", base=family["base"], models=[family["ft1"]], density=0.5)
    with pytest.raises(ConfigError, match="'weight' .* does not apply to merge_method sce"):
        build_config(method="sce", base=family["base"], models=[family["ft1"], family["ft2"]], weights=[1.0, 1.0])

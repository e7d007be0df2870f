"""The surfaces around a merge keep its promises: sweep deletes only the folders it named and
made, refuses a record it did not write and a folder another user could have planted; fixed-name
files are replaced, never written through a symlink; side files linking outside their model
folder are not copied, and copies keep the source's mode at most."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from cabs_stream import ConfigError, OutputError, build_config, merge, sweep
from cabs_stream.io.output import check_own_folder, write_json

pytestmark = pytest.mark.usefixtures("inputs_unchanged")
MODELS = ("ft1", "ft2", "ft3")


def cfg(family):
    return build_config(method="cabs", base=family["base"], models=[family[x] for x in MODELS], n=2, m=8)


def score(model: str) -> float:
    w = json.load(open(os.path.join(model, "cabs_manifest.json")))["models"][0]["weight"]
    return -(w - 1.0) ** 2


def test_sweep_deletes_only_the_folders_it_named(family, tmp_path):
    out = tmp_path / "sweep"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    sweep(cfg(family), str(out), weights="0.8:1.0:0.2", evaluate=score)
    doc = json.load(open(out / "sweep.json"))
    doc["points"][0]["folder"] = str(victim)  # an edited record names an unrelated folder
    (out / "sweep.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="not a sweep record of this tool"):
        sweep(cfg(family), str(out), weights="0.6:1.2:0.2", evaluate=score)
    assert (victim / "notes.txt").read_text() == "keep me"
    for damaged in ("{", '{"points": [{"weights": "x"}]}', "[]"):
        (out / "sweep.json").write_text(damaged)
        with pytest.raises(ConfigError, match="sweep.json"):
            sweep(cfg(family), str(out), weights="0.6:1.2:0.2", evaluate=score)
    assert (victim / "notes.txt").read_text() == "keep me"


def test_fixed_name_files_are_replaced_not_written_through(family, tmp_path):
    out = tmp_path / "sweep"
    out.mkdir(mode=0o755)
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    for name in ("sweep.csv", ".sweep.json.tmp"):
        os.symlink(secret, out / name)
    sweep(cfg(family), str(out), weights="0.9:1.0:0.1", evaluate=score)
    assert secret.read_text() == "private"
    assert not os.path.islink(out / "sweep.csv") and "weight_1" in (out / "sweep.csv").read_text()
    target = tmp_path / "t.json"
    os.symlink(secret, target)
    write_json(str(target), {"a": 1})
    assert secret.read_text() == "private" and json.loads(target.read_text()) == {"a": 1}


def test_a_folder_others_could_have_planted_is_refused(family, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)  # writable by everyone: anything in it may be another user's
    with pytest.raises(OutputError, match="closed to others"):
        sweep(cfg(family), str(shared), weights="1.0:1.0:0.1", evaluate=score)
    link = tmp_path / "link"
    os.symlink(tmp_path, link)
    with pytest.raises(OutputError, match="not a folder of yours"):
        check_own_folder(str(link), "sweep folder")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_a_sweep_folder_of_another_user_is_refused(family, tmp_path):
    import pwd
    other = pwd.getpwnam("nobody").pw_uid
    planted = tmp_path / "planted"
    (planted / "points").mkdir(parents=True)
    (planted / "sweep.json").write_text(json.dumps({"config": cfg(family).describe(), "points": []}))
    for p in (planted, planted / "points", planted / "sweep.json"):
        os.chown(p, other, other)
    os.chmod(planted, 0o755)
    with pytest.raises(OutputError, match="another user's"):
        sweep(cfg(family), str(planted), weights="1.0:1.0:0.1", evaluate=score)
    assert not os.path.exists(planted / "store.zarr")


def test_side_files_linking_outside_the_model_are_not_copied(family, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN KEY-----")
    os.chmod(secret, 0o600)
    base = str(tmp_path / "hostile_base")  # a copy of the family's base, given hostile side files
    shutil.copytree(family["base"], base)
    creds = tmp_path / "credentials.json"  # valid JSON: the checkpoint reads it as the config
    creds.write_text('{"model_type": "llama", "token": "s3cret"}')
    if os.path.lexists(os.path.join(base, "config.json")):
        os.remove(os.path.join(base, "config.json"))
    os.symlink(creds, os.path.join(base, "config.json"))
    os.symlink(secret, os.path.join(base, "generation_config.json"))
    with open(os.path.join(base, "tokenizer_config.json"), "w") as f:
        f.write("{}")
    os.chmod(os.path.join(base, "tokenizer_config.json"), 0o600)
    os.symlink("tokenizer_config.json", os.path.join(base, "special_tokens_map.json"))  # inside: copied
    config = build_config(method="cabs", base=base, models=[family[x] for x in MODELS], n=2, m=8)
    with pytest.warns(UserWarning, match="links outside its model folder"):
        res = merge(config, str(tmp_path / "out"))
    assert not os.path.exists(os.path.join(res.out_dir, "config.json"))
    assert not os.path.exists(os.path.join(res.out_dir, "generation_config.json"))
    copied = os.path.join(res.out_dir, "tokenizer_config.json")
    assert open(copied).read() == "{}" and stat.S_IMODE(os.stat(copied).st_mode) & 0o077 == 0
    assert os.path.exists(os.path.join(res.out_dir, "special_tokens_map.json"))
    assert secret.read_text() == "-----BEGIN KEY-----"


def test_cabs_stream_yaml_never_deletes_what_it_did_not_write(family, tmp_path):
    from click.testing import CliRunner

    from cabs_stream_cli.mergekit_yaml import main as yaml_cli
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: cabs\nbase_model: {family['base']}\nmodels:\n"
                      + "".join(f"  - model: {family[x]}\n" for x in MODELS) + "parameters: {n: 2, m: 8}\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "eval").mkdir()
    r = CliRunner().invoke(yaml_cli, [str(recipe), str(out), "--quiet"])
    assert r.exit_code == 2 and "holds eval, notes.txt, which a merge does not write" in r.output, r.output
    assert (out / "notes.txt").read_text() == "mine" and (out / "eval").is_dir()
    (out / "notes.txt").unlink()
    (out / "eval").rmdir()
    assert CliRunner().invoke(yaml_cli, [str(recipe), str(out), "--quiet"]).exit_code == 0  # an empty folder
    first = json.load(open(out / "cabs_report.json"))["density"]
    r = CliRunner().invoke(yaml_cli, [str(recipe), str(out), "--quiet"])  # an earlier merge: replaced
    assert r.exit_code == 0, r.output
    assert json.load(open(out / "cabs_report.json"))["density"] == first

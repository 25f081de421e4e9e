"""Bad configs fail before any work with exit code 2 and a message naming the YAML path of the field."""

import re

import pytest
import yaml
from support.data import make_input

from curate.base import ConfigError
from curate.core.config import apply_overrides, load_config


@pytest.fixture
def base(tmp_path):
    make_input(tmp_path / "in.parquet", 50)
    return {
        "name": "t",
        "input": {"path": str(tmp_path / "in.parquet"), "url_col": "URL", "caption_col": "TEXT"},
        "output": {"path": str(tmp_path / "out")},
        "stages": [{"stage": "basic_filter", "name": "filter", "min_words": 2}],
    }


def write(tmp_path, doc):
    p = tmp_path / "p.yaml"
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


@pytest.mark.parametrize(
    "mutate, field, words",
    [
        (
            lambda d: d.update(inptu={"path": "x"}),
            "inptu",
            "unknown key; allowed here: executor, input, name",
        ),
        (
            lambda d: d["input"].update(fmt="csv"),
            "input.fmt",
            "allowed here: caption_col, caption_field, captions, format, image_col, max_caption_chars, path, uid_col, url_col",
        ),
        (lambda d: d.update(shard_size="many"), "shard_size", "valid integer"),
        (lambda d: d.update(shard_size=0), "shard_size", "greater than 0"),
        (
            lambda d: d["input"].update(format="xlsx"),
            "input.format",
            "'parquet', 'csv', 'tsv', 'jsonl', 'txt', 'webdataset' or 'folder'",
        ),
        (lambda d: d.update(executor={"kind": "spark"}), "executor.kind", "'local' or 'ray'"),
        (
            lambda d: d["stages"].append({"stage": "clip_scor"}),
            "stages[1].stage",
            "unknown stage 'clip_scor'",
        ),
        (lambda d: d["stages"][0].update(min_words="two"), "stages[0].min_words", "valid integer"),
        (
            lambda d: d["stages"][0].update(min_wrods=2),
            "stages[0].min_wrods",
            "allowed here: max_aspect_ratio",
        ),
        (
            lambda d: d["stages"].append({"stage": "basic_filter", "name": "filter"}),
            "stages[1].name",
            "unique",
        ),
        (lambda d: d["stages"].append({"name": "x"}), "stages[1]", "'stage' key"),
        (lambda d: d.pop("output"), "output", "required, but missing"),
        (lambda d: d["stages"][0].update(resources={"gpus": -1}), "stages[0].resources.gpus", "greater than"),
    ],
)
def test_bad_config_exits_2_naming_the_field(tmp_path, base, cli, mutate, field, words):
    mutate(base)
    r = cli("validate", write(tmp_path, base))
    assert r.code == 2, r
    assert f"{field}:" in r.err and words in r.err, r.err
    assert not (tmp_path / "out").exists()


def test_a_stage_reading_a_column_nobody_writes(tmp_path, base, cli):
    base["stages"][0]["min_width"] = 64  # basic_filter then reads `width`, which only a download writes
    r = cli("run", write(tmp_path, base))
    assert r.code == 2, r
    assert "stages[0] (filter): reads column 'width'" in r.err
    assert "written by the 'download' stage" in r.err
    assert not (tmp_path / "out").exists()


def test_a_dedup_that_compares_phashes_after_a_download_that_computes_none(tmp_path, base, cli):
    base["stages"] = [
        {"stage": "download", "perceptual_hash": False},
        # perceptual dedup (on by default) compares phash; without verify_cosine it needs no embeddings
        {"stage": "dedup", "semantic": False, "keep": ["width"], "perceptual": {"verify_cosine": None}},
    ]
    r = cli("run", write(tmp_path, base))
    assert r.code == 2, r
    assert (
        "stages[1] (dedup): reads column 'phash', which stages[0] (download) leaves null on every row "
        "(stages[0].perceptual_hash: false)"
    ) in r.err
    assert "'phash_mirror'" in r.err and "image_embedding" not in r.err and not (tmp_path / "out").exists()
    base["stages"][1] |= {"perceptual": False, "decontaminate": {"path": "x"}}
    r = cli("validate", write(tmp_path, base))
    assert r.code == 2 and "stages[1] (dedup): reads column 'phash'" in r.err, r
    del base["stages"][1]["decontaminate"]  # exact dedup alone compares sha256
    assert cli("validate", write(tmp_path, base)).code == 0
    base["stages"][0]["perceptual_hash"] = True
    base["stages"][1]["perceptual"] = {"verify_cosine": None}
    assert cli("validate", write(tmp_path, base)).code == 0


def test_required_columns_are_checked_against_the_input(tmp_path, base, cli):
    base["stages"][0]["required_columns"] = ["similarity", "nope"]
    r = cli("validate", write(tmp_path, base))
    assert r.code == 2 and "reads column 'nope'" in r.err and "similarity" not in r.err.split("nope")[0], r


def test_not_yaml_and_missing_file(tmp_path, cli):
    r = cli("validate", write(tmp_path, "name: [unclosed"))
    assert r.code == 2 and "not valid YAML" in r.err
    r = cli("validate", tmp_path / "missing.yaml")
    assert r.code == 2 and "cannot read" in r.err
    r = cli("validate", write(tmp_path, "- a list"))
    assert r.code == 2 and "top level must be a mapping" in r.err


def test_usage_error_exits_2(tmp_path, cli):
    assert cli("run").code == 2
    assert cli("run", "p.yaml", "--no-such-flag").code == 2


def test_set_overrides_by_stage_name_and_index(tmp_path, base):
    p = write(tmp_path, base)
    cfg = load_config(p, ["stages.filter.min_words=3", "shard_size=7", "executor.kind=ray"])
    assert cfg.stages[0].config.min_words == 3 and cfg.shard_size == 7 and cfg.executor.kind == "ray"
    cfg = load_config(p, ["stages.0.required_columns=[similarity]"])
    assert cfg.stages[0].config.required_columns == ["similarity"]
    with pytest.raises(ConfigError, match="no stage named 'filtr'; stages: filter"):
        load_config(p, ["stages.filtr.min_words=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(p, ["shard_size"])
    with pytest.raises(ConfigError, match=re.escape("stages[0].min_words: Input should be a valid integer")):
        load_config(p, ["stages.filter.min_words=lots"])


def test_set_does_not_change_the_callers_dict():
    raw = {"a": {"b": 1}}
    assert apply_overrides(raw, ["a.b=2"]) == {"a": {"b": 2}} and raw == {"a": {"b": 1}}


def test_env_interpolation(tmp_path, base, monkeypatch):
    base["output"]["path"] = "${CURATE_TEST_OUT}/run"
    base["name"] = "${CURATE_TEST_NAME:-fallback}"
    monkeypatch.setenv("CURATE_TEST_OUT", str(tmp_path / "o"))
    cfg = load_config(write(tmp_path, base))
    assert cfg.output.path == f"{tmp_path}/o/run" and cfg.name == "fallback"
    monkeypatch.delenv("CURATE_TEST_OUT")
    with pytest.raises(ConfigError, match=r"output.path: environment variable CURATE_TEST_OUT is not set"):
        load_config(write(tmp_path, base))


def test_fingerprint_ignores_executor_but_not_stage_params(tmp_path, base):
    p = write(tmp_path, base)
    a = load_config(p)
    assert (
        load_config(p, ["executor.kind=ray", "stages.filter.resources.cpus=0.5"]).fingerprint()
        == a.fingerprint()
    )
    assert load_config(p, ["stages.filter.min_words=5"]).fingerprint() != a.fingerprint()

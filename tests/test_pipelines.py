"""The bundled pipelines parse, validate and pass the column-flow check as shipped."""

from importlib.resources import files

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.core.config import load_config
from curate.core.pipeline import Pipeline

YAMLS = sorted(p.name for p in files("curate.pipelines").iterdir() if p.name.endswith(".yaml"))
BUNDLED = [n for n in YAMLS if not n.startswith("train_")]  # train_*.yaml are training configs


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_pipeline_checks(tmp_path, name):
    path = files("curate.pipelines") / name
    text = path.read_text()
    url, caption = ("URL", "TEXT") if "url_col: URL" in text else ("url", "caption")
    pq.write_table(
        pa.table({url: ["http://example.com/a.jpg"], caption: ["a red circle"]}), tmp_path / "in.parquet"
    )
    config = load_config(
        str(path), [f"input.path={tmp_path / 'in.parquet'}", f"output.path={tmp_path / 'out'}"]
    )
    columns = Pipeline(config).check()
    assert config.output.path == str(tmp_path / "out")
    if name in ("demo.yaml", "laion_subset.yaml"):
        assert any(s.stage == "dedup" for s in config.stages)
        assert {"dup_of", "dup_kind", "phash", "image_embedding"} <= set(columns)


def test_bundled_pipelines_are_found():
    assert {"demo.yaml", "laion_subset.yaml"} <= set(BUNDLED)


@pytest.mark.parametrize("name", [n for n in YAMLS if n.startswith("train_")])
def test_bundled_training_configs_load(name):
    from curate.train.config import load_train_config

    cfg = load_train_config(str(files("curate.pipelines") / name), ["output=elsewhere"])
    assert cfg.output == "elsewhere" and cfg.data.shards and cfg.schedule.steps > 0

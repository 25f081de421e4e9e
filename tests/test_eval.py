"""``curate eval`` on a tiny checkpoint trained for one step on a small run of the sample world (test_train's
``run`` on 48 rows): the shipped suites, every category's counts, VQAScore (a tiny random LLaVA) and the world's exact
adherence per image equal to the scorers' own output on the saved images, the agreement between them, the
HTML page, and bad suites."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_pipeline
from PIL import Image
from support.data import make_tiny_clip
from test_train import _config

from curate.train.eval import CATEGORIES, load_suite
from curate.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory, world_server):
    """48 rows of the world: downloaded at 64 px and scored with a tiny CLIP (the text encoder's), 1 shard."""
    import pyarrow.parquet as pq

    from curate.core.config import load_config
    from curate.core.runner import run_pipeline

    world, server = world_server
    tmp = tmp_path_factory.mktemp("eval-run")
    clip = make_tiny_clip(tmp / "clip")
    pipeline = write_pipeline(
        tmp / "p.yaml",
        tmp / "in.parquet",
        tmp / "run",
        [
            {"stage": "download", "image_size": 64, "allow_private": [server.host_port]},
            {"stage": "clip_score", "model": f"local-dir:{clip}", "torch_threads": 1, "decode_threads": 1},
        ],
        input={"url_col": "url", "caption_col": "caption"},
        shard_size=48,
    )
    pq.write_table(world.input_table(server.url).slice(0, 48), tmp / "in.parquet")
    run_pipeline(load_config(pipeline, []), overwrite=True, show_progress=False)
    return {"run": tmp / "run", "clip": clip}


def test_shipped_suites_cover_the_categories_and_state_their_source():
    from curate.demo.adherence import parse_prompt

    geneval = load_suite("geneval")
    assert geneval.categories == list(CATEGORIES) and "djghosh13/geneval" in geneval.source
    assert all(sum(c == cat for c, _ in geneval.prompts) == 8 for cat in CATEGORIES)
    assert ("position", "a photo of a cat left of a chair") in geneval.prompts
    world = load_suite("world")
    assert world.exact == "world" and "position" not in world.categories and len(world.categories) == 5
    assert all(parse_prompt(p) is not None for _, p in world.prompts)  # the analyser scores every one


def test_eval_scores_each_category_and_checks_vqascore_against_the_worlds_analyser(run, tmp_path, cli):
    from curate.demo.adherence import adherence_of
    from curate.demo.tiny_captioners import build_tokenizer, make_tiny_vlm
    from curate.models.vqa import QUESTION, VqaScorer

    suite = load_suite("world")
    prompts = [p for _, p in suite.prompts for _ in range(2)]
    texts = [QUESTION.format(p) for _, p in suite.prompts] * 2 + ["Yes", "No"] * 200  # "Yes" is one token
    vlm = make_tiny_vlm("llava", tmp_path / "vlm", tokenizer=build_tokenizer(texts, vocab_size=200))
    train(_config(run, tmp_path / "t", **{"schedule.steps": 1, "checkpoint.every": 1}), progress=False)

    r = cli("eval", tmp_path / "t", "--suite", "world", "--vqa-model", vlm, "-n", 2, "--steps", 2)
    assert r.code == 0, r.err
    out = tmp_path / "t" / "eval" / "world-step-00000001"
    result = json.loads((out / "eval.json").read_text())
    assert result["step"] == 1 and result["metrics"] == ["clip_score", "vqa_score"]
    assert result["exact"] == ["adherence"] and "vqa_score" in result["models"]
    assert list(result["categories"]) == suite.categories
    for cat in suite.categories:
        want = sum(c == cat for c, _ in suite.prompts)
        assert (result["categories"][cat]["prompts"], result["categories"][cat]["n"]) == (want, 2 * want)
    rows = result["images"]
    assert [r["prompt"] for r in rows] == prompts and result["overall"]["n"] == len(prompts)

    images = [Image.open(out / r["path"]).convert("RGB") for r in rows]
    assert images[0].size == (16, 16)
    vqa = VqaScorer.load(vlm, "vlm", device="cpu")(images, prompts)["per_prompt"]
    np.testing.assert_allclose([r["vqa_score"] for r in rows], vqa, rtol=1e-5, atol=1e-7)
    exact = adherence_of(images, prompts)["per_prompt"]
    assert [r["adherence"] for r in rows] == exact
    assert all(0 <= r["clip_score"] <= 100 for r in rows)

    for cat in suite.categories:
        mine = [i for i, r in enumerate(rows) if r["category"] == cat]
        got = result["categories"][cat]
        assert got["vqa_score"] == pytest.approx(np.mean([vqa[i] for i in mine]))
        assert got["adherence"] == pytest.approx(np.mean([exact[i] for i in mine]))
        assert got["adherence_correct"] == pytest.approx(np.mean([exact[i] == 1 for i in mine]))
        agree = got["agreement"]["vqa_score~adherence"]
        assert agree["n"] == len(mine)
        assert agree["decision_agreement@0.5"] == pytest.approx(
            np.mean([(vqa[i] >= 0.5) == (exact[i] == 1) for i in mine])
        )
        a, b = np.array([vqa[i] for i in mine]), np.array([exact[i] for i in mine])
        if a.std() > 0 and b.std() > 0:
            assert agree["pearson"] == pytest.approx(np.corrcoef(a, b)[0, 1])
        else:
            assert agree["pearson"] is None
    assert "clip_score~adherence" in result["overall"]["agreement"]

    page = (out / "eval.html").read_text()
    for cat in suite.categories:
        assert f"<h2>{CATEGORIES[cat]}</h2>" in page
    assert "agreement with the exact scores" in page and page.count("<div class='card'") == len(prompts)


def test_a_bad_suite_is_a_clear_error(tmp_path, cli):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"tag": "single_object", "prompt": "a photo of a cat"}\n{"tag": "colours", "prompt": "x"}\n'
    )
    r = cli("eval", tmp_path, "--suite", bad)
    assert r.code == 2 and "line 2: tag 'colours' is not a category" in r.err and "Traceback" not in r.err
    bad.write_text('{"tag": "counting", "prompt": "two cats"}\nnot json\n')
    r = cli("eval", tmp_path, "--suite", bad)
    assert r.code == 2 and "line 2: not JSON" in r.err
    r = cli("eval", tmp_path, "--suite", "nosuch")
    assert r.code == 2 and "no suite 'nosuch'" in r.err and "geneval" in r.err
    r = cli("eval", tmp_path, "--suite", "world")
    assert r.code == 2 and "neither a checkpoint" in r.err

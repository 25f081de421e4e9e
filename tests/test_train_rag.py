"""Retrieval conditioning on the neighbours' images and captions (``retrieval.condition: images_and_captions``,
Re-Imagen / RealRAG): it trains, resumes exactly and generates; each neighbour's caption and image reach the
UNet, and neighbour dropout (or retrieval guidance 0) takes them out again. The embedding-only mode is
tests/test_train.py's retrieval test.

The run, index and tiny models are tests/test_train.py's (its ``run`` fixture); what is checked is behaviour,
not image quality (benchmarks/rag_rare_concepts.py measures that)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import _config, run  # noqa: F401 - run is the fixture this module uses too

from curate.train.generate import generate, load_generator
from curate.train.model import Neighbours
from curate.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the tiny random CLIP finds every pair of images ~0.999 alike: only the sample itself and its duplicates are
# left out, so that neighbours are found at all
RAG = {
    "condition": "images_and_captions",
    "k": 2,
    "image_size": 8,
    "patch": 4,
    "caption_tokens": 8,
    "exclude_similarity": 1.01,
}


def _rag_config(run, output, steps: int, every: int):  # noqa: F811 - run: the fixture
    return _config(
        run,
        output,
        **{
            "model.retrieval": {"index": str(run["index"]), **RAG},
            "optim.rag_dropout": 0.3,
            "schedule.steps": steps,
            "checkpoint.every": every,
        },
    )


@pytest.fixture(scope="module")
def trained(run, tmp_path_factory):  # noqa: F811 - run: the fixture
    out = tmp_path_factory.mktemp("rag") / "a"
    lines: list[str] = []
    train(_rag_config(run, out, 2, 2), say=lines.append, progress=False)
    assert any("2 neighbours for each of" in line and "(0 had fewer" in line for line in lines)
    return out


def test_images_and_captions_train_with_their_own_tokens_and_resume_exactly(run, trained, tmp_path):  # noqa: F811
    weights = load_file(trained / "checkpoints/step-00000002/model.safetensors")
    # per neighbour: (8 / 4)^2 image patches and 8 caption tokens, of the text width (32)
    assert weights["retrieval.null"].shape == (2 * (4 + 8), 32)
    assert weights["retrieval.image.0.weight"].shape[:2] == (32, 3)
    assert weights["retrieval.caption.weight"].shape == (32, 32)
    first = load_file(trained / "checkpoints/step-00000002/model.safetensors")
    train(_rag_config(run, tmp_path / "b", 1, 1), progress=False)
    resumed = train(_rag_config(run, tmp_path / "b", 2, 1), progress=False)
    assert resumed["steps"] == 2
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(trained / "checkpoints/step-00000002" / name)
        b = load_file(tmp_path / "b/checkpoints/step-00000002" / name)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    one = load_file(tmp_path / "b/checkpoints/step-00000001/model.safetensors")
    assert not torch.equal(one["retrieval.caption.weight"], first["retrieval.caption.weight"])  # trained


def test_generation_retrieves_images_and_captions(run, trained):  # noqa: F811
    prompt = ["a red circle on a blue background"]
    with_rag = generate(trained, prompt, steps=2, rag=str(run["index"]), rag_guidance=2)
    without = generate(trained, prompt, steps=2)
    assert with_rag["images"].shape == (1, 16, 16, 3)
    assert not np.array_equal(with_rag["images"], without["images"])
    with pytest.raises(ValueError, match="k=2"):
        generate(trained, prompt, steps=2, rag=str(run["index"]), k=3)


def _neighbours(gen, captions: list[str], shade: int = 0) -> Neighbours:
    images = torch.zeros(1, 2, 8, 8, 3, dtype=torch.uint8)
    images[0, 0, 2:6, 2:6] = torch.tensor([220, 40, 40], dtype=torch.uint8)
    images[0, 1] = shade
    return gen.encode_neighbours(images, [captions], "cpu")


def test_neighbours_captions_and_images_reach_the_unet_unless_dropped(trained):
    gen, _ = load_generator(trained)
    a = _neighbours(gen, ["a red circle on a blue background", "a green star on a white background"])
    b = _neighbours(gen, ["a red circle on a blue background", "a purple square on a black background"])
    c = _neighbours(
        gen, ["a red circle on a blue background", "a green star on a white background"], shade=90
    )
    assert a.images.shape == (1, 2, 3, 8, 8) and a.captions.shape == (1, 2, 8, 32)
    assert torch.equal(a.images, b.images) and not torch.equal(a.captions, b.captions)
    text = gen.text.encode(["a red circle on a blue background"], "cpu")
    null = gen.null_text("cpu")
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        out = {name: gen.denoiser(x, t, text, null, nb) for name, nb in (("a", a), ("b", b), ("c", c))}
        drop = torch.tensor([True])
        dropped = {
            name: gen.denoiser(x, t, text, null, nb, drop_rag=drop) for name, nb in (("a", a), ("b", b))
        }
        unconditioned = gen.denoiser(x, t, text, null, None)
    assert not torch.equal(out["a"], out["b"])  # one neighbour's caption changed
    assert not torch.equal(out["a"], out["c"])  # one neighbour's image changed
    assert torch.equal(dropped["a"], dropped["b"]) and torch.equal(dropped["a"], unconditioned)
    # in sampling, through retrieval guidance: 0 leaves the neighbours out, exactly
    kw = {"steps": 2, "seed": 3, "guidance": 3.0}
    assert not np.array_equal(
        gen.sample(["x"], neighbours=a, rag_guidance=2, **kw),
        gen.sample(["x"], neighbours=b, rag_guidance=2, **kw),
    )
    assert np.array_equal(
        gen.sample(["x"], neighbours=a, rag_guidance=0, **kw),
        gen.sample(["x"], neighbours=b, rag_guidance=0, **kw),
    )


def test_the_world_can_make_a_concept_rare_without_changing_its_other_rows():
    from curate.demo.world import build_world

    plain = build_world(300, seed=3, photos=False)
    rare = build_world(300, seed=3, photos=False, rare=("purple", "star"), rare_share=0.0)
    assert not any("purple" in r["caption"] or "star" in r["caption"] for r in rare.truth)
    assert len(rare.rows) == len(plain.rows)
    untouched = [
        a == b
        for a, b in zip(plain.truth, rare.truth, strict=True)
        if a["kind"] == "clean" and not {"purple", "star"} & set(a["caption"].replace(",", " ").split())
    ]
    assert untouched and all(untouched)  # a clean row that names no rare word is the same row
    few = build_world(300, seed=3, photos=False, rare=("purple",), rare_share=0.2)
    named = sum("purple" in r["caption"] for r in few.truth)
    assert 0 < named < sum("purple" in r["caption"] for r in plain.truth) / 2
    with pytest.raises(ValueError, match="pink"):
        build_world(10, rare=("pink",))

"""curate.demo.rag_compare at tiny sizes (a world of 300 rows, 5 training steps, 4 prompts of each kind): the
numbers it reports reconcile with its per-prompt scores and prompts, and `curate demo --rag` runs it and
prints its table. The numbers themselves mean nothing at this size (benchmarks/RESULTS.md has the measured
ones)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from curate.demo import rag_compare
from curate.demo.rag_compare import KINDS, RagSettings, compare_rag, table_lines

pytest.importorskip("torch")

TINY = RagSettings(rows=300, steps=5, prompts=4, sample_steps=2, threads=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("rag") / "rag"
    said: list[str] = []
    return out, compare_rag(out, TINY, say=said.append, side_by_side=False), said


def test_per_arm_per_kind_numbers_reconcile(tiny):
    from curate.demo.world import COLOURS

    out, report, said = tiny
    assert json.loads((out / "rag_compare.json").read_text()) == json.loads(json.dumps(report))
    assert report["settings"]["steps"] == 5 and report["settings"]["arms"] == ["none", "images_and_captions"]
    assert 0 < report["rare_rows"] < report["corpus_rows"] <= 300  # purple is rare, but there
    assert "purple" in COLOURS

    prompts = report["prompts"]
    assert [len(prompts[k]) for k in KINDS] == [4, 4]
    assert all("purple" in p for p in prompts["rare"]) and not any("purple" in p for p in prompts["common"])
    assert not set(prompts["rare"]) & set(prompts["common"])

    results = report["results"]
    assert list(results) == ["none", "images_and_captions"]
    for arm, r in results.items():
        assert (out / "train" / arm / "checkpoints").is_dir() and r["seconds"] > 0
        for kind in KINDS:
            k = r[kind]
            assert k["n"] == len(k["per_prompt"]) == len(prompts[kind])  # one image per prompt, all scored
            assert k["adherence"] == pytest.approx(np.mean(k["per_prompt"]))
            assert k["adherence"] == pytest.approx(np.mean([k["background"], k["colours"], k["shapes"]]))
        found = r["rare"]["per_prompt_found"]
        assert len(found) == 4 and set(found) <= {0.0, 1.0}
        assert r["rare"]["rare_found"] == pytest.approx(np.mean(found)) and "rare_found" not in r["common"]
    for kind in KINDS:  # the retrieval arm against none, paired over the same prompts
        iv = results["images_and_captions"][kind]["vs_none"]
        diff = np.subtract(
            results["images_and_captions"][kind]["per_prompt"], results["none"][kind]["per_prompt"]
        )
        assert iv["n"] == 4 and iv["diff"] == pytest.approx(diff.mean())
        assert iv["low"] <= iv["diff"] <= iv["high"]
    assert "vs_none" not in results["none"]["rare"]

    table = "\n".join(table_lines(report))
    for setting in ("purple rare (share 0.02)", "world of 300 rows", "5 training steps per arm", "seed 0"):
        assert setting in table
    assert f"{report['rare_rows']} of {report['corpus_rows']} indexed rows name purple" in table
    rare_row = next(line for line in table.splitlines() if line.strip().startswith("rare adherence"))
    r = results["images_and_captions"]["rare"]
    assert rare_row.split()[2:] == [
        "4",
        f"{results['none']['rare']['adherence']:.3f}",
        f"{r['adherence']:.3f}",
        f"{r['vs_none']['diff']:+.3f}",
        f"{r['vs_none']['low']:+.3f}",
        "to",
        f"{r['vs_none']['high']:+.3f}",
    ]
    assert any(line.startswith("corpus: ") for line in said)


def test_the_demo_runs_it_when_asked(tiny, tmp_path, cli, monkeypatch):
    """`curate demo --rag` hands the comparison the demo's CLIP and its own folder, and prints the table; the
    comparison is the fixture's (already trained), so this test costs one small demo run."""
    calls = []

    def fake(out, settings, clip=None, say=print):
        calls.append((out, settings, clip))
        return tiny[1]

    monkeypatch.setattr(rag_compare, "compare_rag", fake)
    r = cli("demo", "--output", tmp_path / "demo", "--size", 80, "--train-steps", 0, "--rag")
    assert r.code == 0, r
    assert calls == [
        (tmp_path / "demo" / "rag", rag_compare.DEMO_RAG, tmp_path / "demo" / "models" / "demo-clip")
    ]
    printed = r.out + r.err
    assert all(line in printed for line in table_lines(tiny[1]))
    end = r.out[r.out.index("what to look at") :]
    assert (
        "images_and_captions vs none" in end
        and f"{tmp_path / 'demo'}/rag/rag_compare.json" in end.replace("\n", "")
    )

"""``curate demo``: build the sample world, serve it on 127.0.0.1, run the demo pipeline against it, and check
the outcome against the world's ground truth. Fully offline."""

from __future__ import annotations

import json
import time
from collections import Counter
from importlib.resources import files
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

from curate.base import ConfigError
from curate.core.config import load_config
from curate.core.output import OutputFolder, RunSummary
from curate.core.runner import run_pipeline
from curate.demo.server import WorldServer
from curate.demo.world import build_world


def demo_pipeline() -> Path:
    return Path(str(files("curate.pipelines") / "demo.yaml"))


DEMO_CLIP = "models/demo-clip"  # under the demo's output folder; trained once, then reused
# The address the world's uids are computed from (input.uid_col), whatever port its server listens on.
DEMO_UID_BASE = "http://world.curate.demo"


def train_demo_clip(output: str | Path, console: Console, steps: int | None = None, seed: int = 0) -> dict:
    """Train the demo's small CLIP into ``output``, with a progress bar; returns its calibration."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from curate.demo.tiny_clip import train_tiny_clip

    columns = (
        TextColumn("training the demo CLIP"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps, loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("train", total=steps or 1, loss="-")

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(task, completed=step, total=total, loss=f"{loss:.3f}")

        return train_tiny_clip(output, seed=seed, progress=progress, **({"steps": steps} if steps else {}))


def demo_clip(out: Path, console: Console) -> tuple[Path, dict]:
    """The demo CLIP's folder and calibration: trained on first use, reused after."""
    from curate.demo.tiny_clip import CALIBRATION_FILE

    folder = out / DEMO_CLIP
    calibration = folder / CALIBRATION_FILE
    if calibration.exists():
        return folder, json.loads(calibration.read_text())
    from curate.demo.tiny_clip import shipped_folder, unpack

    if (shipped_folder() / CALIBRATION_FILE).exists():
        try:
            info = unpack(folder)
        except ValueError as e:
            console.print(f"[yellow]{e}[/yellow]", highlight=False)
        else:
            console.print(
                f"the demo CLIP as the package ships it ({info['steps']} steps on drawn scenes, seed "
                f"{info['seed']}; `curate models train-demo-clip` trains it again); threshold "
                f"{info['threshold']:.3f} calibrated on held-out scenes",
                highlight=False,
            )
            return folder, info
    console.print(f"training the demo CLIP on drawn scenes (not the world's images); kept in {folder}")
    info = train_demo_clip(folder, console)
    console.print(
        f"  {info['steps']} steps in {info['seconds']:.0f}s; threshold {info['threshold']:.3f} calibrated on "
        f"held-out scenes (precision {info['heldout_precision']:.3f}, recall {info['heldout_recall']:.3f})"
    )
    return folder, info


DEMO_VLM = "models/demo-vlm"  # under the demo's output folder; built once, then reused
DEMO_LLM = "models/demo-llm"
UNTRAINED = "TINY RANDOM, UNTRAINED"  # how the demo labels what its captioner and fusion LLM write


def demo_captioners(out: Path, console: Console) -> tuple[Path, Path]:
    """The demo's captioner (a tiny BLIP) and fusion LLM (a tiny Llama): random weights, built on first use
    (a few seconds), reused after. Each is built under a temporary name and renamed when complete."""
    import os
    import shutil

    from curate.demo.tiny_captioners import build_tokenizer, make_tiny_blip, make_tiny_llm

    folders = (out / DEMO_VLM, out / DEMO_LLM)
    if all((f / "config.json").exists() for f in folders):
        return folders
    console.print(
        f"building the demo's {UNTRAINED} captioner (BLIP) and fusion LLM (Llama) in {out / 'models'}: "
        "they exercise the recaption and fuse_captions stages, and their captions are noise"
    )
    for folder, make, bert in ((folders[0], make_tiny_blip, True), (folders[1], make_tiny_llm, False)):
        if (folder / "config.json").exists():
            continue
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp, tokenizer=build_tokenizer(bert_template=bert))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folders


def _sidecars(run_dir: Path) -> list[str]:
    """The parquet sidecars of the run's finished shards."""
    out = OutputFolder(run_dir)
    return [out.shard_parquet(shard) for shard in out.finished_shards()]


def caption_sample(run_dir: Path, rows: int = 3) -> dict:
    """A few kept rows' alt-text, VLM and fused captions, and the count of every fusion_status."""
    import pyarrow.compute as pc

    sides = _sidecars(run_dir)
    columns = ["uid", "caption", "caption_vlm", "caption_fused", "fusion_status"]
    side = pa.concat_tables([pq.read_table(p) for p in sides], promote_options="permissive")
    if "caption_fused" not in side.column_names:
        return {}
    side = side.select(columns)
    status = Counter(s for s in side["fusion_status"].to_pylist() if s is not None)
    done = side.filter(pc.is_valid(side["caption_vlm"])).sort_by("uid")
    return {"fusion_status": dict(sorted(status.items())), "sample": done.slice(0, rows).to_pylist()}


def print_caption_sample(sample: dict, console: Console) -> None:
    if not sample:
        return
    counts = ", ".join(f"{k} {n}" for k, n in sample["fusion_status"].items()) or "none"
    console.print(f"captions ({UNTRAINED} models: random words, not real captions); fusion_status: {counts}")
    for row in sample["sample"]:
        console.print(f"  alt-text: {row['caption']}", highlight=False, markup=False)
        console.print(f"  vlm     : {row['caption_vlm']}   [{UNTRAINED}]", highlight=False, markup=False)
        console.print(f"  fused   : {row['caption_fused']}   [{UNTRAINED}]", highlight=False, markup=False)


def run_demo(
    output: str,
    size: int,
    executor: str | None,
    console: Console,
    clip: str | None = None,
    train_steps: int | None = None,
    rag: bool = False,
) -> tuple[RunSummary, dict]:
    """Build, serve and curate the world; ``clip`` is a trained CLIP folder to use instead of the demo's.
    ``train_steps`` (0 skips it; None: the config's) trains on the curated and on the raw shards and compares.
    ``rag`` also compares retrieval with none on a world with a rare concept (:mod:`curate.demo.rag_compare`,
    its own corpus under ``output/rag``)."""
    from curate.demo.tiny_clip import CALIBRATION_FILE

    out = Path(output)
    start = time.perf_counter()
    world = build_world(size=size, seed=0)
    console.print(f"built a world of {len(world.rows):,} rows in {time.perf_counter() - start:.1f}s")
    if clip:
        clip_folder = Path(clip)
        if not (clip_folder / CALIBRATION_FILE).exists():
            raise ConfigError(
                [("--clip", f"{clip_folder} holds no {CALIBRATION_FILE} with the threshold to use")]
            )
        calibration = json.loads((clip_folder / CALIBRATION_FILE).read_text())
    else:
        clip_folder, calibration = demo_clip(out, console)
    vlm_folder, llm_folder = demo_captioners(out, console)
    with WorldServer() as server:
        world.serve(server)
        # uids as if the world were always served at one address: the same world, the same uids, the same
        # order of rows and so the same curated set and numbers, whatever port the server got.
        written = world.write(out / "world", server.url, uid_base=DEMO_UID_BASE)
        threshold = round(float(calibration["threshold"]), 4)
        overrides = [
            f"input.path={written['input']}",
            f"output.path={out / 'run'}",
            f"stages.download.allow_private=[{server.host_port}]",
            "input.uid_col=uid",
            f"stages.clip_score.model=local-dir:{clip_folder}",
            f"stages.quality_filter.rules.0=clip_score >= {threshold}",
            f"stages.recaption.model={vlm_folder}",
            f"stages.fuse_captions.model={llm_folder}",
        ]
        if executor:
            overrides.append(f"executor.kind={executor}")
        console.print(f"serving it at {server.url}; running {demo_pipeline().name}")
        config = load_config(demo_pipeline(), overrides)
        summary = run_pipeline(config, overwrite=True, console=console)
        raw = None
        if train_steps != 0:
            from curate.demo.train_compare import raw_run

            raw = raw_run(out, written["input"], server.host_port, console)
    report = check_against_truth(out / "run", written["truth"])
    report["scores"] = score_report(out / "run", written["truth"], config)
    report["dedup"] = dedup_report(out / "run", written["truth"])
    report["captions"] = caption_sample(out / "run")
    print_caption_sample(report["captions"], console)
    try:
        from curate.demo.index import demo_index

        say = lambda line: console.print(line, markup=False, highlight=False)  # noqa: E731
        report["index"] = demo_index(out / "run", out / "index", say)
    except Exception as e:  # the run's results above stand; an index problem must not hide them
        console.print(f"[yellow]retrieval index not built:[/yellow] {e}", highlight=False)
    if raw is not None:
        from curate.demo.train_compare import print_comparison, train_pair

        report["training"] = train_pair(out, out / "run", raw, console, steps=train_steps)
        print_comparison(report["training"], console)
    if rag:
        from curate.demo import rag_compare

        say = lambda line: console.print(line, markup=False, highlight=False)  # noqa: E731
        report["rag"] = rag_compare.compare_rag(out / "rag", rag_compare.DEMO_RAG, clip=clip_folder, say=say)
        for line in rag_compare.table_lines(report["rag"]):
            say(line)
    return summary, report


def check_against_truth(run_dir: Path, truth_path: Path) -> dict:
    """How often the download status equals the status the world planted, and where it differs."""
    truth = pq.read_table(truth_path)
    sides = _sidecars(run_dir)
    side = pa.concat_tables(
        [pq.read_table(p, columns=["uid", "status", "drop_reason", "mime"]) for p in sides]
    )
    got = {
        u: (s, d, m is not None or s != "ok")
        for u, s, d, m in zip(
            *(side[c].to_pylist() for c in ("uid", "status", "drop_reason", "mime")), strict=True
        )
    }
    agree, differ = 0, Counter()
    checked = 0
    for uid, expected, kind in zip(
        truth["uid"].to_pylist(), truth["expected_status"].to_pylist(), truth["kind"].to_pylist(), strict=True
    ):
        status, dropped, fetched = got.get(uid, (None, None, None))
        if dropped is not None and not fetched:  # dropped before the download: not fetched, nothing to check
            continue
        checked += 1
        if status == expected:
            agree += 1
        else:
            differ[f"{kind}: expected {expected}, got {status}"] += 1
    return {"checked": checked, "agree": agree, "differ": dict(differ)}


def _rule_threshold(config, column: str) -> tuple[str, float] | None:
    """The (operator, value) of the demo filter's rule on ``column``."""
    from curate.kit.rules import parse_rule

    for spec in config.stages:
        if spec.stage == "filter":
            for text in spec.config.rules:
                rule = parse_rule(text)
                if rule.column == column:
                    return rule.op, float(rule.value)
    return None


def _precision_recall(flagged: list[bool], actual: list[bool]) -> dict:
    hits = sum(f and a for f, a in zip(flagged, actual, strict=True))
    return {
        "flagged": sum(flagged),
        "actual": sum(actual),
        "correct": hits,
        "precision": hits / sum(flagged) if sum(flagged) else 0.0,
        "recall": hits / sum(actual) if sum(actual) else 0.0,
    }


def score_report(run_dir: Path, truth_path: Path, config) -> dict:
    """How well the score filters found the world's planted faults, over the rows that were scored.

    - mismatched captions: ``clip_score`` below the filter's threshold, against ``kind == mismatched_caption``;
    - text overlay: ``text_area`` at or above the filter's threshold, against ``kind == watermark``;
    - NSFW: the world draws no NSFW image, so every row over the threshold is a false positive.
    """
    truth = pq.read_table(truth_path, columns=["uid", "kind"])
    kind = dict(zip(truth["uid"].to_pylist(), truth["kind"].to_pylist(), strict=True))
    side = pa.concat_tables(
        [
            pq.read_table(p, columns=["uid", "clip_score", "text_area", "nsfw_score"])
            for p in _sidecars(run_dir)
        ]
    )
    rows = [r for r in side.to_pylist() if r["clip_score"] is not None]
    report: dict = {"scored": len(rows)}
    clip = _rule_threshold(config, "clip_score")
    if clip:
        report["mismatched_caption"] = {
            "threshold": clip[1],
            **_precision_recall(
                [r["clip_score"] < clip[1] for r in rows],
                [kind.get(r["uid"]) == "mismatched_caption" for r in rows],
            ),
        }
    text = _rule_threshold(config, "text_area")
    if text:
        scored = [r for r in rows if r["text_area"] is not None]
        report["text_overlay"] = {
            "threshold": text[1],
            **_precision_recall(
                [r["text_area"] >= text[1] for r in scored],
                [kind.get(r["uid"]) == "watermark" for r in scored],
            ),
        }
    nsfw = _rule_threshold(config, "nsfw_score")
    if nsfw:
        scored = [r["nsfw_score"] for r in rows if r["nsfw_score"] is not None]
        report["nsfw"] = {
            "threshold": nsfw[1],
            "scored": len(scored),
            "flagged": sum(s >= nsfw[1] for s in scored),
        }
    return report


def dedup_report(run_dir: Path, truth_path: Path) -> dict | None:
    """How well dedup found the world's planted duplicates, over the rows it considered (those still kept
    when it ran).

    A planted group is an original with its exact and near copies; the rows served from the same bytes
    (the world's slow URLs all serve one JPEG) form one more. Of each group's rows that dedup considered,
    all but one should go: those are the actual duplicates. A dropped row is correct when it belongs to a
    group and points to a row of the same group.
    """
    sides = _sidecars(run_dir)
    columns = ["uid", "drop_reason", "dup_of", "dup_kind"]
    side = pa.concat_tables([pq.read_table(p) for p in sides], promote_options="permissive")
    if "dup_kind" not in side.column_names:
        return None
    truth = pq.read_table(truth_path, columns=["uid", "kind", "path", "duplicate_of_uid"]).to_pylist()
    group, kind = {}, {}
    for t in truth:
        kind[t["uid"]] = t["kind"]
        group[t["uid"]] = "slow" if t["kind"] == "slow" else t["duplicate_of_uid"] or t["uid"]
    rows = side.select(columns).to_pylist()
    considered = [r for r in rows if r["drop_reason"] is None or r["drop_reason"].startswith("duplicate:")]
    size = Counter(group[r["uid"]] for r in considered)
    actual = sum(n - 1 for n in size.values())
    flagged = [r for r in considered if r["dup_of"] is not None]
    correct = [r for r in flagged if group[r["uid"]] == group.get(r["dup_of"])]
    per_kind: dict[str, list[int]] = {}
    for r in considered:  # planted copies by how they were made: found / considered
        k = kind[r["uid"]]
        if k == "exact_duplicate" or k.startswith("near_duplicate:"):
            found = per_kind.setdefault(k.removeprefix("near_duplicate:"), [0, 0])
            found[1] += 1
            # The copy, or its original in its place when the copy was the one kept.
            found[0] += int(
                size[group[r["uid"]]] > 1
                and any(x["dup_of"] is not None and group[x["uid"]] == group[r["uid"]] for x in flagged)
            )
    by_dedup_kind = Counter(r["dup_kind"] for r in flagged)
    return {
        "flagged": len(flagged),
        "actual": actual,
        "correct": len(correct),
        "precision": len(correct) / len(flagged) if flagged else 0.0,
        "recall": len(correct) / actual if actual else 0.0,
        "planted_found": {k: tuple(v) for k, v in sorted(per_kind.items())},
        "by_kind": dict(sorted(by_dedup_kind.items())),
    }

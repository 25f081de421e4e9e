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

from curate.config import ConfigError, load_config
from curate.demo.server import WorldServer
from curate.demo.world import build_world
from curate.runner import RunSummary, run_pipeline


def demo_pipeline() -> Path:
    return Path(str(files("curate.pipelines") / "demo.yaml"))


DEMO_CLIP = "models/demo-clip"  # under the demo's output folder; trained once, then reused


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
    console.print(f"training the demo CLIP on drawn scenes (not the world's images); kept in {folder}")
    info = train_demo_clip(folder, console)
    console.print(
        f"  {info['steps']} steps in {info['seconds']:.0f}s; threshold {info['threshold']:.3f} calibrated on "
        f"held-out scenes (precision {info['heldout_precision']:.3f}, recall {info['heldout_recall']:.3f})"
    )
    return folder, info


def run_demo(
    output: str, size: int, executor: str | None, console: Console, clip: str | None = None
) -> tuple[RunSummary, dict]:
    """Build, serve and curate the world; ``clip`` is a trained CLIP folder to use instead of the demo's."""
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
    with WorldServer() as server:
        world.serve(server)
        written = world.write(out / "world", server.url)
        threshold = round(float(calibration["threshold"]), 4)
        overrides = [
            f"input.path={written['input']}",
            f"output.path={out / 'run'}",
            f"stages.download.allow_private=[{server.host_port}]",
            f"stages.clip_score.model=local-dir:{clip_folder}",
            f"stages.quality_filter.rules.0=clip_score >= {threshold}",
        ]
        if executor:
            overrides.append(f"executor.kind={executor}")
        console.print(f"serving it at {server.url}; running {demo_pipeline().name}")
        config = load_config(demo_pipeline(), overrides)
        summary = run_pipeline(config, overwrite=True, console=console)
    report = check_against_truth(out / "run", written["truth"])
    report["scores"] = score_report(out / "run", written["truth"], config)
    return summary, report


def check_against_truth(run_dir: Path, truth_path: Path) -> dict:
    """How often the download status equals the status the world planted, and where it differs."""
    truth = pq.read_table(truth_path)
    sides = sorted((run_dir / "shards").glob("*.parquet"))
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
    from curate.rules import parse_rule

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
            for p in sorted((run_dir / "shards").glob("*.parquet"))
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

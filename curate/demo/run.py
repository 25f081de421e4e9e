"""``curate demo``: build the sample world, serve it on 127.0.0.1, run the demo pipeline against it, and check
the outcome against the world's ground truth. Fully offline."""

from __future__ import annotations

import time
from collections import Counter
from importlib.resources import files
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console

from curate.config import load_config
from curate.demo.server import WorldServer
from curate.demo.world import build_world
from curate.runner import RunSummary, run_pipeline


def demo_pipeline() -> Path:
    return Path(str(files("curate.pipelines") / "demo.yaml"))


def run_demo(output: str, size: int, executor: str | None, console: Console) -> tuple[RunSummary, dict]:
    out = Path(output)
    start = time.perf_counter()
    world = build_world(size=size, seed=0)
    console.print(f"built a world of {len(world.rows):,} rows in {time.perf_counter() - start:.1f}s")
    with WorldServer() as server:
        world.serve(server)
        written = world.write(out / "world", server.url)
        overrides = [
            f"input.path={written['input']}",
            f"output.path={out / 'run'}",
            f"stages.download.allow_private=[{server.host_port}]",
        ]
        if executor:
            overrides.append(f"executor.kind={executor}")
        console.print(f"serving it at {server.url}; running {demo_pipeline().name}")
        config = load_config(demo_pipeline(), overrides)
        summary = run_pipeline(config, overwrite=True, console=console)
    return summary, check_against_truth(out / "run", written["truth"])


def check_against_truth(run_dir: Path, truth_path: Path) -> dict:
    """How often the download status equals the status the world planted, and where it differs."""
    truth = pq.read_table(truth_path)
    sides = sorted((run_dir / "shards").glob("*.parquet"))
    side = pa.concat_tables([pq.read_table(p, columns=["uid", "status", "drop_reason"]) for p in sides])
    got = {
        u: (s, d)
        for u, s, d in zip(*(side[c].to_pylist() for c in ("uid", "status", "drop_reason")), strict=True)
    }
    agree, differ = 0, Counter()
    checked = 0
    for uid, expected, kind in zip(
        truth["uid"].to_pylist(), truth["expected_status"].to_pylist(), truth["kind"].to_pylist(), strict=True
    ):
        status, dropped = got.get(uid, (None, None))
        if dropped is not None:  # dropped by a filter before the download: not fetched, nothing to check
            continue
        checked += 1
        if status == expected:
            agree += 1
        else:
            differ[f"{kind}: expected {expected}, got {status}"] += 1
    return {"checked": checked, "agree": agree, "differ": dict(differ)}

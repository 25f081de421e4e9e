"""The hostile corpus (support.hostile) downloaded by curate and by img2dataset, same server, same URLs, same run.

What a crawl of the open web meets, 43 kinds of row: bombs, bodies of 50 MB and without end, a response a
byte a second, headers without end, a lying Content-Length, redirect loops, captions of 10 MB, nulls. The
three redirects that point off this machine are left out for both (img2dataset has no SSRF guard: it would
follow them). Both get the same per-URL budget: curate ``total_timeout: 3`` (its deadline per URL, retries
included), img2dataset ``--timeout 3`` (its only one: per socket operation) and ``--retries 1``.

Prints, per tool: wall seconds (img2dataset is stopped at ``--cap`` seconds if it has not finished), the
input rows its output accounts for (a status per row in its parquet files), the URLs the server was still
serving more than deadline + 1 s after their request, and the peak memory of the tool's process tree.
The server ends any response after ``--server-cap`` seconds (600) and an endless body after
``--endless-mb`` (512 MB), to protect the machine: a client that waits for that is counted as hanging.
Offline: only 127.0.0.1 is contacted once the peer venv exists (download_vs_img2dataset.py makes it).

    .venv/bin/python benchmarks/hostile_vs_img2dataset.py --json hostile.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support/: not installed
from download_vs_img2dataset import CURATE, QUIET_ENV, _kill_tree, _tree_memory, ensure_img2dataset
from support.hostile import DEADLINE, OFF_MACHINE, HostileServer, closed_port, corpus, first_stages


def run_capped(cmd: list[str], log: Path, cap: float) -> dict:
    """Run ``cmd`` (output to ``log``) for at most ``cap`` seconds, polling its tree's memory."""
    env = {**os.environ, **QUIET_ENV}
    with log.open("wb") as out:
        start = time.perf_counter()
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        proc, peak, finished = psutil.Process(popen.pid), 0, True
        try:
            while popen.poll() is None:
                peak = max(peak, _tree_memory(proc)[0])
                if time.perf_counter() - start > cap:
                    finished = False
                    break
                time.sleep(0.1)
            wall = time.perf_counter() - start
        finally:
            if popen.poll() is None:
                _kill_tree(popen)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
    return {
        "wall_s": round(wall, 1),
        "finished": finished,
        "returncode": popen.returncode,
        "peak_rss_mib": round(peak / 2**20),
    }


def accounted(folder: Path, column: str) -> int:
    """Input rows that the tool's parquet outputs hold a status for."""
    files = [p for p in folder.rglob("*.parquet") if p.stat().st_size > 0]
    return sum(pq.read_table(p, columns=[column]).num_rows for p in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cap", type=float, default=120, help="seconds before img2dataset is stopped")
    ap.add_argument("--server-cap", type=float, default=600)
    ap.add_argument("--endless-mb", type=int, default=512)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    exe = ensure_img2dataset()
    work = Path(tempfile.mkdtemp(prefix="curate-hostile-bench-"))
    results: dict[str, dict] = {}
    with HostileServer(cap=args.server_cap, endless_bytes=args.endless_mb << 20) as server:
        closed = closed_port()
        rows = [r for r in corpus(server, 1, closed) if r[0] not in OFF_MACHINE]
        captions = [c if name != "non_utf8" else "caf\ufffd cr\ufffdme" for name, _, c, *_ in rows]
        table = pa.table({"url": [u for _, u, *_ in rows], "caption": captions})
        pq.write_table(table, work / "input.parquet")
        print(f"{len(rows)} rows, served at {server.url}", flush=True)

        # curate: download only, at the same budget.
        stages = first_stages(server.port, closed, concurrency=32)
        doc = {
            "name": "hostile",
            "input": {"path": str(work / "input.parquet"), "url_col": "url", "caption_col": "caption"},
            "output": {"path": str(work / "curate"), "report": False},
            "shard_size": 16,
            "stages": stages,
        }
        (work / "p.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        mark = {p: len(s) for p, s in server.spans.items()}
        results["curate"] = run_capped(
            [str(CURATE), "run", str(work / "p.yaml"), "-q"], work / "curate.log", args.cap
        )
        results["curate"]["rows_accounted"] = accounted(work / "curate" / "shards", "status")
        time.sleep(1)
        results["curate"]["late_urls"] = sorted(
            p for p, s in server.spans.items() if max(s[mark.get(p, 0) :] or [0]) > DEADLINE + 1
        )

        time.sleep(1)
        mark = {p: len(s) for p, s in server.spans.items()}
        cmd = [
            str(exe),
            f"--url_list={work / 'input.parquet'}",
            "--input_format=parquet",
            "--url_col=url",
            "--caption_col=caption",
            "--output_format=webdataset",
            f"--output_folder={work / 'img2dataset'}",
            "--image_size=64",
            "--resize_mode=center_crop",
            "--processes_count=1",
            "--thread_count=32",
            "--number_sample_per_shard=16",
            f"--timeout={int(DEADLINE)}",
            "--retries=1",
            "--distributor=multiprocessing",
            "--enable_wandb=False",
        ]
        results["img2dataset"] = run_capped(cmd, work / "img2dataset.log", args.cap)
        results["img2dataset"]["rows_accounted"] = accounted(work / "img2dataset", "status")
        time.sleep(1)  # handlers whose client was stopped notice it and record their span
        results["img2dataset"]["late_urls"] = sorted(
            p for p, s in server.spans.items() if max(s[mark.get(p, 0) :] or [0]) > DEADLINE + 1
        )
    for tool, r in results.items():
        r["rows_total"] = len(rows)
        print(
            f"{tool:12s} wall {r['wall_s']:7.1f} s{'' if r['finished'] else ' (stopped: not finished)'}  "
            f"rows accounted {r['rows_accounted']}/{len(rows)}  peak RSS {r['peak_rss_mib']} MiB  "
            f"served past {DEADLINE + 1:g} s: {', '.join(r['late_urls']) or 'none'}"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": len(rows), "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""A corpus of hostile inputs, served by a raw local HTTP server, through a whole pipeline in its own process.

Every kind has the status (or drop reason) it must end with. Beyond the statuses the test asserts what a
crawl that meets the open web relies on: the run does not crash; no URL is still being served past its
deadline plus a second (measured on the server's side: a connection the client has not let go of is a
hang); the worker's peak memory stays within a bound that a buffered bomb, a 50 MB body or an endless body
would break; every input row is in the sidecars once, with a reason when it is not kept; redirects to
addresses that must not be fetched never connect; bad input files fail the run with exit 2 and a message
naming the file and line, before anything is written. The corpus and its server: ``support.hostile``.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import sidecars, write_pipeline
from support.data import make_tiny_clip
from support.hostile import (
    CAPTION_CASES,
    DEADLINE,
    HANDLER_CAP,
    HostileServer,
    closed_port,
    corpus,
    first_stages,
    write_inputs,
)

from curate.core.config import load_config
from curate.core.runner import run_pipeline

pytestmark = pytest.mark.slow

MAX_BYTES = 8 << 20
LIMIT_MIB = 128


MODEL_STAGES = [
    {"stage": "clip_score", "batch_size": 16},
    {"stage": "nsfw", "backend": "opennsfw"},
    {"stage": "filter", "rules": ["nsfw_score < 0.99"]},
    {"stage": "dedup", "perceptual": {"max_distance": 4}, "semantic": False},
]


def pipeline_stages(srv: HostileServer, closed: int, clip: Path) -> list[dict]:
    """basic_filter and download (with this run's addresses), then scoring, filtering and dedup."""
    download = {"concurrency": 64, "backoff": 0.2, "max_bytes": MAX_BYTES}
    scoring = [{**s, "model": f"local-dir:{clip}"} if s["stage"] == "clip_score" else s for s in MODEL_STAGES]
    return first_stages(srv.port, closed, **download) + scoring


def run_measured(pipeline: Path, peak_file: Path) -> subprocess.CompletedProcess:
    """``curate run`` in a process of its own; its peak RSS (MiB) lands in ``peak_file``."""
    code = (
        "import resource, sys\n"
        "from curate.cli import main\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        f"    open({str(peak_file)!r}, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "run", str(pipeline)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    canary = socket.create_server(("127.0.0.1", 0))
    canary.settimeout(0.05)
    with HostileServer() as srv:
        closed = closed_port()
        rows = corpus(srv, canary.getsockname()[1], closed)
        clip = make_tiny_clip(tmp / "clip")
        stages = pipeline_stages(srv, closed, clip)
        # The baseline: the same pipeline on the same server, over the rows that are plain good images.
        plain = [r for r in rows if r[3] == "ok" and r[0] not in CAPTION_CASES]
        write_inputs(tmp / "plain", plain)
        baseline = write_pipeline(tmp / "b.yaml", tmp / "plain", tmp / "plain-out", stages, shard_size=16)
        assert run_measured(baseline, tmp / "baseline-peak").returncode == 0
        srv.spans.clear()
        write_inputs(tmp / "input", rows)
        pipeline = write_pipeline(tmp / "p.yaml", tmp / "input", tmp / "out", stages, shard_size=16)
        proc = run_measured(pipeline, tmp / "peak")
        time.sleep(0.2)  # let the last handlers record their spans
        with contextlib.suppress(TimeoutError):
            canary.accept()
            pytest.fail("a redirect reached the canary listener")
        canary.close()
        yield {
            "rows": rows,
            "proc": proc,
            "out": tmp / "out",
            "peak_mib": float((tmp / "peak").read_text()),
            "baseline_peak_mib": float((tmp / "baseline-peak").read_text()),
            "spans": {path: list(spans) for path, spans in srv.spans.items()},
            "pipeline": pipeline,
        }


def test_the_corpus_has_at_least_25_kinds(hostile):
    assert len({name for name, *_ in hostile["rows"]}) >= 25
    assert len(hostile["rows"]) == len({name for name, *_ in hostile["rows"]})


def test_the_run_finishes_with_every_row_and_its_expected_status(hostile):
    proc = hostile["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    t = sidecars(hostile["out"]).to_pylist()
    assert len(t) == len(hostile["rows"])  # nothing lost
    assert len({r["uid"] for r in t}) == len(t)  # nothing twice
    got, want = {}, {}
    for name, url, _, status, reason in hostile["rows"]:
        [row] = [r for r in t if r["url"] == url]
        got[name] = (row["status"], row["drop_reason"])
        want[name] = (status, reason)
        if status != "ok":
            assert row["error"], (name, row)  # a reason a person can read
    assert got == want


def test_no_url_is_served_past_its_deadline(hostile):
    """Server side: from a request's arrival to the client letting go. A stalled one must be cut by the
    deadline (retries included), with a second of slack."""
    spans = hostile["spans"]
    for name in (
        "byte_a_second",
        "endless_headers",
        "never_answers",
        "endless_body",
        "big_50mb",
        "big_50mb_chunked",
    ):
        assert f"/{name}" in spans, name
    late = {p: max(s) for p, s in spans.items() if max(s) > DEADLINE + 1}
    assert not late, late


def test_worker_memory_stays_bounded(hostile):
    """Peak RSS against the same pipeline over the plain good images (about 1 GiB: torch, open_clip and
    onnxruntime are loaded). The 10 MB caption costs about 50 MiB while it is read, hashed and cut;
    everything from the network under 10 MiB, since no body is held past max_bytes (8 MiB). Reading the
    50 MB bodies whole (max_bytes 64 MiB) breaks the limit (+238 MiB), as would an endless body or a
    decoded bomb (30 GB of pixels)."""
    print(f"peak RSS: {hostile['peak_mib']:.0f} MiB, baseline {hostile['baseline_peak_mib']:.0f} MiB")
    assert hostile["peak_mib"] < hostile["baseline_peak_mib"] + LIMIT_MIB


def test_captions_are_cleaned_and_capped(hostile):
    t = {r["url"]: r for r in sidecars(hostile["out"]).to_pylist()}
    url = {name: u for name, u, *_ in hostile["rows"]}
    assert t[url["non_utf8"]]["caption"] == "caf\ufffd cr\ufffdme br\ufffdl\ufffde \ufffd\ufffd with bytes"
    ten = t[url["ten_mb"]]
    assert ten["caption_truncated"] is True and len(ten["caption"]) == 2000
    assert t[url["nul_bytes"]]["caption"] == "a caption with NUL bytes"
    assert t[url["controls"]]["caption"] == "bell escape[31m and C1 controls"


def test_the_shards_open_and_hold_exactly_the_kept_rows(hostile):
    kept = {
        r["uid"] for r in sidecars(hostile["out"]).to_pylist() if r["status"] == "ok" and not r["drop_reason"]
    }
    tars = sorted(str(p) for p in (hostile["out"] / "shards").glob("*.tar"))
    seen = set()
    for sample in wds.WebDataset(tars, shardshuffle=False).decode("pil"):
        img = sample.get("jpg")
        assert img.size == (64, 64)
        seen.add(sample["__key__"])
    assert seen == kept and len(kept) == 11


def test_the_ray_executor_ends_every_row_the_same_way(hostile, ray_cluster, tmp_path):
    """The same corpus on Ray (the session's local cluster): the same status, drop reason and error kind
    for every row. Bytes may differ where a failure's message carries a byte count or a time."""
    config = load_config(hostile["pipeline"], [f"output.path={tmp_path / 'ray'}", "executor.kind=ray"])
    assert run_pipeline(config, show_progress=False).exit_code == 0

    def outcome(output: Path) -> dict:
        return {r["uid"]: (r["status"], r["drop_reason"]) for r in sidecars(output).to_pylist()}

    assert outcome(tmp_path / "ray") == outcome(hostile["out"])


def test_stats_reconcile(hostile):
    rows = len(hostile["rows"])
    stats = [json.loads(p.read_text()) for p in (hostile["out"] / "shards").glob("*_stats.json")]
    assert sum(s["rows"] for s in stats) == rows
    assert sum(sum(s["status"].values()) for s in stats) == rows  # ok + failures = input rows
    ok = sum(s["status"].get("ok", 0) for s in stats)
    assert sum(s["kept"] + sum(s["drop_reason"].values()) for s in stats) == ok  # kept + dropped = ok


# --- bad input files: the run refuses before it writes anything ------------------------------------------


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("bad.parquet", b"PAR1" + bytes(100) + b"PAR1", "not a readable parquet file"),
        ("half.parquet", None, "not a readable parquet file"),
        (
            "bad.csv",
            b'URL,TEXT\nhttp://a/1.jpg,fine\nhttp://a/2.jpg,"never closed\nhttp://a/3.jpg,x\n',
            "line 3",
        ),
        ("fields.csv", b"URL,TEXT\nhttp://a/1.jpg,one\nhttp://a/2.jpg,two,three\n", "line 3"),
    ],
)
def test_a_broken_input_file_fails_the_run_clearly(tmp_path, cli, name, data, message):
    if data is None:  # a real parquet, cut in half
        buf = io.BytesIO()
        pq.write_table(pa.table({"URL": ["http://a/x.jpg"] * 1000, "TEXT": ["t"] * 1000}), buf)
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
    (tmp_path / name).write_bytes(data)
    pipeline = write_pipeline(
        tmp_path / "p.yaml", tmp_path / name, tmp_path / "out", [{"stage": "basic_filter"}]
    )
    r = cli("run", pipeline)
    assert r.code == 2, r
    assert name in r.err and message in r.err, r.err
    assert not list((tmp_path / "out").glob("shards/*.tar"))


def test_a_tls_handshake_a_byte_a_second_is_cut_at_the_deadline():
    """The server answers the ClientHello with a record header claiming 16,000 bytes, then sends them a byte
    a second, so every read gets its byte in time. CPython's ssl module bounds a whole handshake by the
    socket's timeout, which the fetcher clips to the URL's deadline: this keeps it so."""
    from curate.kit.net import Fetcher, FetchPolicy

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)  # the ClientHello
            conn.sendall(b"\x16\x03\x03\x3e\x80")  # a handshake record of 16,000 bytes
            conn.settimeout(1)
            end = time.monotonic() + HANDLER_CAP
            with contextlib.suppress(OSError):
                while time.monotonic() < end:
                    conn.sendall(b"\x00")
                    with contextlib.suppress(TimeoutError):
                        if not conn.recv(1):  # the client let go
                            return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    policy = FetchPolicy(
        user_agent="curate-test",
        connect_timeout=2,
        read_timeout=2,
        total_timeout=DEADLINE,
        retries=0,
        robots_txt=False,
        allow_private=(f"127.0.0.1:{port}",),
    )
    started = time.monotonic()
    result = Fetcher(policy).fetch(f"https://127.0.0.1:{port}/a.jpg")
    elapsed = time.monotonic() - started
    thread.join(HANDLER_CAP)
    listener.close()
    assert result.status == "timeout" and elapsed < DEADLINE + 1, (result, elapsed)

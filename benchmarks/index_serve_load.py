"""`curate index serve` under load: queries/s and p99 latency, the uvicorn/ASGI server against the
ThreadingHTTPServer it replaced, same index, same machine, same run.

    python benchmarks/index_serve_load.py                    # 200,000 x 512, ~8 s per measurement
    python benchmarks/index_serve_load.py --n 20000 --seconds 3   # a quick look

The index: ``--n`` random unit vectors of dimension 512 (what a CLIP ViT-B embeds into), ``IVF1024,Flat`` with
nprobe 16 (FAISS scans ~3,000 vectors a query, as an index tuned for recall does), in curate's index format;
text is embedded by a randomly initialised tiny CLIP whose projection is 512 wide (tests/support/data.py's,
one text layer): what is measured is the server and the search, not a large text tower. Each server runs in a
process of its own; the previous one is ``curate/index/serve.py`` as of commit ``PREVIOUS`` (read with ``git
show``), which answers text only (``GET /search``) and speaks HTTP/1.0. Clients are threads of this process,
each opening a connection per request (as clip-retrieval's ClipClient does, through ``requests.post``) and
sending the next request when the answer is in: 1 and 16 at once, ``--seconds`` each. Queries: text
(``GET /search?text=...&k=10``, and clip-retrieval's ``POST /knn-service`` with ``text``) and embedding
(``POST /knn-service`` with ``embedding_input``, 512 numbers; the previous server has no query by embedding).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

PREVIOUS = "08fd70e"  # the last commit with the ThreadingHTTPServer
DIM = 512
WORDS = ["red", "small", "old", "bright", "wooden", "stone", "blue", "quiet", "tall", "round", "dog", "boat"]

SERVER = """
import sys, importlib.util
sys.path.insert(0, {repo!r})
import torch; torch.set_num_threads(1)
from curate.index.query import Retriever
r = Retriever({index!r})
r.embed_text("warm up")
if {previous!r}:
    spec = importlib.util.spec_from_file_location("previous_serve", {previous!r})
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    server = mod.make_server(r, "127.0.0.1", 0)
else:
    from curate.index.serve import make_server
    server = make_server(r, "127.0.0.1", 0)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def make_index(folder: Path, n: int, seed: int) -> None:
    """``n`` random unit vectors in curate's index format, with a tiny CLIP of projection ``DIM``."""
    import faiss
    import open_clip
    import pyarrow as pa
    import torch
    from safetensors.torch import save_file
    from support.data import TINY_CLIP_CFG

    from curate.index.store import FORMAT, write_faiss, write_info, write_part

    clip = folder / "clip"
    clip.mkdir(parents=True)
    cfg = {**TINY_CLIP_CFG, "embed_dim": DIM}
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, clip / "open_clip_model.safetensors"
    )
    (clip / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    )
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.index_factory(DIM, "IVF1024,Flat", faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).cp.niter = 10  # k-means on random vectors: more iterations buy nothing
    index.train(x[rng.choice(n, min(n, 32 * 1024), replace=False)])
    index.add(x)
    meta = pa.table(
        {
            "id": pa.array(range(n), pa.int64()),
            "uid": [f"{i:032x}" for i in range(n)],
            "caption": [f"a {WORDS[i % 12]} {WORDS[(i // 12) % 12]} number {i}" for i in range(n)],
            "url": [f"http://images.example.com/{i}.jpg" for i in range(n)],
            "shard": [f"{i // 10000:05d}" for i in range(n)],
            "source": pa.array([0] * n, pa.int32()),
            "clip_score": pa.array(rng.random(n, dtype=np.float32)),
        }
    )
    part = write_part(folder, 0, meta, x)
    write_info(
        folder,
        {
            "format": FORMAT,
            "generation": 0,
            "next_part": 1,
            "faiss_file": write_faiss(folder, index, 0),
            "factory": "IVF1024,Flat",
            "metric": "inner_product",
            "dimension": DIM,
            "count": n,
            "clip": {"model": f"local-dir:{clip}", "pretrained": None},
            "sources": [{"path": str(folder / "no-run")}],
            "parts": [part],
            "expected_recall": {"exact": False, "recall_at_10": None, "params": "nprobe=16"},
            "search_params": "nprobe=16",
        },
    )


def start(index: Path, previous: str | None) -> tuple[subprocess.Popen, int]:
    code = SERVER.format(repo=str(REPO), index=str(index), previous=previous or "")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc, int(line)


def load(port: int, request, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads sending ``request(i) -> (method, path, body)`` for ``seconds``: queries/s and
    latency percentiles (ms) of the answers, all of which must be 200."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        i, mine = k, []
        while time.perf_counter() < stop:
            method, path, body = request(i)
            t = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            conn.close()
            mine.append(time.perf_counter() - t)
            if resp.status != 200:
                failures.append(f"{resp.status} {path}")
            i += clients
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} failed requests, e.g. {failures[0]}")
    ms = np.array(latencies) * 1000
    return {"qps": len(ms) / wall, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    rng = np.random.default_rng(args.seed + 1)
    queries = rng.standard_normal((256, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    bodies = [
        json.dumps({"embedding_input": q.round(6).tolist(), "num_images": 10}).encode() for q in queries
    ]

    def text_get(i):
        return "GET", f"/search?text=a+{WORDS[i % 12]}+{WORDS[(i // 12) % 12]}+{i}&k=10", None

    def text_knn(i):
        body = {"text": f"a {WORDS[i % 12]} {WORDS[(i // 12) % 12]} {i}", "num_images": 10}
        return "POST", "/knn-service", json.dumps(body).encode()

    def embedding(i):
        return "POST", "/knn-service", bodies[i % len(bodies)]

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "index"
        t = time.perf_counter()
        make_index(folder, args.n, args.seed)
        print(
            f"index: {args.n:,} x {DIM}, IVF1024,Flat nprobe=16, in {time.perf_counter() - t:.0f} s",
            flush=True,
        )
        previous = Path(tmp) / "previous_serve.py"
        previous.write_bytes(
            subprocess.run(
                ["git", "show", f"{PREVIOUS}:curate/index/serve.py"],
                cwd=REPO,
                capture_output=True,
                check=True,
            ).stdout
        )
        cases = [
            ("previous (ThreadingHTTPServer)", str(previous), [("text, GET /search", text_get)]),
            (
                "new (uvicorn, ASGI)",
                None,
                [
                    ("text, GET /search", text_get),
                    ("text, POST /knn-service", text_knn),
                    ("embedding, POST /knn-service", embedding),
                ],
            ),
        ]
        print("| server | query | clients | queries/s | p50 ms | p99 ms |")
        print("|---|---|---|---|---|---|")
        for name, prev, kinds in cases:
            proc, port = start(folder, prev)
            try:
                for kind, request in kinds:
                    load(port, request, 1, 1.0)  # warm up
                    for c in counts:
                        r = load(port, request, c, args.seconds)
                        print(
                            f"| {name} | {kind} | {c} | {r['qps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} |",
                            flush=True,
                        )
            finally:
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    main()

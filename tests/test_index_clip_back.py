"""`curate index serve` speaks clip-retrieval's back-end protocol: clip-retrieval's own ClipClient (its
published wheel, in a venv of its own: tests/support/peers.py) queries a served index by text, image file,
image URL and embedding; /metadata, /indices-list, CORS, errors and the server's time limits.

The index is built over a run of 60 rows of the sample world with a tiny random CLIP, which embeds the
world's scenes within ~1e-3 of each other: answers are checked against the Retriever's own search (same
ids, same similarities), and "finds its own sample" with the sample that stands furthest from every other.
A missing registry fails the ClipClient test: CI has it.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_pipeline
from support import peers
from support.data import make_tiny_clip

from curate.base import RetrievalIndexError
from curate.core.config import load_config
from curate.core.runner import run_pipeline
from curate.index import Retriever, build_index
from curate.index.clip_back import DEDUP_THRESHOLD, duplicates
from curate.index.serve import make_app, make_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def index(tmp_path_factory, world_server):
    world, server = world_server
    tmp = tmp_path_factory.mktemp("clip-back")
    clip = make_tiny_clip(tmp / "clip")
    pq.write_table(world.input_table(server.url).slice(0, 60), tmp / "in.parquet")
    download = {"stage": "download", "image_size": 64, "resize_mode": "center_crop"}
    download["allow_private"] = [server.host_port]
    score = {"stage": "clip_score", "model": f"local-dir:{clip}", "torch_threads": 1, "decode_threads": 1}
    p = write_pipeline(
        tmp / "p.yaml",
        tmp / "in.parquet",
        tmp / "out",
        [download, score],
        input={"url_col": "url", "caption_col": "caption"},
        shard_size=30,
    )
    run_pipeline(load_config(p, []), show_progress=False)
    build_index([str(tmp / "out")], tmp / "index")
    return tmp / "index", tmp / "out"


@pytest.fixture(scope="module")
def served(index, world_server):
    folder, _ = index
    _, world = world_server
    r = Retriever(folder)
    server = make_server(
        r, columns=["url", "caption", "image", "uid"], allow_private=[world.host_port], header_timeout=1.0
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield r, server.server_address[1]
    server.shutdown()
    server.server_close()


def _tar_images(output) -> dict[str, bytes]:
    images = {}
    for path in sorted((output / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                uid, _, ext = m.name.rpartition(".")
                if ext == "jpg":
                    images[uid] = tar.extractfile(m).read()
    return images


def _most_distinct(r: Retriever) -> int:
    stored = np.stack([r.embedding(i) for i in range(len(r))])
    sims = stored @ stored.T
    np.fill_diagonal(sims, -1)
    return int(np.argmin(sims.max(1)))


def _request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def _post(port, path, obj):
    status, _, data = _request(port, "POST", path, json.dumps(obj).encode())
    return status, json.loads(data)


def _components(embeddings: np.ndarray, threshold: float) -> list[int]:
    """Positions kept by clip-back's dedup, computed plainly: walk the graph of cosine > threshold from each
    unseen position in rank order; the first of each connected group stays."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    linked = (x @ x.T) > threshold
    seen, kept = set(), []
    for start in range(len(x)):
        if start in seen:
            continue
        kept.append(start)
        todo = [start]
        while todo:
            i = todo.pop()
            if i in seen:
                continue
            seen.add(i)
            todo.extend(int(j) for j in np.flatnonzero(linked[i]) if j not in seen)
    return kept


def test_clip_retrievals_own_client_queries_the_served_index(served, index, world_server, tmp_path):
    r, port = served
    _, output = index
    world, server = world_server
    row = _most_distinct(r)
    own = r.neighbor(row)
    images = _tar_images(output)
    (tmp_path / "q.jpg").write_bytes(images[own.uid])
    url = world.input_table(server.url)["url"][0].as_py()
    script = peers.CLIP_CLIENT_LOADER + (
        "import json, sys\n"
        "a = json.loads(sys.argv[1])\n"
        "c = ClipClient(url=a['url'], indice_name='curate', num_images=5, deduplicate=False)\n"
        "d = ClipClient(url=a['url'], indice_name='curate', num_images=40)\n"
        "out = {'text': c.query(text='a red circle'), 'image': c.query(image=a['image']),\n"
        "       'embedding': c.query(embedding_input=a['embedding']), 'image_url': c.query(image=a['image_url']),\n"
        "       'dedup': d.query(text='a red circle')}\n"
        "print(json.dumps(out))\n"
    )
    args = {
        "url": f"http://127.0.0.1:{port}/knn-service",
        "image": str(tmp_path / "q.jpg"),
        "embedding": r.embedding(row).tolist(),
        "image_url": url,
    }
    done = subprocess.run(
        [str(peers.clip_client_python()), "-c", script, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**peers.PEER_ENV, "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)

    def check(results, expected):
        assert [n["id"] for n in results] == [n.id for n in expected]
        np.testing.assert_allclose([n["similarity"] for n in results], [n.score for n in expected], rtol=1e-6)
        for n, e in zip(results, expected, strict=True):
            assert set(n) == {"id", "similarity", "url", "caption", "image", "uid"}
            assert (n["url"], n["caption"], n["uid"]) == (e.url, e.caption, e.uid)
            assert base64.b64decode(n["image"]) == images[e.uid]

    check(got["text"], r.search_text("a red circle", 5))
    check(got["image"], r.search_image(images[own.uid], 5))
    assert got["image"][0]["uid"] == own.uid and got["image"][0]["similarity"] > 0.999
    check(got["embedding"], r.search_embedding(r.embedding(row), 5))
    assert got["embedding"][0]["id"] == row
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("GET", parts.path)
    fetched = conn.getresponse().read()
    conn.close()
    check(got["image_url"], r.search_image(fetched, 5))
    # ClipClient's defaults: deduplicate, 40 results: the best of each group of near-identical embeddings.
    top = r.search_text("a red circle", 40)
    kept = _components(np.stack([r.embedding(n.id) for n in top]), DEDUP_THRESHOLD)
    assert [n["id"] for n in got["dedup"]] == [top[i].id for i in kept]


def test_more_result_ids_than_images_carry_only_id_and_similarity(served):
    r, port = served
    row = _most_distinct(r)
    query = {"embedding_input": r.embedding(row).tolist(), "modality": "image", "indice_name": "curate"}
    status, got = _post(port, "/knn-service", query | {"num_images": 2, "num_result_ids": 6})
    assert status == 200 and len(got) == 6
    assert [set(n) for n in got] == [{"id", "similarity", "url", "caption", "image", "uid"}] * 2 + [
        {"id", "similarity"}
    ] * 4
    assert [n["id"] for n in got] == [n.id for n in r.search_embedding(r.embedding(row), 6)]
    # The front end asks /metadata for the rest.
    ids = [n["id"] for n in got[2:]]
    status, meta = _post(port, "/metadata", {"ids": ids, "indice_name": "curate"})
    assert status == 200 and [m["id"] for m in meta] == ids
    assert [m["metadata"]["uid"] for m in meta] == [r.neighbor(i).uid for i in ids]
    assert _post(port, "/metadata", {"ids": [], "indice_name": "curate"}) == (200, [])
    # Fields clip-back accepts and this index has no model for are accepted and change nothing.
    status, same = _post(
        port,
        "/knn-service",
        query
        | {"num_images": 2, "num_result_ids": 6, "use_mclip": True, "use_safety_model": True}
        | {"use_violence_detector": True, "aesthetic_score": "9", "aesthetic_weight": "0.5"},
    )
    assert (status, same) == (200, got)


def test_indices_list_cors_and_errors(served):
    r, port = served
    status, headers, data = _request(port, "GET", "/indices-list", headers={"Origin": "http://front.example"})
    assert status == 200 and json.loads(data) == ["curate"]
    assert headers["access-control-allow-origin"] == "*"
    preflight = {
        "Origin": "http://front.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    status, headers, _ = _request(port, "OPTIONS", "/knn-service", headers=preflight)
    assert status == 200 and headers["access-control-allow-origin"] == "*"
    assert "POST" in headers["access-control-allow-methods"]

    q = {"text": "x", "modality": "image", "num_images": 3, "indice_name": "curate"}
    for body, message in [
        (q | {"indice_name": "laion5B"}, "no index named 'laion5B': this server has ['curate']"),
        (q | {"modality": "text"}, "caption embeddings, which a curate index does not hold"),
        ({"modality": "image", "num_images": 3}, "give one of text, image, image_url or embedding_input"),
        (
            {"embedding_input": [0.1, 0.2], "num_images": 3},
            "embedding_input has 2 numbers: the index holds 32",
        ),
        (q | {"num_images": 10**6}, "num_images must be between 0 and 10000"),
        ({"image": base64.b64encode(b"not an image").decode()}, "the query image does not decode"),
        ({"image_url": "http://127.0.0.1:9/x.jpg"}, "was not fetched: blocked_address"),
        ({"ids": [len(r)], "indice_name": "curate"}, f"no id {len(r)} in the index"),
    ]:
        path = "/metadata" if "ids" in body else "/knn-service"
        status, got = _post(port, path, body)
        assert status == 400 and message in got["error"], (body, got)
    status, _, data = _request(port, "POST", "/knn-service", b"{not json")
    assert status == 400 and "not JSON" in json.loads(data)["error"]
    assert _request(port, "GET", "/nowhere")[0] == 404


def test_slow_clients_are_cut_off_and_do_not_block_others(served):
    _, port = served
    idle = socket.create_connection(("127.0.0.1", port))  # sends nothing
    trickle = socket.create_connection(("127.0.0.1", port))
    trickle.sendall(b"GET /indices-list HTTP/1.1\r\nHost: x\r\n")  # headers never finish
    start = time.monotonic()
    assert _request(port, "GET", "/indices-list")[0] == 200  # served meanwhile
    for s in (idle, trickle):
        s.settimeout(5)
        assert s.recv(100) == b""  # closed by the server at its 1 s header deadline
        s.close()
    assert 0.9 < time.monotonic() - start < 3


def test_a_body_that_stops_coming_is_answered_408(index):
    r = Retriever(index[0])
    server = make_server(r, body_timeout=0.5)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        s = socket.create_connection(server.server_address)
        s.sendall(b'POST /knn-service HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"text"')
        s.settimeout(5)
        chunks = []  # headers and body may come in separate segments: read until the server closes
        while chunk := s.recv(1000):
            chunks.append(chunk)
        answer = b"".join(chunks).decode()
        assert answer.startswith("HTTP/1.1 408 ") and "did not arrive within 0.5 s" in answer
        s.close()
    finally:
        server.shutdown()
        server.server_close()


def test_dedup_keeps_the_best_of_each_connected_group():
    # 0~1 and 1~2 are above the threshold, 0 and 2 are not: one group through the chain, as clip-back's
    # connected components; 3 stands alone.
    e = np.array([[1, 0, 0], [0.96, 0.28, 0], [0.85, 0.53, 0], [0, 0, 1]], np.float32)
    assert duplicates(e) == {1, 2}
    assert _components(e, DEDUP_THRESHOLD) == [0, 3]


def test_without_the_serve_extra_the_error_names_it(index, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what an install without the extra has
    with pytest.raises(RetrievalIndexError, match=r"pip install 'curate\[serve\]'"):
        make_app(Retriever(index[0]))


def test_the_cli_serves_both_protocols(index):
    folder, _ = index
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from curate.cli import main; main()",
            "index",
            "serve",
            str(folder),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "ClipClient(url='http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
        port = int(line.split("ClipClient(url='http://127.0.0.1:")[1].split("/")[0])
        assert json.loads(_request(port, "GET", "/indices-list")[2]) == ["curate"]
        assert json.loads(_request(port, "GET", "/info")[2])["dimension"] == 32
    finally:
        proc.terminate()
        proc.wait(10)

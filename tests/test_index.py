"""The retrieval index: build, append, query (Python API and CLI) and serve, on runs over the sample world.

Most tests use a tiny random CLIP, with which a text query finds nothing meaningful: text search is checked
against exact search with the same model, and "finds its own sample" with the sample's own image, which must
come back first with a cosine of ~1. The last test trains the demo's CLIP briefly and checks that a caption
finds its own image.
"""

from __future__ import annotations

import http.client
import json
import tarfile
import threading
import uuid

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import sidecars, write_pipeline
from support.data import make_tiny_clip

from curate.base import RetrievalIndexError
from curate.core.config import load_config
from curate.core.runner import run_pipeline
from curate.index import Retriever, add_to_index, auto_factory, build_index


@pytest.fixture(scope="module")
def runs(tmp_path_factory, world_server):
    """Runs over the two halves of the world with one tiny CLIP; one with another CLIP; one that keeps
    nothing; one without clip_score."""
    world, server = world_server
    tmp = tmp_path_factory.mktemp("index-runs")
    clip, other_clip = make_tiny_clip(tmp / "clip"), make_tiny_clip(tmp / "clip2", seed=1)
    table = world.input_table(server.url)
    halves = {"a": table.slice(0, 100), "b": table.slice(100)}
    for name, part in halves.items():
        pq.write_table(part, tmp / f"{name}.parquet")
    download = {
        "stage": "download",
        "image_size": 64,
        "resize_mode": "center_crop",
        "allow_private": [server.host_port],
    }

    def score(model):
        return {"stage": "clip_score", "model": f"local-dir:{model}", "torch_threads": 1, "decode_threads": 1}

    made = {}
    for name, source, stages in [
        ("a", "a", [download, score(clip)]),
        ("b", "b", [download, score(clip)]),
        ("other_clip", "b", [download, score(other_clip)]),
        ("nothing_kept", "a", [download, score(clip), {"stage": "filter", "rules": ["clip_score >= 2"]}]),
        ("no_clip", "a", [download]),
    ]:
        p = write_pipeline(
            tmp / f"{name}.yaml",
            tmp / f"{source}.parquet",
            tmp / name,
            stages,
            input={"url_col": "url", "caption_col": "caption"},
            shard_size=50,
        )
        run_pipeline(load_config(p, []), overwrite=True, show_progress=False)
        made[name] = tmp / name
    return made


def _kept(output):
    side = sidecars(output)
    return side.filter(pc.and_(pc.equal(side["status"], "ok"), pc.is_null(side["drop_reason"])))


def _tar_images(output) -> dict[str, bytes]:
    images = {}
    for path in sorted((output / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                uid, _, ext = m.name.rpartition(".")
                if ext not in ("json", "txt"):
                    images[uid] = tar.extractfile(m).read()
    return images


@pytest.fixture(scope="module")
def both(runs, tmp_path_factory):
    """A Flat index over runs a and b, built at once."""
    folder = tmp_path_factory.mktemp("both") / "index"
    build_index([str(runs["a"]), str(runs["b"])], folder)
    return folder


def test_an_image_query_finds_its_own_sample_first(runs, both):
    r = Retriever(both)
    kept = _kept(runs["a"]).to_pylist() + _kept(runs["b"]).to_pylist()
    assert len(r) == len(kept) > 150 and r.info["factory"] == "Flat"
    images = _tar_images(runs["a"]) | _tar_images(runs["b"])
    # The tiny random CLIP embeds the world's small flat scenes within ~1e-3 of each other, and the index
    # stores float16 (~1e-4): a sample can come first only where its nearest other sample is further off.
    stored = np.stack([r.embedding(i) for i in range(len(r))])
    sims = stored @ stored.T
    np.fill_diagonal(sims, -1)
    distinct = [r.neighbor(i).uid for i in np.flatnonzero(sims.max(1) < 0.999)]
    assert len(distinct) >= 5
    by_uid = {row["uid"]: row for row in kept}
    for uid in distinct:
        row = by_uid[uid]
        hits = r.search_image(images[uid], k=5)
        top = hits[0]
        assert top.uid == uid and top.score > 0.999
        assert (top.caption, top.url, top.image) == (row["caption"], row["url"], images[uid])
        np.testing.assert_allclose(top.embedding, np.asarray(row["image_embedding"], np.float32), atol=1e-6)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    for row in kept:  # every other sample is within float16 noise of the top
        hits = r.search_image(images[row["uid"]], k=20)
        own = next(h.score for h in hits if h.uid == row["uid"])
        assert own > hits[0].score - 3e-4
    assert r.info["clip"]["model"].startswith("local-dir:") and r.info["dimension"] == 32


def test_text_search_is_the_exact_search_with_the_same_clip(runs, both):
    r = Retriever(both)
    prompt = _kept(runs["a"])["caption"][0].as_py()
    q = r.clip.encode_texts([prompt])[0]
    stored = np.stack([r.embedding(i) for i in range(len(r))])
    want = np.sort(stored @ q)[::-1][:10]  # ties make the order of ids arbitrary; the scores are not
    got = r.search_text(prompt, k=10)
    np.testing.assert_allclose([n.score for n in got], want, atol=1e-5)
    for n in got:
        assert abs(float(stored[n.id] @ q) - n.score) < 1e-5


def test_appending_gives_the_same_answers_as_building_at_once(runs, both, tmp_path):
    appended = tmp_path / "index"
    build_index([str(runs["a"])], appended)
    info = add_to_index(appended, str(runs["b"]))
    assert info["count"] == json.loads((both / "index.json").read_text())["count"]
    assert len(info["sources"]) == 2 and len(info["parts"]) == 2
    once, twice = Retriever(both), Retriever(appended)
    queries = np.stack([once.embedding(i) for i in range(0, len(once), 17)])
    for a, b in zip(once.search_embeddings(queries, 10), twice.search_embeddings(queries, 10), strict=True):
        assert [n.uid for n in a] == [n.uid for n in b]
        assert [n.score for n in a] == [n.score for n in b]
    # The same run again adds nothing: its uids are indexed already.
    again = add_to_index(appended, str(runs["b"]))
    assert again["count"] == info["count"] and again["sources"][-1]["skipped"]["already_indexed"] > 0
    assert sorted(p.name for p in appended.glob("index.*.faiss")) == [again["faiss_file"]]


def test_an_ivf_index_reports_its_recall_and_appends(runs, tmp_path):
    folder = tmp_path / "ivf"
    info = build_index([str(runs["a"])], folder, factory="IVF8,Flat")
    rec = info["expected_recall"]
    assert info["factory"] == "IVF8,Flat" and not rec["exact"] and rec["params"].startswith("nprobe=")
    assert rec["recall_at_10"] >= 0.95 and rec["queries"] == info["count"]
    info = add_to_index(folder, str(runs["b"]))
    r = Retriever(folder)
    assert len(r) == info["count"] and r.info["search_params"] == info["expected_recall"]["params"]
    for row in range(0, len(r), 7):  # a vector is in its nearest list, which is always probed
        x = r.embedding(row)
        hits = r.search_embedding(x, 10)
        # The world's re-encoded copies embed within float16's precision of each other: a row's copies can
        # outrank it by 1e-4, so it is looked for among the hits as close as it is to itself.
        assert hits[0].score >= float(x @ x) - 1e-5 and row in [
            h.id for h in hits if h.score >= float(x @ x) - 1e-3
        ]


def test_lossy_codes_are_reranked_with_the_stored_embeddings(runs, tmp_path):
    info = build_index([str(runs["a"]), str(runs["b"])], tmp_path / "sq", factory="IVF4,SQ4")
    assert info["expected_recall"]["rerank"] == 10
    r = Retriever(tmp_path / "sq")
    stored = np.stack([r.embedding(i) for i in range(len(r))])
    for row in range(0, len(r), 23):
        hits = r.search_embedding(stored[row], 5)
        np.testing.assert_allclose(
            [h.score for h in hits], [stored[h.id] @ stored[row] for h in hits], rtol=1e-6
        )
        assert hits[0].score >= float(stored[row] @ stored[row]) - 1e-6


def test_auto_factory_by_size_and_memory():
    assert auto_factory(5_000, 512, 4 << 30) == "Flat"
    assert auto_factory(200_000, 512, 4 << 30) == "IVF2048,Flat"
    assert auto_factory(200_000, 512, 200 << 20) == "IVF2048,SQ8"
    assert auto_factory(10_000_000, 768, 4 << 30) == "IVF16384_HNSW32,PQ64"
    with pytest.raises(RetrievalIndexError, match="raise --memory"):
        auto_factory(10_000_000, 768, 1 << 20)


def _request(port: int, method: str, path: str, body: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.getheader("Content-Type"), data


def _most_distinct(r: Retriever, images: dict) -> str:
    """The uid among ``images`` whose nearest other sample in the index is furthest off."""
    stored = np.stack([r.embedding(i) for i in range(len(r))])
    sims = stored @ stored.T
    np.fill_diagonal(sims, -1)
    return next(r.neighbor(int(i)).uid for i in np.argsort(sims.max(1)) if r.neighbor(int(i)).uid in images)


def test_the_server_answers_over_http(runs, both):
    from curate.index.serve import make_server

    server = make_server(Retriever(both), "127.0.0.1", 0)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        images = _tar_images(runs["a"])
        # The tiny CLIP embeds most of the world within float16 noise of each other: query the sample that
        # stands furthest from every other, whose own image must come back first.
        uid = _most_distinct(Retriever(both), images)
        status, ctype, data = _request(port, "GET", f"/sample/{uid}")
        assert status == 200 and ctype == "image/jpeg" and data == images[uid]

        status, _, data = _request(port, "GET", "/search?text=a+red+circle&k=4")
        results = json.loads(data)["results"]
        assert status == 200 and len(results) == 4 and results[0]["image"] == f"/sample/{results[0]['uid']}"
        assert {"uid", "score", "caption", "url"} <= set(results[0])

        status, _, data = _request(port, "POST", "/search?k=3", images[uid], {"Content-Type": "image/jpeg"})
        assert status == 200 and json.loads(data)["results"][0]["uid"] == uid
        boundary = uuid.uuid4().hex
        form = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
                f"Content-Type: image/jpeg\r\n\r\n"
            ).encode()
            + images[uid]
            + f"\r\n--{boundary}--\r\n".encode()
        )
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        status, _, data = _request(port, "POST", "/search", form, headers)
        assert status == 200 and json.loads(data)["results"][0]["uid"] == uid

        status, ctype, data = _request(port, "GET", "/")
        assert status == 200 and ctype.startswith("text/html") and b"<form" in data
        assert _request(port, "GET", "/sample/nope")[0] == 404
        assert _request(port, "GET", "/search?text=")[0] == 400
        status, _, data = _request(port, "POST", "/search", b"not an image", {"Content-Type": "image/jpeg"})
        assert status == 400 and "does not decode" in json.loads(data)["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_cli_build_add_query(runs, tmp_path, cli):
    folder = tmp_path / "index"
    r = cli("index", "build", runs["a"], "--index", folder)
    assert r.code == 0 and "factory Flat, exact search" in r.out, r
    r = cli("index", "add", folder, runs["b"])
    assert r.code == 0 and f"{len(_kept(runs['b'])):,} samples" in r.out, r
    images = _tar_images(runs["b"])
    uid = _most_distinct(Retriever(folder), images)
    (tmp_path / "q.jpg").write_bytes(images[uid])
    r = cli("index", "query", folder, "--image", tmp_path / "q.jpg", "-k", 3)
    assert r.code == 0 and r.out.splitlines()[0].split()[1] == uid and len(r.out.splitlines()) == 3, r
    r = cli("index", "query", folder, "--text", "a red circle", "--json")
    assert r.code == 0 and len(json.loads(r.out)) == 10
    # The default index folder is OUTPUT/index.
    assert cli("index", "build", runs["b"]).code == 0 and (runs["b"] / "index" / "index.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (("build", "{tmp}"), "holds no run.json"),
        (("build", "{no_clip}", "--index", "{tmp}/i"), "no clip_score stage"),
        (("build", "{nothing_kept}", "--index", "{tmp}/i"), "no kept sample has an image embedding"),
        (("build", "{a}", "--index", "{tmp}/i", "--factory", "Nonsense12"), "FAISS cannot make factory"),
        (("build", "{a}", "--index", "{tmp}/i", "--factory", "IVF4096,Flat"), "FAISS cannot train"),
        (("add", "{index}", "{other_clip}"), "different CLIP models"),
        (("query", "{index}"), "exactly one of --text or --image"),
        (("query", "{index}", "--image", "{tmp}/missing.jpg"), "no such file"),
        (("query", "{tmp}", "--text", "x"), "not an index folder"),
        (("serve", "{tmp}"), "not an index folder"),
    ],
)
def test_cli_bad_input_exits_2_with_a_message(runs, both, tmp_path, cli, args, message):
    paths = {k: str(v) for k, v in runs.items()} | {"tmp": str(tmp_path), "index": str(both)}
    r = cli("index", *[a.format(**paths) for a in args])
    assert r.code == 2 and message in r.err, r


@pytest.mark.slow
def test_a_caption_finds_its_own_image_with_a_trained_clip(tmp_path, world_server):
    """With the demo's CLIP, trained briefly (60 steps, ~25 s), a text query for a clean sample's caption
    brings back its own image among the top 10 for nearly every sample (chance: 10 of ~150)."""
    from curate.demo.tiny_clip import train_tiny_clip

    world, server = world_server
    clip = tmp_path / "clip"
    train_tiny_clip(clip, steps=60, batch_size=128, threads=2)
    pq.write_table(world.input_table(server.url), tmp_path / "in.parquet")
    download = {
        "stage": "download",
        "image_size": 256,
        "resize_mode": "center_crop",
        "allow_private": [server.host_port],
    }
    score = {"stage": "clip_score", "model": f"local-dir:{clip}", "torch_threads": 2}
    p = write_pipeline(
        tmp_path / "p.yaml",
        tmp_path / "in.parquet",
        tmp_path / "out",
        [download, score],
        input={"url_col": "url", "caption_col": "caption"},
    )
    assert run_pipeline(load_config(p, []), show_progress=False).exit_code == 0
    build_index([str(tmp_path / "out")], tmp_path / "index")
    r = Retriever(tmp_path / "index")
    truth = world.truth_table(server.url).to_pylist()
    clean = {t["uid"] for t in truth if t["kind"] == "clean"}
    kept = [row for row in _kept(tmp_path / "out").to_pylist() if row["uid"] in clean]
    assert len(kept) > 100
    found = [any(h.uid == row["uid"] for h in r.search_text(row["caption"], k=10)) for row in kept]
    assert sum(found) / len(found) >= 0.8, f"{sum(found)} of {len(found)}"

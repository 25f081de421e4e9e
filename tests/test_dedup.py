"""Deduplication: each kind finds what it should and nothing else, decisions are deterministic and point to
kept rows, the keep rule is honoured, resume works across the phases, and decontamination drops rows near an
evaluation set."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import shard_files, sidecars, write_pipeline
from PIL import Image, ImageOps

from curate.kit.duplicates import (
    KIND_PERCEPTUAL,
    KIND_SEMANTIC,
    Pairs,
    exact_groups,
    keep_rank,
    perceptual_pairs,
    resolve,
    semantic_pairs,
)
from curate.kit.hashing import hamming, hex_to_uint64, phash, phashes

# --- hashes -------------------------------------------------------------------------------------------


def _photo(seed: int, size: int = 192) -> Image.Image:
    """A smooth random colour field with fine grain: varied like a photo, unlike any other seed's."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    grain = rng.integers(-6, 7, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, np.int16) + grain, 0, 255).astype(np.uint8))


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def test_phash_is_the_dct_hash_bit_for_bit():
    """Against the textbook definition: 32x32 grey, DCT-II by its sum formula, 8x8 low block > median."""
    img = _photo(1)
    grey = np.asarray(
        img.convert("L").resize((32, 32), Image.Resampling.LANCZOS, reducing_gap=2.0), np.float64
    )
    n = np.arange(32)
    basis = np.cos(np.pi * np.outer(np.arange(8), 2 * n + 1) / 64)  # [k, n]
    low = 4 * basis @ grey @ basis.T
    bits = "".join("1" if v > np.median(low) else "0" for v in low.ravel())
    assert phash(img) == f"{int(bits, 2):016x}"


def test_mirror_hash_is_the_hash_of_the_mirrored_image():
    for seed in range(5):
        img = _photo(seed, size=97 + seed)
        plain, mirror = phashes(img)
        assert phashes(ImageOps.mirror(img)) == (mirror, plain)


def test_phash_survives_reencoding_and_resizing_but_not_flips_or_other_images():
    img = _photo(2)
    h = hex_to_uint64([phash(img)])[0]

    def dist(other: Image.Image) -> int:
        return int(hamming(h, hex_to_uint64([phash(other)])[0]))

    assert dist(Image.open(io.BytesIO(_jpeg(img, 30)))) <= 2
    assert dist(img.resize((120, 120), Image.Resampling.BICUBIC)) <= 2
    assert dist(ImageOps.mirror(img)) >= 12
    assert min(dist(_photo(s)) for s in range(10, 30)) >= 12


# --- finders ------------------------------------------------------------------------------------------


def _brute_force_hamming(hashes: np.ndarray, limit: int) -> set[tuple[int, int]]:
    d = hamming(hashes[:, None], hashes[None, :])
    i, j = np.nonzero(np.triu(d <= limit, 1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def test_perceptual_pairs_are_exactly_the_pairs_within_the_distance():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 1500, dtype=np.uint64)
    # 300 near copies with 0..8 bits flipped.
    src = rng.integers(0, len(base), 300)
    flips = [rng.choice(64, size=k, replace=False) for k in rng.integers(0, 9, 300)]
    near = np.array(
        [base[s] ^ np.uint64(sum(1 << int(b) for b in f)) for s, f in zip(src, flips, strict=True)], np.uint64
    )
    hashes = np.concatenate([base, near])
    rows = np.arange(len(hashes)) * 3 + 7  # row numbers are not positions
    for limit in (0, 3, 6):
        pairs = perceptual_pairs(hashes, rows, limit)
        got = set(zip(pairs.a.tolist(), pairs.b.tolist(), strict=True))
        want = {(rows[i], rows[j]) for i, j in _brute_force_hamming(hashes, limit)}
        assert got == want and len(want) > 30
        assert set(pairs.kind.tolist()) <= {KIND_PERCEPTUAL}
        d = hamming(hashes[(pairs.a - 7) // 3], hashes[(pairs.b - 7) // 3])
        np.testing.assert_allclose(pairs.similarity, 1 - d / 64, rtol=1e-6)


def _planted_vectors(n: int, groups: int, dim: int = 64, seed: int = 0) -> tuple[np.ndarray, set]:
    """``n`` random unit vectors of which ``groups`` have a near copy (cosine ~0.98) appended at the end."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    src = rng.choice(n, groups, replace=False)
    copies = x[src] + 0.2 * rng.standard_normal((groups, dim)).astype(np.float32) / np.sqrt(
        dim
    ) * np.linalg.norm(x[src], axis=1, keepdims=True)
    x = np.concatenate([x, copies])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, {(int(s), n + k) for k, s in enumerate(src)}


def _exact_pairs(x: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    sims = x @ x.T
    i, j = np.nonzero(np.triu(sims >= threshold, 1))
    return set(zip(i.tolist(), j.tolist(), strict=True))


def test_semantic_pairs_with_one_cluster_are_the_exact_search():
    x, planted = _planted_vectors(3000, 150)
    exact = _exact_pairs(x, 0.9)
    assert planted <= exact
    for method in ("semdedup", "range"):
        pairs = semantic_pairs(x.astype(np.float16), np.arange(len(x)), 0.9, method=method, clusters=1)
        got = set(zip(pairs.a.tolist(), pairs.b.tolist(), strict=True))
        assert got == exact, method
        assert (pairs.kind == KIND_SEMANTIC).all() and (pairs.similarity >= 0.9).all()


def test_semantic_pairs_with_clusters_find_the_planted_pairs_and_nothing_below_threshold():
    x, planted = _planted_vectors(6000, 300, seed=1)
    for method in ("semdedup", "range"):
        pairs = semantic_pairs(x, np.arange(len(x)), 0.9, method=method, clusters=40, seed=0)
        got = set(zip(pairs.a.tolist(), pairs.b.tolist(), strict=True))
        assert len(got & planted) / len(planted) >= 0.95, method
        sims = np.einsum("ij,ij->i", x[pairs.a], x[pairs.b])
        assert (sims >= 0.9 - 1e-5).all()
        np.testing.assert_allclose(pairs.similarity, sims, atol=2e-3)
        # Deterministic: the same call gives the same pairs.
        again = semantic_pairs(x, np.arange(len(x)), 0.9, method=method, clusters=40, seed=0)
        assert np.array_equal(again.a, pairs.a) and np.array_equal(again.b, pairs.b)


# --- the torch backend: forced onto the CPU here, the same code on CUDA ----------------------------------


@pytest.fixture
def torch_one_thread():
    """torch on one CPU thread: these tests run many small matrix products, which a busy 2-core machine runs
    many times slower on two threads."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


def _topic_vectors(
    n: int, copies: int, topics: int = 30, dim: int = 64, seed: int = 0
) -> tuple[np.ndarray, set]:
    """Unit vectors around ``topics`` centres (cosines ~0.5 within a topic, as CLIP embeddings cluster by
    subject), and ``copies`` near copies (cosine ~0.98) appended at the end."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[rng.integers(0, topics, n)] + rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n, copies, replace=False)
    near = x[src] + 0.15 * rng.standard_normal((copies, dim)).astype(np.float32) / np.sqrt(dim)
    x = np.concatenate([x, near / np.linalg.norm(near, axis=1, keepdims=True)])
    return x, {(int(s), n + k) for k, s in enumerate(src)}


def _by_pair(p: Pairs) -> dict[tuple[int, int], float]:
    return dict(zip(zip(p.a.tolist(), p.b.tolist(), strict=True), p.similarity.tolist(), strict=True))


@pytest.mark.parametrize("threshold", [0.9, 0.3])
def test_torch_within_finds_the_same_pairs_as_numpy_within_for_the_same_clusters(threshold, torch_one_thread):
    torch = torch_one_thread
    from curate.kit.duplicates.semantic import _cluster_groups, _TorchVectors, _within, _within_torch

    x, _ = _planted_vectors(3000, 200, seed=3)
    x16 = x.astype(np.float16)
    # Given centroids: each vector a member of its nearest of 12 and a guest of the second nearest.
    centroids = np.random.default_rng(4).standard_normal((12, x.shape[1])).astype(np.float32)
    assign = np.argsort(-(x16.astype(np.float32) @ centroids.T), axis=1)[:, :2]
    groups = _cluster_groups(assign)
    assert len(groups) == 12 and max(len(m) for m, _ in groups) > 64  # several blocks per cluster
    # Rows uploaded per cluster, and all rows on the device.
    sources = [_TorchVectors(x16, torch.device("cpu"), budget, batch=1000) for budget in (0, 1 << 40)]
    assert [s.resident is not None for s in sources] == [False, True]
    total = 0
    for members, guests in groups:
        want = _by_pair(_within(x16, members, guests, threshold, block=64))
        for source in sources:
            got = _by_pair(_within_torch(source, members, guests, threshold, block=64))
            assert got.keys() == want.keys()
            np.testing.assert_allclose([got[k] for k in want], list(want.values()), atol=1e-6)
        total += len(want)
    assert total > (100 if threshold > 0.5 else 10_000)


def test_torch_backend_finds_the_planted_pairs_and_nothing_below_threshold(torch_one_thread):
    x, planted = _topic_vectors(6000, 300)
    exact = _exact_pairs(x, 0.9)
    clear = {(a, b) for a, b in planted if float(x[a] @ x[b]) > 0.9 + 0.02}
    assert len(clear) == len(planted)
    rows = np.arange(len(x)) * 3 + 7  # row numbers are not positions
    runs = [
        semantic_pairs(
            x, rows, 0.9, clusters=40, seed=0, backend="torch", torch_device="cpu", device_budget=budget
        )
        for budget in (0, 1 << 40)
    ]
    for pairs in runs:
        got = {((a - 7) // 3, (b - 7) // 3) for a, b in zip(pairs.a.tolist(), pairs.b.tolist(), strict=True)}
        assert clear <= got <= exact
        assert (pairs.kind == KIND_SEMANTIC).all() and (pairs.a < pairs.b).all()
        sims = np.einsum("ij,ij->i", x[(pairs.a - 7) // 3], x[(pairs.b - 7) // 3])
        np.testing.assert_allclose(pairs.similarity, sims, atol=1e-5)
    # Where the vectors live changes nothing, and the same call gives the same pairs.
    assert all(np.array_equal(getattr(runs[0], f), getattr(runs[1], f)) for f in ("a", "b", "similarity"))


def test_torch_backend_with_one_cluster_is_the_exact_search(torch_one_thread):
    x, _ = _planted_vectors(3000, 150)
    x16 = x.astype(np.float16)
    pairs = semantic_pairs(x16, np.arange(len(x)), 0.9, clusters=1, backend="torch", torch_device="cpu")
    assert set(zip(pairs.a.tolist(), pairs.b.tolist(), strict=True)) == _exact_pairs(
        x16.astype(np.float32), 0.9
    )
    with pytest.raises(ValueError, match="FAISS only"):
        semantic_pairs(x16, np.arange(len(x)), 0.9, method="range", backend="torch", torch_device="cpu")


@pytest.mark.parametrize(
    "torch_gpu,faiss_gpus,device,method,want",
    [
        (False, 0, "auto", "semdedup", "faiss-cpu"),
        (False, 0, "cpu", "semdedup", "faiss-cpu"),
        (False, 0, "cuda", "semdedup", "neither sees one"),
        (False, 1, "auto", "semdedup", "faiss-gpu"),
        (False, 1, "cuda", "semdedup", "faiss-gpu"),
        (True, 1, "auto", "semdedup", "torch-cuda"),
        (True, 0, "cuda", "semdedup", "torch-cuda"),
        (True, 1, "cpu", "semdedup", "faiss-cpu"),
        (True, 1, "auto", "range", "faiss-cpu"),
        (True, 1, "cuda", "range", "runs on the CPU"),
    ],
)
def test_device_chooses_the_backend(monkeypatch, torch_gpu, faiss_gpus, device, method, want):
    """What torch and FAISS see decides; patched at the libraries, so the checks themselves are tested."""
    torch = pytest.importorskip("torch")
    faiss = pytest.importorskip("faiss")
    from curate.kit.duplicates.semantic import choose_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: torch_gpu)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: faiss_gpus, raising=False)
    if want.endswith(("one", "CPU")):
        with pytest.raises(RuntimeError, match=want):
            choose_backend(device, method)
    else:
        assert choose_backend(device, method).label == want


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_has_gpu(), reason="the choices of a machine without a GPU")
def test_the_stage_records_its_backend_and_refuses_cuda_without_a_gpu(tmp_path, cli):
    _planted_input(tmp_path / "in.parquet")
    semantic = {"threshold": 0.95, "clusters": 4}
    for name, device in (("auto", "auto"), ("cpu", "cpu")):
        stages = [
            PLANTED,
            {
                "stage": "dedup",
                "exact": False,
                "perceptual": False,
                "semantic": {**semantic, "device": device},
            },
        ]
        out = _run(cli, tmp_path, name, stages)
        summary = json.loads((out / "dedup" / "dedup.json").read_text())
        assert summary["semantic_backend"] == "faiss-cpu" and summary["counts"]["semantic"] == 36, name
    stages = [PLANTED, {"stage": "dedup", "semantic": {**semantic, "device": "cuda"}}]
    p = write_pipeline(
        tmp_path / "cuda.yaml", tmp_path / "in.parquet", tmp_path / "cuda", stages, shard_size=40
    )
    r = cli("run", p, "-q")
    assert r.code == 2 and "semantic.device" in r.err and "neither sees one" in r.err


# --- decisions ----------------------------------------------------------------------------------------


def test_keep_rank_by_score_descending_nulls_last_then_uid():
    scores = np.array([0.5, np.nan, 0.9, 0.5, 0.1])
    uids = np.array(["e", "a", "c", "b", "d"], dtype=object)
    rank = keep_rank([(scores, True)], uids, np.arange(5))
    assert [int(np.flatnonzero(rank == r)[0]) for r in range(5)] == [2, 3, 0, 4, 1]
    rank = keep_rank([(scores, False)], uids, np.arange(5))
    assert [int(np.flatnonzero(rank == r)[0]) for r in range(5)] == [4, 3, 0, 2, 1]


def test_exact_groups_point_to_the_best_ranked_copy():
    digests = np.array(["x", "y", "x", None, "x", "y"], dtype=object)
    rank = np.array([3, 0, 1, 2, 5, 4])
    assert exact_groups(digests, rank).tolist() == [2, 1, 2, 3, 2, 1]


def _pairs(edges: list[tuple[int, int, int, float]]) -> Pairs:
    a, b, k, s = zip(*edges, strict=True)
    return Pairs(np.array(a), np.array(b), np.array(k, np.int8), np.array(s, np.float32))


def test_resolve_never_drops_a_row_for_a_dropped_one():
    # 0 - 1 - 2 in a chain (0 and 2 are not alike), best rank first: 1 goes, 2 stays.
    d = resolve(3, np.array([0, 1, 2]), _pairs([(0, 1, KIND_SEMANTIC, 0.96), (1, 2, KIND_SEMANTIC, 0.97)]))
    assert d.dup_of.tolist() == [-1, 0, -1]
    # A perceptual match wins over a more similar semantic one.
    d = resolve(3, np.array([0, 1, 2]), _pairs([(0, 2, KIND_PERCEPTUAL, 0.9), (1, 2, KIND_SEMANTIC, 0.99)]))
    assert d.dup_of.tolist() == [-1, -1, 0] and d.kind.tolist() == [-1, -1, KIND_PERCEPTUAL]


def test_resolve_on_a_random_graph_keeps_an_independent_set_that_covers_every_dropped_row():
    rng = np.random.default_rng(5)
    n = 400
    edges = {tuple(sorted(map(int, rng.choice(n, 2, replace=False)))) for _ in range(600)}
    pairs = _pairs([(a, b, int(rng.integers(2)), float(rng.uniform(0.9, 1))) for a, b in sorted(edges)])
    rank = rng.permutation(n)
    d = resolve(n, rank, pairs)
    kept = d.dup_of == -1
    for a, b in edges:  # no two kept rows are alike
        assert not (kept[a] and kept[b])
    for r in np.flatnonzero(~kept):  # every dropped row points to a kept, better-ranked partner
        target = d.dup_of[r]
        assert kept[target] and rank[target] < rank[r] and tuple(sorted((r, target))) in edges


# --- the stage in a pipeline -------------------------------------------------------------------------


def _planted_input(path, seed: int = 0) -> tuple[dict, list[str]]:
    """Rows with planted sha256, phash, image_embedding and clip_score, and the groups they form.

    Row kinds: 12 exact copies (same sha256), 12 hash neighbours (phash within 2 bits, embeddings alike),
    12 embedding neighbours (cosine ~0.98, hashes far apart), and 60 rows unlike any other."""
    rng = np.random.default_rng(seed)
    n_base = 96
    dim = 32
    base = rng.standard_normal((n_base, dim)).astype(np.float32)
    emb = [v / np.linalg.norm(v) for v in base]
    sha = [f"{i:064x}" for i in range(n_base)]
    ph = [f"{int(h):016x}" for h in rng.integers(0, 2**63, n_base, dtype=np.uint64)]
    kind = ["unique"] * n_base
    original = [None] * n_base
    for src in range(12):  # exact
        emb.append(emb[src])
        sha.append(sha[src])
        ph.append(ph[src])
        kind.append("exact")
        original.append(src)
    for src in range(12, 24):  # perceptual: 2 bits off, same picture
        emb.append(emb[src])
        sha.append(f"{1000 + src:064x}")
        ph.append(f"{int(ph[src], 16) ^ 0b101:016x}")
        kind.append("perceptual")
        original.append(src)
    for src in range(24, 36):  # semantic: a close embedding, another hash
        v = emb[src] + 0.15 * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
        emb.append(v / np.linalg.norm(v))
        sha.append(f"{2000 + src:064x}")
        ph.append(f"{int(ph[src], 16) ^ (2**64 - 1):016x}")
        kind.append("semantic")
        original.append(src)
    n = len(emb)
    order = rng.permutation(n)  # copies are spread over the shards, before and after their originals
    scores = rng.uniform(0.2, 0.4, n)
    table = pa.table(
        {
            "URL": [f"http://example.com/{i}.jpg" for i in range(n)],
            "TEXT": [f"row {i}" for i in range(n)],
            "image_embedding": pa.array([e.tolist() for e in emb], pa.list_(pa.float32())),
            "sha256": sha,
            "phash": ph,
            # Mirror hashes like no other hash: none of these rows is a flip of another.
            "phash_mirror": [f"{int(h):016x}" for h in rng.integers(0, 2**63, n, dtype=np.uint64)],
            "clip_score": scores,
        }
    ).take(pa.array(order))
    pq.write_table(table, path)
    truth = {
        "kind": [kind[i] for i in order],
        "group": [original[i] if original[i] is not None else i for i in order],
        "score": [scores[i] for i in order],
    }
    return truth, [f"http://example.com/{i}.jpg" for i in order]


PLANTED = {
    "stage": "planted",
    "columns": ["image_embedding", "sha256", "phash", "phash_mirror", "clip_score"],
}


def _run(cli, tmp_path, name, stages, executor="local", **top):
    out = tmp_path / name
    p = write_pipeline(tmp_path / f"{name}.yaml", tmp_path / "in.parquet", out, stages, shard_size=40, **top)
    r = cli("run", p, "-q", "--executor", executor)
    assert r.code == 0, r
    return out


def _by_url(side: pa.Table) -> dict[str, dict]:
    return {r["url"]: r for r in side.to_pylist()}


@pytest.mark.parametrize(
    "settings,finds",
    [
        ({"exact": True, "perceptual": False, "semantic": False}, {"exact"}),
        (
            {"exact": False, "perceptual": {"max_distance": 2, "verify_cosine": None}, "semantic": False},
            {"exact", "perceptual"},  # a byte copy is also a hash neighbour
        ),
        (
            {"exact": False, "perceptual": False, "semantic": {"threshold": 0.95, "clusters": 4}},
            {"exact", "perceptual", "semantic"},  # copies and re-encodes embed alike too
        ),
    ],
)
def test_each_kind_finds_its_planted_duplicates_and_nothing_else(tmp_path, cli, settings, finds):
    truth, urls = _planted_input(tmp_path / "in.parquet")
    out = _run(cli, tmp_path, "out", [PLANTED, {"stage": "dedup", **settings}])
    rows = _by_url(sidecars(out))
    dropped = {u for u in urls if rows[u]["drop_reason"] is not None}
    want = {u for u, k in zip(urls, truth["kind"], strict=True) if k in finds}
    # Each planted group has two rows: exactly one of them goes, the one with the lower clip_score.
    group_of = dict(zip(urls, truth["group"], strict=True))
    groups = {}
    for u in urls:
        groups.setdefault(group_of[u], []).append(u)
    expected_drops = set()
    for members in groups.values():
        if len(members) == 2 and any(u in want for u in members):
            expected_drops.add(min(members, key=lambda u: rows[u]["clip_score"]))
    assert dropped == expected_drops and len(dropped) == 12 * len(finds)
    for u in dropped:
        r = rows[u]
        partner = rows[next(m for m in groups[group_of[u]] if m != u)]
        assert r["dup_of"] == partner["uid"] and partner["drop_reason"] is None
        assert r["drop_reason"] == f"duplicate:{r['dup_kind']}:{partner['uid']}"
        assert partner["clip_score"] >= r["clip_score"]
    kinds = {rows[u]["dup_kind"] for u in dropped}
    if settings["exact"]:
        assert kinds == {"exact"}
    summary = json.loads((out / "dedup" / "dedup.json").read_text())
    assert summary["counts"]["considered"] == len(urls)
    assert summary["counts"]["kept"] == len(urls) - len(dropped)
    decisions = pq.read_table(out / "dedup" / "dedup.parquet")
    assert decisions.num_rows == len(dropped)


def test_decisions_are_identical_across_executors_and_runs(tmp_path, cli, ray_cluster):
    _planted_input(tmp_path / "in.parquet", seed=1)
    stages = [PLANTED, {"stage": "dedup", "semantic": {"threshold": 0.95, "clusters": 4}}]
    local = _run(cli, tmp_path, "local", stages)
    again = _run(cli, tmp_path, "again", stages)
    ray = _run(cli, tmp_path, "ray", stages, executor="ray")
    for other in (again, ray):
        assert shard_files(local) == shard_files(other)
        assert (local / "dedup/dedup.parquet").read_bytes() == (other / "dedup/dedup.parquet").read_bytes()


def test_keep_rule_ascending_keeps_the_lowest_score(tmp_path, cli):
    _truth, urls = _planted_input(tmp_path / "in.parquet")
    out = _run(
        cli, tmp_path, "out", [PLANTED, {"stage": "dedup", "semantic": False, "keep": ["clip_score asc"]}]
    )
    rows = _by_url(sidecars(out))
    for u in urls:
        r = rows[u]
        if r["dup_of"] is not None:
            kept = next(x for x in rows.values() if x["uid"] == r["dup_of"])
            assert kept["clip_score"] <= r["clip_score"]


def test_rerun_after_losing_a_final_shard_reuses_the_decisions(tmp_path, cli):
    _planted_input(tmp_path / "in.parquet")
    stages = [PLANTED, {"stage": "dedup", "semantic": {"threshold": 0.95, "clusters": 4}}]
    out = _run(cli, tmp_path, "out", stages)
    before = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    done = (out / "global/dedup/_done").read_bytes()
    for suffix in ("_stats.json", ".tar", ".parquet"):
        (out / "shards" / f"00001{suffix}").unlink()
    p = tmp_path / "out.yaml"
    r = cli("run", p, "-q")
    assert r.code == 0, r
    after = {p.name: p.read_bytes() for p in (out / "shards").iterdir()}
    assert set(after) == set(before)
    for name in after:
        if not name.endswith("_stats.json"):  # stats hold timings
            assert after[name] == before[name], name
    assert (out / "global/dedup/_done").read_bytes() == done  # not fitted again


def test_rows_dropped_before_dedup_keep_their_reason_and_are_not_considered(tmp_path, cli):
    _truth, urls = _planted_input(tmp_path / "in.parquet")
    stages = [
        PLANTED,
        {"stage": "filter", "rules": ["clip_score >= 0.25"]},
        {"stage": "dedup", "semantic": False},
    ]
    out = _run(cli, tmp_path, "out", stages)
    rows = _by_url(sidecars(out))
    low = [u for u in urls if rows[u]["clip_score"] < 0.25]
    assert low and all(rows[u]["drop_reason"] == "clip_score<0.25" for u in low)
    assert all(rows[u]["dup_of"] is None for u in low)
    summary = json.loads((out / "dedup/dedup.json").read_text())
    assert summary["counts"]["considered"] == len(urls) - len(low)


def test_nothing_left_to_compare(tmp_path, cli):
    _, urls = _planted_input(tmp_path / "in.parquet")
    stages = [PLANTED, {"stage": "filter", "rules": ["clip_score >= 2"]}, {"stage": "dedup"}]
    out = _run(cli, tmp_path, "out", stages)
    side = sidecars(out)
    assert side.num_rows == len(urls) and set(side["drop_reason"].to_pylist()) == {"clip_score<2"}
    assert json.loads((out / "dedup/dedup.json").read_text())["counts"]["considered"] == 0


def test_config_errors_name_the_field(tmp_path, cli):
    _planted_input(tmp_path / "in.parquet")
    p = write_pipeline(
        tmp_path / "p.yaml",
        tmp_path / "in.parquet",
        tmp_path / "o",
        [PLANTED, {"stage": "dedup", "keep": ["url"]}],
    )
    r = cli("validate", p)
    assert r.code == 2 and "url" in r.out + r.err and "not a number" in r.out + r.err
    # No embeddings in the pipeline: semantic dedup says which stage writes them.
    p = write_pipeline(
        tmp_path / "q.yaml",
        tmp_path / "in.parquet",
        tmp_path / "o",
        [{"stage": "planted", "columns": ["sha256", "clip_score"]}, {"stage": "dedup", "perceptual": False}],
    )
    r = cli("validate", p)
    assert r.code == 2 and "image_embedding" in r.out + r.err and "clip_score" in r.out + r.err


# --- on images, through the download ------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_server():
    """Originals and their variants: byte copy, re-encode, resize, crop, flip, another image (same caption)."""
    from curate.demo.server import WorldServer

    files = {}
    rows = []
    for k in range(6):
        img = _photo(100 + k)
        body = _jpeg(img)
        variants = {
            "original": body,
            "copy": body,
            "reencode": _jpeg(img, 35),
            "resize": _jpeg(img.resize((150, 150), Image.Resampling.BICUBIC)),
            "crop": _jpeg(img.crop((24, 24, 168, 168))),
            "flip": _jpeg(ImageOps.mirror(img)),
            "other": _jpeg(_photo(200 + k)),
        }
        for name, data in variants.items():
            path = f"/{k}/{name}.jpg"
            files[path] = data
            rows.append((path, f"photo number {k}", name))
    # Two flat drawings that differ only in the shape: pHash hardly tells them apart.
    from curate.demo.world import _draw, _Scene, _Shape

    for kind in ("circle", "diamond"):
        scene = _Scene(192, 192, "red", (_Shape(kind, "yellow", 96.0, 96.0, 20.0, 0.0),), "PNG")
        buf = io.BytesIO()
        _draw(scene, np.random.default_rng(0)).save(buf, "PNG")
        files[f"/flat/{kind}.png"] = buf.getvalue()
    with WorldServer() as server:
        for path, data in files.items():
            server.add(path, data, "image/png" if path.endswith(".png") else "image/jpeg")
        yield server, rows


def test_exact_and_perceptual_on_downloaded_images(tmp_path, cli, image_server):
    server, rows = image_server
    pq.write_table(
        pa.table({"URL": [server.url + p for p, _, _ in rows], "TEXT": [c for _, c, _ in rows]}),
        tmp_path / "in.parquet",
    )
    download = {
        "stage": "download",
        "allow_private": [server.host_port],
        "image_size": 128,
        "resize_mode": "keep_ratio",
    }
    for name, settings, finds in [
        ("exact", {"exact": True, "perceptual": False}, {"copy"}),
        (
            "perceptual",
            {"exact": False, "perceptual": {"verify_cosine": None, "flips": False}},
            {"copy", "reencode", "resize"},
        ),
        (
            "flips",
            {"exact": False, "perceptual": {"verify_cosine": None}},
            {"copy", "reencode", "resize", "flip"},
        ),
    ]:
        out = _run(
            cli, tmp_path, name, [download, {"stage": "dedup", "semantic": False, "keep": [], **settings}]
        )
        side = sidecars(out).to_pylist()
        by_path = {r["url"][len(server.url) :]: r for r in side}
        dropped = {p for p, r in by_path.items() if r["drop_reason"] is not None}
        # Of each pair the row with the larger uid goes (the keep rule is empty: uid order).
        for k in range(6):
            group = [f"/{k}/original.jpg"] + [f"/{k}/{v}.jpg" for v in finds]
            kept = min(group, key=lambda p: by_path[p]["uid"])
            assert {p for p in dropped if p.startswith(f"/{k}/")} == set(group) - {kept}, (name, k)
            for p in set(group) - {kept}:
                assert by_path[p]["dup_of"] == by_path[kept]["uid"]
                assert by_path[p]["dup_kind"] == ("exact" if name == "exact" else "perceptual")
                if p.endswith("flip.jpg") or by_path[kept]["url"].endswith("flip.jpg"):
                    assert by_path[p]["dup_similarity"] >= 1 - 4 / 64


def test_pixel_check_rejects_hash_matches_of_different_pictures(tmp_path, cli, image_server):
    server, _ = image_server
    paths = ["/flat/circle.png", "/flat/diamond.png"] + [
        f"/0/{v}.jpg" for v in ("original", "reencode", "flip")
    ]
    pq.write_table(
        pa.table({"URL": [server.url + p for p in paths], "TEXT": ["a picture"] * len(paths)}),
        tmp_path / "in.parquet",
    )
    download = {
        "stage": "download",
        "allow_private": [server.host_port],
        "image_size": 128,
        "resize_mode": "keep_ratio",
    }
    dropped = {}
    for name, pixels in (("hashes", None), ("pixels", 0.9)):
        perceptual = {"verify_cosine": None, "verify_pixels": pixels}
        dedup = {"stage": "dedup", "exact": False, "semantic": False, "keep": [], "perceptual": perceptual}
        out = _run(cli, tmp_path, name, [download, dedup])
        rows = {r["url"][len(server.url) :]: r for r in sidecars(out).to_pylist()}
        d = hamming(*hex_to_uint64([rows["/flat/circle.png"]["phash"], rows["/flat/diamond.png"]["phash"]]))
        assert d <= 4  # the precondition: the hashes alone call them copies
        dropped[name] = {p for p, r in rows.items() if r["drop_reason"] is not None}
    assert len(dropped["hashes"] & {"/flat/circle.png", "/flat/diamond.png"}) == 1
    assert dropped["pixels"] == dropped["hashes"] - {"/flat/circle.png", "/flat/diamond.png"}
    assert len(dropped["pixels"]) == 2  # the re-encode and the flip of the photo still go


def test_decontamination_drops_rows_near_the_evaluation_set(tmp_path, cli, image_server):
    server, rows = image_server
    pq.write_table(
        pa.table({"URL": [server.url + p for p, _, _ in rows], "TEXT": [c for _, c, _ in rows]}),
        tmp_path / "in.parquet",
    )
    evals = tmp_path / "eval"
    evals.mkdir()
    # The evaluation set holds image 0 as published and a re-encode of image 1's original.
    (evals / "a.jpg").write_bytes(_jpeg(_photo(100)))
    Image.open(io.BytesIO(_jpeg(_photo(101)))).save(evals / "b.png")
    download = {
        "stage": "download",
        "allow_private": [server.host_port],
        "image_size": 128,
        "resize_mode": "keep_ratio",
    }
    dedup = {
        "stage": "dedup",
        "exact": False,
        "perceptual": False,
        "semantic": False,
        "keep": [],
        "decontaminate": {"path": str(evals), "max_distance": 4},
    }
    out = _run(cli, tmp_path, "out", [download, dedup])
    by_path = {r["url"][len(server.url) :]: r for r in sidecars(out).to_pylist()}
    hit = {p for p, r in by_path.items() if r["drop_reason"] == "contaminated"}
    assert hit == {f"/{k}/{v}.jpg" for k in (0, 1) for v in ("original", "copy", "reencode", "resize")}
    assert by_path["/0/copy.jpg"]["contaminated_by"] == "a.jpg"
    assert by_path["/1/original.jpg"]["contaminated_by"] == "b.png"


def test_decontamination_by_embeddings_file(tmp_path, cli):
    _truth, urls = _planted_input(tmp_path / "in.parquet")
    table = pq.read_table(tmp_path / "in.parquet")
    emb = np.array(table["image_embedding"].to_pylist()[:3], np.float32)
    np.save(tmp_path / "eval.npy", emb)
    stages = [
        PLANTED,
        {
            "stage": "dedup",
            "exact": False,
            "perceptual": False,
            "semantic": False,
            "decontaminate": {"path": str(tmp_path / "eval.npy"), "threshold": 0.99},
        },
    ]
    out = _run(cli, tmp_path, "out", stages)
    rows = _by_url(sidecars(out))
    hit = {u for u in urls if rows[u]["drop_reason"] == "contaminated"}
    want = {
        u
        for u, e in zip(urls, np.array(table["image_embedding"].to_pylist(), np.float32), strict=True)
        if (emb @ e).max() >= 0.99
    }
    assert hit == want and len(want) >= 3
    assert {rows[u]["contaminated_by"] for u in hit} <= {f"eval.npy[{i}]" for i in range(3)}

"""Retrieval index: recall@10 against exact search and query latency, per factory, same machine, same run.

    python benchmarks/index_recall.py                  # 200,000 x 512, a few minutes on 2 cores
    python benchmarks/index_recall.py --n 50000        # a quick look

The vectors are like CLIP embeddings, made by the generator of ``dedup_scale.py`` (a mixture of topics on
the unit sphere, 5 % near copies), stored float16 as the index stores them. ``--queries`` more vectors from
the same generator are held out (not indexed) and used as queries; their exact top 10 (FAISS flat inner
product) is the ground truth. Each factory is built as ``curate index build`` builds it (:func:`new_index`,
then :func:`tune` picks nprobe on indexed vectors as queries and reports that "expected recall"), then
measured on the held-out queries: recall@10, and latency both one query at a time and in one batch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dedup_scale import make_vectors

from curate.index.factory import auto_factory, new_index, parse_size, rerank_factor, search, tune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--topics", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single", type=int, default=200, help="queries timed one at a time")
    ap.add_argument("--budgets", default="4GB,200MB,40MB", help="memory budgets for factory=auto")
    ap.add_argument("--factories", default="IVF1024,PQ64", help="explicit factories, comma-separated by ';'")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import faiss

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vectors.npy"
        start = time.perf_counter()
        make_vectors(path, args.n + args.queries, args.dim, args.topics, 0.05, args.seed)
        every = np.load(path, mmap_mode="r")
        # Held-out queries: a random subset of the rows, so near copies of indexed rows are among them too.
        rng = np.random.default_rng(args.seed + 1)
        held = np.zeros(len(every), bool)
        held[rng.choice(len(every), args.queries, replace=False)] = True
        base = np.asarray(every[~held])
        queries = np.ascontiguousarray(every[held], np.float32)
        print(
            f"{args.n:,} x {args.dim} vectors + {args.queries:,} held-out queries in {time.perf_counter() - start:.1f}s"
        )

        exact = faiss.IndexFlatIP(args.dim)
        for s in range(0, len(base), 65536):
            exact.add(np.ascontiguousarray(base[s : s + 65536], np.float32))
        t = time.perf_counter()
        _, truth = exact.search(queries, 10)
        flat_batch = (time.perf_counter() - t) * 1000 / len(queries)
        flat_single = _single(lambda q: exact.search(q, 10), queries[: args.single])

        plans = [
            (f"auto ({b})", auto_factory(args.n, args.dim, parse_size(b))) for b in args.budgets.split(",")
        ]
        plans += [(f, f) for f in args.factories.split(";") if f]
        rows = [
            ("exact (Flat)", "Flat", 0.0, 1.0, "", 1.0, flat_single, flat_batch, exact.ntotal * args.dim * 4)
        ]
        for label, factory in plans:
            if factory == "Flat":
                continue
            t = time.perf_counter()
            index = new_index(base, factory, args.seed)
            for s in range(0, len(base), 65536):
                index.add(np.ascontiguousarray(base[s : s + 65536], np.float32))
            expected = tune(index, factory, [base], 1000, args.seed)
            build = time.perf_counter() - t
            t = time.perf_counter()
            rerank = rerank_factor(factory)
            _, found = search(index, [base], queries, 10, rerank)
            batch = (time.perf_counter() - t) * 1000 / len(queries)
            single = _single(
                lambda q, index=index, rerank=rerank: search(index, [base], q, 10, rerank),
                queries[: args.single],
            )
            recall = np.mean([len(set(f) & set(g)) / 10 for f, g in zip(found, truth, strict=True)])
            size = len(faiss.serialize_index(index))
            rows.append(
                (
                    label,
                    factory,
                    build,
                    expected["recall_at_10"],
                    expected["params"] + (f", re-rank {rerank}x" if rerank else ""),
                    recall,
                    single,
                    batch,
                    size,
                )
            )
            print(f"  {label}: {factory} done in {build:.1f}s", flush=True)

    print()
    print(
        "| index | factory | build s | expected recall@10 (build) | search params | recall@10 (held-out) "
        "| ms/query, one at a time | ms/query, batch | index size |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, factory, build, exp, params, recall, single, batch, size in rows:
        print(
            f"| {label} | `{factory}` | {build:.1f} | {exp:.3f} | {params or '-'} | {recall:.3f} | {single:.2f} "
            f"| {batch:.3f} | {size / 2**20:.0f} MiB |"
        )


def _single(search_one, queries: np.ndarray) -> float:
    """Milliseconds per query, searching one query at a time (as the server does)."""
    t = time.perf_counter()
    for q in queries:
        search_one(q[None, :])
    return (time.perf_counter() - t) * 1000 / len(queries)


if __name__ == "__main__":
    main()

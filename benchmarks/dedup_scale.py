"""Semantic dedup at scale: SemDeDup and range search against exact all-pairs search, same machine, same run.

    python benchmarks/dedup_scale.py                 # 1,000,000 x 512, about 10 minutes on 2 cores
    python benchmarks/dedup_scale.py --n 100000      # a quick look

The vectors are like CLIP embeddings: a mixture of ``--topics`` Gaussian clusters on the unit sphere
(within a topic, cosines of 0.3 to 0.7), and ``--dup-share`` of the rows are near copies of another row
(cosine 0.95 to 0.995), in groups of 2 to 4. They are written as float16 to a memory-mapped file, as the
dedup stage reads them.

Exact all-pairs search is too slow to run on a million vectors here, so it runs on a sample of ``--sample``
query rows against every row (FAISS flat inner product, in blocks); its time times ``n / sample`` is the
time of the whole exact search, and its pairs are the ground truth for recall and precision of the pairs
that involve a sampled row. Peak memory is the process's peak resident set size, which counts the pages
of the memory-mapped file that were touched.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curate.kit.duplicates.semantic import semantic_pairs


def make_vectors(path: Path, n: int, dim: int, topics: int, dup_share: float, seed: int) -> np.ndarray:
    """Write the vectors to ``path`` (float16) and return the planted near-copy pairs (a, b), a < b."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    n_dup = int(n * dup_share)
    n_base = n - n_dup
    chunk = 100_000
    spread = rng.uniform(0.9, 1.6, topics).astype(np.float32)  # topic width: cosines ~0.3 to 0.7 within
    for start in range(0, n_base, chunk):
        m = min(chunk, n_base - start)
        topic = rng.integers(0, topics, m)
        x = centres[topic] + spread[topic, None] * rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(
            dim
        )
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    # Near copies: groups of 2 to 4 around a base row.
    sources, copies = [], []
    row = n_base
    while row < n:
        src = int(rng.integers(0, n_base))
        size = min(int(rng.integers(1, 4)), n - row)
        base = out[src].astype(np.float32)
        for _ in range(size):
            noise = rng.uniform(0.1, 0.3) * rng.standard_normal(dim).astype(np.float32) / np.sqrt(dim)
            v = base + noise
            out[row] = v / np.linalg.norm(v)
            sources.append(src)
            copies.append(row)
            row += 1
    out.flush()
    groups: dict[int, list[int]] = {}
    for s, c in zip(sources, copies, strict=True):
        groups.setdefault(s, [s]).append(c)
    planted = {(min(a, b), max(a, b)) for g in groups.values() for i, a in enumerate(g) for b in g[i + 1 :]}
    return np.array(sorted(planted), np.int64).reshape(-1, 2)


def exact_sample(vectors: np.ndarray, queries: np.ndarray, threshold: float, block: int = 65536) -> tuple:
    """Every (query, row) pair with cosine >= threshold, by brute force over all rows; and the seconds."""
    start = time.perf_counter()
    q = vectors[queries].astype(np.float32)
    found = []
    for lo in range(0, len(vectors), block):
        x = vectors[lo : lo + block].astype(np.float32)
        sims = q @ x.T
        i, j = np.nonzero(sims >= threshold)
        j = j + lo
        other = j != queries[i]
        found += [
            (min(a, b), max(a, b)) for a, b in zip(queries[i[other]].tolist(), j[other].tolist(), strict=True)
        ]
    return set(found), time.perf_counter() - start


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--topics", type=int, default=2000)
    ap.add_argument("--dup-share", type=float, default=0.05)
    ap.add_argument("--sample", type=int, default=1000, help="query rows of the exact search")
    ap.add_argument("--clusters", type=int, default=None, help="default: sqrt(n)")
    ap.add_argument(
        "--methods", default="semdedup:1,semdedup:2,range", help="method[:spill], comma-separated"
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="curate-dedup-bench-") as tmp:
        path = Path(tmp) / "vectors.npy"
        t = time.perf_counter()
        planted = make_vectors(path, args.n, args.dim, args.topics, args.dup_share, args.seed)
        vectors = np.load(path, mmap_mode="r")
        print(
            f"{args.n:,} x {args.dim} float16 vectors ({path.stat().st_size / 2**30:.2f} GiB memory-mapped), "
            f"{len(planted):,} planted near-copy pairs; made in {time.perf_counter() - t:.0f}s; "
            f"{args.threads} threads"
        )
        rng = np.random.default_rng(args.seed + 1)
        queries = np.sort(rng.choice(args.n, args.sample, replace=False))
        truth, exact_seconds = exact_sample(vectors, queries, args.threshold)
        exact_total = exact_seconds * args.n / args.sample
        print(
            f"exact search, {args.sample:,} queries x {args.n:,} rows: {exact_seconds:.1f}s -> all pairs "
            f"~{exact_total:,.0f}s ({exact_total / 3600:.1f} h); {len(truth):,} true pairs touch the sample"
        )
        # Planted pairs whose vectors ended up at or above the threshold (two copies of one row can be
        # further apart than each is from the row).
        sims = np.einsum(
            "ij,ij->i", vectors[planted[:, 0]].astype(np.float32), vectors[planted[:, 1]].astype(np.float32)
        )
        close_planted = planted[sims >= args.threshold]
        in_sample = np.zeros(args.n, bool)
        in_sample[queries] = True

        print(
            f"{'method':<12}{'seconds':>9}{'vs exact':>10}{'recall':>9}{'precision':>11}"
            f"{'planted recall':>16}{'peak RSS GiB':>14}"
        )
        for spec in args.methods.split(","):
            method, _, spill = spec.partition(":")
            t = time.perf_counter()
            pairs = semantic_pairs(
                vectors,
                np.arange(args.n),
                args.threshold,
                method=method,
                clusters=args.clusters,
                spill=int(spill or 1),
                seed=args.seed,
                threads=args.threads,
            )
            seconds = time.perf_counter() - t
            touch = in_sample[pairs.a] | in_sample[pairs.b]
            got = set(zip(pairs.a[touch].tolist(), pairs.b[touch].tolist(), strict=True))
            recall = len(got & truth) / max(len(truth), 1)
            precision = len(got & truth) / max(len(got), 1)
            found = set(zip(pairs.a.tolist(), pairs.b.tolist(), strict=True))
            planted_recall = sum((int(a), int(b)) in found for a, b in close_planted) / max(
                len(close_planted), 1
            )
            print(
                f"{spec:<12}{seconds:>9.1f}{exact_total / seconds:>9.0f}x{recall:>9.4f}{precision:>11.4f}"
                f"{planted_recall:>16.4f}{peak_rss_gib():>14.2f}"
            )


if __name__ == "__main__":
    main()

"""Download throughput against the number of threads per worker, on the sample world served locally.

Threads suit this work: sockets wait without the GIL, and Pillow releases it while decoding and resizing,
so one process keeps both network and cores busy. Two cases: the world's images as they are (CPU-bound on
decode and resize), and the same with 100 ms of server latency per request (wait-bound, like the internet).

    python benchmarks/bench_download_concurrency.py --rows 600
"""

from __future__ import annotations

import argparse
import time

import pyarrow as pa

from curate.core.registry import register
from curate.demo.server import WorldServer
from curate.demo.world import build_world
from curate.stages.download import Download, DownloadConfig


def table(urls: list[str]) -> pa.Table:
    n = len(urls)
    return pa.table(
        {
            "url": urls,
            "status": ["ok"] * n,
            "error": pa.nulls(n, pa.string()),
            "drop_reason": pa.nulls(n, pa.string()),
        }
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--threads", default="1,4,16,64")
    args = ap.parse_args()
    register(Download)  # and so its columns (mime, phash, ...), which it sets
    world = build_world(args.rows, seed=0, photos=False)
    with WorldServer() as server:
        world.serve(server)
        images = [server.url + r["path"] for r in world.rows if r["path"] in world.files]
        waiting = [server.url + "/slow/0.1"] * min(len(images), 300)
        print(
            f"{len(images)} images of the sample world, resized to 256 center-crop; 100 ms latency case: {len(waiting)} URLs"
        )
        print(f"{'threads':>8}{'images/s':>12}{'latency-bound/s':>18}")
        for n in (int(x) for x in args.threads.split(",")):
            stage = Download(
                DownloadConfig(
                    concurrency=n,
                    allow_private=[server.host_port],
                    resize_mode="center_crop",
                    robots_txt=False,
                )
            )
            stage.ensure_setup()
            rates = []
            for urls in (images, waiting):
                start = time.perf_counter()
                out = stage(table(urls))
                rates.append(out["status"].to_pylist().count("ok") / (time.perf_counter() - start))
            print(f"{n:>8}{rates[0]:>12,.0f}{rates[1]:>18,.0f}")


if __name__ == "__main__":
    main()

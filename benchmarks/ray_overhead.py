"""The Ray executor's overhead against the local executor: the same CPU-only pipeline on the same generated
input, both executors in the same run (goal: ray/local wall time at most 1.10). The measuring lives in
``bench_executors.py`` (``make bench``); this is the name the cluster issue gives it.

    python benchmarks/ray_overhead.py --rows 40000 --shard-size 2000 --repeats 3
"""

from bench_executors import main

if __name__ == "__main__":
    main()

"""Shared fixtures: generated inputs, a pipeline-YAML writer, a CLI caller, and one local Ray cluster."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# tests/support (test stages, generated data, the hostile server) is not installed: Ray workers and `curate`
# subprocesses import it by this path, as pytest does for the tests.
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])
)

import pytest
import yaml
from support.stages import register_test_stages

from curate.cli import main

register_test_stages()


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the marks to group by
def pytest_collection_modifyitems(config, items):
    """For ``pytest -n 2 --dist loadgroup`` (make test): every module runs whole in one worker, so its
    module-scoped fixtures are built once; the modules on the session's Ray cluster all share one worker, so
    only one such cluster starts. The longest groups go first (the Ray group, then the modules marked slow),
    so that the workers end on short ones rather than one waiting for the other."""
    on_ray = {item.module.__name__ for item in items if "ray_cluster" in getattr(item, "fixturenames", ())}
    for item in items:
        module = item.module.__name__
        item.add_marker(pytest.mark.xdist_group("ray" if module in on_ray else module))
    slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(
        key=lambda item: 0 if item.module.__name__ in on_ray else 1 if item.module.__name__ in slow else 2
    )


def pytest_collection_finish(session):
    """Fail loudly where ``--dist loadgroup`` does not group: xdist sends a group whole to one worker by a
    suffix it adds to the node ids, which some pytest releases silently ignore (9.2: pytest-dev/pytest-xdist
    #1386); every test would then be scheduled alone, and each worker build every module's fixtures and its
    own Ray cluster, taking the suite far over its time."""
    grouping = getattr(session.config.option, "loadgroup", False)
    if grouping and session.items and not any("@" in item.nodeid for item in session.items):
        raise pytest.UsageError(
            "pytest-xdist's --dist loadgroup is not grouping the tests with this pytest "
            f"({pytest.__version__}): use the locked versions (uv sync --locked --extra dev)"
        )


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (2 CPUs, a small object store)."""
    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=256 << 20,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    yield ray
    ray.shutdown()


def write_pipeline(path: Path, input_path, output_path, stages, **top) -> Path:
    doc = {
        "name": top.pop("name", "test"),
        "input": {"path": str(input_path), "url_col": "URL", "caption_col": "TEXT", **top.pop("input", {})},
        # The end-of-run report costs ~0.3 s a run; tests of the report turn it back on.
        "output": {"path": str(output_path), "report": False, **top.pop("output", {})},
        "shard_size": top.pop("shard_size", 100),
        "stages": stages,
        **top,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out[-2000:]!r}, err={self.err[-2000:]!r})"


@pytest.fixture
def cli(capsys, monkeypatch):
    """Call ``curate ARGS`` in this process; returns the exit code and what it printed."""

    def call(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["curate", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main()
        captured = capsys.readouterr()
        return CliResult(exc.value.code, captured.out, captured.err)

    return call


def score_shard(images: list, status=None, drop=None, **extra):
    """A shard as a scoring stage sees it: uid, caption, status, drop_reason and image bytes per row."""
    import pyarrow as pa

    n = len(images)
    return pa.table(
        {
            "uid": [f"u{i}" for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
            "status": status or ["ok"] * n,
            "drop_reason": drop or [None] * n,
            "image": pa.array(images, pa.binary()),
            **extra,
        }
    )


def sidecars(output: Path):
    """All sidecar parquets of an output, concatenated in shard order, as curate's tools read them (``status``
    is curate's code whatever ``output.naming`` wrote)."""
    import pyarrow as pa

    from curate.core.output import read_sidecar

    files = sorted((output / "shards").glob("*.parquet"))
    return pa.concat_tables([read_sidecar(f) for f in files], promote_options="permissive")


def shard_files(output: Path) -> dict[str, bytes]:
    """Every tar and parquet of an output, by name: what must be byte-identical between runs."""
    return {
        p.name: p.read_bytes()
        for p in sorted((output / "shards").iterdir())
        if p.suffix in (".tar", ".parquet")
    }


@pytest.fixture(scope="session")
def world_server():
    """A small sample world (200 rows, with its ground truth), served on 127.0.0.1 for the session."""
    from curate.demo.server import WorldServer
    from curate.demo.world import build_world

    world = build_world(200, seed=3)
    with WorldServer() as server:
        world.serve(server)
        yield world, server


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): with
    the other core busy (Ray, the HTTP server), torch's default two threads make small models ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

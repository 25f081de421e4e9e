"""Weights resolution (explicit path, model directory, download, clear error) and ``curate models``."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
from conftest import write_pipeline

from curate.base import ModelNotFound
from curate.models.weights import WeightsSpec, fetch, local_path, resolve


@pytest.fixture
def model_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "models"
    monkeypatch.setenv("CURATE_MODEL_DIR", str(d))
    monkeypatch.delenv("CURATE_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return d


@pytest.fixture
def file_server(tmp_path):
    """A static HTTP server on 127.0.0.1 serving tmp_path/www; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(www), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_explicit_path_wins_and_must_exist(model_dir, tmp_path):
    spec = WeightsSpec("head", "laion/head.pth", url="http://127.0.0.1:9/head.pth")
    given = tmp_path / "mine.pth"
    given.write_bytes(b"x")
    local_path(spec).parent.mkdir(parents=True)
    local_path(spec).write_bytes(b"y")
    assert resolve(spec, given) == given
    with pytest.raises(ModelNotFound, match="does not exist"):
        resolve(spec, tmp_path / "nope.pth")


def test_model_directory_then_offline_error(model_dir, monkeypatch):
    spec = WeightsSpec("LAION head", "laion/head.pth", url="http://127.0.0.1:9/head.pth")
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    with pytest.raises(ModelNotFound) as e:
        resolve(spec)
    msg = str(e.value)
    assert "curate models fetch" in msg and str(local_path(spec)) in msg and "offline" in msg
    local_path(spec).parent.mkdir(parents=True)
    local_path(spec).write_bytes(b"weights")
    assert resolve(spec) == model_dir / "laion" / "head.pth"


def test_download_over_http_checks_sha256_and_leaves_nothing_half_written(model_dir, file_server):
    www, base = file_server
    body = b"\x00weights\x01" * 1000
    (www / "head.pth").write_bytes(body)
    good = WeightsSpec(
        "head", "laion/head.pth", url=f"{base}/head.pth", sha256=hashlib.sha256(body).hexdigest()
    )
    assert resolve(good).read_bytes() == body
    bad = WeightsSpec("head2", "laion/head2.pth", url=f"{base}/head.pth", sha256="0" * 64)
    with pytest.raises(ModelNotFound, match="sha256"):
        fetch(bad)
    assert sorted(p.name for p in (model_dir / "laion").iterdir()) == ["head.pth"]


def test_unreachable_host_fails_fast_with_advice(model_dir):
    spec = WeightsSpec("head", "laion/head.pth", url="http://127.0.0.1:9/head.pth")  # nothing listens on 9
    with pytest.raises(ModelNotFound) as e:
        resolve(spec)
    assert "unreachable" in str(e.value) and "curate models fetch" in str(e.value)


def _clip_pipeline(tmp_path: Path) -> Path:
    from support.data import make_input

    inp = make_input(tmp_path / "in.parquet", 20)
    stages = [
        {"stage": "synthetic_image"},
        {"stage": "clip_score", "model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
    ]
    return write_pipeline(tmp_path / "p.yaml", inp, tmp_path / "out", stages)


def test_models_fetch_offline_lists_what_is_missing_and_where(cli, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    pipeline = _clip_pipeline(tmp_path)
    r = cli("models", "fetch", pipeline)
    assert r.code == 2, r
    where = model_dir / "open_clip" / "ViT-B-32" / "laion2b_s34b_b79k" / "open_clip_model.safetensors"
    assert str(where) in r.out.replace("\n", "")
    assert "hf://laion/CLIP-ViT-B-32-laion2B-s34B-b79K/open_clip_model.safetensors" in r.out
    r = cli("models", "list", pipeline)
    assert r.code == 0 and "clip_score" in r.out and "no" in r.out


def test_run_with_a_missing_model_stops_before_any_work(cli, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    r = cli("run", _clip_pipeline(tmp_path), "-q")
    assert r.code == 2, r
    assert "curate models fetch" in r.err
    assert not (tmp_path / "out" / "shards").exists()


def test_models_fetch_with_weights_present(cli, model_dir, tmp_path):
    where = model_dir / "open_clip" / "ViT-B-32" / "laion2b_s34b_b79k" / "open_clip_model.safetensors"
    where.parent.mkdir(parents=True)
    where.write_bytes(b"stand-in: fetch only checks presence")
    r = cli("models", "fetch", _clip_pipeline(tmp_path))
    assert r.code == 0, r
    assert "all 1 model file(s)" in r.out


def test_validate_checks_models_without_downloading(cli, model_dir, tmp_path, monkeypatch):
    pipeline = _clip_pipeline(tmp_path)
    monkeypatch.setenv("CURATE_OFFLINE", "1")
    r = cli("validate", pipeline)
    assert r.code == 2 and "curate models fetch" in r.err, r
    where = model_dir / "open_clip" / "ViT-B-32" / "laion2b_s34b_b79k" / "open_clip_model.safetensors"
    where.parent.mkdir(parents=True)
    where.write_bytes(b"stand-in: validate only checks presence")
    r = cli("validate", pipeline)
    assert r.code == 0 and "1 model(s) (1 here)" in r.out, r
    assert sorted(p.name for p in where.parent.iterdir()) == [where.name]  # nothing was downloaded

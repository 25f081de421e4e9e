"""The one-command GPU benchmark (benchmarks/gpu_suite.py), in its smoke form on the CPU: every part runs and
writes positive figures, the dedup part finds the pairs it planted, a part whose package is missing is
skipped with the reason, the wheels it tells a bare GPU machine to carry are the locked versions, and it
finds the trainer in a source tree that is not installed, as on that machine."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def _suite() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_runs_every_part_and_writes_every_figure(tmp_path, capsys):
    for package in ("torch", "open_clip", "transformers", "diffusers"):
        pytest.importorskip(package)
    suite = _suite()
    out = tmp_path / "smoke.json"
    assert suite.main(["--smoke", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["smoke"] is True and r["device"].startswith("cpu") and r["torch"]
    parts = r["parts"]
    assert set(parts) == {"clip", "vlm", "dedup", "unet"}
    assert all(
        p["status"] == "ok" and p["seconds"] > 0 and "peak_gpu_memory_gib" in p for p in parts.values()
    )

    clip = parts["clip"][suite.TINY_CLIP]
    assert clip["images_per_s"] > 0 and clip["model_images_per_s"] > 0 and clip["params_m"] > 0

    vlm = parts["vlm"]
    assert vlm["images_per_s"] > 0 and vlm["new_tokens"] == 4 and vlm["prompt_tokens"] > 4
    assert vlm["tokens_per_s"] == pytest.approx(vlm["images_per_s"] * 4, rel=0.02)

    dedup = parts["dedup"]
    assert dedup["backend"] == "torch-cpu" and dedup["planted_pairs"] == 400  # 2% of 20,000 rows
    assert dedup["planted_found"] == dedup["planted_above_threshold"] == 400
    assert dedup["planted_recall"] == 1.0 and dedup["pairs_found"] >= 400 and dedup["dedup_seconds"] > 0

    unet = parts["unet"]
    assert unet["preset"] == "tiny" and unet["steps_per_s"] > 0 and unet["timed_steps"] == 2
    assert unet["images_per_s"] == pytest.approx(unet["steps_per_s"] * unet["batch"], rel=0.02)

    printed = capsys.readouterr().out
    assert "SMOKE" in printed and "dedup  planted_recall" in printed


def test_a_part_whose_package_is_missing_is_skipped_with_the_reason(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now fails
    suite = _suite()
    out = tmp_path / "r.json"
    assert suite.main(["--smoke", "--parts", "unet", "--out", str(out)]) == 0
    unet = json.loads(out.read_text())["parts"]["unet"]
    assert unet["status"] == "skipped" and "diffusers" in unet["reason"]


def test_the_wheels_are_the_locked_versions_and_the_docstring_has_the_device_command():
    suite = _suite()
    locked = {p["name"]: p["version"] for p in tomllib.loads((ROOT / "uv.lock").read_text())["package"]}
    commands = suite.wheel_commands()
    for name in suite.WHEELS:
        assert f" {name}=={locked[name]}" in commands
    assert suite.DEVICE_COMMAND in commands and suite.DEVICE_COMMAND in suite.__doc__
    assert "--python-version 3.12" in commands and "--no-deps" in commands


def test_the_trainer_is_found_in_a_source_tree_that_is_not_installed():
    """As on a bare GPU machine with PYTHONPATH=.: no installed curate, so no curate.train mapping."""
    code = f"""
import importlib.util, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, {str(ROOT)!r})
spec = importlib.util.spec_from_file_location("gpu_suite", {str(SUITE)!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
print(suite.trainer_module("config").__file__)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == ROOT / "train" / "config.py"

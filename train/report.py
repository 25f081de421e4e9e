"""``<output>/report.html``: one self-contained page per training run, rewritten after every validation.

The loss and learning-rate curves (from ``train.json``'s history), the validation metrics over the steps
(``validation.jsonl``), and the latest sample grid, embedded as PNGs."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

__all__ = ["write_train_report"]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _curves(history: list[dict[str, Any]], validations: list[dict[str, Any]]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return None
    metrics = sorted(
        {
            k
            for v in validations
            for k, x in v.get("metrics", {}).items()
            if isinstance(x, float) and k != "seconds"
        }
    )
    fig, axes = plt.subplots(1, 2 + bool(metrics), figsize=(5 * (2 + bool(metrics)), 3.2))
    steps = [h["step"] for h in history]
    axes[0].plot(steps, [h["loss"] for h in history])
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    axes[1].plot(steps, [h["lr"] for h in history])
    axes[1].set(title="learning rate", xlabel="step")
    if metrics:
        for key in metrics:
            pts = [(v["step"], v["metrics"][key]) for v in validations if key in v.get("metrics", {})]
            axes[2].plot(*zip(*pts, strict=True), marker="o", label=key)
        axes[2].set(title="validation", xlabel="step")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


def write_train_report(output: str | Path, history: list[dict[str, Any]] | None = None) -> Path:
    out = Path(output)
    if history is None:
        summary = out / "train.json"
        history = json.loads(summary.read_text())["history"] if summary.exists() else []
    path = out / "validation.jsonl"
    validations = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    parts = [f"<h1>training run {html.escape(out.name)}</h1>"]
    curves = _curves(history, validations)
    if curves:
        parts.append(f'<img src="data:image/png;base64,{curves}" alt="curves">')
    if validations:
        keys = sorted({k for v in validations for k in v.get("metrics", {})})
        head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
        rows = []
        for v in validations:
            cells = "".join(
                f"<td>{v['metrics'][k]:.4g}</td>"
                if isinstance(v["metrics"].get(k), float)
                else f"<td>{html.escape(str(v['metrics'].get(k, '')))}</td>"
                for k in keys
            )
            rows.append(f"<tr><td>{v['step']}</td>{cells}</tr>")
        parts.append(f"<h2>validation</h2><table><tr><th>step</th>{head}</tr>{''.join(rows)}</table>")
        grid = validations[-1].get("grid_path")
        if grid and Path(grid).exists():
            data = base64.b64encode(Path(grid).read_bytes()).decode()
            parts.append(
                f"<h2>samples at step {validations[-1]['step']}</h2>"
                f'<img src="data:image/png;base64,{data}" alt="samples">'
            )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}"
    )
    page = f"<!DOCTYPE html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    target = out / "report.html"
    tmp = target.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(target)
    return target

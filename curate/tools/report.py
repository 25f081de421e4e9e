"""The run report: ``<output>/report/report.html``, one self-contained page, and ``report.json``, its numbers.

Written at the end of every run (``output.report``) and again by ``curate report OUTPUT``, from the files a run
leaves (``run.json``, the shards' stats, parquet sidecars and tars, the ``dropped/`` audit tars); nothing is
recomputed. Sections, each kept with a note saying why when the run has nothing for it (a download-only run
has no scores, no dedup, no captions):

- the funnel (input -> downloaded -> kept, and the rows left after every stage), counts per status and per
  drop reason (``duplicate:<kind>:<uid>`` counted as ``duplicate:<kind>``);
- failed downloads by domain (link rot);
- time and samples per second per stage;
- a histogram of every score column, kept and dropped rows stacked, with the run's filter thresholds drawn;
- faces (the ``faces`` stage): images with faces, faces found, faces per image, images blurred;
- image grids: kept samples, dropped samples per reason, duplicate pairs (the dropped copy next to the
  original it duplicates), and captions side by side (alt-text, VLM, fused).

The page is drawn with :mod:`curate.tools.html_page`, as the preview's is: plots are inline SVG and thumbnails
inline ``data:`` URIs, so the page opens anywhere without a server.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.base import ConfigError
from curate.core.output import OutputFolder, collect_output, read_sidecar
from curate.core.schema import reason_bucket
from curate.core.storage import write_atomic
from curate.kit.rules import Rule
from curate.tools.html_page import (
    KEPT_COLOUR,
    bar_chart,
    card,
    card_images,
    escape,
    histogram,
    image,
    page,
    table,
)
from curate.tools.preview import FilterStep, run_filters

__all__ = ["SECTIONS", "RunReport", "build_report", "write_report"]

# (id, heading): every page has every section, in this order.
SECTIONS = (
    ("funnel", "Funnel"),
    ("counts", "Status and drop reasons"),
    ("domains", "Failures by domain"),
    ("stages", "Time per stage"),
    ("scores", "Score histograms"),
    ("faces", "Faces"),
    ("kept", "Kept samples"),
    ("dropped", "Dropped samples by reason"),
    ("duplicates", "Duplicate pairs"),
    ("captions", "Captions side by side"),
)
# Score columns in this order first, then any other float column (input scores such as LAION's similarity).
KNOWN_SCORES = (
    "clip_score",
    "aesthetic_score",
    "reward_score",
    "vqa_score",
    "nsfw_score",
    "watermark_score",
    "text_area",
    "ai_watermark",
)
NOT_SCORES = ("dup_similarity",)
CAPTION_COLUMNS = ("caption", "caption_vlm", "caption_fused")
CAPTION_MODELS = {"caption_vlm": "caption_vlm_model", "caption_fused": "caption_fused_model"}
FACE_COLUMNS = ("face_count", "face_error", "face_blurred")
BINS = 40


@dataclass
class RunReport:
    """What the page shows; ``to_dict()`` is report.json. Image bytes are not part of the JSON."""

    output: str
    data: dict[str, Any]
    images: dict[str, bytes] = field(default_factory=dict)  # uid -> thumbnail
    html_path: str | None = None
    json_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.data


def write_report(output: str, *, grid: int = 24, per_reason: int = 8, pairs: int = 12) -> RunReport:
    """Build the report of the run in ``output`` and write ``report/report.html`` and ``report/report.json``."""
    report = build_report(output, grid=grid, per_reason=per_reason, pairs=pairs)
    out = OutputFolder(output)
    out.fs.makedirs(out.report_dir, exist_ok=True)
    html = render_html(report)
    write_atomic(out.fs, out.report_json, json.dumps(report.data, indent=2).encode())
    write_atomic(out.fs, out.report_html, html.encode())
    report.html_path = out.as_given(out.report_html)
    report.json_path = out.as_given(out.report_json)
    return report


# --- the numbers -------------------------------------------------------------------------------------


def build_report(output: str, *, grid: int = 24, per_reason: int = 8, pairs: int = 12) -> RunReport:
    """Read a finished (or partial) run and gather every number and the sample uids the page shows."""
    out = OutputFolder(output)
    info = out.read_run()
    if info is None:
        raise ConfigError([("OUTPUT", f"{output} holds no run.json: not a curate output folder")])
    summary = collect_output(out)
    counts = summary.counts
    try:
        filters = run_filters(info)
    except ValueError:  # a run.json from another version with rules this one cannot parse: draw none
        filters = []
    shards = summary.shards_done

    scan = _scan(out, shards, filters, grid, per_reason, pairs)
    data: dict[str, Any] = {
        "output": output,
        "name": info.get("name"),
        "status": info.get("status"),
        "started": info.get("started"),
        "finished": info.get("finished"),
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "shards": {
            "total": summary.shards_total,
            "done": len(shards),
            "failed": sorted(summary.shards_failed),
        },
        "funnel": _funnel(counts, summary.stages),
        "status_counts": dict(counts["status"]),
        "drop_reasons": dict(sorted(Counter(_bucketed(counts["drop_reason"])).items())),
        "failures_by_domain": scan.pop("domains"),
        "stages": _stages(counts, summary.stages),
        "seconds": info.get("seconds"),
        "filters": [s.describe() for s in filters],
        "stand_ins": info.get("stand_ins") or [],
        **scan,
    }
    images = _thumbnails(out, data)
    return RunReport(output=output, data=data, images=images)


def _bucketed(reasons: dict[str, int]) -> Counter:
    c: Counter = Counter()
    for reason, n in reasons.items():
        c[reason_bucket(reason)] += n
    return c


def _funnel(counts: dict[str, Any], stages: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """input -> downloaded (ok after the download stage, when the run has one) -> kept."""
    steps = [{"step": "input", "rows": counts["rows"]}]
    if "download" in stages:
        steps.append({"step": "downloaded", "rows": int(stages["download"]["kept"])})
    steps.append({"step": "kept", "rows": counts["kept"]})
    return steps


def _stages(counts: dict[str, Any], stages: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Per stage, in run order: rows it got (left by the stage before), rows left after it, seconds summed
    over shards and samples per second (rows it got / seconds)."""
    rows_in = counts["rows"]
    out = []
    for name, s in stages.items():
        seconds = float(s["seconds"])
        kept = int(s["kept"])
        out.append(
            {
                "name": name,
                "rows_in": rows_in,
                "kept": kept,
                "dropped": rows_in - kept,
                "seconds": round(seconds, 6),
                "samples_per_s": round(rows_in / seconds, 1) if seconds > 0 else None,
            }
        )
        rows_in = kept
    return out


def _score_columns(schema: pa.Schema, filters: list[FilterStep]) -> list[str]:
    """Float columns (and any numeric column a filter rule reads), known scores first."""
    ruled = {r.column for s in filters for r in s.rules}
    found = []
    for f in schema:
        numeric = pa.types.is_floating(f.type) or pa.types.is_integer(f.type)
        if f.name in NOT_SCORES or not numeric:
            continue
        if pa.types.is_floating(f.type) or f.name in ruled:
            found.append(f.name)
    known = [c for c in KNOWN_SCORES if c in found]
    return known + sorted(c for c in found if c not in known)


def _scan(
    out: OutputFolder,
    shards: list[str],
    filters: list[FilterStep],
    grid: int,
    per_reason: int,
    pairs: int,
) -> dict[str, Any]:
    """One pass over the sidecars, reading only the columns the report needs."""
    result: dict[str, Any] = {
        "domains": [],
        "scores": {},
        "faces": None,
        "samples": {"kept": [], "dropped": {}, "duplicate_pairs": [], "captions": []},
        "columns": [],
    }
    if not shards:
        return result
    with out.fs.open(out.shard_parquet(shards[0]), "rb") as f:
        schema = pq.read_schema(f)
    names = set(schema.names)
    result["columns"] = [c for c in (*CAPTION_COLUMNS, "dup_of") if c in names]
    scores = _score_columns(schema, filters)
    wanted = ["uid", "url", "status", "drop_reason", "width", "dup_of", "dup_kind", "dup_similarity"]
    wanted += [*CAPTION_COLUMNS, *CAPTION_MODELS.values(), *scores, *FACE_COLUMNS]
    wanted = [c for c in dict.fromkeys(wanted) if c in names]

    failed: Counter = Counter()
    rows_by_domain: Counter = Counter()
    statuses: dict[str, Counter] = {}
    values: dict[str, list[np.ndarray]] = {c: [] for c in scores}
    kept_masks: dict[str, list[np.ndarray]] = {c: [] for c in scores}
    faces = _FaceCounts() if "face_count" in names else None
    samples = result["samples"]
    for shard in shards:
        with out.fs.open(out.shard_parquet(shard), "rb") as f:
            present = pq.read_schema(f).names
            t = read_sidecar(f, columns=[c for c in wanted if c in present])
        _count_domains(t, rows_by_domain, failed, statuses)
        ok = _np(pc.fill_null(pc.equal(t["status"], "ok"), False))
        kept = ok & _np(pc.is_null(t["drop_reason"]))
        for c in scores:
            v = t[c].to_numpy().astype(np.float64) if c in t.column_names else np.full(t.num_rows, np.nan)
            present = ok & ~np.isnan(v)
            values[c].append(v[present])
            kept_masks[c].append(kept[present])
        if faces is not None:
            faces.add(t, ok, kept)

        # The samples the grids show, found with vectorised masks: a run of millions of rows never loops
        # over them in Python. Dropped rows have thumbnails only when they had an image.
        def cell(column: str, i: int, t: pa.Table = t) -> Any:
            return t[column][int(i)].as_py() if column in t.column_names else None

        has_image = _np(pc.is_valid(t["width"])) if "width" in t.column_names else ok
        for i in np.flatnonzero(kept)[: grid - len(samples["kept"])]:
            sample = {"uid": cell("uid", i), "shard": shard, "caption": cell("caption", i)}
            if scores:
                sample[scores[0]] = _round(cell(scores[0], i))
            samples["kept"].append(sample)
        generated = [c for c in ("caption_vlm", "caption_fused") if c in t.column_names]
        if generated:
            with_caption = np.logical_or.reduce([_np(pc.is_valid(t[c])) for c in generated])
            for i in np.flatnonzero(kept & with_caption)[: grid // 2 - len(samples["captions"])]:
                row = {c: cell(c, i) for c in CAPTION_COLUMNS if c in t.column_names}
                row |= {m: cell(m, i) for c, m in CAPTION_MODELS.items() if m in t.column_names}
                samples["captions"].append({"uid": cell("uid", i), "shard": shard, **row})
        dropped = ok & ~kept & has_image
        if dropped.any():
            buckets = pc.replace_substring_regex(t["drop_reason"], _UID_SUFFIX, "")
            for bucket in pc.unique(pc.filter(buckets, pa.array(dropped))).to_pylist():
                got = samples["dropped"].setdefault(bucket, [])
                mask = dropped & _np(pc.fill_null(pc.equal(buckets, bucket), False))
                for i in np.flatnonzero(mask)[: per_reason - len(got)]:
                    reason = cell("drop_reason", i)
                    got.append(
                        {
                            "uid": cell("uid", i),
                            "shard": shard,
                            "reason": reason,
                            "caption": cell("caption", i),
                        }
                    )
        if "dup_of" in t.column_names:
            for i in np.flatnonzero(dropped & _np(pc.is_valid(t["dup_of"])))[
                : pairs - len(samples["duplicate_pairs"])
            ]:
                samples["duplicate_pairs"].append(
                    {
                        "uid": cell("uid", i),
                        "shard": shard,
                        "dup_of": cell("dup_of", i),
                        "dup_of_shard": None,
                        "kind": cell("dup_kind", i),
                        "similarity": _round(cell("dup_similarity", i)),
                    }
                )

    top = sorted(failed.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
    result["domains"] = [
        {
            "domain": d,
            "failed": n,
            "rows": rows_by_domain[d],
            "failure_rate": round(n / rows_by_domain[d], 4),
            "statuses": dict(statuses[d].most_common()),
        }
        for d, n in top
    ]
    thresholds = {}
    for step in filters:
        for r in step.rules:
            if r.kind == "number":
                thresholds.setdefault(r.column, []).append(r)
    for c in scores:
        v = np.concatenate(values[c]) if values[c] else np.zeros(0)
        k = np.concatenate(kept_masks[c]) if kept_masks[c] else np.zeros(0, dtype=bool)
        result["scores"][c] = _score_stats(v, k, thresholds.get(c, []))
    if faces is not None:
        result["faces"] = faces.to_dict()
    _locate_originals(out, shards, samples["duplicate_pairs"])
    return result


@dataclass
class _FaceCounts:
    """The faces stage's numbers over ok rows: rows with a face_count, images with faces, faces found (all and
    in kept rows), images per count, rows with a face_error, images blurred."""

    counted: int = 0
    with_faces: int = 0
    faces: int = 0
    kept_with_faces: int = 0
    kept_faces: int = 0
    unknown: int = 0
    blurred: int = 0
    blur: bool = False
    per_image: Counter = field(default_factory=Counter)

    def add(self, t: pa.Table, ok: np.ndarray, kept: np.ndarray) -> None:
        if "face_count" not in t.column_names:
            return
        count = t["face_count"].to_numpy(zero_copy_only=False)
        known = ok & _np(pc.is_valid(t["face_count"]))
        n = np.where(known, np.nan_to_num(count.astype(np.float64)), 0).astype(np.int64)
        self.counted += int(known.sum())
        self.with_faces += int((n > 0).sum())
        self.faces += int(n.sum())
        self.kept_with_faces += int(((n > 0) & kept).sum())
        self.kept_faces += int(n[kept].sum())
        self.per_image.update(min(int(x), 5) for x in n[known])
        if "face_error" in t.column_names:
            self.unknown += int((ok & _np(pc.is_valid(t["face_error"]))).sum())
        if "face_blurred" in t.column_names:
            self.blur = True
            self.blurred += int((ok & _np(pc.fill_null(t["face_blurred"], False))).sum())

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.counted,
            "with_faces": self.with_faces,
            "faces": self.faces,
            "kept_with_faces": self.kept_with_faces,
            "kept_faces": self.kept_faces,
            "unknown": self.unknown,
            "blur": self.blur,
            "blurred": self.blurred,
            # Images by number of faces; "5" counts five or more.
            "per_image": {str(k): self.per_image[k] for k in sorted(self.per_image)},
        }


def _round(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) and np.isfinite(v) else (None if isinstance(v, float) else v)


# The host of a URL, as urlsplit().hostname reads it (lower-cased), for a whole column at once.
_HOST = r"^\s*[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?(?P<host>\[[^\]]*\]|[^:/?#\s]*)"
_UID_SUFFIX = r":[0-9a-f]{32}$"  # as curate.core.schema.reason_bucket strips it


def _np(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


def _count_domains(t: pa.Table, rows: Counter, failed: Counter, statuses: dict[str, Counter]) -> None:
    """Rows per domain, and the failed ones (status not ok) per domain and status."""
    if "url" in t.column_names:
        host = pc.struct_field(pc.extract_regex(t["url"], _HOST), [0])
        host = pc.utf8_lower(pc.if_else(pc.equal(host, ""), pa.scalar(None, pa.string()), host))
        host = pc.fill_null(host, "(no host)")
    else:
        host = pa.chunked_array([pa.array(["(no url)"] * t.num_rows, pa.string())])
    counted = pc.value_counts(host)
    rows.update(
        dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True))
    )
    bad = pc.fill_null(pc.not_equal(t["status"], "ok"), True)
    for h, status in zip(
        pc.filter(host, bad).to_pylist(), pc.filter(t["status"], bad).to_pylist(), strict=True
    ):
        failed[h] += 1
        statuses.setdefault(h, Counter())[str(status)] += 1


def _score_stats(v: np.ndarray, kept: np.ndarray, rules: list[Rule]) -> dict[str, Any]:
    """Counts, quantiles and a histogram (kept and dropped rows per bin) of one score over ok rows."""
    d: dict[str, Any] = {
        "rows": int(v.size),
        "kept": int(kept.sum()),
        "dropped": int(v.size - kept.sum()),
        "thresholds": [{"rule": r.text, "value": float(r.value)} for r in rules],
    }
    if not v.size:
        return d
    lo, hi = float(v.min()), float(v.max())
    for r in rules:
        lo, hi = min(lo, float(r.value)), max(hi, float(r.value))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    if np.all(v == np.round(v)) and hi - lo <= 2 * BINS:  # whole numbers (width, height): a bin each
        edges = np.arange(np.floor(lo), np.ceil(hi) + 2, dtype=np.float64)
    else:
        edges = np.linspace(lo, hi, BINS + 1)
    d.update(
        min=round(float(v.min()), 6),
        max=round(float(v.max()), 6),
        mean=round(float(v.mean()), 6),
        quantiles={f"p{q}": round(float(np.quantile(v, q / 100)), 6) for q in (5, 25, 50, 75, 95)},
        histogram={
            "edges": [round(float(e), 6) for e in edges],
            "kept": np.histogram(v[kept], edges)[0].tolist(),
            "dropped": np.histogram(v[~kept], edges)[0].tolist(),
        },
    )
    return d


def _locate_originals(out: OutputFolder, shards: list[str], found: list[dict]) -> None:
    """Fill in the shard of each pair's original (it may sit in another shard than its copy)."""
    wanted = {p["dup_of"] for p in found}
    if not wanted:
        return
    where: dict[str, str] = {}
    for shard in shards:
        with out.fs.open(out.shard_parquet(shard), "rb") as f:
            uids = pq.read_table(f, columns=["uid"])["uid"].to_pylist()
        where.update({u: shard for u in uids if u in wanted})
        if len(where) == len(wanted):
            break
    for p in found:
        p["dup_of_shard"] = where.get(p["dup_of"])


def _thumbnails(out: OutputFolder, data: dict[str, Any]) -> dict[str, bytes]:
    """The images the grids show: kept rows' from the shard tars, dropped rows' from dropped/."""
    samples = data["samples"]
    rows: list[tuple[str, str, str | None]] = []  # uid, shard, drop_reason (None: kept, in the shard tar)
    rows += [(s["uid"], s["shard"], None) for s in samples["kept"] + samples["captions"]]
    rows += [(s["uid"], s["shard"], s["reason"]) for got in samples["dropped"].values() for s in got]
    for p in samples["duplicate_pairs"]:
        rows.append((p["uid"], p["shard"], "duplicate"))
        if p["dup_of_shard"] is not None:
            rows.append((p["dup_of"], p["dup_of_shard"], None))
    rows = list(dict.fromkeys(rows))
    found = card_images(out, [(uid, shard, reason is None) for uid, shard, reason in rows])
    return {rows[i][0]: data for i, data in found.items()}


# --- the page ----------------------------------------------------------------------------------------


def render_html(report: RunReport) -> str:
    d = report.data
    body = {
        "funnel": _funnel_html(d),
        "counts": _counts_html(d),
        "domains": _domains_html(d),
        "stages": _stages_html(d),
        "scores": _scores_html(d),
        "faces": _faces_html(d),
        "kept": _kept_html(d, report.images),
        "dropped": _dropped_html(d, report.images),
        "duplicates": _pairs_html(d, report.images),
        "captions": _captions_html(d, report.images),
    }
    shards = d["shards"]
    e = escape
    parts = [
        *_stand_in_banner(d),
        f"<p>{e(d['output'])}: {e(d['status'])}, {shards['done']}/{shards['total']} shard(s) done"
        + (f", {len(shards['failed'])} failed ({e(', '.join(shards['failed']))})" if shards["failed"] else "")
        + (f", {d['seconds']:.1f} s" if isinstance(d.get("seconds"), (int, float)) else "")
        + f"; started {e(d['started'])}, finished {e(d['finished'])}. "
        "The numbers are in report.json next to this page.</p>",
    ]
    for sid, heading in SECTIONS:
        parts.append(f"<section id='{sid}'><h2>{heading}</h2>{body[sid]}</section>")
    return page(f"curate run report: {d['name']}", parts)


def _stand_in_banner(d: dict[str, Any]) -> list[str]:
    """The warning at the top of the page of a run that used stand-in models (random weights)."""
    used = d.get("stand_ins") or []
    if not used:
        return []
    names = "".join(f"<li>{escape(s.get('stage'))}: {escape(s.get('model'))}</li>" for s in used)
    return [
        "<div class='stand-in' role='alert' style='border:3px solid #c00;background:#fee;padding:0.6em 1em;"
        "margin:0 0 1em'><strong>This run used stand-in models (random weights): its scores, filters and "
        "captions mean nothing.</strong> Its times and memory are what the real models take. Stand-ins:"
        f"<ul>{names}</ul>Replace them with <code>curate models fetch</code> and run again.</div>"
    ]


def _absent(text: str) -> str:
    return f"<p class='absent'>{escape(text)}</p>"


def _funnel_html(d: dict[str, Any]) -> str:
    f = d["funnel"]
    first = f[0]["rows"] or 1
    rows = [[s["step"], s["rows"], f"{100 * s['rows'] / first:.1f}%"] for s in f]
    left = table(["step", "rows", "of input"], rows, {1, 2})
    if "downloaded" not in [s["step"] for s in f]:
        left += _absent("this run has no download stage: no 'downloaded' step")
    right = ""
    if d["stages"]:
        labels = [s["name"] for s in d["stages"]]
        kept = [s["kept"] for s in d["stages"]]
        right = "<h3>rows left after each stage</h3>" + bar_chart(
            labels, kept, KEPT_COLOUR, [f"{k:,} ({100 * k / first:.1f}%)" for k in kept]
        )
    return f"<div class='row'><div>{left}</div><div>{right}</div></div>"


def _counts_html(d: dict[str, Any]) -> str:
    parts = []
    for title, counts in (("status", d["status_counts"]), ("drop reason", d["drop_reasons"])):
        if not counts:
            parts.append(f"<div><h3>{title}</h3>{_absent(f'no row has a {title}')}</div>")
            continue
        items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        total = sum(counts.values()) or 1
        rows = [[k, v, f"{100 * v / total:.1f}%"] for k, v in items]
        parts.append(f"<div><h3>{title}</h3>{table([title, 'rows', 'share'], rows, {1, 2})}</div>")
    return "<div class='row'>" + "".join(parts) + "</div>"


def _domains_html(d: dict[str, Any]) -> str:
    doms = d["failures_by_domain"]
    if not doms:
        return _absent("every row has status ok: nothing failed")
    rows = [
        [x["domain"], x["failed"], x["rows"], f"{100 * x['failure_rate']:.1f}%", _statuses(x["statuses"])]
        for x in doms
    ]
    numbers = table(["domain", "failed", "rows", "failure rate", "statuses"], rows, {1, 2, 3}) + (
        "<p>rows whose status is not ok (failed downloads: link rot; invalid URLs, repeated rows), by URL host; "
        "the 20 hosts with the most</p>"
    )
    if len(doms) == 1:  # one bar says nothing the table does not
        return f"<div class='row'><div>{numbers}</div></div>"
    plot = bar_chart([x["domain"] for x in doms], [x["failed"] for x in doms], "#c84")
    return f"<div class='row'><div>{numbers}</div><div>{plot}</div></div>"


def _statuses(s: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in s.items())


def _stages_html(d: dict[str, Any]) -> str:
    st = d["stages"]
    if not st:
        return _absent("no finished shard: no stage timings yet")
    rows = [[s["name"], s["rows_in"], s["kept"], s["seconds"], s["samples_per_s"]] for s in st]
    numbers = table(["stage", "rows in", "rows left", "seconds", "samples/s"], rows, {1, 2, 3, 4})
    notes = [
        f"{s['seconds']:.3g} s" + (f", {s['samples_per_s']:,.0f}/s" if s["samples_per_s"] else "") for s in st
    ]
    plot = bar_chart([s["name"] for s in st], [s["seconds"] for s in st], "#96c", notes)
    return (
        f"<div class='row'><div>{numbers}<p>seconds are summed over shards (worker time, not wall time); "
        f"samples/s = rows in / seconds</p></div><div>{plot}</div></div>"
    )


def _scores_html(d: dict[str, Any]) -> str:
    scores = d["scores"]
    if not scores:
        return _absent("this run has no score columns")
    parts = []
    for column, s in scores.items():
        if "histogram" not in s:
            parts.append(f"<div><h3>{escape(column)}</h3>{_absent('no values')}</div>")
            continue
        h = s["histogram"]
        thresholds = [(t["value"], t["rule"]) for t in s["thresholds"]]
        plot = histogram(h["edges"], h["kept"], h["dropped"], column, thresholds, width=460, height=200)
        q = s["quantiles"]
        rules = ", ".join(t["rule"] for t in s["thresholds"]) or "no filter rule"
        parts.append(
            f"<div><h3>{escape(column)}</h3>{plot}<p style='font-size:12px'>min {s['min']:.4g}, "
            f"p5 {q['p5']:.4g}, median {q['p50']:.4g}, p95 {q['p95']:.4g}, max {s['max']:.4g}; "
            f"{escape(rules)}</p></div>"
        )
    return "<div class='row'>" + "".join(parts) + "</div>"


def _faces_html(d: dict[str, Any]) -> str:
    f = d.get("faces")
    if not f:
        return _absent("this run has no faces stage")
    rows = f["rows"] or 1
    numbers = [
        ["images looked at", f["rows"], ""],
        ["images with faces", f["with_faces"], f"{100 * f['with_faces'] / rows:.1f}%"],
        ["faces found", f["faces"], ""],
        ["kept images with faces", f["kept_with_faces"], ""],
        ["faces in kept images", f["kept_faces"], ""],
        ["images blurred", f["blurred"] if f["blur"] else "blur off", ""],
        ["no boxes (face_error)", f["unknown"], ""],
    ]
    left = table(["", "rows", "share"], numbers, {1, 2})
    labels = [f"{k}{'+' if k == '5' else ''} face(s)" for k in f["per_image"]]
    plot = bar_chart(labels, list(f["per_image"].values()), KEPT_COLOUR) if labels else ""
    return (
        f"<div class='row'><div>{left}<p>ok rows; images with a face_error (too small, bad boxes) have no "
        f"count</p></div><div>{plot}</div></div>"
    )


def _card(images: dict[str, bytes], uid: str, lines: list[tuple[str, str]]) -> str:
    return card(images.get(uid), lines, title=uid)


def _kept_html(d: dict[str, Any], images: dict[str, bytes]) -> str:
    kept = d["samples"]["kept"]
    if not kept:
        return _absent("no kept samples")
    cards = []
    for s in kept:
        lines = [("cap", s.get("caption") or "")]
        score = next(((k, v) for k, v in s.items() if k in d["scores"]), None)
        if score and score[1] is not None:
            lines.insert(0, ("score", f"{score[0]} {score[1]:.3g}"))
        cards.append(_card(images, s["uid"], lines))
    return f"<p>the first {len(kept)} kept samples</p><div class='grid'>{''.join(cards)}</div>"


def _dropped_html(d: dict[str, Any], images: dict[str, bytes]) -> str:
    dropped = d["samples"]["dropped"]
    if not dropped:
        return _absent("no dropped sample with an image (thumbnails are in dropped/<shard>.tar)")
    parts = []
    for bucket in sorted(dropped, key=lambda b: -d["drop_reasons"].get(b, 0)):
        got = dropped[bucket]
        total = d["drop_reasons"].get(bucket, len(got))
        cards = "".join(_card(images, s["uid"], [("cap", s.get("caption") or "")]) for s in got)
        parts.append(f"<h3>{escape(bucket)}: {len(got)} of {total:,}</h3><div class='grid'>{cards}</div>")
    return "".join(parts)


def _pairs_html(d: dict[str, Any], images: dict[str, bytes]) -> str:
    found = d["samples"]["duplicate_pairs"]
    if not found:
        why = "no duplicates were dropped" if "dup_of" in d["columns"] else "this run has no dedup stage"
        return _absent(why)
    pairs = []
    for p in found:
        sim = f", similarity {p['similarity']:.3g}" if isinstance(p["similarity"], float) else ""
        pairs.append(
            "<div class='pair'>"
            + _card(images, p["uid"], [("score", f"dropped ({p['kind']}{sim})")])
            + _card(images, p["dup_of"], [("score", "kept original")])
            + "</div>"
        )
    return f"<div class='grid'>{''.join(pairs)}</div>"


def _model(row: dict[str, Any], column: str) -> str:
    model = row.get(CAPTION_MODELS.get(column, ""))
    return f"<div class='model'>{escape(model)}</div>" if model else ""


def _captions_html(d: dict[str, Any], images: dict[str, bytes]) -> str:
    rows = d["samples"]["captions"]
    if not rows:
        has = [c for c in ("caption_vlm", "caption_fused") if c in d["columns"]]
        return _absent(
            "no kept sample has a VLM or fused caption"
            if has
            else "this run has no recaption or caption fusion stage"
        )
    present = [c for c in CAPTION_COLUMNS if c in rows[0]]
    labels = {"caption": "alt-text", "caption_vlm": "VLM", "caption_fused": "fused"}
    head = "<tr><th></th>" + "".join(f"<th>{labels[c]}</th>" for c in present) + "</tr>"
    body = "".join(
        f"<tr><td>{image(images.get(r['uid']))}</td>"
        + "".join(f"<td>{escape(r.get(c) or '-')}{_model(r, c)}</td>" for c in present)
        + "</tr>"
        for r in rows
    )
    return f"<table class='n caps'>{head}{body}</table>"

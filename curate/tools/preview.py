"""What a new threshold would do to a finished run, from its sidecars alone: no recompute, no model.

``curate preview OUTPUT --rule "clip_score >= 0.3"`` takes the run's ``filter`` stages from ``run.json``,
replaces their rules on the named column by the given rule(s) (rules on other columns stay), and evaluates
the new rules on the rows those stages decided: rows that are ok and either kept or dropped by a filter rule.
The rules go through :func:`curate.kit.rules.first_failure`, as the stage does, so the counts are what a rerun
with the new rules writes. An HTML page (drawn with :mod:`curate.tools.html_page`, as the run report is)
shows, per given rule, the column's histogram with the threshold and the images nearest the threshold on
each side (kept images from the shard tars, dropped ones from the ``dropped/`` audit tars).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from rich.table import Table

from curate.base import ConfigError
from curate.core.output import OutputFolder, read_sidecar
from curate.core.storage import filesystem, write_atomic
from curate.kit.rules import Rule, first_failure, parse_rule
from curate.tools.html_page import card, card_images, escape, histogram, page

__all__ = ["FilterStep", "PreviewReport", "preview_output", "preview_table"]


@dataclass(frozen=True)
class FilterStep:
    """One ``filter`` stage of a run: its name, rules in order and missing-value policy."""

    name: str
    rules: tuple[Rule, ...]
    missing: str = "drop"

    def reasons(self) -> list[str]:
        """Every drop reason this step can record, in first-failing-rule order."""
        out: list[str] = []
        for r in self.rules:
            if self.missing == "drop":
                out.append(r.missing_reason)
            out.append(r.drop_reason)
        return list(dict.fromkeys(out))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "rules": [r.text for r in self.rules], "missing": self.missing}


@dataclass
class PreviewReport:
    output: str
    rules: list[str]
    old: list[FilterStep]
    new: list[FilterStep]
    shards: int
    considered: int
    kept_now: int
    would_keep: int
    would_drop: dict[str, int]
    newly_dropped: int
    newly_kept: int
    caveats: list[str] = field(default_factory=list)
    html: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "rules": self.rules,
            "filters_now": [s.describe() for s in self.old],
            "filters_new": [s.describe() for s in self.new],
            "shards": self.shards,
            "considered": self.considered,
            "kept_now": self.kept_now,
            "would_keep": self.would_keep,
            "would_drop": self.would_drop,
            "newly_dropped": self.newly_dropped,
            "newly_kept": self.newly_kept,
            "caveats": self.caveats,
            "html": self.html,
        }


def run_filters(info: dict[str, Any]) -> list[FilterStep]:
    """The ``filter`` stages of a run, from its ``run.json``."""
    steps = []
    for item in info.get("config", {}).get("stages", []):
        if item.get("stage") == "filter":
            rules = tuple(parse_rule(t) for t in item.get("rules", []))
            steps.append(FilterStep(item.get("name", "filter"), rules, item.get("missing", "drop")))
    return steps


def replace_rules(steps: list[FilterStep], given: list[Rule]) -> list[FilterStep]:
    """The run's filter steps with every rule on a given rule's column replaced, where the first of them
    stood, by the given rules on that column. A column no step filters on goes to the last step (or a new
    one), as if the rule were added at the end of the last filter stage."""
    by_column: dict[str, list[Rule]] = {}
    for r in given:
        by_column.setdefault(r.column, []).append(r)
    placed: set[str] = set()
    out = []
    for step in steps:
        rules: list[Rule] = []
        for r in step.rules:
            if r.column not in by_column:
                rules.append(r)
            elif r.column not in placed:
                rules.extend(by_column[r.column])
                placed.add(r.column)
        out.append(replace(step, rules=tuple(rules)))
    rest = [r for r in given if r.column not in placed]
    if rest:
        if out:
            out[-1] = replace(out[-1], rules=(*out[-1].rules, *rest))
        else:
            out.append(FilterStep("filter", tuple(rest)))
    return out


def evaluate(table: pa.Table, steps: list[FilterStep]) -> pa.ChunkedArray:
    """Per row, the drop reason the steps, run in order, would record; null where every step keeps it."""
    reasons = pa.chunked_array([pa.nulls(table.num_rows, pa.string())], pa.string())
    for step in steps:
        reasons = pc.coalesce(reasons, first_failure(table, step.rules, step.missing))
    return reasons


def preview_output(
    output: str, rule_texts: list[str], html_path: str | None = None, per_side: int = 24
) -> PreviewReport:
    """Count what the run in ``output`` would keep and drop with ``rule_texts``; write the HTML page to
    ``html_path`` (default ``OUTPUT/report/preview.html``; an empty string writes none)."""
    out = OutputFolder(output)
    info = out.read_run()
    if info is None:
        raise ConfigError([("OUTPUT", f"{output} holds no run.json: not a curate output folder")])
    problems = []
    given: list[Rule] = []
    for text in rule_texts:
        try:
            given.append(parse_rule(text))
        except ValueError as e:
            problems.append(("--rule", str(e)))
    if not given and not problems:
        problems.append(("--rule", "give at least one rule, e.g. --rule 'clip_score >= 0.3'"))
    if problems:
        raise ConfigError(problems)
    try:
        old = run_filters(info)
    except ValueError as e:
        raise ConfigError([(out.as_given(out.run_json_path), str(e))]) from None
    new = replace_rules(old, given)

    shards = out.finished_shards()
    if not shards:
        raise ConfigError([("OUTPUT", f"{output} has no finished shard yet: nothing to preview")])
    with out.fs.open(out.shard_parquet(shards[0]), "rb") as f:
        schema = pq.read_schema(f)
    columns = {name: schema.field(name).type for name in schema.names}
    for r in given:
        if r.column not in columns:
            problems.append(
                (
                    "--rule",
                    f"{r.text!r}: the sidecars have no column {r.column!r}; they have: {', '.join(schema.names)}",
                )
            )
        else:
            try:
                r.check_type(columns[r.column])
            except ValueError as e:
                problems.append(("--rule", str(e)))
    if problems:
        raise ConfigError(problems)

    table = _read_population(out, shards, old + new, columns)
    reasons = evaluate(table, new)
    kept_now = pc.is_null(table["drop_reason"])
    dropping = pc.is_valid(reasons)
    counts = Counter(reasons.to_pylist())
    order = [reason for step in new for reason in step.reasons()]
    report = PreviewReport(
        output=output,
        rules=[r.text for r in given],
        old=old,
        new=new,
        shards=len(shards),
        considered=table.num_rows,
        kept_now=_count(kept_now),
        would_keep=table.num_rows - _count(dropping),
        would_drop={reason: counts.get(reason, 0) for reason in order},
        newly_dropped=_count(pc.and_(kept_now, dropping)),
        newly_kept=_count(pc.and_(pc.invert(kept_now), pc.invert(dropping))),
        caveats=_caveats(info, old),
    )
    if html_path != "":
        if html_path is None:  # in the output folder, on its filesystem (local or fsspec URL)
            fs, root = out.fs, out.preview_html
            shown = out.as_given(out.preview_html)
        else:
            (fs, root), shown = filesystem(html_path), html_path
        if "/" in root:
            fs.makedirs(root.rsplit("/", 1)[0], exist_ok=True)
        html = _html(report, given, table, reasons, out, per_side)
        write_atomic(fs, root, html.encode())
        report.html = shown
    return report


def _count(mask: pa.ChunkedArray) -> int:
    return pc.sum(pc.cast(mask, pa.int64())).as_py() or 0


def _read_population(
    out: OutputFolder, shards: list[str], steps: list[FilterStep], columns: dict[str, Any]
) -> pa.Table:
    """Rows the filter steps decided: ok, and either kept or dropped with a filter step's reason."""
    wanted = ["uid", "caption", "status", "drop_reason", *(r.column for s in steps for r in s.rules)]
    wanted = [c for c in dict.fromkeys(wanted) if c in columns]
    made_by_filters = pa.array(sorted({reason for s in steps for reason in s.reasons()}), pa.string())
    parts = []
    for shard in shards:
        with out.fs.open(out.shard_parquet(shard), "rb") as f:
            t = read_sidecar(f, columns=wanted)
        ok = pc.fill_null(pc.equal(t["status"], "ok"), False)
        ours = pc.or_(pc.is_null(t["drop_reason"]), pc.is_in(t["drop_reason"], made_by_filters))
        t = t.filter(pc.and_(ok, pc.fill_null(ours, False)))
        parts.append(t.append_column("shard", pa.array([shard] * t.num_rows, pa.string())))
    return pa.concat_tables(parts, promote_options="permissive")


def _caveats(info: dict[str, Any], old: list[FilterStep]) -> list[str]:
    """Where the counts may differ from a rerun: stages after a filter that drop rows themselves."""
    from curate.core.registry import STAGES

    items = info.get("config", {}).get("stages", [])
    if not old:
        return ["the run has no filter stage: the rule(s) are applied as a filter stage after its last stage"]
    first = next(i for i, item in enumerate(items) if item.get("stage") == "filter")
    later = []
    for item in items[first + 1 :]:
        if item.get("stage") == "filter":
            continue
        cls = STAGES.get(item.get("stage"))
        params = {k: v for k, v in item.items() if k not in ("stage", "name", "resources")}
        try:
            drops = cls is None or "drop_reason" in cls(cls.Config.model_validate(params)).writes
        except Exception:  # a stage this installation cannot build: assume it may drop rows
            drops = True
        if drops:
            later.append(item.get("name", item.get("stage")))
    if not later:
        return []
    return [
        f"stage(s) {', '.join(later)} run after a filter and drop rows themselves: rows they dropped are not "
        "counted here, and rows the new rules would keep again could still be dropped by them in a rerun"
    ]


def preview_table(report: PreviewReport) -> Table:
    """The counts as a rich table: considered, kept now, would keep, would drop by reason, changes."""
    table = Table(title=f"preview: {'; '.join(report.rules)}")
    table.add_column("what")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    n = report.considered

    def add(label: str, k: int, style: str = "") -> None:
        table.add_row(label, f"{k:,}", f"{100 * k / n:.1f}%" if n else "-", style=style)

    add("rows considered", n, "bold")
    add("kept now", report.kept_now)
    add("would keep", report.would_keep, "bold green")
    add("would drop", n - report.would_keep, "yellow")
    for reason, k in report.would_drop.items():
        if k:  # every reason stays in --json; the table shows those that drop something
            add(f"  {reason}", k, "yellow")
    add("newly dropped", report.newly_dropped, "red")
    add("newly kept", report.newly_kept, "green")
    return table


# --- the HTML page -----------------------------------------------------------------------------------


def _html(
    report: PreviewReport,
    given: list[Rule],
    table: pa.Table,
    reasons: pa.ChunkedArray,
    out: OutputFolder,
    per_side: int,
) -> str:
    e = escape
    sides: list[tuple[Rule, list[int], list[int]]] = []
    for rule in given:
        present = pc.invert(rule.missing(table))
        fails = pc.and_(present, rule.failing(table))
        passes = pc.and_(present, pc.invert(fails))
        sides.append((rule, _nearest(table, rule, fails, per_side), _nearest(table, rule, passes, per_side)))
    wanted = sorted({i for _, d, k in sides for i in d + k})
    uids, shards = table["uid"].to_pylist(), table["shard"].to_pylist()
    kept_now = pc.is_null(table["drop_reason"]).to_pylist()
    found = card_images(out, [(uids[i], shards[i], kept_now[i]) for i in wanted])
    images = {wanted[j]: data for j, data in found.items()}

    parts = ["<section id='summary'><h2>Counts</h2><table class='counts'>"]
    rows = [
        ("rows considered", report.considered),
        ("kept now", report.kept_now),
        ("would keep", report.would_keep),
        ("would drop", report.considered - report.would_keep),
        *((f"&nbsp;&nbsp;{e(r)}", k) for r, k in report.would_drop.items() if k),
        ("newly dropped", report.newly_dropped),
        ("newly kept", report.newly_kept),
    ]
    parts += [f"<tr><td>{label}</td><td class='n'>{k:,}</td></tr>" for label, k in rows]
    parts.append("</table>")
    parts.append(
        f"<p>filters now: {e(_rules_line(report.old))}<br>filters new: {e(_rules_line(report.new))}</p>"
    )
    parts += [f"<p class='note'>{e(c)}</p>" for c in report.caveats]
    parts.append("</section>")

    new_reason = reasons.to_pylist()
    for n, (rule, dropped, kept) in enumerate(sides):
        parts.append(f"<section class='rule' id='rule-{n}'><h2>{e(rule.text)}</h2>")
        parts.append(_histogram(table, rule))
        for label, css, idx in (("would drop", "drop", dropped), ("would keep", "keep", kept)):
            parts.append(
                f"<h3>{label}: the {len(idx)} row(s) nearest the threshold</h3><div class='grid {css}'>"
            )
            for i in idx:
                parts.append(_card(table, i, rule, images.get(i), new_reason[i]))
            parts.append("</div>")
        parts.append("</section>")
    return page(
        f"curate preview: {'; '.join(report.rules)}", parts, heading=f"curate preview of {report.output}"
    )


def _rules_line(steps: list[FilterStep]) -> str:
    return " | ".join(f"{s.name}: {', '.join(r.text for r in s.rules) or '-'}" for s in steps) or "none"


def _nearest(table: pa.Table, rule: Rule, mask: pa.ChunkedArray, n: int) -> list[int]:
    """Row positions under ``mask`` nearest the rule's threshold (by uid for non-numeric rules)."""
    positions = pc.indices_nonzero(pc.fill_null(mask, False)).to_pylist()
    uids = table["uid"].to_pylist()
    if rule.kind == "number":
        values = table[rule.column].to_pylist()
        key = lambda i: (abs(float(values[i]) - float(rule.value)), uids[i])  # noqa: E731
    else:
        key = lambda i: (0.0, uids[i])  # noqa: E731
    return sorted(positions, key=key)[:n]


def _card(table: pa.Table, i: int, rule: Rule, image: bytes | None, new_reason: str | None) -> str:
    value = table[rule.column][i].as_py()
    caption = table["caption"][i].as_py() if "caption" in table.column_names else None
    now = table["drop_reason"][i].as_py()
    fate = f"now {'kept' if now is None else now}; new {'kept' if new_reason is None else new_reason}"
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    lines = [("score", f"{rule.column} = {shown}"), ("cap", caption or ""), ("fate", fate)]
    return card(image, lines, title=table["uid"][i].as_py())


def _histogram(table: pa.Table, rule: Rule, bins: int = 40) -> str:
    """The histogram of the rule's column, each bin split into the rows the rule keeps and drops, with the
    threshold on a bin edge; value counts for a non-numeric column."""
    e = escape
    column = table[rule.column]
    if rule.kind != "number":
        counts = Counter(v for v in column.to_pylist() if v is not None)
        rows = "".join(
            f"<tr><td>{e(str(v))}</td><td class='n'>{k:,}</td></tr>" for v, k in counts.most_common(20)
        )
        return f"<table class='counts histogram'>{rows}</table>"
    present = pc.invert(rule.missing(table))
    values = pc.cast(pc.filter(column, present), pa.float64()).to_pylist()
    fails = pc.filter(rule.failing(table), present).to_pylist()
    if not values:
        return "<p>no values</p>"
    thr = float(rule.value)
    lo, hi = min(*values, thr), max(*values, thr)
    step = (hi - lo) / bins if hi > lo else 1.0
    lo = thr - math.ceil((thr - lo) / step) * step  # the threshold falls on a bin edge
    n_bins = max(1, math.floor((hi - lo) / step) + 1)
    kept, dropped = [0] * n_bins, [0] * n_bins
    for v, fail in zip(values, fails, strict=True):
        b = min(int((v - lo) / step + 1e-9), n_bins - 1)
        if fail:
            dropped[b] += 1
        else:
            kept[b] += 1
    edges = [lo + b * step for b in range(n_bins + 1)]
    return histogram(edges, kept, dropped, rule.column, [(thr, rule.text)])

"""Take samples down from a finished run: ``curate takedown OUTPUT --uids FILE | --hashes FILE``.

What is asked: uids (one per line, ``#`` comments; or a .parquet with a ``uid`` column), or hashes
(:mod:`curate.kit.hash_lists` format: ``sha256:``, ``md5:``, ``phash:``, ``pdq:`` prefixes or the length tell the
kind), which match every row with that sha256 or md5, whose ``phash`` or ``phash_mirror`` is exactly that
pHash, or whose ``pdq`` is within ``PDQ_DISTANCE`` bits of that PDQ hash (Meta's threshold). For each finished
shard (one with ``_stats.json``) that holds a matched row:

1. ``shards/<id>.tar``: the row's members (``<uid>.jpg|png|webp``, ``.json``, ``.txt``) are removed;
2. ``shards/<id>.parquet``: the row stays (every input row is still accounted for) with
   ``drop_reason = takedown``, and every column that could carry the picture or point to it is nulled: the
   URL, the captions (alt-text and VLM/LLM captions describe the image), the error text, embeddings and any
   other list column. Kept: uid, input_index, status, the hashes (sha256, md5, phash, phash_mirror, pdq: what a
   blocklist needs to keep the image out of the next run), sizes, mime and numeric scores;
3. ``dropped/<id>.tar``: the row's audit thumbnail and json are removed;
4. ``shards/<id>_stats.json``: counts recomputed from the sidecar (the row moves to ``takedown``), last.

Then the retrieval index (``--index``, or ``OUTPUT/index`` when it exists) loses the rows' vectors, metadata
and embeddings (:func:`curate.index.remove_from_index`), ``run.json`` gets the new counts, and the run
report, which embeds thumbnails, is written again if there is one.

Every file is replaced whole with :func:`curate.core.storage.write_atomic` (a temporary file and a rename; one
whole object on S3). Before the first change the plan (what to remove from which file, and each file's
sha256 before) goes to ``takedown/pending.json``; the audit line is appended to ``takedown/audit.jsonl``
last, and then the pending file is removed. Each step reads the file as it is now and removes only what is
still there, so a takedown killed anywhere is completed by running it again (or any takedown: a pending one
is finished first), with one audit line that has the sha256 of each file before the first change and after
the last. Running a finished takedown again removes nothing and logs a line that says so.
"""

from __future__ import annotations

import getpass
import hashlib
import io
import json
import socket
import tarfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.base import HashListError, TakedownError
from curate.core.output import OutputFolder, collect_output
from curate.core.storage import filesystem, is_object_store, read_json, write_atomic, write_json_atomic
from curate.core.writer import shard_counts
from curate.kit.hash_lists import read_hashes
from curate.kit.hashing import PdqIndex

__all__ = ["REASON", "read_uids", "takedown"]

REASON = "takedown"
# PDQ hashes of a request match rows within this many of 256 bits: Meta's recommended threshold.
PDQ_DISTANCE = 31
# Columns a taken-down row keeps; others are nulled unless numeric scalars (scores, counts).
KEEP = frozenset(
    {
        "uid",
        "input_index",
        "status",
        "curate_status",
        "drop_reason",
        "sha256",
        "md5",
        "phash",
        "phash_mirror",
        "pdq",
        "mime",
        "width",
        "height",
        "orig_width",
        "orig_height",
    }
)


def read_uids(path: str) -> list[str]:
    """The uids in a file: one per line with ``#`` comments, or a .parquet with a ``uid`` column."""
    fs, root = filesystem(path)
    if not fs.isfile(root):
        raise TakedownError(f"{path}: no such file")
    if root.endswith(".parquet"):
        with fs.open(root, "rb") as f:
            table = pq.read_table(f)
        if "uid" not in table.column_names:
            raise TakedownError(f"{path}: a parquet of uids needs a 'uid' column")
        return list(dict.fromkeys(u for u in table["uid"].to_pylist() if u))
    with fs.open(root, "rt", encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return list(dict.fromkeys(u for u in lines if u))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(fs, path: str) -> bytes | None:
    return fs.cat_file(path) if fs.exists(path) else None


def _tar_without(data: bytes, uids: set[str]) -> tuple[bytes, list[str]]:
    """The tar without the members of these uids (``<uid>.<ext>``), the others byte for byte as they were
    (same headers, order and format), and the names removed."""
    out, removed = io.BytesIO(), []
    with (
        tarfile.open(fileobj=io.BytesIO(data)) as src,
        tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as dst,
    ):
        for member in src:
            if member.name.split(".", 1)[0] in uids:
                removed.append(member.name)
                continue
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
    return out.getvalue(), removed


def _tar_members(data: bytes | None, uids: set[str]) -> list[str]:
    if data is None:
        return []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [n for n in tar.getnames() if n.split(".", 1)[0] in uids]


def _mark(table: pa.Table, uids: set[str]) -> tuple[pa.Table, list[str]]:
    """Rows of these uids marked ``takedown`` with their identifying columns nulled; the uids changed."""
    hit = pc.fill_null(pc.is_in(table["uid"], value_set=pa.array(sorted(uids), pa.string())), False)
    todo = pc.and_(hit, pc.invert(pc.fill_null(pc.equal(table["drop_reason"], REASON), False)))
    changed = table["uid"].filter(todo).to_pylist()
    if not changed:
        return table, []
    for i, field in enumerate(table.schema):
        numeric = pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
        if field.name == "drop_reason":
            column = pc.if_else(hit, pa.scalar(REASON, field.type), table[i])
        elif field.name in KEEP or numeric or pa.types.is_boolean(field.type):
            continue
        else:
            column = pc.if_else(hit, pa.scalar(None, field.type), table[i])
        table = table.set_column(i, field.name, column)
    return table, changed


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")  # as curate.core.writer writes a sidecar
    return buf.getvalue()


def _open_run(output: str) -> OutputFolder:
    run = OutputFolder(output)
    if not run.is_run():
        raise TakedownError(f"{output} holds no run.json: not a curate output folder")
    return run


def _plan(run: OutputFolder, request: dict[str, Any], index: Path | None) -> dict[str, Any]:
    """Which rows the request matches, and what each file holds of them now (with its sha256)."""
    wanted_uids = set(request["uids"])
    exact = set(request["sha256"]) | set(request.get("md5", [])) | set(request["phash"])
    pdqs = PdqIndex(request.get("pdq", []), PDQ_DISTANCE)
    found: set[str] = set()
    matched_hashes: set[str] = set()
    shards: dict[str, dict[str, Any]] = {}
    already: set[str] = set()
    for shard in run.finished_shards():
        with run.fs.open(run.shard_files(shard)["parquet"], "rb") as f:
            names = pq.read_schema(f).names
            f.seek(0)
            cols = [
                c
                for c in ("uid", "drop_reason", "sha256", "md5", "phash", "phash_mirror", "pdq")
                if c in names
            ]
            t = pq.read_table(f, columns=cols).to_pydict()
        near: dict[int, str] = {}
        if len(pdqs) and "pdq" in t:
            rows = [i for i, v in enumerate(t["pdq"]) if v is not None]
            found_at, _ = pdqs.nearest([t["pdq"][i] for i in rows])
            near = {i: request["pdq"][f] for i, f in zip(rows, found_at, strict=True) if f >= 0}
        hits = set()
        for i, uid in enumerate(t["uid"]):
            row_hashes = {t[c][i] for c in ("sha256", "md5", "phash", "phash_mirror") if c in t} - {None}
            if uid in wanted_uids or row_hashes & exact or i in near:
                hits.add(uid)
                matched_hashes |= row_hashes & exact | ({near[i]} if i in near else set())
                if t["drop_reason"][i] == REASON:
                    already.add(uid)
        if not hits:
            continue
        found |= hits
        files = {}
        for kind in ("tar", "parquet", "dropped", "stats"):
            data = _read(run.fs, run.shard_files(shard)[kind])
            if data is None:
                continue
            files[kind] = {"path": run.relative(run.shard_files(shard)[kind]), "sha256_before": _sha(data)}
            if kind in ("tar", "dropped"):
                files[kind]["removed"] = _tar_members(data, hits)
        shards[shard] = {"uids": sorted(hits), "files": files}
    plan: dict[str, Any] = {
        "found": sorted(found),
        "not_found": sorted(wanted_uids - found),
        "hashes_not_found": sorted((exact | set(request.get("pdq", []))) - matched_hashes),
        "shards": shards,
    }
    plan["already_taken_down"] = sorted(already)
    if index is not None and (index / "index.json").exists():
        from curate.index.store import read_info

        info = read_info(index)
        present = set()
        for p in info["parts"]:
            present |= set(pq.read_table(index / p["metadata"], columns=["uid"])["uid"].to_pylist()) & found
        plan["index"] = {
            "path": str(index),
            "uids": sorted(present),
            "sha256_before": _sha((index / "index.json").read_bytes()),
        }
    return plan


def _apply_shard(run: OutputFolder, shard: str, uids: set[str]) -> dict[str, list[str]]:
    """Remove these uids from the shard's files as they are now: tar, parquet, dropped, stats last."""
    removed: dict[str, list[str]] = {}
    for kind in ("tar", "parquet", "dropped"):
        path = run.shard_files(shard)[kind]
        data = _read(run.fs, path)
        if data is None:
            continue
        if kind == "parquet":
            table, changed = _mark(pq.read_table(io.BytesIO(data)), uids)
            if changed:
                write_atomic(run.fs, path, _parquet_bytes(table))
        else:
            new, changed = _tar_without(data, uids)
            if changed:
                write_atomic(run.fs, path, new)
        removed[kind] = changed
    table = pq.read_table(io.BytesIO(run.fs.cat_file(run.shard_files(shard)["parquet"])))
    stats = read_json(run.fs, run.shard_files(shard)["stats"])
    new_stats = {**stats, **shard_counts(table)}
    written = dict(stats.get("written", {}))
    tar = run.fs.cat_file(run.shard_files(shard)["tar"])
    written.update(
        samples=new_stats["kept"],
        tar_bytes=len(tar),
        parquet_bytes=run.fs.size(run.shard_files(shard)["parquet"]),
    )
    if run.fs.exists(run.shard_files(shard)["dropped"]):
        dropped = run.fs.cat_file(run.shard_files(shard)["dropped"])
        with tarfile.open(fileobj=io.BytesIO(dropped)) as t:
            thumbs = sum(n.endswith(".jpg") for n in t.getnames())
        written.update(dropped_thumbnails=thumbs, dropped_tar_bytes=len(dropped))
    new_stats["written"] = written
    if new_stats != stats:
        write_json_atomic(run.fs, run.shard_files(shard)["stats"], new_stats)
    return removed


def _after(run: OutputFolder, plan: dict[str, Any]) -> list[dict[str, Any]]:
    files = []
    for shard, entry in sorted(plan["shards"].items()):
        for kind, f in entry["files"].items():
            data = _read(run.fs, run.shard_files(shard)[kind])
            after = _sha(data) if data is not None else None
            record = {**f, "sha256_after": after}
            if kind == "parquet":
                record["marked"] = [u for u in entry["uids"] if u not in plan["already_taken_down"]]
            if kind == "stats":
                record["rewritten"] = after != f["sha256_before"]
            files.append(record)
    return sorted(files, key=lambda f: f["path"])  # the pending file's json has its keys sorted


def _append_audit(run: OutputFolder, record: dict[str, Any]) -> None:
    line = (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode()
    path = run.takedown_audit
    if is_object_store(run.fs):  # no appends on an object store: the whole log again, as one object
        write_atomic(run.fs, path, (_read(run.fs, path) or b"") + line)
        return
    with run.fs.open(path, "ab") as f:
        f.write(line)


def _audited(run: OutputFolder, request_id: str) -> bool:
    data = _read(run.fs, run.takedown_audit)
    return bool(data) and any(json.loads(x).get("id") == request_id for x in data.decode().splitlines() if x)


def _execute(run: OutputFolder, pending: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    plan = pending["plan"]
    if _audited(run, pending["id"]):  # killed after its audit line: only the pending file was left
        run.fs.rm_file(run.takedown_pending)
        return pending
    for shard, entry in sorted(plan["shards"].items()):
        _apply_shard(run, shard, set(entry["uids"]))
        say(f"shard {shard}: {len(entry['uids'])} row(s) taken down")
    files = _after(run, plan)
    if "index" in plan:
        from curate.index import remove_from_index

        index = Path(plan["index"]["path"])
        done = remove_from_index(index, set(plan["found"]))
        files.append(
            {
                "path": str(index / "index.json"),
                "removed": plan["index"]["uids"],
                "parts": done["files"],
                "sha256_before": plan["index"]["sha256_before"],
                "sha256_after": _sha((index / "index.json").read_bytes()),
            }
        )
    if any(f.get("sha256_before") != f.get("sha256_after") for f in files):
        info = run.read_run() or {}
        counts = collect_output(run).counts
        if info.get("counts") != counts:
            info["counts"] = counts
            run.write_run(info)
        if run.fs.exists(run.report_json):
            from curate.tools.report import write_report

            write_report(run.path)  # the report embeds thumbnails
    removed = sum(len(f.get("removed", [])) + len(f.get("marked", [])) for f in files)
    record = {
        "id": pending["id"],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "started": pending["started"],
        "user": pending["user"],
        "host": pending["host"],
        "reason": pending["request"]["reason"],
        "request": pending["request"],
        "found": plan["found"],
        "not_found": plan["not_found"],
        "hashes_not_found": plan["hashes_not_found"],
        "already_taken_down": plan["already_taken_down"],
        "files": files,
        "removed_anything": removed > 0,
        "resumed": pending.get("resumed", False),
    }
    _append_audit(run, record)
    run.fs.rm_file(run.takedown_pending)
    return record


def takedown(
    output: str,
    *,
    uids: list[str] | None = None,
    hashes: dict[str, list[str]] | None = None,
    reason: str | None = None,
    index: str | Path | None = None,
    source: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Take the rows with these ``uids``, or these hashes (``{"sha256": [...], "md5": [...], "phash": [...],
    "pdq": [...]}``), down from
    the run in ``output`` and from its index; returns the audit record written. See the module's doc."""
    say = progress or (lambda msg: None)
    run = _open_run(output)
    if index is None and run.fs.exists(f"{run.index_dir}/index.json") and not is_object_store(run.fs):
        index = Path(run.index_dir)
    hashes = hashes or {}
    request = {
        "uids": sorted(set(uids or [])),
        "sha256": sorted(set(hashes.get("sha256", []))),
        "phash": sorted(set(hashes.get("phash", []))),
        **{kind: sorted(set(hashes[kind])) for kind in ("md5", "pdq") if hashes.get(kind)},
        "reason": reason,
        "index": str(index) if index is not None else None,
        "source": source,
    }
    pending_path = run.takedown_pending
    if run.fs.exists(pending_path):
        pending = read_json(run.fs, pending_path)
        pending["resumed"] = True
        say(f"completing an interrupted takedown from {pending['started']}")
        record = _execute(run, pending, say)
        if pending["request"] == request:
            return record
    run.fs.makedirs(run.takedown_dir, exist_ok=True)
    pending = {
        "id": uuid.uuid4().hex,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "user": _user(),
        "host": socket.gethostname(),
        "request": request,
        "plan": _plan(run, request, Path(index) if index is not None else None),
    }
    write_json_atomic(run.fs, pending_path, pending)
    return _execute(run, pending, say)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def read_request(uids_file: str | None, hashes_file: str | None) -> tuple[list[str], dict[str, list[str]]]:
    """The uids or hashes of a request file; a missing or bad file is a :class:`TakedownError`."""
    if uids_file is not None:
        return read_uids(uids_file), {}
    try:
        return [], read_hashes(str(hashes_file))
    except HashListError as e:
        raise TakedownError(str(e)) from None

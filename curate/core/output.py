"""A run's output folder: every path in it is named here, once, and everything else asks for it by name.

As datatrove's ``DataFolder``, :class:`OutputFolder` wraps a folder on any fsspec filesystem (a local path,
``s3://``, ``gs://``, ``memory://`` ...) and hands out paths inside it; nothing in curate builds a path of a
run from string pieces. The layout::

    run.json                   the run: config, fingerprint, input files, counts, driver, status
    shards/<id>.tar            the WebDataset tar of the kept rows        (curate.core.writer)
    shards/<id>.parquet        every row of the shard, the sidecar
    shards/<id>_stats.json     counts and stage timings; written last, so it marks the shard finished
    shards/<id>_failed.json    why the shard failed (removed when it succeeds)
    dropped/<id>.tar           audit thumbnails of the dropped rows
    work/phase<k>/<id>.arrow   a shard between two phases (a global stage cuts the pipeline in phases);
                               removed once the run finishes
    global/<stage>/            a global stage's fitted state; ``_done`` in it, written last, marks it fitted
                               (and names the shards it was fitted on); ``previous/`` in it holds the state
                               before a grown run or a retry decided again, until the shards are rewritten
    work/redecide/<stage>/     the finished shards as they were at the global stage, while it decides
                               again (curate.core.grow)
    dedup/<stage>.parquet      a dedup stage's decisions, and ``.json`` its summary, for users to read
    report/report.html         the run report (curate.tools.report), ``report.json`` its numbers, and
    report/preview.html        what ``curate preview`` draws
    index/                     a retrieval index built from the run (curate.index)
    takedown/audit.jsonl       one line per takedown; ``pending.json`` while one is under way

Paths come back as paths *within the filesystem* (``fs`` and ``root``, as :func:`curate.core.storage.filesystem`
gives them), to use with ``self.fs``; :meth:`OutputFolder.url` turns one back into what a user or another
process passes to ``filesystem()`` (the same path locally, with its protocol elsewhere).

Besides naming paths the folder knows what is in it: ``run.json`` read and written whole
(:meth:`~OutputFolder.read_run`, :meth:`~OutputFolder.write_run`), the finished shards
(:meth:`~OutputFolder.finished_shards`: those with a stats file), the failed ones, the sum of every shard's
stats (:func:`collect_output`, a :class:`RunSummary`), the members of a shard's tars
(:meth:`~OutputFolder.tar_members`, :meth:`~OutputFolder.read_member`, :meth:`~OutputFolder.images`), what
``--overwrite`` removes (:data:`OWNED`) and the checks before a run writes there
(:meth:`~OutputFolder.prepare`). It imports nothing of curate but the leaf modules (errors, storage), so the
runner, the writer, the tools, the index, the CLI and the trainer can all use it without an import cycle.
"""

from __future__ import annotations

import os
import socket
import tarfile
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from curate.base import ConfigError
from curate.core.storage import TMP_MARK, clean_temp, filesystem, read_json, write_json_atomic

__all__ = [
    "CURATE_STATUS",
    "DEDUP",
    "DONE",
    "DROPPED",
    "EMBEDDINGS",
    "FAILED_SUFFIX",
    "GLOBAL",
    "INDEX",
    "OWNED",
    "PREVIOUS",
    "REPORT",
    "RUN_JSON",
    "SHARDS",
    "STATS_SUFFIX",
    "TAKEDOWN",
    "WORK",
    "OutputFolder",
    "RunSummary",
    "TarMember",
    "collect_output",
    "driver_alive",
    "driver_identity",
    "read_sidecar",
]

# The entries of an output folder.
RUN_JSON = "run.json"
SHARDS = "shards"
DROPPED = "dropped"
WORK = "work"
GLOBAL = "global"
EMBEDDINGS = "embeddings"  # written by older versions; still removed by --overwrite
DEDUP = "dedup"
INDEX = "index"
REPORT = "report"
TAKEDOWN = "takedown"

# File names inside them.
STATS_SUFFIX = "_stats.json"
FAILED_SUFFIX = "_failed.json"
DONE = "_done"
PREVIOUS = "previous"
REDECIDE = "redecide"
AUDIT = "audit.jsonl"
PENDING = "pending.json"

# What curate owns inside an output folder; --overwrite removes these and nothing else. ``takedown/`` is not
# among them: the audit log of what was taken down outlives a rerun.
OWNED = (RUN_JSON, SHARDS, DROPPED, WORK, GLOBAL, EMBEDDINGS, DEDUP, INDEX, REPORT)

# Members of a shard tar that are not the image: <uid>.json and <uid>.txt.
_META_EXTENSIONS = frozenset({"json", "txt"})


@dataclass(frozen=True)
class TarMember:
    """One member of a shard tar: ``<uid>.<ext>``, where its bytes start in the tar, and how many."""

    name: str
    offset: int
    size: int

    @property
    def uid(self) -> str:
        return self.name.partition(".")[0]

    @property
    def ext(self) -> str:
        return self.name.partition(".")[2]

    @property
    def is_image(self) -> bool:
        """The image of the sample (jpg, png, webp, gif, or bin for bytes of no known format)."""
        return bool(self.ext) and self.ext not in _META_EXTENSIONS


class OutputFolder:
    """The output folder of a run at ``path`` (a local path or an fsspec URL)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = str(path)
        self.fs: AbstractFileSystem
        self.fs, self.root = filesystem(self.path)

    def __repr__(self) -> str:
        return f"OutputFolder({self.path!r})"

    # --- paths (within ``self.fs``) -------------------------------------------------------------------

    def file(self, *parts: str) -> str:
        """``root/part/part...``: the one place where paths of the folder are joined."""
        return "/".join((self.root, *parts))

    def url(self, path: str) -> str:
        """``path`` (within ``self.fs``) as another process opens it with ``filesystem()``: as it is on a
        local disk, with its protocol (``s3://``, ``memory://``) elsewhere."""
        return self.fs.unstrip_protocol(path) if _remote(self.fs) else path

    @property
    def run_json_path(self) -> str:
        return self.file(RUN_JSON)

    @property
    def shards_dir(self) -> str:
        return self.file(SHARDS)

    def shard_tar(self, shard: str) -> str:
        return self.file(SHARDS, f"{shard}.tar")

    def shard_parquet(self, shard: str) -> str:
        return self.file(SHARDS, f"{shard}.parquet")

    def shard_stats(self, shard: str) -> str:
        """The stats file, written last: the shard's completion marker."""
        return self.file(SHARDS, f"{shard}{STATS_SUFFIX}")

    def shard_failed(self, shard: str) -> str:
        return self.file(SHARDS, f"{shard}{FAILED_SUFFIX}")

    @property
    def dropped_dir(self) -> str:
        return self.file(DROPPED)

    def dropped_tar(self, shard: str) -> str:
        return self.file(DROPPED, f"{shard}.tar")

    def shard_files(self, shard: str) -> dict[str, str]:
        """The files the writer makes for a shard, by kind: ``tar``, ``parquet``, ``dropped``, ``stats``
        (in the order they are written; a kind is also the ``which`` of :meth:`tar_members`)."""
        return {
            "tar": self.shard_tar(shard),
            "parquet": self.shard_parquet(shard),
            "dropped": self.dropped_tar(shard),
            "stats": self.shard_stats(shard),
        }

    @property
    def work_dir(self) -> str:
        return self.file(WORK)

    def phase_dir(self, index: int) -> str:
        """Where phase ``index`` leaves its shards for the next phase (``<id>.arrow``)."""
        return self.file(WORK, f"phase{index}")

    def phase_shard(self, index: int, shard: str) -> str:
        return self.file(WORK, f"phase{index}", f"{shard}.arrow")

    @property
    def global_dir(self) -> str:
        return self.file(GLOBAL)

    def global_state(self, stage: str) -> str:
        """The folder of a global stage's fitted state (the stage's ``state_path``, see :meth:`url`)."""
        return self.file(GLOBAL, stage)

    def global_done(self, stage: str) -> str:
        """The marker written once the global stage has fitted."""
        return self.file(GLOBAL, stage, DONE)

    def global_previous(self, stage: str) -> str:
        """The global stage's state as it was before it decided again over a grown or retried run: kept
        until every shard it changes is rewritten (``_done`` in it marks a complete copy)."""
        return self.file(GLOBAL, stage, PREVIOUS)

    def redecide_dir(self, stage: str) -> str:
        """Where the finished shards wait as they were at the global stage while it decides again
        (``<id>.arrow``, read like a phase's shards)."""
        return self.file(WORK, REDECIDE, stage)

    @property
    def dedup_dir(self) -> str:
        return self.file(DEDUP)

    def dedup_decisions(self, stage: str) -> str:
        return self.file(DEDUP, f"{stage}.parquet")

    def dedup_summary(self, stage: str) -> str:
        return self.file(DEDUP, f"{stage}.json")

    @property
    def report_dir(self) -> str:
        return self.file(REPORT)

    @property
    def report_html(self) -> str:
        return self.file(REPORT, "report.html")

    @property
    def report_json(self) -> str:
        return self.file(REPORT, "report.json")

    @property
    def preview_html(self) -> str:
        return self.file(REPORT, "preview.html")

    @property
    def index_dir(self) -> str:
        return self.file(INDEX)

    @property
    def takedown_dir(self) -> str:
        return self.file(TAKEDOWN)

    @property
    def takedown_audit(self) -> str:
        return self.file(TAKEDOWN, AUDIT)

    @property
    def takedown_pending(self) -> str:
        return self.file(TAKEDOWN, PENDING)

    def owned(self) -> list[str]:
        """The paths ``--overwrite`` removes (:data:`OWNED`), whether they exist or not."""
        return [self.file(name) for name in OWNED]

    def as_given(self, path: str) -> str:
        """``path`` (within ``self.fs``) spelled from the folder as it was given (relative, or with its
        protocol): what to show a user."""
        return f"{self.path.rstrip('/')}/{self.relative(path)}"

    def relative(self, path: str) -> str:
        """``path`` relative to the folder (as the takedown audit records it)."""
        prefix = self.root + "/"
        return path[len(prefix) :] if path.startswith(prefix) else path

    # --- run.json ------------------------------------------------------------------------------------

    def is_run(self) -> bool:
        """Whether the folder holds a ``run.json``: a curate output folder."""
        return self.fs.exists(self.run_json_path)

    def read_run(self) -> dict[str, Any] | None:
        """``run.json``, or None where there is none."""
        p = self.run_json_path
        return read_json(self.fs, p) if self.fs.exists(p) else None

    def write_run(self, info: dict[str, Any]) -> None:
        """Replace ``run.json`` whole (atomically)."""
        write_json_atomic(self.fs, self.run_json_path, info)

    # --- shards --------------------------------------------------------------------------------------

    def _shard_names(self) -> list[str]:
        d = self.shards_dir
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(d, detail=False)) if self.fs.exists(d) else []

    def finished_shards(self) -> list[str]:
        """The ids of the finished shards (those whose stats file exists), sorted."""
        return sorted(n[: -len(STATS_SUFFIX)] for n in self._shard_names() if n.endswith(STATS_SUFFIX))

    def failed_shards(self) -> dict[str, dict[str, Any]]:
        """The ``_failed.json`` records of shards that failed and have not finished since, by id."""
        names = self._shard_names()
        done = {n[: -len(STATS_SUFFIX)] for n in names if n.endswith(STATS_SUFFIX)}
        out = {}
        for n in names:
            if n.endswith(FAILED_SUFFIX) and n[: -len(FAILED_SUFFIX)] not in done:
                record = read_json(self.fs, self.file(SHARDS, n))
                out[record["shard"]] = record
        return out

    def read_stats(self, shard: str) -> dict[str, Any]:
        return read_json(self.fs, self.shard_stats(shard))

    def _tar_path(self, shard: str, which: str) -> str:
        if which not in ("tar", "dropped"):
            raise ValueError(
                f"which is 'tar' (shards/<id>.tar) or 'dropped' (dropped/<id>.tar), not {which!r}"
            )
        return self.shard_tar(shard) if which == "tar" else self.dropped_tar(shard)

    def tar_members(self, shard: str, which: str = "tar") -> list[TarMember]:
        """The members of the shard's tar (``which="tar"``) or of its dropped/ audit tar (``"dropped"``), in
        tar order, with where their bytes lie: one read of the headers, then :meth:`read_member` is a seek
        and a read. A missing tar raises FileNotFoundError."""
        path = self._tar_path(shard, which)
        if not self.fs.exists(path):
            raise FileNotFoundError(path)
        with self.fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            return [TarMember(m.name, m.offset_data, m.size) for m in tar if m.isfile()]

    def read_member(self, shard: str, member: TarMember, which: str = "tar") -> bytes:
        """The bytes of one member found by :meth:`tar_members`."""
        with self.fs.open(self._tar_path(shard, which), "rb") as f:
            f.seek(member.offset)
            return f.read(member.size)

    def images(
        self, shard: str, which: str = "tar", uids: Collection[str] | None = None
    ) -> dict[str, tuple[bytes, str]]:
        """``uid -> (image bytes, extension)`` of the images in the shard's tar or dropped/ audit tar (every
        one, or those of ``uids``), read in one pass; empty where the tar is not there (a shard being
        rewritten, a run without dropped thumbnails)."""
        path = self._tar_path(shard, which)
        wanted = set(uids) if uids is not None else None
        found: dict[str, tuple[bytes, str]] = {}
        if not self.fs.exists(path):
            return found
        with self.fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                member = TarMember(m.name, m.offset_data, m.size)
                if m.isfile() and member.is_image and (wanted is None or member.uid in wanted):
                    found[member.uid] = (tar.extractfile(m).read(), member.ext)
        return found

    # --- before and after a run ------------------------------------------------------------------------

    def prepare(self, fingerprint: str, overwrite: bool, resume_anyway: bool) -> dict[str, Any] | None:
        """Make the folder ready for a run of ``fingerprint``; refuse to mix two configs' outputs. Returns
        the run.json there was (None after ``overwrite``)."""
        previous = self.read_run()
        if overwrite:
            self.wipe()
            previous = None
        elif previous is None:
            if self.fs.exists(self.root) and self._foreign_entries():
                raise ConfigError(
                    [
                        (
                            "output.path",
                            f"{self.path} is not empty and holds no run.json; choose an empty folder "
                            "or pass --overwrite to let curate write there",
                        )
                    ]
                )
        elif previous.get("fingerprint") != fingerprint and not resume_anyway:
            raise ConfigError(
                [
                    (
                        "output.path",
                        f"{self.path} holds a run of another config or input (fingerprint "
                        f"{previous.get('fingerprint')}, this one {fingerprint}); pass --overwrite to start over, or "
                        "--resume-anyway to keep its finished shards and go on with this config",
                    )
                ]
            )
        self.fs.makedirs(self.root, exist_ok=True)
        return previous

    def _foreign_entries(self) -> list[str]:
        """What the folder holds besides a temporary ``run.json`` left by a run killed while writing it: that
        run had written nothing else yet, and the folder is as good as empty (``clean_temp`` removes it)."""
        own = f"{RUN_JSON}{TMP_MARK}"
        return [p for p in self.fs.ls(self.root, detail=False) if not p.rsplit("/", 1)[-1].startswith(own)]

    def wipe(self) -> None:
        """Remove what curate owns here (:data:`OWNED`), and nothing else."""
        for p in self.owned():
            if self.fs.exists(p):
                self.fs.rm(p, recursive=True)

    def clean_temp(self) -> int:
        """Remove temporary files of killed writers anywhere in the folder; returns how many."""
        return clean_temp(self.fs, self.root) if self.fs.exists(self.root) else 0

    def remove_work(self) -> None:
        """Remove ``work/``: the shards between phases, not needed once the last phase has them all."""
        if self.fs.exists(self.work_dir):
            self.fs.rm(self.work_dir, recursive=True)


# With output.naming: img2dataset a sidecar's ``status`` holds img2dataset's outcome (``success``,
# ``failed_to_download``, ``failed_to_resize``) for its readers, and this column curate's own status.
CURATE_STATUS = "curate_status"


def read_sidecar(source: Any, columns: list[str] | None = None) -> pa.Table:
    """A shard's parquet sidecar (a path or an open file) as curate's own tools read it: ``status`` is always
    curate's status, whatever ``output.naming`` the run wrote with (see :data:`CURATE_STATUS`)."""
    parquet = pq.ParquetFile(source)
    swap = CURATE_STATUS in parquet.schema_arrow.names
    wanted = None if columns is None else list(columns)
    if swap and wanted is not None and "status" in wanted and CURATE_STATUS not in wanted:
        wanted.append(CURATE_STATUS)
    table = parquet.read(columns=wanted)
    if not swap or "status" not in table.column_names:
        return table
    status = table[CURATE_STATUS]
    table = table.set_column(table.column_names.index("status"), "status", status)
    return table.drop_columns([CURATE_STATUS])


def _remote(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol not in ("file", "local")


# --- the driver recorded in run.json ----------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """When the process started (clock ticks since boot, from /proc), to tell it from a later one that got
    its pid; None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in parentheses may hold spaces


def driver_identity() -> dict[str, Any]:
    """The process that runs the pipeline, as run.json records it."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def driver_alive(driver: dict[str, Any] | None) -> bool | None:
    """Whether the driver recorded in run.json still runs: None when that cannot be told from here (another
    host, or a run.json older than the record)."""
    if not driver or driver.get("host") != socket.gethostname():
        return None
    pid = driver["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process has that pid now, or the run's user is another
        pass
    start = _process_start(pid)
    return not (start and driver.get("start") and start != driver["start"])


# --- the run's numbers ------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """Every shard's stats added up: what ``curate status`` shows and ``run.json`` records."""

    output: str
    shards_total: int
    shards_done: list[str]
    shards_failed: dict[str, str]
    counts: dict[str, Any]
    stages: dict[str, dict[str, float]]
    seconds: float
    skipped: int = 0
    ran: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if not self.shards_failed and len(self.shards_done) == self.shards_total else 1


def collect_output(path: str | OutputFolder) -> RunSummary:
    """Add up every shard's stats file: what ``curate status`` shows and what ``run.json`` records."""
    out = path if isinstance(path, OutputFolder) else OutputFolder(path)
    info = out.read_run() or {}
    counts: dict[str, Any] = {"rows": 0, "ok": 0, "kept": 0, "status": Counter(), "drop_reason": Counter()}
    stages: dict[str, dict[str, float]] = {}
    done: list[str] = []
    failed: dict[str, str] = {}
    for name in out._shard_names():
        if name.endswith(STATS_SUFFIX):
            stats = read_json(out.fs, out.file(SHARDS, name))
            done.append(stats["shard"])
            for key in ("rows", "ok", "kept"):
                counts[key] += stats[key]
            counts["status"].update(stats["status"])
            counts["drop_reason"].update(stats["drop_reason"])
            for stage, t in stats.get("stages", {}).items():
                s = stages.setdefault(stage, {"seconds": 0.0, "rows": 0, "kept": 0})
                s["seconds"] += t["seconds"]
                s["rows"] += stats["rows"]
                s["kept"] += t["kept"]
                if "peak_rss" in t:
                    s["peak_rss"] = max(s.get("peak_rss", 0), t["peak_rss"])
        elif name.endswith(FAILED_SUFFIX):
            f = read_json(out.fs, out.file(SHARDS, name))
            failed[f["shard"]] = f.get("error") or ""
    for shard in done:
        failed.pop(shard, None)
    order = ["read"] + [s["name"] for s in info.get("config", {}).get("stages", [])]
    stages = dict(sorted(stages.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    counts["status"] = dict(sorted(counts["status"].items()))
    counts["drop_reason"] = dict(sorted(counts["drop_reason"].items()))
    return RunSummary(
        output=out.path,
        shards_total=info.get("shards_total", len(done) + len(failed)),
        shards_done=sorted(done),
        shards_failed=failed,
        counts=counts,
        stages=stages,
        seconds=info.get("seconds", 0.0),
    )

"""Deduplication and decontamination: a global stage between two phases.

    - stage: dedup
      exact: true                          # same sha256 of the downloaded bytes
      perceptual: {max_distance: 4}        # pHash within 4 bits: re-encodes, resizes
      semantic: {threshold: 0.95}          # CLIP image embeddings: crops, flips, edits (SemDeDup)
      keep: ["clip_score desc"]            # which row of a group stays; ties go to the smaller uid
      decontaminate: {path: eval/images}   # drop rows near any image of an evaluation set

The stages before it run on every shard first and keep their output; ``fit`` then reads the kept rows of
every shard (hashes, embeddings, the keep columns), decides, and writes a decision table; in the next phase
each shard joins it: duplicates get ``drop_reason = duplicate:<kind>:<uid of the kept row>``, contaminated
rows ``contaminated``, and ``dup_of`` / ``dup_kind`` / ``dup_similarity`` say what matched. The table is also
written to ``<output>/dedup/<stage name>.parquet`` with a summary beside it.

Exact groups fold into their best row first; perceptual and semantic pairs are found among those rows, and
one walk in keep order (:func:`curate.kit.duplicates.resolve`) decides, so every dropped row points to a kept one.
Decontamination runs before dedup, so a row is never kept for being the best copy of an evaluation image.

A run that grows (new input) or a ``curate retry`` fits again over every row of the run, the finished
shards' rows read from their sidecars, with the same keep order: a new row that beats a kept one makes it
its duplicate (its shard is rewritten), as one run over all the rows would; a row dropped before is never
brought back. The rule and its limits: :mod:`curate.core.grow`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from curate.base import ConfigError, StrictModel
from curate.core.output import OutputFolder
from curate.core.schema import COLUMNS, Column, is_kept
from curate.core.stage import GlobalStage, ShardSource, StageResources, drop, set_column
from curate.core.storage import filesystem, write_atomic, write_json_atomic
from curate.kit.duplicates import (
    KIND_NAMES,
    Decisions,
    Pairs,
    exact_groups,
    keep_rank,
    perceptual_pairs,
    resolve,
    semantic_pairs,
)
from curate.kit.duplicates.semantic import SemanticBackend, choose_backend
from curate.kit.hashing import hamming, hex_to_uint64

DECISIONS = "decisions.parquet"
SUMMARY = "summary.json"
_DECISION_SCHEMA = pa.schema(
    [
        ("input_index", pa.int64()),
        ("uid", pa.string()),
        ("drop_reason", pa.string()),
        ("dup_of", pa.string()),
        ("dup_kind", pa.string()),
        ("dup_similarity", pa.float32()),
        ("contaminated_by", pa.string()),
    ]
)


class PerceptualConfig(StrictModel):
    enabled: bool = True
    max_distance: int = Field(4, ge=0, le=16, description="most differing bits of two 64-bit pHashes")
    flips: bool = Field(True, description="also match an image's hash against the other's mirror hash")
    verify_pixels: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="a hash match must also have at least this correlation of 64 px grey thumbnails (best "
        "over the mirror and shifts of up to 3 px); reads the images of the matched rows; null: off",
    )
    verify_cosine: float | None = Field(
        0.9,
        ge=-1,
        le=1,
        description="a hash match must also have at least this CLIP image cosine (pHash alone confuses "
        "flat images); null: hashes alone, no embeddings needed",
    )


class SemanticConfig(StrictModel):
    enabled: bool = True
    method: Literal["semdedup", "range"] = Field(
        "semdedup", description="k-means then pairs within clusters, or an IVF range search"
    )
    threshold: float = Field(0.95, gt=0, le=1, description="cosine of two image embeddings at or above it")
    clusters: int | None = Field(None, gt=0, description="k-means clusters / IVF lists; default sqrt(n)")
    niter: int = Field(20, gt=0, description="k-means iterations")
    max_points_per_centroid: int = Field(
        64, gt=0, description="k-means trains on at most this many per cluster"
    )
    nprobe: int = Field(8, gt=0, description="range: lists searched per query")
    spill: int = Field(
        2, ge=1, le=4, description="semdedup: clusters each vector is compared in (1: SemDeDup as published)"
    )
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto: semdedup in torch on a GPU when torch sees one, else FAISS with its k-means on a "
        "GPU when faiss-gpu sees one, else FAISS on the CPU; cpu: FAISS on the CPU; cuda: as auto, but an "
        "error without a GPU. range always runs on the CPU (FAISS), and is an error with cuda",
    )
    threads: int | None = Field(
        None, gt=0, description="FAISS and per-cluster threads on the CPU (default: all cores)"
    )


class DecontaminateConfig(StrictModel):
    path: str = Field(
        description="the evaluation set: a folder of images, a parquet (image, image_embedding, sha256 or "
        "phash columns) or a .npy of embeddings"
    )
    threshold: float = Field(0.9, gt=0, le=1, description="cosine to an evaluation embedding at or above it")
    max_distance: int = Field(4, ge=0, le=16, description="pHash bits, for evaluation images")
    model: str | None = Field(
        None, description="open_clip model to embed evaluation images: the one that wrote image_embedding"
    )
    pretrained: str | None = Field(None, description="its pretrained tag or weights")

    @property
    def uses_embeddings(self) -> bool:
        """Embeddings are compared when the set has them (.npy, .parquet) or a model embeds its images; a
        folder of images without a model is matched by sha256 and pHash only."""
        return self.model is not None or self.path.endswith((".npy", ".parquet"))


class DedupConfig(StrictModel):
    exact: bool = Field(True, description="same sha256 of the downloaded bytes")
    perceptual: PerceptualConfig = Field(default_factory=PerceptualConfig)
    semantic: SemanticConfig = Field(default_factory=SemanticConfig)
    keep: list[str] = Field(
        default_factory=lambda: ["clip_score desc"],
        description="'<column> [asc|desc]' in order: which row of a duplicate group stays; then the uid",
    )
    decontaminate: DecontaminateConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _switches(cls, data: Any) -> Any:
        """``perceptual: false`` / ``semantic: true`` as short forms of ``{enabled: ...}``."""
        if isinstance(data, dict):
            data = dict(data)
            for key in ("perceptual", "semantic"):
                if isinstance(data.get(key), bool):
                    data[key] = {"enabled": data[key]}
        return data

    @field_validator("keep")
    @classmethod
    def _keep_rules(cls, rules: list[str]) -> list[str]:
        for rule in rules:
            _parse_keep(rule)
        return rules


def _parse_keep(rule: str) -> tuple[str, bool]:
    parts = rule.split()
    if len(parts) == 1:
        parts.append("desc")
    if len(parts) != 2 or parts[1] not in ("asc", "desc"):
        raise ValueError(f"keep rule {rule!r}: write '<column> asc' or '<column> desc'")
    column = parts[0]
    declared = COLUMNS.get(column)
    if declared is not None and not (
        pa.types.is_integer(declared.type) or pa.types.is_floating(declared.type)
    ):
        raise ValueError(f"keep rule {rule!r}: column {column!r} is {declared.type}, not a number")
    return column, parts[1] == "desc"


class Dedup(GlobalStage):
    name = "dedup"
    Config = DedupConfig
    columns = (
        Column(
            "dup_of",
            pa.string(),
            "dedup",
            "uid of the kept row this row duplicates; null when not a duplicate",
        ),
        Column(
            "dup_kind", pa.string(), "dedup", "exact, perceptual or semantic; contaminated for eval matches"
        ),
        Column(
            "dup_similarity",
            pa.float32(),
            "dedup",
            "cosine (semantic, contaminated by embedding), 1 - hamming/64 (perceptual), 1 (exact)",
        ),
        Column("contaminated_by", pa.string(), "dedup", "the evaluation item this row matched"),
    )
    resources = StageResources(cpus=1)

    config: DedupConfig

    def fit_gpus(self) -> float:
        """Semantic dedup's k-means, assignment and per-cluster similarities run on a GPU where there is one
        (``semantic.device`` auto or cuda; the range method is FAISS on CPUs)."""
        s = self.config.semantic
        if s is None or not s.enabled or s.device == "cpu" or s.method != "semdedup":
            return 0.0
        return 1.0

    @property
    def keep_columns(self) -> list[tuple[str, bool]]:
        return [_parse_keep(r) for r in self.config.keep]

    @property
    def needs_embeddings(self) -> bool:
        c = self.config
        return c.semantic.enabled or (c.perceptual.enabled and c.perceptual.verify_cosine is not None)

    @property
    def decontaminate_embeddings(self) -> bool:
        return self.config.decontaminate is not None and self.config.decontaminate.uses_embeddings

    @property
    def reads(self) -> tuple[str, ...]:
        c = self.config
        cols = ["uid", "input_index", "status", "drop_reason"]
        cols += ["sha256"] if c.exact or c.decontaminate else []
        cols += ["phash"] if c.perceptual.enabled or c.decontaminate else []
        cols += ["phash_mirror"] if c.perceptual.enabled and c.perceptual.flips else []
        cols += ["image"] if c.perceptual.enabled and c.perceptual.verify_pixels is not None else []
        cols += ["image_embedding"] if self.needs_embeddings or self.decontaminate_embeddings else []
        cols += [col for col, _ in self.keep_columns if col not in cols]
        return tuple(cols)

    writes = ("drop_reason", "dup_of", "dup_kind", "dup_similarity", "contaminated_by")

    def weights(self) -> list:
        d = self.config.decontaminate
        if d is None or d.model is None:
            return []
        from curate.models.clip import clip_weights

        return clip_weights(d.model, d.pretrained or "")

    # --- fit: once, on every shard ---------------------------------------------------------------

    def fit(self, shards: ShardSource) -> None:
        c = self.config
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        scratch = _scratch_dir(self.state_path)
        try:
            rows = _gather(
                shards, self.reads, self.needs_embeddings or self.decontaminate_embeddings, scratch
            )
            timings["read"] = time.perf_counter() - clock
            n = rows.n
            reason = np.full(n, None, dtype=object)
            dup_of = np.full(n, -1, np.int64)
            kind = np.full(n, None, dtype=object)
            similarity = np.full(n, np.nan, np.float32)
            contaminated_by = np.full(n, None, dtype=object)
            counts: dict[str, int] = {"considered": n}

            if c.decontaminate:
                clock = time.perf_counter()
                hits = _contamination(c.decontaminate, rows)
                for i, (what, sim) in hits.items():
                    reason[i], kind[i], similarity[i], contaminated_by[i] = (
                        "contaminated",
                        "contaminated",
                        sim,
                        what,
                    )
                counts["contaminated"] = len(hits)
                timings["decontaminate"] = time.perf_counter() - clock

            live = np.array([r is None for r in reason], bool)
            rank = keep_rank(
                [(rows.columns[col], desc) for col, desc in self.keep_columns], rows.uid, rows.input_index
            )
            # Exact: fold each sha256 group into its best row.
            clock = time.perf_counter()
            rep = np.arange(n)
            if c.exact:
                digests = np.where(live, rows.columns["sha256"], None)
                rep = exact_groups(digests, rank)
            heads = np.flatnonzero(live & (rep == np.arange(n)))
            timings["exact"] = time.perf_counter() - clock

            parts: list[Pairs] = []
            if c.perceptual.enabled:
                clock = time.perf_counter()
                ph = rows.columns["phash"]
                with_hash = heads[np.array([ph[i] is not None for i in heads], bool)] if len(heads) else heads
                hashes, owners = hex_to_uint64(ph[with_hash]), with_hash
                if c.perceptual.flips:  # mirror hashes join in, under the same row numbers
                    mirror = rows.columns["phash_mirror"][with_hash]
                    has = np.array([m is not None for m in mirror], bool)
                    hashes = np.concatenate([hashes, hex_to_uint64(mirror[has])])
                    owners = np.concatenate([owners, with_hash[has]])
                pairs = perceptual_pairs(hashes, owners, c.perceptual.max_distance)
                if c.perceptual.verify_cosine is not None and len(pairs):
                    sims = rows.cosine(pairs.a, pairs.b)
                    ok = sims >= c.perceptual.verify_cosine  # NaN (no embedding) fails the check
                    pairs = Pairs(pairs.a[ok], pairs.b[ok], pairs.kind[ok], pairs.similarity[ok])
                if c.perceptual.verify_pixels is not None and len(pairs):
                    ok = _pixel_similarity(shards, rows, pairs.a, pairs.b) >= c.perceptual.verify_pixels
                    pairs = Pairs(pairs.a[ok], pairs.b[ok], pairs.kind[ok], pairs.similarity[ok])
                parts.append(pairs)
                counts["perceptual_pairs"] = len(pairs)
                timings["perceptual"] = time.perf_counter() - clock
            semantic_backend = None
            if c.semantic.enabled:
                clock = time.perf_counter()
                s = c.semantic
                vec_heads = heads[rows.has_vector[heads]]
                backend = _semantic_backend(s) if rows.vectors is not None else None
                semantic_backend = backend.label if backend else None
                pairs = (
                    Pairs.empty()
                    if backend is None
                    else semantic_pairs(
                        rows.vectors_of(vec_heads),
                        vec_heads,
                        s.threshold,
                        method=s.method,
                        clusters=s.clusters,
                        niter=s.niter,
                        max_points_per_centroid=s.max_points_per_centroid,
                        nprobe=s.nprobe,
                        spill=s.spill,
                        seed=s.seed,
                        gpu=backend.faiss_gpu,
                        threads=s.threads,
                        backend=backend.backend,
                        torch_device=backend.device,
                    )
                )
                parts.append(pairs)
                counts["semantic_pairs"] = len(pairs)
                timings["semantic"] = time.perf_counter() - clock

            clock = time.perf_counter()
            decided: Decisions = resolve(n, rank, Pairs.concat(parts), candidates=heads)
            for i in np.flatnonzero(decided.dup_of >= 0):
                dup_of[i], kind[i], similarity[i] = (
                    decided.dup_of[i],
                    KIND_NAMES[decided.kind[i]],
                    decided.similarity[i],
                )
            # Exact copies follow their group's best row: to it when it stays, else where it went.
            for i in np.flatnonzero(live & (rep != np.arange(n))):
                head = rep[i]
                if dup_of[head] >= 0:
                    dup_of[i], kind[i], similarity[i] = dup_of[head], kind[head], similarity[head]
                else:
                    dup_of[i], kind[i], similarity[i] = head, "exact", 1.0
            timings["resolve"] = time.perf_counter() - clock

            is_dup = dup_of >= 0
            uid_of = rows.uid
            for i in np.flatnonzero(is_dup):
                reason[i] = f"duplicate:{kind[i]}:{uid_of[dup_of[i]]}"
            dropped = np.flatnonzero(is_dup | ~live)
            table = pa.table(
                {
                    "input_index": pa.array(rows.input_index[dropped], pa.int64()),
                    "uid": pa.array(uid_of[dropped], pa.string()),
                    "drop_reason": pa.array(reason[dropped], pa.string()),
                    "dup_of": pa.array(
                        [uid_of[dup_of[i]] if dup_of[i] >= 0 else None for i in dropped], pa.string()
                    ),
                    "dup_kind": pa.array(kind[dropped], pa.string()),
                    "dup_similarity": pa.array(similarity[dropped], pa.float32(), from_pandas=True),
                    "contaminated_by": pa.array(contaminated_by[dropped], pa.string()),
                },
                schema=_DECISION_SCHEMA,
            ).sort_by("input_index")
            for name in ("exact", "perceptual", "semantic"):
                counts[name] = int(sum(1 for i in np.flatnonzero(is_dup) if kind[i] == name))
            counts["kept"] = int(n - len(dropped))
            summary = {
                "stage": self.name,
                "config": c.model_dump(mode="json"),
                "counts": counts,
                "seconds": {k: round(v, 3) for k, v in timings.items()},
                # Where semantic dedup ran (torch-cuda, faiss-gpu, faiss-cpu); null when it did not.
                "semantic_backend": semantic_backend,
                "vectors": int(rows.has_vector.sum()) if rows.vectors is not None else 0,
                "dimension": int(rows.vectors.shape[1]) if rows.vectors is not None else None,
            }
            self._write(shards.output_path, table, summary)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _write(self, output_path: str, table: pa.Table, summary: dict) -> None:
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue().to_pybytes()
        fs, _ = filesystem(self.state_path)
        write_atomic(fs, f"{filesystem(self.state_path)[1]}/{DECISIONS}", data)
        write_json_atomic(fs, f"{filesystem(self.state_path)[1]}/{SUMMARY}", summary)
        # What users read: <output>/dedup/<name>.parquet and .json.
        label = Path(filesystem(self.state_path)[1]).name
        out = OutputFolder(output_path)
        out.fs.makedirs(out.dedup_dir, exist_ok=True)
        write_atomic(out.fs, out.dedup_decisions(label), data)
        write_json_atomic(out.fs, out.dedup_summary(label), summary)

    # --- apply: per shard, in the next phase -----------------------------------------------------

    def setup(self) -> None:
        fs, root = filesystem(self.state_path)
        with fs.open(f"{root}/{DECISIONS}", "rb") as f:
            table = pq.read_table(f)
        self._decisions = {
            i: row
            for i, row in zip(
                table["input_index"].to_pylist(),
                zip(*(table[c].to_pylist() for c in _DECISION_SCHEMA.names[2:]), strict=True),
                strict=True,
            )
        }

    def __call__(self, table: pa.Table) -> pa.Table:
        found = [self._decisions.get(i) for i in table["input_index"].to_pylist()]
        kept = is_kept(table).to_pylist()
        # A decision was made for a row that was kept; a row dropped since (a retry, --resume-anyway) keeps
        # its own reason.
        found = [f if k else None for f, k in zip(found, kept, strict=True)]
        empty = (None,) * 5
        columns = {
            name: [(f or empty)[k] for f in found] for k, name in enumerate(_DECISION_SCHEMA.names[2:])
        }
        mask = pa.array([f is not None for f in found], pa.bool_())
        table = drop(table, mask, pa.array(columns["drop_reason"], pa.string()))
        for name in ("dup_of", "dup_kind", "dup_similarity", "contaminated_by"):
            table = set_column(table, name, columns[name])
        return table


def _semantic_backend(s: SemanticConfig) -> SemanticBackend:
    """Where semantic dedup runs on this machine; a device it lacks is a config error (exit code 2)."""
    try:
        return choose_backend(s.device, s.method)
    except RuntimeError as e:
        raise ConfigError([(f"{Dedup.name}.semantic.device", str(e))]) from e


# --- reading every shard --------------------------------------------------------------------------


class _Rows:
    """The kept rows of every shard, in shard order: their columns, and their embeddings in a float16
    memory-mapped file (row ``i`` of the kept rows is row ``vector_row[i]`` of it, or -1)."""

    def __init__(self, columns: dict[str, np.ndarray], vectors: np.ndarray | None, vector_row: np.ndarray):
        self.columns = columns
        self.uid = columns["uid"]
        self.input_index = columns["input_index"].astype(np.int64)
        self.n = len(self.uid)
        self.vectors = vectors
        self.vector_row = vector_row
        self.has_vector = vector_row >= 0

    def vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of ``rows`` (all with a vector): a view when they are the vectors in order."""
        assert self.vectors is not None  # noqa: S101 - type narrowing; callers pass rows with a vector
        vr = self.vector_row[rows]
        if len(vr) == len(self.vectors) and np.array_equal(vr, np.arange(len(vr))):
            return self.vectors
        return np.asarray(self.vectors[vr])

    def cosine(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = np.full(len(a), np.nan, np.float32)
        if self.vectors is None:
            return out
        both = self.has_vector[a] & self.has_vector[b]
        va = self.vectors[self.vector_row[a[both]]].astype(np.float32)
        vb = self.vectors[self.vector_row[b[both]]].astype(np.float32)
        out[both] = np.einsum("ij,ij->i", va, vb)
        return out


def _scratch_dir(state_path: str) -> Path:
    fs, root = filesystem(state_path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        path = Path(root) / "scratch"
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix="curate-dedup-"))


def _open_phase_table(shards: ShardSource, shard_id: str, columns: list[str]) -> pa.Table:
    """The shard with those of ``columns`` it has (a local shard is memory-mapped: only what is touched is
    read)."""
    table = shards.read(shard_id)
    return table.select([c for c in columns if c in table.column_names])


def _gather(shards: ShardSource, columns: tuple[str, ...], want_vectors: bool, scratch: Path) -> _Rows:
    scalar_cols = [c for c in columns if c not in ("image_embedding", "image", "status", "drop_reason")]
    shard_of: list[np.ndarray] = []
    values: dict[str, list] = {c: [] for c in scalar_cols}
    vector_rows: list[np.ndarray] = []
    dim: int | None = None
    count = 0
    vec_file = scratch / "vectors.f16"
    with open(vec_file, "wb") as sink:
        for shard_id in sorted(shards.ids):
            table = _open_phase_table(shards, shard_id, list(columns))
            table = table.filter(is_kept(table))
            for c in scalar_cols:
                values[c].append(table[c].to_numpy(zero_copy_only=False))
            shard_of.append(np.full(table.num_rows, shard_id, dtype=object))
            if not want_vectors:
                continue
            emb = table["image_embedding"]
            valid = pc.is_valid(emb).to_numpy(zero_copy_only=False)
            flat = pc.list_flatten(emb.filter(pa.array(valid))).to_numpy(zero_copy_only=False)
            m = int(valid.sum())
            if m:
                d = len(flat) // m
                if dim is None:
                    dim = d
                elif d != dim or len(flat) != m * d:
                    raise ValueError(
                        f"shard {shard_id}: image embeddings of dimension {d}, earlier shards {dim}; "
                        "one dedup needs one CLIP model"
                    )
                sink.write(np.ascontiguousarray(flat, np.float16).tobytes())
            vr = np.full(table.num_rows, -1, np.int64)
            vr[valid] = np.arange(count, count + m)
            count += m
            vector_rows.append(vr)
    cols = {c: (np.concatenate(v) if v else np.zeros(0, object)) for c, v in values.items()}
    cols["shard"] = np.concatenate(shard_of) if shard_of else np.zeros(0, object)
    strings = ("uid", "sha256", "phash", "phash_mirror", "shard")
    for c in strings:
        if c in cols:
            cols[c] = cols[c].astype(object)
    for c in cols:
        if c not in (*strings, "input_index"):
            cols[c] = np.asarray(_as_float(cols[c]))
    n = len(cols["uid"])
    vectors = None
    vector_row = np.full(n, -1, np.int64)
    if want_vectors and count:
        vectors = np.memmap(vec_file, dtype=np.float16, mode="r", shape=(count, dim))
        vector_row = np.concatenate(vector_rows)
    return _Rows(cols, vectors, vector_row)


def _as_float(values: np.ndarray) -> np.ndarray:
    """Numbers (with None for nulls) as float64 with NaN."""
    return np.array([np.nan if v is None else float(v) for v in values], np.float64)


# --- pixel check of perceptual pairs ------------------------------------------------------------

_THUMB, _SHIFT = 64, 3


def _thumbnail(data: bytes | None) -> np.ndarray | None:
    """64x64 grey pixels, zero mean; None for bytes that do not decode."""
    import io

    from PIL import Image

    if data is None:
        return None
    try:
        img = Image.open(io.BytesIO(data)).convert("L").resize((_THUMB, _THUMB), Image.Resampling.BOX)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return np.asarray(img, np.float32)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """The best normalised cross-correlation of ``a`` with ``b`` or its mirror, shifted up to 3 px: a crop
    or a mirror of the same picture scores near 1, another picture with the same layout lower."""
    best = -1.0
    n = _THUMB
    for other in (b, b[:, ::-1]):
        for dy in range(-_SHIFT, _SHIFT + 1):
            for dx in range(-_SHIFT, _SHIFT + 1):
                x = a[max(0, dy) : n + min(0, dy), max(0, dx) : n + min(0, dx)]
                y = other[max(0, -dy) : n + min(0, -dy), max(0, -dx) : n + min(0, -dx)]
                x, y = x - x.mean(), y - y.mean()
                den = float(np.sqrt((x * x).sum() * (y * y).sum()))
                if den > 0:
                    best = max(best, float((x * y).sum()) / den)
    return best


def _pixel_similarity(shards: ShardSource, rows: _Rows, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The thumbnails' correlation of each pair (-1 where an image is missing), images read from the
    phase's shards."""
    wanted = np.unique(np.concatenate([a, b]))
    thumbs: dict[int, np.ndarray | None] = {}
    shard = rows.columns["shard"]
    for shard_id in sorted(set(shard[wanted].tolist())):
        mine = wanted[shard[wanted] == shard_id]
        table = _open_phase_table(shards, shard_id, ["input_index", "image"])
        where = {int(i): k for k, i in enumerate(table["input_index"].to_pylist())}
        images = table["image"]
        for r in mine:
            thumbs[int(r)] = _thumbnail(images[where[int(rows.input_index[r])]].as_py())
    out = np.full(len(a), -1.0, np.float32)
    for k, (x, y) in enumerate(zip(a.tolist(), b.tolist(), strict=True)):
        if thumbs[x] is not None and thumbs[y] is not None:
            out[k] = _correlation(thumbs[x], thumbs[y])
    return out


# --- decontamination -------------------------------------------------------------------------------


def _contamination(c: DecontaminateConfig, rows: _Rows) -> dict[int, tuple[str, float]]:
    """Kept rows that match an evaluation item: {row: (evaluation item, similarity)}."""
    ref = _load_eval(c, rows)
    hits: dict[int, tuple[str, float]] = {}
    if ref["sha256"]:
        by_digest = dict(zip(ref["sha256"], ref["names_sha"], strict=True))
        for i, d in enumerate(rows.columns.get("sha256", [])):
            if d is not None and d in by_digest:
                hits[i] = (by_digest[d], 1.0)
    if ref["phash"] is not None and len(ref["phash"]) and "phash" in rows.columns:
        ph = rows.columns["phash"]
        have = np.array([p is not None for p in ph], bool)
        idx = np.flatnonzero(have)
        mine = hex_to_uint64(ph[idx])
        for start in range(0, len(idx), 4096):
            d = hamming(mine[start : start + 4096, None], ref["phash"][None, :])
            best = d.argmin(axis=1)
            close = d[np.arange(len(best)), best] <= c.max_distance
            rows_here = idx[start : start + 4096]
            for k in np.flatnonzero(close):
                b = int(best[k])
                hits.setdefault(int(rows_here[k]), (ref["names_phash"][b], float(1 - d[k, b] / 64)))
    if ref["vectors"] is not None and rows.vectors is not None:
        import faiss

        evals = np.ascontiguousarray(ref["vectors"], np.float32)
        if evals.shape[1] != rows.vectors.shape[1]:
            raise ValueError(
                f"decontaminate: evaluation embeddings have dimension {evals.shape[1]}, the shards' "
                f"{rows.vectors.shape[1]}: embed them with the model that wrote image_embedding"
            )
        index = faiss.IndexFlatIP(evals.shape[1])
        index.add(evals)
        with_vec = np.flatnonzero(rows.has_vector)
        for start in range(0, len(with_vec), 65536):
            chunk = with_vec[start : start + 65536]
            sims, nearest = index.search(np.ascontiguousarray(rows.vectors_of(chunk), np.float32), 1)
            for r, s, e in zip(chunk, sims[:, 0], nearest[:, 0], strict=True):
                if s >= c.threshold and int(r) not in hits:
                    hits[int(r)] = (ref["names_vec"][e], float(s))
    return hits


_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def _load_eval(c: DecontaminateConfig, rows: _Rows) -> dict[str, Any]:
    """The evaluation set as digests, pHashes and embeddings (each may be absent), with item names."""
    import hashlib
    import io

    from PIL import Image

    from curate.kit.hashing import phash

    path = Path(c.path).expanduser()
    out: dict[str, Any] = {
        "sha256": [],
        "names_sha": [],
        "phash": None,
        "names_phash": [],
        "vectors": None,
        "names_vec": [],
    }
    images: list[tuple[str, bytes]] = []
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise ValueError(
                f"decontaminate: {path} holds no image files ({', '.join(sorted(_IMAGE_SUFFIXES))})"
            )
        images = [(str(p.relative_to(path)), p.read_bytes()) for p in files]
    elif path.suffix == ".npy":
        vectors = np.load(path, allow_pickle=False)
        if vectors.ndim != 2:
            raise ValueError(f"decontaminate: {path} holds shape {vectors.shape}, not (items, dimension)")
        out["vectors"] = _normalised(vectors)
        out["names_vec"] = [f"{path.name}[{i}]" for i in range(len(vectors))]
        return out
    elif path.suffix == ".parquet":
        table = pq.read_table(path)
        names = (
            table["uid"].to_pylist()
            if "uid" in table.column_names
            else [f"{path.name}[{i}]" for i in range(table.num_rows)]
        )
        for col in ("image_embedding", "embedding"):
            if col in table.column_names:
                out["vectors"] = _normalised(np.array(table[col].to_pylist(), np.float32))
                out["names_vec"] = names
                break
        if "image" in table.column_names:
            images = [(n, b) for n, b in zip(names, table["image"].to_pylist(), strict=True) if b is not None]
        if "sha256" in table.column_names:
            out["sha256"] += table["sha256"].to_pylist()
            out["names_sha"] += names
        if "phash" in table.column_names:
            out["phash"] = hex_to_uint64(table["phash"].to_pylist())
            out["names_phash"] = names
    else:
        raise ValueError(f"decontaminate: {path} is not a folder of images, a .parquet or a .npy")
    if images:
        out["sha256"] += [hashlib.sha256(b).hexdigest() for _, b in images]
        out["names_sha"] += [n for n, _ in images]
        decoded = [(n, Image.open(io.BytesIO(b)).convert("RGB")) for n, b in images]
        out["phash"] = hex_to_uint64([phash(img) for _, img in decoded])
        out["names_phash"] = [n for n, _ in decoded]
        if out["vectors"] is None and c.model:
            from curate.models.clip import ClipModel

            clip = ClipModel.load(c.model, c.pretrained or "", "auto", "auto", None)
            out["vectors"] = _normalised(
                np.concatenate(
                    [
                        clip.encode_images([clip.preprocess(img) for _, img in decoded[i : i + 64]])
                        for i in range(0, len(decoded), 64)
                    ]
                )
            )
            out["names_vec"] = [n for n, _ in decoded]
    return out


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

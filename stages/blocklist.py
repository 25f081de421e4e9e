"""Drop images whose hash is on a blocklist (CSAM hash lists, takedown lists), and keep no trace of their pixels.

    - stage: download
    - stage: blocklist                 # right after download: no later stage ever sees a blocked image
      sha256: [lists/known.txt]        # one hex digest per line (# comments), or a .parquet with a sha256 column
      phash: [lists/known_phash.txt]   # 16 hex digits per line, or a .parquet with a phash column
      max_distance: 0                  # pHash bits that may differ: 0 = exact; up to 8 (Hamming distance)
      flips: true                      # also match the mirror image's hash (phash_mirror): flipped copies
      md5: [lists/ncmec_md5.txt]       # 32 hex digits per line: md5 of the downloaded bytes
      pdq: [lists/pdq.txt]             # Meta's PDQ, 64 hex digits (download: pdq: true)
      pdq_max_distance: 31             # PDQ bits that may differ (Meta's recommended threshold)

PDQ lists match the row's ``pdq`` (of the original image) within ``pdq_max_distance``; with ``flips`` they
also match its seven rotations and flips (``pdq_dihedral``, PDQ's dihedral hashes, written by the download
stage from the same DCT).

A hash list can only match what has been downloaded: ``sha256`` is of the downloaded bytes and ``phash`` of
the stored image, both written by the download stage, so this stage comes after it (the column check says
so otherwise). Put it directly after download: the blocked bytes then never reach a scoring model, a
captioner, a phase file under ``work/`` or the ``dropped/`` audit thumbnails.

Every row with a matching hash (kept or already dropped) gets ``blocklist_match`` (``sha256:<list>``,
``md5:<list>``, ``phash:<list>``, ``phash_mirror:<list>``, ``pdq:<list>`` or ``pdq_dihedral:<list>``: what
matched, in which list) and ``blocklist_distance``, and its
``image`` bytes are removed; a kept row also gets ``drop_reason = blocklisted``, a row dropped before keeps
its reason. Lists load in ``setup()``, once per worker, and are checked when the config is (a missing file or
a bad line fails the run before any work, naming ``file:line``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from curate.base import StrictModel
from curate.core.schema import Column
from curate.core.stage import Stage, StageResources, drop, set_column
from curate.kit.hash_lists import read_hash_list
from curate.kit.hashing import HashIndex, PdqIndex, hex_to_uint64

REASON = "blocklisted"


class BlocklistConfig(StrictModel):
    sha256: list[str] = Field(
        default_factory=list, description="files of sha256 digests of the downloaded bytes (text or .parquet)"
    )
    phash: list[str] = Field(default_factory=list, description="files of 64-bit pHashes, 16 hex digits")
    md5: list[str] = Field(default_factory=list, description="files of md5 digests of the downloaded bytes")
    pdq: list[str] = Field(default_factory=list, description="files of PDQ hashes, 64 hex digits")
    max_distance: int = Field(0, ge=0, le=8, description="pHash bits that may differ; 0 = exact")
    pdq_max_distance: int = Field(
        31, ge=0, le=64, description="PDQ bits that may differ (Meta recommends 31)"
    )
    flips: bool = Field(True, description="also match phash_mirror and PDQ's dihedral hashes: flipped copies")

    @field_validator("sha256", "phash", "md5", "pdq")
    @classmethod
    def _readable(cls, paths: list[str], info) -> list[str]:
        for path in paths:
            read_hash_list(path, info.field_name)  # a missing file or bad line fails now, with file:line
        return paths

    @model_validator(mode="after")
    def _some_list(self) -> BlocklistConfig:
        if not (self.sha256 or self.phash or self.md5 or self.pdq):
            raise ValueError("give at least one list: sha256, md5, phash and/or pdq: [paths]")
        return self


class Blocklist(Stage):
    """Drops rows whose sha256, md5, pHash or PDQ is on a list, as ``blocklisted``, and removes their image
    bytes."""

    name = "blocklist"
    Config = BlocklistConfig
    columns = (
        Column(
            "blocklist_match",
            pa.string(),
            "blocklist",
            "what matched a blocklist, and which: sha256:<list>, md5:<list>, phash:<list>, "
            "phash_mirror:<list>, pdq:<list> or pdq_dihedral:<list>; null if none",
        ),
        Column(
            "blocklist_distance",
            pa.int32(),
            "blocklist",
            "pHash or PDQ bits off the listed hash (0 for digests)",
        ),
    )
    writes = ("drop_reason", "image", "blocklist_match", "blocklist_distance")
    resources = StageResources(cpus=1)

    config: BlocklistConfig

    @property
    def reads(self) -> tuple[str, ...]:
        c = self.config
        cols = ["status"] + (["sha256"] if c.sha256 else []) + (["md5"] if c.md5 else [])
        cols += (["phash"] if c.phash else []) + (["phash_mirror"] if c.phash and c.flips else [])
        return tuple(cols + (["pdq"] if c.pdq else []) + (["pdq_dihedral"] if c.pdq and c.flips else []))

    def setup(self) -> None:
        self._digests: dict[str, dict[str, str]] = {"sha256": {}, "md5": {}}
        for kind, digests in self._digests.items():
            for path in getattr(self.config, kind):
                for d in read_hash_list(path, kind):
                    digests.setdefault(d, path)  # the first list that names a digest is the one reported
        pdqs, self._pdq_source = [], []
        for path in self.config.pdq:
            listed = read_hash_list(path, "pdq")
            pdqs += listed
            self._pdq_source += [path] * len(listed)
        self._pdqs = PdqIndex(pdqs, self.config.pdq_max_distance)
        hashes, sources = [], []
        for path in self.config.phash:
            listed = read_hash_list(path, "phash")
            hashes += listed
            sources += [path] * len(listed)
        self._phash_source = sources
        self._phashes = HashIndex(hex_to_uint64(hashes), self.config.max_distance)

    def __call__(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        match: list[str | None] = [None] * n
        distance = np.full(n, -1, np.int32)
        ok = pc.fill_null(pc.equal(table["status"], "ok"), False)
        for kind, listed_digests in self._digests.items():
            if not listed_digests:
                continue
            listed = pc.and_(ok, pc.is_in(table[kind], value_set=pa.array(list(listed_digests), pa.string())))
            digests = table[kind].to_pylist()
            for i in np.flatnonzero(pc.fill_null(listed, False).to_numpy(zero_copy_only=False)):
                if match[i] is None:
                    match[i], distance[i] = f"{kind}:{listed_digests[digests[i]]}", 0
        if len(self._phashes):
            columns = ["phash"] + (["phash_mirror"] if self.config.flips else [])
            for column in columns:
                values = table[column]
                rows = np.flatnonzero(pc.and_(ok, pc.is_valid(values)).to_numpy(zero_copy_only=False))
                if not len(rows):
                    continue
                found, dist = self._phashes.nearest(hex_to_uint64(values.take(rows).to_pylist()))
                for r, f, d in zip(rows, found, dist, strict=True):
                    # sha256 first; between the two pHashes the closer one (the plain hash on a tie)
                    if f >= 0 and (match[r] is None or (distance[r] > d and match[r].startswith("phash"))):
                        match[r], distance[r] = f"{column}:{self._phash_source[f]}", d
        if len(self._pdqs):
            self._match_pdq(table, ok, match, distance)
        hit = pa.array([m is not None for m in match], pa.bool_())
        table = drop(table, hit, REASON)
        if "image" in table.column_names:
            image = pc.if_else(hit, pa.scalar(None, table.schema.field("image").type), table["image"])
            table = set_column(table, "image", image)
        table = set_column(table, "blocklist_match", match)
        distances = pa.array(np.where(distance >= 0, distance, 0), pa.int32(), mask=distance < 0)
        return set_column(table, "blocklist_distance", distances)

    def _match_pdq(self, table: pa.Table, ok: pa.ChunkedArray, match: list, distance: np.ndarray) -> None:
        """PDQ of the original within pdq_max_distance; then, with flips, its dihedral hashes for rows
        nothing matched yet."""
        values = table["pdq"]
        rows = np.flatnonzero(pc.and_(ok, pc.is_valid(values)).to_numpy(zero_copy_only=False))
        if len(rows):
            found, dist = self._pdqs.nearest(values.take(rows).to_pylist())
            for r, f, d in zip(rows, found, dist, strict=True):
                if f >= 0 and match[r] is None:
                    match[r], distance[r] = f"pdq:{self._pdq_source[f]}", d
        if not self.config.flips:
            return
        variants = table["pdq_dihedral"]
        for r in np.flatnonzero(pc.and_(ok, pc.is_valid(variants)).to_numpy(zero_copy_only=False)):
            if match[r] is not None:
                continue
            found, dist = self._pdqs.nearest(variants[int(r)].as_py())
            best = int(np.argmin(np.where(found >= 0, dist, 999)))
            if found[best] >= 0:
                match[r], distance[r] = f"pdq_dihedral:{self._pdq_source[found[best]]}", dist[best]

"""Training data: the WebDataset shards of curate runs, filtered at load time, split across ranks and workers.

Every sample is a ``<uid>.{jpg,png,webp}`` + ``<uid>.json`` + ``<uid>.txt`` group of a shard tar, read with
webdataset's own tar iterators over fsspec streams (local paths, s3://, gs://). Only images, text and json are
decoded: members of any other kind (``.pth``, ``.pickle``, ...) are skipped, never unpickled.

**Splitting.** Each rank runs ``workers`` DataLoader workers; together they are ``world * workers`` slots.
With at least as many shards as slots, each slot reads its own shards (shuffled per epoch, the same order on
every rank); with fewer, every slot reads every shard and keeps sample ``i`` when ``i % slots == slot``. Either
way no sample is seen twice in an epoch across ranks and workers.

**Filtering.** ``data.rules`` are the filter stage's rules (``clip_score >= 0.3``), evaluated on each sample's
json; ``min_size`` reads its ``width``/``height``; ``holdout`` keeps a share of uids (by hash) out of training
for FID/KID.

**Position.** Each worker is an endless, deterministic stream of batches (epoch after epoch, shuffled with
``(seed, epoch, slot)``). Every batch says which worker made it and its number in that worker's stream, so a
checkpoint records, per worker, how many batches were consumed; on resume each worker skips that many
batches without decoding their images, and training continues on exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import operator
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curate.base import TrainDataError
from curate.core.output import STATS_SUFFIX, OutputFolder
from curate.core.storage import filesystem
from curate.kit.rules import Rule, parse_rule
from curate.train.config import DataConfig

__all__ = [
    "IMAGE_EXTENSIONS",
    "Sample",
    "ShardStream",
    "caption_of",
    "find_shards",
    "holdout_samples",
    "in_holdout",
    "iter_samples",
    "passes",
    "run_roots",
]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SAFE_EXTENSIONS = (*IMAGE_EXTENSIONS, "json", "txt")
_COMPARE = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}


def find_shards(sources: list[str]) -> list[str]:
    """The shard tars of each source, in order: a run's finished shards (``shards/<id>.tar`` whose
    ``<id>_stats.json``, written last, exists), the tars in a folder, a glob, or one tar."""
    out: list[str] = []
    for source in sources:
        fs, root = filesystem(source)
        protocol = source.split("://", 1)[0] + "://" if "://" in source else ""
        if fs.isfile(root):
            if not root.endswith(".tar"):
                raise TrainDataError(f"{source} is a file but not a .tar shard")
            found = [root]
        elif fs.isdir(root):
            # A curate run's shards: only the finished ones (the stats file is written last), never a tar a
            # killed writer left; a folder of shards with their stats files (a run's shards/): the same; a
            # plain folder of tars: all of them.
            run = OutputFolder(source)
            if run.is_run():
                found = [run.shard_tar(shard) for shard in run.finished_shards()]
            else:
                stats = fs.glob(f"{root}/*{STATS_SUFFIX}")
                found = [s[: -len(STATS_SUFFIX)] + ".tar" for s in stats] or fs.glob(f"{root}/*.tar")
        else:
            found = fs.glob(root)
        found = sorted(p for p in found if p.endswith(".tar"))
        if not found:
            raise TrainDataError(f"{source}: no shards (.tar) found")
        out += [protocol + p if protocol and not p.startswith(protocol) else p for p in found]
    return out


def run_roots(sources: list[str]) -> list[str]:
    """The sources that are curate run folders (they hold run.json)."""
    roots = []
    for source in sources:
        fs, root = filesystem(source)
        if fs.isdir(root) and OutputFolder(source).is_run():
            roots.append(source)
    return roots


@dataclass
class Sample:
    """One sample as read from a shard: its uid, image bytes and extension, json and txt."""

    uid: str
    image: bytes | None
    ext: str | None
    meta: dict[str, Any]
    txt: str | None
    index: int = 0  # position in its read order (for sample-level splitting)
    neighbours: Any = field(default=None, repr=False)
    shard: str = ""


def iter_samples(shard: str) -> Iterator[Sample]:
    """The samples of one shard tar, with webdataset's tar iterators over an fsspec stream."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    fs, path = filesystem(shard)
    try:
        with fs.open(path, "rb") as f:  # tar_file_iterator opens the tar stream itself
            wanted = lambda name: name.rsplit(".", 1)[-1].lower() in SAFE_EXTENSIONS  # noqa: E731
            files = ({**m, "__url__": shard} for m in tar_file_iterator(f, select_files=wanted))
            for group in group_by_keys(files):
                yield _sample(shard, group)
    except TrainDataError:
        raise
    except _SHARD_ERRORS as e:  # not a tar, cut short, a corrupt compressed tar, a duplicate member name
        raise TrainDataError(f"{shard}: not a readable shard: {type(e).__name__}: {e}") from e


# What a corrupt or truncated shard raises from tarfile, webdataset and the decompressors. TypeError: Python
# 3.11's tarfile stream mode fails so on a gzip header cut inside its extra field (CPython gh-107398).
_SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError, TypeError, zlib.error, lzma.LZMAError)


def _sample(shard: str, group: dict[str, Any]) -> Sample:
    key = group["__key__"]
    ext = next((e for e in IMAGE_EXTENSIONS if e in group), None)
    try:
        meta = json.loads(group["json"]) if "json" in group else {}
    except ValueError as e:  # not JSON, or not UTF-8
        raise TrainDataError(f"{shard}: {key}.json is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise TrainDataError(f"{shard}: {key}.json is a JSON {type(meta).__name__}, not an object")
    txt = group["txt"].decode("utf-8", "replace") if "txt" in group else None
    uid = str(meta.get("uid") or key.rsplit("/", 1)[-1])
    return Sample(uid, group[ext] if ext else None, ext, meta, txt, shard=shard)


def in_holdout(uid: str, share: float) -> bool:
    """Whether a uid belongs to the held-out share (the same answer on every rank, run and machine)."""
    if share <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(f"holdout:{uid}".encode()).digest()[:8], "big")
    return h / 2**64 < share


def passes(meta: dict[str, Any], rules: list[Rule], missing: str, min_size: int) -> bool:
    """Whether a sample's json passes the load-time filters."""
    for rule in rules:
        value = meta.get(rule.column)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            if missing == "drop":
                return False
            continue
        try:
            if not _COMPARE[rule.op](value, rule.value):
                return False
        except TypeError:  # a string compared with a number: the sample does not qualify
            return False
    if min_size:
        w, h = meta.get("width"), meta.get("height")
        if not isinstance(w, int) or not isinstance(h, int) or min(w, h) < min_size:
            return False
    return True


def caption_of(sample: Sample, choice: str) -> str:
    """The training caption: the chosen one, else the shard's txt, else the json caption. Always a str: a
    json value that is no string (a number, a list) counts as missing."""
    key = {"alt": "caption", "vlm": "caption_vlm", "fused": "caption_fused"}.get(choice)
    text = sample.meta.get(key) if key else None
    if not text or not isinstance(text, str):
        text = sample.txt if sample.txt is not None else sample.meta.get("caption")
    return text if isinstance(text, str) else ""


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def to_pixels(
    data: bytes, resolution: int, crop: str, flip: bool, rng: np.random.Generator, name: str = "image"
) -> np.ndarray:
    """Decode, resize the shorter side to ``resolution``, crop a square; [3, r, r] float32 in [-1, 1].

    Bytes that do not decode raise :class:`TrainDataError` naming ``name`` (the sample's member)."""
    from PIL import Image

    from curate.kit.image_batches import decode_rgb

    try:
        img = decode_rgb(data)
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, Image.DecompressionBombError) as e:
        # Pillow's errors for a corrupt image include SyntaxError ("broken PNG file") and, from its TIFF
        # plugin (Pillow 13), TypeError: say what it is. (A .png member may hold any format Pillow reads.)
        raise TrainDataError(f"{name}: not a decodable image: {type(e).__name__}: {e}") from e
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=None)
    if crop == "random":
        left, top = int(rng.integers(nw - resolution + 1)), int(rng.integers(nh - resolution + 1))
    else:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    x = np.asarray(img, np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    if flip and rng.random() < 0.5:
        x = x[:, :, ::-1]
    return np.ascontiguousarray(x)


class ShardStream:
    """An endless stream of batches for one rank (a ``torch.utils.data.IterableDataset`` via :meth:`dataset`).

    ``neighbours`` (a :mod:`curate.train.retrieval` table) maps a uid to its retrieved neighbours; samples
    without an entry are skipped when it is given. ``consumed`` maps a worker id to the batches of its stream already trained on."""

    def __init__(
        self,
        shards: list[str],
        cfg: DataConfig,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        consumed: dict[int, int] | None = None,
        neighbours: Any | None = None,
        cache: Any | None = None,
    ):
        if not shards:
            raise TrainDataError("no shards to train on")
        self.shards = list(shards)
        self.cfg = cfg
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world = rank, world
        self.consumed = dict(consumed or {})
        self.neighbours = neighbours
        self.cache = cache  # a curate.train.cache.ShardCache: encoded captions (and latents) instead
        self.rules = [parse_rule(r) for r in cfg.rules]

    # -- the stream of one slot -------------------------------------------------------------------------

    def slot_samples(self, epoch: int, slot: int, slots: int) -> Iterator[Sample]:
        """The filtered, shuffled samples of one slot for one epoch (images not decoded)."""
        order = np.random.default_rng(_seed(self.seed, "shards", epoch)).permutation(len(self.shards))
        if len(self.shards) >= slots:
            mine, every = [self.shards[i] for i in order[slot::slots]], False
        else:
            mine, every = [self.shards[i] for i in order], True
        raw = self._filtered(mine, slot if every else None, slots)
        yield from self._shuffled(raw, np.random.default_rng(_seed(self.seed, "buffer", epoch, slot)))

    def _filtered(self, shards: list[str], slot: int | None, slots: int) -> Iterator[Sample]:
        i = 0
        for shard in shards:
            for s in iter_samples(shard):
                if s.image is None:
                    continue
                keep = slot is None or i % slots == slot
                i += 1
                if not keep or in_holdout(s.uid, self.cfg.holdout):
                    continue
                if not passes(s.meta, self.rules, self.cfg.missing, self.cfg.min_size):
                    continue
                if self.neighbours is not None:
                    s.neighbours = self.neighbours.get(s.uid)
                    if s.neighbours is None:
                        continue
                yield s

    def _shuffled(self, samples: Iterator[Sample], rng: np.random.Generator) -> Iterator[Sample]:
        size = self.cfg.shuffle_buffer
        if size <= 1:
            yield from samples
            return
        buf: list[Sample] = []
        for s in samples:
            if len(buf) < size:
                buf.append(s)
                continue
            j = int(rng.integers(size))
            buf[j], s = s, buf[j]
            yield s
        rng.shuffle(buf)
        yield from buf

    def worker_batches(self, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        """Worker ``worker`` of this rank: endless batches, the first ``consumed[worker]`` skipped undecoded."""
        slot, slots = self.rank * workers + worker, self.world * workers
        skip = self.consumed.get(worker, 0)
        number, epoch, empty_epochs = 0, 0, 0
        while True:
            batch: list[Sample] = []
            produced = 0
            for s in self.slot_samples(epoch, slot, slots):
                batch.append(s)
                if len(batch) == self.batch_size:
                    produced += 1
                    if number >= skip:
                        yield self._collate(batch, worker, number, epoch)
                    number += 1
                    batch = []
            if batch:  # the epoch's last, partial batch
                produced += 1
                if number >= skip:
                    yield self._collate(batch, worker, number, epoch)
                number += 1
            empty_epochs = empty_epochs + 1 if produced == 0 else 0
            if empty_epochs:
                raise TrainDataError(
                    f"rank {self.rank} worker {worker}: no sample passed the filters in epoch {epoch} "
                    f"({len(self.shards)} shards, rules {self.cfg.rules or 'none'}, holdout {self.cfg.holdout})"
                )
            epoch += 1

    def _collate(self, batch: list[Sample], worker: int, number: int, epoch: int) -> dict[str, Any]:
        import torch

        cached = self.cache.batch(batch) if self.cache is not None else {}
        if "cached_mean" in cached:  # the latents' distribution: no image to decode
            pixels = [np.zeros(0, np.float32)] * len(batch)
        else:
            pixels = [
                to_pixels(
                    s.image,
                    self.cfg.resolution,
                    self.cfg.crop,
                    self.cfg.flip,
                    np.random.default_rng(_seed(self.seed, "augment", epoch, s.uid)),
                    name=f"{s.uid}.{s.ext}",
                )
                for s in batch
            ]
        out: dict[str, Any] = {
            **cached,
            "pixels": torch.from_numpy(np.stack(pixels)),
            "captions": [caption_of(s, self.cfg.caption) for s in batch],
            "uids": [s.uid for s in batch],
            "worker": worker,
            "number": number,
            "epoch": epoch,
        }
        if self.neighbours is not None:  # embeddings, or images and captions (curate.train.retrieval)
            out.update(self.neighbours.collate([s.neighbours for s in batch]))
        return out

    def dataset(self):
        """This stream as a torch IterableDataset (one stream per DataLoader worker)."""
        import torch

        stream = self

        class _Dataset(torch.utils.data.IterableDataset):
            def __iter__(self):
                info = torch.utils.data.get_worker_info()
                worker, workers = (info.id, info.num_workers) if info else (0, 1)
                return stream.worker_batches(worker, workers)

        return _Dataset()

    def loader(self):
        """A DataLoader over :meth:`dataset`: batches come from workers 0, 1, ... in turn."""
        import torch

        workers = self.cfg.workers
        return torch.utils.data.DataLoader(
            self.dataset(),
            batch_size=None,
            num_workers=workers,
            persistent_workers=False,
            prefetch_factor=2 if workers else None,
        )


def holdout_samples(shards: list[str], cfg: DataConfig, n: int) -> list[tuple[np.ndarray, str, str]]:
    """Up to ``n`` held-out samples that pass the filters: ``(pixels uint8 [r, r, 3], caption, uid)``."""
    rules = [parse_rule(r) for r in cfg.rules]
    out = []
    for shard in shards:
        for s in iter_samples(shard):
            if s.image is None or not in_holdout(s.uid, cfg.holdout):
                continue
            if not passes(s.meta, rules, cfg.missing, cfg.min_size):
                continue
            x = to_pixels(
                s.image, cfg.resolution, "center", False, np.random.default_rng(0), name=f"{s.uid}.{s.ext}"
            )
            img = np.clip((x.transpose(1, 2, 0) + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
            out.append((img, caption_of(s, cfg.caption), s.uid))
            if len(out) >= n:
                return out
    return out

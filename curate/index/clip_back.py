"""clip-retrieval's back-end protocol over a curate index, so that code written for clip-retrieval's back end
(its ``ClipClient``, its front end, scripts that once pointed at the public LAION kNN service) works against
``curate index serve`` unchanged.

What is answered, as ``clip_retrieval/clip_back.py`` (clip-retrieval 2.45) reads and answers it:

- ``POST /knn-service`` with a JSON body (any Content-Type): one of ``text``, ``image`` (base64 of the encoded
  image), ``image_url`` or ``embedding_input`` (a vector, used as given), tried in that order (an empty text
  counts as none); ``modality`` (``image``: the index holds image embeddings; ``text`` asks for an index of
  caption embeddings, which a curate index does not hold: an error), ``num_images``, ``num_result_ids``
  (default ``num_images``), ``indice_name`` (default: the one index), ``deduplicate`` (default false: drop a
  result whose stored embedding is within cosine 0.94 of a better one, as clip-back does). The answer is a list,
  best first, of ``{"id", "similarity", <columns>}`` for the first ``num_images`` results and
  ``{"id", "similarity"}`` for the rest of the ``num_result_ids`` (the front end asks ``/metadata`` for them).
  ``use_mclip``, ``use_safety_model``, ``use_violence_detector``, ``aesthetic_score`` and ``aesthetic_weight``
  are accepted and have no effect, as in a clip-back started without those models (``provide_safety_model``,
  ``provide_violence_detector``, ``provide_aesthetic_embeddings`` off; ``use_mclip`` then uses the index's
  CLIP): the index holds what the run kept, after its own safety and aesthetic filters.
- ``POST /metadata`` with ``{"ids": [...], "indice_name": ...}``: ``[{"id", "metadata": {<columns>}}]``.
- ``GET /indices-list``: the index's name, in a list.

``<columns>`` are clip-back's ``columns_to_return``: by default ``url`` and ``caption``; ``image`` adds the
sample's image from its shard tar as base64 JPEG (clip-back's ``image_path`` column); curate's own ``uid``,
``clip_score``, ``shard``, ``source``, ``caption_vlm`` and ``caption_fused`` may be asked for too. ``image_url``
is fetched only through curate's SSRF-guarded fetcher (:mod:`curate.kit.net`): no private, loopback or
link-local address, bounded in time and bytes. Errors are HTTP 400 with ``{"error": ...}`` (clip-back answers
a bad request with a 500 page).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from curate.base import RetrievalIndexError
from curate.index.factory import load_faiss
from curate.index.query import Retriever
from curate.index.runs import EXTRA_CAPTIONS

__all__ = [
    "COLUMNS",
    "DEDUP_THRESHOLD",
    "DEFAULT_COLUMNS",
    "MAX_RESULTS",
    "ClipBackend",
    "KnnRequest",
    "duplicates",
    "parse_knn_request",
]

DEFAULT_COLUMNS = ("url", "caption")
COLUMNS = ("url", "caption", "image", "uid", "clip_score", "shard", "source", *EXTRA_CAPTIONS)
DEDUP_THRESHOLD = 0.94  # clip-back's get_non_uniques: cosine above this is one image
MAX_RESULTS = 10_000  # num_images and num_result_ids above this are refused, not left to FAISS
MAX_IMAGE = 20 << 20  # bytes of a query image (base64-decoded or fetched)


@dataclass
class KnnRequest:
    """One ``/knn-service`` request, checked. Exactly one of text, image, image_url, embedding is set."""

    text: str | None = None
    image: bytes | None = None
    image_url: str | None = None
    embedding: np.ndarray | None = None
    modality: str = "image"
    num_images: int = 100
    num_result_ids: int = 100
    indice_name: str | None = None
    deduplicate: bool = False


def _count(data: dict[str, Any], key: str, default: int) -> int:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise RetrievalIndexError(f"{key} must be a whole number, not {value!r}")
    try:
        n = int(value)
    except ValueError:
        raise RetrievalIndexError(f"{key} must be a whole number, not {value!r}") from None
    if not 0 <= n <= MAX_RESULTS:
        raise RetrievalIndexError(f"{key} must be between 0 and {MAX_RESULTS}, not {n}")
    return n


def parse_knn_request(data: Any) -> KnnRequest:
    """A ``/knn-service`` JSON body -> a :class:`KnnRequest`; RetrievalIndexError says what is wrong."""
    if not isinstance(data, dict):
        raise RetrievalIndexError("the body must be a JSON object (clip-retrieval's knn request)")
    req = KnnRequest()
    text, image, url, emb = (data.get(k) for k in ("text", "image", "image_url", "embedding_input"))
    if text is not None and text != "":
        if not isinstance(text, str):
            raise RetrievalIndexError("text must be a string")
        req.text = text
    elif image is not None or url is not None:
        if image is not None:
            if not isinstance(image, str):
                raise RetrievalIndexError("image must be the base64 of an encoded image")
            if len(image) > MAX_IMAGE * 4 // 3 + 4:
                raise RetrievalIndexError(f"image is over {MAX_IMAGE >> 20} MiB")
            try:
                req.image = base64.b64decode(image, validate=False)
            except ValueError as e:
                raise RetrievalIndexError(f"image is not base64: {e}") from None
        else:
            if not isinstance(url, str) or not url.strip():
                raise RetrievalIndexError("image_url must be a URL")
            req.image_url = url.strip()
    elif emb is not None:
        try:
            vector = np.asarray(emb, dtype=np.float32)
        except (TypeError, ValueError):
            raise RetrievalIndexError("embedding_input must be a list of numbers") from None
        if vector.ndim != 1 or not vector.size or not np.isfinite(vector).all():
            raise RetrievalIndexError("embedding_input must be a flat list of finite numbers")
        req.embedding = vector
    else:
        raise RetrievalIndexError("give one of text, image, image_url or embedding_input")
    modality = data.get("modality") or "image"
    if modality not in ("image", "text"):
        raise RetrievalIndexError(f"modality must be 'image' or 'text', not {modality!r}")
    req.modality = modality
    req.num_images = _count(data, "num_images", 100)
    req.num_result_ids = _count(data, "num_result_ids", req.num_images)
    name = data.get("indice_name")
    if name is not None and not isinstance(name, str):
        raise RetrievalIndexError("indice_name must be a string")
    req.indice_name = name
    req.deduplicate = bool(data.get("deduplicate", False))
    for key in ("aesthetic_score", "aesthetic_weight"):  # parsed as clip-back parses them, then unused
        value = data.get(key, "")
        if value not in ("", None):
            try:
                float(value)
            except (TypeError, ValueError):
                raise RetrievalIndexError(f"{key} must be a number, not {value!r}") from None
    return req


class ClipBackend:
    """Answers clip-retrieval's back-end requests from a :class:`Retriever`.

    ``fetch_image(url) -> bytes`` fetches an ``image_url`` (raising RetrievalIndexError when it cannot); the
    server passes one built on :class:`curate.kit.net.Fetcher`. Without it, ``image_url`` is refused."""

    def __init__(
        self,
        retriever: Retriever,
        name: str = "curate",
        columns: Sequence[str] = DEFAULT_COLUMNS,
        fetch_image: Any | None = None,
    ):
        unknown = [c for c in columns if c not in COLUMNS]
        if unknown:
            raise RetrievalIndexError(
                f"unknown column(s) {', '.join(unknown)}: the columns to return are {', '.join(COLUMNS)}"
            )
        self.retriever = retriever
        self.name = name
        self.columns = tuple(dict.fromkeys(columns))
        self.fetch_image = fetch_image

    def indices(self) -> list[str]:
        return [self.name]

    def _check_name(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise RetrievalIndexError(f"no index named {name!r}: this server has {self.indices()}")

    def query_vector(self, req: KnnRequest) -> np.ndarray:
        """The query's unit vector (an ``embedding_input`` as given, as clip-back uses it)."""
        r = self.retriever
        if req.text is not None:
            return r.embed_text(req.text)
        if req.image is not None:
            return r.embed_image(req.image)
        if req.image_url is not None:
            if self.fetch_image is None:
                raise RetrievalIndexError("this server does not fetch image_url")
            return r.embed_image(self.fetch_image(req.image_url))
        assert req.embedding is not None  # noqa: S101 - parse_knn_request sets one of the four
        if req.embedding.shape[0] != r.info["dimension"]:
            raise RetrievalIndexError(
                f"embedding_input has {req.embedding.shape[0]} numbers: the index holds {r.info['dimension']}"
            )
        return req.embedding

    def knn(self, req: KnnRequest) -> list[dict[str, Any]]:
        """The answer to ``/knn-service``."""
        self._check_name(req.indice_name)
        if req.modality == "text":
            raise RetrievalIndexError(
                "modality 'text' searches caption embeddings, which a curate index does not hold: "
                "use modality 'image' (the default of ClipClient)"
            )
        if req.num_result_ids == 0:
            return []
        found = self.retriever.search_embedding(self.query_vector(req), req.num_result_ids)
        if req.deduplicate and len(found) > 1:
            gone = duplicates(np.stack([self.retriever.embedding(n.id) for n in found]))
            found = [n for i, n in enumerate(found) if i not in gone]
        out = []
        for i, n in enumerate(found):
            row = self.row(n.id) if i < req.num_images else {}
            out.append({**row, "id": n.id, "similarity": n.score})
        return out

    def metadata(self, data: Any) -> list[dict[str, Any]]:
        """The answer to ``/metadata``: ``{"ids": [...], "indice_name": ...}``."""
        if not isinstance(data, dict) or not isinstance(data.get("ids"), list):
            raise RetrievalIndexError('the body must be {"ids": [...], "indice_name": ...}')
        ids = data["ids"]
        if not ids:
            return []
        self._check_name(data.get("indice_name"))
        if len(ids) > MAX_RESULTS:
            raise RetrievalIndexError(f"at most {MAX_RESULTS} ids at once")
        n = len(self.retriever)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                raise RetrievalIndexError(f"no id {i!r} in the index (ids are 0..{n - 1})")
        return [{"id": i, "metadata": self.row(i)} for i in ids]

    def row(self, id: int) -> dict[str, Any]:
        """The columns to return of the sample with this id."""
        nb = self.retriever.neighbor(id)
        values: dict[str, Any] = {
            "url": nb.url,
            "caption": nb.caption,
            "uid": nb.uid,
            "clip_score": nb.clip_score,
            "shard": nb.shard,
            "source": nb.source,
            **nb.captions,
        }
        out: dict[str, Any] = {}
        for c in self.columns:
            if c == "image":
                try:
                    data, ext = self.retriever.image_file(nb.uid)
                except (KeyError, RetrievalIndexError):
                    continue  # clip-back leaves image out when the file is gone
                out["image"] = base64.b64encode(_jpeg(data, ext)).decode("ascii")
            elif c in values:
                v = values[c]
                out[c] = None if isinstance(v, float) and not math.isfinite(v) else v
        return out


def duplicates(embeddings: np.ndarray, threshold: float = DEDUP_THRESHOLD) -> set[int]:
    """Positions to drop from a ranked list, as clip-back's ``connected_components_dedup``: results whose
    embeddings are linked by cosine above ``threshold`` (through any chain) form one group, of which only the
    best-ranked stays."""
    faiss = load_faiss()
    x = np.ascontiguousarray(embeddings, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, _, ids = index.range_search(x, threshold)
    parent = list(range(len(x)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(x)):
        for j in ids[lims[i] : lims[i + 1]]:
            a, b = root(i), root(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)  # the root is the best-ranked member
    return {i for i in range(len(x)) if root(i) != i}


def _jpeg(data: bytes, ext: str) -> bytes:
    """The image as JPEG (clip-back re-encodes every returned image as JPEG; curate's JPEGs go as stored)."""
    if ext in ("jpg", "jpeg"):
        return data
    from PIL import Image

    from curate.kit.imaging import to_rgb

    with Image.open(io.BytesIO(data)) as img:
        out = io.BytesIO()
        to_rgb(img).save(out, format="JPEG", quality=90)
    return out.getvalue()

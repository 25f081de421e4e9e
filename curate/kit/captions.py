"""Captions as text: cleaning what a VLM or LLM wrote, and choosing the caption a sample trains on.

Cleaning is plain string work, kept apart from the models so that it is tested with exact strings:

- :func:`clean_vlm_caption`: what a captioner wrote, without the prompt it may repeat (BLIP continues its
  prompt, "a picture of ..."), as one line.
- :func:`clean_fused_caption`: what the fusion LLM wrote, reduced to the caption: the prompt if it was
  repeated in front, chat preambles ("Sure! Here is the merged caption:"), labels ("Caption:"), quotes and
  every paragraph after the first are removed, and it is cut to a length. It says why it is unusable when
  it is: empty, too short, or an echo of the instruction.

Choosing the training caption (``output.train_caption``) happens when a shard is written: the chosen caption
goes into ``<uid>.txt`` while every caption stays in ``<uid>.json`` and the parquet sidecar.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

__all__ = [
    "CAPTION_COLUMNS",
    "FALLBACK_ORDER",
    "TrainCaption",
    "clean_fused_caption",
    "clean_vlm_caption",
    "cut_to_length",
    "instruction_fragments",
    "mix_choice",
    "one_line",
]

# train_caption's names for the caption columns.
CAPTION_COLUMNS: dict[str, str] = {"fused": "caption_fused", "vlm": "caption_vlm", "alt": "caption"}
# When the chosen caption is missing or blank: the first of these that the row has.
FALLBACK_ORDER: tuple[str, ...] = ("fused", "vlm", "alt")

_WS = re.compile(r"\s+")
_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
# Chat preambles: "Sure! Here is the merged caption:", "Okay.", "Here's a caption that combines both:".
_PREAMBLE = re.compile(
    r"^(?:(?:sure|okay|ok|certainly|of course)\b[\s,!.:]*)?"
    r"(?:here(?:'s| is| are)\b[^:\n]{0,80}:\s*)?",
    re.IGNORECASE,
)
# Labels in front of the answer: "Caption:", "Merged caption:", "Final description -".
_LABEL = re.compile(
    r"^(?:the\s+)?(?:(?:merged|fused|final|new|combined|refined|consolidated|rewritten|improved|output)\s+)?"
    r"(?:caption|sentence|description|answer|text)\s*[:\-]\s*",
    re.IGNORECASE,
)
_QUOTES = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("**", "**"), ("`", "`"))


def one_line(text: str) -> str:
    """White space runs (newlines too) folded to one space, stripped."""
    return _WS.sub(" ", text).strip()


def _unquote(text: str) -> str:
    changed = True
    while changed and len(text) >= 2:
        changed = False
        for left, right in _QUOTES:
            if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right):
                inner = text[len(left) : -len(right)]
                if left not in inner and right not in inner:  # '"a" and "b"' stays as it is
                    text, changed = inner.strip(), True
    return text


def cut_to_length(text: str, max_chars: int) -> str:
    """``text`` shortened to at most ``max_chars``: at the last sentence end that keeps at least half,
    else at the last word boundary; trailing ``,;:-`` removed. Text that fits is returned as it is."""
    if len(text) <= max_chars:
        return text
    head = text[: max_chars + 1]
    ends = [m.end() for m in _SENTENCE_END.finditer(head) if m.end() <= max_chars]
    if ends and ends[-1] >= max_chars // 2:
        return head[: ends[-1]].strip()
    space = head.rfind(" ")
    cut = head[:space] if space > 0 else text[:max_chars]
    return cut.rstrip(" ,;:-\u2013\u2014")


def clean_vlm_caption(text: str | None, prompt: str | None = None, max_chars: int = 1000) -> str:
    """A captioner's output as one line, without the ``prompt`` it repeated in front (case-insensitive),
    cut to ``max_chars``. Empty when nothing is left."""
    text = one_line(text or "")
    if prompt:
        p = one_line(prompt)
        if p and text.lower().startswith(p.lower()):
            text = text[len(p) :].lstrip(" :,-")
    return cut_to_length(text, max_chars)


def instruction_fragments(*templates: str, min_words: int = 4) -> list[str]:
    """The literal text of prompt templates, as lower-case sentences of at least ``min_words`` words, plus
    the labels in front of each ``{alt}`` / ``{vlm}`` placeholder ("Alt-text:"): what an echo repeats."""
    out: list[str] = []
    for template in templates:
        for line in template.splitlines():
            for placeholder in ("{alt}", "{vlm}"):
                if placeholder in line:
                    label = one_line(line.split(placeholder)[0]).lower()
                    if len(label) >= 3:
                        out.append(label)
        literal = re.sub(r"\{(alt|vlm)\}", "\n", template)
        for part in re.split(r"(?<=[.!?:])\s+|\n", literal):
            part = one_line(part).lower()
            if len(part.split()) >= min_words:
                out.append(part)
    return sorted(set(out), key=lambda s: (-len(s), s))


def clean_fused_caption(
    text: str | None,
    *,
    prompt: str | None = None,
    fragments: Sequence[str] = (),
    max_chars: int = 500,
    min_chars: int = 8,
) -> tuple[str, str]:
    """``(caption, status)`` from what the fusion LLM wrote.

    ``prompt`` is the rendered prompt, removed when the output starts with it (backends that return prompt
    and completion together). ``fragments`` (see :func:`instruction_fragments`) are pieces of the
    instruction: an output that contains one repeats the instruction instead of answering it. The status is
    ``fused``, or why the output is unusable: ``fallback_echo``, ``fallback_empty``, ``fallback_short``
    (fewer than ``min_chars`` characters); then the caption is empty.
    """
    text = (text or "").replace("\r\n", "\n").replace("\r", "\n").strip()
    if prompt and text.startswith(prompt.strip()):
        text = text[len(prompt.strip()) :]
    caption = ""
    for paragraph in _PARAGRAPH.split(text):
        caption = _strip_preamble(one_line(paragraph))
        if caption:
            break
    low = caption.lower()
    if any(f in low for f in fragments):
        return "", "fallback_echo"
    caption = cut_to_length(caption, max_chars)
    if not caption:
        return "", "fallback_empty"
    if len(caption) < min_chars:
        return "", "fallback_short"
    return caption, "fused"


def _strip_preamble(text: str) -> str:
    for _ in range(3):  # "Sure! Here is the caption: Caption: ..." has layers
        before = text
        text = _PREAMBLE.sub("", text, count=1).strip()
        text = _LABEL.sub("", text, count=1).strip()
        text = _unquote(text)
        if text == before:
            break
    return text


# --- the training caption --------------------------------------------------------------------------


def mix_choice(uid: str, shares: Mapping[str, float], seed: int = 0) -> str:
    """Which caption ``uid`` trains on under ``train_caption: mix``: a deterministic draw from ``shares``
    (``{"fused": 0.7, "vlm": 0.2, "alt": 0.1}``, in :data:`FALLBACK_ORDER`) by a hash of seed and uid, so
    the same uid gets the same caption on every run, machine and shard layout."""
    total = sum(shares.get(k, 0.0) for k in FALLBACK_ORDER)
    if total <= 0:
        raise ValueError("the caption mix needs a share above 0")
    digest = hashlib.sha256(f"{seed}:{uid}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64 * total
    acc = 0.0
    chosen = FALLBACK_ORDER[0]
    for key in FALLBACK_ORDER:
        share = shares.get(key, 0.0)
        if share <= 0:
            continue
        chosen = key
        acc += share
        if u < acc:
            break
    return chosen


@dataclass(frozen=True)
class TrainCaption:
    """What goes into ``<uid>.txt``.

    ``mode`` is ``fused``, ``vlm``, ``alt`` or ``mix``; or ``column`` with ``column`` naming any string
    column, written as it is (``output.text_column``). A missing or blank chosen caption falls back to the
    first present of ``fused``, ``vlm``, ``alt`` (``alt`` is the input's caption); ``column`` never falls back.
    """

    mode: str = "alt"
    column: str | None = None
    shares: tuple[tuple[str, float], ...] = field(default=(("fused", 0.7), ("vlm", 0.2), ("alt", 0.1)))
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in (*CAPTION_COLUMNS, "mix", "column"):
            raise ValueError(f"train_caption {self.mode!r} is not one of fused, vlm, alt, mix")
        if self.mode == "column" and not self.column:
            raise ValueError("train_caption 'column' needs a column name")

    def required_columns(self) -> list[str]:
        """The columns that must exist for this choice: the chosen one, or every one with a share."""
        if self.mode == "column":
            return [self.column or ""]
        if self.mode == "mix":
            return [CAPTION_COLUMNS[k] for k, share in self.shares if share > 0]
        return [CAPTION_COLUMNS[self.mode]]

    def texts(self, table: pa.Table) -> list[str]:
        """The training caption of every row of ``table`` ('' where a row has none at all)."""
        if self.mode == "column":
            return [t or "" for t in table[self.column].to_pylist()]
        values = {
            key: table[col].to_pylist() if col in table.column_names else [None] * table.num_rows
            for key, col in CAPTION_COLUMNS.items()
        }
        shares = dict(self.shares)
        uids = table["uid"].to_pylist()
        out = []
        for i in range(table.num_rows):
            first = mix_choice(uids[i], shares, self.seed) if self.mode == "mix" else self.mode
            order = (first, *(k for k in FALLBACK_ORDER if k != first))
            # Nothing usable at all: the chosen value as it is, so `alt` writes what text_column did.
            out.append(next((v for k in order if (v := values[k][i]) and v.strip()), values[first][i] or ""))
        return out

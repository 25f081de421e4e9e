# ruff: noqa: S101 - a fuzz harness states its invariants as asserts
"""Fuzz caption cleaning: curate.core.reader.clean_caption and curate.core.reader._valid_utf8.

Invariants of ``clean_caption(text, max_chars)``: the output is NFC; it holds no lone surrogate and no
control character (C0, DEL, C1) except tab, newline and carriage return; it is at most ``max_chars`` code
points; the flag is True exactly when the cleaned text was longer than ``max_chars``; cleaning is idempotent
(``clean(clean(x)) == clean(x)``); null stays null. Of ``_valid_utf8(data)``: the output decodes as strict
UTF-8, is ``data`` itself when ``data`` is valid UTF-8, and otherwise equals Python's decode with U+FFFD.

Input layout: byte 0 chooses ``max_chars`` and how the rest becomes text (UTF-8 with surrogateescape, which
yields lone surrogates; UTF-16-LE with surrogatepass; or Latin-1, which yields every C1 control).
Run: ``python fuzz/fuzz_caption.py fuzz/corpus/caption``.
"""

from __future__ import annotations

import contextlib
import sys
import unicodedata

if __name__ == "__main__":
    import atheris

    _instrumented = atheris.instrument_imports(include=["curate.core.reader"])
else:
    _instrumented = contextlib.nullcontext()

with _instrumented:
    from curate.core.reader import _valid_utf8, clean_caption

MAX_CHARS = (None, 1, 2, 5, 16, 200)
KEPT_CONTROLS = {"\t", "\n", "\r"}


def as_text(mode: int, body: bytes) -> str:
    if mode == 0:
        return body.decode("utf-8", "surrogateescape")
    if mode == 1:
        return body[: len(body) // 2 * 2].decode("utf-16-le", "surrogatepass")
    return body.decode("latin-1")


def check_clean(text: str, max_chars: int | None) -> tuple[str, bool]:
    out, cut = clean_caption(text, max_chars)
    assert isinstance(out, str) and isinstance(cut, bool)
    assert unicodedata.is_normalized("NFC", out), f"not NFC: {out!r} from {text!r}"
    for ch in out:
        assert not ("\ud800" <= ch <= "\udfff"), f"lone surrogate {ch!r} in {out!r}"
        if unicodedata.category(ch) == "Cc":
            assert ch in KEPT_CONTROLS, f"control {ch!r} kept in {out!r} from {text!r}"
    if max_chars is not None:
        assert len(out) <= max_chars, (len(out), max_chars)
    full, full_cut = clean_caption(text, None)
    assert full_cut is False
    assert cut == (max_chars is not None and len(full) > max_chars), (cut, len(full), max_chars)
    assert out == (full[:max_chars] if cut else full)
    again = clean_caption(out, max_chars)
    assert again == (out, False), f"not idempotent: {text!r} -> {out!r} -> {again[0]!r}"
    return out, cut


def check_utf8(data: bytes) -> bytes:
    out = _valid_utf8(data)
    out.decode("utf-8")  # strict: raises UnicodeDecodeError on a violation
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        assert out == data.decode("utf-8", "replace").encode("utf-8")
    else:
        assert out is data
    return out


def test_one_input(data: bytes) -> tuple[str, bool] | None:
    check_utf8(data)
    if not data:
        assert clean_caption(None, 5) == (None, False)
        return None
    mode, max_chars = data[0] % 3, MAX_CHARS[(data[0] // 3) % len(MAX_CHARS)]
    return check_clean(as_text(mode, data[1:]), max_chars)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()

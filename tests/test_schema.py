import hashlib

import pyarrow as pa
import pytest

from curate.core.schema import COLUMNS, Column, declare, is_kept, normalise_url, reason_bucket, uid_for


def test_uid_is_the_documented_hash():
    # The documented recipe, spelled out: the same value on every machine and run.
    expected = hashlib.sha256(b"http://example.com/a.jpg\na cat").hexdigest()[:32]
    assert uid_for("http://example.com/a.jpg", "a cat") == expected
    assert (
        expected == "21ad177ba3136cd1a316cad4f228a73b"
    )  # pinned: a change here changes every uid ever written


@pytest.mark.parametrize(
    "variant",
    [
        "HTTP://Example.COM/a.jpg",
        "http://example.com:80/a.jpg",
        "  http://example.com/a.jpg\n",
        "http://example.com/a.jpg#fragment",
    ],
)
def test_uid_ignores_spelling_of_the_same_url(variant):
    assert uid_for(variant, "a cat") == uid_for("http://example.com/a.jpg", "a cat")


def test_uid_keeps_what_changes_the_resource():
    base = uid_for("http://example.com/a.jpg", "a cat")
    assert uid_for("http://example.com/A.jpg", "a cat") != base  # paths are case-sensitive
    assert uid_for("http://example.com/a.jpg?s=2", "a cat") != base
    assert uid_for("https://example.com/a.jpg", "a cat") != base
    assert uid_for("http://example.com:8080/a.jpg", "a cat") != base
    assert uid_for("http://example.com/a.jpg", "a dog") != base


def test_uid_normalises_caption_unicode_and_space():
    composed = "caf\u00e9  au\tlait "
    decomposed = "cafe\u0301 au lait"
    assert uid_for("http://x.org/1", composed) == uid_for("http://x.org/1", decomposed)
    assert uid_for("http://x.org/1", None) == uid_for("http://x.org/1", "")


def test_normalise_url_keeps_ipv6_and_userinfo():
    assert normalise_url("http://user@[::1]:8080/p") == "http://user@[::1]:8080/p"
    assert normalise_url("https://EXAMPLE.com:443") == "https://example.com"
    with pytest.raises(ValueError):
        normalise_url("http://example.com:99999/")


def test_uid_of_unparseable_and_null_urls_is_still_defined():
    assert len(uid_for(None, "x")) == 32
    assert uid_for("http://[broken/", "x") == hashlib.sha256(b"http://[broken/\nx").hexdigest()[:32]


def test_declare_refuses_a_conflicting_type():
    with pytest.raises(ValueError, match="already declared"):
        declare(Column("uid", pa.int64(), "someone", "clash"))
    assert COLUMNS["uid"].type == pa.string()


def test_reason_bucket_strips_a_trailing_uid():
    assert reason_bucket("duplicate:exact:" + "a" * 32) == "duplicate:exact"
    assert reason_bucket("clip_score<0.28") == "clip_score<0.28"


def test_is_kept_needs_ok_status_and_no_drop_reason():
    t = pa.table({"status": ["ok", "ok", "http_404", None], "drop_reason": [None, "nsfw", None, None]})
    assert is_kept(t).to_pylist() == [True, False, False, False]

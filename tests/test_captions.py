"""Caption cleaning with exact strings, and the per-uid caption choice of train_caption."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest

from curate.kit.captions import (
    TrainCaption,
    clean_fused_caption,
    clean_vlm_caption,
    cut_to_length,
    instruction_fragments,
    mix_choice,
)
from curate.stages.fuse_captions import DEFAULT_PROMPT, DEFAULT_SYSTEM_PROMPT, fill_prompt

FRAGMENTS = instruction_fragments(DEFAULT_SYSTEM_PROMPT, DEFAULT_PROMPT)


def test_vlm_caption_is_one_line_without_its_prompt():
    assert clean_vlm_caption("  a picture of  a dog\non a\tbeach ", "a picture of") == "a dog on a beach"
    assert clean_vlm_caption("A Picture Of: a dog", "a picture of") == "a dog"
    assert clean_vlm_caption("a dog", "a picture of") == "a dog"
    assert clean_vlm_caption("a dog", "") == "a dog"
    assert clean_vlm_caption(None) == "" and clean_vlm_caption(" \n ") == ""
    assert clean_vlm_caption("one two three four", max_chars=9) == "one two"


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("A golden retriever on Brighton beach.", "A golden retriever on Brighton beach."),
        ("  A dog\non the beach.  ", "A dog on the beach."),
        ("Merged caption: A dog on the beach.", "A dog on the beach."),
        ("Caption - A dog on the beach.", "A dog on the beach."),
        ('"A dog on the beach."', "A dog on the beach."),
        ("\u201cA dog on the beach.\u201d", "A dog on the beach."),
        ("**A dog on the beach.**", "A dog on the beach."),
        ("Sure! Here is the merged caption:\n\nA dog on the beach.", "A dog on the beach."),
        ("Here's a caption that combines both: A dog on the beach.", "A dog on the beach."),
        ('Sure! Here is the caption: Caption: "A dog on the beach."', "A dog on the beach."),
        ("A dog on the beach.\n\nNote: I dropped the file name.", "A dog on the beach."),
        ('"Pride" and "Prejudice" on a shelf', '"Pride" and "Prejudice" on a shelf'),
    ],
)
def test_fused_caption_is_cleaned_to_the_caption(raw, want):
    assert clean_fused_caption(raw, fragments=FRAGMENTS) == (want, "fused")


def test_prompt_repeated_in_front_is_removed():
    prompt = "<|im_start|>user\nMerge these.<|im_end|>\n<|im_start|>assistant\n"
    assert clean_fused_caption(prompt + "A red bus in London.", prompt=prompt) == (
        "A red bus in London.",
        "fused",
    )


def test_unusable_answers_say_why():
    assert clean_fused_caption("", fragments=FRAGMENTS) == ("", "fallback_empty")
    assert clean_fused_caption(None) == ("", "fallback_empty")
    assert clean_fused_caption("Sure! Here is the merged caption:\n\n", fragments=FRAGMENTS) == (
        "",
        "fallback_empty",
    )
    assert clean_fused_caption('""') == ("", "fallback_empty")
    assert clean_fused_caption("A dog.", min_chars=8) == ("", "fallback_short")
    echo = fill_prompt(DEFAULT_PROMPT, "dog beach 2019", "a dog on the sand")
    assert clean_fused_caption(echo, fragments=FRAGMENTS) == ("", "fallback_echo")
    assert clean_fused_caption("Alt-text: dog beach 2019", fragments=FRAGMENTS) == ("", "fallback_echo")
    assert clean_fused_caption(
        "Merge two captions of the same image into one. A dog.", fragments=FRAGMENTS
    ) == ("", "fallback_echo")


def test_fused_caption_is_cut_at_a_sentence_or_a_word():
    text = "A red bus drives past Big Ben in London. Tourists take photos from the pavement in the rain."
    assert clean_fused_caption(text, max_chars=60) == ("A red bus drives past Big Ben in London.", "fused")
    assert cut_to_length(text, 30) == "A red bus drives past Big Ben"
    assert cut_to_length("A red bus, a taxi and a cyclist", 11) == "A red bus"
    assert cut_to_length("Supercalifragilistic", 5) == "Super"
    assert cut_to_length(text, 1000) == text


def test_instruction_fragments_are_sentences_and_labels():
    frags = instruction_fragments("Be brief. Merge the two captions into one.\n\nA: {alt}\nSynthetic: {vlm}")
    assert frags == ["merge the two captions into one.", "synthetic:"]  # "a:" and "be brief." are too short
    assert "alt-text:" in FRAGMENTS and "synthetic caption:" in FRAGMENTS
    assert "merge two captions of the same image into one." in FRAGMENTS


def test_fill_prompt_takes_braces_in_captions_literally():
    assert fill_prompt("A: {alt} / B: {vlm}", "x {vlm} y", "{alt}") == "A: x {vlm} y / B: {alt}"


# --- the training caption --------------------------------------------------------------------------


def _table(**columns) -> pa.Table:
    n = len(next(iter(columns.values())))
    return pa.table({"uid": [f"{i:032x}" for i in range(n)], **columns})


def test_each_mode_takes_its_caption_and_falls_back_in_order():
    t = _table(
        caption=["alt0", "alt1", "alt2", "", None],
        caption_vlm=["vlm0", "vlm1", None, "vlm3", None],
        caption_fused=["fused0", None, None, "  ", None],
    )
    assert TrainCaption("fused").texts(t) == ["fused0", "vlm1", "alt2", "vlm3", ""]
    assert TrainCaption("vlm").texts(t) == ["vlm0", "vlm1", "alt2", "vlm3", ""]
    assert TrainCaption("alt").texts(t) == ["alt0", "alt1", "alt2", "vlm3", ""]
    assert TrainCaption("column", "caption").texts(t) == ["alt0", "alt1", "alt2", "", ""]  # never falls back
    # Without the synthetic columns (a pipeline with no recaption), alt is the alt-text as it is.
    assert TrainCaption("alt").texts(_table(caption=["x", " ", None])) == ["x", " ", ""]


def test_mix_is_a_fixed_draw_per_uid_with_the_given_shares():
    shares = {"fused": 0.6, "vlm": 0.3, "alt": 0.1}
    uids = [f"{i:032x}" for i in range(4000)]
    picks = [mix_choice(u, shares) for u in uids]
    assert picks == [mix_choice(u, shares) for u in uids]  # deterministic
    counts = Counter(picks)
    assert abs(counts["fused"] / 4000 - 0.6) < 0.03 and abs(counts["vlm"] / 4000 - 0.3) < 0.03
    assert abs(counts["alt"] / 4000 - 0.1) < 0.02
    other = [mix_choice(u, shares, seed=1) for u in uids]
    assert other != picks and abs(Counter(other)["fused"] / 4000 - 0.6) < 0.03
    assert {mix_choice(u, {"fused": 0, "vlm": 2, "alt": 0}) for u in uids[:200]} == {"vlm"}
    with pytest.raises(ValueError, match="share above 0"):
        mix_choice(uids[0], {"fused": 0, "vlm": 0, "alt": 0})


def test_mix_writes_the_drawn_caption_or_its_fallback():
    n = 300
    t = _table(
        caption=[f"alt{i}" for i in range(n)],
        caption_vlm=[f"vlm{i}" for i in range(n)],
        caption_fused=[None if i % 3 == 0 else f"fused{i}" for i in range(n)],
    )
    mix = TrainCaption("mix", shares=(("fused", 0.5), ("vlm", 0.25), ("alt", 0.25)), seed=7)
    shares = {"fused": 0.5, "vlm": 0.25, "alt": 0.25}
    for i, (uid, text) in enumerate(zip(t["uid"].to_pylist(), mix.texts(t), strict=True)):
        pick = mix_choice(uid, shares, 7)
        want = f"vlm{i}" if pick == "fused" and i % 3 == 0 else f"{pick}{i}"
        assert text == want
    # The same uid gets the same caption in any shard, alone or with others.
    assert mix.texts(t.slice(5, 1)) == mix.texts(t)[5:6]
    assert mix.required_columns() == ["caption_fused", "caption_vlm", "caption"]
    assert TrainCaption("mix", shares=(("fused", 0.0), ("vlm", 1.0), ("alt", 0.0))).required_columns() == [
        "caption_vlm"
    ]


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        TrainCaption("best")
    with pytest.raises(ValueError, match="needs a column"):
        TrainCaption("column")

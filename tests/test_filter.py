import pyarrow as pa
import pytest
from conftest import write_pipeline
from pydantic import ValidationError
from support.data import make_input

from curate.kit.rules import first_failure, parse_rule
from curate.stages.filter import ThresholdFilter, ThresholdFilterConfig


def table(scores, nsfw=None, status=None, drop_reason=None):
    n = len(scores)
    return pa.table(
        {
            "status": pa.array(status or ["ok"] * n, pa.string()),
            "drop_reason": pa.array(drop_reason or [None] * n, pa.string()),
            "clip_score": pa.array(scores, pa.float32()),
            "nsfw_score": pa.array(nsfw or [0.0] * n, pa.float32()),
        }
    )


def run(t, rules, **cfg):
    return ThresholdFilter(ThresholdFilterConfig(rules=rules, **cfg))(t)["drop_reason"].to_pylist()


@pytest.mark.parametrize(
    ("text", "column", "op", "value", "reason"),
    [
        ("clip_score >= 0.28", "clip_score", ">=", 0.28, "clip_score<0.28"),
        ("clip_score>=0.280", "clip_score", ">=", 0.28, "clip_score<0.280"),  # the user's spelling stays
        ("  nsfw_score < .5 ", "nsfw_score", "<", 0.5, "nsfw_score>=.5"),
        ("width > 64", "width", ">", 64, "width<=64"),
        ("aesthetic <= 1e-3", "aesthetic", "<=", 0.001, "aesthetic>1e-3"),
        ("text_area != -2", "text_area", "!=", -2, "text_area==-2"),
        ("has_text == False", "has_text", "==", False, "has_text!=false"),
        ("lang == 'en'", "lang", "==", "en", "lang!=en"),
        ('lang != "de fr"', "lang", "!=", "de fr", "lang==de fr"),
    ],
)
def test_parse_rule_and_its_drop_reason(text, column, op, value, reason):
    rule = parse_rule(text)
    assert (rule.column, rule.op, rule.value, rule.drop_reason) == (column, op, value, reason)
    assert type(rule.value) is type(value) and rule.text == text.strip()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("clip_score", "cannot parse 'clip_score'"),
        ("clip_score => 0.3", "unknown operator '=>'"),
        ("clip_score = 0.3", "unknown operator '='"),
        ("clip_score >=", "has no value after '>='"),
        ("clip_score >= high", "cannot read the value 'high'"),
        ("flag > true", "compare only with == or !="),
        ("0col >= 1", "cannot parse"),
        ("lang == 'it's'", "holds its own quote"),
    ],
)
def test_bad_rules_say_what_is_allowed(text, message):
    with pytest.raises(ValueError, match=message) as e:
        parse_rule(text)
    if "quote" not in message and "==" not in message:
        assert ">= > <= < == !=" in str(e.value) and "quoted string" in str(e.value)


def test_first_failing_rule_wins_in_order():
    t = table([0.1, 0.5, 0.1, 0.5], nsfw=[0.9, 0.9, 0.1, 0.1])
    assert run(t, ["clip_score >= 0.28", "nsfw_score < 0.5"]) == [
        "clip_score<0.28",
        "nsfw_score>=0.5",
        "clip_score<0.28",
        None,
    ]
    assert run(t, ["nsfw_score < 0.5", "clip_score >= 0.28"]) == [
        "nsfw_score>=0.5",
        "nsfw_score>=0.5",
        "clip_score<0.28",
        None,
    ]
    # a range on one column: two rules on it
    assert run(table([0.1, 0.5, 0.95]), ["clip_score > 0.2", "clip_score <= 0.9"]) == [
        "clip_score<=0.2",
        None,
        "clip_score>0.9",
    ]


def test_missing_values_drop_or_pass():
    t = table([None, float("nan"), 0.1, 0.5], nsfw=[0.9, 0.1, 0.1, None])
    rules = ["clip_score >= 0.28", "nsfw_score < 0.5"]
    assert run(t, rules) == [
        "missing:clip_score",
        "missing:clip_score",
        "clip_score<0.28",
        "missing:nsfw_score",
    ]
    assert run(t, rules, missing="keep") == ["nsfw_score>=0.5", None, "clip_score<0.28", None]


def test_not_ok_and_already_dropped_rows_are_left_alone():
    t = table(
        [0.1, 0.1, None, 0.1],
        status=["ok", "http_404", "ok", "ok"],
        drop_reason=["caption_length<3", None, "nsfw", None],
    )
    assert run(t, ["clip_score >= 0.28"]) == ["caption_length<3", None, "nsfw", "clip_score<0.28"]
    out = ThresholdFilter(ThresholdFilterConfig(rules=["clip_score >= 0.28"]))(t)
    assert out.num_rows == 4 and out.column_names == t.column_names  # rows stay, no column added


def test_first_failure_on_strings_bools_and_ints():
    t = pa.table(
        {"lang": ["en", "de", None], "ok": [True, False, True], "w": pa.array([10, 64, 100], pa.int32())}
    )
    rules = [parse_rule("lang == 'en'"), parse_rule("ok == true"), parse_rule("w >= 63.5")]
    assert first_failure(t, rules, "keep").to_pylist() == ["w<63.5", "lang!=en", None]
    with pytest.raises(
        ValueError, match="column 'lang' holds string, which cannot be compared with a number"
    ):
        first_failure(t, [parse_rule("lang >= 1")], "drop")


def test_stage_reads_the_rule_columns_and_config_checks():
    stage = ThresholdFilter(
        ThresholdFilterConfig(rules=["clip_score >= 0.2", "nsfw_score < 0.5", "clip_score < 1"])
    )
    assert stage.reads == ("clip_score", "nsfw_score") and stage.writes == ("drop_reason",)
    with pytest.raises(ValidationError, match=r"rules\.1"):
        ThresholdFilterConfig(rules=["clip_score >= 0.2", "clip_score >= x"])
    with pytest.raises(ValidationError, match=r"at least 1 item"):
        ThresholdFilterConfig(rules=[])
    with pytest.raises(
        ValidationError, match="column 'caption' holds string"
    ):  # declared type, checked early
        ThresholdFilterConfig(rules=["caption >= 3"])
    with pytest.raises(ValidationError):
        ThresholdFilterConfig(rules=["clip_score >= 0.2"], missing="ignore")


def test_a_bad_rule_in_yaml_fails_with_its_path(tmp_path, cli):
    make_input(tmp_path / "in.parquet", 10)
    stages = [{"stage": "synthetic_image"}, {"stage": "filter", "rules": ["width >= 20", "width => 3"]}]
    p = write_pipeline(tmp_path / "p.yaml", tmp_path / "in.parquet", tmp_path / "out", stages)
    r = cli("validate", p)
    assert r.code == 2 and "stages[1].rules[1]" in r.err and "unknown operator '=>'" in r.err, r
    assert not (tmp_path / "out").exists()


def test_a_filter_on_a_column_no_stage_writes_fails_the_check(tmp_path, cli):
    make_input(tmp_path / "in.parquet", 10)
    stages = [{"stage": "filter", "name": "scores", "rules": ["similarity >= 0.2", "clip_score >= 0.28"]}]
    p = write_pipeline(tmp_path / "p.yaml", tmp_path / "in.parquet", tmp_path / "out", stages)
    r = cli("run", p, "-q")
    assert r.code == 2 and "stages[0] (scores): reads column 'clip_score'" in r.err, r
    assert "written by the 'clip_score' stage" in r.err
    assert "'similarity'" not in r.err  # an input column is fine


def test_a_filter_in_a_pipeline_records_its_reasons(tmp_path, cli):
    import pyarrow.compute as pc
    from conftest import sidecars

    make_input(tmp_path / "in.parquet", 120, bad_every=11)
    stages = [
        {"stage": "synthetic_image"},
        {"stage": "basic_filter", "min_caption_length": 3},
        {"stage": "filter", "rules": ["similarity >= 0.3", "width >= 24"]},
    ]
    p = write_pipeline(tmp_path / "p.yaml", tmp_path / "in.parquet", tmp_path / "out", stages, shard_size=50)
    assert cli("run", p, "-q").code == 0
    side = sidecars(tmp_path / "out")
    for row in side.to_pylist():
        if row["status"] != "ok" or row["drop_reason"] == "caption_length<3":
            continue
        want = "similarity<0.3" if row["similarity"] < 0.3 else ("width<24" if row["width"] < 24 else None)
        assert row["drop_reason"] == want
    assert pc.sum(pc.equal(side["drop_reason"], "width<24")).as_py() > 0

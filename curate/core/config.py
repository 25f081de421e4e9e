"""The pipeline YAML as typed pydantic models.

Unknown keys are errors everywhere. Every error names the YAML path of the bad field (``stages[1].min_width``)
and what is allowed there, so a bad config fails before any work starts, with a message that says what to change.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from curate.base import ConfigError, Resources, StrictModel

__all__ = [
    "CaptionMix",
    "ExecutorConfig",
    "InputConfig",
    "OutputConfig",
    "PipelineConfig",
    "StageSpec",
    "apply_overrides",
    "load_config",
    "parse_config",
]


InputFormat = Literal["parquet", "csv", "tsv", "jsonl", "txt", "webdataset", "folder"]


DEFAULT_MAX_CAPTION_CHARS = 2000


class InputConfig(StrictModel):
    path: str = Field(description="file, glob or directory; local or any fsspec URL")
    format: InputFormat | None = Field(None, description="inferred from the file suffix when absent")
    url_col: str = Field(
        "url",
        description="the image URL's column; for inputs that carry images (webdataset, folder, image_col) "
        "optional: a json field of that name in a WebDataset sample, else null",
    )
    caption_col: str | None = Field("caption", description="null for inputs with no caption (txt)")
    image_col: str | None = Field(
        None,
        description="parquet/arrow: a column of image bytes, or of {bytes, path} structs (HuggingFace "
        "datasets' Image); its rows skip fetching and go through the download stage's checks",
    )
    uid_col: str | None = Field(
        None,
        description="keep the source's id as the uid (img2dataset's key, DataComp's uid): a column, or a "
        "WebDataset json field, or key (the sample's key); must be unique in the run. Default: computed "
        "from url and caption (curate.core.schema.uid_for)",
    )
    caption_field: str | None = Field(
        None, description="webdataset: the caption from this json field instead of <key>.txt"
    )
    captions: str | None = Field(
        None,
        description="folder: a csv/tsv/jsonl/parquet file with path (relative to the folder) and caption "
        "columns, instead of a .txt beside each image",
    )
    max_caption_chars: int | None = Field(
        DEFAULT_MAX_CAPTION_CHARS,
        gt=0,
        description="a longer caption is cut to this many characters and flagged in caption_truncated; "
        "null: no limit",
    )

    @model_validator(mode="after")
    def _options_of_the_format(self) -> InputConfig:
        only = {
            "caption_field": ("webdataset", None),
            "captions": ("folder",),
            "image_col": ("parquet", None),
        }
        for option, formats in only.items():
            if getattr(self, option) is not None and self.format not in formats:
                raise ValueError(
                    f"{option} is for input.format {' or '.join(f for f in formats if f)}, "
                    f"not {self.format or 'inferred from the file names'}"
                    + (" (set input.format)" if None not in formats else "")
                )
        if self.format == "folder" and self.uid_col is not None:
            raise ValueError(
                "uid_col is for tables and WebDataset samples; a folder's images have no id column"
            )
        return self

    @property
    def carries_images(self) -> bool:
        """Whether rows arrive with their image bytes (and skip fetching)."""
        return self.format in ("webdataset", "folder") or self.image_col is not None


class CaptionMix(StrictModel):
    """The shares of ``train_caption: mix`` (any non-negative weights; they need not add up to 1)."""

    fused: float = Field(0.7, ge=0, description="share of samples that train on caption_fused")
    vlm: float = Field(0.2, ge=0, description="share of samples that train on caption_vlm")
    alt: float = Field(0.1, ge=0, description="share of samples that train on the alt-text (caption)")
    seed: int = Field(0, description="another seed gives another, equally deterministic, draw per uid")

    @model_validator(mode="after")
    def _some_share(self) -> CaptionMix:
        if self.fused + self.vlm + self.alt <= 0:
            raise ValueError("at least one share must be above 0")
        return self


# text_column values that are train_caption choices (and fall back like them).
_TRAIN_CAPTION_OF_COLUMN = {"caption": "alt", "caption_vlm": "vlm", "caption_fused": "fused"}


class OutputConfig(StrictModel):
    path: str = Field(description="output folder; local or any fsspec URL")
    train_caption: Literal["alt", "vlm", "fused", "mix"] = Field(
        "alt",
        description="what <uid>.txt holds: alt (the input's caption), vlm (caption_vlm), fused "
        "(caption_fused) or mix (a fixed draw per uid, shares in caption_mix); a missing caption falls back "
        "to the first of fused, vlm, alt. Every caption stays in <uid>.json and the sidecar",
    )
    caption_mix: CaptionMix = Field(default_factory=CaptionMix, description="shares for train_caption: mix")
    text_column: str | None = Field(
        None,
        description="instead of train_caption: write this string column as it is, without fallback "
        "(caption, caption_vlm and caption_fused mean train_caption alt, vlm and fused)",
    )
    dropped_thumbnails: bool = Field(
        True, description="keep 128 px thumbnails of dropped rows in dropped/<id>.tar, for audit and preview"
    )
    naming: Literal["curate", "img2dataset"] = Field(
        "curate",
        description="img2dataset: the sidecars, tar json and _stats.json also carry img2dataset's names (key, "
        "error_message, original_width, original_height, exif; count, successes, failed_to_download, "
        "failed_to_resize, duration, start_time, end_time, status_dict), for tools written for its output",
    )
    report: bool = Field(
        True,
        description="write report/report.html and report.json at the end of the run (a few tenths of a "
        "second for a small run; `curate report OUTPUT` writes them at any time)",
    )

    @model_validator(mode="after")
    def _one_caption_setting(self) -> OutputConfig:
        both = self.text_column is not None and "train_caption" in self.model_fields_set
        if both and _TRAIN_CAPTION_OF_COLUMN.get(self.text_column or "") != self.train_caption:
            raise ValueError(
                f"give train_caption or text_column, not both (train_caption: {self.train_caption}, "
                f"text_column: {self.text_column})"
            )
        return self

    def caption_source(self) -> tuple[str, str | None]:
        """``(train_caption, None)``, or ``("column", name)`` when ``text_column`` names another column."""
        if self.text_column is None:
            return self.train_caption, None
        if self.text_column in _TRAIN_CAPTION_OF_COLUMN:
            return _TRAIN_CAPTION_OF_COLUMN[self.text_column], None
        return "column", self.text_column

    def caption_relevant(self) -> dict[str, Any]:
        """The training-caption settings as the fingerprint counts them. ``alt`` counts as the
        ``text_column: caption`` it replaced, so outputs made before train_caption existed still resume."""
        mode, column = self.caption_source()
        if mode == "column":
            return {"text_column": column}
        if mode == "alt":
            return {"text_column": "caption"}
        if mode == "mix":
            return {"train_caption": "mix", "caption_mix": self.caption_mix.model_dump(mode="json")}
        return {"train_caption": mode}


class ExecutorConfig(StrictModel):
    kind: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="Ray cluster to join; else RAY_ADDRESS; else a local one")
    num_cpus: int | None = Field(None, gt=0, description="CPUs of a local Ray cluster started by curate")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local Ray cluster started by curate")
    dashboard: bool = Field(False, description="start Ray's dashboard with a local cluster")
    work_while_starting: bool = Field(
        True,
        description="while a local Ray cluster that curate starts comes up (about 6 s on 2 cores), the "
        "driver runs the first shards of each phase without a model itself, until the phase's first Ray "
        "worker is ready; false: only Ray's workers run shards",
    )
    object_store_memory: int | None = Field(None, gt=0, description="bytes; caps in-flight shards under Ray")
    max_shard_retries: int = Field(
        2, ge=0, description="a failing shard is retried this often, then reported"
    )


_RESERVED_STAGE_KEYS = ("stage", "name", "resources")


class StageSpec(BaseModel):
    """One item of ``stages``: ``{stage: <registered name>, name: <unique name>, resources: {...}, **params}``."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    name: str
    resources: Resources = Field(default_factory=Resources)
    # The stage class's own Config, validated by it; SerializeAsAny dumps its fields, not the base's (none).
    config: SerializeAsAny[StrictModel] = Field(description="the stage's own validated Config")

    def params(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json")


class PipelineConfig(StrictModel):
    name: str
    input: InputConfig
    output: OutputConfig
    shard_size: int = Field(10_000, gt=0)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    stages: list[StageSpec] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    def fingerprint(self) -> str:
        """A hash of everything that decides the output. Executor settings and resources do not count:
        the same pipeline gives the same output on every executor."""
        return hashlib.sha256(canonical_json(self.output_relevant()).encode()).hexdigest()[:16]

    def output_relevant(self) -> dict[str, Any]:
        return {
            # max_caption_chars counts only when set to another value: fingerprints of runs made before it
            # existed stay valid.
            "input": self.input.model_dump(
                mode="json",
                exclude={"max_caption_chars"}
                if self.input.max_caption_chars == DEFAULT_MAX_CAPTION_CHARS
                else None,
            ),
            "output": self.output.caption_relevant()
            | ({} if self.output.dropped_thumbnails else {"dropped_thumbnails": False})
            | ({} if self.output.naming == "curate" else {"naming": self.output.naming}),
            "shard_size": self.shard_size,
            "stages": [{"stage": s.stage, "name": s.name, **s.params()} for s in self.stages],
        }

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", exclude={"stages"})
        d["stages"] = [
            {"stage": s.stage, "name": s.name, **s.params()}
            | ({"resources": s.resources.model_dump(exclude_none=True)} if s.resources != Resources() else {})
            for s in self.stages
        ]
        return d


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# --- loading -----------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML, apply ``--set`` overrides and ``${ENV}`` interpolation, and validate it."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {source}: {e.strerror or e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", source) from None
    return parse_config(raw, overrides, source=source)


def parse_config(raw: Any, overrides: list[str] | None = None, source: str | None = None) -> PipelineConfig:
    if not isinstance(raw, dict):
        raise ConfigError("the top level must be a mapping (name:, input:, output:, stages: ...)", source)
    raw = apply_overrides(raw, overrides or [], source)
    raw = _interpolate(raw, "", source)

    stage_items = raw.get("stages") or []
    if not isinstance(stage_items, list):
        raise ConfigError([("stages", "must be a list of {stage: <name>, ...} items")], source)
    problems: list[tuple[str, str]] = []
    specs = _parse_stages(stage_items, problems)

    top = {k: v for k, v in raw.items() if k != "stages"}
    try:
        cfg = PipelineConfig.model_validate(top)
    except ValidationError as e:
        problems = _pydantic_problems(e, "", PipelineConfig) + problems
        raise ConfigError(problems, source) from None
    if problems:
        raise ConfigError(problems, source)
    cfg.stages = specs
    return cfg


def _parse_stages(items: list[Any], problems: list[tuple[str, str]]) -> list[StageSpec]:
    from curate.core.registry import STAGES

    specs: list[StageSpec] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"stages[{i}]"
        if not isinstance(item, dict) or "stage" not in item:
            problems.append((where, "must be a mapping with a 'stage' key naming a registered stage"))
            continue
        kind = item["stage"]
        cls = STAGES.get(kind) if isinstance(kind, str) else None
        if cls is None:
            problems.append(
                (f"{where}.stage", f"unknown stage {kind!r}; registered: {', '.join(sorted(STAGES))}")
            )
            continue
        name = item.get("name", kind)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            problems.append((f"{where}.name", "must be a word of letters, digits, '_', '-' or '.'"))
            continue
        if name in seen:
            problems.append(
                (
                    f"{where}.name",
                    f"{name!r} is already the name of stages[{seen[name]}]; give each a unique name",
                )
            )
            continue
        seen[name] = i
        params = {k: v for k, v in item.items() if k not in _RESERVED_STAGE_KEYS}
        ok = True
        try:
            resources = Resources.model_validate(item.get("resources") or {})
        except ValidationError as e:
            problems.extend(_pydantic_problems(e, f"{where}.resources", Resources))
            ok = False
        try:
            stage_config = cls.Config.model_validate(params)
        except ValidationError as e:
            problems.extend(_pydantic_problems(e, where, cls.Config))
            ok = False
        if ok:
            specs.append(StageSpec(stage=kind, name=name, resources=resources, config=stage_config))
    return specs


def _pydantic_problems(err: ValidationError, prefix: str, model: type[BaseModel]) -> list[tuple[str, str]]:
    out = []
    for e in err.errors():
        path = prefix
        for part in e["loc"]:
            path = f"{path}[{part}]" if isinstance(part, int) else (f"{path}.{part}" if path else str(part))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, e["loc"][:-1])
            msg = f"unknown key; allowed here: {', '.join(allowed)}" if allowed else "unknown key"
        elif e["type"] == "missing":
            msg = "required, but missing"
        else:
            msg = (
                f"{msg} (got {e.get('input')!r})"
                if "input" in e and not isinstance(e["input"], dict)
                else msg
            )
        out.append((path, msg))
    return out


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the (nested) model at ``loc``, for 'unknown key' messages."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    names = list(model.model_fields)
    if model is PipelineConfig:
        names.append("stages")
    return sorted(names)


# --- overrides and interpolation ---------------------------------------------------------------------


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str | None = None) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides; values are parsed as YAML (``3`` is a number, ``[a, b]`` a list).

    Stages are addressed by their name (``stages.filter.min_width=64``) or position (``stages.0.min_width``).
    """
    import copy

    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([(f"--set {item}", "expected KEY=VALUE, e.g. --set shard_size=1000")], source)
        value = "" if text == "" else yaml.safe_load(text)
        parts = key.strip().split(".")
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[_stage_index(node, part, item, source)]
            else:
                if not isinstance(node.get(part, {}), (dict, list)):
                    where = ".".join(parts[: depth + 1])
                    raise ConfigError([(f"--set {item}", f"{where} is not a mapping")], source)
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            node[_stage_index(node, last, item, source)] = value
        else:
            node[last] = value
    return raw


def _stage_index(stages: list[Any], part: str, item: str, source: str | None) -> int:
    if part.isdigit() and int(part) < len(stages):
        return int(part)
    names = [s.get("name", s.get("stage")) if isinstance(s, dict) else None for s in stages]
    if part in names:
        return names.index(part)
    raise ConfigError(
        [(f"--set {item}", f"no stage named {part!r}; stages: {', '.join(str(n) for n in names) or 'none'}")],
        source,
    )


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: Any, path: str, source: str | None) -> Any:
    """Replace ``${VAR}`` and ``${VAR:-default}`` in every string value."""
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k), source) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", source) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(m: re.Match) -> str:
            value = os.environ.get(m.group(1), m.group(2))
            if value is None:
                raise ConfigError(
                    [
                        (
                            path,
                            f"environment variable {m.group(1)} is not set (write ${{{m.group(1)}:-default}})",
                        )
                    ],
                    source,
                )
            return value

        return _ENV.sub(sub, node)
    return node

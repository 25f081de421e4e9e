"""The types every layer shares: the base of every config model, per-stage resource overrides, memory sizes,
and every error class of curate. Imports nothing of curate, so the YAML module, the stages, the models, the tools and the
trainer all use them without an import cycle.

How the CLI treats them: :class:`ConfigError` and the ``InputError`` family exit with code 2 and a message that
says what to change; :class:`ModelNotFound` names ``curate models fetch``; :class:`TrainError` exits with 2.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "GIB",
    "MIB",
    "ClusterAccessError",
    "ConfigError",
    "HashListError",
    "InputError",
    "MemoryNeed",
    "ModelNotFound",
    "Resources",
    "RetrievalIndexError",
    "StrictModel",
    "TakedownError",
    "TrainDataError",
    "TrainError",
    "fmt_bytes",
    "parse_bytes",
]


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Resources(StrictModel):
    """Per-stage overrides of what a stage declares it needs."""

    cpus: float | None = Field(None, gt=0)
    gpus: float | None = Field(None, ge=0)
    concurrency: int | tuple[int, int] | None = Field(None, description="actors: a size or (min, max)")
    batch_size: int | None = Field(None, gt=0)
    memory: int | None = Field(
        None,
        gt=0,
        description="host memory one worker needs (8GB, 8GiB or bytes); default: the plan's estimate",
    )

    @field_validator("memory", mode="before")
    @classmethod
    def _size(cls, v: object) -> object:
        return parse_bytes(v) if isinstance(v, str) else v

    @field_validator("concurrency")
    @classmethod
    def _positive_range(cls, v: int | tuple[int, int] | None) -> int | tuple[int, int] | None:
        low, high = (v, v) if isinstance(v, int) else v or (1, 1)
        if low < 1 or high < low:
            raise ValueError(f"concurrency must be a size >= 1 or [min, max] with 1 <= min <= max, got {v}")
        return v


# --- memory sizes ------------------------------------------------------------------------------------

GIB = 1 << 30
MIB = 1 << 20
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 10**3, "m": 10**6}
_UNITS |= {"g": 10**9, "t": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_UNITS |= {"ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_bytes(value: str | int | float) -> int:
    """``48GB`` (decimal), ``48GiB`` or ``48Gi`` (binary, as Kubernetes writes it), or a number of bytes."""
    if isinstance(value, int | float):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{value!r} is not a size: write e.g. 48GB, 48GiB or 51539607552")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: int | float) -> str:
    """GiB with one decimal from a GiB up, else MiB."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes of host memory and of GPU memory one worker needs at its peak, and what they are made of.

    ``transient`` and ``gpu_transient`` are the parts of those peaks held only for a while (loading's
    checkpoint beside the model, a batch's working set): a worker that holds several stages' models holds
    every model at once but reaches one stage's peak at a time (``resident`` + the largest transient)."""

    host: int
    gpu: int = 0
    parts: tuple[str, ...] = field(default=())
    transient: int = 0
    gpu_transient: int = 0

    def __add__(self, other: MemoryNeed) -> MemoryNeed:
        return MemoryNeed(
            self.host + other.host,
            self.gpu + other.gpu,
            self.parts + other.parts,
            self.transient + other.transient,
            self.gpu_transient + other.gpu_transient,
        )

    @property
    def resident(self) -> int:
        return self.host - self.transient

    @property
    def gpu_resident(self) -> int:
        return self.gpu - self.gpu_transient

    def describe(self) -> str:
        gpu = f" + {fmt_bytes(self.gpu)} GPU" if self.gpu else ""
        return f"{fmt_bytes(self.host)} host{gpu}"


# --- errors ------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """A config or usage problem, found before any work starts. The CLI exits with code 2."""

    def __init__(
        self, problems: list[tuple[str, str]] | str, source: str | None = None, what: str = "pipeline"
    ):
        if isinstance(problems, str):
            problems = [("", problems)]
        self.problems = problems
        self.source = source
        self.what = what
        super().__init__(self.render())

    def render(self) -> str:
        head = f"invalid {self.what} config{f' {self.source}' if self.source else ''}:"
        lines = [f"  {path}: {msg}" if path else f"  {msg}" for path, msg in self.problems]
        return "\n".join([head, *lines])


class InputError(ValueError):
    """The input cannot be read: no files, a malformed file, a missing column. Names the file."""


class HashListError(ValueError):
    """A hash list that cannot be read: names the file (and line) and what is wrong."""


class RetrievalIndexError(InputError):
    """An index cannot be built, appended to or read: names what to change. The CLI exits with code 2."""


class TakedownError(InputError):
    """A takedown that cannot start (no run, an unreadable request): the CLI exits with code 2."""


class ClusterAccessError(InputError):
    """A Ray cluster that refuses this process (it wants its authentication token, and this process has none,
    or another): says which variable to set. The CLI exits with code 2."""


class ModelNotFound(Exception):
    """Weights that are neither at the given path, nor in the model directory, nor downloadable now."""


class TrainError(ValueError):
    """A training setup that cannot run as asked (no shards, no text encoder to use, a checkpoint of another
    model): the CLI prints it and exits with 2."""


class TrainDataError(TrainError):
    """Training data that cannot be used: no shards, a source that is not a run or a shard."""

"""The explicit map from stage names in YAML to stage classes. No import-path strings."""

from __future__ import annotations

from curate.core.stage import Stage

STAGES: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Add a stage class under its ``name``. Registering another class under a taken name is an error."""
    existing = STAGES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"stage name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    STAGES[cls.name] = cls
    return cls


def _register_builtin() -> None:
    from curate.stages.aesthetic import Aesthetic
    from curate.stages.basic_filter import BasicFilter
    from curate.stages.blocklist import Blocklist
    from curate.stages.clip_score import ClipScore
    from curate.stages.dedup import Dedup
    from curate.stages.download import Download
    from curate.stages.filter import ThresholdFilter
    from curate.stages.fuse_captions import FuseCaptions
    from curate.stages.nsfw import Nsfw
    from curate.stages.recaption import Recaption
    from curate.stages.watermark import Watermark

    for cls in (
        BasicFilter,
        Download,
        Blocklist,
        ClipScore,
        Nsfw,
        Watermark,
        Aesthetic,
        ThresholdFilter,
        Dedup,
        Recaption,
        FuseCaptions,
    ):
        register(cls)


_register_builtin()

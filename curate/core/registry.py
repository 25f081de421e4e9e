"""The explicit map from stage names in YAML to stage classes. No import-path strings.

Registering a stage also declares its columns (``Stage.columns``) in :mod:`curate.core.schema`; the builtin
stages are registered when this module is imported, so ``COLUMNS`` is complete from then on. Other stages
(tests', a user's) are registered by an explicit :func:`register` call.
"""

from __future__ import annotations

from curate.core.schema import declare
from curate.core.stage import Stage

STAGES: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Add a stage class under its ``name``, and its columns to the schema. Registering another class under
    a taken name, or a column under a declared name with another type, is an error."""
    existing = STAGES.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"stage name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}")
    for column in cls.columns:
        declare(column)
    STAGES[cls.name] = cls
    return cls


def _register_builtin() -> None:
    from curate.stages.aesthetic import Aesthetic
    from curate.stages.basic_filter import BasicFilter
    from curate.stages.blocklist import Blocklist
    from curate.stages.clip_score import ClipScore
    from curate.stages.dedup import Dedup
    from curate.stages.download import Download
    from curate.stages.faces import Faces
    from curate.stages.filter import ThresholdFilter
    from curate.stages.fuse_captions import FuseCaptions
    from curate.stages.nsfw import Nsfw
    from curate.stages.recaption import Recaption
    from curate.stages.reward import Reward
    from curate.stages.vqa_score import VqaScore
    from curate.stages.watermark import Watermark

    # In this order, by module name: the order of their columns in every written table (and its bytes).
    for cls in (
        Aesthetic,
        BasicFilter,
        Blocklist,
        ClipScore,
        Dedup,
        Download,
        Faces,
        ThresholdFilter,
        FuseCaptions,
        Nsfw,
        Recaption,
        Reward,
        VqaScore,
        Watermark,
    ):
        register(cls)


_register_builtin()

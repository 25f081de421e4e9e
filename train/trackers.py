"""Where the trainer's scalars and sample grids go: TensorBoard always (``<output>/logs``), and Weights & Biases
too with ``logging: wandb``.

Both get the same things under the same names (``train/loss``, ``train/lr``, ``train/samples_per_s``,
``val/<metric>``, ``val/samples``) at the same steps. The W&B run's id is kept in ``<output>/logs/wandb-run-id``
so that a resumed training continues the same run. ``WANDB_MODE=offline`` writes the run under
``WANDB_DIR`` (default ``<output>/logs``) for a later ``wandb sync``; nothing here needs a network then.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from curate.base import TrainError

__all__ = ["Trackers"]


class Trackers:
    """TensorBoard, plus a W&B run when ``cfg.logging`` is ``wandb``; rank 0 only."""

    def __init__(self, cfg: Any, output: Path):
        from tensorboardX import SummaryWriter

        logs = output / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.tensorboard = SummaryWriter(str(logs))
        self.wandb: Any = None
        if cfg.logging == "wandb":
            try:
                import wandb
            except ImportError:
                raise TrainError("logging: wandb needs the wandb package: pip install wandb") from None
            id_file = logs / "wandb-run-id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            self.wandb = wandb.init(
                project=cfg.wandb_project or cfg.name,
                name=cfg.name,
                id=run_id,
                resume="allow",
                dir=None if os.environ.get("WANDB_DIR") else str(logs),
                config=cfg.to_dict(),
            )
            id_file.write_text(run_id)

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({tag: value}, step=step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``image``: uint8 [H, W, 3]."""
        self.tensorboard.add_image(tag, image, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()

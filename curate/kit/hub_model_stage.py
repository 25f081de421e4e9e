"""What the stages that run a generative model from the hub (``recaption``, ``fuse_captions``) share: the
config of where the model comes from and how it runs, its weights, and where it resolves to."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from curate.base import StrictModel
from curate.core.stage import Stage
from curate.models.device import Device, Precision
from curate.models.hub import check_backend, is_hub_id, model_label, repo_spec, resolve_model
from curate.models.weights import WeightsSpec

__all__ = ["HubModelConfig", "HubModelStage"]


class HubModelConfig(StrictModel):
    """``model`` (a hub id or a local folder) is declared by each stage with its own default."""

    model: str
    revision: str = Field("main", description="hub revision (branch, tag or commit) of a hub id")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers; vllm: GPUs only, needs curate[vllm]"
    )
    max_new_tokens: int = Field(60, gt=0, description="longest answer, in tokens")
    batch_size: int = Field(16, gt=0)
    device: Device = "auto"
    precision: Precision = Field("auto", description="auto: bf16 (fp16) on a GPU, fp32 on a CPU")
    torch_threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's)")
    trust_remote_code: bool = Field(
        False, description="run the model repository's own Python code (hf, vllm)"
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="vllm: share of GPU memory it takes")
    max_model_len: int | None = Field(None, gt=0, description="vllm: context length (default: the model's)")


class HubModelStage(Stage):
    """A stage whose model is a whole hub repository; ``role`` names it in messages ("VLM captioner")."""

    role: ClassVar[str]
    config: HubModelConfig

    def __init__(self, config: HubModelConfig | None = None):
        super().__init__(config)
        check_backend(self.name, self.config.backend)

    def weights(self) -> list[WeightsSpec]:
        c = self.config
        return [repo_spec(self.role, c.model, c.revision)] if is_hub_id(c.model) else []

    def locate(self) -> tuple[Path, str]:
        """The model's local folder (downloaded if need be) and its label for the ``*_model`` column."""
        c = self.config
        return resolve_model(self.role, c.model, c.revision), model_label(c.model, c.revision)

    def backend_options(self) -> dict[str, Any]:
        """The loading options of the configured backend that every hub model takes."""
        c = self.config
        common = {
            "max_new_tokens": c.max_new_tokens,
            "precision": c.precision,
            "trust_remote_code": c.trust_remote_code,
        }
        if c.backend == "vllm":
            return {
                **common,
                "gpu_memory_utilization": c.gpu_memory_utilization,
                "max_model_len": c.max_model_len,
            }
        return {**common, "device": c.device, "threads": c.torch_threads}

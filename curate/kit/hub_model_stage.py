"""What the stages that run a generative model from the hub (``recaption``, ``fuse_captions``) share: the
config of where the model comes from and how it runs, its weights, and where it resolves to."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from curate.base import MemoryNeed, StrictModel
from curate.core.stage import Stage, StageResources
from curate.models.device import Device, Precision
from curate.models.hub import check_backend, is_hub_id, model_label, repo_spec, resolve_model
from curate.models.weights import WeightsSpec, local_path

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

    def resources_after(self, upstream: Sequence[Stage]) -> StageResources:
        if self.config.backend == "vllm":  # vLLM takes a share of a whole GPU's memory for itself
            return StageResources(cpus=1, uses_model=True, gpus_if_any=1.0)
        return self.resources

    def model_config(self) -> tuple[dict[str, Any] | None, Path | None]:
        """The model's config.json and its folder where the model is here; else the published config.json
        kept in the repo for a known hub id (``curate.models.stand_in``), without a folder; else (None, None)."""
        c = self.config
        path = Path(c.model).expanduser()
        folder = path if path.exists() else None
        if folder is None and is_hub_id(c.model):
            folder = local_path(repo_spec(self.role, c.model, c.revision))
        if folder is not None and (folder / "config.json").exists():
            return json.loads((folder / "config.json").read_text()), folder
        if is_hub_id(c.model):
            from curate.models.stand_in import published_config

            return published_config(c.model), None
        return None, None

    def prompt_tokens(self, upstream: Sequence[Stage]) -> tuple[int, int]:
        """(text tokens, image tokens) of a typical prompt: what the working-set estimate assumes."""
        return 64, 0

    def memory(self, device: str, upstream: Sequence[Stage] = ()) -> MemoryNeed:
        from curate.models.footprint import generator_need, hf_params, safetensors_params

        c = self.config
        config, folder = self.model_config()
        if config is None:
            raise ValueError(
                f"{self.role} {c.model}: no config.json here to size it from; run `curate models fetch` (or "
                "`curate models stand-in`), or give the stage resources.memory"
            )
        params = (safetensors_params(folder) if folder else None) or hf_params(config)
        text, image = self.prompt_tokens(upstream)
        device = "cuda" if c.backend == "vllm" else device
        return generator_need(
            config,
            params,
            device,
            c.batch_size,
            text,
            c.max_new_tokens,
            image_tokens=image,
            precision=c.precision,
            name=model_label(c.model, c.revision),
        )

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

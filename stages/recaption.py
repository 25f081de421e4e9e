"""Recaptioning: a vision-language model writes a synthetic caption of every kept image.

Writes ``caption_vlm``, the model's caption cleaned to one line (without a prompt it repeated), and
``caption_vlm_model``, which model wrote it, for every row that is ok, kept and has an image that decodes.
Every other row gets null, and so does a row whose caption came out empty. Placed after the filters and
dedup, so that no dropped row costs model time. The alt-text in ``caption`` is never changed:
``fuse_captions`` combines both, and ``output.train_caption`` decides which one a sample trains on.

Backends (``backend``): ``hf`` (transformers: BLIP, BLIP-2, Florence-2, Qwen2-VL, LLaVA and other chat VLMs;
see :mod:`curate.models.vlm`) and ``vllm`` (optional extra ``curate[vllm]``, NVIDIA GPUs only).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Literal

import pyarrow as pa
from pydantic import Field

from curate.core.schema import Column
from curate.core.stage import Stage, StageResources, set_column
from curate.kit.captions import clean_vlm_caption
from curate.kit.hub_model_stage import HubModelConfig, HubModelStage
from curate.kit.image_batches import iter_batches, rows_to_score, scatter

Family = Literal["auto", "blip", "blip2", "florence2", "qwen2_vl", "llava", "chat"]


class RecaptionConfig(HubModelConfig):
    model: str = Field(
        "Salesforce/blip-image-captioning-large",
        description="hub id (resolved through the model directory, CURATE_MODEL_DIR) or a local model folder",
    )
    family: Family = Field("auto", description="how the model is prompted; auto: from its config.json")
    prompt: str | None = Field(
        None,
        description="default per family: none for blip/blip2, <MORE_DETAILED_CAPTION> for florence2, a "
        "one-or-two-sentence description request for chat VLMs (qwen2_vl, llava, chat)",
    )
    max_new_tokens: int = Field(60, gt=0, description="longest caption, in tokens")
    num_beams: int = Field(1, ge=1, description="1: greedy decoding (deterministic); more: beam search (hf)")
    max_chars: int = Field(1000, gt=0, description="captions are cut to this many characters, at a word")
    decode_threads: int | None = Field(None, gt=0, description="CPU threads decoding images (default: cores)")


class Recaption(HubModelStage):
    name = "recaption"
    Config = RecaptionConfig
    columns = (
        Column(
            "caption_vlm", pa.string(), "recaption", "synthetic caption written by a vision-language model"
        ),
        Column(
            "caption_vlm_model", pa.string(), "recaption", "the vision-language model that wrote caption_vlm"
        ),
    )
    reads = ("image", "status", "drop_reason")
    writes = ("caption_vlm", "caption_vlm_model")
    resources = StageResources(cpus=1, uses_model=True, gpus_if_any=0.5)

    def prompt_tokens(self, upstream: Sequence[Stage]) -> tuple[int, int]:
        """The instruction, and the image's tokens: Qwen2-VL gives a 28x28 px patch one token, so an image
        of the download stage's size (512 px where no earlier stage says) is (side / 28)^2 of them."""
        side = next(
            (getattr(s.config, "image_size", None) for s in upstream if getattr(s, "name", "") == "download"),
            None,
        )
        side = side or 512
        config, _ = self.model_config()
        if (config or {}).get("model_type", "") in ("qwen2_vl", "qwen2_5_vl"):
            return 48, math.ceil(side / 28) ** 2
        return 48, 0

    config: RecaptionConfig

    role = "VLM captioner"

    def setup(self) -> None:
        c = self.config
        folder, name = self.locate()
        if c.backend == "vllm":
            from curate.models.vlm import VllmCaptioner

            self.captioner = VllmCaptioner.load(
                folder, name, family=c.family, prompt=c.prompt, **self.backend_options()
            )
        else:
            from curate.models.vlm import HfCaptioner

            self.captioner = HfCaptioner.load(
                folder,
                name,
                family=c.family,
                prompt=c.prompt,
                num_beams=c.num_beams,
                **self.backend_options(),
            )

    def __call__(self, table: pa.Table) -> pa.Table:
        c, n = self.config, table.num_rows
        threads = c.decode_threads or os.cpu_count() or 1
        done, captions = [], []
        for batch_rows, images in iter_batches(table, rows_to_score(table), _same, c.batch_size, threads):
            ok = [(r, img) for r, img in zip(batch_rows, images, strict=True) if img is not None]
            if not ok:
                continue
            raw = self.captioner.caption([img for _, img in ok])
            for (r, _), text in zip(ok, raw, strict=True):
                text = clean_vlm_caption(text, self.captioner.prompt, c.max_chars)
                if text:
                    done.append(r)
                    captions.append(text)
        table = set_column(table, "caption_vlm", scatter(n, done, captions))
        return set_column(table, "caption_vlm_model", scatter(n, done, [self.captioner.name] * len(done)))


def _same(image):
    return image

"""Caption fusion after CapsFusion (Yu et al., "CapsFusion: Rethinking Image-Text Data at Scale", CVPR 2024).

Web alt-text knows things an image captioner cannot see (names of people, places, brands, species, events);
a synthetic caption describes what is visible, in good sentences, but knows no names. Training on synthetic
captions alone loses that world knowledge. An LLM merges both into ``caption_fused``: the names and facts of
the alt-text, the structure and visual detail of the synthetic caption, without what contradicts it.

Writes, for every row that is ok and kept:

- ``caption_fused``: the LLM's answer, cleaned (see :func:`curate.kit.captions.clean_fused_caption`); where that
  answer is unusable, or there was nothing to fuse, ``caption_vlm`` instead;
- ``fusion_status``, what happened:

  ==================  ==========================================================================
  ``fused``           the LLM's cleaned answer
  ``fallback_empty``  the answer was empty after cleaning: caption_vlm
  ``fallback_short``  shorter than ``min_chars`` after cleaning: caption_vlm
  ``fallback_echo``   it repeated the instruction instead of answering: caption_vlm
  ``no_alt_text``     the alt-text is empty, nothing to fuse (the LLM is not asked): caption_vlm
  ``no_vlm_caption``  no caption_vlm for the row (recaption skipped it): caption_fused is null
  ==================  ==========================================================================

- ``caption_fused_model``: the LLM, for the rows it was asked about (``fused`` and ``fallback_*``).

Rows that are not ok or were dropped get null in all three. The prompt is configurable: ``system_prompt``,
and ``prompt`` with ``{alt}`` and ``{vlm}`` where the two captions go; it goes through the tokenizer's chat
template when the model has one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pyarrow as pa
from pydantic import Field, field_validator

from curate.core.schema import Column, is_kept
from curate.core.stage import Stage, StageResources, set_column
from curate.kit.captions import clean_fused_caption, cut_to_length, instruction_fragments, one_line
from curate.kit.hub_model_stage import HubModelConfig, HubModelStage
from curate.kit.image_batches import scatter

DEFAULT_SYSTEM_PROMPT = (
    "You write captions of images for training text-to-image models. You answer with the caption only."
)
DEFAULT_PROMPT = (
    "Merge two captions of the same image into one.\n"
    "The alt-text comes from the web page of the image. It may name real people, places, brands, artworks, "
    "species, events and dates, but it is often ungrammatical or incomplete, and padded with words that do "
    "not describe the image.\n"
    "The synthetic caption was written by an image captioning model. It describes what is visible, in good "
    "sentences, but it knows no names and can be wrong about details.\n"
    "Write one fluent caption that keeps the names and real-world facts of the alt-text and the structure "
    "and visual details of the synthetic caption. Leave out whatever in the alt-text contradicts what the "
    "synthetic caption says is visible, and whatever does not describe the image (file names, sizes, prices, "
    "shop names, 'stock photo', calls to action). Do not just put one after the other, and do not explain.\n"
    "\n"
    "Alt-text: {alt}\n"
    "Synthetic caption: {vlm}"
)
_PLACEHOLDER = re.compile(r"\{(alt|vlm)\}")


class FuseCaptionsConfig(HubModelConfig):
    model: str = Field(
        "Qwen/Qwen2.5-1.5B-Instruct",
        description="causal LM: hub id (resolved through the model directory, CURATE_MODEL_DIR) or a local "
        "model folder",
    )
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="the system message ('' for none)")
    prompt: str = Field(DEFAULT_PROMPT, description="the user message; {alt} and {vlm} are the two captions")
    response_prefix: str = Field(
        "",
        description="text the answer starts with, after the prompt (e.g. 'Merged caption:' for base models)",
    )
    use_chat_template: bool = Field(True, description="use the tokenizer's chat template when it has one")
    max_new_tokens: int = Field(96, gt=0, description="longest answer, in tokens")
    max_input_chars: int = Field(600, gt=0, description="each caption is cut to this before it goes in")
    max_chars: int = Field(500, gt=0, description="the fused caption is cut to this, at a sentence or word")
    min_chars: int = Field(8, ge=1, description="a shorter answer is unusable: caption_vlm is kept instead")
    batch_size: int = Field(32, gt=0)

    @field_validator("prompt")
    @classmethod
    def _has_placeholders(cls, v: str) -> str:
        missing = [p for p in ("{alt}", "{vlm}") if p not in v]
        if missing:
            raise ValueError(f"must contain {' and '.join(missing)}, where the captions go")
        return v


def fill_prompt(template: str, alt: str, vlm: str) -> str:
    """``template`` with ``{alt}`` and ``{vlm}`` replaced in one pass (a caption may contain braces)."""
    return _PLACEHOLDER.sub(lambda m: alt if m.group(1) == "alt" else vlm, template)


class FuseCaptions(HubModelStage):
    name = "fuse_captions"
    Config = FuseCaptionsConfig
    columns = (
        Column("caption_fused", pa.string(), "fuse_captions", "alt-text and caption_vlm merged by an LLM"),
        Column("caption_fused_model", pa.string(), "fuse_captions", "the LLM that wrote caption_fused"),
        Column(
            "fusion_status",
            pa.string(),
            "fuse_captions",
            "fused, or why caption_fused is caption_vlm: fallback_empty|short|echo, no_alt_text; "
            "no_vlm_caption",
        ),
    )
    reads = ("caption", "caption_vlm", "status", "drop_reason")
    writes = ("caption_fused", "caption_fused_model", "fusion_status")
    resources = StageResources(cpus=1, uses_model=True, gpus_if_any=0.5)

    def prompt_tokens(self, upstream: Sequence[Stage]) -> tuple[int, int]:
        # The system prompt and instruction (about 150 tokens) with an alt-text and a synthetic caption.
        return 300, 0

    config: FuseCaptionsConfig

    role = "caption fusion LLM"

    def __init__(self, config: FuseCaptionsConfig | None = None):
        super().__init__(config)
        self.fragments = instruction_fragments(self.config.system_prompt, self.config.prompt)

    def setup(self) -> None:
        c = self.config
        folder, name = self.locate()
        if c.backend == "vllm":
            from curate.models.llm import VllmGenerator

            self.llm = VllmGenerator.load(
                folder, name, use_chat_template=c.use_chat_template, **self.backend_options()
            )
        else:
            from curate.models.llm import HfGenerator

            self.llm = HfGenerator.load(
                folder, name, use_chat_template=c.use_chat_template, **self.backend_options()
            )

    def prompt_for(self, alt: str, vlm: str) -> str:
        """The rendered prompt for one pair of captions."""
        c = self.config
        user = fill_prompt(
            c.prompt,
            cut_to_length(one_line(alt), c.max_input_chars),
            cut_to_length(one_line(vlm), c.max_input_chars),
        )
        return self.llm.render(c.system_prompt, user, c.response_prefix)

    def __call__(self, table: pa.Table) -> pa.Table:
        c, n = self.config, table.num_rows
        kept = is_kept(table).to_pylist() if n else []
        alts = table["caption"].to_pylist()
        vlms = table["caption_vlm"].to_pylist()
        fused: list[str | None] = [None] * n
        status: list[str | None] = [None] * n
        asked: list[int] = []
        for i in range(n):
            if not kept[i]:
                continue
            if not (vlms[i] or "").strip():
                status[i] = "no_vlm_caption"
            elif not (alts[i] or "").strip():
                fused[i], status[i] = vlms[i], "no_alt_text"
            else:
                asked.append(i)
        prompts = [self.prompt_for(alts[i], vlms[i]) for i in asked]
        answers = self.llm.generate(prompts, c.batch_size)
        for i, prompt, answer in zip(asked, prompts, answers, strict=True):
            text, why = clean_fused_caption(
                answer, prompt=prompt, fragments=self.fragments, max_chars=c.max_chars, min_chars=c.min_chars
            )
            fused[i], status[i] = (text, why) if why == "fused" else (vlms[i], why)
        table = set_column(table, "caption_fused", fused)
        table = set_column(table, "fusion_status", status)
        return set_column(table, "caption_fused_model", scatter(n, asked, [self.llm.name] * len(asked)))

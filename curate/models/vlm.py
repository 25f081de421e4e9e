"""Vision-language captioners: RGB images in, one caption per image out. Know nothing of shards or configs.

Two backends behind one small interface (:class:`Captioner`: ``name`` and ``caption(images)``):

- :class:`HfCaptioner`, transformers: ``AutoProcessor`` + ``AutoModelForImageTextToText`` + ``generate``,
  batched, greedy (or beam search), bf16 on a GPU, fp32 on a CPU. The families differ in how they are
  prompted:

  ==============  =====================================================  ===================================
  family          models                                                 prompt
  ==============  =====================================================  ===================================
  ``blip``        BLIP (``Salesforce/blip-image-captioning-*``)          none, or a prefix it continues
                                                                         ("a picture of"), stripped after
  ``blip2``       BLIP-2 (``Salesforce/blip2-opt-2.7b``, ...)            none, or "Question: ... Answer:"
  ``florence2``   Florence-2 (transformers' own port)                    a task token: ``<MORE_DETAILED_CAPTION>``
  ``qwen2_vl``,   Qwen2-VL / Qwen2.5-VL, LLaVA, and any other chat VLM   an instruction in the processor's chat
  ``llava``,      whose processor has a chat template                    template, with the image
  ``chat``
  ==============  =====================================================  ===================================

  ``auto`` picks the family from ``config.json``'s ``model_type``.
- :class:`VllmCaptioner`, vLLM (optional, NVIDIA GPUs only): the same prompts, through ``vllm.LLM``.

Decoder-only models return the prompt with the answer; it is cut off by token count. BLIP returns its prompt
prefix as text, which :func:`curate.kit.captions.clean_vlm_caption` strips. A captioner loaded from a stand-in
folder (random weights, :mod:`curate.models.stand_in`) has " (stand-in)" in its ``name``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from curate.models.device import pick_device, pick_dtype
from curate.models.weights import stand_in_label

__all__ = [
    "DEFAULT_PROMPTS",
    "FAMILIES",
    "Captioner",
    "HfCaptioner",
    "VllmCaptioner",
    "detect_family",
    "dtype_kwargs",
    "quiet_progress",
    "render_prompt",
]

FAMILIES = ("blip", "blip2", "florence2", "qwen2_vl", "llava", "chat")
_FAMILY_OF_MODEL_TYPE = {
    "blip": "blip",
    "blip-2": "blip2",
    "florence2": "florence2",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_vl",
    "llava": "llava",
    "llava_next": "llava",
    "llava_onevision": "llava",
}
_CHAT = ("qwen2_vl", "llava", "chat")
DETAILED = "Describe this image in one or two sentences: the main subject, its setting and notable details."
DEFAULT_PROMPTS: dict[str, str] = {
    "blip": "",
    "blip2": "",
    "florence2": "<MORE_DETAILED_CAPTION>",
    "qwen2_vl": DETAILED,
    "llava": DETAILED,
    "chat": DETAILED,
}


class Captioner(Protocol):
    name: str  # recorded in caption_vlm_model
    prompt: str  # what the model was asked; a captioner may repeat it

    def caption(self, images: list[Any]) -> list[str]:
        """One raw caption per PIL RGB image, in order."""
        ...


def detect_family(folder: str | Path) -> str:
    """The family of a transformers model folder, from its ``config.json``."""
    config = json.loads((Path(folder) / "config.json").read_text())
    model_type = config.get("model_type", "")
    if model_type in _FAMILY_OF_MODEL_TYPE:
        return _FAMILY_OF_MODEL_TYPE[model_type]
    return "chat"  # any other image-text-to-text model: prompted through its chat template


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' progress bars off while a model loads or saves: a worker's log is no terminal."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def dtype_kwargs(dtype) -> dict[str, Any]:
    """``from_pretrained``'s dtype argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_hf_model(
    auto_class: Any,
    folder: str | Path,
    device: str,
    precision: str,
    threads: int | None,
    trust_remote_code: bool,
) -> tuple[Any, Any, Any]:
    """(model, device, dtype): ``auto_class.from_pretrained(folder)`` in the precision the device takes, on
    it, in eval mode; ``threads`` sets torch's CPU threads first."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    dtype = pick_dtype(dev, precision)
    with quiet_progress():
        model = auto_class.from_pretrained(folder, trust_remote_code=trust_remote_code, **dtype_kwargs(dtype))
    return model.to(dev).eval(), dev, dtype


def render_prompt(processor: Any, family: str, prompt: str) -> str:
    """The text that goes to the processor with each image."""
    if family not in _CHAT:
        return prompt
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if family == "llava":  # LLaVA-1.5's layout, for checkpoints saved without a chat template
        return f"USER: <image>\n{prompt} ASSISTANT:"
    raise ValueError(
        f"the {family} model's processor has no chat template: give family blip, blip2 or florence2 if it is "
        "one of those, or a model whose processor has a chat template"
    )


@dataclass
class HfCaptioner:
    model: Any
    processor: Any
    family: str
    prompt: str
    text: str  # the prompt as rendered for the processor
    device: Any
    dtype: Any
    max_new_tokens: int
    num_beams: int
    name: str

    @classmethod
    def load(
        cls,
        folder: str | Path,
        name: str,
        *,
        family: str = "auto",
        prompt: str | None = None,
        max_new_tokens: int = 60,
        num_beams: int = 1,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        trust_remote_code: bool = False,
    ) -> HfCaptioner:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        family = detect_family(folder) if family == "auto" else family
        with quiet_progress():
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model, dev, dtype = load_hf_model(
            AutoModelForImageTextToText, folder, device, precision, threads, trust_remote_code
        )
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None and not model.config.is_encoder_decoder and family != "blip":
            tokenizer.padding_side = "left"  # a decoder-only batch must end where generation starts
        prompt = DEFAULT_PROMPTS[family] if prompt is None else prompt
        text = render_prompt(processor, family, prompt)
        name = stand_in_label(name, folder)
        return cls(model, processor, family, prompt, text, dev, dtype, max_new_tokens, num_beams, name)

    def caption(self, images: list[Any]) -> list[str]:
        import torch

        if not images:
            return []
        n = len(images)
        if self.family == "blip" and not self.text:
            inputs = self.processor(images=images, return_tensors="pt")
        else:
            inputs = self.processor(images=images, text=[self.text] * n, return_tensors="pt", padding=True)
        inputs = inputs.to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False
            )
        prompt_ids = inputs.get("input_ids")
        if prompt_ids is not None and _starts_with(out, prompt_ids):
            out = out[:, prompt_ids.shape[1] :]
        return self.processor.batch_decode(out, skip_special_tokens=True)


def _starts_with(out, prompt_ids) -> bool:
    import torch

    k = prompt_ids.shape[1]
    return out.shape[1] >= k and bool(torch.equal(out[:, :k], prompt_ids.to(out.device)))


@dataclass
class VllmCaptioner:
    llm: Any
    sampling: Any
    family: str
    prompt: str
    text: str
    name: str

    @classmethod
    def load(
        cls,
        folder: str | Path,
        name: str,
        *,
        family: str = "auto",
        prompt: str | None = None,
        max_new_tokens: int = 60,
        precision: str = "auto",
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
    ) -> VllmCaptioner:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(
                "backend vllm runs on NVIDIA GPUs only and this worker has none; use backend: hf"
            )
        from transformers import AutoProcessor
        from vllm import LLM, SamplingParams

        family = detect_family(folder) if family == "auto" else family
        prompt = DEFAULT_PROMPTS[family] if prompt is None else prompt
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        llm = LLM(
            model=str(folder),
            dtype={"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision],
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": 1},
            trust_remote_code=trust_remote_code,
        )
        sampling = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
        name = stand_in_label(name, folder)
        return cls(llm, sampling, family, prompt, render_prompt(processor, family, prompt), name)

    def caption(self, images: list[Any]) -> list[str]:
        if not images:
            return []
        requests = [{"prompt": self.text, "multi_modal_data": {"image": img}} for img in images]
        outs = self.llm.generate(requests, self.sampling, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

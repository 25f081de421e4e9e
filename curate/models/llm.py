"""Causal language models for caption fusion: prompts in, completions out. Know nothing of shards or configs.

Two backends behind one small interface (:class:`TextGenerator`: ``name``, ``render`` and ``generate``):

- :class:`HfGenerator`, transformers: any ``AutoModelForCausalLM`` (an instruct model such as
  ``Qwen/Qwen2.5-1.5B-Instruct``, or CapsFusion's own ``BAAI/CapsFus-LLaMA``), batched with left padding,
  prompts sorted by length so that a batch pads little, greedy decoding, bf16 on a GPU, fp32 on a CPU;
- :class:`VllmGenerator`, vLLM (optional, NVIDIA GPUs only): continuous batching, the same prompts.

``render`` puts a system and a user message through the tokenizer's chat template when it has one (and it is
not switched off), else joins them as plain text; ``response_prefix`` is appended either way, so the model
continues from it ("Caption:"). A generator loaded from a stand-in folder (random weights,
:mod:`curate.models.stand_in`) has " (stand-in)" in its ``name``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from curate.models.weights import stand_in_label

__all__ = ["HfGenerator", "TextGenerator", "VllmGenerator", "render_chat"]


class TextGenerator(Protocol):
    name: str  # recorded in caption_fused_model

    def render(self, system: str, user: str, response_prefix: str = "") -> str: ...

    def generate(self, prompts: list[str], batch_size: int) -> list[str]:
        """The completion of every prompt, without the prompt, in order."""
        ...


def render_chat(tokenizer: Any, system: str, user: str, response_prefix: str = "", chat: bool = True) -> str:
    """The prompt text for ``tokenizer``'s model."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:
            # A template without a system role (Gemma's, Mistral's): it goes in front of the user's message.
            merged = [{"role": "user", "content": f"{system}\n\n{user}" if system else user}]
            text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
        return text + response_prefix
    parts = [p for p in (system, user) if p]
    return "\n\n".join(parts) + "\n" + response_prefix


@dataclass
class HfGenerator:
    model: Any
    tokenizer: Any
    device: Any
    max_new_tokens: int
    chat: bool
    name: str

    @classmethod
    def load(
        cls,
        folder: str | Path,
        name: str,
        *,
        max_new_tokens: int = 96,
        use_chat_template: bool = True,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        trust_remote_code: bool = False,
    ) -> HfGenerator:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from curate.models.vlm import load_hf_model

        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        tokenizer.padding_side = "left"  # a batch must end where generation starts
        if tokenizer.pad_token is None:  # Llama-style tokenizers have none; padding is masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        model, dev, _ = load_hf_model(
            AutoModelForCausalLM, folder, device, precision, threads, trust_remote_code
        )
        chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
        name = stand_in_label(name, folder)
        return cls(model, tokenizer, dev, max_new_tokens, chat, name)

    def render(self, system: str, user: str, response_prefix: str = "") -> str:
        return render_chat(self.tokenizer, system, user, response_prefix, self.chat)

    def generate(self, prompts: list[str], batch_size: int) -> list[str]:
        import torch

        if not prompts:
            return []
        # A chat template writes its own BOS; a plain prompt gets the tokenizer's.
        encoded = self.tokenizer(prompts, add_special_tokens=not self.chat)["input_ids"]
        order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
        out: list[str] = [""] * len(prompts)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = self.tokenizer.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.inference_mode():
                ids = self.model.generate(
                    **batch,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            texts = self.tokenizer.batch_decode(
                ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
            )
            for i, text in zip(rows, texts, strict=True):
                out[i] = text
        return out


@dataclass
class VllmGenerator:
    llm: Any
    sampling: Any
    tokenizer: Any
    chat: bool
    name: str

    @classmethod
    def load(
        cls,
        folder: str | Path,
        name: str,
        *,
        max_new_tokens: int = 96,
        use_chat_template: bool = True,
        precision: str = "auto",
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
    ) -> VllmGenerator:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(
                "backend vllm runs on NVIDIA GPUs only and this worker has none; use backend: hf"
            )
        from transformers import AutoTokenizer
        from vllm import LLM, SamplingParams

        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        llm = LLM(
            model=str(folder),
            dtype={"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision],
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            trust_remote_code=trust_remote_code,
        )
        chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
        name = stand_in_label(name, folder)
        return cls(llm, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), tokenizer, chat, name)

    def render(self, system: str, user: str, response_prefix: str = "") -> str:
        return render_chat(self.tokenizer, system, user, response_prefix, self.chat)

    def generate(self, prompts: list[str], batch_size: int) -> list[str]:
        if not prompts:
            return []
        # Token ids, encoded as the hf backend does: a chat template's text already holds its BOS.
        ids = self.tokenizer(prompts, add_special_tokens=not self.chat)["input_ids"]
        requests = [{"prompt_token_ids": x} for x in ids]
        outs = self.llm.generate(requests, self.sampling, use_tqdm=False)  # vLLM batches on its own
        return [o.outputs[0].text for o in outs]

"""VQAScore (Lin et al., "Evaluating Text-to-Visual Generation with Image-to-Text Generation"): the probability
that a vision-language model answers "Yes" when asked whether the image shows the prompt. Knows nothing of
shards or configs.

CLIPScore treats a prompt as a bag of words ("a dog on a cat" scores as "a cat on a dog"); a VLM reads the
question as a sentence. The score is t2v_metrics' for transformers VLMs: the question
``Does this figure show "{prompt}"? Please answer yes or no.`` is put to the model as the recaption stage
prompts it (:mod:`curate.models.vlm`: the chat template with the image for Qwen2-VL, LLaVA and other chat
VLMs; ``Question: ... Answer:`` for BLIP-2; the instruction as it is for InstructBLIP), and the score is the
softmax over the whole vocabulary of the logits at the first answer position, read at the answer's token
(``tokenizer.encode("Yes")`` without special tokens, which must be one token of the vocabulary).

BLIP (the captioner) and Florence-2 answer no free-form questions (a caption prefix; task tokens), so
VQAScore does not apply to them and asking for it is an error.

:class:`VqaScorer` is also a prompt scorer for the trainer's validation (``train.validate.PromptScorer``:
generated images and their prompts in, ``{"vqa_score": mean, "n": count, "per_prompt": [...]}`` out).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curate.models.weights import stand_in_label

__all__ = ["ANSWER", "FAMILIES", "QUESTION", "VqaScorer", "answer_token", "detect_vqa_family"]

QUESTION = 'Does this figure show "{}"? Please answer yes or no.'  # t2v_metrics' default_question_template
ANSWER = "Yes"
FAMILIES = ("blip2", "instructblip", "qwen2_vl", "llava", "chat")
_DECODER_ONLY_PROMPTS = {"blip2": "Question: {} Answer:", "instructblip": "{}"}
_NOT_VQA = {
    "blip": "BLIP's captioning model continues a caption prefix and answers no questions",
    "florence2": "Florence-2 is prompted with task tokens (<CAPTION>, <OD>, ...) and has no yes/no task",
}


def detect_vqa_family(folder: str | Path) -> str:
    """The family of a transformers VLM folder for VQAScore, from its ``config.json``."""
    from curate.models.vlm import detect_family

    model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type", "")
    if model_type in ("instructblip", "instructblipvideo"):
        return "instructblip"
    return detect_family(folder)


def answer_token(tokenizer: Any, answer: str, model: str) -> int:
    """The id of ``answer``'s single token; ValueError when it is not one token of the vocabulary."""
    ids = tokenizer.encode(answer, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(ids) != 1 or ids[0] == unk:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(
            f"VQAScore: the answer {answer!r} is not a token of {model}'s vocabulary (it encodes as {pieces}); "
            "its probability at the answer position is the score, so it must be one token: give an answer "
            "the tokenizer has as one token"
        )
    return int(ids[0])


@dataclass
class VqaScorer:
    model: Any
    processor: Any
    family: str
    question: str  # with "{}" where the prompt goes
    answer: str
    answer_id: int
    device: Any
    dtype: Any
    name: str  # recorded in vqa_model

    @classmethod
    def load(
        cls,
        folder: str | Path,
        name: str,
        *,
        family: str = "auto",
        question: str = QUESTION,
        answer: str = ANSWER,
        device: str = "auto",
        precision: str = "auto",
        threads: int | None = None,
        trust_remote_code: bool = False,
    ) -> VqaScorer:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from curate.models.vlm import load_hf_model, quiet_progress

        family = detect_vqa_family(folder) if family == "auto" else family
        if family in _NOT_VQA:
            raise ValueError(f"VQAScore does not apply to {name}: {_NOT_VQA[family]}")
        if family not in FAMILIES:
            raise ValueError(f"VQAScore: no family {family!r}; one of {', '.join(FAMILIES)}")
        with quiet_progress():
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
        tokenizer = processor.tokenizer
        answer_id = answer_token(tokenizer, answer, name)  # before the weights load: a bad answer fails fast
        model, dev, dtype = load_hf_model(
            AutoModelForImageTextToText, folder, device, precision, threads, trust_remote_code
        )
        if not model.config.is_encoder_decoder:
            tokenizer.padding_side = "left"  # a batch's prompts must all end at the answer position
        name = stand_in_label(name, folder)
        return cls(model, processor, family, question, answer, answer_id, dev, dtype, name)

    def prompt(self, text: str) -> str:
        """What the processor gets with the image for caption ``text``."""
        from curate.models.vlm import render_prompt

        question = self.question.format(text)
        if self.family in _DECODER_ONLY_PROMPTS:
            return _DECODER_ONLY_PROMPTS[self.family].format(question)
        return render_prompt(self.processor, self.family, question)

    def score(self, images: list[Any], texts: list[str]) -> np.ndarray:
        """P(answer) per (PIL RGB image, caption) pair, float32, in order."""
        import torch

        if not images:
            return np.zeros(0, np.float32)
        inputs = self.processor(
            images=images, text=[self.prompt(t) for t in texts], return_tensors="pt", padding=True
        )
        inputs = inputs.to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=1,
                do_sample=False,
                num_beams=1,
                output_logits=True,
                return_dict_in_generate=True,
            )
            probs = torch.softmax(out.logits[0].float(), dim=-1)  # the unprocessed logits of the first answer
        return probs[:, self.answer_id].cpu().numpy().astype(np.float32)

    def __call__(self, images: list[Any], prompts: list[str], batch_size: int = 8) -> dict[str, Any]:
        """As a trainer's prompt scorer: the mean VQAScore of generated ``images`` for their ``prompts``."""
        scores = [
            self.score(images[i : i + batch_size], prompts[i : i + batch_size])
            for i in range(0, len(images), batch_size)
        ]
        values = np.concatenate(scores).tolist() if scores else []
        return {
            "vqa_score": float(np.mean(values)) if values else float("nan"),
            "n": len(values),
            "per_prompt": values,
        }

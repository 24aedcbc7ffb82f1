"""QFusionLMM: an lmms-eval model that evaluates a transformers VLM with a qfusion plugin attached.

    lmms-eval --model qfusion \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,plugin=path/to/plugin --tasks mme

``pretrained`` is the host checkpoint (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, BLIP-2 or InstructBLIP), ``plugin`` a directory written by ``adapter.save_pretrained`` (and
``QFusionProcessor.save_pretrained``). A request's visuals are its images (and, for hosts with video,
its videos: the file paths or frame arrays lmms-eval's video tasks give), all before its question;
the request's text is the question, rendered with the host's chat template when it has one.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from lmms_eval.api.model import lmms

import qfusion
from qfusion import QFusionProcessor
from qfusion.adapters import FusionCache
from qfusion.plugin import PROCESSOR_CONFIG_NAME


def _host_class(model_type: str):
    """The transformers class that loads a host checkpoint of this model type."""
    import transformers

    if model_type == "blip-2":
        return transformers.Blip2ForConditionalGeneration
    if model_type == "instructblip":
        return transformers.InstructBlipForConditionalGeneration
    return transformers.AutoModelForImageTextToText


def _dtype(value: str | torch.dtype):
    if isinstance(value, torch.dtype) or value == "auto":
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype: expected 'auto' or a torch dtype name such as 'bfloat16', got {value!r}")
    return dtype


def _count(name: str, value: int | str) -> int:
    """A model argument that counts tokens; lmms-eval passes --model_args values as strings."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a whole number of fused tokens, got {value!r}") from None


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return " ".join(item["text"] for item in content if item.get("type") == "text")


class QFusionLMM(lmms):
    """A host checkpoint with a qfusion plugin attached, for lmms-eval's ``generate_until``,
    ``loglikelihood`` and ``generate_until_multi_round`` (follow-up rounds reuse the fusion's cached
    vision prefix).

    pretrained: host checkpoint (hub id or directory).
    plugin: qfusion plugin directory.
    device: where the host goes ("cuda" when available, else "cpu"); ``device_map`` (e.g. "auto")
        instead spreads it with accelerate.
    dtype: "auto" (the checkpoint's), "bfloat16", "float16" or "float32".
    batch_size: requests per generate call (left-padded).
    max_new_tokens: default generation length when a task gives none.
    m, n: the budget (fused tokens for a first question / each follow-up); default the plugin's saved
        processor settings, else its config.
    """

    is_simple = True

    def __init__(self, pretrained: str, plugin: str, device: str | None = None, device_map: str | None = None,
                 dtype: str = "auto", batch_size: int | str = 1, max_new_tokens: int = 256,
                 m: int | str | None = None, n: int | str | None = None, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"qfusion model: unknown arguments {sorted(kwargs)}")
        from transformers import AutoConfig, AutoProcessor

        model_type = AutoConfig.from_pretrained(pretrained).model_type
        load = {"dtype": _dtype(dtype)}
        if device_map is not None:
            load["device_map"] = device_map
        model = _host_class(model_type).from_pretrained(pretrained, **load)
        if device_map is None:
            model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval()
        self.adapter = qfusion.attach(self.model, plugin)
        host_processor = AutoProcessor.from_pretrained(pretrained)
        budget = {name: _count(name, value) for name, value in (("m", m), ("n", n)) if value is not None}
        if os.path.isfile(os.path.join(plugin, PROCESSOR_CONFIG_NAME)):
            self.processor = QFusionProcessor.from_pretrained(plugin, host_processor, self.model, **budget)
        else:
            self.processor = QFusionProcessor(host_processor, self.model, **budget)
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    # ------------------------------------------------------------------ helpers

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def has_chat_template(self) -> bool:
        host = self.processor.host
        return bool(getattr(host, "chat_template", None) or getattr(host.tokenizer, "chat_template", None))

    def _visuals(self, request_args) -> tuple[list, list]:
        """(images, videos) of a request: video file paths (and frame arrays) are videos, the rest images."""
        *_, doc_to_visual, doc_id, task, split = request_args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if v is not None]
        if not visuals:
            raise ValueError(f"qfusion model: expected at least one image or video per request ({task}, doc {doc_id})")
        is_video = [isinstance(v, (str, os.PathLike)) or getattr(v, "ndim", 0) == 4 for v in visuals]
        return ([v for v, video in zip(visuals, is_video) if not video],
                [v for v, video in zip(visuals, is_video) if video])

    @staticmethod
    def _first_turn(question: str, images: list, videos: list) -> dict:
        """The first user turn: its image and video items, then the question."""
        items = [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
        return {"role": "user", "content": items + [{"type": "text", "text": question}]}

    @staticmethod
    def _question(context: str) -> str:
        return context.replace("<image>", "").replace("<video>", "").strip()

    def _inputs(self, visuals: list[tuple[list, list]], conversations: list[list[dict]], **kwargs):
        """Model inputs of a batch; visuals: per sample its (images, videos)."""
        images = [v[0] or None for v in visuals]
        videos = [v[1] or None for v in visuals]
        if self.has_chat_template:
            batch = self.processor(images=None if not any(images) else images,
                                   videos=None if not any(videos) else videos,
                                   conversations=conversations, padding_side="left", **kwargs)
        else:  # plain questions: every user turn in order, one image per sample
            if any(len(i or ()) != 1 for i in images) or any(videos):
                raise ValueError("qfusion model: a host processor without a chat template takes one image per request")
            questions = [[_text(m["content"]) for m in c if m["role"] == "user"] for c in conversations]
            batch = self.processor(images=[i[0] for i in images], questions=questions, padding_side="left", **kwargs)
        dtype = self.model.dtype
        return {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _generate(self, visuals: list[tuple[list, list]], conversations: list[list[dict]], gen_kwargs: dict,
                  cache=None) -> list[str]:
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = gen_kwargs.pop("temperature", 0) or 0
        settings = {"max_new_tokens": gen_kwargs.pop("max_new_tokens", self.max_new_tokens),
                    "num_beams": gen_kwargs.pop("num_beams", 1) or 1, "do_sample": temperature > 0}
        if temperature > 0:
            settings.update(temperature=temperature, top_p=gen_kwargs.pop("top_p", None))
        tokenizer = self.processor.tokenizer
        inputs = self._inputs(visuals, conversations)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **settings, qfusion_cache=cache,
                                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        for stop in until:
            texts = [text.split(stop)[0] if stop else text for text in texts]
        return [text.strip() for text in texts]

    # ------------------------------------------------------------------ the lmms interface

    def generate_until(self, requests) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        pending: dict[str, list[int]] = {}
        for i, request in enumerate(requests):  # batch requests with the same generation settings
            pending.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for indices in pending.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                args = [requests[i].args for i in chunk]
                visuals = [self._visuals(a) for a in args]
                conversations = [[self._first_turn(self._question(a[0]), *v)] for a, v in zip(args, visuals)]
                for i, text in zip(chunk, self._generate(visuals, conversations, args[0][1])):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), text)
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, target, *_ = request.args
            *_, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            visuals = self._visuals(request.args)
            conversation = [self._first_turn(self._question(context), *visuals),
                            {"role": "assistant", "content": continuation}]
            if not self.has_chat_template:
                raise ValueError("qfusion model: loglikelihood needs a host processor with a chat template")
            batch = self._inputs([visuals], [conversation], return_labels=True)
            labels = batch.pop("labels")
            labels[labels == self.processor.tokenizer.eos_token_id] = -100  # score the continuation only
            with torch.inference_mode():
                logits = self.model(**batch).logits[:, :-1].float()
            targets, scored = batch["input_ids"][:, 1:], labels[:, 1:] != -100
            logprobs = F.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
            greedy = bool((logits.argmax(-1) == targets)[scored].all())
            results.append((float(logprobs[scored].sum()), greedy))
        return results

    def generate_until_multi_round(self, requests) -> list[list[str]]:
        results = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            visuals = self._visuals((doc_to_visual, doc_id, task, split))
            cache, conversation, answers, info, round_idx = FusionCache(), [], [], None, 0
            while True:
                if round_idx:
                    _, context, terminal, answers, info = doc_to_text(
                        doc, previous_output=list(answers), round_idx=round_idx, previous_round_info=info)
                    answers = list(answers)
                    if terminal:
                        break
                question = self._question(context)
                conversation.append(self._first_turn(question, *visuals) if not round_idx
                                    else {"role": "user", "content": question})
                answer = self._generate([visuals], [conversation], gen_kwargs, cache)[0]
                conversation.append({"role": "assistant", "content": answer})
                answers.append(answer)
                round_idx += 1
            results.append(answers)
        return results

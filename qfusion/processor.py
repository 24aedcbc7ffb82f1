"""QFusionProcessor: a host processor's inputs for a model with a qfusion plugin attached.

A host processor expands every image (and video) into as many placeholders as the host has vision
tokens. With the plugin a sample with G questions needs m placeholders right before its first
question and n before each later one (in ``augment`` mode the host's own query tokens first), and the
questions themselves as ``qfusion_input_ids`` / ``qfusion_attention_mask`` of shape
(B, G_max, L_max). This wrapper builds both from the host's chat ``conversations`` (the user turns
are the questions) or from plain question strings, the images through the host's image processor
(or as HD views for an HD front-end) and the videos through its video processor.

It knows no host family by name: the host's :class:`qfusion.adapters.HostFamily` record and token
ids (from the attached model, the host's config or a saved plugin) say which placeholder tokens to
write, which markers go around every run, which token-type input the host reads and which extra
inputs it needs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import torch
from torch import Tensor

from qfusion.adapters.family import TOKEN_TYPES, HostFamily, HostTokens, family_for
from qfusion.budget import Budget
from qfusion.inputs import (check_placeholders, encode_image_counts, encode_questions, placeholder_blocks,
                            placeholder_counts, question_images)
from qfusion.plugin import (ADAPTER_CONFIG_NAME, QUESTION_TOKENIZER_DIR, read_plugin, read_processor_settings,
                            save_processor_settings)
from qfusion.vision import hd_views


def _positive(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


def _text_of(content) -> str:
    """The text of a chat message's content: a string, or the "text" items of a list of typed items."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return " ".join(item["text"] for item in content if isinstance(item, dict) and item.get("type") == "text")
    raise TypeError(
        f"conversations: a message content must be a string or a list of typed items, got {type(content).__name__}"
    )


def _visual_items(content) -> list[str]:
    """The kinds ("image" / "video") of the visual items of a chat message's content, in order."""
    if isinstance(content, str):
        return []
    return [item["type"] for item in content if isinstance(item, dict) and item.get("type") in ("image", "video")]


def _as_unit_image(image) -> Any:
    """A PIL image as is, or a (C, H, W) float tensor in [0, 1] from uint8/float arrays and tensors."""
    if hasattr(image, "convert"):  # PIL
        return image
    tensor = torch.as_tensor(image)
    if tensor.dim() == 3 and tensor.shape[-1] in (1, 3, 4) and tensor.shape[0] not in (1, 3, 4):
        tensor = tensor.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
    if tensor.dim() != 3:
        raise ValueError(f"images: expected (C, H, W) or (H, W, C) images, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        return tensor.float() / 255
    return tensor


def _adapter_of(model):
    """The adapter of an attached host; None for a host config (or None)."""
    if model is None or hasattr(model, "model_type"):
        return None
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            "model: expected a host with a qfusion plugin attached or the host's transformers config, "
            f"got {type(model).__name__}"
        )
    from qfusion.adapters.adapter import get_adapter

    return get_adapter(model)


def _processor_markers(host_processor, tokenizer, names: tuple[str, str]) -> dict[str, int]:
    """The ids of the marker tokens a host processor names in its attributes ``names``."""
    ids = {}
    for role, name in zip(("start", "end"), names):
        if name is None:
            continue
        token = getattr(host_processor, name, None)
        token_id = None if token is None else tokenizer.convert_tokens_to_ids(str(getattr(token, "content", token)))
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"host_processor: has no {name} marker token its host family writes around fused runs")
        ids[role] = token_id
    return ids


def _processor_tokens(host_processor, tokenizer) -> HostTokens:
    """The placeholder ids a host processor names itself (``image_token``, ``video_token``)."""
    ids = {}
    for kind in ("image", "video"):
        token = getattr(host_processor, f"{kind}_token", None)
        if token is None:
            continue
        token = str(getattr(token, "content", token))
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"host_processor: its tokenizer has no {kind} token {token!r}")
        ids[kind] = token_id
    if "image" not in ids:
        raise ValueError("host_processor: names no image token; pass the attached model or the host's config")
    return HostTokens(ids["image"], ids.get("video"))


class QFusionProcessor:
    """Builds the inputs of a qfusion-attached host: images, prompts with the right placeholders, questions.

    host_processor: the host's processor (``AutoProcessor.from_pretrained(checkpoint)``).
    model: the attached host (``qfusion.attach``): the family, token ids, default budget,
        ``augment`` prefix and HD grid are read from it. Or the host's config
        (``AutoConfig.from_pretrained(checkpoint)``): family and token ids from it, ``m`` and ``n``
        given here. Or None: the host processor's own ``image_token`` / ``video_token`` are the
        placeholders, with no markers and no token types; ``m`` and ``n`` given here.
    m, n: the default budget of these inputs (with a model: default its plugin's configured m, n):
        m placeholders before a sample's first question, n before each later one. A call may build
        inputs for another budget (``budget=``). The outputs carry it as ``qfusion_budget``, so
        ``model(**inputs)`` fuses exactly that many tokens.
    question_tokenizer: tokenizer of the fusion's questions (default: the host's tokenizer; e.g. a CLIP
        tokenizer by option). Its ids must stay below the fusion's ``text_vocab_size``.
    question_special_tokens: add the question tokenizer's special tokens to each question (default:
        only for a separate tokenizer).
    max_question_length: truncate questions to this many tokens (default: no truncation).

    ``__call__`` returns a ``BatchFeature`` with ``input_ids``, ``attention_mask``, the image
    processor's outputs (``pixel_values``, ...), ``qfusion_input_ids``, ``qfusion_attention_mask``,
    ``qfusion_budget``, ``qfusion_image_counts``, the host's token types and extra inputs where its
    family has them, and ``labels`` on request: ``model.generate(**inputs)`` or ``model(**inputs)``.
    """

    def __init__(self, host_processor, model=None, *, m: int | None = None, n: int | None = None,
                 image_prefix: int | None = None, hd_grid: tuple[int, int] | None = None,
                 question_tokenizer=None, question_special_tokens: bool | None = None,
                 max_question_length: int | None = None, family: HostFamily | None = None,
                 tokens: HostTokens | None = None):
        tokenizer = getattr(host_processor, "tokenizer", None)
        if tokenizer is None or getattr(host_processor, "image_processor", None) is None:
            raise TypeError(
                "host_processor: expected a transformers VLM processor with .tokenizer and .image_processor, "
                f"got {type(host_processor).__name__}"
            )
        self.host = host_processor
        self.tokenizer = tokenizer
        codebook = None
        adapter = _adapter_of(model)
        if adapter is not None:
            family, tokens = adapter.family, adapter.tokens
            found = {"image_prefix": adapter.image_prefix, "hd_grid": adapter.settings.hd_grid}
            hd_grid = None if hd_grid is None else tuple(hd_grid)
            for name, value in (("image_prefix", image_prefix), ("hd_grid", hd_grid)):
                if value is not None and value != found[name]:
                    raise ValueError(f"{name}: the attached plugin uses {name}={found[name]!r}, got {value!r}")
            image_prefix, hd_grid = found["image_prefix"], found["hd_grid"]
            codebook = adapter.fusion.config.codebook_size
            m, n = Budget.resolve(m, n, default=adapter.budget, codebook_size=codebook)
            vocab = adapter.fusion.config.text_vocab_size
            size = len(question_tokenizer if question_tokenizer is not None else tokenizer)
            if size > vocab:
                raise ValueError(
                    f"question_tokenizer: has {size} tokens, more than the fusion's text_vocab_size={vocab}"
                )
        elif model is not None:
            family = family_for(model)
            tokens = family.tokens(model)
        if m is None or n is None:
            raise ValueError("m, n: required (or pass the attached model to read them from)")
        self.default_budget = Budget.of((m, n), name="m, n", codebook_size=codebook)
        self.codebook_size = codebook
        self.family = family
        self.tokens = tokens if tokens is not None else _processor_tokens(host_processor, tokenizer)
        if family is not None and family.processor_markers is not None:
            self.tokens = dataclasses.replace(self.tokens, **_processor_markers(host_processor, tokenizer,
                                                                                family.processor_markers))
        self.image_token, self.video_token, self.vision_wrap = self._token_strings()
        self.image_token_id, self.video_token_id = self.tokens.image, self.tokens.video
        self.image_prefix = 0 if image_prefix is None else image_prefix
        if not isinstance(self.image_prefix, int) or self.image_prefix < 0:
            raise ValueError(f"image_prefix: expected an integer >= 0, got {image_prefix!r}")
        self.hd_grid = None if hd_grid is None else tuple(hd_grid)
        self.question_tokenizer = question_tokenizer
        self.question_special_tokens = (question_tokenizer is not None if question_special_tokens is None
                                        else bool(question_special_tokens))
        self.max_question_length = (None if max_question_length is None
                                    else _positive(max_question_length, "max_question_length"))

    def _token_strings(self) -> tuple[str, str | None, tuple[str, str] | None]:
        """(image placeholder, video placeholder or None, (start, end) markers or None) as the tokenizer
        writes them; every id must be a single token of it."""
        def token(token_id: int, role: str) -> str:
            text = self.tokenizer.convert_ids_to_tokens(token_id)
            if text is None or self.tokenizer.convert_tokens_to_ids(text) != token_id:
                raise ValueError(f"host_processor: its tokenizer has no {role} token with the host's id {token_id}")
            return text

        tokens = self.tokens
        video = None if tokens.video is None else token(tokens.video, "video placeholder")
        markers = None
        if tokens.start is not None or tokens.end is not None:
            markers = tuple("" if marker is None else token(marker, f"vision {role} marker")
                            for marker, role in ((tokens.start, "start"), (tokens.end, "end")))
        return token(tokens.image, "image placeholder"), video, markers

    # ------------------------------------------------------------------ layout

    @property
    def budget(self) -> Budget:
        """The default (m, n) of these inputs (a call may ask for another)."""
        return self.default_budget

    @property
    def m(self) -> int:
        return self.default_budget.m

    @property
    def n(self) -> int:
        return self.default_budget.n

    def num_placeholders(self, num_questions: int, budget: Budget | None = None) -> int:
        """Image placeholders of one sample with ``num_questions`` questions: prefix + m + (G−1)·n."""
        return sum((budget or self.budget).placeholders(num_questions, self.image_prefix))

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        """The token ids of the image (and video) placeholders."""
        return (self.image_token_id,) if self.video_token_id is None else (self.image_token_id, self.video_token_id)

    def _placeholders(self, blocks: list[int], kinds: list[str]) -> str:
        """The prompt text before one question: per visual input it is about (kinds), its placeholders
        (blocks); one run per visual input between the host's vision markers where it has them."""
        if self.video_token is None and "video" in kinds:
            raise ValueError("conversations: this host takes no video (it has no video placeholder token)")
        tokens = [self.video_token if kind == "video" else self.image_token for kind in kinds]
        if self.vision_wrap is None:
            return "".join(token * count for token, count in zip(tokens, blocks))
        start, end = self.vision_wrap
        return "".join(start + token * count + end for token, count in zip(tokens, blocks))

    def _prompt_placeholders(self, num_questions: int, kinds: list[str], image_counts: list[int],
                             budget: Budget) -> list[str]:
        """Per question of a sample, the placeholder text before it (kinds: its visual inputs in order)."""
        about = question_images(image_counts)
        blocks = placeholder_blocks(num_questions, budget, self.image_prefix, image_counts)
        return [self._placeholders(block, [kinds[i] for i in images]) for block, images in zip(blocks, about)]

    # ------------------------------------------------------------------ inputs

    def _batch_questions(self, questions) -> list[list[str]]:
        if isinstance(questions, str):
            questions = [questions]
        if not isinstance(questions, (list, tuple)) or not questions:
            raise TypeError(
                "questions: expected a string, a list of strings (one per image) or a list of lists of strings"
            )
        batch = []
        for b, sample in enumerate(questions):
            sample = [sample] if isinstance(sample, str) else sample
            if not isinstance(sample, (list, tuple)) or not sample or not all(isinstance(q, str) for q in sample):
                raise TypeError(f"questions[{b}]: expected a string or a non-empty list of strings, got {sample!r:.80}")
            batch.append(list(sample))
        return batch

    def _batch_conversations(self, conversations) -> list[list[dict]]:
        if isinstance(conversations, (list, tuple)) and conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        if not isinstance(conversations, (list, tuple)) or not conversations:
            raise TypeError(
                "conversations: expected a conversation (a list of {'role', 'content'} messages) or a list of them"
            )
        for b, conversation in enumerate(conversations):
            if not isinstance(conversation, (list, tuple)) or not all(
                isinstance(message, dict) and "role" in message and "content" in message for message in conversation
            ):
                raise TypeError(f"conversations[{b}]: expected a list of {{'role', 'content'}} messages")
            if not any(message["role"] == "user" for message in conversation):
                raise ValueError(f"conversations[{b}]: has no user turn (the user turns are the questions)")
        return [list(conversation) for conversation in conversations]

    def _chat_template(self) -> str:
        template = getattr(self.host, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise ValueError(
                "conversations: the host processor has no chat template; pass plain `questions` or set "
                "host_processor.chat_template"
            )
        return template

    def _render(self, conversation: list[dict], add_generation_prompt: bool | None, budget: Budget):
        """(prompt text with placeholders before every user turn, the user texts, every turn's (role, text),
        per user turn the images it brings).

        A user turn brings as many images as it has ``{"type": "image"}`` items; the first user turn
        brings at least one (a conversation about one image need not mark it).
        """
        users = [message for message in conversation if message["role"] == "user"]
        items = [_visual_items(message["content"]) for message in users]
        if not items[0]:
            items[0] = ["image"]
        image_counts = [len(kinds) for kinds in items]
        kinds = [kind for turn in items for kind in turn]
        runs = self._prompt_placeholders(len(users), kinds, image_counts, budget)
        questions, turns, messages = [], [], []
        for message in conversation:
            message = copy.copy(message)
            text = _text_of(message["content"])
            if message["role"] == "user":
                text_with_image = runs[len(questions)] + text
                questions.append(text)
                message["content"] = (text_with_image if isinstance(message["content"], str)
                                      else [{"type": "text", "text": text_with_image}])
            turns.append((message["role"], text))
            messages.append(message)
        return self._apply_template(messages, add_generation_prompt), questions, turns, image_counts, kinds

    def _apply_template(self, messages: list[dict], add_generation_prompt: bool | None) -> str:
        """The prompt text of ``messages`` by the host's chat template; add_generation_prompt None: when
        the last turn is the user's."""
        if add_generation_prompt is None:
            add_generation_prompt = messages[-1]["role"] == "user"
        return self.tokenizer.apply_chat_template(messages, chat_template=self._chat_template(), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    @staticmethod
    def _padding_side(padding_side: str | None) -> str:
        """The padding side of a call: "left" by default, else "left" or "right"."""
        if padding_side is None:
            return "left"
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        return padding_side

    @staticmethod
    def _per_sample(values, wanted: list[int], name: str, kind: str) -> list:
        """All ``name`` of the batch in prompt order; ``wanted``: per sample, how many it needs."""
        if not any(wanted):
            if values is not None:
                raise ValueError(f"{name}: the prompts have no {kind} items, got {kind}s")
            return []
        if values is None:
            raise ValueError(f"{name}: required, one {kind} per sample (or a list per sample with several)")
        if not isinstance(values, (list, tuple)):
            values = [values]
        if len(values) != len(wanted):
            raise ValueError(f"{name}: expected one {kind} per sample ({len(wanted)} samples), got {len(values)}")
        flat = []
        for b, (entry, count) in enumerate(zip(values, wanted)):
            entry = [] if entry is None else list(entry) if isinstance(entry, (list, tuple)) else [entry]
            if len(entry) != count:
                raise ValueError(
                    f"{name}[{b}]: expected {count} {kind}s (the {kind} items of its user turns), got {len(entry)}"
                )
            flat += entry
        return flat

    def _videos(self, videos) -> dict[str, Tensor]:
        """The host video processor's outputs for every video of the batch, in prompt order."""
        if not videos:
            return {}
        processor = getattr(self.host, "video_processor", None)
        if processor is None:
            raise ValueError(f"videos: {type(self.host).__name__} has no video_processor")
        return dict(processor(videos=list(videos), return_tensors="pt"))

    def _images(self, images) -> dict[str, Tensor]:
        """The image processor's outputs for every image of the batch, in prompt order."""
        if not images:
            return {}
        if self.hd_grid is None:
            if self.family is not None and self.family.image_inputs is not None:
                return dict(self.family.image_inputs(self.host.image_processor, list(images)))
            return dict(self.host.image_processor(list(images), return_tensors="pt"))
        processor = self.host.image_processor
        crop = getattr(processor, "crop_size", None) or processor.size
        size = crop.get("height") or crop.get("shortest_edge")
        mean = torch.tensor(processor.image_mean)[:, None, None]
        std = torch.tensor(processor.image_std)[:, None, None]
        views = [hd_views(_as_unit_image(image), grid=self.hd_grid, size=size, fill=processor.image_mean)
                 for image in images]
        return {"pixel_values": (torch.stack(views) - mean) / std}

    def _question_ids(self, questions: list[list[str]]) -> tuple[Tensor, Tensor]:
        tokenizer = self.question_tokenizer or self.tokenizer
        ids = []
        for b, sample in enumerate(questions):
            row = []
            for g, question in enumerate(sample):
                tokens = tokenizer(question, add_special_tokens=self.question_special_tokens)["input_ids"]
                tokens = tokens[: self.max_question_length] if self.max_question_length else tokens
                if not tokens:
                    raise ValueError(
                        f"questions: question {g} of sample {b} is empty after tokenization ({question!r})"
                    )
                row.append(tokens)
            ids.append(row)
        return encode_questions(ids)

    def _check_counts(self, input_ids: Tensor, questions: list[list[str]], image_counts: list[list[int]],
                      budget: Budget) -> None:
        found = torch.isin(input_ids, torch.tensor(self.placeholder_ids)).sum(-1).tolist()
        expected = [sum(placeholder_counts(len(sample), budget, self.image_prefix, counts))
                    for sample, counts in zip(questions, image_counts)]
        if found != expected:
            raise ValueError(
                f"text: image placeholders per image expected {expected}, found {found} "
                f"({len(questions)} images; m={budget.m}, n={budget.n}, prefix={self.image_prefix}); does the chat "
                "template or the text add its own image tokens?"
            )
        check_placeholders(input_ids, self.placeholder_ids, [len(sample) for sample in questions], budget,
                           self.image_prefix, name="text", image_counts=image_counts)

    @staticmethod
    def _labels(input_ids: Tensor, offsets: Tensor, prompts: list[str], turns: list[list[tuple[str, str]]],
                eos_id) -> Tensor:
        """-100 everywhere but on the tokens of the assistant turns (and the eos right after each).

        Each turn's text is looked up in the rendered prompt after the previous turn's, so an answer
        that also occurs in an earlier question is not mistaken for it.
        """
        labels = torch.full_like(input_ids, -100)
        for b, (prompt, sample) in enumerate(zip(prompts, turns)):
            cursor, spans = 0, []
            for role, text in sample:
                start = prompt.find(text, cursor) if text else -1
                if start < 0:
                    continue
                cursor = start + len(text)
                if role == "assistant":
                    spans.append((start, cursor))
            starts, ends = offsets[b, :, 0], offsets[b, :, 1]
            for lo, hi in spans:
                inside = (starts >= lo) & (ends <= hi) & (ends > starts)
                labels[b, inside] = input_ids[b, inside]
                positions = inside.nonzero().flatten()
                after = int(positions[-1]) + 1 if positions.numel() else None
                if after is not None and after < input_ids.shape[1] and int(input_ids[b, after]) == eos_id:
                    labels[b, after] = eos_id
        return labels

    def __call__(self, images=None, conversations=None, questions=None, *, videos=None,
                 budget: Budget | tuple[int, int] | None = None, add_generation_prompt: bool | None = None,
                 prompt_format: str = "{question}", return_labels: bool = False, padding_side: str | None = None,
                 return_tensors: str = "pt"):
        """Inputs for ``model(**inputs)`` / ``model.generate(**inputs)``, one image per sample.

        images: one image per sample (PIL, arrays or tensors, as the host's image processor takes), or
            per sample a list of images when its conversation has several (one per image item).
        videos: hosts with video: per sample a video or a list of videos, one per
            ``{"type": "video"}`` item of its conversation, as the host's video processor takes them.
        conversations: the host's chat format, one conversation per sample (or one conversation):
            ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}, ...]``.
            Every user turn is a question; image and video items are dropped and the placeholders are
            put right before each user text (per visual input one run, between the host's vision
            markers where it has them); the prompt is rendered with the host's chat template.
        questions: instead of conversations: a string, one string per image, or a list of strings per
            image; each becomes ``prompt_format.format(question=...)`` after its placeholders, joined by
            spaces, tokenized with the host tokenizer's special tokens.
        budget: the (m, n) of these inputs (a :class:`qfusion.Budget` or a pair; default: the
            processor's). The outputs carry it as ``qfusion_budget``.
        add_generation_prompt: end with the assistant's turn opening (default: when the last turn is
            the user's).
        return_labels: also return ``labels`` (conversations only): the assistant turns' tokens and the
            eos closing each, -100 elsewhere (needs a fast tokenizer).
        padding_side: "left" (default: batched generation needs it; a right-padded batch is refused
            by the patched ``generate``) or "right" (fine for ``forward``: causal attention never
            reads the padding at real positions).
        """
        if (conversations is None) == (questions is None):
            raise ValueError("conversations, questions: pass exactly one of them")
        if return_tensors != "pt":
            raise ValueError(f"return_tensors: only 'pt' is supported, got {return_tensors!r}")
        padding_side = self._padding_side(padding_side)
        budget = self.budget if budget is None else Budget.of(budget, name="budget", codebook_size=self.codebook_size)
        if conversations is not None:
            rendered = [self._render(c, add_generation_prompt, budget) for c in self._batch_conversations(conversations)]
            prompts = [r[0] for r in rendered]
            batch_questions = [r[1] for r in rendered]
            turns = [r[2] for r in rendered]
            image_counts = [r[3] for r in rendered]
            kinds = [r[4] for r in rendered]
            special = False  # chat templates write their own special tokens
        else:
            if return_labels:
                raise ValueError("return_labels: needs conversations (the assistant turns are the labels)")
            batch_questions = self._batch_questions(questions)
            image_counts = [[1] + [0] * (len(sample) - 1) for sample in batch_questions]
            kinds = [["image"] for _ in batch_questions]
            prompts = [" ".join(run + prompt_format.format(question=q)
                                for run, q in zip(self._prompt_placeholders(len(sample), ["image"], counts, budget),
                                                  sample))
                       for sample, counts in zip(batch_questions, image_counts)]
            special = True
        encoding = self.tokenizer(prompts, add_special_tokens=special, padding=True, return_tensors="pt",
                                  return_offsets_mapping=return_labels,
                                  padding_side=padding_side)
        self._check_counts(encoding["input_ids"], batch_questions, image_counts, budget)
        data = {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}
        family = self.family
        if family is not None and family.token_types is not None:
            ids = encoding["input_ids"]
            types = torch.zeros_like(ids, dtype=torch.int32)
            for kind, token in self.tokens.placeholders().items():
                types[ids == token] = TOKEN_TYPES[kind]
            data[family.token_types] = types
        data.update(self._images(self._per_sample(images, [k.count("image") for k in kinds], "images", "image")))
        data.update(self._videos(self._per_sample(videos, [k.count("video") for k in kinds], "videos", "video")))
        if family is not None and family.processor_inputs is not None:
            for name, value in family.processor_inputs(self.host, kinds, batch_questions, data).items():
                if value is None:
                    data.pop(name, None)
                else:
                    data[name] = value
        data["qfusion_input_ids"], data["qfusion_attention_mask"] = self._question_ids(batch_questions)
        data["qfusion_budget"] = tuple(budget)  # a plain pair: BatchFeature.to() rebuilds tuples by type
        data["qfusion_image_counts"] = encode_image_counts(image_counts, data["qfusion_input_ids"].shape[1])
        if return_labels:
            data["labels"] = self._labels(encoding["input_ids"], encoding["offset_mapping"], prompts, turns,
                                          self.tokenizer.eos_token_id)
        from transformers import BatchFeature

        return BatchFeature(data)

    def text_inputs(self, conversations, *, add_generation_prompt: bool | None = None, return_labels: bool = False,
                    padding_side: str | None = None):
        """Host inputs of text-only conversations: no image or video, so nothing to fuse and no questions.

        For the records of a training mixture that have no visual input (the attached host runs them
        as it would without the plugin). conversations, add_generation_prompt, return_labels,
        padding_side: as in ``__call__``; a conversation with an image or video item is refused.
        Returns a ``BatchFeature`` with ``input_ids``, ``attention_mask`` and, on request, ``labels``.
        """
        padding_side = self._padding_side(padding_side)
        prompts, turns = [], []
        for b, conversation in enumerate(self._batch_conversations(conversations)):
            if any(_visual_items(message["content"]) for message in conversation):
                raise ValueError(f"conversations[{b}]: has an image or video item; text_inputs takes text-only "
                                 "conversations (call the processor itself for the others)")
            messages = [{"role": m["role"], "content": _text_of(m["content"])} for m in conversation]
            prompts.append(self._apply_template(messages, add_generation_prompt))
            turns.append([(m["role"], m["content"]) for m in messages])
        encoding = self.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt",
                                  return_offsets_mapping=return_labels, padding_side=padding_side)
        data = {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}
        if return_labels:
            data["labels"] = self._labels(encoding["input_ids"], encoding["offset_mapping"], prompts, turns,
                                          self.tokenizer.eos_token_id)
        from transformers import BatchFeature

        return BatchFeature(data)

    # ------------------------------------------------------------------ host passthrough and saving

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def settings(self) -> dict:
        """The processor's own settings (how questions are tokenized), as ``qfusion_processor.json`` holds them."""
        return {"question_special_tokens": self.question_special_tokens,
                "max_question_length": self.max_question_length,
                "question_tokenizer": QUESTION_TOKENIZER_DIR if self.question_tokenizer is not None else None}

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write the processor's own settings (qfusion_processor.json: how questions are tokenized) and a
        separate question tokenizer into a plugin directory (atomically, beside the plugin's files), or
        a folder of their own. The budget, prefix, HD grid and token ids are the plugin's (config.json,
        qfusion_adapter.json) and the host processor comes with the host checkpoint: neither is
        written here."""
        return save_processor_settings(save_directory, self.settings(), self.question_tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, host_processor, model=None, **overrides) -> "QFusionProcessor":
        """Rebuild a processor saved with ``save_pretrained`` around the host's processor.

        From a plugin directory without ``model``: the family and token ids come from its
        qfusion_adapter.json, the budget from its config.json and the HD grid from its settings.
        ``model`` (the attached host or its config) decides them otherwise. ``overrides`` (e.g.
        ``m=``, ``n=``) go to the constructor.
        """
        directory = os.fspath(directory)
        kwargs: dict = {}
        if os.path.isfile(os.path.join(directory, ADAPTER_CONFIG_NAME)):
            plugin = read_plugin(directory)
            settings = plugin.processor
            if settings is None:
                raise FileNotFoundError(f"directory: the plugin in {directory!r} holds no saved processor settings")
            question_tokenizer = plugin.question_tokenizer()
            if model is None:
                kwargs = _plugin_host(plugin)
        else:
            settings, question_tokenizer = read_processor_settings(directory)
        kwargs.update({k: v for k, v in settings.items() if k != "question_tokenizer"})
        kwargs.update(overrides)
        return cls(host_processor, model, question_tokenizer=question_tokenizer, **kwargs)

    def __repr__(self) -> str:
        family = None if self.family is None else self.family.name
        return (f"QFusionProcessor(host={type(self.host).__name__}, family={family!r}, m={self.m}, n={self.n}, "
                f"image_prefix={self.image_prefix}, hd_grid={self.hd_grid})")


def _plugin_host(plugin) -> dict:
    """The constructor arguments a saved plugin determines without its host: family, token ids,
    budget, HD grid (an ``augment`` prefix needs the attached host)."""
    from qfusion.adapters.family import FAMILIES

    settings = plugin.settings
    if settings.mode == "augment":
        raise ValueError("model: required for a plugin in mode='augment' (the host's Q-Former prefix)")
    if settings.tokens is None:
        raise ValueError(
            f"model: required for {plugin.directory!r}, a plugin saved without the host's token ids (adapter "
            "format 1); pass the attached model or the host's config"
        )
    family = FAMILIES.get(settings.family)
    if family is None:
        raise ValueError(f"fusion: the plugin's host family {settings.family!r} is not registered "
                         "(qfusion.register_family)")
    return dict(family=family, tokens=HostTokens.from_json(settings.tokens), m=plugin.config.m, n=plugin.config.n,
                hd_grid=settings.hd_grid)

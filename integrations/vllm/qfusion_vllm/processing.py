"""vLLM's multimodal processing for a host with a qfusion plugin: the parts every served family shares.

With a plugin, each image of a prompt becomes m placeholders (the plugin's budget, or that of the
request's ``mm_processor_kwargs={"qfusion_budget": [m, n]}``) instead of the host's vision-token
count, and every later question about it gets n placeholders of its own, right before its text
(:mod:`qfusion_vllm.turns`: one multimodal item per question group). Each item carries, as
multimodal fields, the question ids it is fused with (tokenized as ``QFusionProcessor`` tokenizes
questions) and the budget; they are part of the item's multimodal hash, so vLLM's processor,
encoder and prefix caches never hand one question's fused tokens to another. Without a plugin the
host is served alone: every image gets the host's own vision-token count.

A family subclasses :class:`QFusionProcessingInfo` and :class:`QFusionMultiModalProcessor` with its
image processing, its fields and its host token count.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import cached_property

import torch
from transformers import BatchFeature

from vllm.multimodal.hasher import MultiModalHasher
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ProcessorBatchItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
)

from qfusion.adapters import MODEL_TYPES
from qfusion.adapters.family import HostTokens
from qfusion.budget import Budget
from qfusion.plugin import Plugin
from qfusion_vllm.plugin import QUESTION_END_FIELD, load_plugin
from qfusion_vllm.turns import Item, TurnMarkers, plan

BUDGET_KWARG = "qfusion_budget"
"""Per-request ``mm_processor_kwargs`` key: the budget (m, n), as the host's ``qfusion_budget``."""

QUESTION_FIELDS = ("qfusion_question_ids", "qfusion_question_lengths", "qfusion_budget", "qfusion_image_key")
"""Per image item: its questions' ids one after another, their lengths (the last is its own), (m, n),
and its image's content hash (the key of the model's vision cache) as bytes."""

_ITEMS_KEY = "_qfusion_items"  # the request's image items with their image keys, in its processor kwargs


class QFusionProcessingInfo(BaseProcessingInfo):
    """Host and plugin facts the processor reads: tokens, budget, question tokenization, user turns."""

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    @cached_property
    def tokens(self) -> HostTokens:
        """The host's placeholder and marker ids, as its family record reads them from its config."""
        config = self.get_hf_config()
        return MODEL_TYPES[config.model_type].tokens(config)

    @cached_property
    def plugin(self) -> Plugin | None:
        return load_plugin(self.get_hf_config())

    @cached_property
    def placeholder_ids(self) -> list[int]:
        """The ids of one image placeholder in a prompt (with the host's vision markers)."""
        return [t for t in (self.tokens.start, self.tokens.image, self.tokens.end) if t is not None]

    def placeholder(self) -> str:
        """The text of one image placeholder in a prompt (with the host's vision markers)."""
        return "".join(self.get_tokenizer().convert_ids_to_tokens(self.placeholder_ids))

    def budget(self, mm_kwargs: Mapping[str, object]) -> Budget:
        """The (m, n) of a request: its ``qfusion_budget`` or the plugin's."""
        plugin = self.plugin
        if plugin is None:
            raise ValueError(f"mm_processor_kwargs: {BUDGET_KWARG!r} needs a qfusion plugin (none is configured)")
        requested = mm_kwargs.get(BUDGET_KWARG)
        if requested is None:
            return plugin.config.budget
        return Budget.of(requested, name=f"mm_processor_kwargs[{BUDGET_KWARG!r}]",
                         codebook_size=plugin.config.codebook_size)

    def largest_budget(self) -> Budget:
        """The budget with the most fused tokens per item (profiling inputs use it)."""
        config = self.plugin.config
        return Budget(config.codebook_size, min(config.n, config.codebook_size))

    def host_max_tokens(self) -> int:
        """Vision tokens the host feeds its LLM for its largest image (the host served alone)."""
        raise NotImplementedError

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        """The encoder budget: a request may ask for up to codebook_size fused tokens per item."""
        plugin = self.plugin
        return {"image": self.host_max_tokens() if plugin is None else plugin.config.codebook_size}

    @cached_property
    def question_tokenizer(self):
        plugin = self.plugin
        tokenizer = plugin.question_tokenizer() or self.get_tokenizer()
        if len(tokenizer) > plugin.config.text_vocab_size:
            raise ValueError(
                f"qfusion_plugin: the question tokenizer has {len(tokenizer)} tokens, more than the fusion's "
                f"text_vocab_size={plugin.config.text_vocab_size}"
            )
        return tokenizer

    def question_ids(self, pieces: list[list[int]]) -> list[int]:
        """A question's ids in the fusion's vocabulary, from the host ids of its text pieces (the text
        of a user turn between its placeholders), tokenized as ``QFusionProcessor`` does."""
        decode = self.get_tokenizer().decode
        text = " ".join(t for t in (decode(p, skip_special_tokens=False).strip() for p in pieces) if t)
        if not text:
            return []
        settings = self.plugin.processor or {}
        special = settings.get("question_special_tokens", self.plugin.question_tokenizer() is not None)
        ids = self.question_tokenizer(text, add_special_tokens=special)["input_ids"]
        limit = settings.get("max_question_length")
        return ids[:limit] if limit else ids

    def is_space(self, token: int) -> bool:
        return not self.get_tokenizer().decode([token]).strip()

    @cached_property
    def turn_markers(self) -> TurnMarkers:
        """Where user turns start and end, from the chat template vLLM renders chats with."""
        from vllm.renderers.hf import resolve_chat_template

        tokenizer = self.get_tokenizer()
        template = resolve_chat_template(tokenizer, None, None, model_config=self.ctx.model_config)
        image = tokenizer.convert_ids_to_tokens(self.tokens.image)
        return TurnMarkers.from_chat_template(tokenizer, template, image,
                                              getattr(self.get_hf_config(), QUESTION_END_FIELD, None))


class QFusionDummyInputsBuilder(BaseDummyInputsBuilder[QFusionProcessingInfo]):
    """Profiling inputs: the largest images, each followed by a short question (the fusion needs one)."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return " ".join(f"{self.info.placeholder()} what is this ?" for _ in range(mm_counts.get("image", 0)))

    def largest_image(self) -> tuple[int, int]:
        """(width, height) of the image with the most host vision tokens."""
        raise NotImplementedError

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        width, height = self.largest_image()
        return {"image": self._get_dummy_images(width=width, height=height, num_images=mm_counts.get("image", 0),
                                                overrides=mm_options.get("image"))}


def _fold(algorithm, item_hash: str, item: Item) -> str:
    return MultiModalHasher.hash_kwargs(algorithm, image=item_hash, qfusion_questions=[list(q) for q in item.questions])


class QFusionMultiModalProcessor(BaseMultiModalProcessor[QFusionProcessingInfo]):
    """Images -> the host's pixel inputs plus, per item, its questions and budget; placeholders ->
    m (a first question) or n (a follow-up) per item, or the host's count without a plugin.

    Subclasses give :meth:`_process_images`, :meth:`_image_fields` and :meth:`_host_count`.
    """

    def _process_images(self, images: list, hf_kwargs: Mapping[str, object]) -> dict:
        """The host image processor's outputs for ``images`` (one entry per item)."""
        raise NotImplementedError

    def _image_fields(self, hf_inputs: BatchFeature) -> dict[str, MultiModalFieldConfig]:
        """The field configs of :meth:`_process_images`' outputs."""
        raise NotImplementedError

    def _host_count(self, item) -> int:
        """The host's vision tokens for one processed image item (the host served alone)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ prompt -> items

    def get_dummy_inputs(self, seq_len, mm_counts, mm_options):
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        if self.info.plugin is None:
            return inputs
        budget = list(self.info.largest_budget())
        return replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, BUDGET_KWARG: budget})

    def apply(self, inputs, timing_ctx):
        """Plan the request's items (a placeholder run before every follow-up question) before vLLM's
        own processing; a bad budget or a prompt qfusion cannot read fails here."""
        info = self.info
        if info.plugin is not None or BUDGET_KWARG in inputs.hf_processor_mm_kwargs:
            info.budget(inputs.hf_processor_mm_kwargs)  # a bad budget, or one without a plugin, fails here
        images = inputs.mm_data_items.get("image")
        if info.plugin is None or not images:
            return super().apply(inputs, timing_ctx)
        if not isinstance(images, ProcessorBatchItems):
            raise ValueError("image: the qfusion plugin fuses images, not precomputed image embeddings")
        run = info.placeholder_ids
        layout = plan(inputs.prompt, info.turn_markers, {info.tokens.image: "image"}, lambda _: run, set(run),
                      info.question_ids, info.is_space)
        items = layout.items.get("image", [])
        placeholders = len({item.visual for item in items})
        if placeholders != len(images):
            raise ValueError(f"prompt: {placeholders} image placeholders for {len(images)} images")
        expanded = copy.copy(images)
        expanded.data = [images.data[item.visual] for item in items]
        data_items = copy.copy(inputs.mm_data_items)
        data_items["image"] = expanded
        uuids = inputs.mm_uuid_items
        if uuids and uuids.get("image") is not None:
            uuids = {**uuids, "image": [uuids["image"][item.visual] for item in items]}
        algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
        keys = {v: bytes.fromhex(MultiModalHasher.hash_kwargs(algorithm, image=images.get_item_for_hash(v)))
                for v in {item.visual for item in items}}
        kwargs = {**inputs.hf_processor_mm_kwargs, _ITEMS_KEY: [(item, keys[item.visual]) for item in items]}
        return super().apply(replace(inputs, prompt=layout.prompt, mm_data_items=data_items, mm_uuid_items=uuids,
                                     hf_processor_mm_kwargs=kwargs), timing_ctx)

    def _get_mm_hashes(self, inputs):
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        items = kwargs.pop(_ITEMS_KEY, None)
        hashes = super()._get_mm_hashes(replace(inputs, hf_processor_mm_kwargs=kwargs))
        if items is None:
            return hashes
        algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
        return {**hashes, "image": [_fold(algorithm, h, item) for h, (item, _) in zip(hashes["image"], items)]}

    def _get_cache_missing_processor_kwargs(self, inputs, mm_is_cached):
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        items = kwargs.get(_ITEMS_KEY)
        if items is not None:
            kwargs[_ITEMS_KEY] = [entry for entry, hit in zip(items, mm_is_cached.get("image", [])) if not hit]
        return kwargs

    # ------------------------------------------------------------------ items -> fields

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        images = list(hf_data.get("images") or [])
        data = self._process_images(images, hf_kwargs)
        items: Sequence[tuple[Item, bytes]] | None = hf_kwargs.get(_ITEMS_KEY)
        if items is not None:
            budget = torch.tensor(list(self.info.budget(hf_kwargs)), dtype=torch.long)
            data["qfusion_question_ids"] = [torch.tensor([t for q in item.questions for t in q], dtype=torch.long)
                                            for item, _ in items]
            data["qfusion_question_lengths"] = [torch.tensor([len(q) for q in item.questions], dtype=torch.long)
                                                for item, _ in items]
            data["qfusion_budget"] = budget.expand(len(items), 2).clone()
            data["qfusion_image_key"] = [torch.tensor(list(key), dtype=torch.uint8) for _, key in items]
        return BatchFeature(data)

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        fields = self._image_fields(hf_inputs)
        if "qfusion_question_ids" in hf_inputs:
            fields.update({name: MultiModalFieldConfig.batched("image", keep_on_cpu=True) for name in QUESTION_FIELDS})
        return fields

    def _item_count(self, item) -> int:
        """Placeholders of one processed item: m for an image's first question, n after; or the host's."""
        if self.info.plugin is None:
            return self._host_count(item)
        m, n = item["qfusion_budget"].data.tolist()
        return m if item["qfusion_question_lengths"].data.numel() == 1 else n

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptReplacement]:
        image = self.info.tokens.image
        processed = out_mm_kwargs.get("image", [])
        return [PromptReplacement(modality="image", target=[image],
                                  replacement=lambda i: [image] * self._item_count(processed[i]))]

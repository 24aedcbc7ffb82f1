"""vLLM's multimodal processing for a LLaVA host with a qfusion plugin.

Each ``<image>`` in a prompt becomes m placeholders (the plugin's budget, or m of
``mm_processor_kwargs={"qfusion_budget": [m, n]}`` per request) instead of the host's vision-token
count. The image's question is the text that follows its ``<image>`` up to the end of that user
turn (the chat template says where a turn ends) or the next image; it is tokenized as
``QFusionProcessor`` tokenizes questions and carried to the model as the multimodal field
``qfusion_question_ids``. The question is part of the image item's multimodal hash, so vLLM's
processor and encoder caches never hand one question's fused tokens to another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import cached_property

import torch
from transformers import BatchFeature, LlavaConfig
from transformers.models.llava import LlavaProcessor

from vllm.multimodal.hasher import MultiModalHasher
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
)

from qfusion.budget import Budget
from qfusion_vllm.plugin import QUESTION_END_FIELD, PluginSpec, plugin_directory, read_plugin

BUDGET_KWARG = "qfusion_budget"
"""Per-request ``mm_processor_kwargs`` key: the budget (m, n), as the host's ``qfusion_budget``."""

_QUESTIONS_KEY = "_qfusion_questions"  # per-image question ids, added to the processor kwargs of one request
_PROBE = "\x1fqfusion-question\x1f"


class QFusionLlavaProcessingInfo(BaseProcessingInfo):
    """Host and plugin facts the processor reads: token counts, question tokenization, turn ends."""

    def get_hf_config(self) -> LlavaConfig:
        return self.ctx.get_hf_config(LlavaConfig)

    def get_hf_processor(self, **kwargs: object) -> LlavaProcessor:
        # only its image processor, tokenizer and chat template are used; request kwargs are ours, not its
        return self.ctx.get_hf_processor(LlavaProcessor)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    @cached_property
    def plugin(self) -> PluginSpec | None:
        directory = plugin_directory(self.get_hf_config())
        return None if directory is None else read_plugin(directory)

    @cached_property
    def image_size(self) -> int:
        return self.get_hf_config().vision_config.image_size

    @cached_property
    def host_tokens(self) -> int:
        """Vision tokens the host feeds its LLM per image (patch grid, plus the class token under "full")."""
        config = self.get_hf_config()
        patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        return patches + (1 if config.vision_feature_select_strategy == "full" else 0)

    def budget(self, mm_kwargs: Mapping[str, object]) -> int:
        """Placeholders per image for a request: m of its ``qfusion_budget``, the plugin's m, or the host's count.

        One question per image in vLLM, so the budget's n is checked but not used.
        """
        requested = mm_kwargs.get(BUDGET_KWARG)
        plugin = self.plugin
        if requested is None:
            return self.host_tokens if plugin is None else plugin.config.m
        if plugin is None:
            raise ValueError(f"mm_processor_kwargs: {BUDGET_KWARG!r} needs a qfusion plugin (none is configured)")
        m, _ = Budget.of(requested, name=f"mm_processor_kwargs[{BUDGET_KWARG!r}]", codebook_size=plugin.config.codebook_size)
        return m

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        """The encoder budget: a request may ask for up to codebook_size fused tokens per image."""
        plugin = self.plugin
        return {"image": self.host_tokens if plugin is None else plugin.config.codebook_size}

    def largest_budget(self) -> list[int] | None:
        """The ``qfusion_budget`` with the most fused tokens (profiling inputs use it), or None without plugin."""
        config = None if self.plugin is None else self.plugin.config
        return None if config is None else [config.codebook_size, min(config.n, config.codebook_size)]

    @cached_property
    def question_tokenizer(self):
        spec = self.plugin
        if spec.question_tokenizer_dir is None:
            tokenizer = self.get_hf_processor().tokenizer
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(spec.question_tokenizer_dir)
        if len(tokenizer) > spec.config.text_vocab_size:
            raise ValueError(
                f"qfusion_plugin: the question tokenizer has {len(tokenizer)} tokens, more than the fusion's "
                f"text_vocab_size={spec.config.text_vocab_size}"
            )
        return tokenizer

    def question_ids(self, question: str) -> list[int]:
        spec = self.plugin
        ids = self.question_tokenizer(question, add_special_tokens=spec.question_special_tokens)["input_ids"]
        return ids[: spec.max_question_length] if spec.max_question_length else ids

    @cached_property
    def question_end(self) -> str | None:
        """The text that closes a user turn: the host config's override, or the first word the chat
        template writes after a user message (None without a template: the question runs to the end)."""
        override = getattr(self.get_hf_config(), QUESTION_END_FIELD, None)
        if override is not None:
            return override
        processor = self.get_hf_processor()
        template = getattr(processor, "chat_template", None) or processor.tokenizer.chat_template
        if not template:
            return None
        rendered = processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": _PROBE}], chat_template=template, tokenize=False, add_generation_prompt=True)
        tail = rendered.split(_PROBE, 1)[-1].split()
        return tail[0] if tail else None


class QFusionLlavaDummyInputsBuilder(BaseDummyInputsBuilder[QFusionLlavaProcessingInfo]):
    """Profiling inputs: full-size images, each followed by a short question (the fusion needs one)."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        token = self.info.get_hf_processor().image_token
        return " ".join(f"{token} what is this ?" for _ in range(mm_counts.get("image", 0)))

    def get_dummy_mm_data(self, seq_len, mm_counts, mm_options):
        size = self.info.image_size
        return {"image": self._get_dummy_images(width=size, height=size, num_images=mm_counts.get("image", 0),
                                                overrides=mm_options.get("image"))}


class QFusionLlavaMultiModalProcessor(BaseMultiModalProcessor[QFusionLlavaProcessingInfo]):
    """Images -> pixel values plus each image's question ids; ``<image>`` -> m placeholders."""

    def get_dummy_inputs(self, seq_len, mm_counts, mm_options):
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        budget = self.info.largest_budget()
        if budget is None:
            return inputs
        return replace(inputs, hf_processor_mm_kwargs={**inputs.hf_processor_mm_kwargs, BUDGET_KWARG: budget})

    def _image_token_id(self) -> int:
        return int(self.info.get_hf_config().image_token_id)

    def _questions(self, prompt: list[int]) -> list[list[int]]:
        """Per ``<image>`` in the prompt ids, the ids of the question that follows it."""
        image_id = self._image_token_id()
        decode = self.info.get_hf_processor().tokenizer.decode
        end = self.info.question_end
        positions = [i for i, token in enumerate(prompt) if token == image_id] + [len(prompt)]
        questions = []
        for item, (start, stop) in enumerate(zip(positions, positions[1:])):
            text = decode(prompt[start + 1: stop], skip_special_tokens=False)
            if end is not None:
                text = text.split(end, 1)[0]
            text = text.strip()
            ids = self.info.question_ids(text) if text else []
            if not ids:
                raise ValueError(
                    f"prompt: image {item} has no question after its placeholder; the qfusion plugin compresses "
                    "each image for the user text that follows it in the same turn"
                )
            questions.append(ids)
        return questions

    def apply(self, inputs, timing_ctx):
        if self.info.plugin is not None and inputs.mm_data_items.get_all_counts().get("image"):
            kwargs = dict(inputs.hf_processor_mm_kwargs)
            self.info.budget(kwargs)  # a bad budget fails here, before any processing
            kwargs[_QUESTIONS_KEY] = self._questions(list(inputs.prompt))
            inputs = replace(inputs, hf_processor_mm_kwargs=kwargs)
        return super().apply(inputs, timing_ctx)

    def _get_mm_hashes(self, inputs):
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        questions = kwargs.pop(_QUESTIONS_KEY, None)
        hashes = super()._get_mm_hashes(replace(inputs, hf_processor_mm_kwargs=kwargs))
        if questions is None or "image" not in hashes:
            return hashes
        algorithm = self.info.ctx.get_mm_config().mm_hasher_algorithm
        folded = [MultiModalHasher.hash_kwargs(algorithm, image=item_hash, qfusion_question=torch.tensor(ids))
                  for item_hash, ids in zip(hashes["image"], questions)]
        return {**hashes, "image": folded}

    def _get_cache_missing_processor_kwargs(self, inputs, mm_is_cached):
        kwargs = dict(inputs.hf_processor_mm_kwargs)
        questions = kwargs.get(_QUESTIONS_KEY)
        if questions is not None:
            cached = mm_is_cached.get("image", [])
            kwargs[_QUESTIONS_KEY] = [ids for ids, hit in zip(questions, cached) if not hit]
        return kwargs

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        images = hf_data.get("images")
        image_processor = self.info.get_hf_processor().image_processor
        data = dict(image_processor(images=images, return_tensors="pt"))
        questions = hf_kwargs.get(_QUESTIONS_KEY)
        if questions is not None:
            if len(questions) != len(data["pixel_values"]):
                raise ValueError(
                    f"prompt: {len(data['pixel_values'])} images but {len(questions)} image placeholders"
                )
            data["qfusion_question_ids"] = [torch.tensor(ids, dtype=torch.long) for ids in questions]
            data["qfusion_budget"] = torch.full((len(questions),), self.info.budget(hf_kwargs), dtype=torch.long)
        return BatchFeature(data)

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        fields = {"pixel_values": MultiModalFieldConfig.batched("image")}
        if "qfusion_question_ids" in hf_inputs:
            fields["qfusion_question_ids"] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
            fields["qfusion_budget"] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence[PromptReplacement]:
        image_id = self._image_token_id()
        count = self.info.budget(hf_processor_mm_kwargs)
        return [PromptReplacement(modality="image", target=[image_id], replacement=[image_id] * count)]

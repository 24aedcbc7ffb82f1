"""Qwen2.5-VL and Qwen3-VL hosts served by vLLM with a qfusion plugin.

vLLM's own ``qwen2_vl.py`` (and so ``qwen2_5_vl.py`` and ``qwen3_vl.py``) cannot be imported without
torchvision: it takes ``smart_resize`` from transformers' torchvision image processor. The served
model is assembled from what loads: vLLM's Qwen2 / Qwen3 LLM modules (with their M-RoPE), vLLM's
multimodal interfaces and processing base classes, the host's own transformers vision tower and
``Qwen2VLImageProcessorPil``, and the plugin's ``QuestionFusion``.

Positions: vLLM asks the model for every prompt's M-RoPE positions (``SupportsMRoPE``). They come
from the host's own rope index (transformers' ``get_rope_index`` of the host model class), given
per fused run the virtual grid of :func:`qfusion.adapters.qwen_vl.fused_grid` — the rule the
transformers adapter uses — and, for the host served alone, the images' real grids. Qwen3-VL's
deepstack features are off for fused tokens, as in the transformers adapter; so a Qwen3-VL host is
served with a plugin only (its LLM here has no deepstack inputs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from functools import cached_property

import torch
from torch import Tensor, nn
from transformers import AutoModel, BatchFeature, Qwen2_5_VLModel, Qwen2VLImageProcessorPil, Qwen3VLModel

from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig

from qfusion.adapters.qwen_vl import fused_grid
from qfusion_vllm.fusion import FusionPart, as_list
from qfusion_vllm.processing import QFusionDummyInputsBuilder, QFusionMultiModalProcessor, QFusionProcessingInfo


class QwenVLProcessingInfo(QFusionProcessingInfo):
    """Qwen-VL's facts: its PIL image processor (sizes, patches, merge) and its token counts."""

    @cached_property
    def image_processor(self) -> Qwen2VLImageProcessorPil:
        config = self.ctx.model_config
        return Qwen2VLImageProcessorPil.from_pretrained(config.model, revision=config.revision)

    @cached_property
    def factor(self) -> int:
        """Pixels per merged token along each side (patch size × spatial merge size)."""
        processor = self.image_processor
        return processor.patch_size * processor.merge_size

    @cached_property
    def max_pixels(self) -> int:
        """The most pixels the image processor resizes an image to."""
        return int(self.image_processor.size["longest_edge"])

    def host_max_tokens(self) -> int:
        return self.max_pixels // self.factor ** 2


class QwenVLDummyInputsBuilder(QFusionDummyInputsBuilder):
    def largest_image(self) -> tuple[int, int]:
        factor = self.info.factor
        side = math.isqrt(self.info.max_pixels) // factor * factor
        return side, side


class QwenVLMultiModalProcessor(QFusionMultiModalProcessor):
    """Images -> flattened patches and (t, h, w) grids, as the host's image processor makes them."""

    def _process_images(self, images: list, hf_kwargs: Mapping[str, object]) -> dict:
        return dict(self.info.image_processor(images=images, return_tensors="pt"))

    def _image_fields(self, hf_inputs: BatchFeature) -> dict[str, MultiModalFieldConfig]:
        grid = hf_inputs.get("image_grid_thw", torch.empty(0, 3, dtype=torch.long))
        return {"pixel_values": MultiModalFieldConfig.flat_from_sizes("image", grid.prod(-1)),
                "image_grid_thw": MultiModalFieldConfig.batched("image", keep_on_cpu=True)}

    def _host_count(self, item) -> int:
        return int(item["image_grid_thw"].data.prod()) // self.info.image_processor.merge_size ** 2


class HostRopeIndex:
    """The host's own M-RoPE index: transformers' ``get_rope_index`` of the host model class, run on
    the host config (it reads nothing else of the model)."""

    def __init__(self, host_class: type, config) -> None:
        self.host_class = host_class
        self.config = config

    def get_vision_position_ids(self, *args, **kwargs) -> Tensor:
        return self.host_class.get_vision_position_ids(self, *args, **kwargs)

    def __call__(self, input_ids: Tensor, token_types: Tensor, image_grid_thw: Tensor | None) -> tuple[Tensor, Tensor]:
        """((3, 1, L) positions, (1, 1) delta) of one prompt (1, L) with its token types (1, L)."""
        return self.host_class.get_rope_index(self, input_ids, token_types, image_grid_thw=image_grid_thw)


class QwenVLForConditionalGeneration(nn.Module, FusionPart, SupportsMultiModal, SupportsMRoPE, SupportsPP):
    """vLLM model for Qwen-VL checkpoints with an optional qfusion plugin (see the module docstring).

    Subclasses name the host model class (its rope index) and vLLM's LLM architecture.
    """

    host_model_class: type
    llm_architecture: str
    needs_plugin = False

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        # checkpoint names -> this module's, applied in turn: transformers 5 names ("model.visual.",
        # "model.language_model.") and the hub's Qwen2.5-VL names ("visual.", "model.layers.")
        "model.visual.": "visual.",
        "model.language_model.": "language_model.model.",
        "model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
    })

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<|vision_start|><|image_pad|><|vision_end|>"
        raise ValueError(f"modality: only images are supported, got {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size,
                                         mm_token_ids=[config.image_token_id])
        with self._mark_tower_model(vllm_config, "image"):
            self.init_fusion(vllm_config)
            if self.plugin is None and self.needs_plugin:
                raise ValueError(
                    f"qfusion_plugin: required for a {config.model_type!r} host; served alone it needs its "
                    "deepstack features in the LLM, which this model does not feed (serve it with vLLM's own model)"
                )
            self.visual = AutoModel.from_config(config.vision_config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(vllm_config=vllm_config, hf_config=config.text_config,
                                                             prefix=maybe_prefix(prefix, "language_model"),
                                                             architectures=[self.llm_architecture])
        self.rope_index = HostRopeIndex(self.host_model_class, config)
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def _host_features(self, pixel_values: Tensor, grid_thw: Tensor) -> list[Tensor]:
        """Per image, the host's features after the patch merger (what its own get_image_features gives)."""
        out = self.visual(pixel_values.type(self.visual.dtype), grid_thw=grid_thw.to(pixel_values.device),
                          return_dict=True)
        return list(out.pooler_output.split((grid_thw.prod(-1) // self.merge_size ** 2).tolist()))

    def embed_multimodal(self, **kwargs: object):
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        grids = torch.stack(as_list(kwargs["image_grid_thw"])).long()
        if not isinstance(pixel_values, Tensor):
            pixel_values = torch.cat(list(pixel_values))
        images = list(pixel_values.split(grids.prod(-1).tolist()))
        return self.item_embeddings(len(images), kwargs, lambda chosen: self._host_features(
            torch.cat([images[i] for i in chosen]), grids[chosen]))

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[Tensor, int]:
        """The host's rope index over the prompt: per fused item the virtual grid of its k tokens
        (:func:`~qfusion.adapters.qwen_vl.fused_grid`), per host image its real grid."""
        token_types = torch.zeros(1, len(input_tokens), dtype=torch.long)
        grids = []
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            start, length = feature.mm_position.offset, feature.mm_position.length
            token_types[0, start: start + length] = 1
            grids.append(fused_grid(length, self.merge_size) if self.plugin is not None
                         else feature.data["image_grid_thw"].data.tolist())
        positions, delta = self.rope_index(torch.tensor([input_tokens]), token_types,
                                           torch.tensor(grids, dtype=torch.long) if grids else None)
        return positions[:, 0], int(delta)

    def forward(self, input_ids: Tensor | None, positions: Tensor, intermediate_tensors=None,
                inputs_embeds: Tensor | None = None, **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: Tensor) -> Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        return self.load_host_weights(weights)


@MULTIMODAL_REGISTRY.register_processor(QwenVLMultiModalProcessor, info=QwenVLProcessingInfo,
                                        dummy_inputs=QwenVLDummyInputsBuilder)
class QFusionQwen2_5_VLForConditionalGeneration(QwenVLForConditionalGeneration):
    """Qwen2.5-VL: its transformers vision tower, vLLM's Qwen2 LLM, with or without a plugin."""

    host_model_class = Qwen2_5_VLModel
    llm_architecture = "Qwen2ForCausalLM"


@MULTIMODAL_REGISTRY.register_processor(QwenVLMultiModalProcessor, info=QwenVLProcessingInfo,
                                        dummy_inputs=QwenVLDummyInputsBuilder)
class QFusionQwen3VLForConditionalGeneration(QwenVLForConditionalGeneration):
    """Qwen3-VL: its transformers vision tower, vLLM's Qwen3 LLM, with a plugin (deepstack off)."""

    host_model_class = Qwen3VLModel
    llm_architecture = "Qwen3ForCausalLM"
    needs_plugin = True

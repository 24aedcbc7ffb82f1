"""A LLaVA host served by vLLM with a qfusion plugin between its vision tower and its LLM.

vLLM's own CLIP tower and Llama-family LLM modules run the host checkpoint (vLLM's ``llava.py``
imports pixtral, which needs torchvision, so it is assembled here from those modules); the
plugin's ``QuestionFusion`` turns each image item (its host features) and its questions into m or n
fused tokens, which vLLM scatters into the item's placeholders. Without a plugin in the config the
model is the plain host: every vision token goes to the LLM.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cached_property

import torch
from torch import Tensor, nn
from transformers import BatchFeature, LlavaConfig
from transformers.models.llava import LlavaProcessor

from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (
    WeightsMapper,
    get_layer_index,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig

from qfusion_vllm.fusion import FusionPart, as_list
from qfusion_vllm.processing import QFusionDummyInputsBuilder, QFusionMultiModalProcessor, QFusionProcessingInfo


class LlavaProcessingInfo(QFusionProcessingInfo):
    """LLaVA's facts: its processor (CLIP image processor, tokenizer, chat template) and token count."""

    def get_hf_config(self) -> LlavaConfig:
        return self.ctx.get_hf_config(LlavaConfig)

    def get_hf_processor(self, **kwargs: object) -> LlavaProcessor:
        # only its image processor and chat template are used; request kwargs are ours, not its
        return self.ctx.get_hf_processor(LlavaProcessor)

    @cached_property
    def host_tokens(self) -> int:
        """Vision tokens the host feeds its LLM per image (patch grid, plus the class token under "full")."""
        config = self.get_hf_config()
        patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        return patches + (1 if config.vision_feature_select_strategy == "full" else 0)

    def host_max_tokens(self) -> int:
        return self.host_tokens


class LlavaDummyInputsBuilder(QFusionDummyInputsBuilder):
    def largest_image(self) -> tuple[int, int]:
        size = self.info.get_hf_config().vision_config.image_size
        return size, size


class LlavaMultiModalProcessor(QFusionMultiModalProcessor):
    """Images -> CLIP pixel values (one fixed size); the plugin's fields from the shared processor."""

    def _process_images(self, images: list, hf_kwargs: Mapping[str, object]) -> dict:
        return dict(self.info.get_hf_processor().image_processor(images=images, return_tensors="pt"))

    def _image_fields(self, hf_inputs: BatchFeature) -> dict[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _host_count(self, item) -> int:
        return self.info.host_tokens


class HostProjector(nn.Module):
    """The host's two-layer multimodal projector (vision width -> LLM width), tensor-parallel."""

    def __init__(self, vision_dim: int, text_dim: int, act: str, bias: bool, quant_config, prefix: str):
        super().__init__()
        self.linear_1 = ColumnParallelLinear(vision_dim, text_dim, bias=bias, quant_config=quant_config,
                                             prefix=f"{prefix}.linear_1")
        self.act = get_act_fn(act)
        self.linear_2 = RowParallelLinear(text_dim, text_dim, bias=bias, quant_config=quant_config,
                                          prefix=f"{prefix}.linear_2")

    def forward(self, features: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(features)[0]))[0]


def _tower_depth(config) -> tuple[int, list[int] | None]:
    """(encoder layers to build, layers to select or None for the last built) for vision_feature_layer."""
    layers, total = config.vision_feature_layer, config.vision_config.num_hidden_layers
    if isinstance(layers, int):
        return get_layer_index(layers, total), None
    return max(get_layer_index(layer, total) for layer in layers), list(layers)


def _tower_names(weights: Iterable[tuple[str, Tensor]]):
    """Checkpoints name the CLIP tower either with its inner ``vision_model.`` (hub LLaVA checkpoints)
    or without it (transformers 5 saves the bare transformer); vLLM's CLIP module has it."""
    for name, tensor in weights:
        head, sep, rest = name.partition("vision_tower.")
        if sep and head in ("", "model.") and not rest.startswith("vision_model."):
            name = f"{head}vision_tower.vision_model.{rest}"
        yield name, tensor


@MULTIMODAL_REGISTRY.register_processor(LlavaMultiModalProcessor, info=LlavaProcessingInfo,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class QFusionLlavaForConditionalGeneration(nn.Module, FusionPart, SupportsMultiModal, SupportsPP):
    """vLLM model for ``llava`` checkpoints (CLIP tower, Llama-family LLM) with an optional qfusion plugin.

    The plugin directory comes from the host config field ``qfusion_plugin`` (``hf_overrides``); it
    is checked against the host before any weight is loaded.
    """

    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        # transformers 5 checkpoint names -> this module's
        "model.language_model.": "language_model.model.",
        "model.vision_tower.": "vision_tower.",
        "model.multi_modal_projector.": "multi_modal_projector.",
        "lm_head.": "language_model.lm_head.",
    })

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError(f"modality: only images are supported, got {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size,
                                         mm_token_ids=[config.image_token_id])
        depth, self.select_layers = _tower_depth(config)
        with self._mark_tower_model(vllm_config, "image"):
            self.init_fusion(vllm_config)
            self.vision_tower = CLIPVisionModel(config.vision_config, quant_config, num_hidden_layers_override=depth,
                                                require_post_norm=False, prefix=maybe_prefix(prefix, "vision_tower"))
            tower_width = config.vision_config.hidden_size * (1 if self.select_layers is None
                                                              else len(self.select_layers))
            self.multi_modal_projector = HostProjector(
                tower_width, config.text_config.hidden_size, config.projector_hidden_act or "gelu",
                config.multimodal_projector_bias, quant_config, maybe_prefix(prefix, "multi_modal_projector"))
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(vllm_config=vllm_config, hf_config=config.text_config,
                                                             prefix=maybe_prefix(prefix, "language_model"))
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def _host_features(self, pixel_values: Tensor) -> Tensor:
        """(N, V, d): the selected tower features, after the projector unless the fusion reads the tower."""
        features = self.vision_tower(pixel_values.to(self.vision_tower.dtype), select_layers=self.select_layers,
                                     feature_select_strategy=self.config.vision_feature_select_strategy)
        if self.plugin is not None and self.plugin.settings.vision_source == "tower":
            return features
        return self.multi_modal_projector(features)

    def embed_multimodal(self, **kwargs: object):
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        images = as_list(pixel_values)
        return self.item_embeddings(len(images), kwargs, lambda chosen: list(
            self._host_features(torch.stack([images[i] for i in chosen])).unbind(0)))

    def forward(self, input_ids: Tensor | None, positions: Tensor, intermediate_tensors=None,
                inputs_embeds: Tensor | None = None, **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: Tensor) -> Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        return self.load_host_weights(_tower_names(weights))

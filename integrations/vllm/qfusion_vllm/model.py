"""A LLaVA host served by vLLM with a qfusion plugin between its vision tower and its LLM.

vLLM's own CLIP tower and Llama-family LLM modules run the host checkpoint; the plugin's
``QuestionFusion`` turns each image (its host features) and its question into m fused tokens, which
vLLM scatters into the m placeholders the processor put in the prompt. Without a plugin in the
config the model is the plain host: every vision token goes to the LLM.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from safetensors.torch import load_model
from torch import Tensor, nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    get_layer_index,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from qfusion import QuestionFusion
from qfusion.model import WEIGHTS_NAME
from qfusion_vllm.plugin import check_fit, plugin_directory, read_plugin
from qfusion_vllm.processor import (
    QFusionLlavaDummyInputsBuilder,
    QFusionLlavaMultiModalProcessor,
    QFusionLlavaProcessingInfo,
)

FUSION = "qfusion"


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


def _as_list(value) -> list:
    return list(value.unbind(0)) if isinstance(value, Tensor) else list(value)


@MULTIMODAL_REGISTRY.register_processor(QFusionLlavaMultiModalProcessor, info=QFusionLlavaProcessingInfo,
                                        dummy_inputs=QFusionLlavaDummyInputsBuilder)
class QFusionLlavaForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsPP):
    """vLLM model for ``llava`` checkpoints (CLIP tower, Llama-family LLM) with an optional qfusion plugin.

    The plugin directory comes from the host config field ``qfusion_plugin`` (``hf_overrides``); its
    dims are checked against the host before any weight is loaded.
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
        directory = plugin_directory(config)
        self.plugin = None if directory is None else read_plugin(directory)
        if self.plugin is not None:
            check_fit(self.plugin, config)
        self.config = config
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size,
                                         mm_token_ids=[config.image_token_id])
        depth, self.select_layers = _tower_depth(config)
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = CLIPVisionModel(config.vision_config, quant_config, num_hidden_layers_override=depth,
                                                require_post_norm=False, prefix=maybe_prefix(prefix, "vision_tower"))
            tower_width = config.vision_config.hidden_size * (1 if self.select_layers is None
                                                              else len(self.select_layers))
            self.multi_modal_projector = HostProjector(
                tower_width, config.text_config.hidden_size, config.projector_hidden_act or "gelu",
                config.multimodal_projector_bias, quant_config, maybe_prefix(prefix, "multi_modal_projector"))
            if self.plugin is not None:
                self.qfusion = QuestionFusion(self.plugin.config)
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(vllm_config=vllm_config, hf_config=config.text_config,
                                                             prefix=maybe_prefix(prefix, "language_model"))
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    # ------------------------------------------------------------------ images -> LLM embeddings

    def _host_features(self, pixel_values: Tensor) -> Tensor:
        """(N, V, d): the selected tower features, after the projector unless the fusion reads the tower."""
        features = self.vision_tower(pixel_values.to(self.vision_tower.dtype), select_layers=self.select_layers,
                                     feature_select_strategy=self.config.vision_feature_select_strategy)
        if self.plugin is not None and self.plugin.vision_source == "tower":
            return features
        return self.multi_modal_projector(features)

    def _fuse(self, features: Tensor, question_ids: list[Tensor], budgets: list[int]) -> list[Tensor]:
        """Per image, its m fused tokens (m, LLM width); one fusion call per distinct budget."""
        fusion = self.qfusion
        vision = [f.to(fusion.dtype) for f in features]
        fused: list[Tensor | None] = [None] * len(vision)
        for m in sorted(set(budgets)):
            items = [i for i, b in enumerate(budgets) if b == m]
            questions = [[question_ids[i].to(device=fusion.device, dtype=torch.long)] for i in items]
            tokens = fusion([vision[i] for i in items], questions, m=m).tokens
            for i, sample in zip(items, tokens):
                fused[i] = sample[0]
        return fused

    def embed_multimodal(self, **kwargs: object):
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if not isinstance(pixel_values, Tensor):
            pixel_values = torch.stack(list(pixel_values))
        features = self._host_features(pixel_values)
        if self.plugin is None:
            return list(features.unbind(0))
        question_ids = _as_list(kwargs["qfusion_question_ids"])
        budgets = [int(b) for b in _as_list(kwargs["qfusion_budget"])]
        dtype = self.language_model.model.embed_tokens.weight.dtype
        return [tokens.to(dtype) for tokens in self._fuse(features, question_ids, budgets)]

    # ------------------------------------------------------------------ LLM

    def forward(self, input_ids: Tensor | None, positions: Tensor, intermediate_tensors=None,
                inputs_embeds: Tensor | None = None, **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: Tensor) -> Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """The host checkpoint through vLLM's loader; the plugin's fusion from its own safetensors file."""
        loaded = AutoWeightsLoader(self).load_weights(_tower_names(weights), mapper=self.hf_to_vllm_mapper)
        if self.plugin is not None:
            path = os.path.join(self.plugin.directory, WEIGHTS_NAME)
            missing, unexpected = load_model(self.qfusion, path, strict=False, device=str(self.qfusion.device))
            if missing or unexpected:
                raise ValueError(
                    f"qfusion_plugin: {WEIGHTS_NAME} in {self.plugin.directory!r} does not match its config.json "
                    f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
                )
            loaded.update(f"{FUSION}.{name}" for name, _ in self.qfusion.named_parameters())
        return loaded

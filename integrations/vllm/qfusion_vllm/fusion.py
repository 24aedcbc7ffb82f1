"""The qfusion part of a served model: the plugin's fusion, the vision cache, and the fusion call.

Every served family's model mixes in :class:`FusionPart`: it loads the plugin the host config
names (through :func:`qfusion_vllm.plugin.load_plugin`, which reads and fits it with qfusion's own
plugin owner), runs the host's vision features of a batch of items through ``QuestionFusion`` and
returns each item's fused tokens. An item is an image with the questions about it so far (the
multimodal fields of :mod:`qfusion_vllm.processing`); it embeds the last question's group: m tokens
for a first question, n for a follow-up.

A follow-up item is new to vLLM's encoder cache (its questions differ), but its image is not: the
host's vision features of recent images are kept in a small cache keyed by the image's content
hash (the ``qfusion_image_key`` field), as the transformers path's ``FusionCache`` keeps them
between turns, so a follow-up runs the fusion, not the vision tower. The cache holds the features
of the last ``qfusion_vision_cache`` images (a host-config field, default 64; 0 turns it off), on
the model's device, outside the memory vLLM plans for.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
from torch import Tensor
from vllm.model_executor.models.utils import AutoWeightsLoader

from qfusion.budget import Budget
from qfusion.plugin import Plugin
from qfusion_vllm.plugin import load_plugin

FUSION = "qfusion"
"""The fusion submodule's name in a served model."""

VISION_CACHE_FIELD = "qfusion_vision_cache"
"""Optional host-config field: how many images' vision features the model keeps for follow-ups."""

VISION_CACHE_DEFAULT = 64


def as_list(value) -> list:
    """A batched multimodal field as a list of per-item values (vLLM stacks equal shapes)."""
    return list(value.unbind(0)) if isinstance(value, Tensor) else list(value)


class VisionCache:
    """The host vision features of the last ``capacity`` images, by content key (least recently used
    goes first)."""

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 0:
            raise ValueError(f"{VISION_CACHE_FIELD}: expected a number of images >= 0, got {capacity!r}")
        self.capacity = capacity
        self.entries: OrderedDict[bytes, Tensor] = OrderedDict()

    def features(self, keys: list[bytes], compute: Callable[[list[int]], list[Tensor]]) -> list[Tensor]:
        """Per item, its image's features: cached ones, the others computed once per distinct image.

        compute: (indices of the items to encode, one per missing image) -> their features.
        """
        missing = {}
        for i, key in enumerate(keys):
            if key not in self.entries and key not in missing:
                missing[key] = i
        found = dict(zip(missing, compute(list(missing.values())))) if missing else {}
        out = []
        for key in keys:
            if key in self.entries:
                self.entries.move_to_end(key)
            out.append(found[key] if key in found else self.entries[key])
        for key, value in found.items():
            self.entries[key] = value
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return out


class FusionPart:
    """Mixed into a served model (an ``nn.Module`` with ``language_model`` and ``hf_to_vllm_mapper``):
    ``self.plugin`` and ``self.qfusion`` when the host config names a plugin, the items' embeddings
    (:meth:`item_embeddings`, through :meth:`fuse`) and the host weights' loading."""

    plugin: Plugin | None

    def init_fusion(self, vllm_config) -> None:
        """Read the plugin the host config names (None: serve the host alone) and load its fusion in
        the model's dtype; call inside the model's tower context, before any weight is loaded."""
        config = vllm_config.model_config.hf_config
        self.plugin = load_plugin(config)
        if self.plugin is not None:
            fusion = self.plugin.load_fusion()
            setattr(self, FUSION, fusion.to(dtype=vllm_config.model_config.dtype))
            self.vision_cache = VisionCache(getattr(config, VISION_CACHE_FIELD, VISION_CACHE_DEFAULT))

    def item_features(self, count: int, fields: dict, compute: Callable[[list[int]], list[Tensor]]) -> list[Tensor]:
        """Per item of a batch of ``count``, its image's host features (with a plugin through the
        vision cache, which encodes each image once).

        compute: (indices of the items to encode) -> their features (V_i, vision_dim).
        """
        if self.plugin is None:
            return compute(list(range(count)))
        keys = [bytes(k.tolist()) for k in as_list(fields["qfusion_image_key"])]
        return self.vision_cache.features(keys, compute)

    def item_embeddings(self, count: int, fields: dict, compute: Callable[[list[int]], list[Tensor]]) -> list[Tensor]:
        """What ``embed_multimodal`` returns for a batch of ``count`` items: without a plugin each image's
        host features, with one each item's fused tokens, in the LLM's dtype.

        compute: (indices of the items to encode) -> their host features (V_i, d); see :meth:`item_features`.
        """
        features = self.item_features(count, fields, compute)
        if self.plugin is None:
            return features
        dtype = self.language_model.model.embed_tokens.weight.dtype
        return [tokens.to(dtype) for tokens in self.fuse(features, fields)]

    def load_host_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """The host checkpoint through vLLM's loader and the model's ``hf_to_vllm_mapper``; the fusion's
        names with them (it came with the plugin at init)."""
        loaded = AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)
        return loaded | self.fusion_weight_names()

    def fuse(self, features: list[Tensor], fields: dict) -> list[Tensor]:
        """Per item, its fused tokens (k, LLM width): the features of its image fused with its questions.

        features: per item, (V_i, vision_dim) host features. fields: the items' multimodal fields
            (``qfusion_question_ids``, ``qfusion_question_lengths``, ``qfusion_budget``). Items of one
            budget go through the fusion together.
        """
        fusion = getattr(self, FUSION)
        ids, lengths = as_list(fields["qfusion_question_ids"]), as_list(fields["qfusion_question_lengths"])
        budgets = [Budget(*b.tolist()) for b in as_list(fields["qfusion_budget"])]
        questions = [list(i.to(device=fusion.device, dtype=torch.long).split(n.tolist())) for i, n in zip(ids, lengths)]
        vision = [f.to(device=fusion.device, dtype=fusion.dtype) for f in features]
        fused: list[Tensor | None] = [None] * len(vision)
        for budget in dict.fromkeys(budgets):
            chosen = [i for i, b in enumerate(budgets) if b == budget]
            tokens = fusion([vision[i] for i in chosen], [questions[i] for i in chosen], budget=budget).tokens
            for i, groups in zip(chosen, tokens):
                fused[i] = groups[-1]
        return fused

    def fusion_weight_names(self) -> set[str]:
        """The fusion's parameter names (loaded with the plugin, not from the host checkpoint)."""
        if self.plugin is None:
            return set()
        return {f"{FUSION}.{name}" for name, _ in getattr(self, FUSION).named_parameters()}

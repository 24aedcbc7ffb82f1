"""The qfusion part of a served model: the plugin's fusion, and the fusion call on a batch of items.

Every served family's model mixes in :class:`FusionPart`: it loads the plugin the host config
names (through :func:`qfusion_vllm.plugin.load_plugin`, which reads and fits it with qfusion's own
plugin owner), runs the host's vision features of a batch of items through ``QuestionFusion`` and
returns each item's fused tokens. An item is an image with the questions about it so far (the
multimodal fields of :mod:`qfusion_vllm.processing`); it embeds the last question's group: m tokens
for a first question, n for a follow-up.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qfusion.budget import Budget
from qfusion.plugin import Plugin
from qfusion_vllm.plugin import load_plugin

FUSION = "qfusion"
"""The fusion submodule's name in a served model."""


def as_list(value) -> list:
    """A batched multimodal field as a list of per-item values (vLLM stacks equal shapes)."""
    return list(value.unbind(0)) if isinstance(value, Tensor) else list(value)


def distinct(items: list[Tensor]) -> tuple[list[int], list[int]]:
    """(the index of each distinct tensor's first occurrence, per item the position of its tensor
    among those): the items of one image's question groups share their pixels, which the vision
    tower then runs once."""
    firsts: list[int] = []
    index: list[int] = []
    for i, item in enumerate(items):
        same = next((k for k, f in enumerate(firsts)
                     if items[f].shape == item.shape and torch.equal(items[f], item)), None)
        if same is None:
            firsts.append(i)
            same = len(firsts) - 1
        index.append(same)
    return firsts, index


class FusionPart:
    """Mixed into a served model (an ``nn.Module``): ``self.plugin`` and ``self.qfusion`` when the host
    config names a plugin, and :meth:`fuse`."""

    plugin: Plugin | None

    def init_fusion(self, vllm_config) -> None:
        """Read the plugin the host config names (None: serve the host alone) and load its fusion in
        the model's dtype; call inside the model's tower context, before any weight is loaded."""
        self.plugin = load_plugin(vllm_config.model_config.hf_config)
        if self.plugin is not None:
            fusion = self.plugin.load_fusion()
            setattr(self, FUSION, fusion.to(dtype=vllm_config.model_config.dtype))

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

"""What the hosts that take precomputed embeddings through ``mm_encoder_outputs`` share.

LLaVA, LLaVA-NeXT, LLaVA-OneVision and the Qwen-VL family run their own ``forward`` and
``generate`` unchanged once the fused tokens stand in ``mm_encoder_outputs`` (BLIP-2 its
``forward``; its ``generate`` is replaced): the family says how to build those outputs
(:meth:`SeamAdapter.with_fused_tokens`), this class checks the call and runs the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qfusion.adapters.base import HostAdapter
from qfusion.adapters.patching import QFusionArguments

VISUAL_INPUTS = ("pixel_values", "pixel_values_videos")
"""The host arguments that carry images and videos."""


class SeamAdapter(HostAdapter):
    """A HostAdapter whose fused tokens reach the host through ``mm_encoder_outputs``."""

    def with_fused_tokens(self, args: dict, qfusion: QFusionArguments) -> dict:
        """The host arguments of one call with the fused tokens in place of its visual inputs."""
        raise NotImplementedError

    def is_visual_call(self, args: dict, qfusion: QFusionArguments) -> bool:
        """Whether a call has visual inputs or questions to fuse (else, e.g. a decoding step, it goes to the
        host unchanged); raises for inputs the plugin cannot take."""
        given = [args.get(name) is not None for name in VISUAL_INPUTS]
        if not any(given) and not qfusion.given:
            return False
        if args.get("mm_encoder_outputs") is not None:
            raise ValueError(
                "mm_encoder_outputs: pass either precomputed image embeddings or pixel_values with "
                "qfusion_input_ids, not both"
            )
        if args.get("inputs_embeds") is not None:
            raise ValueError("inputs_embeds: not supported with qfusion inputs; pass input_ids")
        if not any(given) and (qfusion.cache is None or qfusion.cache.is_empty):
            raise ValueError(
                "pixel_values: required with qfusion_input_ids (or pixel_values_videos; unless a filled "
                "qfusion_cache holds the visual inputs)"
            )
        return True

    def seam_outputs(self, blocks: list, tokens: list[list[Tensor]], keys: dict[int, str]) -> dict:
        """``mm_encoder_outputs``: per placeholder kind (``keys``: token id -> the host's key) the fused
        rows of every run of that kind, in prompt order.

        blocks: per sample its placeholder runs as (question, token id, length); tokens: per sample, per
            question, the fused tokens (:meth:`fused_tokens`).
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        embed = self.model.get_input_embeddings().weight
        per_kind: dict[int, list[Tensor]] = {token: [] for token in keys}
        for sample_blocks, groups in zip(blocks, tokens):
            rows = torch.cat(groups).to(device=embed.device, dtype=embed.dtype)
            for (_, token, _), piece in zip(sample_blocks, rows.split([length for _, _, length in sample_blocks])):
                per_kind[token].append(piece)
        return {keys[token]: BaseModelOutputWithPooling(pooler_output=pieces)
                for token, pieces in per_kind.items() if pieces}

    def patched_forward(self, args: dict, qfusion: QFusionArguments):
        """The host's forward with the visual inputs compressed by the plugin."""
        if self.is_visual_call(args, qfusion):
            args = self.with_fused_tokens(args, qfusion)
        return self.host_method("forward")(**args)

    def patched_generate(self, args: dict, qfusion: QFusionArguments):
        """The host's generate with the visual inputs compressed by the plugin."""
        self.check_generation_inputs(args.get("input_ids", args.get("inputs")), args.get("attention_mask"))
        if self.is_visual_call(args, qfusion):
            with torch.no_grad():
                args = self.with_fused_tokens(args, qfusion)
        return self.host_method("generate")(**args)

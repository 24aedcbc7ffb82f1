"""The Gemma family (Gemma 3): its record.

Vision source ``projector``: the host's own ``get_image_features`` — the SigLIP tower's states
pooled to ``mm_tokens_per_image`` and projected to the LLM's width. Every placeholder run stands
between ``<start_of_image>`` and ``<end_of_image>``.

Attention over fused tokens: Gemma 3's LLM lets the tokens of one image attend to each other in
both directions (a block per run of image tokens, read from ``token_type_ids``), and causally to
everything before. The rule here: **the same for fused tokens** — the processor marks every fused
run as image tokens, so each run of m (or n) fused tokens is one bidirectional block, exactly where
the host's own image block would have stood; runs of different questions or images are separate
blocks and see each other causally. A fused token is the image's stand-in, so it gets the image's
attention.
"""

from __future__ import annotations

from qfusion.adapters.adapter import host_features
from qfusion.adapters.family import HostFamily, VisionSource, register_family, text_width


def processor_inputs(host_processor, kinds, questions, data: dict) -> dict:
    """The image processor's ``num_crops`` leaves the inputs; pan-and-scan crops are refused (each crop
    would be an image of its own in the host's prompt, which fused tokens do not stand for)."""
    crops = data.get("num_crops")
    if crops is not None and int(sum(int(c) for c in crops)) > 0:
        raise ValueError(
            "images: Gemma's pan-and-scan crops are not supported with a qfusion plugin; build the host processor "
            "with do_pan_and_scan=False"
        )
    return {"num_crops": None}

GEMMA = register_family(HostFamily(
    name="gemma",
    model_types=("gemma3",),
    sources=(VisionSource("projector", text_width, host_features,
                          "after the multimodal projector (the host's get_image_features)"),),
    vision_tower=("model.vision_tower",),
    projector=("model.multi_modal_projector",),
    markers=("boi_token_id", "eoi_token_id"),
    token_types="token_type_ids",
    stacked=("image",),
    processor_inputs=processor_inputs,
    notes="fused runs attend bidirectionally within themselves, as the host's image tokens do; no pan-and-scan",
))
"""Gemma 3 (images)."""

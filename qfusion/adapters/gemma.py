"""The Gemma families (Gemma 3, Gemma 4): their records.

Vision source ``projector``: the host's own ``get_image_features`` — Gemma 3: the SigLIP tower's
states pooled to ``mm_tokens_per_image`` and projected to the LLM's width; Gemma 4: its tower at the
image's own aspect (``image_position_ids``), pooled and embedded. Every placeholder run stands
between ``<start_of_image>`` and ``<end_of_image>``.

Attention over fused tokens: Gemma 3's LLM lets the tokens of one image attend to each other in
both directions (a block per run of image tokens, read from ``token_type_ids``), and causally to
everything before. The rule here: **the same for fused tokens** — the processor marks every fused
run as image tokens, so each run of m (or n) fused tokens is one bidirectional block, exactly where
the host's own image block would have stood; runs of different questions or images are separate
blocks and see each other causally. A fused token is the image's stand-in, so it gets the image's
attention. Gemma 4 reads the same blocks from ``mm_token_type_ids`` (where its config turns
bidirectional vision attention on).
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
    name="gemma3",
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


def gemma4_processor_inputs(host_processor, kinds, questions, data: dict) -> dict:
    """The image processor's per-image soft-token counts leave the inputs (the host's prompt layout reads them)."""
    return {"num_soft_tokens_per_image": None}


GEMMA4 = register_family(HostFamily(
    name="gemma4",
    model_types=("gemma4",),
    sources=(VisionSource("projector", text_width, host_features,
                          "after the tower's pooling and embedding (the host's get_image_features)"),),
    vision_tower=("model.vision_tower",),
    projector=("model.embed_vision",),
    markers=("boi_token_id", "eoi_token_id"),
    token_types="mm_token_type_ids",
    drop_inputs=("image_position_ids",),
    processor_inputs=gemma4_processor_inputs,
    notes="images only: its video processor needs torchvision, so video was not built or tested; no audio",
))
"""Gemma 4 (images)."""

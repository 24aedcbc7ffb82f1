"""The LLaVA-OneVision-1.5 family: a Qwen-style tower (patch merger, ``grid_thw``) before a 1-D-position LLM.

Vision source ``merger``: the host's own ``get_image_features`` / ``get_video_features``, the
features after its patch merger. Every placeholder run stands between ``<|vision_start|>`` and
``<|vision_end|>``; positions are the LLM's own consecutive ones (the host keeps text positions
one-dimensional), so fused tokens count like any token and no virtual grid is needed.
"""

from __future__ import annotations

from qfusion.adapters.family import HostFamily, VisionSource, register_family, text_width
from qfusion.adapters.qwen_vl import merger_features

LLAVA_ONEVISION_1_5 = register_family(HostFamily(
    name="llava_onevision1_5",
    model_types=("llava_onevision1_5",),
    sources=(VisionSource("merger", text_width, merger_features,
                          "after the patch merger (the host's get_image_features / get_video_features)"),),
    vision_tower=("model.visual",),
    projector=("model.visual.merger",),
    image_token=("image_token_id",),
    video_token=("video_token_id",),
    markers=("vision_start_token_id", "vision_end_token_id"),
    drop_inputs=("image_grid_thw", "video_grid_thw", "second_per_grid_ts"),
    min_transformers="5.25",
))
"""LLaVA-OneVision-1.5 (images and video)."""

"""The Mistral 3 family (Mistral-Small-3.x with a Pixtral tower): its record.

Vision source ``projector``: the host's own ``get_image_features`` — the Pixtral tower at the image's
own size (variable sizes: ``image_sizes``), then the projector's patch merger; one tensor per image.
The host lays an image out as rows of ``[IMG]`` tokens, each row closed by ``[IMG_BREAK]`` and the
last by ``[IMG_END]``; fused tokens have no rows, so a run of them is closed by ``[IMG_END]`` alone.
"""

from __future__ import annotations

from qfusion.adapters.adapter import host_features
from qfusion.adapters.family import HostFamily, VisionSource, register_family, text_width

MISTRAL = register_family(HostFamily(
    name="mistral",
    model_types=("mistral3",),
    sources=(VisionSource("projector", text_width, host_features,
                          "after the patch-merging projector (the host's get_image_features)"),),
    vision_tower=("model.vision_tower",),
    projector=("model.multi_modal_projector",),
    processor_markers=(None, "image_end_token"),
    notes="images of any size; a fused run is closed by [IMG_END] (no row breaks)",
))
"""Mistral 3 (images, several per prompt, variable sizes)."""

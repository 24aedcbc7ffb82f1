"""The Idefics family (Idefics3, SmolVLM): its record.

Vision source ``connector``: the host's own ``get_image_features`` — an image split into
sub-images (a grid of crops plus the whole image downscaled), each through the tower and the
connector's pixel shuffle; an image's vision tokens are those of all its sub-images, in order.
Every placeholder run stands between two ``<fake_token_around_image>`` markers (the host's own
image layout adds row/column tags per sub-image, which fused tokens, one run per image and
question, do not have). Video: the host reads a video as its frames (images), so a video is given
to the plugin as its frames, several images in one prompt.
"""

from __future__ import annotations

from qfusion.adapters.adapter import host_features
from qfusion.adapters.family import HostFamily, VisionSource, register_family, text_width


def image_inputs(image_processor, images: list) -> dict:
    """Each image as its own entry of the image processor's batch, so the host's features come one per image
    (a list of several images would be one entry whose sub-images run together)."""
    return image_processor([[image] for image in images], return_tensors="pt")

IDEFICS = register_family(HostFamily(
    name="idefics",
    model_types=("idefics3", "smolvlm"),
    sources=(VisionSource("connector", text_width, host_features,
                          "every sub-image after the connector (the host's get_image_features)"),),
    vision_tower=("model.vision_model",),
    projector=("model.connector",),
    llm=("model.text_model", "lm_head"),
    llm_name="model.text_model",
    processor_markers=("fake_image_token", "fake_image_token"),
    image_inputs=image_inputs,
    notes="video as its frames (several images): the host reads frames as images",
))
"""Idefics3 and SmolVLM (images, several per prompt, split into sub-images)."""

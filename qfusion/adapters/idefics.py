"""The Idefics families (Idefics3, SmolVLM): their records.

Vision source ``connector``: the host's own ``get_image_features`` — an image split into
sub-images (a grid of crops plus the whole image downscaled), each through the tower and the
connector's pixel shuffle; an image's vision tokens are those of all its sub-images, in order.
Every placeholder run stands between two ``<fake_token_around_image>`` markers (the host's own
image layout adds row/column tags per sub-image, which fused tokens, one run per image and
question, do not have). Video: the host reads a video as its frames (images), so a video is given
to the plugin as its frames, several images in one prompt.
"""

from __future__ import annotations

import torch

from qfusion.adapters.adapter import host_features
from qfusion.adapters.family import HostFamily, VisionSource, register_family, text_width


def subimage_features(adapter, kind: str, args: dict):
    """Per image, the host's features of all its sub-images, (sub-images · tokens, d).

    transformers releases differ in what ``get_image_features`` returns here: one tensor per entry
    of the image batch (here: per image), or one per sub-image; the latter are joined per image, the
    sub-images of an entry being its non-padding ones (the host's own rule: padding is all zeros).
    """
    features, _ = host_features(adapter, kind, args)
    pixel_values = args["pixel_values"]  # (images, sub-images, C, H, W)
    if len(features) == pixel_values.shape[0]:
        return features, None
    counts = (pixel_values != 0).flatten(2).any(-1).sum(-1).tolist()
    if sum(counts) != len(features):
        raise ValueError(f"pixel_values: holds {sum(counts)} sub-images, the host encoded {len(features)}")
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [torch.cat(features[start:start + count]) for start, count in zip(starts, counts)], None


def image_inputs(image_processor, images: list) -> dict:
    """Each image as its own entry of the image processor's batch, so the host's features come one per image
    (a list of several images would be one entry whose sub-images run together)."""
    return image_processor([[image] for image in images], return_tensors="pt")

def _record(name: str, model_type: str, **extra) -> HostFamily:
    return HostFamily(
        name=name,
        model_types=(model_type,),
        sources=(VisionSource("connector", text_width, subimage_features,
                              "every sub-image after the connector (the host's get_image_features)"),),
        vision_tower=("model.vision_model",),
        projector=("model.connector",),
        llm=("model.text_model", "lm_head"),
        llm_name="model.text_model",
        processor_markers=("fake_image_token", "fake_image_token"),
        stacked=("image",),  # read as one tensor (transformers 5.18; later releases take either)
        image_inputs=image_inputs,
        notes="video as its frames (several images): the host reads frames as images",
        **extra,
    )


IDEFICS3 = register_family(_record("idefics3", "idefics3"))
"""Idefics3 (images, several per prompt, split into sub-images)."""

SMOLVLM = register_family(_record("smolvlm", "smolvlm", min_transformers="5.21"))
"""SmolVLM (as Idefics3; before transformers 5.21 its LLM input took whole sub-images' worth of image
tokens only, which m fused tokens are not)."""

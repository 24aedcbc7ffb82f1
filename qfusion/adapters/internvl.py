"""The InternVL family (InternVL 3 / 3.5): its record and how its tiles make an image.

Vision source ``projector``: the host's own ``get_image_features`` — every tile of an image (the
processor crops an image into tiles plus a thumbnail; ``num_patches`` says how many per image)
through the tower, pixel shuffle and projector; an image's vision tokens are those of all its
tiles, in order. Every placeholder run stands between ``<img>`` and ``</img>``, the markers the
host processor names. Video: the host encodes a video's frames as image tiles under the image
token, so a video is given to the plugin as its frames, several images in one prompt.
"""

from __future__ import annotations

import torch

from qfusion.adapters.adapter import host_features
from qfusion.adapters.family import HostFamily, VisionSource, register_family, text_width


def tile_features(adapter, kind: str, args: dict):
    """Per image, the host's features of all its tiles, (tiles · tokens, d)."""
    tiles, _ = host_features(adapter, kind, args)
    counts = args.get("num_patches")
    counts = [1] * len(tiles) if counts is None else [int(c) for c in torch.as_tensor(counts).flatten()]
    if sum(counts) != len(tiles):
        raise ValueError(f"num_patches: says {sum(counts)} tiles in all, pixel_values holds {len(tiles)}")
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [torch.cat(tiles[start:start + count]) for start, count in zip(starts, counts)], None


INTERNVL = register_family(HostFamily(
    name="internvl",
    model_types=("internvl",),
    sources=(VisionSource("projector", text_width, tile_features,
                          "every tile after pixel shuffle and the projector (the host's get_image_features)"),),
    vision_tower=("model.vision_tower",),
    projector=("model.multi_modal_projector",),
    processor_markers=("start_image_token", "end_image_token"),
    drop_inputs=("num_patches",),
    stacked=("image",),
    notes="video as its frames (several images): the host reads frames as image tiles",
))
"""InternVL 3 / 3.5 (images, several per prompt, tiled)."""

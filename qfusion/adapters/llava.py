"""The LLaVA family (LLaVA, LLaVA-NeXT, LLaVA-OneVision): its record and the hooks where it differs.

Vision sources: ``projector`` (default) reads the host's own ``get_image_features`` /
``get_video_features`` — the selected tower layers after the multimodal projector, with
LLaVA-NeXT's and OneVision's any-resolution packing and ``image_newline``, a OneVision video's
frames pooled as the host pools them — and ``tower`` the selected tower states before the
projector (not for OneVision, whose images are packed and video frames pooled after it). With the
HD front-end (plain LLaVA) every view goes through the tower on its own and
:class:`qfusion.vision.HDFrontEnd` merges them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qfusion.adapters.adapter import host_features
from qfusion.adapters.family import HostFamily, VisionSource, register_family, text_width


def _layer_and_strategy(adapter, args: dict):
    config = adapter.model.config
    layer = args.get("vision_feature_layer")
    strategy = args.get("vision_feature_select_strategy")
    return (config.vision_feature_layer if layer is None else layer,
            config.vision_feature_select_strategy if strategy is None else strategy)


def _tower(adapter, pixels: Tensor, layer, strategy: str) -> Tensor:
    """(N, T, tower_dim): the tower's hidden states at ``layer``, selected as the host does."""
    hidden = adapter.model.model.vision_tower(pixels, output_hidden_states=True, return_dict=True).hidden_states
    pool = [hidden[layer]] if isinstance(layer, int) else [hidden[i] for i in layer]
    if strategy == "default":  # the host drops the class token
        pool = [h[:, 1:] for h in pool]
    return torch.cat(pool, dim=-1)


def _hd_views(adapter, args: dict, project: bool) -> list[Tensor]:
    """Per image, the HD front-end's tokens over its views (1 global + rows·cols local)."""
    hd = adapter.hd
    pixel_values = args["pixel_values"]
    if pixel_values.dim() != 5 or pixel_values.shape[1] != hd.num_views:
        raise ValueError(
            f"pixel_values: expected (batch, {hd.num_views}, C, H, W) HD views (1 global + {hd.num_views - 1} "
            f"local, grid {hd.grid}) as qfusion.QFusionProcessor builds them, got shape {tuple(pixel_values.shape)}"
        )
    batch, views = pixel_values.shape[:2]
    features = _tower(adapter, pixel_values.flatten(0, 1), *_layer_and_strategy(adapter, args))
    if project:
        features = adapter.model.model.multi_modal_projector(features)
    features = features.to(device=hd.device, dtype=hd.dtype).unflatten(0, (batch, views))
    return hd(list(features.unbind(0)))


def projector_features(adapter, kind: str, args: dict):
    """The host's features after its projector (its own get_*_features), or the HD front-end's."""
    if adapter.settings.hd_grid is not None:
        return _hd_views(adapter, args, project=True), None
    return host_features(adapter, kind, args)


def tower_features(adapter, kind: str, args: dict):
    """The selected vision-tower states before the projector, per image (LLaVA-NeXT: all its patches)."""
    if adapter.settings.hd_grid is not None:
        return _hd_views(adapter, args, project=False), None
    pixel_values, image_sizes = args["pixel_values"], args.get("image_sizes")
    counts = [1] * pixel_values.shape[0]
    if adapter.settings.model_type == "llava_next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        if image_sizes is None:
            raise ValueError("image_sizes: required by a LLaVA-NeXT host (the image processor returns it)")
        config = adapter.model.config
        counts = [image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                            patch_size=config.vision_config.image_size) for size in image_sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:count] for pv, count in zip(pixel_values, counts)])
    features = _tower(adapter, pixel_values, *_layer_and_strategy(adapter, args))
    return [f.flatten(0, 1) for f in features.split(counts)], None


def tower_width(config, settings=None) -> int:
    """Width of the selected vision-tower features (times the number of feature layers)."""
    layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
    return config.vision_config.hidden_size * layers


def check(model, settings) -> None:
    """OneVision offers no tower source; the HD front-end is for plain LLaVA."""
    if settings.model_type == "llava_onevision" and settings.vision_source == "tower":
        raise ValueError(
            "vision_source: 'tower' is not offered for llava_onevision hosts (their images are packed and "
            "their video frames pooled after the projector); use 'projector'"
        )
    if settings.hd_grid is not None and settings.model_type != "llava":
        raise ValueError(
            f"hd: the HD front-end is for plain LLaVA hosts; {settings.model_type!r} brings its own "
            "any-resolution views"
        )


def processor_inputs(host_processor, kinds: list[list[str]], questions, data: dict) -> dict:
    """LLaVA-OneVision tiles an image only when it is its sample's only one: ``batch_num_images`` per sample."""
    if "batch_num_images" not in data:
        return {}
    return {"batch_num_images": torch.tensor([k.count("image") for k in kinds])}


LLAVA = register_family(HostFamily(
    name="llava",
    model_types=("llava", "llava_next", "llava_onevision"),
    sources=(VisionSource("projector", text_width, projector_features,
                          "after the multimodal projector (the host's get_image_features / get_video_features)"),
             VisionSource("tower", tower_width, tower_features,
                          "the selected vision-tower layers, before the projector (not OneVision)")),
    vision_tower=("model.vision_tower",),
    projector=("model.multi_modal_projector", "model.image_newline"),
    video_token=("video_token_id", "video_token_index"),
    stacked=("video",),
    hd=True,
    check=check,
    processor_inputs=processor_inputs,
    notes="video on LLaVA-OneVision only; the HD front-end on plain LLaVA only",
))
"""LLaVA, LLaVA-NeXT and LLaVA-OneVision (images; OneVision also video)."""

"""LLaVA / LLaVA-NeXT / LLaVA-OneVision hosts: N fused tokens stand where the host's vision tokens stood.

Data flow of a patched call (transformers 5 ``LlavaForConditionalGeneration`` /
``LlavaNextForConditionalGeneration`` / ``LlavaOnevisionForConditionalGeneration``; ``model.model``
holds ``vision_tower``, ``multi_modal_projector``, ``language_model``):

    pixel_values ─ host vision features ─> (V, d) per image ─ QuestionFusion(questions) ─>
    m + (G−1)·n fused tokens per image ─ mm_encoder_outputs ─> the host's own forward, which
    fills the ``<image>`` placeholders with them (``masked_scatter``)

LLaVA-OneVision also takes videos (``pixel_values_videos``, (videos, frames, C, H, W)): a video's
vision tokens are the host's own ``get_video_features`` output — every frame after the projector and
the host's 2×2 pooling, plus its trailing ``image_newline`` — and its fused tokens fill the
``<video>`` placeholders. Images and videos may be mixed in one prompt; images are read with the
host's any-resolution packing (``batch_num_images`` says which samples bring several images: the
host does not tile those).

The host features are its own: ``vision_feature_layer`` and ``vision_feature_select_strategy``
select the tower's hidden states exactly as the host does; ``vision_source="projector"`` (default)
also applies the host's multimodal projector (and, for LLaVA-NeXT, its any-resolution packing with
``image_newline``), ``"tower"`` stops before it. The fused tokens enter through ``mm_encoder_outputs``,
the seam the host's ``forward`` and ``generate`` offer for precomputed image embeddings, so the
host's code runs unchanged after that. With ``hd`` the images come as HD views
(:func:`qfusion.vision.hd_views`, built by :class:`qfusion.QFusionProcessor`): every view goes through
the tower on its own and :class:`qfusion.vision.HDFrontEnd` merges them (plain LLaVA only).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qfusion.adapters.patching import QFusionArguments
from qfusion.adapters.seam import VISUAL_INPUTS, SeamAdapter
from qfusion.inputs import in_prompt_order, visual_blocks, visual_kinds


class LlavaAdapter(SeamAdapter):
    """Adapter for ``llava``, ``llava_next`` and ``llava_onevision`` hosts (see the module docstring)."""

    family = "llava"
    model_types = ("llava", "llava_next", "llava_onevision")
    modes = ("replace",)
    vision_sources = ("projector", "tower")
    supports_hd = True
    supports_multi_image = True
    llm_name = "model.language_model"

    def check_host(self) -> None:
        base = getattr(self.model, "model", None)
        for part in ("vision_tower", "multi_modal_projector", "language_model"):
            if not hasattr(base, part):
                raise TypeError(
                    f"model: expected a transformers 5 {self.settings.model_type} model with model.model.{part}, "
                    f"got {type(self.model).__name__}"
                )
        if self.is_onevision and self.settings.vision_source == "tower":
            raise ValueError(
                "vision_source: 'tower' is not offered for llava_onevision hosts (their images are packed and "
                "their video frames pooled after the projector); use 'projector'"
            )
        if self.settings.hd_grid is not None and self.settings.model_type != "llava":
            raise ValueError(
                f"hd: the HD front-end is for plain LLaVA hosts; {self.settings.model_type!r} brings its own "
                "any-resolution views"
            )

    # ------------------------------------------------------------------ host facts

    @property
    def is_next(self) -> bool:
        """Any-resolution images packed with ``image_newline`` (LLaVA-NeXT, LLaVA-OneVision)."""
        return self.settings.model_type in ("llava_next", "llava_onevision")

    @property
    def is_onevision(self) -> bool:
        return self.settings.model_type == "llava_onevision"

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        if self.is_onevision:
            return self.image_token_id, int(self.model.config.video_token_id)
        return (self.image_token_id,)

    @property
    def tower_dim(self) -> int:
        """Width of the selected vision-tower features (times the number of feature layers)."""
        config = self.model.config
        layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        return config.vision_config.hidden_size * layers

    @property
    def feature_dim(self) -> int:
        if self.settings.vision_source == "projector":
            return self.model.config.text_config.hidden_size
        return self.tower_dim

    @property
    def fusion_output_dim(self) -> int:
        return self.model.config.text_config.hidden_size

    def module_groups(self) -> dict[str, list[str]]:
        projector = ["model.multi_modal_projector"] + (["model.image_newline"] if self.is_next else [])
        return {"vision_tower": ["model.vision_tower"], "projector": projector,
                "llm": ["model.language_model", "lm_head"]}

    # ------------------------------------------------------------------ vision features

    def _tower(self, pixels: Tensor, layer, strategy: str) -> Tensor:
        """(N, T, tower_dim): the tower's hidden states at ``layer``, selected as the host does."""
        hidden = self.model.model.vision_tower(pixels, output_hidden_states=True, return_dict=True).hidden_states
        pool = [hidden[layer]] if isinstance(layer, int) else [hidden[i] for i in layer]
        if strategy == "default":  # the host drops the class token
            pool = [h[:, 1:] for h in pool]
        return torch.cat(pool, dim=-1)

    def _next_patches(self, pixel_values: Tensor, image_sizes) -> tuple[Tensor, list[int]]:
        """LLaVA-NeXT any-resolution patches of all images, stacked, and how many belong to each."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        if image_sizes is None:
            raise ValueError("image_sizes: required by a LLaVA-NeXT host (the image processor returns it)")
        config = self.model.config
        counts = [image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                            patch_size=config.vision_config.image_size) for size in image_sizes]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([pv[:count] for pv, count in zip(pixel_values, counts)])
        return pixel_values, counts

    def encode(self, pixel_values: Tensor, image_sizes=None, layer=None, strategy=None,
               batch_num_images=None) -> list[Tensor]:
        """The host's vision features per image, (V_b, vision_dim), as the fusion reads them."""
        config = self.model.config
        layer = config.vision_feature_layer if layer is None else layer
        strategy = config.vision_feature_select_strategy if strategy is None else strategy
        if self.settings.hd_grid is not None:
            return self._encode_hd(pixel_values, layer, strategy)
        if self.settings.vision_source == "projector":
            kwargs = {"image_sizes": image_sizes} if self.is_next else {}
            if self.is_onevision:
                kwargs["batch_num_images"] = batch_num_images
            features = self.model.model.get_image_features(
                pixel_values=pixel_values, vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                return_dict=True, **kwargs,
            ).pooler_output
            return list(features)
        if self.is_next:
            pixels, counts = self._next_patches(pixel_values, image_sizes)
        else:
            pixels, counts = pixel_values, [1] * pixel_values.shape[0]
        return [f.flatten(0, 1) for f in self._tower(pixels, layer, strategy).split(counts)]

    def encode_videos(self, pixel_values_videos: Tensor, layer=None, strategy=None) -> list[Tensor]:
        """LLaVA-OneVision: per video, (frames · pooled tokens + 1, vision_dim), the host's own video features."""
        config = self.model.config
        layer = config.vision_feature_layer if layer is None else layer
        strategy = config.vision_feature_select_strategy if strategy is None else strategy
        features = self.model.model.get_video_features(
            pixel_values_videos, vision_feature_layer=layer, vision_feature_select_strategy=strategy, return_dict=True,
        ).pooler_output
        return list(features)

    def _encode_hd(self, pixel_values: Tensor, layer, strategy: str) -> list[Tensor]:
        hd = self.hd
        if pixel_values.dim() != 5 or pixel_values.shape[1] != hd.num_views:
            raise ValueError(
                f"pixel_values: expected (batch, {hd.num_views}, C, H, W) HD views (1 global + "
                f"{hd.num_views - 1} local, grid {hd.grid}) as qfusion.QFusionProcessor builds them, "
                f"got shape {tuple(pixel_values.shape)}"
            )
        batch, views = pixel_values.shape[:2]
        features = self._tower(pixel_values.flatten(0, 1), layer, strategy)  # (batch·views, T, tower_dim)
        if self.settings.vision_source == "projector":
            features = self.model.model.multi_modal_projector(features)
        features = features.to(device=hd.device, dtype=hd.dtype).unflatten(0, (batch, views))
        return hd(list(features.unbind(0)))

    # ------------------------------------------------------------------ the patched calls

    def with_fused_tokens(self, args: dict, qfusion: QFusionArguments) -> dict:
        """The host arguments with the fused tokens as ``mm_encoder_outputs`` instead of the pixels."""
        pixel_values, videos = args.get("pixel_values"), args.get("pixel_values_videos")
        input_ids = args.get("input_ids", args.get("inputs"))
        budget = self.call_budget(qfusion)
        questions, image_counts = self.questions(qfusion, input_ids, budget)
        blocks = [visual_blocks(input_ids[b], self.placeholder_ids, len(sample), budget, 0,
                                None if image_counts is None else image_counts[b])
                  for b, sample in enumerate(questions)]
        kinds = [token for sample in blocks for token in visual_kinds(sample)]
        layer, strategy = args.get("vision_feature_layer"), args.get("vision_feature_select_strategy")

        def encode():
            images = [] if pixel_values is None else self.encode(pixel_values, args.get("image_sizes"), layer, strategy,
                                                                 args.get("batch_num_images"))
            clips = [] if videos is None else self.encode_videos(videos, layer, strategy)
            features = {self.image_token_id: images}
            if self.is_onevision:
                features[self.placeholder_ids[1]] = clips
            names = dict(zip(self.placeholder_ids, VISUAL_INPUTS))
            return in_prompt_order(kinds, features, names), None

        key = pixel_values if videos is None else videos if pixel_values is None else \
            torch.cat([pixel_values.flatten(), videos.flatten()])
        count = (0 if pixel_values is None else pixel_values.shape[0]) + (0 if videos is None else videos.shape[0])
        tokens, _ = self.fused_tokens(encode, key, questions, qfusion.cache, budget, image_counts=image_counts,
                                      num_images=None if key is None else count)
        outputs = self.seam_outputs(blocks, tokens, dict(zip(self.placeholder_ids, ("image", "video"))))
        if "video" in outputs:  # the host flattens (videos, tokens): one row of all the video runs
            video = outputs["video"]
            video["pooler_output"] = torch.cat(video.pooler_output)[None]
        args = {k: v for k, v in args.items() if k not in VISUAL_INPUTS}
        args["mm_encoder_outputs"] = outputs
        return args

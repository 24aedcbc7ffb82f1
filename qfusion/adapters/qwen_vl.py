"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL hosts: fused tokens fill the image and video placeholder runs.

Data flow of a patched call (transformers 5 ``Qwen2_5_VLForConditionalGeneration`` and kin;
``model.model`` holds ``visual`` (the vision tower with its patch merger) and ``language_model``):

    pixel_values / pixel_values_videos ─ host ``get_image_features`` / ``get_video_features`` ─>
    (V, d) per image or video (after the patch merger; a video's frames after the host's temporal
    patching, all of them) ─ QuestionFusion(questions) ─> k fused tokens per (visual input, question)
    ─ ``mm_encoder_outputs`` ─> the host's own forward, which scatters them into the
    ``<|image_pad|>`` / ``<|video_pad|>`` placeholders

``vision_source="tower"`` reads the tower's last states before the patch merger instead (s² per
merged token, put back in the host's patch order where Qwen2.5-VL runs its blocks in window order).

Every placeholder run stands between ``<|vision_start|>`` and ``<|vision_end|>``, one run per visual
input per question (:mod:`qfusion.inputs`). Videos and images may be mixed in one prompt.

Positions (M-RoPE): the host computes 3-D positions from ``image_grid_thw`` / ``video_grid_thw``
with its own ``get_rope_index``. The adapter keeps that function and hands it, instead of the
visual inputs' real grids, one *virtual grid* per placeholder run: k fused tokens are a grid of
1 × k merged patches (``(1, s, s·k)`` in patch units, s the spatial merge size) at temporal index
0. So a run of k fused tokens gets temporal and height positions p (the position where the run
starts) and width positions p … p+k−1, and the text after it continues at p+k, exactly as text
would. ``generate`` computes the same positions once and extends them; the KV cache and every
follow-up question (its own run) follow the same rule.

Qwen3-VL's multi-level (deepstack) features are added to the hidden states of the first LLM layers
at the visual positions; they have one row per original vision token, not per fused token. The
rule here: **off** for fused tokens — the LLM gets no deepstack features when the plugin feeds it
(``deepstack_features`` is an empty list, so the host adds nothing and nothing is broadcast).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qfusion.adapters.seam import SeamAdapter
from qfusion.adapters.patching import QFusionArguments
from qfusion.inputs import in_prompt_order, placeholder_runs, visual_blocks, visual_kinds


class QwenVLAdapter(SeamAdapter):
    """Adapter for ``qwen2_vl``, ``qwen2_5_vl`` and ``qwen3_vl`` hosts (see the module docstring)."""

    family = "qwen_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    modes = ("replace",)
    vision_sources = ("merger", "tower")
    supports_multi_image = True
    llm_name = "model.language_model"

    def check_host(self) -> None:
        base = getattr(self.model, "model", None)
        for part in ("visual", "language_model", "get_rope_index"):
            if not hasattr(base, part):
                raise TypeError(
                    f"model: expected a transformers 5 {self.settings.model_type} model with model.model.{part}, "
                    f"got {type(self.model).__name__}"
                )

    # ------------------------------------------------------------------ host facts

    @property
    def feature_dim(self) -> int:
        if self.settings.vision_source == "tower":
            vision = self.model.config.vision_config
            return getattr(vision, "embed_dim", None) or vision.hidden_size  # Qwen2-VL names it embed_dim
        return self.model.config.text_config.hidden_size

    @property
    def fusion_output_dim(self) -> int:
        return self.model.config.text_config.hidden_size

    @property
    def video_token_id(self) -> int:
        return int(self.model.config.video_token_id)

    @property
    def placeholder_ids(self) -> tuple[int, int]:
        return self.image_token_id, self.video_token_id

    @property
    def vision_markers(self) -> tuple[str, str]:
        """The tokens around every placeholder run (the host's M-RoPE takes each run as one grid)."""
        return "<|vision_start|>", "<|vision_end|>"

    @property
    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    @property
    def has_deepstack(self) -> bool:
        """Whether the host adds multi-level vision features into its first LLM layers (Qwen3-VL)."""
        return hasattr(self.model.model.visual, "deepstack_merger_list")

    def module_groups(self) -> dict[str, list[str]]:
        projector = ["model.visual.merger"]
        if self.has_deepstack:
            projector.append("model.visual.deepstack_merger_list")
        return {"vision_tower": ["model.visual"], "projector": projector, "llm": ["model.language_model", "lm_head"]}

    # ------------------------------------------------------------------ vision features

    def encode(self, pixel_values: Tensor | None, image_grid_thw: Tensor | None, pixel_values_videos: Tensor | None,
               video_grid_thw: Tensor | None, kinds: list[int]) -> list[Tensor]:
        """The host's merged vision features per visual input, (V_i, hidden), in prompt order.

        kinds: per visual input of the batch in prompt order, its placeholder id (image or video).
        """
        host = self.model.model
        if self.settings.vision_source == "tower":
            images = [] if pixel_values is None else self._tower(pixel_values, image_grid_thw)
            videos = [] if pixel_values_videos is None else self._tower(pixel_values_videos, video_grid_thw)
        else:
            images = [] if pixel_values is None else list(
                host.get_image_features(pixel_values, image_grid_thw, return_dict=True).pooler_output)
            videos = [] if pixel_values_videos is None else list(
                host.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True).pooler_output)
        return in_prompt_order(kinds, {self.image_token_id: images, self.video_token_id: videos},
                               {self.image_token_id: "pixel_values", self.video_token_id: "pixel_values_videos"})

    def _tower(self, pixels: Tensor, grid_thw: Tensor) -> list[Tensor]:
        """Per visual input, (t·h·w, tower_dim): the tower's last hidden states before the patch merger,
        in the host's patch order (consecutive groups of s² patches are what the merger joins)."""
        visual = self.model.model.visual
        hidden = visual(pixels.type(visual.dtype), grid_thw=grid_thw, return_dict=True).last_hidden_state
        if hasattr(visual, "window_size"):  # Qwen2.5-VL runs its blocks on merge groups in window order
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size,
                                                      visual.patch_size)
            groups = hidden.unflatten(0, (-1, self.merge_size**2))
            hidden = groups[torch.argsort(window_index)].flatten(0, 1)
        return list(hidden.split(grid_thw.prod(-1).tolist()))

    # ------------------------------------------------------------------ placeholder runs

    def runs(self, input_ids: Tensor, questions, image_counts, budget) -> list[list[tuple[int, int, int]]]:
        """Per sample, its placeholder runs in prompt order as (visual input, placeholder id, length): one
        run per visual input per question, each between ``<|vision_start|>`` and ``<|vision_end|>``
        (the host's M-RoPE takes every run of placeholders as one grid)."""
        out = []
        for b, sample in enumerate(questions):
            counts = None if image_counts is None else image_counts[b]
            blocks = visual_blocks(input_ids[b], self.placeholder_ids, len(sample), budget, 0, counts)
            found = placeholder_runs(input_ids[b], self.placeholder_ids)
            if found != [length for _, _, length in blocks]:
                raise ValueError(
                    f"input_ids: sample {b} has placeholder runs {found}, expected one run per image/video per "
                    f"question, {[length for _, _, length in blocks]}, each between <|vision_start|> and "
                    "<|vision_end|>; build the inputs with qfusion.QFusionProcessor"
                )
            out.append(blocks)
        return out

    def virtual_grids(self, runs: list[list[tuple[int, int, int]]], kind: int, device) -> Tensor | None:
        """(runs of ``kind``, 3) grids of 1 × k merged patches, one per placeholder run (the M-RoPE rule)."""
        s = self.merge_size
        grids = [[1, s, s * length] for sample in runs for _, token, length in sample if token == kind]
        return torch.tensor(grids, dtype=torch.long, device=device) if grids else None

    def token_types(self, input_ids: Tensor) -> Tensor:
        """``mm_token_type_ids`` of input_ids: 0 text, 1 image placeholder, 2 video placeholder."""
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == self.image_token_id] = 1
        types[input_ids == self.video_token_id] = 2
        return types

    # ------------------------------------------------------------------ the patched calls

    def with_fused_tokens(self, args: dict, qfusion: QFusionArguments) -> dict:
        """The host arguments with the fused tokens as ``mm_encoder_outputs`` and the virtual grids."""
        pixel_values, videos = args.get("pixel_values"), args.get("pixel_values_videos")
        input_ids = args.get("input_ids", args.get("inputs"))
        budget = self.call_budget(qfusion)
        questions, image_counts = self.questions(qfusion, input_ids, budget)
        runs = self.runs(input_ids, questions, image_counts, budget)
        kinds = [token for sample in runs for token in visual_kinds(sample)]
        image_grid, video_grid = args.get("image_grid_thw"), args.get("video_grid_thw")
        if pixel_values is not None and image_grid is None or videos is not None and video_grid is None:
            raise ValueError("image_grid_thw / video_grid_thw: required with pixel_values / pixel_values_videos "
                             "(the host's processor returns them)")

        def encode():
            return self.encode(pixel_values, image_grid, videos, video_grid, kinds), None

        given = [p for p in (pixel_values, videos) if p is not None]
        key = torch.cat(given) if given else None  # what the FusionCache compares
        grids = [g.flatten() for g in (image_grid, video_grid) if g is not None]
        context = torch.cat([torch.tensor([len(kinds)], device=grids[0].device)] + grids) if grids else None
        num_visuals = None if key is None else len(kinds)
        tokens, _ = self.fused_tokens(encode, key, questions, qfusion.cache, budget, context=context,
                                      image_counts=image_counts, num_images=num_visuals)
        outputs = self.seam_outputs(runs, tokens, {self.image_token_id: "image", self.video_token_id: "video"})
        if self.has_deepstack:
            for output in outputs.values():
                output["deepstack_features"] = []  # the deepstack rule: off for fused tokens
        args = {k: v for k, v in args.items() if k not in ("pixel_values", "pixel_values_videos", "second_per_grid_ts")}
        args["mm_encoder_outputs"] = outputs
        args["image_grid_thw"] = self.virtual_grids(runs, self.image_token_id, input_ids.device)
        args["video_grid_thw"] = self.virtual_grids(runs, self.video_token_id, input_ids.device)
        args["mm_token_type_ids"] = self.token_types(input_ids)
        return args

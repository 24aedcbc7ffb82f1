"""The Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE): its record
and its position rule.

Vision sources: ``merger`` (default) reads the host's ``get_image_features`` /
``get_video_features`` — the features after the patch merger, as its LLM receives them (a video:
all its frames after temporal patching) — and ``tower`` the tower's last states before the merger
(s² per merged token, in the host's patch order: Qwen2.5-VL's window order undone).

Every placeholder run stands between ``<|vision_start|>`` and ``<|vision_end|>``, one run per visual
input per question. Positions (M-RoPE): the host computes 3-D positions from ``image_grid_thw`` /
``video_grid_thw`` with its own rope index. The adapter keeps that function and hands it, instead
of the visual inputs' real grids, one *virtual grid* per placeholder run (:func:`fused_grid`): k
fused tokens are a grid of 1 × k merged patches at temporal index 0. So a run of k fused tokens
gets temporal and height positions p (the position where the run starts) and width positions
p … p+k−1, and the text after it continues at p+k, exactly as text would. ``generate`` computes the
same positions once and extends them; every follow-up question (its own run) follows the same rule.

Deepstack (Qwen3-VL, Qwen3-VL-MoE): the host adds multi-level vision features to the hidden states
of its first LLM layers at the visual positions, one row per original vision token. The rule here:
**off** for fused tokens — the LLM gets no deepstack features when the plugin feeds it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qfusion.adapters.adapter import host_features
from qfusion.adapters.family import VISUAL_INPUTS, HostFamily, VisionSource, register_family, text_width

GRIDS = {"image": "image_grid_thw", "video": "video_grid_thw"}
"""The host input holding each visual kind's (t, h, w) patch grids."""


def fused_grid(length: int, merge_size: int) -> tuple[int, int, int]:
    """The (t, h, w) patch grid the host's rope index is given for a run of ``length`` fused tokens:
    1 × ``length`` merged patches (``(1, s, s·length)`` in patch units, s the spatial merge size).

    The one definition of where fused tokens stand in M-RoPE; the vLLM integration uses it too.
    """
    return 1, merge_size, merge_size * length


def merge_size(config) -> int:
    return int(config.vision_config.spatial_merge_size)


def tower_width(config, settings=None) -> int:
    """Width of the tower's states before the merger (Qwen2-VL names it ``embed_dim``)."""
    vision = config.vision_config
    return getattr(vision, "embed_dim", None) or vision.hidden_size


def tower_features(adapter, kind: str, args: dict):
    """Per visual input, (t·h·w, tower_dim): the tower's last hidden states before the patch merger,
    in the host's patch order (consecutive groups of s² patches are what the merger joins)."""
    pixels, grid_thw = args[VISUAL_INPUTS[kind]], args.get(GRIDS[kind])
    if grid_thw is None:
        raise ValueError(f"{GRIDS[kind]}: required with {VISUAL_INPUTS[kind]} (the host's processor returns it)")
    visual = adapter.model.model.visual
    hidden = visual(pixels.type(visual.dtype), grid_thw=grid_thw, return_dict=True).last_hidden_state
    if hasattr(visual, "window_size"):  # Qwen2.5-VL runs its blocks on merge groups in window order
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size,
                                                  visual.patch_size)
        groups = hidden.unflatten(0, (-1, merge_size(adapter.model.config) ** 2))
        hidden = groups[torch.argsort(window_index)].flatten(0, 1)
    return list(hidden.split(grid_thw.prod(-1).tolist())), None


def merger_features(adapter, kind: str, args: dict):
    """The host's features after the patch merger (its own get_*_features)."""
    if args.get(GRIDS[kind]) is None:
        raise ValueError(f"{GRIDS[kind]}: required with {VISUAL_INPUTS[kind]} (the host's processor returns it)")
    return host_features(adapter, kind, args)


def virtual_grids(adapter, blocks: list[list[tuple[int, int, int]]], token: int, device) -> Tensor | None:
    """(runs of ``token``, 3): one :func:`fused_grid` per placeholder run of that kind, in prompt order."""
    s = merge_size(adapter.model.config)
    grids = [fused_grid(length, s) for sample in blocks for _, kind, length in sample if kind == token]
    return torch.tensor(grids, dtype=torch.long, device=device) if grids else None


def prepare(adapter, args: dict, blocks) -> dict:
    """The position inputs of the fused runs (virtual grids), and deepstack off."""
    device = args.get("input_ids", args.get("inputs")).device
    for kind, token in adapter.tokens.placeholders().items():
        args[GRIDS[kind]] = virtual_grids(adapter, blocks, token, device)
    if _has_deepstack(adapter):
        for output in args["mm_encoder_outputs"].values():
            output["deepstack_features"] = []  # the deepstack rule: off for fused tokens
    return args


def _has_deepstack(adapter) -> bool:
    """Whether the host adds multi-level vision features into its first LLM layers (Qwen3-VL)."""
    return hasattr(adapter.model.model.visual, "deepstack_merger_list")


QWEN_VL = register_family(HostFamily(
    name="qwen_vl",
    model_types=("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"),
    sources=(VisionSource("merger", text_width, merger_features,
                          "after the patch merger (the host's get_image_features / get_video_features)"),
             VisionSource("tower", tower_width, tower_features, "the tower's last states, before the patch merger")),
    vision_tower=("model.visual",),
    projector=("model.visual.merger", "model.visual.deepstack_merger_list"),
    image_token=("image_token_id",),
    video_token=("video_token_id",),
    markers=("vision_start_token_id", "vision_end_token_id"),
    token_types="mm_token_type_ids",
    drop_inputs=("image_grid_thw", "video_grid_thw", "second_per_grid_ts"),
    prepare=prepare,
    position_rule="M-RoPE: the host's rope index over a 1 × k virtual grid per fused run",
    notes="Qwen3-VL's deepstack features are off for fused tokens",
))
"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5 and Qwen3.5-MoE (images and video)."""

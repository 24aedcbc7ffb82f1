"""Training losses: contrastive (⟨eos⟩ vs answer), identity (orthogonal slots), generation (answer CE)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_LOGIT_SCALE = math.log(100.0)
"""logit_scale = log(1/τ) is clamped here (τ >= 0.01), as in CLIP."""


def _answer_groups(answer_ids, num: int, device) -> Tensor:
    """(K, K) boolean: True where two groups have identical answers (the diagonal always)."""
    if answer_ids is None:
        return torch.eye(num, dtype=torch.bool, device=device)
    if isinstance(answer_ids, Tensor) and answer_ids.dim() == 2:
        answer_ids = list(answer_ids)
    if len(answer_ids) != num:
        raise ValueError(f"answer_ids: expected one answer per group ({num}), got {len(answer_ids)}")
    keys = [tuple(a.tolist()) if isinstance(a, Tensor) else tuple(a) for a in answer_ids]
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    labels = torch.tensor([index[key] for key in keys], device=device)
    return labels[:, None] == labels[None, :]


def contrastive_loss(eos_embed: Tensor, answer_embed: Tensor, logit_scale: Tensor,
                     answer_ids: Sequence[Tensor] | Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE between question groups' ⟨eos⟩ embeddings and their answers' embeddings.

    eos_embed: (K, C) one row per question group (``FusionOutput.eos_embed``).
    answer_embed: (K, C) the answers encoded by a text encoder and projected to C.
    logit_scale: scalar log(1/τ), learned; clamped at log 100.
    answer_ids: optional K answers (token id sequences); groups with identical answers are positives
        for each other, not negatives: the target of a row spreads uniformly over its positives.

    Both inputs are L2-normalised here. Returns ½ (CE(e→a) + CE(a→e)), averaged over groups.
    """
    if eos_embed.dim() != 2 or answer_embed.shape != eos_embed.shape:
        raise ValueError(
            f"answer_embed: expected the shape of eos_embed {tuple(eos_embed.shape)} (K, C), "
            f"got {tuple(answer_embed.shape)}"
        )
    if eos_embed.shape[0] == 0:
        raise ValueError("eos_embed: expected at least one group, got none")
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * F.normalize(eos_embed, dim=-1) @ F.normalize(answer_embed, dim=-1).T  # (K, K)
    positives = _answer_groups(answer_ids, logits.shape[0], logits.device)
    target = positives.to(logits.dtype) / positives.sum(-1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T))


def identity_loss(slot_states, scope: str = "group") -> Tensor:
    """Push the fused tokens of a group towards orthogonality: ‖F Fᵀ − I‖².

    slot_states: per group, the (k, hidden) final slot states (``FusionOutput.slot_states``); the last
        row of each group is ⟨eos⟩.
    scope: "group" (default, SPEC): F = normalised non-⟨eos⟩ rows of one group; the loss is the mean
        over its k'² entries, averaged over groups with k' >= 2 (others contribute nothing; zero if
        none qualifies). "batch" (as the seed paper's code): Q = normalised rows of every slot of the
        batch, ⟨eos⟩ included; the loss is the mean of (Q Qᵀ − I)².
    """
    if scope not in ("group", "batch"):
        raise ValueError(f"scope: expected 'group' or 'batch', got {scope!r}")
    if isinstance(slot_states, Tensor):
        slot_states = [slot_states]
    if len(slot_states) == 0:
        raise ValueError("slot_states: expected at least one group, got none")
    if scope == "batch":
        q = F.normalize(torch.cat(list(slot_states)), dim=-1)
        eye = torch.eye(q.shape[0], dtype=q.dtype, device=q.device)
        return F.mse_loss(q @ q.T, eye)
    losses = []
    for states in slot_states:
        rows = F.normalize(states[:-1], dim=-1)
        if rows.shape[0] < 2:
            continue
        eye = torch.eye(rows.shape[0], dtype=rows.dtype, device=rows.device)
        losses.append(((rows @ rows.T - eye) ** 2).mean())
    if not losses:
        return slot_states[0].sum() * 0.0
    return torch.stack(losses).mean()


def generation_loss(logits: Tensor, labels: Tensor, num_items_in_batch: int | Tensor | None = None) -> Tensor:
    """Next-token cross-entropy over the answer tokens (labels != -100), labels shifted here.

    logits: (B, L, vocab) the LLM's outputs; labels: (B, L) with -100 on prompt, image and question
        positions (only answers and their closing eos are scored).
    num_items_in_batch: divide the summed loss by this count instead of this micro-batch's own number
        of scored tokens (gradient accumulation over micro-batches of unequal size).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels: expected shape {tuple(logits.shape[:2])} matching logits (B, L, vocab), "
            f"got {tuple(labels.shape)}"
        )
    # half-precision logits are scored in float32; float64 stays float64
    work = torch.promote_types(logits.dtype, torch.float32)
    shift_logits = logits[:, :-1].to(work).flatten(0, 1)
    shift_labels = labels[:, 1:].flatten().to(logits.device)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (shift_labels != -100).sum()
    if isinstance(count, Tensor):
        count = count.to(total.device)
    elif count <= 0:
        raise ValueError(f"num_items_in_batch: expected a positive count, got {count}")
    return total / torch.as_tensor(count, dtype=total.dtype, device=total.device).clamp(min=1)

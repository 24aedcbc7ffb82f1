"""The host-side input protocol of an attached model: placeholder runs and question tensors.

A sample with G questions about one image carries, in the host's ``input_ids``, one run of image
placeholders right before each question: ``prefix + m`` before the first (``prefix`` host tokens,
e.g. BLIP's Q-Former outputs in ``augment`` mode, then m fused tokens) and n before every later one.
The questions travel as ``qfusion_input_ids`` / ``qfusion_attention_mask`` of shape
(B, G_max, L_max), right-padded; an all-zero mask row is an empty question slot, and a sample's
questions fill its first slots. The budget (m, n) of a call is ``qfusion_budget``.

This module is the only owner of that protocol: :class:`qfusion.QFusionProcessor` builds inputs
with it and the adapters read them back with it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def check_budget(budget, codebook_size: int | None = None, name: str = "qfusion_budget") -> tuple[int, int]:
    """Validated (m, n): two integers with 1 <= n <= m (<= codebook_size when given)."""
    if (not isinstance(budget, (tuple, list)) or len(budget) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in budget)):
        raise ValueError(f"{name}: expected (m, n), two integers, got {budget!r}")
    m, n = budget
    if n < 1 or m < n:
        raise ValueError(f"{name}: expected 1 <= n <= m, got m={m}, n={n}")
    if codebook_size is not None and m > codebook_size:
        raise ValueError(f"{name}: expected m <= codebook_size={codebook_size}, got m={m}")
    return m, n


def placeholder_counts(num_questions: int, budget: tuple[int, int], prefix: int = 0) -> list[int]:
    """The placeholder runs of a sample with ``num_questions`` questions: [prefix + m, n, n, ...]."""
    m, n = budget
    return [prefix + m] + [n] * (num_questions - 1)


def placeholder_runs(ids: Tensor, token_id: int) -> list[int]:
    """Lengths of the runs of ``token_id`` in a 1-D id tensor, in order."""
    is_token = (ids == token_id).cpu().tolist()
    runs, length = [], 0
    for flag in is_token + [False]:
        if flag:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def check_placeholders(input_ids: Tensor, token_id: int, num_questions: Sequence[int], budget: tuple[int, int],
                       prefix: int = 0, name: str = "input_ids") -> None:
    """Raise unless every sample's placeholders form exactly the runs its number of questions needs."""
    m, n = budget
    for b, count in enumerate(num_questions):
        found = placeholder_runs(input_ids[b], token_id)
        want = placeholder_counts(count, budget, prefix)
        if found != want:
            extra = f"{prefix} host query tokens + " if prefix else ""
            raise ValueError(
                f"{name}: sample {b} has image placeholder runs {found} (total {sum(found)}), expected "
                f"{want} (total {sum(want)}): {extra}m={m} before its first question and n={n} before each "
                f"of its {count - 1} later question(s); build the inputs with qfusion.QFusionProcessor "
                "using the same budget"
            )


def encode_questions(ids: Sequence[Sequence[Sequence[int]]]) -> tuple[Tensor, Tensor]:
    """(B, G_max, L_max) ``qfusion_input_ids`` and ``qfusion_attention_mask`` from per-sample lists of
    question token ids (every sample at least one non-empty question)."""
    if not ids:
        raise ValueError("ids: expected at least one sample, got none")
    for b, sample in enumerate(ids):
        if not sample:
            raise ValueError(f"ids[{b}]: expected at least one question, got none")
        for g, question in enumerate(sample):
            if not question:
                raise ValueError(f"ids[{b}][{g}]: expected at least one token, got an empty question")
    groups = max(len(sample) for sample in ids)
    length = max(len(q) for sample in ids for q in sample)
    input_ids = torch.zeros(len(ids), groups, length, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, sample in enumerate(ids):
        for g, tokens in enumerate(sample):
            input_ids[b, g, : len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
            mask[b, g, : len(tokens)] = 1
    return input_ids, mask


def decode_questions(qfusion_input_ids, qfusion_attention_mask, batch_size: int) -> list[list[Tensor]]:
    """Per sample, the 1-D id tensors of its questions, from (B, G_max, L_max) padded inputs.

    An all-zero mask row is an empty question slot; a sample's questions fill its first slots.
    Without a mask every slot and every token counts.
    """
    if not isinstance(qfusion_input_ids, Tensor) or qfusion_input_ids.dim() != 3:
        shape = (tuple(qfusion_input_ids.shape) if isinstance(qfusion_input_ids, Tensor)
                 else type(qfusion_input_ids).__name__)
        raise ValueError(
            f"qfusion_input_ids: expected a (batch, max_questions, max_question_length) integer tensor, got {shape}"
        )
    if qfusion_input_ids.dtype.is_floating_point or qfusion_input_ids.dtype == torch.bool:
        raise TypeError(f"qfusion_input_ids: expected integer token ids, got dtype {qfusion_input_ids.dtype}")
    if qfusion_input_ids.shape[0] != batch_size:
        raise ValueError(
            f"qfusion_input_ids: expected one row per sample ({batch_size} in input_ids), "
            f"got {qfusion_input_ids.shape[0]}"
        )
    if qfusion_attention_mask is None:
        mask = torch.ones_like(qfusion_input_ids, dtype=torch.bool)
    else:
        if not isinstance(qfusion_attention_mask, Tensor) or qfusion_attention_mask.shape != qfusion_input_ids.shape:
            shape = (tuple(qfusion_attention_mask.shape) if isinstance(qfusion_attention_mask, Tensor)
                     else type(qfusion_attention_mask).__name__)
            raise ValueError(
                f"qfusion_attention_mask: expected shape {tuple(qfusion_input_ids.shape)} like "
                f"qfusion_input_ids, got {shape}"
            )
        if not bool(((qfusion_attention_mask == 0) | (qfusion_attention_mask == 1)).all()):
            raise ValueError("qfusion_attention_mask: expected only 0 and 1")
        mask = qfusion_attention_mask.bool()
    present = mask.any(-1).cpu()  # (B, G_max)
    questions = []
    for b in range(batch_size):
        count = int(present[b].sum())
        if count == 0:
            raise ValueError(f"qfusion_attention_mask: sample {b} has no question (every row of its mask is zero)")
        if not bool(present[b, :count].all()):
            raise ValueError(
                f"qfusion_attention_mask: sample {b} has an empty question slot before a filled one; "
                "a sample's questions must fill its first slots"
            )
        questions.append([qfusion_input_ids[b, g][mask[b, g]] for g in range(count)])
    return questions


def check_left_padded(attention_mask: Tensor | None, name: str = "attention_mask") -> None:
    """Raise for right-padded generation inputs (new tokens would follow the padding)."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] == 0:
        return
    last = attention_mask[:, -1]
    if not bool((last != 0).all()):
        rows = (last == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"{name}: samples {rows} are right-padded; batched generation needs left padding (new tokens "
            "would follow the padding). Build the inputs with qfusion.QFusionProcessor (it pads on the left "
            "by default) or tokenize with padding_side='left'"
        )

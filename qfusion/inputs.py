"""The host-side input protocol of an attached model: placeholder runs and question tensors.

A sample with G questions about one image carries, in the host's ``input_ids``, one run of image
placeholders right before each question: ``prefix + m`` before the first (``prefix`` host tokens,
e.g. BLIP's Q-Former outputs in ``augment`` mode, then m fused tokens) and n before every later one.
The questions travel as ``qfusion_input_ids`` / ``qfusion_attention_mask`` of shape
(B, G_max, L_max), right-padded; an all-zero mask row is an empty question slot, and a sample's
questions fill its first slots. The budget (m, n) of a call is ``qfusion_budget``.

Several images (or videos) in one prompt: ``qfusion_image_counts`` (B, G_max) says how many new
visual inputs each question brings (the images of its user turn; 0 for a follow-up; the first
question at least 1; default: one image for the first question). The rule: a question is about the
visual inputs of the latest turn that brought any, so each image is fused with the question of its
own turn and every follow-up until the next images arrive. Before each question stand, image by
image, that image's placeholders — ``prefix + m`` where the question is the image's first, n after —
in one run. The visual inputs of a batch are in prompt order, sample after sample.

This module is the only owner of that protocol: :class:`qfusion.QFusionProcessor` builds inputs
with it and the adapters read them back with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from qfusion.budget import Budget


def question_images(image_counts: Sequence[int]) -> list[list[int]]:
    """Per question of a sample, the indices of the visual inputs it is about (see the module docstring).

    image_counts: per question, the number of new visual inputs it brings (first >= 1).
    """
    if not image_counts or image_counts[0] < 1:
        raise ValueError(f"qfusion_image_counts: the first question must bring at least one image, got {list(image_counts)}")
    active: list[int] = []
    seen, about = 0, []
    for count in image_counts:
        if count < 0:
            raise ValueError(f"qfusion_image_counts: expected counts >= 0, got {list(image_counts)}")
        if count:
            active = list(range(seen, seen + count))
            seen += count
        about.append(active)
    return about


def placeholder_blocks(num_questions: int, budget: Budget, prefix: int = 0,
                       image_counts: Sequence[int] | None = None) -> list[list[int]]:
    """Per question of a sample, the placeholders of each of its visual inputs, in order
    (:meth:`qfusion.Budget.placeholder_blocks` over :func:`question_images`)."""
    counts = [1] + [0] * (num_questions - 1) if image_counts is None else list(image_counts)
    if len(counts) != num_questions:
        raise ValueError(f"qfusion_image_counts: expected {num_questions} entries (one per question), got {counts}")
    return budget.placeholder_blocks(question_images(counts), prefix)


def placeholder_counts(num_questions: int, budget: Budget, prefix: int = 0,
                       image_counts: Sequence[int] | None = None) -> list[int]:
    """The placeholders before each question of a sample: [prefix + m, n, n, ...] for one image; with
    ``image_counts``, per question the sum over its visual inputs (see :func:`placeholder_blocks`)."""
    return [sum(block) for block in placeholder_blocks(num_questions, budget, prefix, image_counts)]


def placeholder_runs(ids: Tensor, token_id) -> list[int]:
    """Lengths of the runs of ``token_id`` (an id, or a collection of ids) in a 1-D id tensor, in order."""
    targets = torch.as_tensor(list(token_id) if isinstance(token_id, (list, tuple, set)) else [token_id],
                              device=ids.device)
    is_token = torch.isin(ids, targets).cpu().tolist()
    runs, length = [], 0
    for flag in is_token + [False]:
        if flag:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def visual_blocks(ids: Tensor, token_ids, num_questions: int, budget: Budget, prefix: int = 0,
                  image_counts: Sequence[int] | None = None) -> list[tuple[int, int, int]]:
    """Per placeholder block of one sample in prompt order: (its visual input, the placeholder id it is
    made of, its length) — for hosts with several kinds of placeholder (image and video).

    ids: (L,) the sample's input ids, whose placeholders already fit (:func:`check_placeholders`).
    """
    counts = [1] + [0] * (num_questions - 1) if image_counts is None else list(image_counts)
    targets = torch.as_tensor(list(token_ids), device=ids.device)
    found = ids[torch.isin(ids, targets)].tolist()
    blocks, start = [], 0
    for visuals, lengths in zip(question_images(counts), placeholder_blocks(num_questions, budget, prefix, counts)):
        for visual, length in zip(visuals, lengths):
            kinds = set(found[start: start + length])
            if len(kinds) != 1:
                raise ValueError(
                    f"input_ids: the {length} placeholders of visual input {visual} mix the ids {sorted(kinds)}; "
                    "each image or video has placeholders of its own kind"
                )
            blocks.append((visual, kinds.pop(), length))
            start += length
    return blocks


def visual_kinds(blocks: list[tuple[int, int, int]]) -> list[int]:
    """Per visual input of a sample, its placeholder id, from :func:`visual_blocks`; an input whose
    blocks disagree is an error."""
    kinds: dict[int, int] = {}
    for visual, token, _ in blocks:
        if kinds.setdefault(visual, token) != token:
            raise ValueError(
                f"input_ids: visual input {visual} has placeholders of two kinds ({kinds[visual]}, {token})"
            )
    return [kinds[v] for v in range(len(kinds))]


def in_prompt_order(kinds: Sequence[int], features: dict[int, list], names: dict[int, str]) -> list:
    """The features of every visual input of a batch in prompt order, from each kind's features in
    that kind's order (hosts encode images and videos apart).

    kinds: per visual input in prompt order, its placeholder id (:func:`visual_kinds`).
    features: placeholder id -> that kind's features; names: placeholder id -> the input's name (errors).
    """
    for kind, given in features.items():
        wanted = sum(k == kind for k in kinds)
        if len(given) != wanted:
            raise ValueError(
                f"{names[kind]}: expected {wanted} (one per placeholder block of its kind in the prompts, or as "
                f"qfusion_image_counts says), got {len(given)}"
            )
    taken = {kind: iter(given) for kind, given in features.items()}
    return [next(taken[kind]) for kind in kinds]


def check_placeholders(input_ids: Tensor, token_id: int, num_questions: Sequence[int], budget: Budget,
                       prefix: int = 0, name: str = "input_ids", image_counts=None) -> None:
    """Raise unless every sample's placeholders form exactly the runs its questions (and images) need.

    image_counts: per sample, per question, the new images it brings (None: one image per sample).
    """
    m, n = budget
    for b, count in enumerate(num_questions):
        found = placeholder_runs(input_ids[b], token_id)
        blocks = placeholder_blocks(count, budget, prefix, None if image_counts is None else image_counts[b])
        want = [sum(block) for block in blocks]
        if not _runs_fit(found, blocks):
            extra = f"{prefix} host query tokens + " if prefix else ""
            raise ValueError(
                f"{name}: sample {b} has image placeholder runs {found} (total {sum(found)}), expected "
                f"{want} (total {sum(want)}): {extra}m={m} before its first question and n={n} before each "
                f"of its {count - 1} later question(s); build the inputs with qfusion.QFusionProcessor "
                "using the same budget"
            )


def _runs_fit(found: list[int], blocks: list[list[int]]) -> bool:
    """Whether the found runs are the blocks, adjacent blocks of one question possibly merged (hosts
    that put nothing between two images' placeholders) but never across questions."""
    runs = iter(found)
    for block in blocks:
        pending = list(block)
        while pending:
            run = next(runs, None)
            if run is None:
                return False
            total = 0
            while pending and total < run:
                total += pending.pop(0)
            if total != run:
                return False
    return next(runs, None) is None


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


def encode_image_counts(counts: Sequence[Sequence[int]], max_questions: int) -> Tensor:
    """(B, G_max) ``qfusion_image_counts`` from per-sample lists (one entry per question)."""
    out = torch.zeros(len(counts), max_questions, dtype=torch.long)
    for b, sample in enumerate(counts):
        question_images(sample)  # validates
        out[b, : len(sample)] = torch.as_tensor(list(sample), dtype=torch.long)
    return out


def decode_image_counts(qfusion_image_counts, questions: list[list[Tensor]]) -> list[list[int]] | None:
    """Per sample, per question, the new visual inputs it brings; None when not given (one image each)."""
    if qfusion_image_counts is None:
        return None
    if not isinstance(qfusion_image_counts, Tensor) or qfusion_image_counts.dim() != 2 \
            or qfusion_image_counts.shape[0] != len(questions) or qfusion_image_counts.dtype.is_floating_point:
        shape = (tuple(qfusion_image_counts.shape) if isinstance(qfusion_image_counts, Tensor)
                 else type(qfusion_image_counts).__name__)
        raise ValueError(f"qfusion_image_counts: expected a ({len(questions)}, max_questions) integer tensor, got {shape}")
    rows = qfusion_image_counts.tolist()
    counts = []
    for b, (row, sample) in enumerate(zip(rows, questions)):
        if any(row[len(sample):]):
            raise ValueError(f"qfusion_image_counts: sample {b} counts images at empty question slots: {row}")
        question_images(row[: len(sample)])
        counts.append(row[: len(sample)])
    return counts


@dataclass(frozen=True)
class VisualPlan:
    """How the questions of a batch map onto its visual inputs, for the fusion and back.

    questions: per visual input of the batch (prompt order, sample after sample), the questions about it.
    owners: per visual input, (its sample, the indices of those questions in the sample).
    about: per sample, per question, the sample-local indices of its visual inputs.
    """

    questions: list[list]
    owners: list[tuple[int, list[int]]]
    about: list[list[list[int]]]

    @classmethod
    def of(cls, questions: list[list], image_counts: list[list[int]] | None) -> "VisualPlan":
        about = [question_images(c) if c is not None else [[0]] * len(q)
                 for q, c in zip(questions, image_counts or [None] * len(questions))]
        owners = []
        for b, sample in enumerate(about):
            for image in range(max(i for images in sample for i in images) + 1):
                owners.append((b, [g for g, images in enumerate(sample) if image in images]))
        return cls([[questions[b][g] for g in ids] for b, ids in owners], owners, about)

    @property
    def num_visuals(self) -> int:
        return len(self.owners)

    def in_placeholder_order(self, per_visual: list[list[Tensor]]) -> list[list[Tensor]]:
        """Per sample, per question, its fused tokens: those of its visual inputs, one after another
        (the order of the placeholders before it), from per visual input, per question tokens."""
        tokens, first = [], 0
        for b, sample in enumerate(self.about):
            tokens.append([torch.cat([per_visual[first + i][self.owners[first + i][1].index(g)] for i in images])
                           for g, images in enumerate(sample)])
            first += sum(1 for owner, _ in self.owners if owner == b)
        return tokens


def decode_call(input_ids, qfusion_input_ids, qfusion_attention_mask, qfusion_image_counts, *, token_id,
                budget: Budget, prefix: int = 0, multi_image: bool = True, host: str = "this"):
    """(per sample its questions, per sample per question the new images it brings or None) of one
    call with visual inputs, after checking that the placeholders in ``input_ids`` fit them."""
    if qfusion_input_ids is None:
        raise ValueError(
            "qfusion_input_ids: required with images on a model with a qfusion plugin attached (the "
            "questions, (batch, max_questions, max_question_length)); build them with "
            "qfusion.QFusionProcessor, or qfusion.detach(model) to use the host alone"
        )
    if input_ids is None:
        raise ValueError(
            "input_ids: required with qfusion_input_ids (the image placeholders are found in them; "
            "inputs_embeds alone are not supported)"
        )
    questions = decode_questions(qfusion_input_ids, qfusion_attention_mask, input_ids.shape[0])
    image_counts = decode_image_counts(qfusion_image_counts, questions)
    if image_counts is not None and not multi_image and any(sum(c) > 1 for c in image_counts):
        raise ValueError(f"qfusion_image_counts: a {host!r} host takes one image per prompt")
    check_placeholders(input_ids, token_id, [len(q) for q in questions], budget, prefix, image_counts=image_counts)
    return questions, image_counts

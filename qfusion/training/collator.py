"""Collator: a micro-batch of samples -> the inputs of the stage's loss.

A micro-batch may mix records with visual inputs and text-only ones: the first go through
:class:`qfusion.QFusionProcessor` (placeholders for the budget of the micro-batch, questions,
answer-only labels), the others through its ``text_inputs``. The budget of a micro-batch is drawn
from a random generator seeded by the run's seed and the indices of its samples, so the draw does
not depend on which process, worker or resumed run builds it.
"""

from __future__ import annotations

import random
from typing import Sequence

from qfusion.budget import Budget
from qfusion.processor import QFusionProcessor
from qfusion.training.data import Sample


TEXT_ONLY = ("keep", "leave out", "refuse")
"""What a Collator does with a sample without image or video."""


def draw_budget(budgets: Sequence[Budget], samples: Sequence[Sample], seed: int) -> Budget:
    """The budget of one micro-batch: one of ``budgets``, drawn by (seed, the samples' indices)."""
    if len(budgets) == 1:
        return budgets[0]
    return random.Random(f"{seed}:{[s.index for s in samples]}").choice(list(budgets))


class Collator:
    """Builds the inputs of one micro-batch for the Trainer.

    processor: builds the host inputs (its host attached). budgets: the (m, n) a micro-batch may get
        (several: elastic training, one drawn per micro-batch). seed: the run's seed.
    answer_tokenizer: for the align stage, tokenizes each question's answer for the answer encoder
        (``answer_special_tokens``: whether it adds its special tokens; CLIP's <eos> is read).
    text_only: what becomes of a sample without image or video: "keep" it (the host runs it alone),
        "leave out" (the align stage: nothing to align) or "refuse" (a host that cannot run one: an
        error naming the record).

    A call returns ``{"budget", "visual", "text", "answers"}``: ``visual`` the processor's outputs
    with ``labels`` (None without visual samples), ``text`` the text-only samples' (None without),
    ``answers`` the tokenized answers of the visual samples' questions in batch order (align only).
    """

    def __init__(self, processor: QFusionProcessor, budgets: Sequence[Budget], seed: int, *, answer_tokenizer=None,
                 answer_special_tokens: bool = True, text_only: str = "keep"):
        if not budgets:
            raise ValueError("budgets: expected at least one (m, n)")
        if text_only not in TEXT_ONLY:
            raise ValueError(f"text_only: expected one of {TEXT_ONLY}, got {text_only!r}")
        self.processor = processor
        self.budgets = [Budget.of(b, name="budgets") for b in budgets]
        self.seed = seed
        self.answer_tokenizer = answer_tokenizer
        self.answer_special_tokens = answer_special_tokens
        self.text_only = text_only

    def __call__(self, samples: list[Sample]) -> dict:
        budget = draw_budget(self.budgets, samples, self.seed)
        visual = [s for s in samples if s.is_visual]
        text = [] if self.text_only == "leave out" else [s for s in samples if not s.is_visual]
        if text and self.text_only == "refuse":
            raise ValueError(f"data.train: records {sorted(s.index for s in text)} have no image or video, and the host "
                             "of this run cannot run a conversation without one (its forward requires pixel_values); "
                             "leave such records out of its data")
        batch = {"budget": tuple(budget), "visual": None, "text": None, "answers": None}
        if visual:
            images = [s.images for s in visual] if any(s.images for s in visual) else None
            videos = [s.videos for s in visual] if any(s.videos for s in visual) else None
            batch["visual"] = dict(self.processor(
                images=images, videos=videos, conversations=[s.conversation for s in visual], budget=budget,
                return_labels=True, add_generation_prompt=False, padding_side="right"))
        if text:
            batch["text"] = dict(self.processor.text_inputs([s.conversation for s in text], return_labels=True,
                                                            add_generation_prompt=False, padding_side="right"))
        if self.answer_tokenizer is not None and visual:
            answers = [answer for s in visual for answer in s.answers]
            tokens = self.answer_tokenizer(answers, padding=True, padding_side="right", return_tensors="pt",
                                           add_special_tokens=self.answer_special_tokens)
            limit = getattr(self.answer_tokenizer, "model_max_length", None)
            if limit is not None and tokens["input_ids"].shape[1] > limit:
                longest = max(visual, key=lambda s: max(len(a) for a in s.answers))
                raise ValueError(
                    f"align.text_encoder: an answer of record {longest.index} has {tokens['input_ids'].shape[1]} "
                    f"tokens, more than the answer encoder's {limit}; shorten the answers or pick another encoder")
            batch["answers"] = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        return batch


def scored_tokens(batch: dict):
    """The answer tokens the generation loss scores in a collated micro-batch (labels != -100, after
    the one-position shift), as a 0-d tensor."""
    total = 0
    for part in ("visual", "text"):
        if batch.get(part) is not None:
            total = total + (batch[part]["labels"][:, 1:] != -100).sum()
    return total

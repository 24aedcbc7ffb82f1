"""Accuracy of the frozen LM on the test grids, reading the 9 cell tokens or a compressor's N fused tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from qfusion import QuestionFusion
from qfusion.demo.data import QUESTION_TYPES, GridBatch
from qfusion.demo.lm import generate
from qfusion.demo.train import Host, compress

CHUNK = 250  # test grids per forward


def accuracy_by_type(correct: Tensor, mask: Tensor, kinds: Tensor) -> dict[str, float]:
    """Digit accuracy per question type: the fraction of answer digits the LM gets right.

    correct, mask: (S, ANSWER_LEN) bool, a digit right / a position that holds a digit; kinds: (S,).
    """
    digits = (correct & mask).sum(-1).float() / mask.sum(-1)  # (S,) per question
    return {kind: digits[kinds == i].mean().item() for i, kind in enumerate(QUESTION_TYPES)}


@torch.no_grad()
def evaluate(host: Host, test: GridBatch, fusion: QuestionFusion | None = None,
             budget: int | None = None) -> dict[str, float]:
    """Digit accuracy per question type of the LM's greedy answers from the uncompressed cells (fusion None)
    or from N = budget fused tokens."""
    correct = []
    for start in range(0, len(test), CHUNK):
        batch = test.slice(start, start + CHUNK)
        vision = host.vision_tokens(batch, "test")
        if fusion is None:
            visual = vision.repeat_interleave(batch.questions.shape[1], dim=0)
        else:
            visual, _ = compress(fusion, vision, batch, budget)
        correct.append(generate(host.lm, visual, batch.questions.flatten(0, 1)) == batch.answers.flatten(0, 1))
    return accuracy_by_type(torch.cat(correct), test.answer_mask.flatten(0, 1), test.kinds.flatten())

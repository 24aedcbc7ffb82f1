"""Accuracy of the frozen LM on the test grids, reading the 9 cell tokens or a compressor's N fused tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from qfusion import QuestionFusion
from qfusion.demo.data import QUESTION_TYPES, GridBatch
from qfusion.demo.lm import lm_text, predict
from qfusion.demo.train import Host, compress

CHUNK = 250  # test grids per forward


def accuracy_by_type(correct: Tensor, test: GridBatch) -> dict[str, float]:
    """Mean of correct: (B·G,) per question type."""
    kinds = test.kinds.flatten()
    return {kind: correct[kinds == i].float().mean().item() for i, kind in enumerate(QUESTION_TYPES)}


@torch.no_grad()
def evaluate(host: Host, test: GridBatch, fusion: QuestionFusion | None = None, budget: int | None = None) -> dict[str, float]:
    """Accuracy per question type of the LM reading the uncompressed cells (fusion None) or N = budget fused tokens."""
    correct = []
    for start in range(0, len(test), CHUNK):
        batch = test.slice(start, start + CHUNK)
        vision = host.vision_tokens(batch, "test")
        if fusion is None:
            visual = vision.repeat_interleave(batch.questions.shape[1], dim=0)
        else:
            visual, _ = compress(fusion, vision, batch, budget)
        text, _, answer_position = lm_text(batch)
        correct.append(predict(host.lm, visual, text, answer_position) == batch.answers.flatten())
    return accuracy_by_type(torch.cat(correct), test)

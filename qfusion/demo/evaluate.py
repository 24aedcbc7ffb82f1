"""Accuracy of the frozen LM on the test grids, by what it reads in place of the 9 cell tokens.

A *reading* turns the grids' cell tokens into the tokens the LM reads before each question: the
cells themselves, a trained compressor's N fused tokens, a training-free baseline's N tokens, or a
conversation's per-turn fused tokens (m for the first question, n for each follow-up, through
``QuestionFusion.start`` / ``ask``). Every reading is scored by the same greedy decoding.
"""

from __future__ import annotations

from typing import Callable

import torch
from einops import rearrange
from torch import Tensor

from qfusion import QuestionFusion
from qfusion.demo.baselines import pool_cells, random_cells
from qfusion.demo.data import QUESTION_TYPES, GridBatch
from qfusion.demo.lm import generate
from qfusion.demo.train import Host, compress

CHUNK = 500  # test grids per forward

Reading = Callable[[Tensor, GridBatch], list[Tensor]]
"""cells (B, 9, d) and their batch → one (B, K_g, d) tensor per question position g: what the LM reads
before each grid's g-th question (K_g may differ between positions)."""


def accuracy_by_type(scores: Tensor, kinds: Tensor) -> dict[str, float]:
    """Mean digit accuracy per question type. scores, kinds: same shape, per question (kinds index QUESTION_TYPES)."""
    return {kind: scores[kinds == i].mean().item() for i, kind in enumerate(QUESTION_TYPES)}


def _question_scores(host: Host, visual: Tensor, batch: GridBatch, turn: int) -> Tensor:
    """(B,) the fraction of answer digits right for each grid's question at position turn."""
    answers = generate(host.lm, visual, batch.questions[:, turn])
    mask = batch.answer_mask[:, turn]
    return ((answers == batch.answers[:, turn]) & mask).sum(-1).float() / mask.sum(-1)


@torch.no_grad()
def evaluate(host: Host, test: GridBatch, reading: Reading) -> Tensor:
    """(B, G) digit accuracy of the LM's greedy answer to every test question, reading what ``reading`` gives."""
    scores = []
    for start in range(0, len(test), CHUNK):
        batch = test.slice(start, start + CHUNK)
        visual = reading(host.vision_tokens(batch, "test"), batch)
        scores.append(torch.stack([_question_scores(host, v, batch, g) for g, v in enumerate(visual)], dim=1))
    return torch.cat(scores)


def uncompressed(cells: Tensor, batch: GridBatch) -> list[Tensor]:
    """The reading without compression: the 9 cell tokens before every question."""
    return [cells] * batch.questions.shape[1]


def compressed(fusion: QuestionFusion, budget: int) -> Reading:
    """A trained compressor's N = budget fused tokens per question (question fused: every question of a grid
    its own group in one packed forward; no question: one group per grid serves all its questions)."""

    def read(cells: Tensor, batch: GridBatch) -> list[Tensor]:
        tokens, _ = compress(fusion, cells, batch, budget)  # (B·G, N, d)
        return list(rearrange(tokens, "(b g) k d -> g b k d", b=len(batch)))

    return read


def pooled(budget: int) -> Reading:
    """The cell tokens average-pooled to N (:func:`qfusion.demo.baselines.pool_cells`), for every question."""
    return lambda cells, batch: [pool_cells(cells, budget)] * batch.questions.shape[1]


def random_kept(budget: int, generator: torch.Generator) -> Reading:
    """N random cell tokens per grid (:func:`qfusion.demo.baselines.random_cells`), for every question."""
    return lambda cells, batch: [random_cells(cells, budget, generator)] * batch.questions.shape[1]


def conversation(fusion: QuestionFusion, m: int, n: int) -> Reading:
    """A grid's questions as one conversation: ``start`` runs the cells once, then each question is
    ``ask``-ed in turn: m fused tokens for the first, n for each follow-up (computed with that question)."""

    def read(cells: Tensor, batch: GridBatch) -> list[Tensor]:
        state = fusion.start(cells, m=m, n=n)
        turns = []
        for g in range(batch.questions.shape[1]):
            tokens, state = fusion.ask(state, list(batch.questions[:, g]))
            turns.append(torch.stack(tokens))
        return turns

    return read


def afresh(fusion: QuestionFusion, m: int) -> Reading:
    """Every question asked as the first of a new conversation about its grid: m fused tokens each. The
    cells run once (``start``); every question is asked of that same started state."""

    def read(cells: Tensor, batch: GridBatch) -> list[Tensor]:
        state = fusion.start(cells, m=m, n=m)
        return [torch.stack(fusion.ask(state, list(batch.questions[:, g]))[0])
                for g in range(batch.questions.shape[1])]

    return read

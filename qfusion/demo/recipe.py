"""The demo's budgets: steps, batch sizes and seeds of the full run and of the quick (CI) run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    """Every number that sets how long the demo trains and how much it evaluates.

    Both compressors (question fused and not) get the same steps, batches and budgets. Every m and n
    of ``conversation_budgets`` is one of ``budgets`` (the compressors are trained at those).
    """

    seeds: tuple[int, ...]
    encoder_steps: int  # single-digit pre-training of the cell encoder (full batch)
    lm_steps: int  # the reader LM, on uncompressed cell tokens
    lm_grids: int  # grids per LM step
    lm_questions: int  # questions per grid in an LM step
    stage1_steps: int  # compressor stage 1: contrastive + identity + reconstruction
    stage2_steps: int  # compressor stage 2: generation through the frozen LM (+ the stage-1 loss)
    grids: int  # grids per compressor step
    questions: int  # questions per grid in a compressor step (the m/n layout)
    test_grids: int  # fixed test grids, from the unseen handwriting pool
    test_questions: int  # questions per test grid
    budgets: tuple[int, ...] = (1, 2, 3, 4, 6, 9, 16)  # N, drawn at random per step (nested slots)
    random_draws: int = 2  # draws of the random-cells baseline per budget (its accuracy is their mean)
    # (m, n) of the conversations: m fused tokens for a grid's first question, n for each follow-up
    conversation_budgets: tuple[tuple[int, int], ...] = ((4, 1), (4, 2), (4, 4), (9, 1), (9, 2), (9, 4))
    lm_lr: float = 3e-3
    fusion_lr: float = 1e-3
    workers: int = 2

    def __post_init__(self) -> None:
        for m, n in self.conversation_budgets:
            if not (m in self.budgets and n in self.budgets and n <= m):
                raise ValueError(f"conversation_budgets: expected pairs (m, n) with n <= m, both in budgets "
                                 f"{self.budgets}, got {(m, n)}")
        if self.random_draws < 1:
            raise ValueError(f"random_draws: expected >= 1, got {self.random_draws}")


FULL = Recipe(seeds=(0, 1, 2), encoder_steps=300, lm_steps=1500, lm_grids=32, lm_questions=2,
              stage1_steps=1000, stage2_steps=300, grids=32, questions=4, test_grids=1000, test_questions=4)

QUICK = Recipe(seeds=(0,), encoder_steps=300, lm_steps=700, lm_grids=32, lm_questions=2,
               stage1_steps=250, stage2_steps=50, grids=32, questions=4, test_grids=200, test_questions=4,
               fusion_lr=3e-3)

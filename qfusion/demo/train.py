"""The demo's training loops: the frozen host (cell encoder + reader LM), then one elastic compressor per mode.

The host is trained once per seed and frozen, as the paper freezes its LLM. Its reader learns on
shuffled subsets of a grid's cells (always including the cells the question is about) as well as on
whole grids in order, so it reads any N tokens by their content: a compressor's output is then a
set of tokens the reader already understands, whatever their number or order.

A QuestionFusion compressor then learns to serve that fixed reader, with the paper's stages:
stage 1 aligns each group's ⟨eos⟩ state with its answer (contrastive), keeps the slots apart
(identity) and, added here, makes the fused tokens reproduce the cells they stand for (grounded
reconstruction); stage 2 trains through the frozen LM on the answers (generation, with the stage-1
loss kept on). One compressor covers every budget: each step draws N from the nested budgets. Both
modes get the same steps, batches, budgets and losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from qfusion import FusionConfig, QuestionFusion
from qfusion.demo.answers import answer_features
from qfusion.demo.data import CELLS, WORDS, GridBatch, sample_grids
from qfusion.demo.encoder import FEATURE_DIM, digit_accuracy, pretrain_encoder
from qfusion.demo.lm import ReaderLM, answer_loss, lm_text
from qfusion.demo.recipe import Recipe
from qfusion.demo.reconstruction import reconstruction_loss
from qfusion.losses import contrastive_loss, identity_loss

LM_DIM = 64
CONTRASTIVE_DIM = 32
IDENTITY_WEIGHT = 0.1  # λ: fused tokens of a cell question should all repeat one cell, so orthogonality only nudges
MAX_VIEW = 16  # the longest cell subset the reader trains on (the largest budget)


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over a fraction of the steps, then cosine decay to zero."""
    warm = max(1, int(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _step(optimizer: torch.optim.Optimizer, schedule, loss: Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()


@dataclass
class Host:
    """The frozen VLM stand-in: cell features of both pools (from the frozen encoder) and the reader LM.

    train_features: (1197, 32), test_features: (600, 32); digit_accuracy: the encoder's single-digit
    test accuracy (the ceiling of every grid model).
    """

    lm: ReaderLM
    train_features: Tensor
    test_features: Tensor
    digit_accuracy: float

    @torch.no_grad()
    def vision_tokens(self, batch: GridBatch, split: str) -> Tensor:
        """The LM's input tokens for the 9 cells of each grid: (B, 9, LM_DIM)."""
        features = self.train_features if split == "train" else self.test_features
        return self.lm.embed_cells(features[batch.cells])


def cell_views(evidence: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Which cells each reader-training sequence sees: (S, size) cell indices, in random order.

    evidence: (S, 9) bool, the cells each question is about. A view holds the evidence cells first
    (a random part of them if there are more than size), then other cells of the grid; past 9, cells
    repeat at random (a compressor with more slots than cells repeats some).
    """
    priority = torch.rand(evidence.shape, generator=generator) + (~evidence).float()  # evidence sorts first
    chosen = priority.argsort(-1)[:, :min(size, CELLS)]
    if size > CELLS:
        extra = torch.randint(CELLS, (evidence.shape[0], size - CELLS), generator=generator)
        chosen = torch.cat([chosen, extra], dim=1)
    order = torch.rand(chosen.shape, generator=generator).argsort(-1)
    return chosen.gather(1, order)


def train_host(pools: tuple[np.ndarray, ...], recipe: Recipe, seed: int) -> Host:
    """Pre-train and freeze the cell encoder, then train the reader LM and freeze it.

    A third of the reader's steps read whole grids in order (the uncompressed baseline's input);
    the others read views of 1..16 cells drawn by :func:`cell_views`.
    """
    train_images, train_labels, test_images, test_labels = (torch.from_numpy(a) for a in pools)
    encoder = pretrain_encoder(train_images, train_labels, recipe.encoder_steps, seed)
    with torch.no_grad():
        train_features, test_features = encoder(train_images), encoder(test_images)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    lm = ReaderLM(FEATURE_DIM, dim=LM_DIM)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=recipe.lm_lr, weight_decay=1e-2)
    schedule = cosine_schedule(optimizer, recipe.lm_steps, warmup=0.05)
    rng = np.random.default_rng(seed)
    for step in range(recipe.lm_steps):
        batch = sample_grids(pools[1], recipe.lm_grids, recipe.lm_questions, rng)
        cells = lm.embed_cells(train_features[batch.cells]).repeat_interleave(recipe.lm_questions, dim=0)
        if step % 3 == 0:
            visual = cells
        else:
            size = int(torch.randint(1, MAX_VIEW + 1, (), generator=generator))
            views = cell_views(batch.evidence.flatten(0, 1), size, generator)
            visual = cells.gather(1, views[..., None].expand(-1, -1, cells.shape[-1]))
        text, labels = lm_text(batch)
        _step(optimizer, schedule, answer_loss(lm, visual, text, labels))
    lm.requires_grad_(False).eval()
    return Host(lm, train_features, test_features, digit_accuracy(encoder, test_images, test_labels))


def fusion_config(use_question: bool, budgets: tuple[int, ...]) -> FusionConfig:
    """The compressor of the demo: a 3-layer QuestionFusion of width 64 writing tokens the LM reads."""
    return FusionConfig(vision_dim=LM_DIM, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128,
                        codebook_size=max(budgets), m=max(budgets), n=max(budgets), output_dim=LM_DIM,
                        text_vocab_size=len(WORDS), contrastive_dim=CONTRASTIVE_DIM, attn_impl="sdpa",
                        use_question=use_question)


def compress(fusion: QuestionFusion, vision: Tensor, batch: GridBatch, budget: int):
    """Fused tokens for every (grid, question): ((B·G, N, LM_DIM), the FusionOutput).

    With the question, each question of a grid is its own group [question, N slots] after the grid's
    cell tokens (m = n = N, the m/n layout). Without it, one group of N slots per grid serves all its
    questions.
    """
    grids, questions = batch.questions.shape[:2]
    if fusion.config.use_question:
        out = fusion(vision, batch.question_list(), m=budget, n=budget)
        return out.packed_tokens.view(grids * questions, budget, -1), out
    out = fusion(vision, None, m=budget)
    return out.packed_tokens.view(grids, budget, -1).repeat_interleave(questions, dim=0), out


def train_fusion(host: Host, digit_table: Tensor, train_labels: np.ndarray, recipe: Recipe, seed: int,
                 use_question: bool) -> QuestionFusion:
    """Train one elastic compressor (a random budget N per step) in the paper's two stages; returns it frozen.

    Stage 1 (alignment): contrastive (each group's ⟨eos⟩ vs its answer, :mod:`qfusion.demo.answers`)
    + identity (slots kept apart) + grounded reconstruction (:mod:`qfusion.demo.reconstruction`).
    Stage 2 (generation): the answers' cross-entropy through the frozen LM, with the stage-1 loss
    kept on (with the generation loss alone, a trial run's compressor kept only two of the three
    cells for one of the six lines; with both, every region was read at the baseline's level).

    digit_table: (10, 384) the MiniLM embedding of each digit word (``encode_digits``).
    """
    torch.manual_seed(seed)
    fusion = QuestionFusion(fusion_config(use_question, recipe.budgets))
    answer_proj = nn.Linear(CELLS * digit_table.shape[1], CONTRASTIVE_DIM, bias=False)
    rng = np.random.default_rng(seed + 1000)
    parameters = [*fusion.parameters(), *answer_proj.parameters()]
    for stage, steps, warmup in (("alignment", recipe.stage1_steps, 0.1), ("generation", recipe.stage2_steps, 0.03)):
        optimizer = torch.optim.AdamW(parameters, lr=recipe.fusion_lr, weight_decay=1e-2)
        schedule = cosine_schedule(optimizer, steps, warmup)
        for _ in range(steps):
            batch = sample_grids(train_labels, recipe.grids, recipe.questions, rng)
            budget = int(rng.choice(recipe.budgets))
            cells = host.vision_tokens(batch, "train")
            tokens, out = compress(fusion, cells, batch, budget)
            loss = alignment_loss(fusion, out, answer_proj, digit_table, batch, cells)
            if stage == "generation":
                text, labels = lm_text(batch)
                loss = loss + answer_loss(host.lm, tokens, text, labels)
            _step(optimizer, schedule, loss)
    return fusion.requires_grad_(False).eval()


def alignment_loss(fusion: QuestionFusion, out, answer_proj: nn.Linear, digit_table: Tensor, batch: GridBatch,
                   cells: Tensor) -> Tensor:
    """Stage-1 loss: contrastive + λ·identity + grounded reconstruction.

    cells: (B, 9, d) the grids' cell tokens. A question's group answers about its question's cells;
    without the question a grid has one group, which stands for the whole grid.
    """
    grids, questions = batch.questions.shape[:2]
    if fusion.config.use_question:
        labels = batch.labels.repeat_interleave(questions, dim=0)
        cells, evidence = cells.repeat_interleave(questions, dim=0), batch.evidence.flatten(0, 1)
    else:
        labels, evidence = batch.labels, torch.ones(grids, CELLS, dtype=torch.bool)
    features, answer_ids = answer_features(digit_table, labels, evidence)
    tokens = out.packed_tokens.view(labels.shape[0], -1, cells.shape[-1])
    contrastive = contrastive_loss(out.eos_embed, answer_proj(features), fusion.logit_scale, answer_ids)
    identity = identity_loss(out.slot_states, "group")
    return contrastive + IDENTITY_WEIGHT * identity + reconstruction_loss(tokens, cells, evidence)

"""The demo's language model: a 2-layer causal transformer that reads [vision tokens | question] and answers.

It plays the role of the VLM's LLM: trained once, from scratch, on cell tokens, then frozen. A
compressor is judged by how well this fixed reader answers from its N fused tokens in place of the
9 cell tokens.

Design (what makes the uncompressed baseline reach the encoder's ceiling): no transformer layer of
its own over the cells before the LM; cell features LayerNorm-ed (their norm is far above the
position embeddings') plus learned row and column embeddings, which the question's place words
share; position embeddings on the text only, so the visual prefix is a set of any size, read by
content (the reader is trained on shuffled subsets of cells, see ``qfusion.demo.train``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from qfusion.demo.data import (ANSWER_LEN, CELLS, COLUMNS, EOS, GRID, PAD, PLACES, QUESTION_LEN, ROWS, VOCAB, WORDS,
                               GridBatch)
from qfusion.losses import generation_loss

IGNORE = -100
TEXT_LEN = QUESTION_LEN + ANSWER_LEN + 1  # question, answer digits, <eos>


class Block(nn.Module):
    """Pre-norm causal self-attention + GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        """x: (S, L, dim) → (S, L, dim)."""
        q, k, v = rearrange(self.to_qkv(self.attn_norm(x)), "s l (three h d) -> three s h l d", three=3, h=self.heads)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.to_out(rearrange(attended, "s h l d -> s l (h d)"))
        return x + self.mlp(self.mlp_norm(x))


class ReaderLM(nn.Module):
    """A small causal LM over [K visual tokens | five question words | answer digits | <eos>].

    feature_dim: width of the frozen cell features; dim: the LM's width (= the fused tokens' width).
    """

    def __init__(self, feature_dim: int, dim: int = 64, layers: int = 2, heads: int = 4):
        super().__init__()
        self.dim = dim
        self.feature_norm = nn.LayerNorm(feature_dim, elementwise_affine=False)
        self.vision_proj = nn.Linear(feature_dim, dim)
        self.row = nn.Embedding(GRID, dim)
        self.column = nn.Embedding(GRID, dim)
        self.words = nn.Embedding(len(WORDS), dim)
        self.text_position = nn.Embedding(TEXT_LEN, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, len(WORDS))
        cell = torch.arange(CELLS)
        self.register_buffer("cell_row", cell // GRID, persistent=False)
        self.register_buffer("cell_column", cell % GRID, persistent=False)
        # word id → the cell / row / column it names, -1 for other words
        for name, words, values in (("cell_of_word", PLACES, cell), ("row_of_word", ROWS, torch.arange(GRID)),
                                    ("column_of_word", COLUMNS, torch.arange(GRID))):
            table = torch.full((len(WORDS),), -1)
            table[[VOCAB[w] for w in words]] = values
            self.register_buffer(name, table, persistent=False)

    def place(self, cell: Tensor) -> Tensor:
        """Position embedding row(r) + column(c) of cells (...,) → (..., dim)."""
        return self.row(self.cell_row[cell]) + self.column(self.cell_column[cell])

    def embed_cells(self, features: Tensor) -> Tensor:
        """features: (B, 9, feature_dim) of the cells, row-major → vision tokens (B, 9, dim)."""
        return self.vision_proj(self.feature_norm(features)) + self.place(torch.arange(CELLS, device=features.device))

    def embed_words(self, ids: Tensor) -> Tensor:
        """ids: (S, L) → (S, L, dim), plus text positions; place words share the cells' position tables."""
        cell, row, column = self.cell_of_word[ids], self.row_of_word[ids], self.column_of_word[ids]
        x = torch.where((cell >= 0)[..., None], self.place(cell.clamp(min=0)), self.words(ids))
        x = torch.where((row >= 0)[..., None], self.row(row.clamp(min=0)), x)
        x = torch.where((column >= 0)[..., None], self.column(column.clamp(min=0)), x)
        return x + self.text_position(torch.arange(ids.shape[1], device=ids.device))

    def forward(self, visual: Tensor, text: Tensor) -> Tensor:
        """visual: (S, K, dim) tokens in place of the image; text: (S, L) word ids → logits (S, K + L, vocab)."""
        x = torch.cat([visual, self.embed_words(text)], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def lm_text(batch: GridBatch) -> tuple[Tensor, Tensor]:
    """The LM's text side of every (grid, question): question, answer digits, <eos>, right-padded.

    Returns text (B·G, TEXT_LEN) word ids and labels (B·G, TEXT_LEN) with the answer digits and
    <eos> kept and -100 elsewhere.
    """
    questions = batch.questions.flatten(0, 1)  # (S, QUESTION_LEN)
    answers = batch.answers.flatten(0, 1)  # (S, ANSWER_LEN)
    rows = torch.arange(questions.shape[0])
    lengths = batch.answer_mask.flatten(0, 1).sum(-1)  # (S,)
    text = torch.cat([questions, answers, torch.full((questions.shape[0], 1), VOCAB[PAD])], dim=1)
    text[rows, QUESTION_LEN + lengths] = VOCAB[EOS]
    labels = torch.full_like(text, IGNORE)
    keep = torch.arange(TEXT_LEN) >= QUESTION_LEN
    keep = keep & (torch.arange(TEXT_LEN) <= QUESTION_LEN + lengths[:, None])
    labels[keep] = text[keep]
    return text, labels


def answer_loss(lm: ReaderLM, visual: Tensor, text: Tensor, labels: Tensor) -> Tensor:
    """Generation loss of the LM reading visual: (S, K, dim) before text: (S, L) (answers and <eos> scored)."""
    logits = lm(visual, text)
    prefix = torch.full((labels.shape[0], visual.shape[1]), IGNORE, dtype=labels.dtype)
    return generation_loss(logits, torch.cat([prefix, labels], dim=1))


@torch.no_grad()
def generate(lm: ReaderLM, visual: Tensor, questions: Tensor) -> Tensor:
    """The LM's greedy answer: (S, ANSWER_LEN) word ids after each question (S, QUESTION_LEN).

    Decodes ANSWER_LEN words for every question; a shorter answer is scored on its own length.
    """
    text = questions
    for _ in range(ANSWER_LEN):
        logits = lm(visual, text)
        text = torch.cat([text, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return text[:, QUESTION_LEN:]

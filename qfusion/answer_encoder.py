"""AnswerEncoder: the text side of the contrastive loss (answers → L2-normalised contrastive_dim vectors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

POOLINGS = ("mean", "eos", "cls")


class AnswerEncoder(nn.Module):
    """A transformers text encoder, pooled and projected to ``contrastive_dim``, for stage-1 alignment.

    The paper reads the CLIP text encoder at its ⟨eos⟩ token (``pooling="eos"``; for CLIP text models
    their own ``pooler_output`` is used); a sentence encoder's masked mean (``pooling="mean"``) is
    equally valid.

    encoder: any transformers model returning ``last_hidden_state`` (BERT, CLIPTextModel, ...).
    contrastive_dim: output width (the fusion config's ``contrastive_dim``).
    pooling: "mean" (masked mean), "eos" (last non-padding token, or ``pooler_output`` of CLIP) or
        "cls" (first token).
    freeze_encoder: keep the encoder's weights fixed; only the projection trains.

    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    ...                             num_attention_heads=2, intermediate_size=32))
    >>> enc = AnswerEncoder(bert, contrastive_dim=8)
    >>> enc(torch.tensor([[2, 5, 7, 0]]), torch.tensor([[1, 1, 1, 0]])).shape
    torch.Size([1, 8])
    """

    def __init__(self, encoder: nn.Module, contrastive_dim: int, pooling: str = "mean",
                 freeze_encoder: bool = False):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {POOLINGS}, got {pooling!r}")
        hidden = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise TypeError("encoder: expected a transformers model whose config has hidden_size")
        self.encoder = encoder
        self.pooling = pooling
        self._clip_pooler = getattr(encoder.config, "model_type", "") == "clip_text_model"
        self.projection = nn.Linear(hidden, contrastive_dim, bias=False)
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (K, L) right-padded answers. Returns (K, contrastive_dim), unit norm."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask: expected the (K, L) shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state  # (K, L, hidden)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "eos" and self._clip_pooler:
            pooled = out.pooler_output  # CLIP pools at its <eos> token itself
        elif self.pooling == "eos":
            last = attention_mask.long().sum(-1).clamp(min=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            weights = attention_mask.to(hidden.dtype)[..., None]
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return F.normalize(self.projection(pooled), dim=-1)

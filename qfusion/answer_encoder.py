"""AnswerEncoder: the text side of the contrastive loss (answers → L2-normalised contrastive_dim vectors).

Two kinds of text encoder: a transformers text model (CLIP's text tower as in the paper, a sentence
encoder, ...), or :class:`InputEmbeddings`, the host LLM's own input embedding table, which needs
nothing beyond the host checkpoint (:meth:`AnswerEncoder.from_input_embeddings`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutput

POOLINGS = ("mean", "eos", "cls")


class InputEmbeddings(nn.Module):
    """A host LLM's input embedding table used as a frozen, context-free text encoder.

    ``forward(input_ids)`` returns ``last_hidden_state``: (K, L, hidden) rows of the table. The table
    is referenced, not copied and not registered as a submodule: the host keeps owning it (placing,
    saving and sharding it with its own weights), and no gradient reaches it from here.

    embeddings: the host's ``model.get_input_embeddings()``, an ``nn.Embedding`` (num_tokens, hidden).
    """

    def __init__(self, embeddings: nn.Embedding):
        super().__init__()
        if not isinstance(embeddings, nn.Embedding):
            raise TypeError(
                f"embeddings: expected an nn.Embedding (the host's get_input_embeddings()), got "
                f"{type(embeddings).__name__}"
            )
        self._table = (embeddings,)  # a tuple hides it from nn.Module's parameter registration
        self.hidden_size = embeddings.embedding_dim

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> BaseModelOutput:
        """input_ids: (K, L) token ids of the host's tokenizer. Returns ``last_hidden_state`` (K, L, hidden)."""
        weight = self._table[0].weight.detach()
        return BaseModelOutput(last_hidden_state=F.embedding(input_ids.to(weight.device), weight))


class AnswerEncoder(nn.Module):
    """A transformers text encoder, pooled and projected to ``contrastive_dim``, for stage-1 alignment.

    The paper reads the CLIP text encoder at its ⟨eos⟩ token (``pooling="eos"``; for CLIP text models
    their own ``pooler_output`` is used); a sentence encoder's masked mean (``pooling="mean"``) is
    equally valid.

    encoder: any transformers model returning ``last_hidden_state`` (BERT, CLIPTextModel, ...), or
        an :class:`InputEmbeddings` (see :meth:`from_input_embeddings`).
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
        if isinstance(encoder, InputEmbeddings):
            hidden = encoder.hidden_size
        else:
            hidden = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise TypeError("encoder: expected a transformers model whose config has hidden_size, or InputEmbeddings")
        self.encoder = encoder
        self.pooling = pooling
        self._clip_pooler = getattr(getattr(encoder, "config", None), "model_type", "") == "clip_text_model"
        self.projection = nn.Linear(hidden, contrastive_dim, bias=False)
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    @classmethod
    def from_input_embeddings(cls, embeddings: nn.Embedding, contrastive_dim: int) -> "AnswerEncoder":
        """The offline default: the host LLM's input embeddings, mean-pooled and frozen; only the
        projection to ``contrastive_dim`` trains. Tokenize the answers with the host's tokenizer.

        embeddings: the host's ``model.get_input_embeddings()``.

        >>> table = torch.nn.Embedding(50, 16)
        >>> enc = AnswerEncoder.from_input_embeddings(table, contrastive_dim=8)
        >>> enc(torch.tensor([[2, 5, 7, 0]]), torch.tensor([[1, 1, 1, 0]])).shape
        torch.Size([1, 8])
        >>> [name for name, _ in enc.named_parameters()]
        ['projection.weight']
        """
        return cls(InputEmbeddings(embeddings), contrastive_dim, pooling="mean")

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (K, L) right-padded answers. Returns (K, contrastive_dim), unit norm."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask: expected the (K, L) shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        # pool and project in the projection's dtype (a bf16 host table, an fp32 projection)
        hidden = out.last_hidden_state.to(self.projection.weight.dtype)  # (K, L, hidden)
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

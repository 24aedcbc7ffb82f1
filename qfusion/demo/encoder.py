"""The demo's vision tower: a per-cell MLP pre-trained on single digits, then frozen (as a VLM freezes CLIP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_DIM = 32


class CellEncoder(nn.Module):
    """MLP 64 → 128 → 32 over one 8×8 digit; a linear head on top is used only for pre-training."""

    def __init__(self, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, feature_dim))
        self.head = nn.Linear(feature_dim, 10)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels: (..., 64) in [0, 1] → features (..., feature_dim)."""
        return self.body(pixels)


def pretrain_encoder(images: Tensor, labels: Tensor, steps: int, seed: int) -> CellEncoder:
    """Train a CellEncoder to classify single digits (full batch, Adam), then freeze it.

    images: (P, 64) the training pool; labels: (P,).
    """
    torch.manual_seed(seed)
    encoder = CellEncoder()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=3e-3, weight_decay=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(encoder.head(encoder(images)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return encoder.requires_grad_(False).eval()


@torch.no_grad()
def digit_accuracy(encoder: CellEncoder, images: Tensor, labels: Tensor) -> float:
    """Single-digit accuracy of the pre-training head: the ceiling of every grid model."""
    return (encoder.head(encoder(images)).argmax(-1) == labels).float().mean().item()

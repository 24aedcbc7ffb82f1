"""Attention ops of the fusion transformer (the model calls :func:`fusion_attention` only)."""

from qfusion.ops.attention import IMPLEMENTATIONS, fusion_attention

__all__ = ["IMPLEMENTATIONS", "fusion_attention"]

"""Attention ops of the fusion transformer (the model calls :func:`fusion_attention` only).

Self-contained: the contract the ops implement (per-token metadata, the mask rule, the policies) is
:mod:`qfusion.ops.meta`; nothing here imports the rest of qfusion.
"""

from qfusion.ops.attention import IMPLEMENTATIONS, fusion_attention
from qfusion.ops.meta import POLICIES, AttentionMeta, mask_rule

__all__ = ["IMPLEMENTATIONS", "POLICIES", "AttentionMeta", "fusion_attention", "mask_rule"]

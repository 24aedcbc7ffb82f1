"""The attention contract: per-token metadata and the mask rule that every backend evaluates.

A packed varlen batch is described token by token: what each token is (``kind``), which question
group it belongs to (``group``), where it stands in its sample (``order``), and where each sample
starts (``cu_seqlens``). The attention mask is not a tensor but a *rule* on that metadata
(:func:`mask_rule`), evaluated wherever it is needed: materialised for the eager reference, as a
FlexAttention ``mask_mod``, inside the Triton kernel. Who builds the metadata (``qfusion.layout``)
is not the kernel's business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

VISION, TEXT, QUERY = 0, 1, 2
"""Token kinds."""

NO_GROUP = -1
"""Group index of vision tokens, which belong to no question group."""

POLICIES = ("causal", "prefix", "grouped")


def mask_rule(policy: str, q_kind, q_group, q_order, k_kind, k_group, k_order):
    """Whether query token (q_*) may attend to key token (k_*) of the same sample.

    Written with ``&``, ``|``, ``<=`` and ``==`` only, so the same expression runs on broadcast torch
    tensors (eager reference, FlexAttention ``mask_mod``) and on Triton block tensors.

    * ``causal`` (the paper): key j visible iff order_j <= order_i.
    * ``prefix``: causal, and vision tokens see all vision tokens.
    * ``grouped``: prefix, and a token of group g sees only vision, group 0 and its own group.
    """
    visible = k_order <= q_order
    if policy == "causal":
        return visible
    both_vision = (q_kind == VISION) & (k_kind == VISION)
    if policy == "prefix":
        return visible | both_vision
    if policy == "grouped":
        # Vision has group -1, so `k_group <= 0` keeps vision and group 0.
        return (visible & ((k_group <= 0) | (k_group == q_group))) | both_vision
    raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")


@dataclass(frozen=True, eq=False)
class AttentionMeta:
    """Per-token metadata of one side (queries or keys) of a packed varlen attention.

    All tensors are int32 on the device of the activations. Within one sample, ``order`` is the
    token's index in that sample's full packed sequence; keys of a sample are stored in increasing
    order, and a query sees a key only if the rule allows it (the rule never looks forward except
    vision to vision).

    kind: (T,) VISION / TEXT / QUERY.
    group: (T,) question group index, NO_GROUP (-1) for vision tokens.
    order: (T,) index of the token in its sample's packed sequence.
    cu_seqlens: (B + 1,) offsets of the samples in the packed tensors.
    max_seqlen: the longest sample, in tokens.
    """

    kind: Tensor
    group: Tensor
    order: Tensor
    cu_seqlens: Tensor
    max_seqlen: int

    @classmethod
    def from_lists(cls, kind, group, order, lengths, device=None) -> "AttentionMeta":
        """Metadata from per-token Python lists (samples back to back) and each sample's token count."""
        cu = [0]
        for length in lengths:
            cu.append(cu[-1] + length)

        def t(values):
            return torch.tensor(values, dtype=torch.int32, device=device)

        return cls(t(kind), t(group), t(order), t(cu), max(lengths, default=0))

    @property
    def num_samples(self) -> int:
        """B, the number of samples."""
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        """T, the number of packed tokens."""
        return self.kind.numel()

    def seqlens(self) -> Tensor:
        """(B,) number of tokens of each sample."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def sample_ids(self) -> Tensor:
        """(T,) the sample each token belongs to."""
        return torch.repeat_interleave(
            torch.arange(self.num_samples, device=self.cu_seqlens.device), self.seqlens().long()
        )

    def to(self, device) -> "AttentionMeta":
        """The same metadata on ``device``."""
        return AttentionMeta(
            self.kind.to(device), self.group.to(device), self.order.to(device),
            self.cu_seqlens.to(device), self.max_seqlen,
        )


def dense_mask(policy: str, meta_q: AttentionMeta, meta_k: AttentionMeta, sample: int) -> Tensor:
    """(Lq, Lk) boolean mask of one sample, materialised from the rule (for references and SDPA)."""
    qs, qe = (int(x) for x in meta_q.cu_seqlens[sample : sample + 2])
    ks, ke = (int(x) for x in meta_k.cu_seqlens[sample : sample + 2])
    return mask_rule(
        policy,
        meta_q.kind[qs:qe, None], meta_q.group[qs:qe, None], meta_q.order[qs:qe, None],
        meta_k.kind[None, ks:ke], meta_k.group[None, ks:ke], meta_k.order[None, ks:ke],
    )

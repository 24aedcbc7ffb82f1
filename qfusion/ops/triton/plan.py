"""The host-side tile plan of the fused attention kernel: which (query tile, key tile) pairs to run.

Every tile of every sample is summarised by six integers (min/max order, min/max group, any/all
vision); from two summaries :func:`~qfusion.ops.triton.kernels.tile_visibility` classifies a
(query tile, key tile) pair as skipped (the rule masks every pair), full (the rule shows every pair
and both tiles are complete) or partial. :func:`tile_lists` turns the classes into, per query tile,
the key tiles to visit, full ones and partial ones apart, with their counts (and the transposed
lists per key tile for the dK/dV pass) — on the device, by a stable sort of the classes, with no
host synchronisation. :func:`cached_plan` keeps them per :class:`~qfusion.ops.meta.AttentionMeta`
pair, so every layer of a forward shares one plan.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import triton
from torch import Tensor

from qfusion.ops.meta import VISION, AttentionMeta
from qfusion.ops.triton.configs import KernelConfig
from qfusion.ops.triton.kernels import policy_code, tile_visibility

SUMMARY_FIELDS = ("order_min", "order_max", "group_min", "group_max", "any_vision", "all_vision")
SKIP, PARTIAL, FULL = 0, 1, 2
"""Tile-pair classes of :func:`tile_classes`."""


def tile_summaries(meta: AttentionMeta, block: int) -> Tensor:
    """Summaries of every tile of ``block`` tokens of every sample, for the tile classes.

    Returns (B, max(ceil(max_seqlen / block), 1), 6) int32 with the columns of ``SUMMARY_FIELDS``:
    min and max order, min and max group, whether any / all of the tile's tokens are vision (0 or
    1). Tiles past a sample's end hold meaningless values (:func:`tile_classes` skips them).
    """
    num_tiles = max(triton.cdiv(meta.max_seqlen, block), 1)
    cu = meta.cu_seqlens.long()
    token = torch.arange(meta.num_tokens, device=cu.device)
    sample = torch.searchsorted(cu[1:], token, right=True)
    tile = sample * num_tiles + (token - cu[sample]) // block
    vision = (meta.kind == VISION).int()
    # One scatter of column-wise minima; maxima and "any" are minima of negated columns.
    signs = torch.tensor([1, -1, 1, -1, -1, 1], dtype=torch.int32, device=cu.device)
    columns = torch.stack([meta.order, meta.order, meta.group, meta.group, vision, vision], dim=1) * signs
    minima = torch.full((meta.num_samples * num_tiles, 6), torch.iinfo(torch.int32).max,
                        dtype=torch.int32, device=cu.device)
    minima.scatter_reduce_(0, tile[:, None].expand(-1, 6), columns, reduce="amin")
    return (minima * signs).view(meta.num_samples, num_tiles, 6)


def tile_classes(meta_q: AttentionMeta, meta_k: AttentionMeta, policy: str, block_m: int, block_n: int) -> Tensor:
    """(B, query tiles, key tiles) int8 class of every tile pair of every sample: SKIP, PARTIAL or FULL.

    SKIP: no visible pair, or a tile past its sample's end. FULL: every pair visible and both tiles
    complete (block_m queries, block_n keys), so the kernel needs no mask and no bounds there.
    """
    code = policy_code(policy)
    summary_q, summary_k = tile_summaries(meta_q, block_m), tile_summaries(meta_k, block_n)
    skip, full = tile_visibility.fn(code, *summary_q[:, :, None, :].unbind(-1), *summary_k[:, None, :, :].unbind(-1))
    device = summary_q.device
    first_q = (torch.arange(summary_q.shape[1], device=device) * block_m)[None, :, None]
    first_k = (torch.arange(summary_k.shape[1], device=device) * block_n)[None, None, :]
    len_q, len_k = meta_q.seqlens()[:, None, None], meta_k.seqlens()[:, None, None]
    exists = (first_q < len_q) & (first_k < len_k)
    complete = (first_q + block_m <= len_q) & (first_k + block_n <= len_k)
    partial_or_full = torch.where(full & complete, FULL, PARTIAL).to(torch.int8)
    return torch.where(exists & ~skip, partial_or_full, torch.zeros_like(partial_or_full))


class TileLists(NamedTuple):
    """Per row tile (of each sample), the column tiles to visit: full ones, then partial ones.

    full_num, part_num: (B, rows) int32 counts; full_idx, part_idx: (B, rows, columns) int32 column
    tile indices, the listed ones first in increasing order (the rest is padding never read).
    """

    full_num: Tensor
    full_idx: Tensor
    part_num: Tensor
    part_idx: Tensor


def tile_lists(classes: Tensor) -> TileLists:
    """The lists of :class:`TileLists` from a (B, rows, columns) class grid, on its device, no host sync."""

    def listed(selected: Tensor) -> tuple[Tensor, Tensor]:
        # A stable sort of "not selected" puts the selected columns first, in increasing order.
        order = torch.sort((~selected).to(torch.int8), dim=-1, stable=True).indices
        return selected.sum(-1, dtype=torch.int32).contiguous(), order.to(torch.int32).contiguous()

    return TileLists(*listed(classes == FULL), *listed(classes == PARTIAL))


class TilePlan(NamedTuple):
    """The tile lists of the three passes: forward and dQ by query tile, dK/dV by key tile."""

    fwd: TileLists
    dkdv: TileLists
    dq: TileLists

    def tensors(self) -> list[Tensor]:
        """The 12 tensors in the order the custom ops take them (fwd, dkdv, dq; each as TileLists)."""
        return [t for lists in self for t in lists]


def build_plan(meta_q: AttentionMeta, meta_k: AttentionMeta, policy: str, config: KernelConfig,
               backward: bool = True) -> TilePlan:
    """Tile lists of every pass for a layout pair and policy, with the config's tile sizes.

    backward=False builds the forward's lists only and repeats them in the backward's places
    (for inference, where the backward never runs).
    """

    def classes(p):
        return tile_classes(meta_q, meta_k, policy, p.block_m, p.block_n)

    fwd_classes = classes(config.fwd)
    fwd = tile_lists(fwd_classes)
    if not backward:
        return TilePlan(fwd, fwd, fwd)
    same_tiles = (config.dq.block_m, config.dq.block_n) == (config.fwd.block_m, config.fwd.block_n)
    dq = fwd if same_tiles else tile_lists(classes(config.dq))
    return TilePlan(fwd, tile_lists(classes(config.dkdv).transpose(1, 2)), dq)


class TileStats(NamedTuple):
    """Counts of (query tile, key tile) pairs within samples, as the kernel would treat them."""

    total: int
    executed: int  # not skipped
    unmasked: int  # executed with no per-element mask (fully visible, complete tiles)

    @property
    def executed_fraction(self) -> float:
        return self.executed / self.total if self.total else 0.0


def tile_stats(meta_q: AttentionMeta, meta_k: AttentionMeta, policy: str,
               block_m: int = 64, block_n: int = 64) -> TileStats:
    """How many tile pairs the kernel executes for a layout (for benchmarks and tuning).

    >>> from qfusion.layout import pack
    >>> meta = pack([128], [[20, 12, 12]], budget=(44, 20), policy="grouped").meta  # 8 tiles of 32
    >>> tile_stats(meta, meta, "causal", 32, 32)
    TileStats(total=64, executed=36, unmasked=28)
    >>> stats = tile_stats(meta, meta, "grouped", 32, 32)  # + vision-vision, - group 2 vs group 1
    >>> stats, round(stats.executed_fraction, 3)
    (TileStats(total=64, executed=41, unmasked=37), 0.641)
    """
    classes = tile_classes(meta_q, meta_k, policy, block_m, block_n)
    tiles_q = (meta_q.seqlens().long() + block_m - 1) // block_m
    tiles_k = (meta_k.seqlens().long() + block_n - 1) // block_n
    return TileStats(int((tiles_q * tiles_k).sum()), int((classes != SKIP).sum()), int((classes == FULL).sum()))


_plans: "weakref.WeakKeyDictionary[AttentionMeta, dict]" = weakref.WeakKeyDictionary()


def cached_plan(meta_q: AttentionMeta, meta_k: AttentionMeta, policy: str, config: KernelConfig,
                backward: bool) -> TilePlan:
    """:func:`build_plan`, cached per (meta_q, meta_k, policy, config, backward) in eager mode
    (every layer of a forward shares its metas, so the lists are built once per forward)."""
    if torch.compiler.is_compiling():
        return build_plan(meta_q, meta_k, policy, config, backward)
    per_q = _plans.setdefault(meta_q, {})
    key = (id(meta_k), policy, config, backward)
    cached = per_q.get(key)
    if cached is None or cached[0]() is not meta_k:
        cached = per_q[key] = (weakref.ref(meta_k), build_plan(meta_q, meta_k, policy, config, backward))
    return cached[1]

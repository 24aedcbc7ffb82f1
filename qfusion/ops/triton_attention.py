"""The fused block-sparse attention kernel over packed varlen sequences, forward and backward.

FlashAttention-2 in Triton, with the mask given as the rule of :func:`qfusion.layout.mask_rule`
evaluated in the kernel on each tile's per-token metadata (kind, group, order); no mask is ever
stored. One program handles one (query tile, head, sample) in the forward and the dQ pass, one
(key tile, head, sample) in the dK/dV pass; samples are runs of the packed tensors delimited by
``cu_seqlens_q`` / ``cu_seqlens_k``, which differ for an incremental ``ask``.

Tile skipping: once per call (cached per :class:`~qfusion.layout.AttentionMeta`), every tile of
every sample is summarised by six integers (min/max order, min/max group, any/all vision). From two
summaries :func:`_tile_visibility` proves a (query tile, key tile) pair either fully masked (the
kernel skips it) or fully visible (the kernel runs it with no per-element mask work); every other
pair evaluates the rule element by element. :func:`tile_stats` applies the same test on the host.

Softmax runs online in float32 with base-2 exponentials; the log-sum-exp of each row (base 2) is
kept for the backward. A row that sees no key gets output 0 and log-sum-exp +inf, so its gradients
are 0 and nothing is NaN. The kernels are ``torch.library`` custom ops
(``qfusion::fusion_attention_fwd`` / ``qfusion::fusion_attention_bwd``) with fake implementations
and a registered autograd formula, so ``torch.compile`` traces through them.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from qfusion.layout import POLICIES, VISION, AttentionMeta

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
POLICY_CODES = {"causal": 0, "prefix": 1, "grouped": 2}
SUMMARY_FIELDS = ("order_min", "order_max", "group_min", "group_max", "any_vision", "all_vision")

_LOG2E = 1.4426950408889634
_VISION = tl.constexpr(VISION)


# ---------------------------------------------------------------------------------------- the rule


@triton.jit
def _mask_rule(policy: tl.constexpr, q_kind, q_group, q_order, k_kind, k_group, k_order):
    """In-kernel twin of :func:`qfusion.layout.mask_rule`, line for line (policy: a POLICY_CODES value)."""
    visible = k_order <= q_order
    if policy == 0:
        return visible
    both_vision = (q_kind == _VISION) & (k_kind == _VISION)
    if policy == 1:
        return visible | both_vision
    # Vision has group -1, so `k_group <= 0` keeps vision and group 0.
    return (visible & ((k_group <= 0) | (k_group == q_group))) | both_vision


@triton.jit
def _tile_visibility(policy: tl.constexpr,
                     q_omin, q_omax, q_gmin, q_gmax, q_any_vision, q_all_vision,
                     k_omin, k_omax, k_gmin, k_gmax, k_any_vision, k_all_vision):
    """(skip, full) for a query tile and a key tile of one sample, from their summaries.

    skip: the rule masks every pair. full: the rule shows every pair. Both are sufficient
    conditions only (a tile may be neither). Written with comparisons, ``&`` and ``|`` so that it
    runs on Triton scalars in the kernel and on torch tensors on the host (:func:`tile_stats`).
    """
    all_keys_after = q_omax < k_omin
    all_keys_before = k_omax <= q_omin
    # Some (query, key) pair is vision-vision / every pair is vision-vision.
    no_vision_pair = (q_any_vision == 0) | (k_any_vision == 0)
    all_vision_pairs = (q_all_vision == 1) & (k_all_vision == 1)
    if policy == 0:
        return all_keys_after, all_keys_before
    if policy == 1:
        return all_keys_after & no_vision_pair, all_keys_before | all_vision_pairs
    # `k_group <= 0 | k_group == q_group` fails for every pair when all keys are in groups >= 1
    # that no query has, and holds for every pair when all keys are in groups <= 0 or all queries
    # and keys share one group.
    groups_disjoint = (q_gmax < k_gmin) | (k_gmax < q_gmin)
    group_never = (1 <= k_gmin) & groups_disjoint
    group_always = (k_gmax <= 0) | ((q_gmin == q_gmax) & (k_gmin == q_gmin) & (k_gmax == q_gmin))
    skip = (all_keys_after | group_never) & no_vision_pair
    full = (all_keys_before & group_always) | all_vision_pairs
    return skip, full


# ------------------------------------------------------------------------------------ the kernels


@triton.jit
def _load_summary(tiles, sample, tile, num_tiles):
    """The six SUMMARY_FIELDS of one tile of one sample."""
    base = tiles + (sample * num_tiles + tile) * 6
    return (tl.load(base), tl.load(base + 1), tl.load(base + 2),
            tl.load(base + 3), tl.load(base + 4), tl.load(base + 5))


@triton.jit
def _load_meta(meta, stride_field, first, offs, valid):
    """kind, group, order of tokens first + offs of a (3, T) metadata tensor."""
    kind = tl.load(meta + first + offs, mask=valid, other=0)
    group = tl.load(meta + stride_field + first + offs, mask=valid, other=0)
    order = tl.load(meta + 2 * stride_field + first + offs, mask=valid, other=0)
    return kind, group, order


@triton.jit
def _load_rows(base, first, offs, valid, stride_t, head_offset, offs_d, d_valid):
    rows = (first + offs).to(tl.int64)
    ptrs = base + rows[:, None] * stride_t + head_offset + offs_d[None, :]
    return tl.load(ptrs, mask=valid[:, None] & d_valid[None, :], other=0.0)


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse,
    MetaQ, CuQ, TilesQ, MetaK, CuK, TilesK,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_lse_h, stride_meta_q, stride_meta_k, num_q_tiles, num_k_tiles, qk_scale, head_dim,
    POLICY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile_m = tl.program_id(0)
    head = tl.program_id(1)
    sample = tl.program_id(2)
    q_first = tl.load(CuQ + sample)
    q_len = tl.load(CuQ + sample + 1) - q_first
    if tile_m * BLOCK_M >= q_len:
        return
    k_first = tl.load(CuK + sample)
    k_len = tl.load(CuK + sample + 1) - k_first

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    d_valid = offs_d < head_dim
    q = _load_rows(Q, q_first, offs_m, m_valid, stride_qt, head * stride_qh, offs_d, d_valid)
    q_kind, q_group, q_order = _load_meta(MetaQ, stride_meta_q, q_first, offs_m, m_valid)
    q_omin, q_omax, q_gmin, q_gmax, q_anyv, q_allv = _load_summary(TilesQ, sample, tile_m, num_q_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for tile_n in range(0, tl.cdiv(k_len, BLOCK_N)):
        k_omin, k_omax, k_gmin, k_gmax, k_anyv, k_allv = _load_summary(TilesK, sample, tile_n, num_k_tiles)
        skip, full = _tile_visibility(POLICY, q_omin, q_omax, q_gmin, q_gmax, q_anyv, q_allv,
                                      k_omin, k_omax, k_gmin, k_gmax, k_anyv, k_allv)
        if skip == 0:
            start_n = tile_n * BLOCK_N
            n_valid = start_n + offs_n < k_len
            k = _load_rows(K, k_first + start_n, offs_n, n_valid, stride_kt, head * stride_kh, offs_d, d_valid)
            v = _load_rows(V, k_first + start_n, offs_n, n_valid, stride_vt, head * stride_vh, offs_d, d_valid)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            if (full == 0) | (start_n + BLOCK_N > k_len):
                k_kind, k_group, k_order = _load_meta(MetaK, stride_meta_k, k_first + start_n, offs_n, n_valid)
                visible = _mask_rule(POLICY, q_kind[:, None], q_group[:, None], q_order[:, None],
                                     k_kind[None, :], k_group[None, :], k_order[None, :])
                s = tl.where(visible & n_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows that have seen no key yet keep m = -inf; subtract 0 there instead of -inf.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    rows = (q_first + offs_m).to(tl.int64)
    tl.store(Out + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    # +inf for rows that saw nothing: their probabilities exp2(s - lse) are 0 in the backward.
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(Lse + head * stride_lse_h + q_first + offs_m, lse, mask=m_valid)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    MetaQ, CuQ, TilesQ, MetaK, CuK, TilesK,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    stride_lse_h, stride_meta_q, stride_meta_k, num_q_tiles, num_k_tiles, qk_scale, scale, head_dim,
    POLICY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile_n = tl.program_id(0)
    head = tl.program_id(1)
    sample = tl.program_id(2)
    k_first = tl.load(CuK + sample)
    k_len = tl.load(CuK + sample + 1) - k_first
    if tile_n * BLOCK_N >= k_len:
        return
    q_first = tl.load(CuQ + sample)
    q_len = tl.load(CuQ + sample + 1) - q_first

    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = offs_n < k_len
    d_valid = offs_d < head_dim
    k = _load_rows(K, k_first, offs_n, n_valid, stride_kt, head * stride_kh, offs_d, d_valid)
    v = _load_rows(V, k_first, offs_n, n_valid, stride_vt, head * stride_vh, offs_d, d_valid)
    k_kind, k_group, k_order = _load_meta(MetaK, stride_meta_k, k_first, offs_n, n_valid)
    k_omin, k_omax, k_gmin, k_gmax, k_anyv, k_allv = _load_summary(TilesK, sample, tile_n, num_k_tiles)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for tile_m in range(0, tl.cdiv(q_len, BLOCK_M)):
        q_omin, q_omax, q_gmin, q_gmax, q_anyv, q_allv = _load_summary(TilesQ, sample, tile_m, num_q_tiles)
        skip, full = _tile_visibility(POLICY, q_omin, q_omax, q_gmin, q_gmax, q_anyv, q_allv,
                                      k_omin, k_omax, k_gmin, k_gmax, k_anyv, k_allv)
        if skip == 0:
            start_m = tile_m * BLOCK_M
            m_valid = start_m + offs_m < q_len
            q = _load_rows(Q, q_first + start_m, offs_m, m_valid, stride_qt, head * stride_qh, offs_d, d_valid)
            do = _load_rows(DO, q_first + start_m, offs_m, m_valid, stride_dot, head * stride_doh, offs_d, d_valid)
            # Rows past the sample load lse = +inf (probability 0) and delta = 0.
            lse = tl.load(Lse + head * stride_lse_h + q_first + start_m + offs_m, mask=m_valid, other=float("inf"))
            delta = tl.load(Delta + head * stride_lse_h + q_first + start_m + offs_m, mask=m_valid, other=0.0)
            # Transposed scores (keys x queries): no transpose of p or ds is needed below.
            p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
            if (full == 0) | (start_m + BLOCK_M > q_len):
                q_kind, q_group, q_order = _load_meta(MetaQ, stride_meta_q, q_first + start_m, offs_m, m_valid)
                visible = _mask_rule(POLICY, q_kind[None, :], q_group[None, :], q_order[None, :],
                                     k_kind[:, None], k_group[:, None], k_order[:, None])
                p_t = tl.where(visible & m_valid[None, :], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    rows = (k_first + offs_n).to(tl.int64)
    store_mask = n_valid[:, None] & d_valid[None, :]
    tl.store(DK + rows[:, None] * stride_dkt + head * stride_dkh + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + rows[:, None] * stride_dvt + head * stride_dvh + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    MetaQ, CuQ, TilesQ, MetaK, CuK, TilesK,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    stride_lse_h, stride_meta_q, stride_meta_k, num_q_tiles, num_k_tiles, qk_scale, scale, head_dim,
    POLICY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile_m = tl.program_id(0)
    head = tl.program_id(1)
    sample = tl.program_id(2)
    q_first = tl.load(CuQ + sample)
    q_len = tl.load(CuQ + sample + 1) - q_first
    if tile_m * BLOCK_M >= q_len:
        return
    k_first = tl.load(CuK + sample)
    k_len = tl.load(CuK + sample + 1) - k_first

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    d_valid = offs_d < head_dim
    q = _load_rows(Q, q_first, offs_m, m_valid, stride_qt, head * stride_qh, offs_d, d_valid)
    do = _load_rows(DO, q_first, offs_m, m_valid, stride_dot, head * stride_doh, offs_d, d_valid)
    lse = tl.load(Lse + head * stride_lse_h + q_first + offs_m, mask=m_valid, other=float("inf"))
    delta = tl.load(Delta + head * stride_lse_h + q_first + offs_m, mask=m_valid, other=0.0)
    q_kind, q_group, q_order = _load_meta(MetaQ, stride_meta_q, q_first, offs_m, m_valid)
    q_omin, q_omax, q_gmin, q_gmax, q_anyv, q_allv = _load_summary(TilesQ, sample, tile_m, num_q_tiles)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for tile_n in range(0, tl.cdiv(k_len, BLOCK_N)):
        k_omin, k_omax, k_gmin, k_gmax, k_anyv, k_allv = _load_summary(TilesK, sample, tile_n, num_k_tiles)
        skip, full = _tile_visibility(POLICY, q_omin, q_omax, q_gmin, q_gmax, q_anyv, q_allv,
                                      k_omin, k_omax, k_gmin, k_gmax, k_anyv, k_allv)
        if skip == 0:
            start_n = tile_n * BLOCK_N
            n_valid = start_n + offs_n < k_len
            k = _load_rows(K, k_first + start_n, offs_n, n_valid, stride_kt, head * stride_kh, offs_d, d_valid)
            v = _load_rows(V, k_first + start_n, offs_n, n_valid, stride_vt, head * stride_vh, offs_d, d_valid)
            p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
            if (full == 0) | (start_n + BLOCK_N > k_len):
                k_kind, k_group, k_order = _load_meta(MetaK, stride_meta_k, k_first + start_n, offs_n, n_valid)
                visible = _mask_rule(POLICY, q_kind[:, None], q_group[:, None], q_order[:, None],
                                     k_kind[None, :], k_group[None, :], k_order[None, :])
                p = tl.where(visible & n_valid[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    rows = (q_first + offs_m).to(tl.int64)
    tl.store(DQ + rows[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])


# ------------------------------------------------------------------------------ tile summaries


def tile_summaries(meta: AttentionMeta, block: int) -> Tensor:
    """Summaries of every tile of ``block`` tokens of every sample, for the skip test.

    Returns (B, ceil(max_seqlen / block), 6) int32 with the columns of ``SUMMARY_FIELDS``: min and
    max order, min and max group, whether any / all of the tile's tokens are vision (0 or 1).
    Tiles past a sample's end hold meaningless values (the kernel never reads them).
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


class TileStats(NamedTuple):
    """Counts of (query tile, key tile) pairs within samples, as the kernel would treat them."""

    total: int
    executed: int  # not skipped
    unmasked: int  # executed with no per-element mask (fully visible by rule)

    @property
    def executed_fraction(self) -> float:
        return self.executed / self.total if self.total else 0.0


def tile_plan(meta_q: AttentionMeta, meta_k: AttentionMeta, policy: str, block_m: int, block_n: int
              ) -> list[tuple[Tensor, Tensor]]:
    """Per sample, (skip, full): (query tiles, key tiles) boolean grids of the kernel's tile test.

    The kernel runs a full tile without mask work only when it also holds ``block_n`` keys.
    """
    code = _policy_code(policy)
    tiles_q, tiles_k = tile_summaries(meta_q, block_m), tile_summaries(meta_k, block_n)
    plan = []
    for b, (len_q, len_k) in enumerate(zip(meta_q.seqlens().tolist(), meta_k.seqlens().tolist())):
        sq = tiles_q[b, : triton.cdiv(len_q, block_m), :, None]  # (tiles_q, 6, 1)
        sk = tiles_k[b, None, : triton.cdiv(len_k, block_n), :].transpose(1, 2)  # (1, 6, tiles_k)
        plan.append(_tile_visibility.fn(code, *sq.unbind(1), *sk.unbind(1)))
    return plan


def tile_stats(meta_q: AttentionMeta, meta_k: AttentionMeta, policy: str,
               block_m: int = 64, block_n: int = 64) -> TileStats:
    """How many tile pairs the kernel executes for a layout (for benchmarks and tuning).

    >>> from qfusion.layout import pack
    >>> meta = pack([128], [[20, 12, 12]], m=44, n=20, policy="grouped").meta  # 8 tiles of 32
    >>> tile_stats(meta, meta, "causal", 32, 32)
    TileStats(total=64, executed=36, unmasked=28)
    >>> stats = tile_stats(meta, meta, "grouped", 32, 32)  # + vision-vision, - group 2 vs group 1
    >>> stats, round(stats.executed_fraction, 3)
    (TileStats(total=64, executed=41, unmasked=37), 0.641)
    """
    total = executed = unmasked = 0
    for skip, full in tile_plan(meta_q, meta_k, policy, block_m, block_n):
        total += skip.numel()
        executed += int((~skip).sum())
        unmasked += int((full & ~skip).sum())
    return TileStats(total, executed, unmasked)


# ---------------------------------------------------------------------------------- custom ops


def _policy_code(policy: str) -> int:
    if policy not in POLICY_CODES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    return POLICY_CODES[policy]


def _precision(dtype: torch.dtype) -> str:
    # float32 follows PyTorch's matmul setting: exact products unless TF32 is allowed.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _launch_options(q: Tensor) -> dict:
    return {} if not q.is_cuda else {"num_warps": 4, "num_stages": 2}


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("qfusion::fusion_attention_fwd", mutates_args=())
def fusion_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    meta_q: Tensor, cu_seqlens_q: Tensor, tiles_q: Tensor,
    meta_k: Tensor, cu_seqlens_k: Tensor, tiles_k: Tensor,
    policy: str, scale: float, block_m: int, block_n: int,
) -> tuple[Tensor, Tensor]:
    """Forward kernel. q: (Tq, H, D), k, v: (Tk, H, D); meta_*: (3, T) int32 kind/group/order.

    cu_seqlens_*: (B + 1,) int32 offsets; tiles_*: :func:`tile_summaries` of each side for tiles of
    block_m queries / block_n keys (their second dimension sizes the grids).
    Returns out (Tq, H, D) and the base-2 log-sum-exp (H, Tq) float32 (+inf where a row sees nothing).
    """
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    num_tokens, heads, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((heads, num_tokens), dtype=torch.float32, device=q.device)
    samples = cu_seqlens_q.numel() - 1
    if num_tokens == 0 or samples == 0:
        return out, lse
    grid = (tiles_q.shape[1], heads, samples)
    _fwd_kernel[grid](
        q, k, v, out, lse, meta_q, cu_seqlens_q, tiles_q, meta_k, cu_seqlens_k, tiles_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), meta_q.stride(0), meta_k.stride(0),
        tiles_q.shape[1], tiles_k.shape[1], scale * _LOG2E, head_dim,
        POLICY=_policy_code(policy), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PRECISION=_precision(q.dtype),
        **_launch_options(q),
    )
    return out, lse


@fusion_attention_fwd.register_fake
def _(q, k, v, meta_q, cu_seqlens_q, tiles_q, meta_k, cu_seqlens_k, tiles_k, policy, scale, block_m, block_n):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("qfusion::fusion_attention_bwd", mutates_args=())
def fusion_attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    meta_q: Tensor, cu_seqlens_q: Tensor, tiles_q: Tensor,
    meta_k: Tensor, cu_seqlens_k: Tensor, tiles_k: Tensor,
    policy: str, scale: float, block_m: int, block_n: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward kernels: dq (Tq, H, D), dk, dv (Tk, H, D) from grad_out and the forward's out, lse."""
    grad_out, q, k, v = (_last_dim_contiguous(x) for x in (grad_out, q, k, v))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    samples = cu_seqlens_q.numel() - 1
    if samples == 0 or q.shape[0] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    _, heads, head_dim = q.shape
    # delta = rowsum(dO * O), laid out like lse: (H, Tq).
    delta = torch.einsum("thd,thd->ht", grad_out.float(), out.float()).contiguous()
    common = dict(
        POLICY=_policy_code(policy), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PRECISION=_precision(q.dtype),
        **_launch_options(q),
    )
    metas = (meta_q, cu_seqlens_q, tiles_q, meta_k, cu_seqlens_k, tiles_k)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               grad_out.stride(0), grad_out.stride(1))
    tail = (lse.stride(0), meta_q.stride(0), meta_k.stride(0), tiles_q.shape[1], tiles_k.shape[1],
            scale * _LOG2E, scale, head_dim)
    if k.shape[0] > 0:
        _bwd_dkdv_kernel[(tiles_k.shape[1], heads, samples)](
            q, k, v, grad_out, lse, delta, dk, dv, *metas, *strides,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *tail, **common,
        )
    _bwd_dq_kernel[(tiles_q.shape[1], heads, samples)](
        q, k, v, grad_out, lse, delta, dq, *metas, *strides, dq.stride(0), dq.stride(1), *tail, **common,
    )
    return dq, dk, dv


@fusion_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, meta_q, cu_seqlens_q, tiles_q, meta_k, cu_seqlens_k, tiles_k,
      policy, scale, block_m, block_n):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, meta_q, cu_q, tiles_q, meta_k, cu_k, tiles_k, policy, scale, block_m, block_n = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, meta_q, cu_q, tiles_q, meta_k, cu_k, tiles_k)
    ctx.args = (policy, scale, block_m, block_n)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, *metas = ctx.saved_tensors
    dq, dk, dv = fusion_attention_bwd(grad_out, q, k, v, out, lse, *metas, *ctx.args)
    return (dq, dk, dv) + (None,) * 10


fusion_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------- entry point

_kernel_metas: "weakref.WeakKeyDictionary[AttentionMeta, dict]" = weakref.WeakKeyDictionary()


def _kernel_meta(meta: AttentionMeta, block: int) -> tuple[Tensor, Tensor]:
    """(3, T) int32 kind/group/order and the tile summaries of ``meta``; cached per meta in eager mode."""
    if torch.compiler.is_compiling():
        return torch.stack([meta.kind, meta.group, meta.order]), tile_summaries(meta, block)
    cached = _kernel_metas.setdefault(meta, {})
    if "stacked" not in cached:
        cached["stacked"] = torch.stack([meta.kind, meta.group, meta.order])
    if block not in cached:
        cached[block] = tile_summaries(meta, block)
    return cached["stacked"], cached[block]


def default_blocks(head_dim: int, dtype: torch.dtype, *, interpreter: bool = False) -> tuple[int, int]:
    """(block_m, block_n): query and key tile sizes (shared by the three kernels) for these inputs."""
    if interpreter:
        return 32, 32  # few, small tiles: the interpreter pays per tile step
    padded = triton.next_power_of_2(head_dim)
    if dtype == torch.float32:
        return (64, 64) if padded <= 64 else (64, 32) if padded <= 128 else (32, 32)
    return (128, 64) if padded <= 64 else (64, 64) if padded <= 128 else (64, 32)


def _validate(q: Tensor, k: Tensor, v: Tensor, meta_q: AttentionMeta, meta_k: AttentionMeta,
              policy: str, block_m: int, block_n: int) -> None:
    from qfusion.ops.attention import _check_inputs, _triton_usable

    _policy_code(policy)
    _check_inputs(q, k, v, meta_q, meta_k)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in DTYPES:
            raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {x.dtype}")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head dim between 1 and {MAX_HEAD_DIM}, got {q.shape[-1]}")
    reason = _triton_usable(q)
    if reason is not None:
        raise RuntimeError(f"q: {reason}, got device {q.device}")
    for side, meta in (("meta_q", meta_q), ("meta_k", meta_k)):
        for field in ("kind", "group", "order", "cu_seqlens"):
            t = getattr(meta, field)
            if t.dtype != torch.int32 or t.device != q.device:
                raise TypeError(f"{side}.{field}: expected int32 on {q.device}, got {t.dtype} on {t.device}")
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name}: expected a power of two >= 16, got {block}")


def triton_fusion_attention(q: Tensor, k: Tensor, v: Tensor, meta_q: AttentionMeta, meta_k: AttentionMeta,
                            *, policy: str, scale: float | None = None,
                            block_m: int | None = None, block_n: int | None = None) -> Tensor:
    """Masked attention of packed queries over packed keys with the fused Triton kernel.

    q: (Tq, H, D); k, v: (Tk, H, D); float16, bfloat16 or float32, D <= 256 (padded to a power of
    two in the kernel). meta_q, meta_k: metadata of each side, int32 on q's device, treated as
    immutable (tile summaries are cached per meta). policy: "causal", "prefix" or "grouped".
    scale: softmax scale, default 1/sqrt(D). block_m, block_n: query / key tile sizes (powers of two
    >= 16), default :func:`default_blocks`.

    Returns (Tq, H, D); differentiable in q, k and v.
    """
    default_m, default_n = default_blocks(q.shape[-1], q.dtype, interpreter=not q.is_cuda)
    block_m, block_n = block_m or default_m, block_n or default_n
    _validate(q, k, v, meta_q, meta_k, policy, block_m, block_n)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    stacked_q, tiles_q = _kernel_meta(meta_q, block_m)
    stacked_k, tiles_k = _kernel_meta(meta_k, block_n)
    out, _ = fusion_attention_fwd(
        q, k, v, stacked_q, meta_q.cu_seqlens, tiles_q, stacked_k, meta_k.cu_seqlens, tiles_k,
        policy, scale, block_m, block_n,
    )
    return out

"""The fused block-sparse attention kernel over packed varlen sequences, forward and backward.

FlashAttention-2 in Triton, with the mask given as the rule of :func:`qfusion.layout.mask_rule`;
no mask is ever stored. Samples are runs of the packed tensors delimited by ``cu_seqlens_q`` /
``cu_seqlens_k`` (they differ for an incremental ``ask``).

Tile lists. Every tile of every sample is summarised by six integers (min/max order, min/max
group, any/all vision); from two summaries :func:`_tile_visibility` classifies a (query tile, key
tile) pair as skipped (the rule masks every pair), full (the rule shows every pair and both tiles
are complete) or partial. :func:`tile_lists` turns the classes into, per query tile, the key tiles
to visit, full ones and partial ones apart, with their counts (and the transposed lists per key
tile for the dK/dV pass) — on the device, by a stable sort of the classes, with no host
synchronisation; they are cached per :class:`~qfusion.layout.AttentionMeta` pair. A kernel runs
the full tiles in a loop with no mask code and the partial tiles in a loop that evaluates the
rule; no data-dependent branch surrounds a load, so Triton software-pipelines both loops.

Passes: the forward and the dQ pass run one program per (query tile, head, sample), the last query
tiles (which see the most keys under the causal rules) launched first; the dK/dV pass one per
(key tile, head, sample); a small kernel computes ``delta = rowsum(dO * O)``. Each pass has its
own tile sizes, warps and stages (:mod:`qfusion.ops.kernel_configs`).

Softmax runs online in float32 with base-2 exponentials; the log-sum-exp of each row (base 2) is
kept for the backward. A row that sees no key gets output 0 and log-sum-exp +inf, so its gradients
are 0 and nothing is NaN. float32 dots follow PyTorch's matmul precision: exact (``ieee``) under
the default "highest", TF32 tensor cores only when the user allows them. The kernels are
``torch.library`` custom ops (``qfusion::fusion_attention_fwd`` / ``qfusion::fusion_attention_bwd``)
with fake implementations and a registered autograd formula, so ``torch.compile`` traces through
them.
"""

from __future__ import annotations

import math
import time
import weakref
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from qfusion.layout import POLICIES, VISION, AttentionMeta
from qfusion.ops.kernel_configs import KernelConfig, candidates, select_config

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
POLICY_CODES = {"causal": 0, "prefix": 1, "grouped": 2}
SUMMARY_FIELDS = ("order_min", "order_max", "group_min", "group_max", "any_vision", "all_vision")
SKIP, PARTIAL, FULL = 0, 1, 2
"""Tile-pair classes of :func:`tile_classes`."""

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
def _load_meta(meta, stride_field, first, offs, valid):
    """kind, group, order of tokens first + offs of a (3, T) metadata tensor."""
    kind = tl.load(meta + first + offs, mask=valid, other=0)
    group = tl.load(meta + stride_field + first + offs, mask=valid, other=0)
    order = tl.load(meta + 2 * stride_field + first + offs, mask=valid, other=0)
    return kind, group, order


@triton.jit
def _tile_ptrs(base, rows, stride_t, head_offset, BLOCK_D: tl.constexpr):
    return base + rows.to(tl.int64)[:, None] * stride_t + head_offset + tl.arange(0, BLOCK_D)[None, :]


@triton.jit
def _load_tile(ptrs, row_valid, ROWS_MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (rows, BLOCK_D) tile; masks only where rows may leave the sample or D is padded."""
    d_valid = tl.arange(0, BLOCK_D) < HEAD_DIM
    if ROWS_MASKED:
        if HEAD_DIM == BLOCK_D:
            return tl.load(ptrs, mask=row_valid[:, None], other=0.0)
        return tl.load(ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if HEAD_DIM == BLOCK_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=d_valid[None, :], other=0.0)


@triton.jit
def _store_tile(ptrs, value, row_valid, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    d_valid = tl.arange(0, BLOCK_D) < HEAD_DIM
    tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


@triton.jit
def _fwd_loop(acc, l_i, m_i, q, q_kind, q_group, q_order,
              K, V, MetaK, stride_kt, stride_vt, k_head, v_head, stride_meta_k, k_first, k_len,
              Indices, count, qk_scale,
              POLICY: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over the ``count`` key tiles listed at ``Indices`` (MASKED: apply the rule)."""
    offs_n = tl.arange(0, BLOCK_N)
    # The next tile's index is read one iteration ahead, so the K / V addresses are loop-carried
    # and the pipeliner can issue their copies stages early (the list always has an entry 0).
    start_n = tl.load(Indices) * BLOCK_N
    for j in range(0, count):
        n_valid = start_n + offs_n < k_len
        k = _load_tile(_tile_ptrs(K, k_first + start_n + offs_n, stride_kt, k_head, BLOCK_D), n_valid,
                       MASKED, HEAD_DIM, BLOCK_D)
        v = _load_tile(_tile_ptrs(V, k_first + start_n + offs_n, stride_vt, v_head, BLOCK_D), n_valid,
                       MASKED, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            k_kind, k_group, k_order = _load_meta(MetaK, stride_meta_k, k_first + start_n, offs_n, n_valid)
            visible = _mask_rule(POLICY, q_kind[:, None], q_group[:, None], q_order[:, None],
                                 k_kind[None, :], k_group[None, :], k_order[None, :])
            s = tl.where(visible & n_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows that have seen no key yet keep m = -inf; subtract 0 there instead of -inf.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
        start_n = tl.load(Indices + tl.minimum(j + 1, count - 1)) * BLOCK_N
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse,
    MetaQ, CuQ, MetaK, CuK, FullNum, FullIdx, PartNum, PartIdx,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_lse_h, stride_meta_q, stride_meta_k, num_q_tiles, num_k_tiles, qk_scale,
    POLICY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    # Later query tiles see more keys under the causal rules: launch them first.
    tile_m = num_q_tiles - 1 - tl.program_id(0)
    head = tl.program_id(1)
    sample = tl.program_id(2)
    q_first = tl.load(CuQ + sample)
    q_len = tl.load(CuQ + sample + 1) - q_first
    if tile_m * BLOCK_M >= q_len:
        return
    k_first = tl.load(CuK + sample)
    k_len = tl.load(CuK + sample + 1) - k_first

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < q_len
    q = _load_tile(_tile_ptrs(Q, q_first + offs_m, stride_qt, head * stride_qh, BLOCK_D), m_valid,
                   True, HEAD_DIM, BLOCK_D)
    q_kind, q_group, q_order = _load_meta(MetaQ, stride_meta_q, q_first, offs_m, m_valid)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row = sample * num_q_tiles + tile_m
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, q_kind, q_group, q_order, K, V, MetaK,
                              stride_kt, stride_vt, head * stride_kh, head * stride_vh, stride_meta_k,
                              k_first, k_len, FullIdx + row * num_k_tiles, tl.load(FullNum + row), qk_scale,
                              POLICY, False, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)
    acc, l_i, m_i = _fwd_loop(acc, l_i, m_i, q, q_kind, q_group, q_order, K, V, MetaK,
                              stride_kt, stride_vt, head * stride_kh, head * stride_vh, stride_meta_k,
                              k_first, k_len, PartIdx + row * num_k_tiles, tl.load(PartNum + row), qk_scale,
                              POLICY, True, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    _store_tile(_tile_ptrs(Out, q_first + offs_m, stride_ot, head * stride_oh, BLOCK_D), out, m_valid,
                HEAD_DIM, BLOCK_D)
    # +inf for rows that saw nothing: their probabilities exp2(s - lse) are 0 in the backward.
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(Lse + head * stride_lse_h + q_first + offs_m, lse, mask=m_valid)


@triton.jit
def _bwd_delta_kernel(Out, DO, Delta, stride_ot, stride_oh, stride_dot, stride_doh, stride_delta_h, num_tokens,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """delta = rowsum(dO * O) in float32, laid out like the log-sum-exp: (H, T)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    valid = offs_m < num_tokens
    o = _load_tile(_tile_ptrs(Out, offs_m, stride_ot, head * stride_oh, BLOCK_D), valid, True, HEAD_DIM, BLOCK_D)
    do = _load_tile(_tile_ptrs(DO, offs_m, stride_dot, head * stride_doh, BLOCK_D), valid, True, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + head * stride_delta_h + offs_m, delta, mask=valid)


@triton.jit
def _dkdv_loop(dk, dv, k, v, k_kind, k_group, k_order,
               Q, DO, Lse, Delta, MetaQ, stride_qt, stride_dot, q_head, do_head, lse_head, stride_meta_q,
               q_first, q_len, Indices, count, qk_scale,
               POLICY: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV contributions of the ``count`` query tiles listed at ``Indices``."""
    offs_m = tl.arange(0, BLOCK_M)
    start_m = tl.load(Indices) * BLOCK_M  # read one iteration ahead, as in _fwd_loop
    for j in range(0, count):
        m_valid = start_m + offs_m < q_len
        q = _load_tile(_tile_ptrs(Q, q_first + start_m + offs_m, stride_qt, q_head, BLOCK_D), m_valid,
                       MASKED, HEAD_DIM, BLOCK_D)
        do = _load_tile(_tile_ptrs(DO, q_first + start_m + offs_m, stride_dot, do_head, BLOCK_D), m_valid,
                        MASKED, HEAD_DIM, BLOCK_D)
        if MASKED:
            # Rows past the sample load lse = +inf (probability 0) and delta = 0.
            lse = tl.load(Lse + lse_head + q_first + start_m + offs_m, mask=m_valid, other=float("inf"))
            delta = tl.load(Delta + lse_head + q_first + start_m + offs_m, mask=m_valid, other=0.0)
        else:
            lse = tl.load(Lse + lse_head + q_first + start_m + offs_m)
            delta = tl.load(Delta + lse_head + q_first + start_m + offs_m)
        # Transposed scores (keys x queries): no transpose of p or ds is needed below.
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            q_kind, q_group, q_order = _load_meta(MetaQ, stride_meta_q, q_first + start_m, offs_m, m_valid)
            visible = _mask_rule(POLICY, q_kind[None, :], q_group[None, :], q_order[None, :],
                                 k_kind[:, None], k_group[:, None], k_order[:, None])
            p_t = tl.where(visible & m_valid[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        start_m = tl.load(Indices + tl.minimum(j + 1, count - 1)) * BLOCK_M
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    MetaQ, CuQ, MetaK, CuK, FullNum, FullIdx, PartNum, PartIdx,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    stride_lse_h, stride_meta_q, stride_meta_k, num_q_tiles, num_k_tiles, qk_scale, scale,
    POLICY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    # The first key tiles are seen by the most queries under the causal rules: launched first.
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
    n_valid = offs_n < k_len
    k = _load_tile(_tile_ptrs(K, k_first + offs_n, stride_kt, head * stride_kh, BLOCK_D), n_valid,
                   True, HEAD_DIM, BLOCK_D)
    v = _load_tile(_tile_ptrs(V, k_first + offs_n, stride_vt, head * stride_vh, BLOCK_D), n_valid,
                   True, HEAD_DIM, BLOCK_D)
    k_kind, k_group, k_order = _load_meta(MetaK, stride_meta_k, k_first, offs_n, n_valid)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    row = sample * num_k_tiles + tile_n
    dk, dv = _dkdv_loop(dk, dv, k, v, k_kind, k_group, k_order, Q, DO, Lse, Delta, MetaQ,
                        stride_qt, stride_dot, head * stride_qh, head * stride_doh, head * stride_lse_h,
                        stride_meta_q, q_first, q_len, FullIdx + row * num_q_tiles, tl.load(FullNum + row),
                        qk_scale, POLICY, False, BLOCK_M, BLOCK_D, HEAD_DIM, PRECISION)
    dk, dv = _dkdv_loop(dk, dv, k, v, k_kind, k_group, k_order, Q, DO, Lse, Delta, MetaQ,
                        stride_qt, stride_dot, head * stride_qh, head * stride_doh, head * stride_lse_h,
                        stride_meta_q, q_first, q_len, PartIdx + row * num_q_tiles, tl.load(PartNum + row),
                        qk_scale, POLICY, True, BLOCK_M, BLOCK_D, HEAD_DIM, PRECISION)

    _store_tile(_tile_ptrs(DK, k_first + offs_n, stride_dkt, head * stride_dkh, BLOCK_D), dk * scale, n_valid,
                HEAD_DIM, BLOCK_D)
    _store_tile(_tile_ptrs(DV, k_first + offs_n, stride_dvt, head * stride_dvh, BLOCK_D), dv, n_valid,
                HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_loop(dq, q, do, lse, delta, q_kind, q_group, q_order,
             K, V, MetaK, stride_kt, stride_vt, k_head, v_head, stride_meta_k, k_first, k_len,
             Indices, count, qk_scale,
             POLICY: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """dQ contributions of the ``count`` key tiles listed at ``Indices``."""
    offs_n = tl.arange(0, BLOCK_N)
    start_n = tl.load(Indices) * BLOCK_N  # read one iteration ahead, as in _fwd_loop
    for j in range(0, count):
        n_valid = start_n + offs_n < k_len
        k = _load_tile(_tile_ptrs(K, k_first + start_n + offs_n, stride_kt, k_head, BLOCK_D), n_valid,
                       MASKED, HEAD_DIM, BLOCK_D)
        v = _load_tile(_tile_ptrs(V, k_first + start_n + offs_n, stride_vt, v_head, BLOCK_D), n_valid,
                       MASKED, HEAD_DIM, BLOCK_D)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            k_kind, k_group, k_order = _load_meta(MetaK, stride_meta_k, k_first + start_n, offs_n, n_valid)
            visible = _mask_rule(POLICY, q_kind[:, None], q_group[:, None], q_order[:, None],
                                 k_kind[None, :], k_group[None, :], k_order[None, :])
            p = tl.where(visible & n_valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        start_n = tl.load(Indices + tl.minimum(j + 1, count - 1)) * BLOCK_N
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    MetaQ, CuQ, MetaK, CuK, FullNum, FullIdx, PartNum, PartIdx,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    stride_lse_h, stride_meta_q, stride_meta_k, num_q_tiles, num_k_tiles, qk_scale, scale,
    POLICY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    tile_m = num_q_tiles - 1 - tl.program_id(0)
    head = tl.program_id(1)
    sample = tl.program_id(2)
    q_first = tl.load(CuQ + sample)
    q_len = tl.load(CuQ + sample + 1) - q_first
    if tile_m * BLOCK_M >= q_len:
        return
    k_first = tl.load(CuK + sample)
    k_len = tl.load(CuK + sample + 1) - k_first

    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = offs_m < q_len
    q = _load_tile(_tile_ptrs(Q, q_first + offs_m, stride_qt, head * stride_qh, BLOCK_D), m_valid,
                   True, HEAD_DIM, BLOCK_D)
    do = _load_tile(_tile_ptrs(DO, q_first + offs_m, stride_dot, head * stride_doh, BLOCK_D), m_valid,
                    True, HEAD_DIM, BLOCK_D)
    lse = tl.load(Lse + head * stride_lse_h + q_first + offs_m, mask=m_valid, other=float("inf"))
    delta = tl.load(Delta + head * stride_lse_h + q_first + offs_m, mask=m_valid, other=0.0)
    q_kind, q_group, q_order = _load_meta(MetaQ, stride_meta_q, q_first, offs_m, m_valid)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row = sample * num_q_tiles + tile_m
    dq = _dq_loop(dq, q, do, lse, delta, q_kind, q_group, q_order, K, V, MetaK, stride_kt, stride_vt,
                  head * stride_kh, head * stride_vh, stride_meta_k, k_first, k_len,
                  FullIdx + row * num_k_tiles, tl.load(FullNum + row), qk_scale,
                  POLICY, False, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)
    dq = _dq_loop(dq, q, do, lse, delta, q_kind, q_group, q_order, K, V, MetaK, stride_kt, stride_vt,
                  head * stride_kh, head * stride_vh, stride_meta_k, k_first, k_len,
                  PartIdx + row * num_k_tiles, tl.load(PartNum + row), qk_scale,
                  POLICY, True, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)
    _store_tile(_tile_ptrs(DQ, q_first + offs_m, stride_dqt, head * stride_dqh, BLOCK_D), dq * scale, m_valid,
                HEAD_DIM, BLOCK_D)


# ------------------------------------------------------------------------------ tile lists


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
    code = _policy_code(policy)
    summary_q, summary_k = tile_summaries(meta_q, block_m), tile_summaries(meta_k, block_n)
    skip, full = _tile_visibility.fn(code, *summary_q[:, :, None, :].unbind(-1), *summary_k[:, None, :, :].unbind(-1))
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


def block_d(head_dim: int) -> int:
    """The head dim padded to a power of two >= 16 (the kernel's tile width)."""
    return max(16, triton.next_power_of_2(head_dim))


def _launch(q: Tensor, pass_config) -> dict:
    # The interpreter takes no launch options.
    return {"num_warps": pass_config.num_warps, "num_stages": pass_config.num_stages} if q.is_cuda else {}


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("qfusion::fusion_attention_fwd", mutates_args=())
def fusion_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor,
    meta_q: Tensor, cu_seqlens_q: Tensor, meta_k: Tensor, cu_seqlens_k: Tensor,
    plan: list[Tensor], policy: str, scale: float, config: list[int],
) -> tuple[Tensor, Tensor]:
    """Forward kernel. q: (Tq, H, D), k, v: (Tk, H, D); meta_*: (3, T) int32 kind/group/order.

    cu_seqlens_*: (B + 1,) int32 offsets; plan: :meth:`TilePlan.tensors` (12 tensors, the three
    passes' :class:`TileLists`); config: :meth:`KernelConfig.as_ints`.
    Returns out (Tq, H, D) and the base-2 log-sum-exp (H, Tq) float32 (+inf where a row sees nothing).
    """
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    num_tokens, heads, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((heads, num_tokens), dtype=torch.float32, device=q.device)
    samples = cu_seqlens_q.numel() - 1
    if num_tokens == 0 or samples == 0:
        return out, lse
    fwd = KernelConfig.from_ints(config).fwd
    full_num, full_idx, part_num, part_idx = plan[0:4]
    num_q_tiles, num_k_tiles = full_idx.shape[1:]
    _fwd_kernel[(num_q_tiles, heads, samples)](
        q, k, v, out, lse, meta_q, cu_seqlens_q, meta_k, cu_seqlens_k, full_num, full_idx, part_num, part_idx,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), meta_q.stride(0), meta_k.stride(0),
        num_q_tiles, num_k_tiles, scale * _LOG2E,
        POLICY=_policy_code(policy), BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n, BLOCK_D=block_d(head_dim),
        HEAD_DIM=head_dim, PRECISION=_precision(q.dtype), **_launch(q, fwd),
    )
    return out, lse


@fusion_attention_fwd.register_fake
def _(q, k, v, meta_q, cu_seqlens_q, meta_k, cu_seqlens_k, plan, policy, scale, config):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("qfusion::fusion_attention_bwd", mutates_args=())
def fusion_attention_bwd(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    meta_q: Tensor, cu_seqlens_q: Tensor, meta_k: Tensor, cu_seqlens_k: Tensor,
    plan: list[Tensor], policy: str, scale: float, config: list[int],
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward kernels: dq (Tq, H, D), dk, dv (Tk, H, D) from grad_out and the forward's out, lse."""
    grad_out, q, k, v, out = (_last_dim_contiguous(x) for x in (grad_out, q, k, v, out))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    samples = cu_seqlens_q.numel() - 1
    if samples == 0 or q.shape[0] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    num_tokens, heads, head_dim = q.shape
    cfg = KernelConfig.from_ints(config)
    shapes = dict(POLICY=_policy_code(policy), BLOCK_D=block_d(head_dim), HEAD_DIM=head_dim,
                  PRECISION=_precision(q.dtype))
    delta = torch.empty((heads, num_tokens), dtype=torch.float32, device=q.device)
    delta_rows = 64
    _bwd_delta_kernel[(triton.cdiv(num_tokens, delta_rows), heads)](
        out, grad_out, delta, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
        delta.stride(0), num_tokens, BLOCK_M=delta_rows, BLOCK_D=block_d(head_dim), HEAD_DIM=head_dim,
        **_launch(q, cfg.fwd),
    )
    metas = (meta_q, cu_seqlens_q, meta_k, cu_seqlens_k)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               grad_out.stride(0), grad_out.stride(1))
    tail = (lse.stride(0), meta_q.stride(0), meta_k.stride(0))
    dkdv_lists, dq_lists = plan[4:8], plan[8:12]
    if k.shape[0] > 0:
        num_k_tiles, num_q_tiles = dkdv_lists[1].shape[1:]
        _bwd_dkdv_kernel[(num_k_tiles, heads, samples)](
            q, k, v, grad_out, lse, delta, dk, dv, *metas, *dkdv_lists, *strides,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *tail, num_q_tiles, num_k_tiles,
            scale * _LOG2E, scale, BLOCK_M=cfg.dkdv.block_m, BLOCK_N=cfg.dkdv.block_n, **shapes,
            **_launch(q, cfg.dkdv),
        )
    num_q_tiles, num_k_tiles = dq_lists[1].shape[1:]
    _bwd_dq_kernel[(num_q_tiles, heads, samples)](
        q, k, v, grad_out, lse, delta, dq, *metas, *dq_lists, *strides, dq.stride(0), dq.stride(1),
        *tail, num_q_tiles, num_k_tiles, scale * _LOG2E, scale,
        BLOCK_M=cfg.dq.block_m, BLOCK_N=cfg.dq.block_n, **shapes, **_launch(q, cfg.dq),
    )
    return dq, dk, dv


@fusion_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, meta_q, cu_seqlens_q, meta_k, cu_seqlens_k, plan, policy, scale, config):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, meta_q, cu_q, meta_k, cu_k, plan, policy, scale, config = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.num_plan = len(plan)
    ctx.save_for_backward(q, k, v, out, lse, meta_q, cu_q, meta_k, cu_k, *plan)
    ctx.args = (policy, scale, config)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, meta_q, cu_q, meta_k, cu_k, *plan = ctx.saved_tensors
    dq, dk, dv = fusion_attention_bwd(grad_out, q, k, v, out, lse, meta_q, cu_q, meta_k, cu_k, plan, *ctx.args)
    # One None per non-differentiable input, a list of them for the plan.
    return dq, dk, dv, None, None, None, None, [None] * ctx.num_plan, None, None, None


fusion_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------- entry point

_stacked: "weakref.WeakKeyDictionary[AttentionMeta, Tensor]" = weakref.WeakKeyDictionary()
_plans: "weakref.WeakKeyDictionary[AttentionMeta, dict]" = weakref.WeakKeyDictionary()


def _stacked_meta(meta: AttentionMeta) -> Tensor:
    """(3, T) int32 kind/group/order of ``meta``; cached per meta in eager mode."""
    if torch.compiler.is_compiling():
        return torch.stack([meta.kind, meta.group, meta.order])
    if meta not in _stacked:
        _stacked[meta] = torch.stack([meta.kind, meta.group, meta.order])
    return _stacked[meta]


def _plan(meta_q: AttentionMeta, meta_k: AttentionMeta, policy: str, config: KernelConfig,
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


def _capability(q: Tensor) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability(q.device) if q.is_cuda else None


def default_config(q: Tensor) -> KernelConfig:
    """The kernel config for q's device, dtype and head dim (:func:`~qfusion.ops.kernel_configs.select_config`)."""
    return select_config(_capability(q), q.dtype, q.shape[-1])


_tuned: dict[tuple, dict] = {}


def _default_measure(fn: Callable[[], None], cuda: bool) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=25))
    fn()  # the first call builds the tile lists
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def autotune(q: Tensor, k: Tensor, v: Tensor, meta_q: AttentionMeta, meta_k: AttentionMeta, *, policy: str,
             measure: Callable[[Callable[[], None]], float] | None = None) -> KernelConfig:
    """The fastest of :func:`~qfusion.ops.kernel_configs.candidates` on inputs like these.

    Times forward + backward of each candidate (forward only when no input requires grad); a
    candidate that fails to compile or launch is skipped. The choice is cached per (device
    capability, dtype, head dim, policy, token counts rounded up to powers of two, backward) and
    listed by :func:`tuned_configs` for benchmark records. Triton's own ``triton.autotune`` cannot
    do this: the tile sizes also decide the tile lists, which are built outside the kernel.
    measure: milliseconds of a callable (default ``triton.testing.do_bench`` on CUDA).
    q: (Tq, H, D); k, v: (Tk, H, D); meta_q, meta_k, policy as in :func:`triton_fusion_attention`.
    """
    backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    key = (_capability(q), q.dtype, q.shape[-1], policy, triton.next_power_of_2(max(meta_q.num_tokens, 1)),
           triton.next_power_of_2(max(meta_k.num_tokens, 1)), backward)
    if key not in _tuned:
        measure = measure or (lambda fn: _default_measure(fn, q.is_cuda))
        inputs = [x.detach().requires_grad_(backward) for x in (q, k, v)]
        timings = []
        for config in candidates(key[0], q.dtype, q.shape[-1]):
            def step(config=config):
                out = triton_fusion_attention(*inputs, meta_q, meta_k, policy=policy, config=config)
                if backward:
                    torch.autograd.grad(out, inputs, torch.ones_like(out))

            try:
                timings.append((measure(step), config))
            except Exception as error:  # noqa: BLE001 - OutOfResources / CompilationError: not a candidate here
                timings.append((float("inf"), config, f"{type(error).__name__}: {str(error)[:200]}"))
        best = min(timings, key=lambda t: t[0])
        if not math.isfinite(best[0]):
            raise RuntimeError(f"q: no kernel config runs on these inputs: {[t[2] for t in timings]}")
        _tuned[key] = dict(config=best[1], timings=timings)
    return _tuned[key]["config"]


def tuned_configs() -> list[dict]:
    """Every choice :func:`autotune` made in this process, with the candidates' times, as plain data."""
    rows = []
    for (capability, dtype, head_dim, policy, tokens_q, tokens_k, backward), entry in _tuned.items():
        rows.append(dict(capability=capability, dtype=str(dtype).removeprefix("torch."), head_dim=head_dim,
                         policy=policy, tokens_q=tokens_q, tokens_k=tokens_k, backward=backward,
                         chosen=entry["config"].as_ints(),
                         timings_ms=[dict(config=t[1].as_ints(), ms=t[0], **({"error": t[2]} if len(t) > 2 else {}))
                                     for t in entry["timings"]]))
    return rows


def _validate(q: Tensor, k: Tensor, v: Tensor, meta_q: AttentionMeta, meta_k: AttentionMeta, policy: str) -> None:
    from qfusion.ops.attention import _check_inputs, _triton_usable, interpreter_active

    _policy_code(policy)
    _check_inputs(q, k, v, meta_q, meta_k)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in DTYPES:
            raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {x.dtype}")
    if q.dtype == torch.bfloat16 and interpreter_active():
        raise TypeError("q: bfloat16 is not supported under the Triton interpreter (TRITON_INTERPRET=1), which "
                        "computes bfloat16 dots wrongly; expected float16 or float32 there, got torch.bfloat16")
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


def triton_fusion_attention(q: Tensor, k: Tensor, v: Tensor, meta_q: AttentionMeta, meta_k: AttentionMeta,
                            *, policy: str, scale: float | None = None, block_m: int | None = None,
                            block_n: int | None = None, config: KernelConfig | str | None = None) -> Tensor:
    """Masked attention of packed queries over packed keys with the fused Triton kernel.

    q: (Tq, H, D); k, v: (Tk, H, D); float16, bfloat16 or float32 (bfloat16 not under the
    interpreter), D <= 256 (padded to a power of two in the kernel). meta_q, meta_k: metadata of
    each side, int32 on q's device, treated as immutable (tile lists are cached per meta pair).
    policy: "causal", "prefix" or "grouped". scale: softmax scale, default 1/sqrt(D).
    config: tile sizes, warps and stages of each pass, default :func:`default_config`; "autotune"
        for the fastest candidate on inputs like these (:func:`autotune`, timed once per shape bucket).
    block_m, block_n: query / key tile sizes (powers of two >= 16) for all three passes at once,
    overriding ``config``'s.

    Returns (Tq, H, D); differentiable in q, k and v.
    """
    _validate(q, k, v, meta_q, meta_k, policy)
    if isinstance(config, str):
        if config != "autotune":
            raise ValueError(f"config: expected a KernelConfig, 'autotune' or None, got {config!r}")
        config = autotune(q, k, v, meta_q, meta_k, policy=policy)
    config = config or default_config(q)
    if block_m is not None or block_n is not None:
        base = config.fwd
        config = KernelConfig.uniform(block_m or base.block_m, block_n or base.block_n, base.num_warps,
                                      base.num_stages)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    out, _ = fusion_attention_fwd(
        q, k, v, _stacked_meta(meta_q), meta_q.cu_seqlens, _stacked_meta(meta_k), meta_k.cu_seqlens,
        _plan(meta_q, meta_k, policy, config, backward).tensors(), policy, scale, config.as_ints(),
    )
    return out

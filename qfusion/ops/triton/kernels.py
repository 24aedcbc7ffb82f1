"""The jit kernels of the fused block-sparse attention: forward, and the backward's three passes.

FlashAttention-2 in Triton, with the mask given as the rule of :func:`qfusion.ops.meta.mask_rule`
(:func:`kernel_mask_rule` is its in-kernel twin); no mask is ever stored. Samples are runs of the
packed tensors delimited by ``cu_seqlens_q`` / ``cu_seqlens_k`` (they differ for an incremental
``ask``). Which key tiles a query tile visits comes from the host-side tile plan
(:mod:`qfusion.ops.triton.plan`), full tiles and partial tiles in two lists: a kernel runs the full
tiles in a loop with no mask code and the partial tiles in a loop that evaluates the rule; no
data-dependent branch surrounds a load, so Triton software-pipelines both loops.

Passes: the forward and the dQ pass run one program per (query tile, head, sample), the last query
tiles (which see the most keys under the causal rules) launched first; the dK/dV pass one per
(key tile, head, sample); a small kernel computes ``delta = rowsum(dO * O)``.

Softmax runs online in float32 with base-2 exponentials; the log-sum-exp of each row (base 2) is
kept for the backward. A row that sees no key gets output 0 and log-sum-exp +inf, so its gradients
are 0 and nothing is NaN. The launches are in :mod:`qfusion.ops.triton.op`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qfusion.ops.meta import POLICIES, VISION

POLICY_CODES = {"causal": 0, "prefix": 1, "grouped": 2}
"""The ``POLICY`` constexpr of the kernels for each mask policy."""

LOG2E = 1.4426950408889634
"""log2(e): the kernels take the softmax scale times this, for base-2 exponentials."""

_VISION = tl.constexpr(VISION)


def policy_code(policy: str) -> int:
    """The kernels' ``POLICY`` constexpr for a policy name."""
    if policy not in POLICY_CODES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    return POLICY_CODES[policy]


def block_d(head_dim: int) -> int:
    """The head dim padded to a power of two >= 16 (the kernels' tile width, ``BLOCK_D``)."""
    return max(16, triton.next_power_of_2(head_dim))


# ---------------------------------------------------------------------------------------- the rule


@triton.jit
def kernel_mask_rule(policy: tl.constexpr, q_kind, q_group, q_order, k_kind, k_group, k_order):
    """In-kernel twin of :func:`qfusion.ops.meta.mask_rule`, line for line (policy: a POLICY_CODES value)."""
    visible = k_order <= q_order
    if policy == 0:
        return visible
    both_vision = (q_kind == _VISION) & (k_kind == _VISION)
    if policy == 1:
        return visible | both_vision
    # Vision has group -1, so `k_group <= 0` keeps vision and group 0.
    return (visible & ((k_group <= 0) | (k_group == q_group))) | both_vision


@triton.jit
def tile_visibility(policy: tl.constexpr,
                    q_omin, q_omax, q_gmin, q_gmax, q_any_vision, q_all_vision,
                    k_omin, k_omax, k_gmin, k_gmax, k_any_vision, k_all_vision):
    """(skip, full) for a query tile and a key tile of one sample, from their summaries.

    skip: the rule masks every pair. full: the rule shows every pair. Both are sufficient
    conditions only (a tile may be neither). Written with comparisons, ``&`` and ``|`` so that it
    runs on Triton scalars in the kernel and on torch tensors on the host
    (:func:`qfusion.ops.triton.plan.tile_classes` calls its ``.fn``).
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
            visible = kernel_mask_rule(POLICY, q_kind[:, None], q_group[:, None], q_order[:, None],
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
def fwd_kernel(
    Q, K, V, Out, Lse,
    MetaQ, CuQ, MetaK, CuK, FullNum, FullIdx, PartNum, PartIdx,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_lse_h, stride_meta_q, stride_meta_k, num_q_tiles, num_k_tiles, qk_scale,
    POLICY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    """Forward: out (Tq, H, D) and the base-2 log-sum-exp (H, Tq) of one (query tile, head, sample)."""
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
def bwd_delta_kernel(Out, DO, Delta, stride_ot, stride_oh, stride_dot, stride_doh, stride_delta_h, num_tokens,
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
            visible = kernel_mask_rule(POLICY, q_kind[None, :], q_group[None, :], q_order[None, :],
                                 k_kind[:, None], k_group[:, None], k_order[:, None])
            p_t = tl.where(visible & m_valid[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        start_m = tl.load(Indices + tl.minimum(j + 1, count - 1)) * BLOCK_M
    return dk, dv


@triton.jit
def bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV,
    MetaQ, CuQ, MetaK, CuK, FullNum, FullIdx, PartNum, PartIdx,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    stride_lse_h, stride_meta_q, stride_meta_k, num_q_tiles, num_k_tiles, qk_scale, scale,
    POLICY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward, by key tile: dK and dV of one (key tile, head, sample)."""
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
            visible = kernel_mask_rule(POLICY, q_kind[:, None], q_group[:, None], q_order[:, None],
                                 k_kind[None, :], k_group[None, :], k_order[None, :])
            p = tl.where(visible & n_valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        start_n = tl.load(Indices + tl.minimum(j + 1, count - 1)) * BLOCK_N
    return dq


@triton.jit
def bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ,
    MetaQ, CuQ, MetaK, CuK, FullNum, FullIdx, PartNum, PartIdx,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    stride_lse_h, stride_meta_q, stride_meta_k, num_q_tiles, num_k_tiles, qk_scale, scale,
    POLICY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward, by query tile: dQ of one (query tile, head, sample)."""
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

"""The fused attention kernel as PyTorch ops: custom ops with fake implementations, autograd, the entry.

The jit kernels (:mod:`qfusion.ops.triton.kernels`) are launched by two ``torch.library`` custom ops,
``qfusion::fusion_attention_fwd`` and ``qfusion::fusion_attention_bwd``, with fake implementations
and a registered autograd formula, so ``torch.compile`` traces through them. The tile plan
(:mod:`qfusion.ops.triton.plan`) and the launch config (:mod:`qfusion.ops.triton.configs`) travel
into the ops as tensors and integers. float32 dots follow PyTorch's matmul precision: exact
(``ieee``) under the default "highest", TF32 tensor cores only when the user allows them.

:func:`triton_fusion_attention` is the entry: it checks the inputs, chooses the config, and calls
the forward op.
"""

from __future__ import annotations

import math
import weakref

import torch
import triton
from torch import Tensor

from qfusion.ops.checks import check_inputs, interpreter_active, triton_unusable_reason
from qfusion.ops.meta import AttentionMeta
from qfusion.ops.triton.configs import KernelConfig, autotune, default_config
from qfusion.ops.triton.kernels import (
    LOG2E, block_d, bwd_delta_kernel, bwd_dkdv_kernel, bwd_dq_kernel, fwd_kernel, policy_code,
)
from qfusion.ops.triton.plan import cached_plan

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _precision(dtype: torch.dtype) -> str:
    # float32 follows PyTorch's matmul setting: exact products unless TF32 is allowed.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


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

    cu_seqlens_*: (B + 1,) int32 offsets; plan: :meth:`~qfusion.ops.triton.plan.TilePlan.tensors`
    (12 tensors, the three passes' tile lists); config: :meth:`KernelConfig.as_ints`.
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
    fwd_kernel[(num_q_tiles, heads, samples)](
        q, k, v, out, lse, meta_q, cu_seqlens_q, meta_k, cu_seqlens_k, full_num, full_idx, part_num, part_idx,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), meta_q.stride(0), meta_k.stride(0),
        num_q_tiles, num_k_tiles, scale * LOG2E,
        POLICY=policy_code(policy), BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n, BLOCK_D=block_d(head_dim),
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
    shapes = dict(POLICY=policy_code(policy), BLOCK_D=block_d(head_dim), HEAD_DIM=head_dim,
                  PRECISION=_precision(q.dtype))
    delta = torch.empty((heads, num_tokens), dtype=torch.float32, device=q.device)
    delta_rows = 64
    bwd_delta_kernel[(triton.cdiv(num_tokens, delta_rows), heads)](
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
        bwd_dkdv_kernel[(num_k_tiles, heads, samples)](
            q, k, v, grad_out, lse, delta, dk, dv, *metas, *dkdv_lists, *strides,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *tail, num_q_tiles, num_k_tiles,
            scale * LOG2E, scale, BLOCK_M=cfg.dkdv.block_m, BLOCK_N=cfg.dkdv.block_n, **shapes,
            **_launch(q, cfg.dkdv),
        )
    num_q_tiles, num_k_tiles = dq_lists[1].shape[1:]
    bwd_dq_kernel[(num_q_tiles, heads, samples)](
        q, k, v, grad_out, lse, delta, dq, *metas, *dq_lists, *strides, dq.stride(0), dq.stride(1),
        *tail, num_q_tiles, num_k_tiles, scale * LOG2E, scale,
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


def _stacked_meta(meta: AttentionMeta) -> Tensor:
    """(3, T) int32 kind/group/order of ``meta``; cached per meta in eager mode."""
    if torch.compiler.is_compiling():
        return torch.stack([meta.kind, meta.group, meta.order])
    if meta not in _stacked:
        _stacked[meta] = torch.stack([meta.kind, meta.group, meta.order])
    return _stacked[meta]


def _validate(q: Tensor, k: Tensor, v: Tensor, meta_q: AttentionMeta, meta_k: AttentionMeta, policy: str) -> None:
    policy_code(policy)
    check_inputs(q, k, v, meta_q, meta_k)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in DTYPES:
            raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {x.dtype}")
    if q.dtype == torch.bfloat16 and interpreter_active():
        raise TypeError("q: bfloat16 is not supported under the Triton interpreter (TRITON_INTERPRET=1), which "
                        "computes bfloat16 dots wrongly; expected float16 or float32 there, got torch.bfloat16")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected a head dim between 1 and {MAX_HEAD_DIM}, got {q.shape[-1]}")
    reason = triton_unusable_reason(q)
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
    config: tile sizes, warps and stages of each pass, default
        :func:`~qfusion.ops.triton.configs.default_config`; "autotune" for the fastest candidate on
        inputs like these (:func:`~qfusion.ops.triton.configs.autotune`, timed once per shape bucket).
    block_m, block_n: query / key tile sizes (powers of two >= 16) for all three passes at once,
    overriding ``config``'s.

    Returns (Tq, H, D); differentiable in q, k and v.
    """
    _validate(q, k, v, meta_q, meta_k, policy)
    if isinstance(config, str):
        if config != "autotune":
            raise ValueError(f"config: expected a KernelConfig, 'autotune' or None, got {config!r}")
        config = autotune(q, k, v, meta_q, meta_k, policy=policy, attention=triton_fusion_attention)
    config = config or default_config(q)
    if block_m is not None or block_n is not None:
        base = config.fwd
        config = KernelConfig.uniform(block_m or base.block_m, block_n or base.block_n, base.num_warps,
                                      base.num_stages)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    out, _ = fusion_attention_fwd(
        q, k, v, _stacked_meta(meta_q), meta_q.cu_seqlens, _stacked_meta(meta_k), meta_k.cu_seqlens,
        cached_plan(meta_q, meta_k, policy, config, backward).tensors(), policy, scale, config.as_ints(),
    )
    return out

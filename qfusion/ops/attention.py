"""One entry point for the fusion transformer's attention over packed varlen sequences.

``fusion_attention`` dispatches to an implementation chosen by name:

* ``eager``: the reference. Loops over samples, materialises each sample's mask from the rule;
  scores and softmax in float32 for half inputs (else in the input dtype: float64 works).
  Readable, slow.
* ``sdpa``: ``scaled_dot_product_attention`` on a per-sample padded batch with a (B, 1, Lq, Lk)
  boolean mask (never one mask over the whole packed batch).
* ``flex``: FlexAttention over the packed sequence with a ``BlockMask`` built from the rule
  (sample boundaries are part of the rule) by the compiled ``create_block_mask`` on CUDA (never a
  dense mask there), cached per metadata pair. On CPU it has no backward: with gradients needed it
  falls back to ``sdpa``.
* ``triton``: the fused block-sparse kernel (:mod:`qfusion.ops.triton`); needs CUDA or
  the Triton interpreter (``TRITON_INTERPRET=1``, float32 / float16 only: the interpreter computes
  bfloat16 dots wrongly, so bfloat16 there is refused).
* ``auto``: ``triton`` on CUDA for the (device capability, dtype) pairs in
  :data:`VALIDATED_TRITON` (checked on that hardware), else ``flex`` on CUDA, else ``sdpa``.

A fast path that cannot run falls back to the next one with a one-time warning saying why. Query
rows that see no key produce zeros (never NaN), with zero gradients.
"""

from __future__ import annotations

import math
import warnings
import weakref

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from qfusion.ops import checks
from qfusion.ops.meta import POLICIES, AttentionMeta, dense_mask, mask_rule

IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flex", "triton")

VALIDATED_TRITON: frozenset[tuple[tuple[int, int], torch.dtype]] = frozenset()
"""(CUDA capability, dtype) pairs where ``auto`` picks the Triton kernel: only those whose
correctness and speed against the baselines were measured on such a device
(``benchmarks/gpu_validate.py``, results in ``benchmarks/results/``). None yet."""

_HALF = (torch.float16, torch.bfloat16)

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, meta_q: AttentionMeta, meta_k: AttentionMeta,
                    policy: str, scale: float) -> Tensor:
    """Reference attention: one sample at a time with its mask materialised from the rule.

    Half inputs are computed in float32 and the result cast back: half scores overflow to inf
    (and the softmax to NaN) at logits that float32 holds easily.
    """
    dtype = q.dtype
    if dtype in _HALF:
        q, k, v = q.float(), k.float(), v.float()
    out = []
    for b in range(meta_q.num_samples):
        qs, qe = (int(x) for x in meta_q.cu_seqlens[b : b + 2])
        ks, ke = (int(x) for x in meta_k.cu_seqlens[b : b + 2])
        mask = dense_mask(policy, meta_q, meta_k, b)  # (Lq, Lk)
        scores = torch.einsum("qhd,khd->hqk", q[qs:qe], k[ks:ke]) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        seen = mask.any(dim=-1)  # rows that see at least one key
        probs = torch.softmax(scores.masked_fill(~seen[:, None], 0.0), dim=-1) * seen[:, None]
        out.append(torch.einsum("hqk,khd->qhd", probs, v[ks:ke]))
    return (torch.cat(out, dim=0) if out else q.new_zeros(q.shape)).to(dtype)


def _local_index(meta: AttentionMeta) -> tuple[Tensor, Tensor]:
    """(T,) sample and (T,) index within the sample of every packed token."""
    sample = meta.sample_ids()
    local = torch.arange(meta.num_tokens, device=sample.device) - meta.cu_seqlens.long()[sample]
    return sample, local


def pad_packed(x: Tensor, meta: AttentionMeta, fill=0) -> tuple[Tensor, Tensor]:
    """Scatter packed rows (T, ...) into a padded (B, L_max, ...) tensor; returns it and (B, L_max) validity."""
    sample, local = _local_index(meta)
    shape = (meta.num_samples, max(meta.max_seqlen, 1)) + tuple(x.shape[1:])
    padded = x.new_full(shape, fill).index_put((sample, local), x)
    valid = torch.zeros(shape[:2], dtype=torch.bool, device=x.device).index_put(
        (sample, local), torch.ones_like(sample, dtype=torch.bool)
    )
    return padded, valid


def padded_mask(policy: str, meta_q: AttentionMeta, meta_k: AttentionMeta) -> Tensor:
    """(B, Lq_max, Lk_max) boolean mask of the per-sample padded batch (padding never visible)."""
    (kq, valid_q), (gq, _), (oq, _) = (pad_packed(t, meta_q) for t in (meta_q.kind, meta_q.group, meta_q.order))
    (kk, valid_k), (gk, _), (ok, _) = (pad_packed(t, meta_k) for t in (meta_k.kind, meta_k.group, meta_k.order))
    rule = mask_rule(policy, kq[:, :, None], gq[:, :, None], oq[:, :, None],
                     kk[:, None, :], gk[:, None, :], ok[:, None, :])
    return rule & valid_q[:, :, None] & valid_k[:, None, :]


_sdpa_masks: "weakref.WeakKeyDictionary[AttentionMeta, dict]" = weakref.WeakKeyDictionary()


def _is_plain_causal(policy: str, meta_q: AttentionMeta, meta_k: AttentionMeta) -> bool:
    """Whether the rule is plain causal attention over each sample (a full ``causal`` forward: queries
    and keys are the same tokens, at orders 0..L-1), which SDPA runs without a mask and skips the
    masked half."""
    if policy != "causal" or meta_q is not meta_k:
        return False
    return torch.equal(meta_q.order.long(), _local_index(meta_q)[1])


def sdpa_mask(policy: str, meta_q: AttentionMeta, meta_k: AttentionMeta):
    """(mask (B, 1, Lq, Lk) or None for plain causal, rows that see a key (B, Lq, 1) or None), built
    once per metadata pair and policy (every layer of a forward reuses it)."""
    per_q = _sdpa_masks.setdefault(meta_q, {})
    key = (id(meta_k), policy)
    cached = per_q.get(key)
    if cached is None or cached[0]() is not meta_k:
        if _is_plain_causal(policy, meta_q, meta_k):
            built = (None, None)
        else:
            mask = padded_mask(policy, meta_q, meta_k)
            seen = mask.any(dim=-1, keepdim=True)  # (B, Lq, 1)
            # A row with no visible key would be NaN: let it see everything, then zero it.
            built = ((mask | ~seen)[:, None], seen)
        cached = per_q[key] = (weakref.ref(meta_k), built)
    return cached[1]


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, meta_q: AttentionMeta, meta_k: AttentionMeta,
                   policy: str, scale: float) -> Tensor:
    """SDPA on the per-sample padded batch with a (B, 1, Lq, Lk) boolean mask (``is_causal`` where
    the rule is plain causal)."""
    mask, seen = sdpa_mask(policy, meta_q, meta_k)
    qp, _ = pad_packed(q, meta_q)
    kp, _ = pad_packed(k, meta_k)
    vp, _ = pad_packed(v, meta_k)
    out = F.scaled_dot_product_attention(
        rearrange(qp, "b l h d -> b h l d"), rearrange(kp, "b l h d -> b h l d"),
        rearrange(vp, "b l h d -> b h l d"), attn_mask=mask, is_causal=mask is None, scale=scale,
    )
    out = rearrange(out, "b h l d -> b l h d")
    if seen is not None:
        out = out * seen[..., None].to(out.dtype)
    sample, local = _local_index(meta_q)
    return out[sample, local]


_block_masks: "weakref.WeakKeyDictionary[AttentionMeta, dict]" = weakref.WeakKeyDictionary()
_compiled_flex = None


def _flex_block_mask(policy: str, meta_q: AttentionMeta, meta_k: AttentionMeta):
    from torch.nn.attention.flex_attention import create_block_mask

    per_q = _block_masks.setdefault(meta_q, {})
    key = (id(meta_k), policy)
    cached = per_q.get(key)
    if cached is None or cached[0]() is not meta_k:
        sample_q, sample_k = meta_q.sample_ids(), meta_k.sample_ids()
        kq, gq, oq = meta_q.kind, meta_q.group, meta_q.order
        kk, gk, ok = meta_k.kind, meta_k.group, meta_k.order

        def mask_mod(b, h, qi, ki):
            same = sample_q[qi] == sample_k[ki]
            return same & mask_rule(policy, kq[qi], gq[qi], oq[qi], kk[ki], gk[ki], ok[ki])

        device = meta_q.kind.device
        # Compiled on CUDA, mask creation works block by block and never holds the (Tq, Tk) mask;
        # the CPU path (small inputs, no backward) skips the compile time.
        per_q[key] = (weakref.ref(meta_k), create_block_mask(
            mask_mod, None, None, meta_q.num_tokens, meta_k.num_tokens, device=device,
            _compile=device.type == "cuda",
        ))
    return per_q[key][1]


def flex_attention_packed(q: Tensor, k: Tensor, v: Tensor, meta_q: AttentionMeta, meta_k: AttentionMeta,
                          policy: str, scale: float) -> Tensor:
    """FlexAttention over the whole packed sequence; the BlockMask carries the rule and sample bounds."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = _flex_block_mask(policy, meta_q, meta_k)
    if not q.is_cuda:
        # CPU flex refuses inputs that require grad even under no_grad (it has no backward there;
        # resolve_impl has already routed the gradient case elsewhere).
        q, k, v = q.detach(), k.detach(), v.detach()
    fn = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    with warnings.catch_warnings():
        # Uncompiled flex on CPU warns that it is slow; it is the documented CPU path.
        warnings.simplefilter("ignore", UserWarning)
        out = fn(
            rearrange(q, "t h d -> 1 h t d"), rearrange(k, "t h d -> 1 h t d"),
            rearrange(v, "t h d -> 1 h t d"), block_mask=block_mask, scale=scale,
        )
    return rearrange(out, "1 h t d -> t h d")


def auto_impl(capability: tuple[int, int] | None, dtype: torch.dtype, *, triton_usable: bool,
              flex_available: bool) -> str:
    """What ``auto`` runs: capability is the CUDA device's (major, minor), None off CUDA."""
    if capability is None:
        return "sdpa"
    if triton_usable and (tuple(capability), dtype) in VALIDATED_TRITON:
        return "triton"
    return "flex" if flex_available else "sdpa"


def resolve_impl(impl: str, q: Tensor, needs_grad: bool) -> str:
    """The implementation that will actually run for ``impl`` on these inputs (fallbacks warn once)."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl: expected one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl == "auto":
        capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else None
        triton_usable = capability is not None and checks.triton_unusable_reason(q) is None
        return auto_impl(capability, q.dtype, triton_usable=triton_usable, flex_available=checks.flex_available())
    if impl == "triton":
        reason = checks.triton_unusable_reason(q)
        if reason is not None:
            _warn_once(f"triton:{reason}", f"fusion_attention: impl='triton' falls back to 'sdpa': {reason}")
            return "sdpa"
    if impl == "flex":
        if not checks.flex_available():
            _warn_once("flex:missing", "fusion_attention: impl='flex' falls back to 'sdpa': "
                       "this torch has no FlexAttention")
            return "sdpa"
        if needs_grad and not q.is_cuda:
            _warn_once("flex:cpu-grad", "fusion_attention: impl='flex' falls back to 'sdpa': "
                       "FlexAttention has no backward on CPU")
            return "sdpa"
    return impl


def fusion_attention(q: Tensor, k: Tensor, v: Tensor, meta_q: AttentionMeta, meta_k: AttentionMeta, *,
                     policy: str, impl: str = "auto", scale: float | None = None) -> Tensor:
    """Masked multi-head attention of packed queries over packed keys, the mask given as a rule.

    q: (Tq, H, D) packed queries; k, v: (Tk, H, D) packed keys and values.
    meta_q, meta_k: per-token metadata of each side. ``cu_seqlens`` of both sides have the same
        number of samples; they are equal for a full forward and differ for an incremental ``ask``
        (new queries against cached plus new keys).
    policy: "causal", "prefix" or "grouped" (see :func:`qfusion.ops.meta.mask_rule`).
    impl: "auto", "eager", "sdpa", "flex" or "triton".
    scale: softmax scale, default 1/sqrt(D).

    Returns (Tq, H, D).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    checks.check_inputs(q, k, v, meta_q, meta_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    chosen = resolve_impl(impl, q, needs_grad)
    if chosen == "eager":
        return eager_attention(q, k, v, meta_q, meta_k, policy, scale)
    if chosen == "sdpa":
        return sdpa_attention(q, k, v, meta_q, meta_k, policy, scale)
    if chosen == "flex":
        if q.shape[0] == 0 or k.shape[0] == 0:
            # No (query, key) pair at all: FlexAttention cannot build a mask over an empty side,
            # and the reference's answer (empty, or zeros) costs nothing.
            return eager_attention(q, k, v, meta_q, meta_k, policy, scale)
        return flex_attention_packed(q, k, v, meta_q, meta_k, policy, scale)
    # Imported here: triton is an optional dependency, needed only when its kernel was chosen.
    from qfusion.ops.triton.op import triton_fusion_attention

    return triton_fusion_attention(q, k, v, meta_q, meta_k, policy=policy, scale=scale)

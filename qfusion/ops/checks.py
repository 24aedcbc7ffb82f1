"""What ``fusion_attention`` accepts and which backends can run here.

The input checks every implementation shares (shapes, dtypes, devices, metadata against the
tensors) and the availability of the optional backends (Triton, its CPU interpreter, FlexAttention),
in one place so that the dispatcher and the Triton entry ask the same questions.
"""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor

from qfusion.ops.meta import AttentionMeta


def check_inputs(q: Tensor, k: Tensor, v: Tensor, meta_q: AttentionMeta, meta_k: AttentionMeta) -> None:
    """Raise naming the argument unless q (Tq, H, D), k and v (Tk, H, D) and their metadata agree."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 3:
            raise ValueError(f"{name}: expected a packed (T, H, D) tensor, got shape {tuple(x.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(f"k: expected (Tk, {q.shape[1]}, {q.shape[2]}) to match q, got {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    if meta_q.num_tokens != q.shape[0]:
        raise ValueError(f"meta_q: describes {meta_q.num_tokens} tokens, q has {q.shape[0]}")
    if meta_k.num_tokens != k.shape[0]:
        raise ValueError(f"meta_k: describes {meta_k.num_tokens} tokens, k has {k.shape[0]}")
    if meta_q.num_samples != meta_k.num_samples:
        raise ValueError(
            f"meta_k: expected {meta_q.num_samples} samples like meta_q, got {meta_k.num_samples}"
        )


def interpreter_active() -> bool:
    """Whether Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unusable_reason(q: Tensor) -> str | None:
    """None when the Triton kernel can run on q, else the reason it cannot."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'qfusion[triton]')"
    if not q.is_cuda and not interpreter_active():
        return "the Triton kernel needs a CUDA tensor or TRITON_INTERPRET=1"
    return None


def flex_available() -> bool:
    """Whether this torch has FlexAttention."""
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None

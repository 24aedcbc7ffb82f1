"""Tile sizes, warps and pipeline stages of the fused attention kernel, per GPU generation, and the autotuner.

Each pass of the kernel has its own choice: the forward and the dQ pass hold one query tile and
stream key tiles, the dK/dV pass holds one key tile (and two float32 accumulators) and streams
query tiles, so it takes smaller streamed tiles to stay within the register file. Every entry of
:data:`TABLE` compiles for its target without register spills and with software-pipelined key /
query loops (asserted from the compiled code by ``tests/test_kernel_compile.py``, which needs no
GPU). The entries were chosen from compiled code alone (registers, spills, shared memory); their
speed on a device is for ``benchmarks/gpu_validate.py`` to measure, and has not been yet.

:func:`autotune` times the table's entry and a few alternates on given inputs and keeps the fastest
per shape bucket, for users who opt in (``triton_fusion_attention(..., config="autotune")``).
"""

from __future__ import annotations

import math
import time
from dataclasses import astuple, dataclass
from typing import Callable

import torch
import triton
from torch import Tensor

from qfusion.ops.meta import AttentionMeta

ARCHS = (80, 90)
"""Compute capabilities with a table entry: sm_80 (Ampere; also used for other sm_8x) and sm_90 (Hopper and later)."""

HEAD_DIM_BUCKETS = (64, 128, 256)
"""Head dims are padded to a power of two in the kernel; a config serves every dim of its bucket."""


@dataclass(frozen=True)
class PassConfig:
    """Launch parameters of one kernel pass.

    block_m: query rows of a tile; block_n: key rows of a tile (powers of two >= 16).
    num_warps, num_stages: Triton launch options (ignored by the interpreter).
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"{name}: expected a power of two >= 16, got {value!r}")
        for name in ("num_warps", "num_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class KernelConfig:
    """The three passes' launch parameters: forward, dK/dV (by key tile) and dQ (by query tile)."""

    fwd: PassConfig
    dkdv: PassConfig
    dq: PassConfig

    def as_ints(self) -> list[int]:
        """The 12 integers (block_m, block_n, num_warps, num_stages per pass) the custom op takes."""
        return [x for p in (self.fwd, self.dkdv, self.dq) for x in astuple(p)]

    @classmethod
    def from_ints(cls, values) -> "KernelConfig":
        """The inverse of :meth:`as_ints`."""
        values = [int(x) for x in values]
        if len(values) != 12:
            raise ValueError(f"values: expected 12 integers, got {len(values)}")
        return cls(PassConfig(*values[0:4]), PassConfig(*values[4:8]), PassConfig(*values[8:12]))

    @classmethod
    def uniform(cls, block_m: int, block_n: int, num_warps: int = 4, num_stages: int = 2) -> "KernelConfig":
        """The same query / key tile sizes in all three passes."""
        p = PassConfig(block_m, block_n, num_warps, num_stages)
        return cls(p, p, p)


INTERPRETER = KernelConfig.uniform(32, 32)
"""Under the interpreter every tile step costs milliseconds: few, small tiles."""


def _entry(fwd, dkdv, dq) -> KernelConfig:
    return KernelConfig(PassConfig(*fwd), PassConfig(*dkdv), PassConfig(*dq))


# (arch, "half" | "float32", head-dim bucket) -> config. Tuples: (block_m, block_n, warps, stages).
# Chosen as the fastest-looking candidate that compiles for its target with no spills and >= 2
# stages of async copies under Triton 3.6 and 3.9 alike (small spills come and go between
# versions); float32 entries are sized for exact (non-tensor-core) dots, the default.
# sm_86 / sm_89 parts have less shared memory per block (99 KB) than sm_80 (163 KB): the d=256
# forward entry (103 KB) does not fit there.
TABLE: dict[tuple[int, str, int], KernelConfig] = {
    (80, "half", 64): _entry((128, 64, 8, 3), (32, 128, 8, 3), (128, 32, 8, 3)),
    (80, "half", 128): _entry((128, 32, 8, 3), (32, 64, 8, 3), (64, 32, 4, 3)),
    (80, "half", 256): _entry((64, 32, 8, 3), (16, 32, 4, 3), (32, 16, 8, 3)),
    (90, "half", 64): _entry((128, 64, 8, 3), (32, 128, 8, 3), (128, 32, 8, 3)),
    (90, "half", 128): _entry((128, 64, 8, 3), (32, 64, 8, 3), (64, 32, 4, 3)),
    (90, "half", 256): _entry((64, 32, 4, 3), (16, 32, 4, 3), (16, 32, 4, 3)),
    (80, "float32", 64): _entry((64, 32, 8, 3), (16, 32, 4, 3), (32, 16, 4, 3)),
    (80, "float32", 128): _entry((32, 16, 4, 3), (16, 32, 4, 3), (16, 16, 4, 3)),
    (80, "float32", 256): _entry((16, 16, 4, 3), (16, 16, 8, 3), (16, 16, 4, 3)),
    (90, "float32", 64): _entry((32, 16, 4, 3), (16, 16, 4, 3), (32, 16, 8, 3)),
    (90, "float32", 128): _entry((16, 16, 4, 3), (16, 32, 8, 3), (16, 16, 4, 3)),
    (90, "float32", 256): _entry((16, 16, 4, 3), (16, 16, 8, 3), (16, 16, 4, 3)),
}


# Further candidates for the optional autotuner (:func:`autotune`),
# tried after the table's entry; the compile check's full set covers them too.
ALTERNATES: dict[tuple[int, str, int], tuple[KernelConfig, ...]] = {
    (arch, "half", dim): (
        KernelConfig(PassConfig(*fwd), TABLE[(arch, "half", dim)].dkdv, TABLE[(arch, "half", dim)].dq),
        KernelConfig(TABLE[(arch, "half", dim)].fwd, PassConfig(*dkdv), PassConfig(*dq)),
    )
    for arch in ARCHS
    for dim, fwd, dkdv, dq in ((64, (64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3)),
                               (128, (64, 64, 8, 3), (16, 64, 4, 3), (32, 32, 4, 3)))
}


def head_dim_bucket(head_dim: int) -> int:
    """The table bucket of a head dim (the power of two the kernel pads it to, at least 64)."""
    for bucket in HEAD_DIM_BUCKETS:
        if head_dim <= bucket:
            return bucket
    raise ValueError(f"head_dim: expected at most {HEAD_DIM_BUCKETS[-1]}, got {head_dim}")


def table_arch(capability: tuple[int, int]) -> int:
    """The table generation serving a CUDA capability (sm_8x -> 80, sm_9x and later -> 90)."""
    if capability[0] < 8:
        raise ValueError(f"capability: the kernel's table starts at sm_80, got sm_{capability[0]}{capability[1]}")
    return 90 if capability[0] >= 9 else 80


def dtype_kind(dtype: torch.dtype) -> str:
    """The table's dtype column: "float32", or "half" for float16 and bfloat16."""
    return "float32" if dtype == torch.float32 else "half"


def select_config(capability: tuple[int, int] | None, dtype: torch.dtype, head_dim: int) -> KernelConfig:
    """The table's config for a device (None: the interpreter), dtype and head dim."""
    if capability is None:
        return INTERPRETER
    return TABLE[(table_arch(capability), dtype_kind(dtype), head_dim_bucket(head_dim))]


def candidates(capability: tuple[int, int] | None, dtype: torch.dtype, head_dim: int) -> list[KernelConfig]:
    """The configs the autotuner tries, the table's first (interpreter: two tilings)."""
    if capability is None:
        return [INTERPRETER, KernelConfig.uniform(16, 16)]
    key = (table_arch(capability), dtype_kind(dtype), head_dim_bucket(head_dim))
    return [TABLE[key], *ALTERNATES.get(key, ())]


def device_capability(q: Tensor) -> tuple[int, int] | None:
    """The CUDA capability of q's device, None off CUDA (the interpreter)."""
    return torch.cuda.get_device_capability(q.device) if q.is_cuda else None


def default_config(q: Tensor) -> KernelConfig:
    """The kernel config for q's device, dtype and head dim (:func:`select_config`)."""
    return select_config(device_capability(q), q.dtype, q.shape[-1])


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
             attention: Callable[..., Tensor],
             measure: Callable[[Callable[[], None]], float] | None = None) -> KernelConfig:
    """The fastest of :func:`candidates` on inputs like these.

    Times forward + backward of each candidate (forward only when no input requires grad); a
    candidate that fails to compile or launch is skipped. The choice is cached per (device
    capability, dtype, head dim, policy, token counts rounded up to powers of two, backward) and
    listed by :func:`tuned_configs` for benchmark records. Triton's own ``triton.autotune`` cannot
    do this: the tile sizes also decide the tile lists, which are built outside the kernel.

    q: (Tq, H, D); k, v: (Tk, H, D); meta_q, meta_k, policy as in the kernel's entry.
    attention: the entry to time, called as ``attention(q, k, v, meta_q, meta_k, policy=, config=)``
        (:func:`qfusion.ops.triton.op.triton_fusion_attention`, which calls this function for
        ``config="autotune"``: it is handed in so that the configs never import the entry above them).
    measure: milliseconds of a callable (default ``triton.testing.do_bench`` on CUDA).
    """
    backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    key = (device_capability(q), q.dtype, q.shape[-1], policy, triton.next_power_of_2(max(meta_q.num_tokens, 1)),
           triton.next_power_of_2(max(meta_k.num_tokens, 1)), backward)
    if key not in _tuned:
        measure = measure or (lambda fn: _default_measure(fn, q.is_cuda))
        inputs = [x.detach().requires_grad_(backward) for x in (q, k, v)]
        timings = []
        for config in candidates(key[0], q.dtype, q.shape[-1]):
            def step(config=config):
                out = attention(*inputs, meta_q, meta_k, policy=policy, config=config)
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

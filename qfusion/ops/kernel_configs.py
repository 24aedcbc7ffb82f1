"""Tile sizes, warps and pipeline stages of the fused attention kernel, per GPU generation.

Each pass of the kernel has its own choice: the forward and the dQ pass hold one query tile and
stream key tiles, the dK/dV pass holds one key tile (and two float32 accumulators) and streams
query tiles, so it takes smaller streamed tiles to stay within the register file. Every entry of
:data:`TABLE` compiles for its target without register spills and with software-pipelined key /
query loops (asserted from the compiled code by ``tests/test_kernel_compile.py``, which needs no
GPU). The entries were chosen from compiled code alone (registers, spills, shared memory); their
speed on a device is for ``benchmarks/gpu_validate.py`` to measure, and has not been yet.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch

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


# Further candidates for the optional autotuner (:func:`qfusion.ops.triton_attention.autotune`),
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

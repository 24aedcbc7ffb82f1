"""Compile the fused attention kernel for GPU targets without a GPU, and read what came out.

``triton.compile`` with a ``GPUTarget`` runs the whole NVIDIA pipeline (TTIR, TTGIR, LLVM, PTX,
``ptxas``) on the host; this script compiles every production config of
:mod:`qfusion.ops.triton.configs` that way and reports, per kernel, the registers, spills, stack
and shared memory (from ``ptxas -v`` on the PTX, and the stack frame of the cubin Triton built, where
spills go), and whether its tile loops are software-pipelined: async
copies into multi-buffered shared memory in the TTGIR and ``cp.async`` in the PTX.

Triton kernels are interpreted objects when ``TRITON_INTERPRET=1`` was set before triton was
imported, so run this in a process without it (the tests do, in a subprocess)::

    PYTHONPATH=. python benchmarks/compile_check.py [--full] [--arch 90] [--jobs 8] [--json PATH]

A developer's tool (``tests/test_kernel_compile.py`` and ``gpu_validate.py`` run it), kept out of the
installed package.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qfusion.ops.triton.configs import (
    ALTERNATES, ARCHS, HEAD_DIM_BUCKETS, TABLE, PassConfig, dtype_kind, head_dim_bucket,
)

KERNELS = ("fwd", "dkdv", "dq")
"""The pipelined kernels, named by the pass (and config entry) they run."""

TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_TENSOR_ARGS = {"Q", "K", "V", "Out", "DO", "DK", "DV", "DQ"}
_FLOAT32_ARGS = {"Lse", "Delta"}
_FLOAT_SCALARS = {"qk_scale", "scale"}


@dataclass(frozen=True)
class Case:
    """One kernel to compile: which pass, for which target, dtype, head dim and policy; with the
    table's launch parameters for them unless ``override`` is given."""

    kernel: str
    arch: int
    dtype: torch.dtype
    head_dim: int
    policy: str
    override: PassConfig | None = None

    @property
    def config(self) -> PassConfig:
        if self.override is not None:
            return self.override
        entry = TABLE[(self.arch, dtype_kind(self.dtype), head_dim_bucket(self.head_dim))]
        return getattr(entry, self.kernel)


def production_cases(full: bool = True, archs=ARCHS) -> list[Case]:
    """Every production config (full: the table and the autotuner's alternates, every dtype, head
    dim bucket and policy) or a subset covering each target and half-precision bucket below 256
    under the policy with the most mask code (``grouped``)."""
    if full:
        dtypes, dims, policies = (torch.bfloat16, torch.float16, torch.float32), HEAD_DIM_BUCKETS, ("causal", "prefix", "grouped")
    else:
        dtypes, dims, policies = (torch.bfloat16,), (64, 128), ("grouped",)
    cases = [Case(kernel, arch, dtype, dim, policy) for arch in archs for dtype in dtypes for dim in dims
             for policy in policies for kernel in KERNELS]
    if full:
        for (arch, kind, dim), configs in ALTERNATES.items():
            dtype = torch.float32 if kind == "float32" else torch.bfloat16
            passes = {(kernel, getattr(c, kernel)) for c in configs for kernel in KERNELS} - {
                (kernel, getattr(TABLE[(arch, kind, dim)], kernel)) for kernel in KERNELS}
            cases += [Case(kernel, arch, dtype, dim, "grouped", override=pc) for kernel, pc in sorted(
                passes, key=str) if arch in archs]
    return cases


def _kernel_fn(kernel: str):
    from qfusion.ops.triton import kernels

    return {"fwd": kernels.fwd_kernel, "dkdv": kernels.bwd_dkdv_kernel, "dq": kernels.bwd_dq_kernel}[kernel]


def _source(case: Case):
    """An ASTSource with the signature and alignment a launch from PyTorch tensors would have."""
    from triton.compiler import ASTSource

    from qfusion.ops.triton.kernels import POLICY_CODES, block_d

    fn = _kernel_fn(case.kernel)
    if not hasattr(fn, "arg_names"):
        raise RuntimeError("the kernels are interpreted (TRITON_INTERPRET=1 was set before triton was imported); "
                           "compile in a process without it")
    precision = "ieee" if case.dtype == torch.float32 else "tf32"
    constexprs = dict(POLICY=POLICY_CODES[case.policy], BLOCK_M=case.config.block_m, BLOCK_N=case.config.block_n,
                      BLOCK_D=block_d(case.head_dim), HEAD_DIM=case.head_dim, PRECISION=precision)
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in _TENSOR_ARGS:
            signature[name] = "*" + TRITON_DTYPES[case.dtype]
        elif name in _FLOAT32_ARGS:
            signature[name] = "*fp32"
        elif name[0].isupper():  # metadata, offsets and tile lists
            signature[name] = "*i32"
        else:
            signature[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
        # PyTorch allocations are 16-byte aligned; token and head strides are multiples of 16 when D is.
        token_or_head_stride = name.startswith("stride_") and name[-1] in "th" and not name.startswith(
            ("stride_lse", "stride_meta", "stride_delta"))
        if name[0].isupper() or (token_or_head_stride and case.head_dim % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs, attrs), constexprs


def _ptxas_path(arch: int) -> str:
    """The ptxas Triton uses for ``arch`` (its helper's signature and result differ across 3.x)."""
    from triton.backends.nvidia import compiler as nvidia

    try:
        tool = nvidia.get_ptxas(arch)
    except TypeError:
        tool = nvidia.get_ptxas()
    if isinstance(tool, tuple):  # (path, version)
        return tool[0]
    return getattr(tool, "path", tool)


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spills, stack of the PTX's entry function from the ptxas Triton itself uses."""
    ptxas = _ptxas_path(arch)
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    log = done.stderr + done.stdout
    number = lambda pattern: int(re.search(pattern, log).group(1))  # noqa: E731
    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"), stack_bytes=number(r"(\d+) bytes stack frame"))


def _cubin_stack_bytes(cubin: bytes) -> int | None:
    """The stack frame (where spills go) of the cubin Triton built, from its bundled cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    found = re.search(r"STACK:(\d+)", usage)
    return int(found.group(1)) if found else None


def _loops(ttgir: str) -> list[str]:
    """The text of every ``scf.for`` body of the kernel's TTGIR (outermost loops)."""
    bodies, pos = [], 0
    while (start := ttgir.find("scf.for", pos)) >= 0:
        # The region opens at the end of the loop's line (its types may hold braces too).
        depth, i = 0, ttgir.index("{\n", start)
        for i in range(i, len(ttgir)):
            depth += {"{": 1, "}": -1}.get(ttgir[i], 0)
            if depth == 0:
                break
        bodies.append(ttgir[start:i])
        pos = i
    return bodies


def pipelining(ttgir: str, ptx: str) -> dict:
    """Evidence of software pipelining: per tile loop, async copies in flight; the stage depth of
    the shared buffers those copies fill (>= 2: a copy overlaps the compute of an earlier tile)."""
    loops = _loops(ttgir)
    # Shared tile buffers allocated with a leading stage dimension: memdesc<stages x rows x cols x type>.
    depths = [int(d) for d in re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
    return dict(
        loops=len(loops),
        loops_with_async_copies=sum("async_copy_global_to_local" in body for body in loops),
        tile_buffers=len(depths),
        min_buffer_depth=min(depths, default=0),
        ptx_async_copies=len(re.findall(r"\bcp\.async\.(?:ca|cg)\.shared", ptx)),
        async_mma="wgmma.mma_async" in ptx,
    )


def compile_case(case: Case) -> dict:
    """Compile one case for its target; the report row (``error`` set if it did not compile)."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = dict(kernel=case.kernel, arch=case.arch, dtype=str(case.dtype).removeprefix("torch."),
               head_dim=case.head_dim, policy=case.policy, **asdict(case.config))
    started = time.perf_counter()
    try:
        src, _ = _source(case)
        compiled = triton.compile(src, target=GPUTarget("cuda", case.arch, 32),
                                  options=dict(num_warps=case.config.num_warps, num_stages=case.config.num_stages))
        row["compile_s"] = round(time.perf_counter() - started, 2)
        row["shared_bytes"] = compiled.metadata.shared
        row.update(_ptxas_report(compiled.asm["ptx"], case.arch))
        row["cubin_stack_bytes"] = _cubin_stack_bytes(compiled.asm["cubin"])
        row.update(pipelining(compiled.asm["ttgir"], compiled.asm["ptx"]))
    except Exception as error:  # noqa: BLE001 - every failure is reported per case (OutOfResources, PTXASError, ...)
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    return row


def problems(row: dict) -> list[str]:
    """What is wrong with a compiled kernel: an error, spills, or a tile loop that is not pipelined."""
    if "error" in row:
        return [row["error"]]
    found = []
    if row["spill_stores"] or row["spill_loads"] or row.get("cubin_stack_bytes"):
        found.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads "
                     f"(stack {row.get('cubin_stack_bytes')} B in Triton's cubin)")
    if row["loops"] < 2 or row["loops_with_async_copies"] < row["loops"]:
        found.append(f"{row['loops_with_async_copies']} of {row['loops']} tile loops use async copies")
    if row["tile_buffers"] == 0 or row["min_buffer_depth"] < 2 or row["ptx_async_copies"] == 0:
        found.append(f"tile buffers not multi-buffered (min depth {row['min_buffer_depth']}, "
                     f"{row['ptx_async_copies']} cp.async)")
    return found


def describe(row: dict) -> str:
    """One line per compiled kernel: config, registers, spills, shared memory, pipelining, compile time."""
    head = (f"{row['kernel']:5} sm_{row['arch']} {row['dtype']:8} d{row['head_dim']:<3} {row['policy']:8} "
            f"{row['block_m']}x{row['block_n']} w{row['num_warps']} s{row['num_stages']}")
    if "error" in row:
        return f"{head}  ERROR {row['error']}"
    return (f"{head}  regs {row['registers']:3} spill {row['spill_stores']}/{row['spill_loads']} B "
            f"smem {row['shared_bytes']:6} B  loops {row['loops_with_async_copies']}/{row['loops']} async, "
            f"{row['ptx_async_copies']} cp.async, buffers x{row['min_buffer_depth']}"
            f"{', wgmma async' if row['async_mma'] else ''}  {row['compile_s']} s")


def quiet() -> None:
    """Silence Triton's notice about its fp-fusion default, not ours to act on (pool workers call it too)."""
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def main(argv=None) -> int:
    """Compile the production configs, print one line each and the problems; exit 1 if any."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every production config (default: the subset)")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS,
                        help="only this target (repeatable; default: all of ARCHS)")
    parser.add_argument("--limit", type=int, default=None, help="compile only the first N cases")
    parser.add_argument("--json", default=None, help="write the rows to this JSON file (rewritten after each case)")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)
    quiet()
    cases = production_cases(full=args.full, archs=tuple(args.arch or ARCHS))[: args.limit]
    rows = []
    with ProcessPoolExecutor(args.jobs, initializer=quiet) if args.jobs > 1 else nullcontext() as pool:
        for row in (pool.map(compile_case, cases) if pool else map(compile_case, cases)):
            rows.append(row)
            print(describe(row), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    bad = [(row, problems(row)) for row in rows if problems(row)]
    for row, found in bad:
        print(f"PROBLEM {describe(row)}: {'; '.join(found)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

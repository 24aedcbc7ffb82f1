"""Validate the fused attention kernel on one GPU in one short visit (at most ~8 minutes).

Stages, each run under its own ``try`` (a failure is recorded and the next stage runs), each
rewriting one JSON file atomically when it ends, under an internal deadline that drops the last
stages first:

* S0 versions, device, clocks, SM count, measured bf16 / fp16 matmul peak;
* S1 compile every production config for this device's generation (compile time, registers,
  spills, shared memory, pipelining) — ``compile_check.py`` beside this script, in a subprocess;
* S2 correctness against float64 on a ragged layout (B=6, V from 576 to 1450, 1–3 questions,
  m=64, n=16): out, dq, dk, dv in bf16 at d=64 and 128 under every policy, fp16, an incremental
  ask, rows that see no key, d=80; the bound is 2x PyTorch's own error in the dtype (SDPA on the
  padded batch) or a small floor; outputs are poisoned with NaN beforehand so unwritten rows show;
* S3 the goal ratios: the fusion shape (B=32, L≈1.6k, H=16, d ∈ {64, 128}, three policies) for
  triton vs FlexAttention compiled (BlockMask build and compile time reported) vs SDPA on the
  padded batch with a boolean mask (memory-efficient backend, and SDPA's own choice); plain causal
  (B=4, H=16, L ∈ {1k, 4k, 8k}) for triton vs torch's varlen attention (or flash_attn) vs SDPA
  ``is_causal``; forward and forward+backward (``triton.testing.do_bench``), forward % of the
  measured peak, masked/causal time vs the executed-tile ratio;
* S4 a short sweep of forward / backward configs at the fusion shape;
* S5 a summary table of the goals, met or missed;
* S6 time to first token of 7B-shaped LLaVA-1.5 and Qwen2.5-VL hosts (random weights, bfloat16,
  the hosts' SDPA attention), alone and with a paper-sized plugin at N = 64 and 16, timed through
  the hosts' own submodules (``host_ttft.py``, which says why); it prints its own table.

A stage that loops (S1's compile, S3, S4) stops short of the reserves of the requested stages
after it, so a full run fits the budget with every stage started.

S0–S5 need only the repository on ``PYTHONPATH`` and torch, triton and einops on the machine;
S6 also needs transformers (5.x; any version, ``qfusion.attach`` is not used), huggingface_hub and
safetensors::

    PYTHONPATH=. python benchmarks/gpu_validate.py [--stages S0,S2] [--budget 450] [--out PATH]
    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/gpu_validate.py --smoke   # CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

# Only qfusion's layout and kernel (and, for S6, its model) are needed here: load those modules
# without running the package's __init__ (the adapters and their host libraries, which a GPU image
# may lack or hold in other versions). Where qfusion is already imported (a test), it is used as it is.
BARE_PACKAGE = (f"import sys, types; package = types.ModuleType('qfusion'); package.__path__ = [{str(ROOT / 'qfusion')!r}]; "
                "sys.modules.setdefault('qfusion', package)")
if "qfusion" not in sys.modules:
    exec(BARE_PACKAGE)

from bench_attention import (  # noqa: E402
    GOAL_FUSION, Case, flex_runner, goal_table, print_goals, sdpa_runner, timer, varlen_runner,
)

from qfusion.layout import pack  # noqa: E402
from qfusion.ops.attention import IMPLEMENTATIONS, eager_attention, sdpa_attention  # noqa: E402
from qfusion.ops.meta import QUERY, TEXT, AttentionMeta, dense_mask  # noqa: E402

STAGES = ("S0", "S1", "S2", "S3", "S4", "S5", "S6")
# Seconds each stage is expected to need at most on a GPU; a stage starts only if this much is left
# (S5 is cheap and always runs).
STAGE_RESERVE = {"S0": 20, "S1": 60, "S2": 60, "S3": 150, "S4": 40, "S5": 0, "S6": 90}
TTFT_HOST_RESERVE = 40  # seconds S6 needs for one 7B host: build, warm-up and timed rounds
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


class Deadline:
    """Seconds left of the run's budget."""

    def __init__(self, budget: float):
        self.end = time.monotonic() + budget

    def left(self) -> float:
        return self.end - time.monotonic()


def write_atomic(path: Path, result: dict) -> None:
    """Rewrite ``path`` so that a reader (or a killed run) only ever sees a complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


class Context:
    """What the stages share: device, dtypes, sizes (smoke or real), timing, the result so far."""

    def __init__(self, smoke: bool, deadline: Deadline, out: Path, requested=STAGES, ttft_fusion_impl: str = "sdpa"):
        self.smoke = smoke
        self.deadline = deadline
        self.out = out
        self.requested = tuple(requested)
        self.ttft_fusion_impl = ttft_fusion_impl
        self.device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
        # The interpreter computes bfloat16 dots wrongly: the smoke run uses float16 / float32.
        self.dtypes = (torch.float16,) if smoke else (torch.bfloat16, torch.float16)
        self.dtype = self.dtypes[0]
        self.heads = 2 if smoke else 16
        self.result: dict = {"stages": {}}
        self.measure_cpu = timer("cpu", warmup=0, repeats=1)

    def bench(self, fn) -> float:
        """Milliseconds of fn(): ``triton.testing.do_bench`` on a GPU, one timed call in the smoke run."""
        if self.device == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=5, rep=40))
        return self.measure_cpu(fn)

    def reserve_after(self, stage: str) -> float:
        """Seconds the requested stages after ``stage`` keep for themselves (a looping stage stops short of them)."""
        return sum(STAGE_RESERVE[s] for s in STAGES[STAGES.index(stage) + 1:] if s in self.requested)

    def save(self) -> None:
        write_atomic(self.out, self.result)


# ----------------------------------------------------------------------------------- stages


def stage_s0(ctx: Context) -> dict:
    """Versions, device, clocks, SM count and the measured matmul peak per dtype."""
    import triton

    info = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, device=ctx.device, smoke=ctx.smoke, git=_git_revision(),
                host_libraries_loaded=sorted(m for m in ("transformers", "peft", "huggingface_hub") if m in sys.modules))
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, capability=list(torch.cuda.get_device_capability(0)),
                    sm_count=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
        info["clocks"] = _nvidia_smi("clocks.sm,clocks.max.sm,clocks.mem,power.limit")
    else:
        info.update(name=f"{platform.machine()} {torch.get_num_threads()} threads", capability=None)
    size = 256 if ctx.smoke else 8192
    peaks = {}
    for dtype in ctx.dtypes:
        a = torch.randn(size, size, device=ctx.device, dtype=dtype)
        b = torch.randn(size, size, device=ctx.device, dtype=dtype)
        peaks[str(dtype).removeprefix("torch.")] = 2 * size**3 / ctx.bench(lambda: a @ b) / 1e9
    info["matmul_peak_tflops"] = peaks
    return info


def stage_s1(ctx: Context) -> dict:
    """Compile in a subprocess without the interpreter (kernels are interpreted objects under it)."""
    from qfusion.ops.triton.configs import table_arch

    # The device's own generation (the smoke run has none: it compiles for sm_90).
    arch = table_arch(torch.cuda.get_device_capability(0)) if ctx.device == "cuda" else 90
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "rows.json"
        main = "from compile_check import main; sys.exit(main(sys.argv[1:]))"
        command = [sys.executable, "-c", f"{BARE_PACKAGE}; {main}", "--arch", str(arch), "--json", str(rows_path)]
        command += ["--limit", "1"] if ctx.smoke else ["--full", "--jobs", str(max(os.cpu_count() or 1, 1))]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")])
        timeout = max(ctx.deadline.left() - ctx.reserve_after("S1"), 30)
        started = time.perf_counter()
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
            code, log = done.returncode, done.stdout[-4000:] + done.stderr[-2000:]
        except subprocess.TimeoutExpired:
            code, log = "timeout", ""
        rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    from compile_check import problems

    return dict(arch=arch, exit=code, seconds=round(time.perf_counter() - started, 1), compiled=len(rows),
                problems=[dict(row, problems=problems(row)) for row in rows if problems(row)], rows=rows,
                log_tail=log if code else "")


def _poison() -> None:
    """Fill the CUDA caching allocator's free blocks with NaN, so an output row a kernel never
    writes shows up as NaN instead of stale, plausible numbers."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        block = torch.full((int(free * 0.5) // 4,), float("nan"), device="cuda")
        del block


def _ragged(ctx: Context, policy: str):
    if ctx.smoke:
        return pack([20, 9, 13], [[3, 2], [4], [2, 1, 3]], budget=(4, 2), policy=policy, device=ctx.device)
    vision = [576, 1450, 800, 1024, 1200, 640]
    questions = [[30], [25, 31], [28, 22, 35], [33, 20], [27], [29, 24, 26]]
    return pack(vision, questions, budget=(64, 16), policy=policy, device=ctx.device)


def _select(meta: AttentionMeta, rows_per_sample) -> AttentionMeta:
    rows = torch.cat(rows_per_sample)
    lengths = [len(r) for r in rows_per_sample]
    return AttentionMeta.from_lists(meta.kind[rows].tolist(), meta.group[rows].tolist(), meta.order[rows].tolist(),
                                    lengths, meta.kind.device)


def _ask_step(meta: AttentionMeta):
    """The incremental ask: each sample's last group queries everything of its sample so far."""
    sample = meta.sample_ids()
    queries, keys = [], []
    for b in range(meta.num_samples):
        rows = (sample == b).nonzero().flatten()
        last = meta.group[rows].max()
        queries.append(rows[meta.group[rows] == last])
        keys.append(rows)
    return _select(meta, queries), _select(meta, keys)


def _blind_rows(device):
    """Queries of which some see no key (orders before every key) and a sample with no key at all."""
    i32 = dict(dtype=torch.int32, device=device)
    meta_k = AttentionMeta(torch.full((40,), TEXT, **i32), torch.zeros(40, **i32), torch.arange(3, 43, **i32),
                           torch.tensor([0, 40, 40], **i32), 40)
    meta_q = AttentionMeta(torch.tensor([TEXT, QUERY, TEXT, QUERY, TEXT, TEXT], **i32), torch.zeros(6, **i32),
                           torch.tensor([0, 45, 2, 20, 0, 1], **i32), torch.tensor([0, 4, 6], **i32), 4)
    return meta_q, meta_k


def _check_case(ctx: Context, name: str, meta_q, meta_k, policy: str, dtype, dim: int) -> dict:
    """Kernel out, dq, dk, dv vs float64; bound max(2x SDPA's error in dtype, floor)."""
    from qfusion.ops.triton import triton_fusion_attention

    gen = torch.Generator(device=ctx.device).manual_seed(0)
    heads = 2
    exact = [torch.randn(t, heads, dim, generator=gen, device=ctx.device, dtype=torch.float64)
             for t in (meta_q.num_tokens, meta_k.num_tokens, meta_k.num_tokens)]
    grad = torch.randn(meta_q.num_tokens, heads, dim, generator=gen, device=ctx.device, dtype=torch.float64)
    scale = 1 / math.sqrt(dim)

    def run(fn, dt):
        xs = [x.to(dt).requires_grad_() for x in exact]
        out = fn(*xs)
        return [out, *torch.autograd.grad(out, xs, grad.to(dt))]

    _poison()
    got = run(lambda q, k, v: triton_fusion_attention(q, k, v, meta_q, meta_k, policy=policy), dtype)
    own = run(lambda q, k, v: sdpa_attention(q, k, v, meta_q, meta_k, policy, scale), dtype)
    ref = run(lambda q, k, v: eager_attention(q, k, v, meta_q, meta_k, policy, scale), torch.float64)
    row = dict(case=name, policy=policy, dtype=str(dtype).removeprefix("torch."), head_dim=dim, ok=True)
    for label, g, o, r in zip(("out", "dq", "dk", "dv"), got, own, ref):
        err = (g.double() - r).abs().max().item() if r.numel() else 0.0
        own_err = (o.double() - r).abs().max().item() if r.numel() else 0.0
        bound = max(2 * own_err, FLOOR[dtype])
        finite = bool(torch.isfinite(g).all())
        row[label] = dict(error=err, torch_error=own_err, bound=bound, finite=finite)
        row["ok"] &= finite and err <= bound
    return row


def stage_s2(ctx: Context) -> dict:
    """Correctness of out, dq, dk, dv against float64 on the ragged, ask, no-key and d=80 cases."""
    rows = []
    dims = (32,) if ctx.smoke else (64, 128)
    cases = []
    for policy in ("causal", "prefix", "grouped"):
        layout = _ragged(ctx, policy)
        for dtype in ctx.dtypes[:1]:
            cases += [("ragged", layout.meta, layout.meta, policy, dtype, d) for d in dims]
    layout = _ragged(ctx, "grouped")
    for dtype in ctx.dtypes[1:]:
        cases.append(("ragged", layout.meta, layout.meta, "grouped", dtype, dims[-1]))
    cases.append(("ask", *_ask_step(layout.meta), "grouped", ctx.dtype, dims[0]))
    cases.append(("no-key rows", *_blind_rows(ctx.device), "causal", ctx.dtype, dims[0]))
    cases.append(("d=80", layout.meta, layout.meta, "prefix", ctx.dtype, 40 if ctx.smoke else 80))
    for case in cases:
        try:
            rows.append(_check_case(ctx, *case))
        except Exception as error:  # noqa: BLE001 - one failing case must not hide the others
            rows.append(dict(case=case[0], policy=case[3], dtype=str(case[4]), head_dim=case[5], ok=False,
                             error=_describe(error)))
    if ctx.device == "cuda":
        torch.cuda.empty_cache()  # give back the poisoned blocks
    return dict(passed=sum(r["ok"] for r in rows), total=len(rows), rows=rows)


SMOKE_FUSION = (1, 20, 1, 4)  # (B, V, G, m): about 50 tokens, two tiles under the interpreter


def _fusion_shape(ctx: Context) -> tuple[int, int, int, int]:
    return SMOKE_FUSION if ctx.smoke else GOAL_FUSION


def _fusion_case(ctx: Context, policy: str, dim: int) -> Case:
    batch, vision, questions, m = _fusion_shape(ctx)
    return Case(batch, ctx.heads, dim, policy, vision=vision, questions=questions, m=m)


def _inputs(ctx: Context, case: Case):
    meta = case.meta(ctx.device)
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    q, k, v = (torch.randn(meta.num_tokens, case.heads, case.head_dim, generator=gen, device=ctx.device,
                           dtype=ctx.dtype).requires_grad_() for _ in range(3))
    return meta, q, k, v


def _time_impl(ctx: Context, fn, inputs, backward: bool) -> dict:
    row = {}
    with torch.no_grad():
        row["fwd_ms"] = ctx.bench(fn)
    if backward:
        def step():
            out = fn()
            torch.autograd.grad(out, inputs, torch.ones_like(out))

        row["fwd+bwd_ms"] = ctx.bench(step)
    return row


def _measure(ctx: Context, case: Case, impls: dict, peak: float | None) -> list[dict]:
    """Time each (name -> builder) implementation on the case; failures are recorded per impl."""
    from qfusion.ops.triton import default_config, tile_stats

    meta, q, k, v = _inputs(ctx, case)
    pairs = sum(int(dense_mask(case.policy, meta, meta, b).sum()) for b in range(meta.num_samples))
    fwd = default_config(q).fwd
    stats = tile_stats(meta, meta, case.policy, fwd.block_m, fwd.block_n)
    flops = 4 * case.head_dim * case.heads * pairs
    executed_flops = 4 * case.head_dim * case.heads * stats.executed * fwd.block_m * fwd.block_n
    rows = []
    for name, build in impls.items():
        if ctx.deadline.left() < 15 + ctx.reserve_after("S3"):
            rows.append(dict(case=case.name, policy=case.policy, impl=name, note="dropped: deadline"))
            continue
        row = dict(case=case.name, **vars(case), impl=name, visible_pairs=pairs,
                   executed_tile_fraction=stats.executed_fraction)
        try:
            started = time.perf_counter()
            fn, inputs, backward, extra = build(q, k, v, meta, case)
            row["impl"] = extra.pop("impl", name)
            row.update(extra)
            with torch.no_grad():
                fn()  # compiles / warms up
            row["first_call_s"] = round(time.perf_counter() - started, 2)
            row.update(_time_impl(ctx, fn, inputs, backward))
            row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
            row["fwd_executed_tflops"] = executed_flops / row["fwd_ms"] / 1e9
            if peak:
                row["fwd_peak_percent"] = row["fwd_tflops"] / peak * 100
        except Exception as error:  # noqa: BLE001 - OutOfResources / CompilationError are not RuntimeErrors
            row["error"] = _describe(error)
        rows.append(row)
    return rows


def _triton_impl(q, k, v, meta, case):
    from qfusion.ops.triton import default_config, triton_fusion_attention

    return ((lambda: triton_fusion_attention(q, k, v, meta, meta, policy=case.policy)), (q, k, v), True,
            dict(config=default_config(q).as_ints()))


def _flex_impl(ctx):
    def build(q, k, v, meta, case):
        started = time.perf_counter()
        fn, inputs = flex_runner(q, k, v, meta, case.policy, ctx.device)
        return fn, inputs, ctx.device == "cuda", dict(block_mask_s=round(time.perf_counter() - started, 2))

    return build


def _sdpa_impl(backend):
    def build(q, k, v, meta, case):
        fn, inputs = sdpa_runner(backend, q, k, v, meta, case.policy)
        return fn, inputs, True, {}

    return build


def _causal_impls(ctx):
    import torch.nn.functional as F
    from einops import rearrange

    def sdpa_causal(q, k, v, meta, case):
        qp, kp, vp = (rearrange(x.detach(), "(b l) h d -> b h l d", b=case.batch).requires_grad_() for x in (q, k, v))
        return (lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)), (qp, kp, vp), True, {}

    def varlen(q, k, v, meta, case):
        found = varlen_runner(q, k, v, meta)
        if found is None:
            raise RuntimeError("neither flash_attn nor torch's varlen_attn is available")
        return found[0], found[1], True, dict(impl=found[2])

    return {"sdpa-causal": sdpa_causal, **({"varlen": varlen} if ctx.device == "cuda" else {})}


def stage_s3(ctx: Context) -> dict:
    """Times of the kernel and its baselines at the goal shapes (rows saved as they come)."""
    from torch.nn.attention import SDPBackend

    peaks = ctx.result["stages"].get("S0", {}).get("matmul_peak_tflops", {})
    peak = peaks.get(str(ctx.dtype).removeprefix("torch."))
    for limit in ("recompile_limit", "accumulated_recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 10**6)
    rows = []
    fusion_impls = {"triton": _triton_impl, "flex": _flex_impl(ctx)}
    if ctx.device == "cuda":
        fusion_impls |= {"sdpa-mem": _sdpa_impl(SDPBackend.EFFICIENT_ATTENTION), "sdpa": _sdpa_impl(None)}
    else:
        fusion_impls |= {"sdpa": _sdpa_impl(None)}
    causal_impls = {"triton": _triton_impl, **_causal_impls(ctx)}
    dims = (16,) if ctx.smoke else (64, 128)
    lengths = (48,) if ctx.smoke else (4096, 1024, 8192)
    # Most telling first, so the deadline drops the least: the fusion shape at the first head dim,
    # plain causal at the last one (the peak goal is read at L=4k, d=128), then the rest.
    jobs = [("fusion", dims[0], policy) for policy in ("causal", "prefix", "grouped")]
    jobs += [("causal", dims[-1], length) for length in lengths]
    jobs += [("fusion", dim, policy) for dim in dims[1:] for policy in ("causal", "prefix", "grouped")]
    jobs += [("causal", dim, length) for dim in dims[:-1] for length in lengths]
    for kind, dim, what in jobs:
        if kind == "fusion":
            case, impls = _fusion_case(ctx, what, dim), fusion_impls
        else:
            case, impls = Case(1 if ctx.smoke else 4, ctx.heads, dim, "causal", length=what), causal_impls
        if ctx.deadline.left() < 30 + ctx.reserve_after("S3"):
            rows.append(dict(case=case.name, **vars(case), impl="*", note="dropped: deadline"))
            continue
        rows += _measure(ctx, case, impls, peak)
        ctx.result["stages"]["S3"] = dict(rows=rows, partial=True)
        ctx.save()
        if ctx.device == "cuda":
            torch.cuda.empty_cache()
    return dict(rows=rows, dtype=str(ctx.dtype), peak_tflops=peak)


def stage_s4(ctx: Context) -> dict:
    """Forward and fwd+bwd time of a few configs at the fusion shape (grouped), and the autotuner's choice."""
    from qfusion.ops.triton import KernelConfig, PassConfig, default_config, triton_fusion_attention, tuned_configs

    rows = []
    for dim in ((16,) if ctx.smoke else (64, 128)):
        case = _fusion_case(ctx, "grouped", dim)
        meta, q, k, v = _inputs(ctx, case)
        base = default_config(q)
        if ctx.smoke:
            candidates = [base, KernelConfig.uniform(16, 16)]
        else:
            candidates = [base] + [
                KernelConfig(PassConfig(*fwd), base.dkdv, base.dq)
                for fwd in ((128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 3))
            ] + [KernelConfig(base.fwd, PassConfig(*dkdv), PassConfig(*dq))
                 for dkdv, dq in (((64, 64, 8, 3), (64, 64, 8, 3)), ((32, 128, 8, 3), (128, 32, 8, 3)))]
        for config in candidates:
            if ctx.deadline.left() < 10 + ctx.reserve_after("S4"):
                rows.append(dict(head_dim=dim, config=config.as_ints(), note="dropped: deadline"))
                continue
            row = dict(head_dim=dim, config=config.as_ints(), default=config == base)
            try:
                fn = lambda: triton_fusion_attention(q, k, v, meta, meta, policy="grouped", config=config)  # noqa: E731
                row.update(_time_impl(ctx, fn, (q, k, v), backward=True))
            except Exception as error:  # noqa: BLE001
                row["error"] = _describe(error)
            rows.append(row)
        if ctx.deadline.left() > 20 + ctx.reserve_after("S4"):
            try:
                triton_fusion_attention(q, k, v, meta, meta, policy="grouped", config="autotune")
            except Exception as error:  # noqa: BLE001
                rows.append(dict(head_dim=dim, autotune_error=_describe(error)))
    return dict(case="grouped fusion shape", rows=rows, autotuned=tuned_configs())


def stage_s5(ctx: Context) -> dict:
    """The goals, met or missed, from the S3 rows (a missing measurement counts as missed)."""
    rows = [r for r in ctx.result["stages"].get("S3", {}).get("rows", []) if "fwd_ms" in r]
    goals = goal_table(rows, fusion=_fusion_shape(ctx))
    stages = {name: stage.get("status") for name, stage in ctx.result["stages"].items()}
    s2 = ctx.result["stages"].get("S2", {})
    print(f"\nstages: {stages}; correctness {s2.get('passed')}/{s2.get('total')}")
    print_goals(goals)
    return dict(goals=goals, stage_status=stages, correctness=f"{s2.get('passed')}/{s2.get('total')}")


def stage_s6(ctx: Context) -> dict:
    """Time to first token of the 7B-shaped hosts, alone and with the plugin (tiny shapes in the smoke run)."""
    import host_ttft

    if ctx.device == "cuda":
        torch.cuda.empty_cache()  # what S2-S4 left cached
    result = host_ttft.run("smoke" if ctx.smoke else "7b", ctx.device,
                           torch.float32 if ctx.smoke else torch.bfloat16, rounds=1 if ctx.smoke else 5,
                           fusion_impl=ctx.ttft_fusion_impl, left=ctx.deadline.left,
                           host_reserve_s=0 if ctx.smoke else TTFT_HOST_RESERVE)
    host_ttft.print_table(result["rows"])
    return result


RUNNERS = {"S0": stage_s0, "S1": stage_s1, "S2": stage_s2, "S3": stage_s3, "S4": stage_s4, "S5": stage_s5,
           "S6": stage_s6}


# ------------------------------------------------------------------------------------ helpers


def _describe(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _git_revision() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git on the device image is fine
        return None


def _nvidia_smi(fields: str) -> str | None:
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def default_out(smoke: bool) -> Path:
    """results/gpu-validate-<device>.json, or a temporary file for the smoke run."""
    if smoke:
        return Path(tempfile.gettempdir()) / "gpu-validate-smoke.json"
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return HERE / "results" / f"gpu-validate-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}.json"


def main(argv=None) -> dict:
    """Run the requested stages under the deadline; returns the result that was written."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of S0..S6")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (internal deadline)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--out", default=None, help="the JSON file (default: results/gpu-validate-<device>.json)")
    parser.add_argument("--ttft-fusion-impl", default="sdpa", choices=IMPLEMENTATIONS,
                        help="the plugin's attention implementation in S6 (flex and triton compile inside the visit)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: expected names from {STAGES}, got {unknown}")
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--smoke: expected TRITON_INTERPRET=1 in the environment (set before Python starts)")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --smoke under TRITON_INTERPRET=1")
    ctx = Context(args.smoke, Deadline(args.budget), Path(args.out) if args.out else default_out(args.smoke),
                  requested=stages, ttft_fusion_impl=args.ttft_fusion_impl)
    ctx.result.update(budget_s=args.budget, requested=stages, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    for name in STAGES:
        if name not in stages:
            continue
        if ctx.deadline.left() < STAGE_RESERVE[name]:
            ctx.result["stages"][name] = dict(status="dropped: deadline")
            ctx.save()
            continue
        started = time.perf_counter()
        try:
            record = dict(RUNNERS[name](ctx), status="ok")
        except Exception as error:  # noqa: BLE001 - a failed stage is recorded; the next one runs
            record = dict(status="error", error=_describe(error), traceback=traceback.format_exc()[-3000:])
        record["seconds"] = round(time.perf_counter() - started, 1)
        ctx.result["stages"][name] = record
        print(f"{name}: {record['status']} in {record['seconds']} s", flush=True)
        ctx.save()
    print(f"wrote {ctx.out}")
    return ctx.result


if __name__ == "__main__":
    main()

"""Attention kernel benchmark: the fused Triton kernel against baselines doing the same work.

Times forward, backward and forward+backward of masked attention over fusion layouts
([V vision | ~30-token question, m slots | ~30-token question, n = m/4 slots | ...] per sample) under
each mask policy, and plain causal attention (B=4, H=16, L in 1k/4k/8k), for:

* ``triton``: :func:`qfusion.ops.triton.triton_fusion_attention` on the packed tokens;
* ``eager``: the reference (small shapes only);
* ``sdpa-mem`` / ``sdpa-cudnn``: SDPA on the per-sample padded batch with a (B, 1, L, L) boolean
  mask, backend pinned, output checked against the math backend;
* ``flex``: FlexAttention compiled (fullgraph) with a BlockMask of the same rule on the padded batch;
* ``varlen``: ``flash_attn_varlen_func`` or torch's ``varlen_attn``, plain causal only.

FLOPs are counted on the visible (query, key) pairs (4·D·H·pairs forward, 2.5x that backward) and,
for the kernel, also on the tiles it executes. Prints a table and a goal table (pass / fail) and
writes JSON to ``benchmarks/results/<device>.json`` after every case, with versions, the git
revision and the kernel's launch configs. A case that fails (Triton's ``OutOfResources`` and
``CompilationError`` included) is recorded with its error and the run goes on. Without a GPU it
says so and times the CPU baselines (eager, sdpa, flex forward) on reduced sizes.

    python benchmarks/bench_attention.py [--subset quick|full] [--policies causal,grouped]
        [--impls triton,sdpa-mem,flex] [--repeats 10] [--cpu-sizes] [--out PATH]
"""

from __future__ import annotations

import argparse
import functools
import inspect
import itertools
import math
import platform
import re
import statistics
import subprocess
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

from qfusion.files import write_json
from qfusion.layout import pack
from qfusion.ops.attention import eager_attention, pad_packed, padded_mask
from qfusion.ops.checks import interpreter_active
from qfusion.ops.meta import POLICIES, TEXT, AttentionMeta, dense_mask, mask_rule

RESULTS = Path(__file__).parent / "results"
PASSES = ("fwd", "bwd", "fwd+bwd")
EAGER_MAX_SCORES = 2**27  # eager materialises B·H·L² scores: only small shapes
GOAL_FUSION = (32, 1450, 2, 64)  # (B, V, G, m) of the fusion goal shape, L ≈ 1.6k
GOALS = {  # name -> target
    "fusion fwd+bwd vs flex": 1.2,
    "fusion fwd+bwd vs sdpa padded": 3.0,
    "causal fwd+bwd vs varlen": 1.0,
    "fwd % of peak at L=4k causal d=128": 45.0,
    "masked/causal time vs tile ratio (max deviation)": 0.05,
}


@dataclass(frozen=True)
class Case:
    """One attention shape: a fusion layout (vision > 0) or plain causal (length > 0)."""

    batch: int
    heads: int
    head_dim: int
    policy: str
    vision: int = 0
    questions: int = 0
    m: int = 0
    length: int = 0

    @property
    def name(self) -> str:
        if self.length:
            return f"causal B{self.batch} L{self.length} d{self.head_dim}"
        return f"B{self.batch} V{self.vision} G{self.questions} m{self.m} d{self.head_dim}"

    def meta(self, device) -> AttentionMeta:
        if self.length:
            t = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
            total = self.batch * self.length
            return AttentionMeta(t([TEXT] * total), t([0] * total), t(list(range(self.length)) * self.batch),
                                 t([b * self.length for b in range(self.batch + 1)]), self.length)
        # ~30-token questions, 25..35 tokens, varying across samples and groups
        questions = [[25 + (7 * b + 3 * g) % 11 for g in range(self.questions)] for b in range(self.batch)]
        return pack([self.vision] * self.batch, questions, budget=(self.m, max(self.m // 4, 1)),
                    policy=self.policy, device=device).meta


def fusion_cases(subset: str, heads: int, policies) -> list[Case]:
    if subset == "full":
        grid = itertools.product((1, 8, 32), (576, 1450, 2900), (1, 2, 3, 4), (64, 256, 768), (64, 128))
    elif subset == "quick":  # the goal shape first
        grid = [(b, v, g, m, d) for (b, v, g, m) in (GOAL_FUSION, (1, 576, 1, 64), (8, 1450, 2, 256))
                for d in (64, 128)]
    else:  # cpu
        grid = [(1, 576, 1, 64, 64), (4, 576, 2, 64, 64)]
    return [Case(b, heads, d, p, vision=v, questions=g, m=m) for (b, v, g, m, d) in grid for p in policies]


def causal_cases(subset: str, heads: int) -> list[Case]:
    if subset == "cpu":
        return [Case(1, heads, 64, "causal", length=1024)]
    return [Case(4, heads, d, "causal", length=length) for length in (1024, 4096, 8192) for d in (64, 128)]


# ----------------------------------------------------------------------------------- timing


def timer(device: str, warmup: int, repeats: int):
    """Median milliseconds of fn() (CUDA events on a GPU, perf_counter on the CPU)."""

    def cuda_ms(fn) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def cpu_ms(fn) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cuda_ms if device == "cuda" else cpu_ms


def matmul_peak_tflops(device: str, dtype: torch.dtype, measure) -> float:
    """Measured dense matmul throughput of the device in ``dtype`` (the roofline for the table)."""
    size = 8192 if device == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / measure(lambda: torch.matmul(a, b)) / 1e9


def visible_pairs(meta: AttentionMeta, policy: str) -> int:
    return sum(int(dense_mask(policy, meta, meta, b).sum()) for b in range(meta.num_samples))


# -------------------------------------------------------------------------------- implementations


def padded(x, meta):
    """(T, H, D) packed -> (B, H, L, D) padded."""
    return rearrange(pad_packed(x, meta)[0], "b l h d -> b h l d")


def sdpa_runner(backend, q, k, v, meta, policy):
    """SDPA on the per-sample padded batch with a (B, 1, L, L) boolean mask; backend pinned unless None."""
    from torch.nn.attention import sdpa_kernel

    mask = padded_mask(policy, meta, meta)
    mask = (mask | ~mask.any(-1, keepdim=True))[:, None]  # rows seeing nothing (padding): see all
    qp, kp, vp = (padded(x.detach(), meta).requires_grad_() for x in (q, k, v))

    def run():
        if backend is None:
            return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)

    return run, (qp, kp, vp)


def flex_runner(q, k, v, meta, policy, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    kind, _ = pad_packed(meta.kind, meta)
    group, _ = pad_packed(meta.group, meta)
    order, valid = pad_packed(meta.order, meta)

    def mask_mod(b, h, qi, ki):
        rule = mask_rule(policy, kind[b, qi], group[b, qi], order[b, qi], kind[b, ki], group[b, ki], order[b, ki])
        return rule & valid[b, qi] & valid[b, ki]

    length = meta.max_seqlen
    # Compiled mask creation on a GPU: it never materialises the (B, L, L) intermediates.
    block_mask = create_block_mask(mask_mod, meta.num_samples, None, length, length, device=device,
                                   _compile=device == "cuda")
    compiled = compiled_flex()
    # CPU FlexAttention refuses inputs that require grad (it has no backward there).
    qp, kp, vp = (padded(x.detach(), meta).requires_grad_(device == "cuda") for x in (q, k, v))
    return (lambda: compiled(qp, kp, vp, block_mask=block_mask)), (qp, kp, vp)


@functools.cache
def compiled_flex():
    """One compiled FlexAttention for the whole run (dynamo specialises it once per shape)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, fullgraph=True, dynamic=False)


def varlen_runner(q, k, v, meta):
    """FlashAttention's or torch's varlen kernel (plain causal), or None when neither is present."""
    qv, kv, vv = (x.detach().requires_grad_() for x in (q, k, v))
    cu, length = meta.cu_seqlens, meta.max_seqlen
    try:
        from flash_attn import flash_attn_varlen_func

        return (lambda: flash_attn_varlen_func(qv, kv, vv, cu, cu, length, length, causal=True)), (qv, kv, vv), "fa-varlen"
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    causal = ({"window_size": (-1, 0)} if "window_size" in inspect.signature(varlen_attn).parameters
              else {"is_causal": True})
    return (lambda: varlen_attn(qv, kv, vv, cu, cu, length, length, **causal)), (qv, kv, vv), "torch-varlen"


def runners(case: Case, impls, q, k, v, meta, device, config=None):
    """name -> (fn, inputs, unpad) for every implementation that applies to the case.

    config: the kernel's config (None: its table; "autotune": the autotuner's choice).
    """
    from torch.nn.attention import SDPBackend

    from qfusion.ops.triton import triton_fusion_attention

    scale = 1 / math.sqrt(case.head_dim)
    packed = (q, k, v)
    unpad = unpadder(meta)
    out = {}
    if "triton" in impls and device == "cuda":
        out["triton"] = (lambda: triton_fusion_attention(q, k, v, meta, meta, policy=case.policy, config=config),
                         packed, None)
    if "triton" in impls and device == "cpu" and interpreter_active() and q.dtype != torch.bfloat16:
        # Under the interpreter: correctness and harness only, never a speed.
        out["triton"] = (lambda: triton_fusion_attention(q, k, v, meta, meta, policy=case.policy), packed, None)
    if "eager" in impls and case.batch * case.heads * meta.max_seqlen**2 <= EAGER_MAX_SCORES:
        out["eager"] = (lambda: eager_attention(q, k, v, meta, meta, case.policy, scale), packed, None)
    if "sdpa" in impls:
        # On a GPU each fused backend is pinned; on the CPU SDPA picks its own.
        backends = ({"sdpa-mem": SDPBackend.EFFICIENT_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}
                    if device == "cuda" else {"sdpa": None})
        for name, backend in backends.items():
            fn, inputs = sdpa_runner(backend, q, k, v, meta, case.policy)
            out[name] = (fn, inputs, unpad)
    if "flex" in impls:
        fn, inputs = flex_runner(q, k, v, meta, case.policy, device)
        out["flex"] = (fn, inputs, unpad)
    if "varlen" in impls and case.length and device == "cuda":
        found = varlen_runner(q, k, v, meta)
        if found is not None:
            out[found[2]] = (found[0], found[1], None)
    return out


def unpadder(meta: AttentionMeta):
    """(B, H, L, D) padded -> (T, H, D) packed."""
    sample = meta.sample_ids()
    local = torch.arange(meta.num_tokens, device=sample.device) - meta.cu_seqlens.long()[sample]
    return lambda out: rearrange(out, "b h l d -> b l h d")[sample, local]


def math_reference(case: Case, q, k, v, meta: AttentionMeta) -> torch.Tensor:
    """(T, H, D) float32 output of SDPA's math backend, one sample at a time (what fast paths are checked against)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = []
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        for b in range(meta.num_samples):
            s, e = (int(x) for x in meta.cu_seqlens[b : b + 2])
            mask = dense_mask(case.policy, meta, meta, b)
            seen = mask.any(-1, keepdim=True)
            qs, ks, vs = (rearrange(x[s:e].float(), "l h d -> 1 h l d") for x in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=(mask | ~seen)[None, None])
            out.append(rearrange(o, "1 h l d -> l h d") * seen[:, :, None])
    return torch.cat(out)


# ------------------------------------------------------------------------------------- the run


def make_inputs(case: Case, device, dtype):
    """The case's metadata and random packed q, k, v: (T, H, D), requiring grad."""
    meta = case.meta(device)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(meta.num_tokens, case.heads, case.head_dim, device=device, dtype=dtype,
                           generator=gen).requires_grad_() for _ in range(3))
    return meta, q, k, v


def measure_case(case: Case, impls, device, dtype, measure, kernel_config=None) -> list[dict]:
    from qfusion.ops.triton.configs import select_config
    from qfusion.ops.triton.plan import tile_stats

    meta, q, k, v = make_inputs(case, device, dtype)
    pairs = visible_pairs(meta, case.policy)
    flops_fwd = 4 * case.head_dim * case.heads * pairs
    # The tiles the GPU kernel's forward would run for this layout (this device's, else sm_90's, bfloat16 config).
    capability = torch.cuda.get_device_capability() if device == "cuda" else (9, 0)
    config = select_config(capability, torch.bfloat16, case.head_dim)
    tiles = tile_stats(meta, meta, case.policy, config.fwd.block_m, config.fwd.block_n)
    flops_executed = 4 * case.head_dim * case.heads * tiles.executed * config.fwd.block_m * config.fwd.block_n
    reference = math_reference(case, q, k, v, meta)
    rows = []
    for name, (fn, inputs, unpad) in runners(case, impls, q, k, v, meta, device, kernel_config).items():
        row = dict(case=case.name, **asdict(case), impl=name, visible_pairs=pairs,
                   executed_tile_fraction=tiles.executed_fraction)
        if name == "triton":  # the autotuner's choices are listed under "autotuned"
            row["kernel_config"] = "autotune" if kernel_config == "autotune" else config.as_ints()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with torch.no_grad():
                    got = fn()
            fallback = [str(w.message) for w in caught if re.search("unfused|fall|recompile", str(w.message))]
            if fallback:
                row["note"] = f"fell back: {fallback[0][:80]}"
            got = unpad(got) if unpad else got
            row["max_abs_error_vs_math"] = (got.float() - reference).abs().max().item()
            with torch.no_grad():
                row["fwd_ms"] = measure(fn)
            if not (name == "flex" and device == "cpu"):  # FlexAttention has no CPU backward
                out = fn()
                grad = torch.randn_like(out)
                row["bwd_ms"] = measure(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True))
                row["fwd+bwd_ms"] = measure(lambda: torch.autograd.grad(fn(), inputs, grad))
        except Exception as error:  # noqa: BLE001 - a backend that rejects this mask, OutOfResources, ...
            lines = str(error).strip().splitlines()
            row["note"] = f"failed: {type(error).__name__}: {lines[0][:100] if lines else ''}"
        for p in PASSES:
            if f"{p}_ms" in row:
                factor = {"fwd": 1, "bwd": 2.5, "fwd+bwd": 3.5}[p]
                row[f"{p}_tflops"] = flops_fwd * factor / row[f"{p}_ms"] / 1e9
                if name == "triton":
                    row[f"{p}_executed_tflops"] = flops_executed * factor / row[f"{p}_ms"] / 1e9
        rows.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Per pass, each baseline's time / triton's; per impl, a policy's forward time and executed
    tiles relative to causal on the same layout (block-sparse kernels should track the tiles)."""
    by_case = {}
    for row in rows:
        by_case.setdefault((row["case"], row["policy"]), {})[row["impl"]] = row
    for (case, policy), impls in by_case.items():
        fast = impls.get("triton")
        for name, row in impls.items():
            for p in PASSES:
                if fast and f"{p}_ms" in row and f"{p}_ms" in fast:
                    row[f"{p}_time_over_triton"] = row[f"{p}_ms"] / fast[f"{p}_ms"]
            causal = by_case.get((case, "causal"), {}).get(name)
            if causal and "fwd_ms" in row and "fwd_ms" in causal:
                row["time_vs_causal"] = row["fwd_ms"] / causal["fwd_ms"]
                row["tiles_vs_causal"] = row["executed_tile_fraction"] / causal["executed_tile_fraction"]


def print_table(rows: list[dict], peak: float) -> None:
    columns = [  # header, width, key, format
        ("case", 30, "case", ""), ("policy", 7, "policy", ""), ("impl", 12, "impl", ""),
        ("tiles", 5, "executed_tile_fraction", ".2f"),
        ("fwd ms", 9, "fwd_ms", ".3f"), ("TF/s", 7, "fwd_tflops", ".3g"),
        ("bwd ms", 9, "bwd_ms", ".3f"), ("TF/s", 7, "bwd_tflops", ".3g"),
        ("f+b ms", 9, "fwd+bwd_ms", ".3f"), ("TF/s", 7, "fwd+bwd_tflops", ".3g"),
        ("fwd %pk", 7, "fwd_peak_percent", ".1f"), ("/triton", 7, "fwd_time_over_triton", ".2f"),
        ("t/causal", 8, "time_vs_causal", ".2f"), ("tiles/c", 7, "tiles_vs_causal", ".2f"),
        ("max err", 8, "max_abs_error_vs_math", ".1e"),
    ]
    header = " ".join(f"{h:>{w}}" if fmt else f"{h:{w}}" for h, w, _, fmt in columns) + "  note"
    print(header)
    print("-" * len(header))
    for row in rows:
        if "fwd_tflops" in row:
            row["fwd_peak_percent"] = row["fwd_tflops"] / peak * 100
        cells = []
        for _, width, key, fmt in columns:
            value = row.get(key)
            text = "-" if value is None else format(value, fmt)
            cells.append(f"{text:>{width}}" if fmt else f"{text:{width}}")
        print(" ".join(cells) + "  " + row.get("note", ""))


def goal_table(rows: list[dict], fusion: tuple[int, int, int, int] = GOAL_FUSION) -> list[dict]:
    """The goals (:data:`GOALS`) met or missed, from rows with case/policy/impl and times.

    fusion: (B, V, G, m) of the fusion shape the fusion goals are read at.
    A goal whose measurements are missing is listed with value None and counted as missed.
    """
    by = {(r["case"], r["policy"], r["impl"]): r for r in rows}

    def ratio(case, policy, slow_impls, key):
        fast = by.get((case, policy, "triton"), {})
        slow = next((by[(case, policy, s)] for s in slow_impls if (case, policy, s) in by), {})
        return slow[key] / fast[key] if key in slow and key in fast else None

    goals = []

    def add(goal, case, value, higher_is_better=True):
        target = GOALS[goal]
        met = value is not None and (value >= target if higher_is_better else value <= target)
        goals.append(dict(goal=goal, case=case, value=value, target=target, met=met))

    triton_rows = [r for r in rows if r["impl"] == "triton"]
    for r in triton_rows:
        where = f"{r['case']} {r['policy']}"
        if r.get("length"):
            add("causal fwd+bwd vs varlen", where, ratio(r["case"], r["policy"], ("fa-varlen", "torch-varlen"), "fwd+bwd_ms"))
            if r["length"] == 4096 and r["head_dim"] == 128:
                add("fwd % of peak at L=4k causal d=128", where, r.get("fwd_peak_percent"))
            continue
        if (r["batch"], r["vision"], r["questions"], r["m"]) != tuple(fusion):
            continue
        add("fusion fwd+bwd vs flex", where, ratio(r["case"], r["policy"], ("flex",), "fwd+bwd_ms"))
        add("fusion fwd+bwd vs sdpa padded", where, ratio(r["case"], r["policy"], ("sdpa-mem", "sdpa"), "fwd+bwd_ms"))
        causal = by.get((r["case"], "causal", "triton"), {})
        if r["policy"] != "causal":
            deviation = None
            if "fwd_ms" in r and "fwd_ms" in causal:
                tile_ratio = r["executed_tile_fraction"] / causal["executed_tile_fraction"]
                deviation = abs(r["fwd_ms"] / causal["fwd_ms"] / tile_ratio - 1)
            add("masked/causal time vs tile ratio (max deviation)", where, deviation, higher_is_better=False)
    return goals


def print_goals(goals: list[dict]) -> None:
    print(f"\n{'goal':50} {'case':36} {'value':>8} {'target':>7}  met")
    for g in goals:
        value = "-" if g["value"] is None else f"{g['value']:.3g}"
        print(f"{g['goal']:50} {g['case']:36} {value:>8} {g['target']:>7}  {'yes' if g['met'] else 'no'}")


def versions() -> dict:
    """Library versions and the git revision, for the result file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                  text=True, timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git on the machine is fine
        revision = None
    return dict(python=platform.python_version(), torch=torch.__version__, triton=triton_version,
                cuda=torch.version.cuda, git=revision)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} {torch.get_num_threads()} threads"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subset", choices=("quick", "full"), default="quick",
                        help="fusion shapes: 'quick' (6 layouts) or 'full' (B x V x G x m x d grid)")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--impls", default="triton,eager,sdpa,flex,varlen",
                        help="sdpa = the memory-efficient and cuDNN backends on a GPU, SDPA's own choice on the CPU")
    parser.add_argument("--no-causal", action="store_true", help="skip the plain causal L=1k/4k/8k cases")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cpu-sizes", action="store_true", help="reduced sizes (the default without a GPU)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>.json)")
    parser.add_argument("--autotune", action="store_true",
                        help="run the kernel with the autotuner's choice per shape (recorded in the JSON)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("No GPU: timing the CPU baselines only (eager, sdpa, flex forward) on reduced sizes, float32.")
        args.cpu_sizes = True
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    impls = set(args.impls.split(","))
    if device == "cpu":
        impls &= {"eager", "sdpa", "flex"}
    # Every shape compiles FlexAttention anew; never let dynamo give up and run it unfused.
    for limit in ("recompile_limit", "accumulated_recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 10**6)
    subset = "cpu" if args.cpu_sizes else args.subset
    measure = timer(device, args.warmup, args.repeats)
    peak = matmul_peak_tflops(device, dtype, measure)
    print(f"device: {device_name(device)}; {dtype}; measured matmul peak {peak:.1f} TFLOP/s")

    cases = fusion_cases(subset, args.heads, args.policies.split(","))
    if not args.no_causal:
        cases += causal_cases(subset, args.heads)

    name = device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = Path(args.out) if args.out else RESULTS / (f"{slug}.json" if device == "cuda" else f"cpu-{slug}.json")
    result = {"device": name, "dtype": str(dtype), **versions(), "matmul_peak_tflops": peak,
              "flops": "4·D·H·visible pairs forward (executed: 4·D·H·executed tiles·block_m·block_n), 2.5x backward",
              "kernel_config": "block_m, block_n, num_warps, num_stages of fwd, dkdv, dq",
              "warmup": args.warmup, "repeats": args.repeats, "rows": []}
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    for case in cases:
        rows += measure_case(case, impls, device, dtype, measure, "autotune" if args.autotune else None)
        if args.autotune:
            from qfusion.ops.triton import tuned_configs

            result["autotuned"] = tuned_configs()
        write_json(result, path)  # as it goes: a crash keeps what was measured
    add_ratios(rows)
    print_table(rows, peak)
    result["goals"] = goal_table(rows)
    print_goals(result["goals"])
    write_json(result, path)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

"""pytest-benchmark cases for the attention kernel and its baselines (``pytest benchmarks/``).

The GPU cases time the fused Triton kernel and the baselines of ``bench_attention.py`` on a few
fusion and plain-causal shapes; without CUDA they skip, except one tiny CPU case that keeps the
harness exercised. With ``--benchmark-disable`` (the project default) every case runs once as a
plain test; pass ``--benchmark-enable`` to time them.
"""

import os

import pytest
import torch

from bench_attention import GOAL_FUSION, GOALS, Case, goal_table, make_inputs, math_reference, runners

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

GPU_CASES = [
    Case(1, 16, 64, "causal", vision=576, questions=1, m=64),
    Case(8, 16, 128, "grouped", vision=1450, questions=2, m=256),
    Case(4, 16, 128, "causal", length=4096),
]


def step(fn, inputs, backward: bool):
    """One forward (and backward) of fn, synchronised so the timer sees the whole of it."""

    def run():
        if backward:
            out = fn()
            torch.autograd.grad(out, inputs, torch.ones_like(out))
        else:
            with torch.no_grad():
                fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a GPU")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["triton", "sdpa-mem", "flex"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c.name} {c.policy}".replace(" ", "-"))
def test_attention_gpu(benchmark, case, impl, backward):
    meta, q, k, v = make_inputs(case, "cuda", torch.bfloat16)
    fn, inputs, unpad = runners(case, {impl.split("-")[0]}, q, k, v, meta, "cuda")[impl]
    with torch.no_grad():
        out = fn()
    got = unpad(out) if unpad else out
    assert (got.float() - math_reference(case, q, k, v, meta)).abs().max() < 0.05
    benchmark.group = f"{case.name} {case.policy} {'fwd+bwd' if backward else 'fwd'}"
    benchmark(step(fn, inputs, backward))


@pytest.mark.parametrize("impl", ["eager", "sdpa"] + (["triton"] if INTERPRETED else []))
def test_attention_cpu_tiny(benchmark, impl):
    case = Case(2, 2, 16, "grouped", vision=40, questions=2, m=8)
    meta, q, k, v = make_inputs(case, "cpu", torch.float32)
    fn, inputs, unpad = runners(case, {impl}, q, k, v, meta, "cpu")[impl]
    with torch.no_grad():
        out = fn()
    got = unpad(out) if unpad else out
    torch.testing.assert_close(got, math_reference(case, q, k, v, meta), rtol=1e-5, atol=1e-5)
    benchmark.group = "tiny cpu"
    benchmark(step(fn, inputs, backward=True))


def goal_rows(triton_ms: float, flex_ms: float, sdpa_ms: float):
    b, v, g, m = GOAL_FUSION
    fusion = dict(case="goal", batch=b, vision=v, questions=g, m=m, length=0, head_dim=64)
    rows = []
    for policy, tiles in (("causal", 0.5), ("grouped", 0.9)):
        scale = tiles / 0.5  # grouped executes 1.8x the tiles of causal and takes 1.8x the time
        for impl, ms in (("triton", triton_ms * scale), ("flex", flex_ms * scale), ("sdpa-mem", sdpa_ms * scale)):
            rows.append(dict(fusion, policy=policy, impl=impl, executed_tile_fraction=tiles, **{"fwd_ms": ms, "fwd+bwd_ms": ms}))
    causal = dict(case="causal 4k", batch=4, length=4096, head_dim=128, policy="causal")
    rows.append(dict(causal, impl="triton", **{"fwd_ms": 1.0, "fwd+bwd_ms": 3.0}, fwd_peak_percent=50.0))
    rows.append(dict(causal, impl="torch-varlen", **{"fwd_ms": 0.9, "fwd+bwd_ms": 2.7}))
    return rows


def test_goal_table_says_which_goals_are_met():
    goals = {(g["goal"], g["case"]): g for g in goal_table(goal_rows(triton_ms=1.0, flex_ms=1.5, sdpa_ms=2.0))}
    assert set(g for g, _ in goals) == set(GOALS)
    assert goals[("fusion fwd+bwd vs flex", "goal causal")]["met"]  # 1.5x >= 1.2x
    assert not goals[("fusion fwd+bwd vs sdpa padded", "goal causal")]["met"]  # 2x < 3x
    assert goals[("masked/causal time vs tile ratio (max deviation)", "goal grouped")]["value"] == pytest.approx(0)
    assert not goals[("causal fwd+bwd vs varlen", "causal 4k causal")]["met"]  # 0.9x
    assert goals[("fwd % of peak at L=4k causal d=128", "causal 4k causal")]["met"]


def test_goal_table_counts_a_missing_measurement_as_missed():
    rows = [r for r in goal_rows(1.0, 1.5, 2.0) if r["impl"] != "flex"]
    missing = [g for g in goal_table(rows) if g["goal"] == "fusion fwd+bwd vs flex"]
    assert missing and all(g["value"] is None and not g["met"] for g in missing)


def test_a_failing_implementation_is_recorded_and_the_others_still_run(monkeypatch):
    import bench_attention

    class OutOfResources(Exception):  # like Triton's: not a RuntimeError
        pass

    def failing():
        raise OutOfResources("out of resource: shared memory, Required: 262144")

    real = bench_attention.runners

    def with_failure(*args, **kwargs):
        return {"broken": (failing, (), None), **real(*args, **kwargs)}

    monkeypatch.setattr(bench_attention, "runners", with_failure)
    case = Case(1, 1, 16, "causal", vision=20, questions=1, m=4)
    rows = bench_attention.measure_case(case, {"eager"}, "cpu", torch.float32, bench_attention.timer("cpu", 0, 1))
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["broken"]["note"].startswith("failed: OutOfResources: out of resource")
    assert "fwd_ms" in by_impl["eager"] and by_impl["eager"]["max_abs_error_vs_math"] < 1e-5

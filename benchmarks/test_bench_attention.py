"""pytest-benchmark cases for the attention kernel and its baselines (``pytest benchmarks/``).

The GPU cases time the fused Triton kernel and the baselines of ``bench_attention.py`` on a few
fusion and plain-causal shapes; without CUDA they skip, except one tiny CPU case that keeps the
harness exercised. With ``--benchmark-disable`` (the project default) every case runs once as a
plain test; pass ``--benchmark-enable`` to time them.
"""

import pytest
import torch

from bench_attention import Case, make_inputs, math_reference, runners

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


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
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

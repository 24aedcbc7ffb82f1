"""The fused Triton kernel against the float64 reference, on ragged, incremental and random layouts.

Runs on CUDA, or on the CPU under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton
is imported, as ``.ci/run`` does). The interpreter is slow and computes bfloat16 dots wrongly, so
on the CPU these tests use float32 / float16, short sequences, at most 2 heads and 16- or 32-token
tiles. Tolerance, the flash-attention rule: the kernel's max error against float64 is at most
max(2 x the error of PyTorch's own attention in the same dtype, a small absolute floor).
"""

import dataclasses
import math
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernel needs triton (pip install 'qfusion[triton]')")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernel needs CUDA or TRITON_INTERPRET=1 set before triton is imported",
                allow_module_level=True)

import triton.language as tl  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qfusion.layout import pack  # noqa: E402
from qfusion.ops import fusion_attention  # noqa: E402
from qfusion.ops.attention import eager_attention  # noqa: E402
from qfusion.ops.meta import QUERY, TEXT, VISION, AttentionMeta, dense_mask, mask_rule  # noqa: E402
from qfusion.ops.triton.configs import KernelConfig, PassConfig  # noqa: E402
from qfusion.ops.triton.kernels import POLICY_CODES, kernel_mask_rule  # noqa: E402
from qfusion.ops.triton.op import triton_fusion_attention  # noqa: E402
from qfusion.ops.triton.plan import FULL, SKIP, build_plan, tile_classes, tile_lists, tile_stats  # noqa: E402

POLICIES = ["causal", "prefix", "grouped"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def exact_float32_dots():
    # float32 dots follow PyTorch's matmul precision: keep them exact (no TF32) in these tests.
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


# ------------------------------------------------------------------------------------- helpers


def to_device(meta: AttentionMeta) -> AttentionMeta:
    return meta.to(DEVICE)


def select(meta: AttentionMeta, rows_per_sample: list[torch.Tensor]) -> AttentionMeta:
    """The metadata of the given packed rows, one run per sample."""
    rows = torch.cat(rows_per_sample)
    lengths = [len(r) for r in rows_per_sample]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return AttentionMeta(meta.kind[rows], meta.group[rows], meta.order[rows], cu, max(lengths))


def incremental_metas(layout, asking: set[int]):
    """An ``ask`` step: queries are the last group of each sample in ``asking`` (the others ask
    nothing), keys are every token of each sample so far (cached plus new)."""
    meta, sample = layout.meta, layout.meta.sample_ids()
    queries, keys = [], []
    for b in range(meta.num_samples):
        rows = (sample == b).nonzero().flatten()
        last = meta.group[rows].max()
        asks = b in asking and last >= 0
        queries.append(rows[meta.group[rows] == last] if asks else rows[:0])
        keys.append(rows)
    return select(meta, queries), select(meta, keys)


def random_inputs(tq, tk, heads, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(t, heads, dim, generator=gen, dtype=torch.float64) for t in (tq, tk, tk))
    grad_out = torch.randn(tq, heads, dim, generator=gen, dtype=torch.float64)
    return q, k, v, grad_out


def output_and_grads(fn, q, k, v, grad_out, dtype):
    """fn's output and (dq, dk, dv) on inputs cast to dtype (on DEVICE)."""
    xs = [x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v)]
    out = fn(*xs)
    return (out, *torch.autograd.grad(out, xs, grad_out.to(DEVICE, dtype)))


def assert_flash_close(meta_q, meta_k, policy, dtype, *, heads=2, dim=32, seed=0, block_m=16, block_n=16,
                       config=None):
    """Kernel output and gradients vs float64, within 2x PyTorch's own error in ``dtype``."""
    meta_q, meta_k = to_device(meta_q), to_device(meta_k)
    q, k, v, grad_out = random_inputs(meta_q.num_tokens, meta_k.num_tokens, heads, dim, seed)
    scale = 1 / math.sqrt(dim)

    def kernel(q, k, v):
        if config is not None:
            return triton_fusion_attention(q, k, v, meta_q, meta_k, policy=policy, config=config)
        return triton_fusion_attention(q, k, v, meta_q, meta_k, policy=policy, block_m=block_m, block_n=block_n)

    def reference(q, k, v):
        return eager_attention(q, k, v, meta_q, meta_k, policy, scale)

    got = output_and_grads(kernel, q, k, v, grad_out, dtype)
    torch_own = output_and_grads(reference, q, k, v, grad_out, dtype)
    exact = output_and_grads(reference, q, k, v, grad_out, torch.float64)
    for name, g, t, e in zip(("out", "dq", "dk", "dv"), got, torch_own, exact):
        assert g.dtype == dtype and g.shape == e.shape
        err = (g.double() - e).abs().max().item() if e.numel() else 0.0
        torch_err = (t.double() - e).abs().max().item() if e.numel() else 0.0
        bound = max(2 * torch_err, FLOOR[dtype])
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (PyTorch's own {torch_err:.3g})"


# A batch with vision lengths that are multiples of no tile size, 1-token questions, several samples
# and groups; one with m = n = 1; one with a sample without vision and long questions; one sample of
# 273 tokens with paper-like proportions.
LAYOUTS = {
    "ragged": (dict(vision_lengths=[37, 20, 5], question_lengths=[[1, 5], [3], [1, 1, 2]], budget=(5, 3)), (16, 16)),
    "single-slot": (dict(vision_lengths=[19, 33], question_lengths=[[1], [1, 1, 1]], budget=(1, 1)), (32, 16)),
    "no-vision": (dict(vision_lengths=[0, 23], question_lengths=[[17, 2], [9, 1]], budget=(6, 2)), (16, 32)),
    "long": (dict(vision_lengths=[150], question_lengths=[[30, 12, 1]], budget=(48, 16)), (32, 32)),
}


# --------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("policy", POLICIES)
def test_output_and_gradients_match_float64_reference(policy, layout_name, dtype):
    spec, (block_m, block_n) = LAYOUTS[layout_name]
    layout = pack(**spec, policy=policy)
    assert_flash_close(layout.meta, layout.meta, policy, dtype, block_m=block_m, block_n=block_n)


@pytest.mark.parametrize("policy", POLICIES)
def test_each_pass_with_its_own_tile_sizes_matches_reference(policy):
    # forward, dK/dV and dQ with three different tilings: each pass reads its own tile lists
    config = KernelConfig(PassConfig(32, 16), PassConfig(16, 32), PassConfig(16, 16))
    layout = pack([37, 20, 5], [[1, 5], [3], [1, 1, 2]], budget=(5, 3), policy=policy)
    assert_flash_close(layout.meta, layout.meta, policy, torch.float16, config=config, seed=11)


def test_large_logits_stay_finite_and_match_reference_float16():
    # scores of ~1e3: a half-precision softmax would overflow; the kernel's is float32
    layout = pack([30], [[4, 3]], budget=(4, 2), policy="prefix")
    meta = to_device(layout.meta)
    q, k, v, _ = random_inputs(layout.num_tokens, layout.num_tokens, 1, 16, seed=12)
    q, k = q * 40, k * 40
    got = triton_fusion_attention(*(x.to(DEVICE, torch.float16) for x in (q, k, v)), meta, meta, policy="prefix")
    want = eager_attention(q, k, v, meta, meta, "prefix", 0.25)
    assert torch.isfinite(got).all()
    own = eager_attention(*(x.to(DEVICE, torch.float16) for x in (q, k, v)), meta, meta, "prefix", 0.25)
    assert (got.double() - want).abs().max() <= max(2 * (own.double() - want).abs().max().item(), 1e-2)


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter refuses bfloat16; a GPU runs it")
def test_bfloat16_under_the_interpreter_is_refused_naming_the_reason():
    layout = pack([5], [[2]], budget=(2, 1))
    q = torch.randn(layout.num_tokens, 1, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="q: bfloat16 is not supported under the Triton interpreter"):
        triton_fusion_attention(q, q, q, layout.meta, layout.meta, policy="causal")
    with pytest.raises(TypeError, match="TRITON_INTERPRET=1"):
        fusion_attention(q, q, q, layout.meta, layout.meta, policy="causal", impl="triton")


@pytest.mark.parametrize("dim", [16, 40, 64])
def test_head_dims_that_need_padding_or_small_tiles(dim):
    layout = pack([21], [[3, 2]], budget=(4, 2), policy="prefix")
    assert_flash_close(layout.meta, layout.meta, "prefix", torch.float32, heads=1, dim=dim, block_m=32, block_n=32)


@pytest.mark.parametrize("policy", POLICIES)
def test_incremental_queries_against_cached_keys_match_reference(policy):
    layout = pack([18, 7, 30], [[2, 1, 3], [4], [1, 2]], budget=(4, 2), policy=policy)
    meta_q, meta_k = incremental_metas(layout, asking={0, 2})  # sample 1 has no new queries
    assert meta_q.seqlens().tolist()[1] == 0 and meta_q.seqlens().tolist() != meta_k.seqlens().tolist()
    assert_flash_close(meta_q, meta_k, policy, torch.float32, seed=3)


@pytest.mark.parametrize("policy", POLICIES)
def test_vision_prefix_alone_matches_reference(policy):
    # What `start` runs: vision against vision; under prefix/grouped every tile is fully visible,
    # including the short last tile of each sample.
    layout = pack([37, 9, 20], [[1], [1], [1]], budget=(1, 1), policy=policy)
    sample = layout.meta.sample_ids()
    vision = [r[layout.meta.kind[r] == VISION] for r in ((sample == b).nonzero().flatten() for b in range(3))]
    meta = select(layout.meta, vision)
    assert_flash_close(meta, meta, policy, torch.float32, seed=8)


def test_rows_that_see_no_key_are_zero_with_finite_gradients():
    # sample 0: keys at orders 3..22, queries at orders 0, 25, 2, 10 (the 1st and 3rd see nothing);
    # sample 1: two queries and no key at all.
    int32 = dict(dtype=torch.int32)
    meta_k = AttentionMeta(torch.full((20,), TEXT, **int32), torch.zeros(20, **int32),
                           torch.arange(3, 23, **int32), torch.tensor([0, 20, 20], **int32), 20)
    meta_q = AttentionMeta(torch.tensor([TEXT, QUERY, TEXT, QUERY, TEXT, TEXT], **int32), torch.zeros(6, **int32),
                           torch.tensor([0, 25, 2, 10, 0, 1], **int32), torch.tensor([0, 4, 6], **int32), 4)
    meta_q, meta_k = to_device(meta_q), to_device(meta_k)
    q, k, v, grad_out = random_inputs(6, 20, 2, 32, seed=4)
    for policy in POLICIES:
        out, dq, dk, dv = output_and_grads(
            lambda q, k, v: triton_fusion_attention(q, k, v, meta_q, meta_k, policy=policy, block_m=16, block_n=16),
            q, k, v, grad_out, torch.float32)
        blind = torch.tensor([True, False, True, False, True, True], device=DEVICE)
        assert torch.equal(out[blind], torch.zeros_like(out[blind]))
        assert torch.equal(dq[blind], torch.zeros_like(dq[blind]))
        assert out[~blind].abs().sum() > 0
        for grad in (dq, dk, dv):
            assert torch.isfinite(grad).all()
    assert_flash_close(meta_q, meta_k, "causal", torch.float32, seed=4)


@st.composite
def random_cases(draw):
    """A random packed layout (or an ask step on it), policy, tile sizes and shape."""
    policy = draw(st.sampled_from(POLICIES))
    samples = draw(st.integers(1, 3))
    vision = draw(st.lists(st.integers(0, 40), min_size=samples, max_size=samples))
    questions = draw(st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=3), min_size=samples, max_size=samples))
    m = draw(st.integers(1, 6))
    layout = pack(vision, questions, budget=(m, draw(st.integers(1, m))), policy=policy)
    if draw(st.booleans()):
        metas = incremental_metas(layout, set(draw(st.lists(st.integers(0, samples - 1)))))
    else:
        metas = (layout.meta, layout.meta)
    block_m, block_n = draw(st.sampled_from([(16, 16), (16, 32), (32, 16)]))
    return dict(metas=metas, policy=policy, heads=draw(st.integers(1, 2)), dim=draw(st.sampled_from([16, 32])),
                seed=draw(st.integers(0, 2**16)), block_m=block_m, block_n=block_n)


def check_case(case):
    assert_flash_close(*case.pop("metas"), case.pop("policy"), torch.float32, **case)


@settings(max_examples=10, deadline=None)
@given(case=random_cases())
def test_random_layouts_match_reference(case):
    check_case(case)


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(case=random_cases())
def test_random_layouts_match_reference_many_examples(case):
    check_case(case)


def test_fusion_attention_impl_triton_equals_eager():
    layout = pack([13, 26], [[2, 3], [1]], budget=(4, 3), policy="grouped")
    meta = to_device(layout.meta)
    q, k, v, grad_out = random_inputs(layout.num_tokens, layout.num_tokens, 2, 32, seed=5)
    results = {
        impl: output_and_grads(lambda q, k, v: fusion_attention(q, k, v, meta, meta, policy="grouped", impl=impl),
                               q, k, v, grad_out, torch.float32)
        for impl in ("triton", "eager")
    }
    for got, want in zip(results["triton"], results["eager"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- rule and tiles


@triton.jit
def _rule_kernel(QKind, QGroup, QOrder, KKind, KGroup, KOrder, Out, n, POLICY: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    args = [tl.load(p + offs, mask=valid, other=0) for p in (QKind, QGroup, QOrder, KKind, KGroup, KOrder)]
    tl.store(Out + offs, kernel_mask_rule(POLICY, *args).to(tl.int32), mask=valid)


@pytest.mark.parametrize("policy", POLICIES)
def test_jitted_rule_twin_equals_mask_rule(policy):
    tokens = torch.cartesian_prod(torch.tensor([VISION, TEXT, QUERY]), torch.tensor([-1, 0, 1, 2]), torch.arange(3))
    pairs = torch.cat([tokens.repeat_interleave(len(tokens), 0), tokens.repeat(len(tokens), 1)], dim=1)
    columns = [c.to(DEVICE, torch.int32).contiguous() for c in pairs.unbind(1)]
    got = torch.empty(len(pairs), dtype=torch.int32, device=DEVICE)
    _rule_kernel[(1,)](*columns, got, len(pairs), POLICY=POLICY_CODES[policy],
                       BLOCK=triton.next_power_of_2(len(pairs)))
    assert torch.equal(got.bool(), mask_rule(policy, *columns))


def assert_tile_plan_sound(meta_q, meta_k, policy, block_m, block_n):
    """No skipped tile holds a visible pair; every full tile is complete and shows all its pairs;
    the lists hold exactly the full / partial tiles of each row, in increasing order."""
    classes = tile_classes(meta_q, meta_k, policy, block_m, block_n)
    lists = tile_lists(classes)
    for b in range(meta_q.num_samples):
        mask = dense_mask(policy, meta_q, meta_k, b)
        for i in range(classes.shape[1]):
            for j in range(classes.shape[2]):
                tile = mask[i * block_m : (i + 1) * block_m, j * block_n : (j + 1) * block_n]
                c = classes[b, i, j]
                assert not (c == SKIP and tile.any()), f"sample {b} tile ({i}, {j}) skipped with visible pairs"
                if c == FULL:
                    assert tile.shape == (block_m, block_n) and tile.all(), f"sample {b} tile ({i}, {j}) not full"
            for count, indices, cls in ((lists.full_num, lists.full_idx, FULL), (lists.part_num, lists.part_idx, 1)):
                listed = indices[b, i, : count[b, i]].tolist()
                assert listed == (classes[b, i] == cls).nonzero().flatten().tolist()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("blocks", [(16, 16), (16, 64), (64, 16)])
def test_tile_skipping_never_hides_a_visible_pair(policy, blocks):
    layout = pack([37, 130, 5, 0], [[1, 20, 17], [3], [1, 1, 2, 40], [16, 16]], budget=(20, 9), policy=policy)
    assert_tile_plan_sound(layout.meta, layout.meta, policy, *blocks)
    assert_tile_plan_sound(*incremental_metas(layout, {0, 2, 3}), policy, *blocks)


@given(policy=st.sampled_from(POLICIES), data=st.data(),
       block_m=st.sampled_from([16, 32]), block_n=st.sampled_from([16, 32]))
@settings(max_examples=20, deadline=None)
def test_tile_skipping_never_hides_a_visible_pair_on_random_layouts(policy, data, block_m, block_n):
    samples = data.draw(st.integers(1, 3))
    vision = data.draw(st.lists(st.integers(0, 70), min_size=samples, max_size=samples))
    questions = data.draw(st.lists(st.lists(st.integers(0, 20), min_size=1, max_size=4),
                                   min_size=samples, max_size=samples))
    m = data.draw(st.integers(1, 40))
    layout = pack(vision, questions, budget=(m, data.draw(st.integers(1, m))), policy=policy)
    assert_tile_plan_sound(layout.meta, layout.meta, policy, block_m, block_n)


def test_transposed_lists_of_the_backward_hold_the_same_pairs():
    layout = pack([37, 130], [[1, 20, 17], [3]], budget=(20, 9), policy="grouped")
    config = KernelConfig(PassConfig(32, 16), PassConfig(16, 32), PassConfig(64, 16))
    plan = build_plan(layout.meta, layout.meta, "grouped", config)
    by_key = tile_classes(layout.meta, layout.meta, "grouped", 16, 32).transpose(1, 2)
    for got, cls in ((plan.dkdv.full_num, FULL), (plan.dkdv.part_num, 1)):
        assert torch.equal(got, (by_key == cls).sum(-1, dtype=torch.int32))
    by_query = tile_classes(layout.meta, layout.meta, "grouped", 64, 16)
    assert torch.equal(plan.dq.part_num, (by_query == 1).sum(-1, dtype=torch.int32))
    assert layout.meta.max_seqlen == 153 and plan.fwd.full_idx.shape[1:] == (5, 10)  # ceil(153/32), ceil(153/16)


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisation is observable on CUDA only")
def test_tile_lists_are_built_without_host_synchronisation():
    layout = pack([37, 130], [[1, 20, 17], [3]], budget=(20, 9), policy="grouped", device=DEVICE)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = build_plan(layout.meta, layout.meta, "grouped", KernelConfig.uniform(32, 32))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert plan.fwd.full_idx.is_cuda


def test_inference_builds_the_forward_lists_only():
    layout = pack([37, 20], [[1, 5], [3]], budget=(5, 3), policy="prefix")
    config = KernelConfig(PassConfig(32, 16), PassConfig(16, 32), PassConfig(16, 16))
    plan = build_plan(layout.meta, layout.meta, "prefix", config, backward=False)
    assert plan.dkdv is plan.fwd and plan.dq is plan.fwd
    full = build_plan(layout.meta, layout.meta, "prefix", config)
    # max_seqlen 51: ceil(51 / 32) key tiles, each listing up to ceil(51 / 16) query tiles
    assert layout.meta.max_seqlen == 51 and full.dkdv.full_idx.shape[1:] == (2, 4)
    assert torch.equal(full.fwd.part_num, plan.fwd.part_num)


def test_tile_skipping_is_exact_for_plain_causal():
    meta = pack([255], [[0]], budget=(1, 1), policy="causal").meta  # 256 tokens, 16 tiles of 16
    # executed: the lower triangle with its diagonal; unmasked: strictly below the diagonal
    assert tile_stats(meta, meta, "causal", 16, 16) == (16 * 16, 16 * 17 // 2, 16 * 15 // 2)


def test_grouped_skips_other_groups_and_prefix_keeps_vision_tiles():
    layout = pack([64], [[16, 16, 16]], budget=(16, 16), policy="grouped")  # tiles: 4 vision, then 2 per group
    classes = tile_classes(layout.meta, layout.meta, "grouped", 16, 16)[0]
    assert (classes[8:10, 6:8] == SKIP).all()  # group 2 does not see group 1
    assert (classes[8:10, :6] != SKIP).all()  # ... but sees vision and group 0
    classes = tile_classes(layout.meta, layout.meta, "prefix", 16, 16)[0]
    assert (classes[:4, :4] == FULL).all()  # vision sees all vision, unmasked


# -------------------------------------------------------------------- custom op and compile


def op_arguments(policy="prefix", requires_grad=True):
    layout = pack([11, 4], [[2, 1], [3]], budget=(3, 2), policy=policy)
    meta = to_device(layout.meta)
    stacked = torch.stack([meta.kind, meta.group, meta.order])
    config = KernelConfig.uniform(16, 16)
    plan = build_plan(meta, meta, policy, config).tensors()
    q, k, v, _ = random_inputs(layout.num_tokens, layout.num_tokens, 1, 16, seed=6)
    q, k, v = (x.to(DEVICE, torch.float32).requires_grad_(requires_grad) for x in (q, k, v))
    return meta, (q, k, v, stacked, meta.cu_seqlens, stacked, meta.cu_seqlens, plan, policy, 0.25,
                  config.as_ints())


def test_custom_ops_pass_opcheck():
    _, args = op_arguments()
    torch.library.opcheck(torch.ops.qfusion.fusion_attention_fwd.default, args)
    q, k, v, *rest = args
    out, lse = torch.ops.qfusion.fusion_attention_fwd(*args)
    backward_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, *rest)
    torch.library.opcheck(torch.ops.qfusion.fusion_attention_bwd.default, backward_args)


def test_torch_compile_traces_through_the_op_in_one_graph():
    meta, (q, k, v, *_) = op_arguments()

    def step(q, k, v):
        out = triton_fusion_attention(q, k, v, meta, meta, policy="prefix", scale=0.25, block_m=16, block_n=16)
        return (out * out).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    want = torch.autograd.grad(step(q, k, v), (q, k, v))
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_rejects_bad_inputs_naming_the_argument():
    layout = pack([5], [[2]], budget=(2, 1))
    meta = to_device(layout.meta)
    q = torch.randn(layout.num_tokens, 1, 16, device=DEVICE)
    with pytest.raises(TypeError, match="q: expected dtype"):
        triton_fusion_attention(q.double(), q.double(), q.double(), meta, meta, policy="causal")
    with pytest.raises(ValueError, match="q: expected a head dim"):
        wide = torch.randn(layout.num_tokens, 1, 300, device=DEVICE)
        triton_fusion_attention(wide, wide, wide, meta, meta, policy="causal")
    with pytest.raises(ValueError, match="block_n: expected a power of two"):
        triton_fusion_attention(q, q, q, meta, meta, policy="causal", block_n=24)
    with pytest.raises(ValueError, match="policy"):
        triton_fusion_attention(q, q, q, meta, meta, policy="sliding")
    as_int64 = AttentionMeta(meta.kind.long(), meta.group, meta.order, meta.cu_seqlens, meta.max_seqlen)
    with pytest.raises(TypeError, match=r"meta_q\.kind: expected int32"):
        triton_fusion_attention(q, q, q, as_int64, meta, policy="causal")


# ------------------------------------------------------------------------------ whole module


# The module calls the kernel the same way under every policy (the kernel tests above cover each
# policy's rule): the default run takes the one with the most mask code.
@pytest.mark.parametrize("policy", [pytest.param("causal", marks=pytest.mark.slow),
                                    pytest.param("prefix", marks=pytest.mark.slow), "grouped"])
def test_question_fusion_with_triton_equals_eager(policy, monkeypatch):
    from qfusion import FusionConfig, QuestionFusion
    from qfusion.ops.triton import op

    calls = []
    kernel = op.triton_fusion_attention
    monkeypatch.setattr(op, "triton_fusion_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    torch.manual_seed(0)
    config = FusionConfig(vision_dim=12, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          codebook_size=16, m=4, n=2, output_dim=24, text_vocab_size=50, mask=policy)
    weights = QuestionFusion(config).state_dict()
    gen = torch.Generator().manual_seed(7)
    vision = [torch.randn(21, 12, generator=gen).to(DEVICE), torch.randn(9, 12, generator=gen).to(DEVICE)]
    questions = [[torch.tensor([1, 2, 3]), torch.tensor([4])], [torch.tensor([5, 6])]]
    follow_up = [torch.tensor([7, 8]).to(DEVICE), None]
    results = {}
    for impl in ("triton", "eager"):
        fusion = QuestionFusion(dataclasses.replace(config, attn_impl=impl)).to(DEVICE)
        fusion.load_state_dict(weights)
        out = fusion(vision, [[q.to(DEVICE) for q in sample] for sample in questions])
        _, state = fusion.ask(fusion.start(vision), [sample[0].to(DEVICE) for sample in questions])
        asked, _ = fusion.ask(state, follow_up)
        loss = (out.packed_tokens ** 2).sum() + (asked[0] ** 2).sum()
        loss.backward()
        results[impl] = [out.packed_tokens, asked[0]] + [p.grad for p in fusion.parameters() if p.grad is not None]
    assert calls, "the Triton kernel did not run"
    for got, want in zip(results["triton"], results["eager"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------- autotune


def test_autotune_keeps_the_fastest_candidate_and_records_it(monkeypatch):
    from qfusion.ops.triton import configs

    monkeypatch.setattr(configs, "_tuned", {})
    layout = pack([20], [[3, 2]], budget=(4, 2), policy="prefix")
    meta = to_device(layout.meta)
    q, k, v, _ = random_inputs(layout.num_tokens, layout.num_tokens, 1, 16, seed=13)
    q, k, v = (x.to(DEVICE, torch.float32).requires_grad_() for x in (q, k, v))
    options = configs.candidates(torch.cuda.get_device_capability() if DEVICE == "cuda" else None, torch.float32, 16)
    fake_ms = iter([5.0, 1.0] + [9.0] * (len(options) - 2))  # the second candidate is the fastest
    chosen = configs.autotune(q, k, v, meta, meta, policy="prefix", attention=triton_fusion_attention,
                              measure=lambda fn: (fn(), next(fake_ms))[1])
    assert chosen == options[1]
    (record,) = configs.tuned_configs()
    assert record["chosen"] == options[1].as_ints() and record["backward"] and len(record["timings_ms"]) == len(options)
    # cached: the same bucket does not time again; the result equals the reference
    out = triton_fusion_attention(q, k, v, meta, meta, policy="prefix", config="autotune")
    torch.testing.assert_close(out, eager_attention(q, k, v, meta, meta, "prefix", 0.25), rtol=1e-5, atol=1e-5)
    assert len(configs.tuned_configs()) == 1
    with pytest.raises(ValueError, match="config: expected a KernelConfig, 'autotune' or None"):
        triton_fusion_attention(q, k, v, meta, meta, policy="prefix", config="fastest")

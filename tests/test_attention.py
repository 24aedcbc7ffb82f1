import math
import warnings

import pytest
import torch

from qfusion.layout import pack
from qfusion.ops import fusion_attention
from qfusion.ops import attention as attention_module
from qfusion.ops.meta import QUERY, TEXT, VISION, AttentionMeta, mask_rule

POLICIES = ["causal", "prefix", "grouped"]
DOC_SECTIONS = (("docs/kernels.md", "Attention backends"),)


def ragged_layout(policy):
    # vision lengths not multiples of anything, 1-token questions, several groups, m = 1 sample
    return pack([5, 9, 3, 7], [[2, 4], [3], [1, 1, 2, 3], [1]], budget=(4, 2), policy=policy)


def random_qkv(tq, tk, heads=2, dim=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(tq, heads, dim, generator=gen, dtype=dtype)
    k = torch.randn(tk, heads, dim, generator=gen, dtype=dtype)
    v = torch.randn(tk, heads, dim, generator=gen, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v)]


def brute_force(q, k, v, meta_q, meta_k, policy):
    """Token-by-token softmax over the visible keys (independent of the eager implementation)."""
    out = torch.zeros_like(q)
    scale = 1 / math.sqrt(q.shape[-1])
    sq, sk = meta_q.sample_ids(), meta_k.sample_ids()
    for i in range(q.shape[0]):
        keys = [
            j for j in range(k.shape[0])
            if sk[j] == sq[i] and bool(mask_rule(
                policy, meta_q.kind[i], meta_q.group[i], meta_q.order[i],
                meta_k.kind[j], meta_k.group[j], meta_k.order[j]))
        ]
        if not keys:
            continue
        scores = torch.einsum("hd,khd->hk", q[i], k[keys]) * scale
        out[i] = torch.einsum("hk,khd->hd", scores.softmax(-1), v[keys])
    return out


@pytest.mark.parametrize("policy", POLICIES)
def test_float64_eager_equals_brute_force(policy):
    layout = ragged_layout(policy)
    q, k, v = random_qkv(layout.num_tokens, layout.num_tokens)
    got = fusion_attention(q, k, v, layout.meta, layout.meta, policy=policy, impl="eager")
    want = brute_force(q.detach(), k.detach(), v.detach(), layout.meta, layout.meta, policy)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("policy", POLICIES)
def test_sdpa_matches_eager_outputs_and_gradients_float32(policy):
    layout = ragged_layout(policy)
    q, k, v = random_qkv(layout.num_tokens, layout.num_tokens, dtype=torch.float32, seed=1)
    grad_out = torch.randn(layout.num_tokens, 2, 8)
    results = {}
    for impl in ("eager", "sdpa"):
        out = fusion_attention(q, k, v, layout.meta, layout.meta, policy=policy, impl=impl)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results[impl] = (out, *grads)
    for got, want in zip(results["sdpa"], results["eager"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", POLICIES)
def test_flex_forward_matches_eager(policy):
    layout = ragged_layout(policy)
    q, k, v = random_qkv(layout.num_tokens, layout.num_tokens, dtype=torch.float32, seed=2)
    with torch.no_grad():
        want = fusion_attention(q, k, v, layout.meta, layout.meta, policy=policy, impl="eager")
        got = fusion_attention(q, k, v, layout.meta, layout.meta, policy=policy, impl="flex")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_flex_with_gradients_on_cpu_falls_back_with_one_warning():
    layout = ragged_layout("causal")
    q, k, v = random_qkv(layout.num_tokens, layout.num_tokens, dtype=torch.float32)
    attention_module._warned.discard("flex:cpu-grad")
    with pytest.warns(UserWarning, match="falls back to 'sdpa'"):
        out = fusion_attention(q, k, v, layout.meta, layout.meta, policy="causal", impl="flex")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fusion_attention(q, k, v, layout.meta, layout.meta, policy="causal", impl="flex")
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def incremental_metas():
    """Queries of one new group per sample against cached keys + the new tokens (sample 1 asks nothing)."""
    # sample 0: cached vision(3) + group 0 (1 text + 2 slots); new group 1: 1 text + 1 slot
    # sample 1: cached vision(2); no new tokens; sample 2: cached vision(4); new group 0: 2 text + 2 slots
    k_kind = [VISION] * 3 + [TEXT, QUERY, QUERY] + [TEXT, QUERY] + [VISION] * 2 + [VISION] * 4 + [TEXT, TEXT, QUERY, QUERY]
    k_group = [-1] * 3 + [0, 0, 0] + [1, 1] + [-1] * 2 + [-1] * 4 + [0, 0, 0, 0]
    k_order = list(range(8)) + [0, 1] + list(range(8))
    meta_k = AttentionMeta(*(torch.tensor(x, dtype=torch.int32) for x in (k_kind, k_group, k_order)),
                           torch.tensor([0, 8, 10, 18], dtype=torch.int32), 8)
    meta_q = AttentionMeta(
        torch.tensor([TEXT, QUERY, TEXT, TEXT, QUERY, QUERY], dtype=torch.int32),
        torch.tensor([1, 1, 0, 0, 0, 0], dtype=torch.int32),
        torch.tensor([6, 7, 4, 5, 6, 7], dtype=torch.int32),
        torch.tensor([0, 2, 2, 6], dtype=torch.int32), 4)
    return meta_q, meta_k


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_separate_query_and_key_offsets(policy, impl):
    meta_q, meta_k = incremental_metas()
    q, k, v = random_qkv(meta_q.num_tokens, meta_k.num_tokens, seed=3)
    want = brute_force(q.detach(), k.detach(), v.detach(), meta_q, meta_k, policy)
    with torch.no_grad():
        got = fusion_attention(q, k, v, meta_q, meta_k, policy=policy, impl=impl)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_rows_that_see_no_key_are_zero_without_nan(impl):
    # a text token whose order precedes every key of its sample sees nothing
    meta_q = AttentionMeta(torch.tensor([TEXT, TEXT], dtype=torch.int32), torch.tensor([0, 0], dtype=torch.int32),
                           torch.tensor([0, 5], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32), 2)
    meta_k = AttentionMeta(torch.tensor([TEXT] * 3, dtype=torch.int32), torch.tensor([0] * 3, dtype=torch.int32),
                           torch.tensor([3, 4, 5], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32), 3)
    q, k, v = random_qkv(2, 3, dtype=torch.float32)
    out = fusion_attention(q, k, v, meta_q, meta_k, policy="causal", impl=impl)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0
    out.sum().backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))


def test_fusion_attention_rejects_bad_input():
    layout = ragged_layout("causal")
    t = layout.num_tokens
    q, k, v = random_qkv(t, t, dtype=torch.float32)
    with pytest.raises(ValueError, match="q: expected a packed"):
        fusion_attention(q[None], k, v, layout.meta, layout.meta, policy="causal")
    with pytest.raises(TypeError, match="one dtype"):
        fusion_attention(q.double(), k, v, layout.meta, layout.meta, policy="causal")
    with pytest.raises(ValueError, match="meta_q: describes"):
        fusion_attention(q[:-1], k, v, layout.meta, layout.meta, policy="causal")
    with pytest.raises(ValueError, match="policy"):
        fusion_attention(q, k, v, layout.meta, layout.meta, policy="sliding")
    with pytest.raises(ValueError, match="impl"):
        fusion_attention(q, k, v, layout.meta, layout.meta, policy="causal", impl="cuda")


def test_auto_resolves_to_sdpa_on_cpu():
    q = torch.zeros(1, 1, 2)
    assert attention_module.resolve_impl("auto", q, needs_grad=True) == "sdpa"


def test_auto_picks_triton_only_where_validated(monkeypatch):
    choose = attention_module.auto_impl
    assert choose((9, 0), torch.bfloat16, triton_usable=True, flex_available=True) == "flex"
    assert choose((8, 0), torch.float16, triton_usable=True, flex_available=False) == "sdpa"
    monkeypatch.setattr(attention_module, "VALIDATED_TRITON", frozenset({((9, 0), torch.bfloat16)}))
    assert choose((9, 0), torch.bfloat16, triton_usable=True, flex_available=True) == "triton"
    assert choose((9, 0), torch.float16, triton_usable=True, flex_available=True) == "flex"
    assert choose((9, 0), torch.bfloat16, triton_usable=False, flex_available=True) == "flex"
    assert choose(None, torch.bfloat16, triton_usable=True, flex_available=True) == "sdpa"


def empty_side_metas(empty: str):
    """Two samples where the queries (``empty="q"``) or the keys (``empty="k"``) have no token at all."""
    layout = ragged_layout("causal")
    none = AttentionMeta(*(torch.zeros(0, dtype=torch.int32) for _ in range(3)),
                         torch.zeros(layout.meta.num_samples + 1, dtype=torch.int32), 0)
    return (none, layout.meta) if empty == "q" else (layout.meta, none)


@pytest.mark.parametrize("empty", ["q", "k", "both"])
@pytest.mark.parametrize("policy", POLICIES)
def test_flex_with_an_empty_side_returns_what_eager_returns(policy, empty):
    if empty == "both":  # e.g. `start` with every vision length 0
        meta_q = meta_k = AttentionMeta.from_lists([], [], [], [0, 0, 0])
    else:
        meta_q, meta_k = empty_side_metas(empty)
    q, k, v = random_qkv(meta_q.num_tokens, meta_k.num_tokens, dtype=torch.float32, seed=4)
    with torch.no_grad():
        want = fusion_attention(q, k, v, meta_q, meta_k, policy=policy, impl="eager")
        got = fusion_attention(q, k, v, meta_q, meta_k, policy=policy, impl="flex")
    assert got.shape == want.shape == q.shape
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_eager_half_stays_finite_at_large_logits(dtype):
    # logits ~ 1e5 overflow float16 (max 65504); the reference computes half inputs in float32
    layout = ragged_layout("prefix")
    q, k, v = random_qkv(layout.num_tokens, layout.num_tokens, dtype=torch.float64, seed=5)
    q, k = q.detach() * 300, k.detach() * 300
    got = fusion_attention(q.to(dtype), k.to(dtype), v.detach().to(dtype), layout.meta, layout.meta,
                           policy="prefix", impl="eager")
    want = fusion_attention(q.to(dtype).double(), k.to(dtype).double(), v.detach().to(dtype).double(),
                            layout.meta, layout.meta, policy="prefix", impl="eager")
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2 * torch.finfo(dtype).eps * want.abs().max().item())


def test_docs_attention_backends_example_runs():
    from readme_blocks import python_blocks

    for page, section in DOC_SECTIONS:
        blocks = python_blocks(section, page)
        assert blocks, f"{page}: section {section!r} has no example"
        for block in blocks:
            exec(compile(block, f"{page} ({section})", "exec"), {})


def test_sdpa_runs_a_full_causal_forward_without_a_mask_and_equals_eager_with_grads():
    from qfusion.ops.attention import sdpa_mask

    layout = pack([7, 3, 11], [[2, 1], [4], [1, 2, 3]], budget=(3, 2), policy="causal")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(layout.num_tokens, 2, 8, generator=gen, requires_grad=True) for _ in range(3))
    assert sdpa_mask("causal", layout.meta, layout.meta) == (None, None)  # the masked half is skipped
    grads = {}
    for impl in ("sdpa", "eager"):
        out = fusion_attention(q, k, v, layout.meta, layout.meta, policy="causal", impl=impl)
        grads[impl] = (out, *torch.autograd.grad(out.square().sum(), (q, k, v)))
    for got, want in zip(grads["sdpa"], grads["eager"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    prefix = pack([7, 3], [[2], [4]], budget=(3, 2), policy="prefix")
    first = sdpa_mask("prefix", prefix.meta, prefix.meta)
    assert first[0] is not None and sdpa_mask("prefix", prefix.meta, prefix.meta)[0] is first[0]  # built once

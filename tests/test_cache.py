"""qfusion.adapters.cache: FusionCache reuses the vision prefix only while nothing its tokens depend on changed."""

import pytest
import torch
from conftest_hosts import fusion_config

from qfusion import Budget, QuestionFusion
from qfusion.adapters import FusionCache


def setup():
    torch.manual_seed(0)
    fusion = QuestionFusion(fusion_config(vision_dim=8, output_dim=6, attn_impl="eager")).double()
    vision = [torch.randn(5, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)]
    inputs = {"pixel_values": torch.randn(2, 3, 4, 4), "image_sizes": torch.tensor([[4, 4], [4, 4]])}
    questions = [[torch.tensor([1, 2]), torch.tensor([3])], [torch.tensor([4, 5, 6])]]
    return fusion, vision, inputs, questions


def assert_tokens_equal(got, want):
    assert [len(s) for s in got] == [len(s) for s in want]
    for a_sample, b_sample in zip(got, want):
        for a, b in zip(a_sample, b_sample):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fusion_cache_asks_only_new_questions_and_equals_the_packed_forward():
    fusion, vision, inputs, questions = setup()
    encoded = []

    def encode():
        encoded.append(1)
        return vision, "host"

    cache = FusionCache()
    budget = Budget(4, 2)
    first, host = cache.fuse(fusion, encode, inputs, [questions[0][:1], questions[1]], budget)
    later, _ = cache.fuse(fusion, encode, None, questions, budget)
    assert host == "host" and len(encoded) == 1 and (cache.hits, cache.misses) == (1, 1)
    assert_tokens_equal(later, fusion(vision, questions).tokens)
    other = dict(inputs, pixel_values=inputs["pixel_values"] + 1)
    cache.fuse(fusion, encode, other, questions, budget)  # other images refill
    cache.fuse(fusion, encode, other, [[torch.tensor([9])], questions[1]], budget)  # an edited question refills
    cache.fuse(fusion, encode, dict(other, image_sizes=torch.tensor([[4, 4], [8, 8]])), questions, budget)
    assert len(encoded) == 4 and cache.misses == 4  # another input the images are encoded with refills
    cache.clear()
    with pytest.raises(ValueError, match="pixel_values: required"):
        cache.fuse(fusion, encode, None, questions, budget)


def test_fusion_cache_keys_on_the_budget_of_the_call():
    fusion, vision, inputs, questions = setup()
    cache = FusionCache()
    cache.fuse(fusion, lambda: (vision, None), inputs, questions, Budget(4, 2))
    small, _ = cache.fuse(fusion, lambda: (vision, None), inputs, questions, Budget(2, 1))  # same inputs, other budget
    assert cache.misses == 2 and [t.shape[0] for t in small[0]] == [2, 1]
    assert_tokens_equal(small, fusion(vision, questions, m=2, n=1).tokens)
    assert (fusion.config.m, fusion.config.n) == (4, 2)  # the module's default budget is untouched


def test_fusion_cache_refills_after_the_plugin_changes_use_question():
    fusion, vision, inputs, questions = setup()
    cache = FusionCache()
    cache.fuse(fusion, lambda: (vision, None), inputs, [q[:1] for q in questions], Budget(4, 2))
    fusion.configure(use_question=False)
    got, _ = cache.fuse(fusion, lambda: (vision, None), inputs, questions, Budget(4, 2))
    assert cache.misses == 2 and cache.hits == 0
    assert_tokens_equal(got, fusion(vision, questions).tokens)


def test_fusion_cache_refills_after_an_optimizer_step_on_the_plugin():
    fusion, vision, inputs, questions = setup()
    cache = FusionCache()
    cache.fuse(fusion, lambda: (vision, None), inputs, [q[:1] for q in questions], Budget(4, 2))
    optimizer = torch.optim.SGD(fusion.parameters(), lr=0.5)
    fusion(vision, questions).packed_tokens.sum().backward()
    optimizer.step()
    got, _ = cache.fuse(fusion, lambda: (vision, None), inputs, questions, Budget(4, 2))
    assert cache.misses == 2 and cache.hits == 0
    assert_tokens_equal(got, fusion(vision, questions).tokens)


def test_fusion_cache_refills_when_what_the_adapter_reports_changes():
    fusion, vision, inputs, questions = setup()
    cache = FusionCache()
    cache.fuse(fusion, lambda: (vision, None), inputs, questions, Budget(4, 2), version=("hd", 1))
    cache.fuse(fusion, lambda: (vision, None), inputs, questions, Budget(4, 2), version=("hd", 1))
    cache.fuse(fusion, lambda: (vision, None), inputs, questions, Budget(4, 2), version=("hd", 2))
    assert (cache.hits, cache.misses) == (1, 2)

"""qfusion.budget: the one owner of the budget rules (valid values, default n, slots, placeholders)."""

import pytest
import torch

from qfusion import Budget, FusionConfig, QuestionFusion


def test_a_budget_is_an_m_n_pair_that_unpacks_and_compares_as_a_tuple():
    budget = Budget(4, 2)
    m, n = budget
    assert (m, n) == (4, 2) and budget == (4, 2) and budget.m == 4 and budget.n == 2
    assert Budget.of((4, 2)) == budget and Budget.of([4, 2]) == budget and Budget.of(budget) is budget


@pytest.mark.parametrize("value, error, match", [
    ((2, 4), ValueError, r"qfusion_budget: m, n: expected 1 <= n <= m, got m=2, n=4"),
    ((0, 0), ValueError, "expected 1 <= n <= m"),
    ((4,), ValueError, r"qfusion_budget: expected a qfusion.Budget or \(m, n\)"),
    ("4,2", ValueError, r"qfusion_budget: expected a qfusion.Budget or \(m, n\)"),
    ((4.0, 2), TypeError, r"qfusion_budget: m: expected an integer, got 4.0 \(float\)"),
    ((True, 1), TypeError, "m: expected an integer, got True"),
    (("4", 2), TypeError, r"m: expected an integer, got '4' \(str\)"),
])
def test_bad_budgets_are_refused_naming_the_argument(value, error, match):
    with pytest.raises(error, match=match):
        Budget.of(value)


def test_the_codebook_bounds_m():
    assert Budget.of((8, 2), codebook_size=8) == (8, 2)
    with pytest.raises(ValueError, match="qfusion_budget: expected m <= codebook_size=8, got m=9"):
        Budget.of((9, 2), codebook_size=8)


def test_a_missing_n_defaults_to_the_default_n_but_never_above_m():
    default = Budget(64, 16)
    assert Budget.resolve(default=default) == (64, 16)
    assert Budget.resolve(m=32, default=default) == (32, 16)
    assert Budget.resolve(m=4, default=default) == (4, 4)
    assert Budget.resolve(n=2, default=default) == (64, 2)
    with pytest.raises(TypeError, match=r"m, n: m: expected an integer, got '4'"):
        Budget.resolve(m="4", default=default)


def test_slots_and_placeholders_follow_the_first_group_rule():
    budget = Budget(5, 2)
    assert [budget.slots(g) for g in range(4)] == [5, 2, 2, 2]
    assert budget.placeholders(3) == [5, 2, 2] and budget.placeholders(1, prefix=6) == [11]
    # two images brought by the first question, a third by the third question
    assert budget.placeholder_blocks([[0, 1], [0, 1], [2], [2]]) == [[5, 5], [2, 2], [5], [2]]


def test_every_entry_point_takes_the_same_budget_value():
    torch.manual_seed(0)
    config = FusionConfig(vision_dim=8, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                          codebook_size=8, m=4, n=2, output_dim=6, text_vocab_size=20, attn_impl="eager")
    assert config.budget == Budget(4, 2)
    fusion = QuestionFusion(config).double()
    vision = torch.randn(1, 5, 8, dtype=torch.float64)
    questions = [[torch.tensor([1, 2]), torch.tensor([3])]]
    by_value = fusion(vision, questions, budget=Budget(3, 1)).tokens
    by_pair = fusion(vision, questions, budget=(3, 1)).tokens
    by_parts = fusion(vision, questions, m=3, n=1).tokens
    assert [t.shape[0] for t in by_value[0]] == [3, 1]
    for a, b, c in zip(by_value[0], by_pair[0], by_parts[0]):
        assert torch.equal(a, b) and torch.equal(a, c)
    state = fusion.start(vision, budget=Budget(3, 1))
    assert state.budget == (3, 1) and (state.m, state.n) == (3, 1)
    with pytest.raises(ValueError, match="budget: pass either budget or m / n"):
        fusion(vision, questions, budget=(3, 1), m=3)
    with pytest.raises(ValueError, match="budget: expected m <= codebook_size=8"):
        fusion.start(vision, budget=(9, 1))

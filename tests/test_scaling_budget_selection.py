"""qfusion.scaling.budget_selection: the smallest budget that meets a target, and its interval."""

import math
import warnings

import numpy as np
import pytest

from qfusion.scaling import PoorFitWarning, PowerLawFit, fit_power_law, smallest_budget

DOC_SECTIONS = (("docs/scaling.md", "Scaling analysis"),)

TOKENS = np.array([36.0, 64.0, 144.0, 256.0, 576.0, 1024.0, 2304.0])


def law(n_c, alpha, num_tokens=TOKENS):
    return (n_c / np.asarray(num_tokens, dtype=np.float64)) ** alpha


@pytest.mark.parametrize("alpha, target", [(-0.25, 1.5), (-0.05, 1.1), (0.3, 0.4)])
def test_smallest_budget_is_the_first_whole_n_that_meets_the_target(alpha, target):
    fit = fit_power_law(TOKENS, law(12.0, alpha), n_bootstrap=0)
    choice = smallest_budget(fit, target=target, n_bootstrap=50)
    n = choice.num_tokens
    meets = (lambda p: p >= target) if alpha < 0 else (lambda p: p <= target)  # α > 0: lower is better
    assert meets(fit.predict(n)) and not meets(fit.predict(n - 1))
    assert n == math.ceil(fit.tokens_for(target))
    assert choice.interval == (n, n)  # every resample of an exact law is that law
    assert choice.predicted == pytest.approx(fit.predict(n)) and choice.target == target


@pytest.mark.parametrize("alpha", [-0.3, 0.3])
def test_max_loss_is_relative_to_the_score_measured_at_the_largest_budget(alpha):
    scores = law(12.0, alpha)
    scores[-1] *= 0.97  # the point at N_max lies off the law, so the law's value there is not a measured score
    fit = fit_power_law(TOKENS, scores, n_bootstrap=0)
    measured = scores[-1]
    assert abs(fit.predict(TOKENS.max()) / measured - 1) > 0.01
    choice = smallest_budget(fit, max_loss=0.1, n_bootstrap=0)
    n = choice.num_tokens
    assert choice.reference == TOKENS.max() and choice.reference_score == measured
    if alpha < 0:  # a score that rises with N: keep 90 % of the measured one
        assert choice.target == pytest.approx(0.9 * measured, rel=1e-12)
        assert fit.predict(n) >= choice.target > fit.predict(n - 1)
    else:  # a lower-is-better score: allow it 10 % higher
        assert choice.target == pytest.approx(1.1 * measured, rel=1e-12)
        assert fit.predict(n) <= choice.target < fit.predict(n - 1)
    assert choice.interval == (None, None)


FLAT_TOKENS = [1, 2, 4, 8, 16]
FLAT_SCORES = [30.0, 38.5, 44.9, 45.3, 45.1]  # rising up to N = 4, flat from there


def poor_flat_fit():
    with pytest.warns(PoorFitWarning):
        return fit_power_law(FLAT_TOKENS, FLAT_SCORES, n_bootstrap=0)


def test_on_flat_data_the_target_comes_from_the_measured_scores_not_from_the_laws_overshoot():
    fit = poor_flat_fit()
    assert fit.predict(16) > max(FLAT_SCORES) + 3  # the law overshoots every measured score at N = 16
    with pytest.warns(PoorFitWarning):
        choice = smallest_budget(fit, max_loss=0.02, n_bootstrap=200)
    assert choice.target == pytest.approx(0.98 * 45.1, rel=1e-12) and choice.target < max(FLAT_SCORES)
    # N is still read from the law, now for a target that the measured points reach.
    assert choice.num_tokens == math.ceil(fit.tokens_for(choice.target)) == 8
    low, high = choice.interval
    assert low <= choice.num_tokens <= high <= 16


def test_a_budget_from_a_poor_fit_warns_and_is_flagged():
    with pytest.warns(PoorFitWarning, match=r"smallest_budget: R² = 0\.752 in log space, below POOR_FIT_R2 = 0\.9"):
        choice = smallest_budget(poor_flat_fit(), target=44.0, n_bootstrap=0)
    assert choice.poor_fit and choice.to_dict()["poor_fit"] is True
    good = fit_power_law(TOKENS, law(12.0, -0.25), n_bootstrap=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not smallest_budget(good, target=1.5, n_bootstrap=0).poor_fit


def test_the_reference_score_is_the_mean_of_the_scores_measured_at_the_largest_budget():
    fit = fit_power_law([16, 64, 256, 576, 576], [0.60, 0.72, 0.86, 0.92, 0.96], n_bootstrap=0)
    choice = smallest_budget(fit, max_loss=0.05, n_bootstrap=0)
    assert choice.reference == 576 and choice.reference_score == pytest.approx(0.94, rel=1e-12)
    assert choice.target == pytest.approx(0.95 * 0.94, rel=1e-12)


def test_budget_interval_from_noisy_points_brackets_the_choice_and_is_seeded():
    noise = np.exp(np.random.default_rng(3).normal(0, 0.02, len(TOKENS)))
    fit = fit_power_law(TOKENS, law(5.0, -0.1) * noise, n_bootstrap=0)
    choice = smallest_budget(fit, max_loss=0.05, n_bootstrap=300, seed=1)
    low, high = choice.interval
    assert low <= choice.num_tokens <= high and low < high
    assert smallest_budget(fit, max_loss=0.05, n_bootstrap=300, seed=1) == choice
    narrow = smallest_budget(fit, max_loss=0.05, n_bootstrap=300, seed=1, confidence=0.5).interval
    assert low <= narrow[0] <= narrow[1] <= high


def test_a_target_beyond_the_measured_points_is_flagged_as_extrapolated():
    fit = fit_power_law(TOKENS, law(12.0, -0.25), n_bootstrap=0)
    inside = smallest_budget(fit, target=fit.predict(500.0), n_bootstrap=0)
    beyond = smallest_budget(fit, target=fit.predict(5000.0), n_bootstrap=0)
    assert not inside.extrapolated and beyond.extrapolated and beyond.num_tokens > TOKENS.max()
    assert inside.measured_range == (TOKENS.min(), TOKENS.max())


def test_smallest_budget_without_points_gives_no_interval_and_refuses_a_relative_loss():
    fit = PowerLawFit(n_c=10.0, alpha=-0.5, beta=-0.5 * math.log(10.0), r2=1.0, r2_score_space=1.0,
                      alpha_ci=(-0.5, -0.5), num_points=4)
    choice = smallest_budget(fit, target=2.0)
    assert choice.num_tokens == 40 and choice.interval == (None, None) and choice.measured_range is None
    assert choice.reference is None and choice.reference_score is None
    with pytest.raises(ValueError, match="max_loss: the fit carries no measured points, so the score measured at "
                                         "the largest budget is unknown"):
        smallest_budget(fit, max_loss=0.1)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "target, max_loss: expected exactly one of them"),
    ({"target": 1.0, "max_loss": 0.1}, "target, max_loss: expected exactly one of them"),
    ({"target": 0.0}, r"target: expected a finite score > 0"),
    ({"target": float("inf")}, r"target: expected a finite score > 0"),
    ({"max_loss": 1.0}, r"max_loss: expected a fraction in \[0, 1\), got 1.0"),
    ({"max_loss": -0.1}, r"max_loss: expected a fraction in \[0, 1\)"),
    ({"max_loss": 0.1, "n_bootstrap": -1}, "n_bootstrap: expected >= 0, got -1"),
    ({"max_loss": 0.1, "confidence": 1.0}, r"confidence: expected a value in \(0, 1\)"),
    ({"max_loss": float("nan")}, r"max_loss: expected a fraction in \[0, 1\), got nan"),
    ({"max_loss": 0.1, "seed": -1}, "seed: expected >= 0, got -1"),
])
def test_smallest_budget_rejects_bad_arguments_by_name(kwargs, match):
    fit = fit_power_law(TOKENS, law(12.0, -0.25), n_bootstrap=0)
    with pytest.raises(ValueError, match=match):
        smallest_budget(fit, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"target": "1.2"}, "target: expected a number, got '1.2'"),
    ({"max_loss": "0.1"}, "max_loss: expected a number, got '0.1'"),
    ({"max_loss": 0.1, "n_bootstrap": 2.5}, "n_bootstrap: expected an integer >= 0, got 2.5"),
    ({"max_loss": 0.1, "confidence": "95%"}, "confidence: expected a number, got '95%'"),
])
def test_smallest_budget_rejects_arguments_of_the_wrong_type_by_name(kwargs, match):
    fit = fit_power_law(TOKENS, law(12.0, -0.25), n_bootstrap=0)
    with pytest.raises(TypeError, match=match):
        smallest_budget(fit, **kwargs)
    with pytest.raises(TypeError, match="fit: expected a PowerLawFit, got dict"):
        smallest_budget(fit.to_dict(), max_loss=0.1)


def test_docs_flat_data_block_prints_what_it_says():
    from readme_blocks import checked, python_blocks

    ((page, section),) = DOC_SECTIONS
    (block,) = [b for b in python_blocks(section, page) if "flat = fit_power_law" in b]
    code = checked(block)
    assert code.count("assert __printed ==") == 2  # both prints state their output, and it is checked
    exec(compile(code, f"{page} ({section})", "exec"), {})

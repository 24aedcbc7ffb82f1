import json
import math

import matplotlib
import numpy as np
import pytest
import torch

from qfusion.cli import main
from qfusion.scaling import (
    DivergenceResult,
    PowerLawFit,
    branch_divergence,
    divergence_statistics,
    fit_power_law,
    load_fits,
    load_points_csv,
    plot_divergence,
    plot_scaling,
    save_fits,
    smallest_budget,
)

TOKENS = np.array([36.0, 64.0, 144.0, 256.0, 576.0, 1024.0, 2304.0])
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def law(n_c, alpha, num_tokens=TOKENS):
    return (n_c / np.asarray(num_tokens, dtype=np.float64)) ** alpha


# ---------------------------------------------------------------- power law


@pytest.mark.parametrize("n_c, alpha", [(5.0, -0.3), (1e-3, -0.05), (1e6, 0.2), (80.0, -1.5)])
def test_fit_recovers_an_exact_law(n_c, alpha):
    fit = fit_power_law(TOKENS, law(n_c, alpha), n_bootstrap=50)
    assert fit.alpha == pytest.approx(alpha, rel=1e-6)
    assert fit.n_c == pytest.approx(n_c, rel=1e-6)
    assert fit.beta == pytest.approx(alpha * math.log(n_c), rel=1e-6, abs=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert fit.r2_score_space == pytest.approx(1.0, abs=1e-9)
    assert fit.alpha_ci == pytest.approx((alpha, alpha), rel=1e-6)  # every resample lies on the law
    assert fit.num_points == len(TOKENS)
    assert isinstance(fit, PowerLawFit)


def test_fit_with_multiplicative_noise_is_the_log_space_least_squares_solution():
    rng = np.random.default_rng(3)
    num_tokens = np.repeat(TOKENS, 4)
    scores = law(20.0, -0.4, num_tokens) * np.exp(rng.normal(0.0, 0.03, size=len(num_tokens)))
    fit = fit_power_law(num_tokens, scores, n_bootstrap=300, seed=1)
    slope, intercept = np.polyfit(np.log(num_tokens), np.log(scores), 1)  # log P = β − α·log N
    assert fit.alpha == pytest.approx(-slope, rel=1e-7)
    assert fit.beta == pytest.approx(intercept, rel=1e-7)
    assert fit.alpha == pytest.approx(-0.4, abs=0.02)
    assert fit.n_c == pytest.approx(20.0, rel=0.2)
    low, high = fit.alpha_ci
    assert low < fit.alpha < high and high - low < 0.05
    assert 0.95 < fit.r2 < 1.0 and 0.9 < fit.r2_score_space < 1.0


def test_bootstrap_is_seeded_and_skippable():
    scores = law(20.0, -0.4) * np.array([1.02, 0.97, 1.01, 0.99, 1.03, 0.98, 1.0])
    first = fit_power_law(TOKENS, scores, n_bootstrap=100, seed=7)
    assert fit_power_law(TOKENS, scores, n_bootstrap=100, seed=7).alpha_ci == first.alpha_ci
    assert fit_power_law(TOKENS, scores, n_bootstrap=100, seed=8).alpha_ci != first.alpha_ci
    assert all(math.isnan(v) for v in fit_power_law(TOKENS, scores, n_bootstrap=0).alpha_ci)
    # Two of three points share N: a third of the resamples hold one distinct N and are skipped.
    few = fit_power_law([10, 10, 40], [1.0, 1.1, 2.0], n_bootstrap=200)
    assert all(math.isfinite(v) for v in few.alpha_ci)


def test_alpha_is_negative_when_more_tokens_give_a_better_score():
    rising = fit_power_law(TOKENS, 50.0 + 10.0 * np.log(TOKENS), n_bootstrap=0)
    assert rising.alpha < 0
    assert rising.predict(2304) > rising.predict(36)
    falling = fit_power_law(TOKENS, 1.0 / np.sqrt(TOKENS), n_bootstrap=0)
    assert falling.alpha == pytest.approx(0.5, rel=1e-6)
    assert falling.predict(2304) < falling.predict(36)


def test_predict_and_tokens_for_invert_each_other():
    fit = fit_power_law(TOKENS, law(12.0, -0.25), n_bootstrap=0)
    assert isinstance(fit.predict(100), float)
    assert isinstance(fit.predict([100, 200]), np.ndarray)
    assert fit.predict(12.0) == pytest.approx(1.0, rel=1e-9)  # P(N_c) = 1
    for n in (1.0, 50.0, 576.0, 1e5):
        assert fit.tokens_for(fit.predict(n)) == pytest.approx(n, rel=1e-9)
    scores = np.array([1.2, 1.5, 2.5])
    np.testing.assert_allclose(fit.predict(fit.tokens_for(scores)), scores, rtol=1e-12)
    # α < 0: the smallest N with P(N) ≥ s; just below it the law falls short.
    n = fit.tokens_for(2.0)
    assert fit.predict(n * (1 - 1e-6)) < 2.0 <= fit.predict(n * (1 + 1e-12))


def test_tokens_for_an_unreachable_score_raises():
    fit = fit_power_law(TOKENS, law(12.0, -0.25), n_bootstrap=0)
    for score in (0.0, -3.0):
        with pytest.raises(ValueError, match="score: the law .* only takes values > 0"):
            fit.tokens_for(score)
    with pytest.raises(ValueError, match="score: expected finite"):
        fit.tokens_for(float("nan"))
    with pytest.raises(ValueError, match="score: .* outside the floating-point range"):
        fit.tokens_for(1e300)
    with pytest.raises(ValueError, match="num_tokens: expected finite values > 0"):
        fit.predict(0)


@pytest.mark.parametrize("num_tokens, scores, kwargs, error, match", [
    ([1, 2, 3], [1, 2], {}, ValueError, r"num_tokens, scores: expected equal lengths, got 3 and 2"),
    ([1, 2], [1, 2], {}, ValueError, r"num_tokens: expected at least 3 points, got 2"),
    ([0, 2, 3], [1, 2, 3], {}, ValueError, r"num_tokens: expected values > 0"),
    ([1, 2, 3], [1, -2, 3], {}, ValueError, r"scores: expected values > 0"),
    ([1, float("nan"), 3], [1, 2, 3], {}, ValueError, r"num_tokens: expected finite values"),
    ([1, 2, 3], [1, float("inf"), 3], {}, ValueError, r"scores: expected finite values"),
    ([5, 5, 5], [1, 2, 3], {}, ValueError, r"num_tokens: expected at least two distinct values, got \[5.0\]"),
    (["a", "b", "c"], [1, 2, 3], {}, TypeError, r"num_tokens: expected numbers"),
    ([1, 2, 3], [[1, 2, 3]], {}, ValueError, r"scores: expected a 1-D sequence of numbers, got shape \(1, 3\)"),
    ([1, 2, 3], [1, 2, 3], {"n_bootstrap": -1}, ValueError, r"n_bootstrap: expected >= 0, got -1"),
])
def test_bad_inputs_raise_naming_the_argument(num_tokens, scores, kwargs, error, match):
    with pytest.raises(error, match=match):
        fit_power_law(num_tokens, scores, **kwargs)


def test_flat_scores_have_no_power_law():
    with pytest.raises(ValueError, match="scores: no power law in num_tokens"):
        fit_power_law(TOKENS, np.full(len(TOKENS), 71.5))


def test_to_dict_is_json_ready():
    fit = fit_power_law(TOKENS, law(5.0, -0.3), n_bootstrap=20)
    data = json.loads(json.dumps(fit.to_dict()))
    assert data["alpha"] == pytest.approx(-0.3) and data["num_points"] == 7 and len(data["alpha_ci"]) == 2


def test_fit_round_trips_through_json_with_its_points(tmp_path):
    fits = {"a": fit_power_law(TOKENS, law(5.0, -0.3), n_bootstrap=20), "b": fit_power_law(TOKENS, law(9.0, 0.2))}
    loaded = load_fits(save_fits(fits, tmp_path / "fits.json"))
    assert loaded == fits
    assert loaded["a"].num_tokens == tuple(TOKENS) and len(loaded["a"].scores) == len(TOKENS)
    without_points = {k: v for k, v in fits["a"].to_dict().items() if k not in ("num_tokens", "scores")}
    assert PowerLawFit.from_dict(without_points).num_tokens == ()


def test_load_fits_names_the_bad_entry(tmp_path):
    path = tmp_path / "fits.json"
    path.write_text(json.dumps({"vqa": {"alpha": -0.1}}))
    with pytest.raises(ValueError, match=r"path: fit 'vqa' .* missing \['n_c', 'beta'"):
        load_fits(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="path: expected a JSON object"):
        load_fits(path)


# ---------------------------------------------------------------- budgets from the law


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
def test_max_loss_is_relative_to_the_law_at_the_largest_budget(alpha):
    fit = fit_power_law(TOKENS, law(12.0, alpha), n_bootstrap=0)
    choice = smallest_budget(fit, max_loss=0.1, n_bootstrap=0)
    top, n = fit.predict(TOKENS.max()), choice.num_tokens
    if alpha < 0:  # a score that rises with N: keep 90 % of it
        assert fit.predict(n) / top >= 0.9 > fit.predict(n - 1) / top
    else:  # a lower-is-better score: allow it 10 % higher
        assert fit.predict(n) / top <= 1.1 < fit.predict(n - 1) / top
    assert choice.reference == TOKENS.max() and choice.interval == (None, None)
    # P(N) / P(N_max) = (N / N_max)^-α, so the answer depends on α alone.
    expected = TOKENS.max() * 0.9 ** (-1 / alpha) if alpha < 0 else TOKENS.max() * 1.1 ** (-1 / alpha)
    assert choice.num_tokens == math.ceil(expected)


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
    with pytest.raises(ValueError, match="max_loss: the fit carries no points"):
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
])
def test_smallest_budget_rejects_bad_arguments_by_name(kwargs, match):
    fit = fit_power_law(TOKENS, law(12.0, -0.25), n_bootstrap=0)
    with pytest.raises(ValueError, match=match):
        smallest_budget(fit, **kwargs)


# ---------------------------------------------------------------- plots and CSV


def test_plot_scaling_writes_a_png_with_two_series_and_keeps_the_backend(tmp_path):
    backend = matplotlib.get_backend()
    fitted = fit_power_law(TOKENS, law(5.0, -0.3), n_bootstrap=0)
    path = plot_scaling({"given fit": (TOKENS, law(5.0, -0.3), fitted), "fitted here": (TOKENS, law(9.0, -0.1))},
                        tmp_path / "scaling.png", title="two series")
    assert path == tmp_path / "scaling.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    assert matplotlib.get_backend() == backend
    with pytest.raises(TypeError, match=r"series\['bad'\]: expected \(num_tokens, scores\)"):
        plot_scaling({"bad": TOKENS}, tmp_path / "bad.png")
    with pytest.raises(TypeError, match=r"series\['bad'\]: expected a PowerLawFit"):
        plot_scaling({"bad": (TOKENS, law(5.0, -0.3), {"alpha": -0.3})}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="series: expected at least one series"):
        plot_scaling({}, tmp_path / "bad.png")


def write_scores_csv(path):
    rows = ["series,tokens,score"]
    rows += [f"pope,{n:g},{float(s)!r}" for n, s in zip(TOKENS, law(1e-3, -0.05) * 100)]
    rows += [f"mme,{n:g},{float(s)!r}" for n, s in zip(TOKENS, law(30.0, -0.2) * 1500)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_load_points_csv_splits_groups_in_order_and_names_bad_columns(tmp_path):
    path = write_scores_csv(tmp_path / "scores.csv")
    points = load_points_csv(path, group="series")
    assert list(points) == ["pope", "mme"]
    np.testing.assert_array_equal(points["mme"][0], TOKENS)
    np.testing.assert_allclose(points["mme"][1], law(30.0, -0.2) * 1500, rtol=1e-15)
    single = load_points_csv(path)
    assert list(single) == ["score"] and len(single["score"][0]) == 2 * len(TOKENS)
    columns = r"its columns are \['series', 'tokens', 'score'\]"
    with pytest.raises(ValueError, match=r"y: no column 'accuracy' in .*" + columns):
        load_points_csv(path, y="accuracy")
    with pytest.raises(ValueError, match="group: no column 'model'"):
        load_points_csv(path, group="model")
    broken = tmp_path / "broken.csv"
    broken.write_text("tokens,score\n64,0.5\n144,n/a\n")
    with pytest.raises(ValueError, match=r"path: line 3 of .*expected numbers .* got '144' and 'n/a'"):
        load_points_csv(broken)


def test_cli_fit_prints_one_row_per_series_and_writes_plot_and_json(tmp_path, capsys):
    path = write_scores_csv(tmp_path / "scores.csv")
    code = main(["fit", str(path), "--group", "series", "--bootstrap", "50",
                 "--plot", str(tmp_path / "fit.png"), "--json", str(tmp_path / "fit.json")])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["series", "N_c", "alpha"] and "alpha 95% CI" in lines[0]
    pope, mme = lines[1].split(), lines[2].split()
    assert pope[0] == "pope" and float(pope[2]) == pytest.approx(-0.05) and pope[-1] == "7"
    # N_c is in the units given: scores × 100 move N_c = 1e-3 to 1e-3 · 100^(1/α) = 1e-43.
    assert float(pope[1]) == pytest.approx(1e-43, rel=1e-3)
    assert mme[0] == "mme" and float(mme[2]) == pytest.approx(-0.2) and mme[-3:] == ["1.0000", "1.0000", "7"]
    assert (tmp_path / "fit.png").read_bytes().startswith(PNG_SIGNATURE)
    saved = json.loads((tmp_path / "fit.json").read_text())
    assert saved["mme"]["alpha"] == pytest.approx(-0.2, rel=1e-6)
    assert saved["pope"]["alpha_ci"] == pytest.approx([-0.05, -0.05], rel=1e-6)


def test_cli_fit_reports_bad_input_without_a_traceback(tmp_path, capsys):
    path = write_scores_csv(tmp_path / "scores.csv")
    assert main(["fit", str(path), "--x", "N"]) == 1
    assert "qfusion fit: x: no column 'N'" in capsys.readouterr().err


# ---------------------------------------------------------------- divergence arithmetic


def brute_force_rho(differences, n):
    """ρ(N) by explicit loops over the pairs with ≥ N steps and their nonzero steps i ≠ j ≤ N."""
    cosines = []
    for d in differences:
        if len(d) < n:
            continue
        steps = [v for v in d[:n] if np.linalg.norm(v) > 0]
        for i, u in enumerate(steps):
            for j, v in enumerate(steps):
                if i != j:
                    cosines.append(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    return float(np.mean(cosines)) if cosines else 0.0


def test_divergence_statistics_hand_computed():
    # D = 2, w = (1/√2, 1/√2). Pair A: wᵀd = √2, √2. Pair B: wᵀd = √2, √2, −1/√2.
    pair_a = np.array([[2.0, 0.0], [0.0, 2.0]])
    pair_b = np.array([[1.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    result = divergence_statistics([pair_a, pair_b])
    assert result.n.tolist() == [1, 2, 3]
    assert result.pairs_at_n.tolist() == [2, 2, 1]
    # E(1) = (2 + 2)/2; E(2) = ((2√2)² + (2√2)²)/2; E(3) = (2√2 − 1/√2)² = 4.5, pair B alone.
    np.testing.assert_allclose(result.energy, [2.0, 8.0, 4.5], rtol=1e-12)
    assert result.sigma == pytest.approx(math.sqrt(2.0), rel=1e-12)
    assert result.energy[0] == pytest.approx(result.sigma**2, rel=1e-12)
    # ρ(2) pools cos = 0 (A, twice) and cos = 1 (B, twice); ρ(3): B's cosines 1, −1/√2, −1/√2.
    np.testing.assert_allclose(result.rho, [0.0, 0.5, (1 - math.sqrt(2)) / 3], atol=1e-12)
    expected_bound = [math.sqrt(2), math.sqrt(2) * math.sqrt(3), math.sqrt(2) * math.sqrt(5 - 2 * math.sqrt(2))]
    np.testing.assert_allclose(result.bound, expected_bound, rtol=1e-12)
    assert result.threshold_ratio is None  # r(2) = 1/(1·0.5) = 2, and ρ(3) < 0
    assert result.threshold_plateau is None  # |ρ(3) − ρ(2)| ≈ 0.64
    assert result.num_pairs == 2
    assert isinstance(result, DivergenceResult)
    assert json.loads(json.dumps(result.to_dict()))["energy"] == pytest.approx([2.0, 8.0, 4.5])


def test_zero_steps_are_skipped_in_the_cosines():
    shared_first_token = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    result = divergence_statistics([shared_first_token])
    # Counting the zero step as cos = 0 would give ρ(3) = (2/√2)/6 instead.
    np.testing.assert_allclose(result.rho, [0.0, 0.0, 1 / math.sqrt(2)], atol=1e-12)
    assert result.sigma == 0.0 and result.energy[0] == 0.0
    assert result.threshold_plateau is None  # ρ(2) has no two nonzero steps: not a plateau
    np.testing.assert_allclose(result.energy, [0.0, 0.5, 4.5], rtol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_rho_is_a_mean_cosine_within_minus_one_one(seed):
    rng = np.random.default_rng(seed)
    differences = [rng.normal(size=(int(rng.integers(1, 9)), 6)) for _ in range(5)]
    differences[0][:2] = 0.0  # a pair whose answers share two tokens
    differences[1] = np.outer((-1.0) ** np.arange(1, 8), rng.normal(size=6))  # alternating: cos = ±1
    result = divergence_statistics(differences)
    assert np.all(result.rho >= -1.0) and np.all(result.rho <= 1.0)
    expected = [brute_force_rho(differences, n) for n in result.n]
    np.testing.assert_allclose(result.rho, expected, atol=1e-12)
    assert result.energy[0] == pytest.approx(result.sigma**2, rel=1e-12)
    assert len(result.n) == max(len(d) for d in differences)


def constant_rho_steps(rho, steps):
    """d_t = a·e_0 + b·e_t with a² = ρ, b² = 1 − ρ: unit vectors with cos(d_i, d_j) = ρ for all i ≠ j."""
    d = np.zeros((steps, steps + 1))
    d[:, 0] = math.sqrt(rho)
    d[np.arange(steps), np.arange(1, steps + 1)] = math.sqrt(1 - rho)
    return d


@pytest.mark.parametrize("rho, r_star, expected", [
    (0.3, 1.0, 5),  # N − 1 > 1/0.3 = 3.33 → N = 5
    (0.5, 0.7, 4),  # N − 1 > 1/0.35 = 2.86 → N = 4
    (0.15, 0.5, 15),  # N − 1 > 1/0.075 = 13.33 → N = 15
])
def test_ratio_threshold_for_a_constant_rho(rho, r_star, expected):
    result = divergence_statistics([constant_rho_steps(rho, 30)], r_star=r_star)
    np.testing.assert_allclose(result.rho[1:], rho, rtol=1e-12)
    assert result.threshold_ratio == expected
    assert result.threshold_plateau == 2  # ρ is flat from N = 2 on


def test_thresholds_are_none_where_rho_is_not_positive():
    # d_t = (−1)^t·e: cos(d_i, d_j) = (−1)^(i+j), so ρ = 0 (N = 1), −1, −1/3, −1/3, −1/5.
    alternating = np.outer((-1.0) ** np.arange(1, 6), [1.0, 0.0])
    result = divergence_statistics([alternating])
    np.testing.assert_allclose(result.rho, [0.0, -1.0, -1 / 3, -1 / 3, -0.2], atol=1e-12)
    np.testing.assert_allclose(result.energy, [0.5, 0.0, 0.5, 0.0, 0.5], atol=1e-12)  # wᵀd_t = ∓1/√2
    np.testing.assert_allclose(result.bound[:2], [math.sqrt(0.5), 0.0], atol=1e-12)
    assert result.threshold_ratio is None
    assert result.threshold_plateau == 3
    orthogonal = divergence_statistics([np.eye(4)])
    np.testing.assert_allclose(orthogonal.rho, 0.0, atol=1e-12)
    assert orthogonal.threshold_ratio is None
    assert divergence_statistics([alternating[:3]]).threshold_plateau is None


def test_divergence_statistics_rejects_bad_input():
    with pytest.raises(ValueError, match="differences: expected at least one"):
        divergence_statistics([])
    with pytest.raises(ValueError, match="differences: expected .* with one D"):
        divergence_statistics([np.ones((2, 3)), np.ones((2, 4))])
    with pytest.raises(ValueError, match="differences: every array has 0 steps"):
        divergence_statistics([np.ones((0, 3))])
    with pytest.raises(ValueError, match="r_star: expected > 0, got 0"):
        divergence_statistics([np.ones((2, 3))], r_star=0)
    with pytest.raises(ValueError, match="eps: expected > 0"):
        divergence_statistics([np.ones((2, 3))], eps=-1.0)


# ---------------------------------------------------------------- divergence of a real causal LM

WORDS = ("what is the color of sky sea grass today it was blue green red deep dark light and very "
         "bright cold warm morning night").split()
PAIRS = [
    ("what is the color of the sky", "the sky is blue and bright today", "the sky is dark red"),
    ("what is the color of the sea", "deep blue", "green and cold at night"),
    ("what is the color of grass", "it is green", "it was red and very dark"),
]


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    """A random 2-layer Llama and a word-level tokenizer without a pad token, saved to one directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny_lm")
    vocab = {token: i for i, token in enumerate(["[UNK]", "[EOS]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(directory)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    assert tokenizer.pad_token_id is None  # exercises the eos fallback for padding
    return AutoModelForCausalLM.from_pretrained(tiny_lm_dir), tokenizer


def prefix_state(model, ids):
    """f(x): the last-layer hidden state at the last token of ids, run alone (no batch, no padding)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0, -1].double().numpy()


def test_branch_divergence_matches_prefixes_run_one_by_one(tiny_lm):
    model, tokenizer = tiny_lm
    differences = []
    for prompt, chosen, rejected in PAIRS:
        p = tokenizer(prompt)["input_ids"]
        x = tokenizer(chosen, add_special_tokens=False)["input_ids"]
        y = tokenizer(rejected, add_special_tokens=False)["input_ids"]
        d = np.stack([prefix_state(model, p + x[:t]) - prefix_state(model, p + y[:t])
                      for t in range(1, min(len(x), len(y)) + 1)])
        differences.append(d)
    # Pair 0 shares "the sky is": its first three steps are the same prefix on both sides.
    np.testing.assert_allclose(differences[0][:3], 0.0, atol=1e-5)
    assert np.linalg.norm(differences[0][3]) > 1e-3
    expected = divergence_statistics(differences)

    result = branch_divergence(model, tokenizer, PAIRS, batch_size=2, progress=False)
    assert result.n.tolist() == [1, 2, 3, 4, 5]
    assert result.pairs_at_n.tolist() == [3, 3, 2, 1, 1]  # T = 5, 2, 3 answer steps
    assert result.energy.shape == result.rho.shape == result.bound.shape == (5,)
    np.testing.assert_allclose(result.energy, expected.energy, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(result.rho, expected.rho, atol=1e-4)
    assert np.all(np.abs(result.rho) <= 1.0)
    assert result.energy[0] == pytest.approx(result.sigma**2, rel=1e-12)
    assert result.bound[0] == pytest.approx(result.sigma, rel=1e-12)
    assert result.num_pairs == 3


def test_branch_divergence_does_not_depend_on_batching_and_caps_steps(tiny_lm):
    model, tokenizer = tiny_lm
    one_by_one = branch_divergence(model, tokenizer, PAIRS, batch_size=1, progress=False)
    together = branch_divergence(model, tokenizer, PAIRS, batch_size=3, progress=False)
    np.testing.assert_allclose(one_by_one.energy, together.energy, rtol=1e-5)
    np.testing.assert_allclose(one_by_one.rho, together.rho, atol=1e-6)
    capped = branch_divergence(model, tokenizer, PAIRS, max_len=2, progress=False)
    assert capped.n.tolist() == [1, 2]
    np.testing.assert_allclose(capped.energy, together.energy[:2], rtol=1e-5)
    model.train()
    branch_divergence(model, tokenizer, PAIRS[:1], progress=False)
    assert model.training  # the caller's mode is restored
    model.eval()


def test_branch_divergence_rejects_bad_pairs(tiny_lm):
    model, tokenizer = tiny_lm
    with pytest.raises(ValueError, match="pairs: expected a non-empty sequence"):
        branch_divergence(model, tokenizer, [], progress=False)
    with pytest.raises(TypeError, match=r"pairs\[1\]: expected a \(prompt, chosen, rejected\) triple"):
        branch_divergence(model, tokenizer, [PAIRS[0], ("prompt", "only one answer")], progress=False)
    with pytest.raises(ValueError, match="pairs: every pair has an empty chosen or rejected answer"):
        branch_divergence(model, tokenizer, [("what is it", "", "blue")], progress=False)
    with pytest.raises(ValueError, match="max_len: expected >= 1, got 0"):
        branch_divergence(model, tokenizer, PAIRS, max_len=0, progress=False)
    with pytest.raises(ValueError, match="batch_size: expected >= 1, got 0"):
        branch_divergence(model, tokenizer, PAIRS, batch_size=0, progress=False)


def test_cli_divergence_prints_statistics_and_writes_plot_and_json(tiny_lm_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(dict(zip(("prompt", "chosen", "rejected"), p))) for p in PAIRS) + "\n\n")
    code = main(["divergence", "--model", str(tiny_lm_dir), "--pairs", str(pairs), "--max-len", "8",
                 "--batch-size", "2", "--no-progress", "--plot", str(tmp_path / "div.png"),
                 "--json", str(tmp_path / "div.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("pairs: 3  sigma: ")
    rows = {int(line.split()[0]): line.split() for line in out.splitlines() if line.split()[0].isdigit()}
    assert sorted(rows) == [1, 2, 4, 5]  # powers of two, then the last N
    assert rows[1][1] == "3" and rows[4][1] == "1"
    assert float(rows[1][4]) == pytest.approx(float(rows[1][3]), rel=1e-3)  # bound(1) = σ = √E(1)
    assert "threshold 1, smallest N with r(N) < 1:" in out
    assert "threshold 2, smallest N with |rho(N+1) - rho(N)| < 0.001:" in out
    saved = json.loads((tmp_path / "div.json").read_text())
    assert saved["num_pairs"] == 3 and len(saved["rho"]) == 5
    assert all(-1.0 <= r <= 1.0 for r in saved["rho"])
    assert saved["energy"][0] == pytest.approx(saved["sigma"] ** 2, rel=1e-12)
    assert (tmp_path / "div.png").read_bytes().startswith(PNG_SIGNATURE)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "what", "chosen": "blue"}\n')
    assert main(["divergence", "--model", str(tiny_lm_dir), "--pairs", str(bad)]) == 1
    assert "--pairs: line 1 of" in capsys.readouterr().err


def test_plot_divergence_writes_a_png(tmp_path):
    result = divergence_statistics([constant_rho_steps(0.3, 12)])
    path = plot_divergence(result, tmp_path / "divergence.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE) and path.stat().st_size > 5000

"""qfusion.scaling.power_law: the fit, its inverse, its JSON and CSV files, and `qfusion fit`."""

import json
import math
import warnings

import numpy as np
import pytest

from qfusion.cli import main
from qfusion.scaling import (
    POOR_FIT_R2,
    PoorFitWarning,
    PowerLawFit,
    fit_power_law,
    load_fits,
    load_points_csv,
    save_fits,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKENS = np.array([36.0, 64.0, 144.0, 256.0, 576.0, 1024.0, 2304.0])


def law(n_c, alpha, num_tokens=TOKENS):
    return (n_c / np.asarray(num_tokens, dtype=np.float64)) ** alpha


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
    with pytest.raises(TypeError, match="num_tokens: expected numbers, got 'a'"):
        fit.predict("a")
    with pytest.raises(TypeError, match=r"score: expected numbers, got \[None\]"):
        fit.tokens_for([None])


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
    ([1, 2, 3], [1, 2, 3], {"n_bootstrap": 1.5}, TypeError, r"n_bootstrap: expected an integer >= 0, got 1.5"),
    ([1, 2, 3], [1, 2, 3], {"n_bootstrap": True}, TypeError, r"n_bootstrap: expected an integer >= 0, got True"),
    ([1, 2, 3], [1, 2, 3], {"seed": "a"}, TypeError, r"seed: expected an integer >= 0, got 'a'"),
])
def test_bad_inputs_raise_naming_the_argument(num_tokens, scores, kwargs, error, match):
    with pytest.raises(error, match=match):
        fit_power_law(num_tokens, scores, **kwargs)


def test_flat_scores_have_no_power_law():
    with pytest.raises(ValueError, match="scores: no power law in num_tokens"):
        fit_power_law(TOKENS, np.full(len(TOKENS), 71.5))


FLAT_TOKENS = [1, 2, 4, 8, 16]
FLAT_SCORES = [30.0, 38.5, 44.9, 45.3, 45.1]  # rising up to N = 4, flat from there: R² 0.752 in log space


def test_a_poor_fit_warns_when_made_and_says_so_when_printed():
    with pytest.warns(PoorFitWarning, match=r"fit_power_law: R² = 0\.752 in log space, below POOR_FIT_R2 = 0\.9"):
        fit = fit_power_law(FLAT_TOKENS, FLAT_SCORES, n_bootstrap=0)
    assert fit.poor
    assert str(fit).endswith("POOR FIT: R² 0.752 < 0.9, the points do not follow the law")


def test_a_good_fit_is_not_flagged_and_warns_nothing():
    noise = np.exp(np.random.default_rng(3).normal(0, 0.02, len(TOKENS)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit = fit_power_law(TOKENS, law(5.0, -0.3) * noise, n_bootstrap=20)
    assert not fit.poor and fit.r2 >= POOR_FIT_R2
    assert str(fit) == ("P(N) = (N_c / N)^α, α = -0.2917 [-0.304, -0.2775], N_c = 4.612, R² = 0.996 (log space), "
                        "7 points")


@pytest.mark.parametrize("r2, poor", [(POOR_FIT_R2, False), (np.nextafter(POOR_FIT_R2, 0), True), (0.32, True),
                                      (1.0, False), (math.nan, True)])
def test_poor_means_log_space_r2_below_the_threshold(r2, poor):
    fit = PowerLawFit(n_c=10.0, alpha=-0.5, beta=-0.5 * math.log(10.0), r2=r2, r2_score_space=0.99,
                      alpha_ci=(math.nan, math.nan), num_points=4)
    assert fit.poor is poor


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


@pytest.mark.parametrize("change, error, match", [
    ({"alpha": "x"}, TypeError, r"data\['alpha'\]: expected a number, got 'x'"),
    ({"r2": None}, TypeError, r"data\['r2'\]: expected a number, got None"),
    ({"alpha_ci": [1.0, 2.0, 3.0]}, ValueError, r"data\['alpha_ci'\]: expected 2 values \(low, high\)"),
    ({"scores": "1, 2"}, TypeError, r"data\['scores'\]: expected a list of numbers, got '1, 2'"),
    ({"num_points": 7.5}, TypeError, r"data\['num_points'\]: expected an integer >= 0, got 7.5"),
])
def test_from_dict_names_a_bad_value(change, error, match):
    data = {**fit_power_law(TOKENS, law(5.0, -0.3), n_bootstrap=0).to_dict(), **change}
    with pytest.raises(error, match=match):
        PowerLawFit.from_dict(data)


def test_from_dict_reads_null_as_nan_only_for_n_c_and_the_alpha_interval():
    data = {**fit_power_law(TOKENS, law(5.0, -0.3), n_bootstrap=0).to_dict(), "n_c": None, "alpha_ci": [None, None]}
    fit = PowerLawFit.from_dict(data)
    assert math.isnan(fit.n_c) and all(math.isnan(v) for v in fit.alpha_ci)


def test_save_fits_refuses_anything_but_named_fits(tmp_path):
    fit = fit_power_law(TOKENS, law(5.0, -0.3), n_bootstrap=0)
    with pytest.raises(TypeError, match=r"fits\['a'\]: expected a PowerLawFit, got dict"):
        save_fits({"a": fit.to_dict()}, tmp_path / "fits.json")
    with pytest.raises(TypeError, match=r"fits: expected a mapping \{name: PowerLawFit\}, got list"):
        save_fits([fit], tmp_path / "fits.json")
    assert list(tmp_path.iterdir()) == []


def test_load_fits_names_the_bad_entry(tmp_path):
    path = tmp_path / "fits.json"
    path.write_text(json.dumps({"vqa": {"alpha": -0.1}}))
    with pytest.raises(ValueError, match=r"path: fit 'vqa' .* missing \['n_c', 'beta'"):
        load_fits(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="path: expected a JSON object"):
        load_fits(path)


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


def test_cli_fit_flags_a_poor_fit_in_its_row_and_explains_the_flag(tmp_path, capsys):
    csv = tmp_path / "flat.csv"
    csv.write_text("tokens,score\n" + "".join(f"{n},{s}\n" for n, s in zip(FLAT_TOKENS, FLAT_SCORES)))
    assert main(["fit", str(csv), "--bootstrap", "20"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == "note"
    assert lines[1].split()[0] == "score" and lines[1].endswith("  5  poor fit")
    assert lines[2] == ("poor fit: R2 (log) below 0.9, the points do not follow P(N) = (N_c / N)^alpha closely; "
                        "N or scores read from the law can be far from the measured ones")
    path = write_scores_csv(tmp_path / "scores.csv")
    assert main(["fit", str(path), "--group", "series", "--bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    assert "poor fit" not in printed and len(printed.splitlines()) == 3


def test_cli_fit_reports_bad_input_without_a_traceback(tmp_path, capsys):
    path = write_scores_csv(tmp_path / "scores.csv")
    assert main(["fit", str(path), "--x", "N"]) == 1
    assert "qfusion fit: x: no column 'N'" in capsys.readouterr().err

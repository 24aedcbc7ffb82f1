"""The scaling analysis: power laws in the number of tokens, and branch divergence of a causal LM.

Two measurements (SPEC.md §7):

* :func:`fit_power_law` fits P(N) = (N_c / N)^α to (number of tokens, score) points, in log space;
  :func:`plot_scaling` draws several such series with their fitted curves, and
  :func:`load_points_csv` reads them from a CSV file; :func:`save_fits` / :func:`load_fits` keep
  fits as JSON, and :func:`smallest_budget` turns a fit into the smallest N that meets a target.
* :func:`branch_divergence` measures how the last hidden states of a causal LM drift apart along
  two answers to one prompt (chosen / rejected pairs); :func:`divergence_statistics` is its
  arithmetic on per-pair difference arrays, and :func:`plot_divergence` draws the result.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.optimize import minimize
from tqdm.auto import tqdm

NO_POWER_LAW = 1e-6
"""|α| below this means the scores do not follow a power law in N."""


def _as_points(values, name: str) -> np.ndarray:
    """values as a 1-D float64 array, or an error naming the argument."""
    array = np.asarray(values)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected numbers, got an array of dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got shape {array.shape}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{name}: expected finite values, got {array.tolist()}")
    if (array <= 0).any():
        raise ValueError(f"{name}: expected values > 0 (the law is fitted in log space), got {array.tolist()}")
    return array


def _solve(log_n: np.ndarray, log_p: np.ndarray) -> tuple[float, float]:
    """(α, β) minimising mean_i (log P_i − β + α·log N_i)², by BFGS from (0, 0)."""

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        alpha, beta = params
        residual = log_p - beta + alpha * log_n
        return float(np.mean(residual**2)), np.array([np.mean(2 * residual * log_n), -np.mean(2 * residual)])

    # The objective is a convex quadratic: with its exact gradient, BFGS reaches machine precision.
    result = minimize(objective, np.zeros(2), jac=True, method="BFGS", options={"gtol": 1e-12})
    alpha, beta = result.x
    return float(alpha), float(beta)


def _r2(observed: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination of predicted against observed."""
    residual = np.sum((observed - predicted) ** 2)
    total = np.sum((observed - observed.mean()) ** 2)
    return float(1.0 - residual / total)


@dataclass(frozen=True)
class PowerLawFit:
    """A fitted law P(N) = (N_c / N)^α = exp(β − α·log N), with β = α·log N_c.

    α < 0: more tokens, better (higher) score. ``r2`` is R² of log P in log space (what was fitted),
    ``r2_score_space`` R² of the predicted scores in the units given. ``alpha_ci`` is a 95% bootstrap
    interval for α ((nan, nan) when no bootstrap was run). ``num_tokens`` and ``scores`` are the
    points fitted (empty for a fit built by hand), kept so that a budget chosen from the law can be
    given a bootstrap interval (:func:`smallest_budget`).
    """

    n_c: float
    alpha: float
    beta: float
    r2: float
    r2_score_space: float
    alpha_ci: tuple[float, float]
    num_points: int
    num_tokens: tuple[float, ...] = ()
    scores: tuple[float, ...] = ()

    def predict(self, num_tokens):
        """The law's score at num_tokens: a float for a scalar, a numpy array for an array-like.

        >>> PowerLawFit(n_c=10.0, alpha=-0.5, beta=-0.5 * math.log(10.0), r2=1.0, r2_score_space=1.0,
        ...             alpha_ci=(-0.5, -0.5), num_points=4).predict([10, 40])
        array([1., 2.])
        """
        n = np.asarray(num_tokens, dtype=np.float64)
        if not (np.isfinite(n).all() and (n > 0).all()):
            raise ValueError(f"num_tokens: expected finite values > 0, got {num_tokens!r}")
        # Through β rather than N_c, which overflows when |α| is small.
        predicted = np.exp(self.beta - self.alpha * np.log(n))
        return float(predicted) if n.ndim == 0 else predicted

    def tokens_for(self, score):
        """The number of tokens at which the law reaches score (the inverse of :meth:`predict`).

        For α < 0 (the score rises with N) it is the smallest N with P(N) ≥ score; for α > 0 (a
        lower-is-better score) the smallest N with P(N) ≤ score. A float for a scalar, a numpy array
        for an array-like. The law only takes positive values, so a score ≤ 0 is out of reach.
        """
        s = np.asarray(score, dtype=np.float64)
        if not np.isfinite(s).all():
            raise ValueError(f"score: expected finite values, got {score!r}")
        if (s <= 0).any():
            raise ValueError(f"score: the law P(N) = (N_c / N)^α only takes values > 0, so {score!r} is never reached")
        with np.errstate(over="ignore"):
            n = np.exp((self.beta - np.log(s)) / self.alpha)
        if not (np.isfinite(n).all() and (n > 0).all()):
            raise ValueError(f"score: {score!r} is reached only at N outside the floating-point range "
                             f"(α = {self.alpha:.4g})")
        return float(n) if n.ndim == 0 else n

    def to_dict(self) -> dict:
        """The fit as plain JSON-ready values (the points included)."""
        return {"n_c": self.n_c, "alpha": self.alpha, "beta": self.beta, "r2": self.r2,
                "r2_score_space": self.r2_score_space, "alpha_ci": list(self.alpha_ci),
                "num_points": self.num_points, "num_tokens": list(self.num_tokens), "scores": list(self.scores)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "PowerLawFit":
        """The fit back from :meth:`to_dict`'s values (``num_tokens`` and ``scores`` may be absent)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"data: expected a mapping of a fit's values, got {type(data).__name__}")
        required = ("n_c", "alpha", "beta", "r2", "r2_score_space", "alpha_ci", "num_points")
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(f"data: expected the keys {list(required)} of a fit, missing {missing}")
        low, high = (math.nan if v is None else float(v) for v in data["alpha_ci"])
        points = tuple(float(v) for v in data.get("num_tokens", ())), tuple(float(v) for v in data.get("scores", ()))
        if len(points[0]) != len(points[1]):
            raise ValueError(f"data: num_tokens and scores differ in length ({len(points[0])} and {len(points[1])})")
        return cls(n_c=math.nan if data["n_c"] is None else float(data["n_c"]), alpha=float(data["alpha"]),
                   beta=float(data["beta"]), r2=float(data["r2"]), r2_score_space=float(data["r2_score_space"]),
                   alpha_ci=(low, high), num_points=int(data["num_points"]), num_tokens=points[0], scores=points[1])


def fit_power_law(num_tokens, scores, *, n_bootstrap: int = 1000, seed: int = 0) -> PowerLawFit:
    """Fit P(N) = (N_c / N)^α to scores measured at numbers of tokens N, in log space.

    Minimises mean_i (log P_i − β + α·log N_i)² over (α, β) with SciPy's BFGS from (0, 0), the convex
    parametrisation β = α·log N_c of mean_i (log P_i − α·(log N_c − log N_i))², then N_c = exp(β/α).
    Scores are used in the units given: α does not depend on them, N_c does.

    num_tokens: (P,) numbers of tokens N > 0, at least two distinct.
    scores: (P,) scores > 0 at those N; P ≥ 3.
    n_bootstrap: resamples of the points (with replacement) for ``alpha_ci``; resamples with fewer than
        two distinct N are skipped; 0 leaves ``alpha_ci`` at (nan, nan).
    seed: seed of the bootstrap resampling.

    Raises ValueError when |α| < 1e-6: the scores show no power law in N.

    >>> fit = fit_power_law([10, 40, 90, 160], [1.0, 2.0, 3.0, 4.0])  # P = (10 / N)^-0.5
    >>> round(fit.alpha, 6), round(fit.n_c, 4), round(fit.r2, 6)
    (-0.5, 10.0, 1.0)
    >>> round(fit.tokens_for(2.5), 2)
    62.5
    """
    n = _as_points(num_tokens, "num_tokens")
    p = _as_points(scores, "scores")
    if len(n) != len(p):
        raise ValueError(f"num_tokens, scores: expected equal lengths, got {len(n)} and {len(p)}")
    if len(n) < 3:
        raise ValueError(f"num_tokens: expected at least 3 points, got {len(n)}")
    if len(np.unique(n)) < 2:
        raise ValueError(f"num_tokens: expected at least two distinct values, got {np.unique(n).tolist()}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap: expected >= 0, got {n_bootstrap!r}")

    log_n, log_p = np.log(n), np.log(p)
    alpha, beta = _solve(log_n, log_p)
    if abs(alpha) < NO_POWER_LAW:
        raise ValueError(f"scores: no power law in num_tokens (|alpha| = {abs(alpha):.2e} < {NO_POWER_LAW:g})")
    with np.errstate(over="ignore"):
        n_c = float(np.exp(beta / alpha))
    log_fitted = beta - alpha * log_n

    rng = np.random.default_rng(seed)
    alphas = []
    for _ in range(n_bootstrap):
        index = rng.integers(0, len(n), size=len(n))
        if len(np.unique(n[index])) >= 2:
            alphas.append(_solve(log_n[index], log_p[index])[0])
    low, high = np.percentile(alphas, [2.5, 97.5]) if alphas else (math.nan, math.nan)

    return PowerLawFit(n_c=n_c, alpha=alpha, beta=beta, r2=_r2(log_p, log_fitted),
                       r2_score_space=_r2(p, np.exp(log_fitted)), alpha_ci=(float(low), float(high)),
                       num_points=len(n), num_tokens=tuple(n.tolist()), scores=tuple(p.tolist()))


def save_fits(fits: Mapping[str, PowerLawFit], path: str | os.PathLike) -> Path:
    """Write named fits as JSON, {name: fit.to_dict()} (what ``qfusion fit --json`` writes)."""
    with open(path, "w") as handle:
        json.dump({name: fit.to_dict() for name, fit in fits.items()}, handle, indent=2)
    return Path(path)


def load_fits(path: str | os.PathLike) -> dict[str, PowerLawFit]:
    """Read named fits from JSON written by :func:`save_fits` (or ``qfusion fit --json``)."""
    with open(path) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"path: {os.fspath(path)!r} is not JSON: {error}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"path: expected a JSON object {{name: fit}} in {os.fspath(path)!r}, got {str(data)[:80]!r}")
    fits = {}
    for name, value in data.items():
        try:
            fits[name] = PowerLawFit.from_dict(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"path: fit {name!r} in {os.fspath(path)!r}: {error}") from None
    return fits


@dataclass(frozen=True)
class BudgetChoice:
    """The smallest whole number of tokens at which a fitted law meets a target score.

    target: the score to meet (for a ``max_loss``, derived from the law at ``reference``).
    num_tokens: the smallest integer N >= 1 whose predicted score meets the target.
    interval: a bootstrap interval for num_tokens, from refitting resampled points ((None, None)
        when the fit carries no points).
    predicted: the law's score at num_tokens. reference: the largest N measured (None without points).
    measured_range: (smallest, largest) N measured, or None; extrapolated: num_tokens lies outside it.
    """

    target: float
    num_tokens: int
    interval: tuple[int | None, int | None]
    predicted: float
    reference: float | None
    measured_range: tuple[float, float] | None
    extrapolated: bool

    def to_dict(self) -> dict:
        """The choice as plain JSON-ready values."""
        return {"target": self.target, "num_tokens": self.num_tokens, "interval": list(self.interval),
                "predicted": self.predicted, "reference": self.reference,
                "measured_range": None if self.measured_range is None else list(self.measured_range),
                "extrapolated": self.extrapolated}


def _smallest_n(alpha: float, beta: float, rising: bool, target: float) -> int:
    """Smallest integer N >= 1 with exp(β − α·log N) meeting target (>= when rising, else <=)."""
    if (alpha < 0) != rising:  # this law moves the wrong way with N: the fewest tokens are best
        return 1
    with np.errstate(over="ignore", divide="ignore"):
        n = math.exp(min((beta - math.log(target)) / alpha, 700.0))
    # A tiny relative slack, so that N lying exactly on the law is not pushed up by rounding.
    return max(1, math.ceil(n * (1.0 - 1e-9)))


def _target(alpha: float, beta: float, rising: bool, target: float | None, max_loss: float | None,
            reference: float | None) -> float:
    if target is not None:
        return target
    at_reference = math.exp(beta - alpha * math.log(reference))
    return at_reference * (1.0 - max_loss if rising else 1.0 + max_loss)


def smallest_budget(fit: PowerLawFit, *, target: float | None = None, max_loss: float | None = None,
                    n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95) -> BudgetChoice:
    """The smallest number of tokens N at which a fitted law P(N) meets a target, with a bootstrap interval.

    Give exactly one of:
    target: a score to reach (for α < 0, rising scores: P(N) >= target; for α > 0, a lower-is-better
        score: P(N) <= target).
    max_loss: the fraction of the score at the largest budget measured that may be given up, in
        [0, 1): the target is P(N_max)·(1 − max_loss) for rising scores (P(N_max)·(1 + max_loss) for
        falling ones), P being the law. It needs the fit's points (a fit from :func:`fit_power_law`).
    n_bootstrap: resamples of the fit's points (with replacement, as :func:`fit_power_law` does); each
        is refitted and gives its own smallest N (with its own P(N_max) for a max_loss). Resamples
        with fewer than two distinct N are skipped. 0, or a fit without points, gives no interval.
    seed: seed of the resampling. confidence: the interval's coverage, in (0, 1).

    >>> fit = fit_power_law([16, 64, 256, 576], [0.60, 0.72, 0.86, 0.94])
    >>> choice = smallest_budget(fit, max_loss=0.05)
    >>> choice.num_tokens, choice.extrapolated
    (384, False)
    """
    if (target is None) == (max_loss is None):
        raise ValueError(f"target, max_loss: expected exactly one of them, got target={target!r}, "
                         f"max_loss={max_loss!r}")
    if target is not None and not (math.isfinite(target) and target > 0):
        raise ValueError(f"target: expected a finite score > 0 (the law only takes values > 0), got {target!r}")
    if max_loss is not None and not (0 <= max_loss < 1):
        raise ValueError(f"max_loss: expected a fraction in [0, 1), got {max_loss!r}")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap: expected >= 0, got {n_bootstrap!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence!r}")
    n, p = np.asarray(fit.num_tokens, dtype=np.float64), np.asarray(fit.scores, dtype=np.float64)
    has_points = len(n) > 0
    if max_loss is not None and not has_points:
        raise ValueError("max_loss: the fit carries no points, so the largest budget is unknown; refit it with "
                         "fit_power_law (or qfusion fit) or give a target score")
    rising = fit.alpha < 0
    reference = float(n.max()) if has_points else None
    goal = _target(fit.alpha, fit.beta, rising, target, max_loss, reference)
    num_tokens = _smallest_n(fit.alpha, fit.beta, rising, goal)

    interval: tuple[int | None, int | None] = (None, None)
    if has_points and n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        log_n, log_p = np.log(n), np.log(p)
        chosen = []
        for _ in range(n_bootstrap):
            index = rng.integers(0, len(n), size=len(n))
            if len(np.unique(n[index])) < 2:
                continue
            alpha, beta = _solve(log_n[index], log_p[index])
            resample_goal = _target(alpha, beta, rising, target, max_loss, reference)
            chosen.append(_smallest_n(alpha, beta, rising, resample_goal))
        if chosen:
            tail = 100 * (1 - confidence) / 2
            interval = (int(np.percentile(chosen, tail, method="lower")),
                        int(np.percentile(chosen, 100 - tail, method="higher")))
    measured = (float(n.min()), float(n.max())) if has_points else None
    extrapolated = measured is not None and not (measured[0] <= num_tokens <= measured[1])
    return BudgetChoice(target=float(goal), num_tokens=num_tokens, interval=interval,
                        predicted=fit.predict(num_tokens), reference=reference, measured_range=measured,
                        extrapolated=extrapolated)


def load_points_csv(path: str | os.PathLike, x: str = "tokens", y: str = "score",
                    group: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read (number of tokens, score) points from a CSV file with a header row, one series per group.

    x, y: the columns of N and of the score. group: the column naming each row's series; without
    it, all rows form one series named after ``y``. Series keep their first-appearance order.
    Returns {series: (num_tokens (P,), scores (P,))}.
    """
    columns = {"x": x, "y": y} if group is None else {"x": x, "y": y, "group": group}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        for argument, column in columns.items():
            if column not in header:
                raise ValueError(f"{argument}: no column {column!r} in {os.fspath(path)!r}; its columns are {header}")
        points: dict[str, tuple[list[float], list[float]]] = {}
        for row in reader:
            name = y if group is None else row[group]
            try:
                value_x, value_y = float(row[x]), float(row[y])
            except (TypeError, ValueError):
                raise ValueError(f"path: line {reader.line_num} of {os.fspath(path)!r}: expected numbers in "
                                 f"columns {x!r} and {y!r}, got {row[x]!r} and {row[y]!r}") from None
            xs, ys = points.setdefault(name, ([], []))
            xs.append(value_x)
            ys.append(value_y)
    if not points:
        raise ValueError(f"path: no data rows in {os.fspath(path)!r}")
    return {name: (np.array(xs), np.array(ys)) for name, (xs, ys) in points.items()}


def plot_scaling(series: Mapping[str, tuple], path: str | os.PathLike, *, title: str | None = None,
                 xlabel: str = "number of tokens N", ylabel: str = "score") -> Path:
    """Draw scaling series (points and fitted power law, α in the legend) on one log-x figure, as PNG.

    series: {name: (num_tokens, scores)} (fitted here, without bootstrap) or
        {name: (num_tokens, scores, fit)} with a :class:`PowerLawFit` of those points.
    path: the image file to write (its format follows the suffix). Returns it as a Path.
    """
    if not series:
        raise ValueError("series: expected at least one series, got none")
    figure = Figure(figsize=(6.4, 4.4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, value in series.items():
        if not isinstance(value, tuple) or len(value) not in (2, 3):
            raise TypeError(f"series[{name!r}]: expected (num_tokens, scores) or (num_tokens, scores, fit), "
                            f"got {type(value).__name__}")
        n, p = np.asarray(value[0], dtype=np.float64), np.asarray(value[1], dtype=np.float64)
        fit = value[2] if len(value) == 3 else fit_power_law(n, p, n_bootstrap=0)
        if not isinstance(fit, PowerLawFit):
            raise TypeError(f"series[{name!r}]: expected a PowerLawFit as third item, got {type(fit).__name__}")
        (points,) = axes.plot(n, p, "o")
        grid = np.geomspace(n.min(), n.max(), 200)
        axes.plot(grid, fit.predict(grid), "-", color=points.get_color(),
                  label=f"{name}: α = {fit.alpha:.3f}, N_c = {fit.n_c:.3g}")
    axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title is not None:
        axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return Path(path)


@dataclass(frozen=True, eq=False)
class DivergenceResult:
    """Branch-divergence statistics at N = 1, 2, ..., T_max answer steps (SPEC.md §7).

    n: (K,) the numbers of answer steps N = 1..K.
    energy: (K,) E(N) = mean over pairs of (wᵀ Σ_{t≤N} d_t)², w = 1/√D.
    rho: (K,) ρ(N), the mean cosine of d_i, d_j over i ≠ j ≤ N (0 where no two nonzero steps exist).
    bound: (K,) σ·√(N + N(N−1)·ρ(N)) (clipped at 0 inside the root).
    pairs_at_n: (K,) how many pairs have at least N answer steps (those that count at N).
    sigma: √E(1). threshold_ratio: smallest N with r(N) = 1/((N−1)ρ(N)) < r_star and ρ(N) > 0, or
    None. threshold_plateau: smallest N with |ρ(N+1) − ρ(N)| < eps, or None. num_pairs: pairs used.
    """

    n: np.ndarray
    energy: np.ndarray
    rho: np.ndarray
    bound: np.ndarray
    pairs_at_n: np.ndarray
    sigma: float
    threshold_ratio: int | None
    threshold_plateau: int | None
    num_pairs: int
    r_star: float
    eps: float

    def to_dict(self) -> dict:
        """The result as plain JSON-ready values."""
        return {"n": self.n.tolist(), "energy": self.energy.tolist(), "rho": self.rho.tolist(),
                "bound": self.bound.tolist(), "pairs_at_n": self.pairs_at_n.tolist(), "sigma": self.sigma,
                "threshold_ratio": self.threshold_ratio, "threshold_plateau": self.threshold_plateau,
                "num_pairs": self.num_pairs, "r_star": self.r_star, "eps": self.eps}


def divergence_statistics(differences: Sequence, *, r_star: float = 1.0, eps: float = 1e-3) -> DivergenceResult:
    """E(N), ρ(N), the bound and both thresholds from per-pair hidden-state differences d_t.

    differences: one array (T_i, D) per pair, row t−1 = d_t = f(x_≤t) − f(y_≤t). Statistics at N use
        the pairs with T_i ≥ N answer steps. Rows that are exactly zero (answers still sharing their
        first tokens) are skipped in the cosines; ρ(N) pools the cosines of all pairs' (i, j), i ≠ j.
    r_star: threshold 1 is the smallest N with 1/((N−1)ρ(N)) < r_star, only where ρ(N) > 0.
    eps: threshold 2 is the smallest N with |ρ(N+1) − ρ(N)| < eps, where ρ is defined at both.

    >>> d = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # one pair, D = 2
    >>> result = divergence_statistics([d])
    >>> result.energy.round(6).tolist(), round(result.sigma**2, 6)  # (wᵀ Σ_{t≤N} d_t)², w = (1/√2, 1/√2)
    ([2.0, 4.5, 8.0], 2.0)
    >>> result.rho.round(4).tolist()  # cos(d1, d2) = cos(d1, d3) = 1/√2, cos(d2, d3) = 0
    [0.0, 0.7071, 0.4714]
    """
    if not differences:
        raise ValueError("differences: expected at least one (T, D) array, got none")
    arrays = [np.asarray(d, dtype=np.float64) for d in differences]
    if any(a.ndim != 2 for a in arrays) or len({a.shape[1] for a in arrays}) != 1:
        raise ValueError(f"differences: expected (T_i, D) arrays with one D, got shapes {[a.shape for a in arrays]}")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("differences: expected finite values")
    if r_star <= 0:
        raise ValueError(f"r_star: expected > 0, got {r_star!r}")
    if eps <= 0:
        raise ValueError(f"eps: expected > 0, got {eps!r}")
    t_max = max(len(a) for a in arrays)
    if t_max == 0:
        raise ValueError("differences: every array has 0 steps")

    energy_sum, pairs_at_n = np.zeros(t_max), np.zeros(t_max, dtype=np.int64)
    cosine_sum, cosine_count = np.zeros(t_max), np.zeros(t_max)
    for d in arrays:  # d: (T, D)
        steps, hidden = d.shape
        projected = np.cumsum(d.sum(axis=1)) / math.sqrt(hidden)  # (T,) wᵀ Σ_{t≤N} d_t
        energy_sum[:steps] += projected**2
        pairs_at_n[:steps] += 1
        norms = np.linalg.norm(d, axis=1)  # (T,)
        nonzero = norms > 0
        units = np.divide(d, norms[:, None], out=np.zeros_like(d), where=nonzero[:, None])  # (T, D)
        # Σ_{i≠j≤N} cos(d_i, d_j) = |Σ_{t≤N} u_t|² − k(N), with k(N) unit vectors among the first N.
        k = np.cumsum(nonzero)
        cosine_sum[:steps] += np.sum(np.cumsum(units, axis=0) ** 2, axis=1) - k
        cosine_count[:steps] += k * (k - 1)

    n = np.arange(1, t_max + 1)
    energy = energy_sum / pairs_at_n
    defined = cosine_count > 0
    rho = np.clip(np.divide(cosine_sum, cosine_count, out=np.zeros(t_max), where=defined), -1.0, 1.0)
    sigma = math.sqrt(energy[0])
    bound = sigma * np.sqrt(np.maximum(n + n * (n - 1) * rho, 0.0))

    with np.errstate(divide="ignore"):
        ratio = 1.0 / ((n - 1) * rho)  # r(N); only read where ρ > 0
    below = np.flatnonzero((rho > 0) & (ratio < r_star))
    flat = np.flatnonzero(defined[:-1] & defined[1:] & (np.abs(np.diff(rho)) < eps))
    return DivergenceResult(
        n=n, energy=energy, rho=rho, bound=bound, pairs_at_n=pairs_at_n, sigma=sigma,
        threshold_ratio=int(n[below[0]]) if len(below) else None,
        threshold_plateau=int(n[flat[0]]) if len(flat) else None,
        num_pairs=len(arrays), r_star=float(r_star), eps=float(eps),
    )


def _pad_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos token, else 0 (masked out anyway)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _check_pairs(pairs) -> None:
    """Raise unless pairs is a non-empty sequence of (prompt, chosen, rejected) strings."""
    if not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise ValueError(f"pairs: expected a non-empty sequence of (prompt, chosen, rejected) triples, got {pairs!r}")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 3 and all(isinstance(s, str) for s in pair)):
            raise TypeError(f"pairs[{i}]: expected a (prompt, chosen, rejected) triple of strings, got {pair!r}")


def _pair_differences(model, sequences: list[tuple[list[int], list[int], list[int]]], pad_id: int,
                      device: torch.device) -> list[np.ndarray]:
    """d_t for a batch of tokenized (prompt, chosen[:T], rejected[:T]): one (T, D) array per pair."""
    rows = [prompt + answer for prompt, chosen, rejected in sequences for answer in (chosen, rejected)]
    length = max(len(row) for row in rows)
    # Right padding: real tokens keep positions 0..L−1 and never attend to the padding.
    input_ids = torch.tensor([row + [pad_id] * (length - len(row)) for row in rows], device=device)
    attention_mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows], device=device)
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
    hidden = hidden.float().cpu()  # (2B, L, D)
    differences = []
    for b, (prompt, chosen, rejected) in enumerate(sequences):
        start, steps = len(prompt), len(chosen)
        # The state after answer token t sits at position len(prompt) + t − 1.
        d = (hidden[2 * b, start:start + steps] - hidden[2 * b + 1, start:start + steps]).double().numpy()
        shared = next((t for t in range(steps) if chosen[t] != rejected[t]), steps)
        d[:shared] = 0.0  # identical prefixes: zero by definition, whatever the batched arithmetic gives
        differences.append(d)
    return differences


def branch_divergence(model, tokenizer, pairs: Sequence[tuple[str, str, str]], max_len: int = 64,
                      batch_size: int = 8, progress: bool = True, *, r_star: float = 1.0,
                      eps: float = 1e-3) -> DivergenceResult:
    """Measure how a causal LM's last hidden states drift apart along chosen vs rejected answers.

    model: a transformers causal LM (``AutoModelForCausalLM``); f(x_≤t) is its last-layer hidden
        state (``hidden_states[-1]``, before the output head) at the last token of prompt + answer[:t].
    tokenizer: its tokenizer; prompt and answers are tokenized separately (the answers without
        special tokens) and concatenated, so answer positions are exact.
    pairs: (prompt, chosen, rejected) strings. Pair i contributes T_i = min(len(chosen), len(rejected),
        max_len) answer steps d_t = f(prompt + chosen_≤t) − f(prompt + rejected_≤t); statistics at N
        use the pairs with T_i ≥ N. Pairs with an empty answer are dropped; steps where the answers
        still share their tokens are d_t = 0 and skipped in the cosines.
    max_len: cap on answer steps. batch_size: pairs per forward (2·batch_size sequences).
    progress: show a tqdm bar. r_star, eps: the thresholds, as in :func:`divergence_statistics`.

    Runs under ``torch.no_grad()`` in eval mode (the model's mode is restored), on the model's device.
    """
    _check_pairs(pairs)
    if max_len < 1:
        raise ValueError(f"max_len: expected >= 1, got {max_len!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size!r}")

    sequences = []
    for prompt, chosen, rejected in pairs:
        prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        chosen_ids = list(tokenizer(chosen, add_special_tokens=False)["input_ids"])
        rejected_ids = list(tokenizer(rejected, add_special_tokens=False)["input_ids"])
        steps = min(len(chosen_ids), len(rejected_ids), max_len)
        if steps > 0:
            sequences.append((prompt_ids, chosen_ids[:steps], rejected_ids[:steps]))
    if not sequences:
        raise ValueError("pairs: every pair has an empty chosen or rejected answer after tokenization")

    pad_id, device = _pad_id(tokenizer), next(model.parameters()).device
    was_training = model.training
    model.eval()
    differences: list[np.ndarray] = []
    try:
        with torch.no_grad(), tqdm(total=len(sequences), desc="branch divergence", unit="pair",
                                   disable=not progress) as bar:
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start:start + batch_size]
                differences.extend(_pair_differences(model, batch, pad_id, device))
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return divergence_statistics(differences, r_star=r_star, eps=eps)


def plot_divergence(result: DivergenceResult, path: str | os.PathLike) -> Path:
    """Draw √E(N) against the bound (left) and ρ(N) (right), thresholds marked, as an image file.

    path: the image file to write (its format follows the suffix). Returns it as a Path.
    """
    figure = Figure(figsize=(10.0, 4.0))
    FigureCanvasAgg(figure)
    energy_axes, rho_axes = figure.subplots(1, 2)
    energy_axes.plot(result.n, np.sqrt(result.energy), "o-", markersize=3, label="√E(N)")
    energy_axes.plot(result.n, result.bound, "--", label="bound(N) = σ·√(N + N(N−1)ρ(N))")
    energy_axes.set_xscale("log")
    energy_axes.set_yscale("log")
    energy_axes.set_xlabel("answer steps N")
    energy_axes.set_ylabel("√E(N) and bound(N)")
    rho_axes.plot(result.n[1:], result.rho[1:], "o-", markersize=3, color="C2", label="ρ(N)")  # ρ(1) is undefined
    rho_axes.axhline(0.0, color="grey", linewidth=0.8)
    rho_axes.set_xscale("log")
    rho_axes.set_xlabel("answer steps N")
    rho_axes.set_ylabel("mean cosine ρ(N)")
    for axes in (energy_axes, rho_axes):
        for threshold, label, style in ((result.threshold_ratio, f"r(N) < {result.r_star:g}", ":"),
                                        (result.threshold_plateau, f"|Δρ| < {result.eps:g}", "-.")):
            if threshold is not None:
                axes.axvline(threshold, color="black", linestyle=style, linewidth=1.0,
                             label=f"{label}: N = {threshold}")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(f"branch divergence over {result.num_pairs} pairs (σ = {result.sigma:.3g})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return Path(path)

"""The power law P(N) = (N_c / N)^α of a score against the number of tokens N (SPEC.md §7).

:func:`fit_power_law` fits it in log space and gives a :class:`PowerLawFit`; :func:`save_fits` /
:func:`load_fits` keep named fits as JSON (what ``qfusion fit --json`` writes), and
:func:`load_points_csv` reads (N, score) points from a CSV file.

A fit whose R² in log space is below :data:`POOR_FIT_R2` is poor (:attr:`PowerLawFit.poor`): the
points do not follow the law closely, so what is read from it can be far from what was measured.
That one rule flags a fit everywhere: :func:`fit_power_law` and
:func:`~qfusion.scaling.smallest_budget` warn with :class:`PoorFitWarning` when they make or use a
poor fit, and ``str(fit)``, the ``qfusion fit`` / ``qfusion budget`` tables and the plots' legends
say so.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from qfusion.scaling.checks import count, number
from qfusion.files import write_json
from qfusion.scaling.optional import require

NO_POWER_LAW = 1e-6
"""|α| below this means the scores do not follow a power law in N."""

POOR_FIT_R2 = 0.9
"""R² in log space (``PowerLawFit.r2``, what is fitted) below this makes a fit poor: more than a tenth
of the variance of log P is left unexplained, as when scores rise and then flatten out, and a budget
read from such a law can be several times the N at which the measured scores already meet a target."""


class PoorFitWarning(UserWarning):
    """A poor fit (R² in log space below :data:`POOR_FIT_R2`) was made or used.

    Code that shows the flag itself can silence it:
    ``warnings.simplefilter("ignore", qfusion.scaling.PoorFitWarning)``.
    """


def warn_if_poor(fit: "PowerLawFit", user: str, stacklevel: int = 2) -> None:
    """Warn with :class:`PoorFitWarning` that ``user`` (a function's name) made or used a poor fit.

    Nothing happens for a fit that is not poor. stacklevel: as for :func:`warnings.warn`, counted
    from the function that calls this one (2: that function's caller).
    """
    if fit.poor:
        warnings.warn(f"{user}: R² = {fit.r2:.3f} in log space, below POOR_FIT_R2 = {POOR_FIT_R2:g}: the points do "
                      "not follow P(N) = (N_c / N)^α closely, so N or scores read from the law can be far from "
                      "the measured ones", PoorFitWarning, stacklevel=stacklevel + 1)


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


def solve_log_space(log_n: np.ndarray, log_p: np.ndarray) -> tuple[float, float]:
    """(α, β) minimising mean_i (log P_i − β + α·log N_i)², by SciPy's BFGS from (0, 0).

    The least-squares core of :func:`fit_power_law`, without its checks, for callers that refit many
    bootstrap resamples. log_n, log_p: (P,) logs of the numbers of tokens and of the scores.
    """

    def objective(params: np.ndarray) -> tuple[float, np.ndarray]:
        alpha, beta = params
        residual = log_p - beta + alpha * log_n
        return float(np.mean(residual**2)), np.array([np.mean(2 * residual * log_n), -np.mean(2 * residual)])

    minimize = require("scipy.optimize", "fitting the power law").minimize
    # The objective is a convex quadratic: with its exact gradient, BFGS reaches machine precision.
    result = minimize(objective, np.zeros(2), jac=True, method="BFGS", options={"gtol": 1e-12})
    alpha, beta = result.x
    return float(alpha), float(beta)


def _numbers(values, name: str) -> np.ndarray:
    """values (a number or an array-like of numbers) as a float64 array, or a TypeError naming the argument."""
    array = np.asarray(values)
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{name}: expected numbers, got {values!r}")
    return array.astype(np.float64)


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
    given a target relative to a measured score and a bootstrap interval
    (:func:`~qfusion.scaling.smallest_budget`). ``poor`` flags a fit with R² below :data:`POOR_FIT_R2`;
    ``str(fit)`` is a one-line summary that ends with that flag.
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

    @property
    def poor(self) -> bool:
        """Whether the law describes its points poorly: R² in log space below :data:`POOR_FIT_R2` (or NaN)."""
        return not self.r2 >= POOR_FIT_R2

    def __str__(self) -> str:
        """α (with its interval when bootstrapped), N_c, R² and the point count on one line; a poor fit says so."""
        low, high = self.alpha_ci
        interval = f" [{low:.4g}, {high:.4g}]" if math.isfinite(low) and math.isfinite(high) else ""
        summary = (f"P(N) = (N_c / N)^α, α = {self.alpha:.4g}{interval}, N_c = {self.n_c:.4g}, "
                   f"R² = {self.r2:.3f} (log space), {self.num_points} points")
        if self.poor:
            summary += f"; POOR FIT: R² {self.r2:.3f} < {POOR_FIT_R2:g}, the points do not follow the law"
        return summary

    def predict(self, num_tokens):
        """The law's score at num_tokens: a float for a scalar, a numpy array for an array-like.

        >>> PowerLawFit(n_c=10.0, alpha=-0.5, beta=-0.5 * math.log(10.0), r2=1.0, r2_score_space=1.0,
        ...             alpha_ci=(-0.5, -0.5), num_points=4).predict([10, 40])
        array([1., 2.])
        """
        n = _numbers(num_tokens, "num_tokens")
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
        s = _numbers(score, "score")
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

        def value(key, nullable=False):  # N_c and the α interval may be NaN, which cleaned JSON writes as null
            return math.nan if nullable and data[key] is None else number(data[key], f"data[{key!r}]")

        def values(key, nullable=False, default=None):
            given = data.get(key, default)
            if not isinstance(given, (list, tuple)):
                raise TypeError(f"data[{key!r}]: expected a list of numbers, got {given!r}")
            return tuple(math.nan if nullable and v is None else number(v, f"data[{key!r}]") for v in given)

        alpha_ci = values("alpha_ci", nullable=True)
        num_tokens, scores = values("num_tokens", default=()), values("scores", default=())
        if len(alpha_ci) != 2:
            raise ValueError(f"data['alpha_ci']: expected 2 values (low, high), got {data['alpha_ci']!r}")
        if len(num_tokens) != len(scores):
            raise ValueError(f"data: num_tokens and scores differ in length ({len(num_tokens)} and {len(scores)})")
        return cls(n_c=value("n_c", nullable=True), alpha=value("alpha"), beta=value("beta"), r2=value("r2"),
                   r2_score_space=value("r2_score_space"), alpha_ci=alpha_ci,
                   num_points=count(data["num_points"], "data['num_points']"), num_tokens=num_tokens, scores=scores)


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

    Raises ValueError when |α| < 1e-6: the scores show no power law in N. Warns with
    :class:`PoorFitWarning` when the fit is poor (R² in log space below :data:`POOR_FIT_R2`).

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
    n_bootstrap, seed = count(n_bootstrap, "n_bootstrap"), count(seed, "seed")

    log_n, log_p = np.log(n), np.log(p)
    alpha, beta = solve_log_space(log_n, log_p)
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
            alphas.append(solve_log_space(log_n[index], log_p[index])[0])
    low, high = np.percentile(alphas, [2.5, 97.5]) if alphas else (math.nan, math.nan)

    fit = PowerLawFit(n_c=n_c, alpha=alpha, beta=beta, r2=_r2(log_p, log_fitted),
                      r2_score_space=_r2(p, np.exp(log_fitted)), alpha_ci=(float(low), float(high)),
                      num_points=len(n), num_tokens=tuple(n.tolist()), scores=tuple(p.tolist()))
    warn_if_poor(fit, "fit_power_law")
    return fit


def save_fits(fits: Mapping[str, PowerLawFit], path: str | os.PathLike) -> Path:
    """Write named fits as JSON, {name: fit.to_dict()} (what ``qfusion fit --json`` writes), atomically."""
    if not isinstance(fits, Mapping):
        raise TypeError(f"fits: expected a mapping {{name: PowerLawFit}}, got {type(fits).__name__}")
    for name, fit in fits.items():
        if not isinstance(fit, PowerLawFit):
            raise TypeError(f"fits[{name!r}]: expected a PowerLawFit, got {type(fit).__name__}")
    return write_json({name: fit.to_dict() for name, fit in fits.items()}, path)


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

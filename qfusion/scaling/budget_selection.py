"""Choosing a token budget from a fitted law: the smallest N whose score meets a target, with a
bootstrap interval (:func:`smallest_budget`, :class:`BudgetChoice`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qfusion.scaling.checks import count, number
from qfusion.scaling.power_law import PowerLawFit, solve_log_space, warn_if_poor


@dataclass(frozen=True)
class BudgetChoice:
    """The smallest whole number of tokens at which a fitted law meets a target score.

    target: the score to meet (for a ``max_loss``, derived from ``reference_score``, a measured score).
    num_tokens: the smallest integer N >= 1 whose predicted score meets the target.
    interval: a bootstrap interval for num_tokens, from refitting resampled points ((None, None)
        when the fit carries no points).
    predicted: the law's score at num_tokens.
    reference: the largest N measured; reference_score: the mean score measured there (both None
        for a fit without points).
    measured_range: (smallest, largest) N measured, or None; extrapolated: num_tokens lies outside it.
    poor_fit: the law it was read from is a poor fit (:attr:`~qfusion.scaling.PowerLawFit.poor`).
    """

    target: float
    num_tokens: int
    interval: tuple[int | None, int | None]
    predicted: float
    reference: float | None
    reference_score: float | None
    measured_range: tuple[float, float] | None
    extrapolated: bool
    poor_fit: bool

    def to_dict(self) -> dict:
        """The choice as plain JSON-ready values."""
        return {"target": self.target, "num_tokens": self.num_tokens, "interval": list(self.interval),
                "predicted": self.predicted, "reference": self.reference, "reference_score": self.reference_score,
                "measured_range": None if self.measured_range is None else list(self.measured_range),
                "extrapolated": self.extrapolated, "poor_fit": self.poor_fit}


def _smallest_n(alpha: float, beta: float, rising: bool, target: float) -> int:
    """Smallest integer N >= 1 with exp(β − α·log N) meeting target (>= when rising, else <=)."""
    if (alpha < 0) != rising:  # this law moves the wrong way with N: the fewest tokens are best
        return 1
    with np.errstate(over="ignore", divide="ignore"):
        n = math.exp(min((beta - math.log(target)) / alpha, 700.0))
    # A tiny relative slack, so that N lying exactly on the law is not pushed up by rounding.
    return max(1, math.ceil(n * (1.0 - 1e-9)))


def smallest_budget(fit: PowerLawFit, *, target: float | None = None, max_loss: float | None = None,
                    n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95) -> BudgetChoice:
    """The smallest number of tokens N at which a fitted law P(N) meets a target, with a bootstrap interval.

    fit: the law that N is read from.
    Give exactly one of:
    target: a score to reach (for α < 0, rising scores: P(N) >= target; for α > 0, a lower-is-better
        score: P(N) <= target).
    max_loss: the fraction of the score measured at the largest budget that may be given up, in
        [0, 1): with S the mean of the scores measured at the largest N, the target is
        S·(1 − max_loss) for rising scores (S·(1 + max_loss) for falling ones). The target is a
        measured score's fraction, never the law's value there (which can lie above every measured
        score when the points flatten out). It needs the points the fit was made from (a fit from
        :func:`~qfusion.scaling.fit_power_law`, or a fits file that carries them).
    n_bootstrap: resamples of the fit's points (with replacement, as
        :func:`~qfusion.scaling.fit_power_law` does); each is refitted and gives its own smallest N for
        the same target. Resamples with fewer than two distinct N are skipped. 0, or a fit without
        points, gives no interval.
    seed: seed of the resampling. confidence: the interval's coverage, in (0, 1).

    Warns with :class:`~qfusion.scaling.PoorFitWarning` when the fit is poor, and says so in
    ``poor_fit``: N then comes from a law that does not describe the measured points closely.

    >>> from qfusion.scaling import fit_power_law
    >>> fit = fit_power_law([16, 64, 256, 576], [0.60, 0.72, 0.86, 0.94])
    >>> choice = smallest_budget(fit, max_loss=0.05)
    >>> choice.num_tokens, round(choice.target, 3), choice.extrapolated  # 95 % of the 0.94 measured at N = 576
    (364, 0.893, False)
    """
    if not isinstance(fit, PowerLawFit):
        raise TypeError(f"fit: expected a PowerLawFit, got {type(fit).__name__}")
    if (target is None) == (max_loss is None):
        raise ValueError(f"target, max_loss: expected exactly one of them, got target={target!r}, "
                         f"max_loss={max_loss!r}")
    if target is not None and not (math.isfinite(number(target, "target")) and target > 0):
        raise ValueError(f"target: expected a finite score > 0 (the law only takes values > 0), got {target!r}")
    if max_loss is not None and not (0 <= number(max_loss, "max_loss") < 1):
        raise ValueError(f"max_loss: expected a fraction in [0, 1), got {max_loss!r}")
    n_bootstrap, seed = count(n_bootstrap, "n_bootstrap"), count(seed, "seed")
    if not 0 < number(confidence, "confidence") < 1:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence!r}")
    warn_if_poor(fit, "smallest_budget")
    n, p = np.asarray(fit.num_tokens, dtype=np.float64), np.asarray(fit.scores, dtype=np.float64)
    has_points = len(n) > 0
    if max_loss is not None and not has_points:
        raise ValueError("max_loss: the fit carries no measured points, so the score measured at the largest "
                         "budget is unknown; refit it with fit_power_law (or qfusion fit) or give a target score")
    rising = fit.alpha < 0
    reference = float(n.max()) if has_points else None
    reference_score = float(p[n == reference].mean()) if has_points else None
    goal = target if target is not None else reference_score * (1.0 - max_loss if rising else 1.0 + max_loss)
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
            alpha, beta = solve_log_space(log_n[index], log_p[index])
            chosen.append(_smallest_n(alpha, beta, rising, goal))
        if chosen:
            tail = 100 * (1 - confidence) / 2
            interval = (int(np.percentile(chosen, tail, method="lower")),
                        int(np.percentile(chosen, 100 - tail, method="higher")))
    measured = (float(n.min()), float(n.max())) if has_points else None
    extrapolated = measured is not None and not (measured[0] <= num_tokens <= measured[1])
    return BudgetChoice(target=float(goal), num_tokens=num_tokens, interval=interval,
                        predicted=fit.predict(num_tokens), reference=reference, reference_score=reference_score,
                        measured_range=measured, extrapolated=extrapolated, poor_fit=fit.poor)

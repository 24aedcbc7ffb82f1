"""Figures of the scaling analysis: scaling series with their fitted laws, and branch divergence.

matplotlib is imported when a figure is drawn (it comes with the ``scaling`` extra); figures are drawn
on their own Agg canvas, so the caller's pyplot backend and state are left alone.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Mapping

import numpy as np

from qfusion.scaling.divergence import DivergenceResult
from qfusion.files import write_atomically
from qfusion.scaling.optional import require
from qfusion.scaling.power_law import POOR_FIT_R2, PoorFitWarning, PowerLawFit, fit_power_law


def _figure(size: tuple[float, float], needed_for: str):
    """A matplotlib Figure of ``size`` inches on its own Agg canvas."""
    figure = require("matplotlib.figure", needed_for).Figure(figsize=size)
    require("matplotlib.backends.backend_agg", needed_for).FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | os.PathLike) -> Path:
    """Write the figure to path, atomically, in the format its suffix names (png without one)."""
    figure.tight_layout()
    image_format = Path(path).suffix.lstrip(".") or "png"
    return write_atomically(path, lambda temporary: figure.savefig(temporary, format=image_format, dpi=120))


def plot_scaling(series: Mapping[str, tuple], path: str | os.PathLike, *, title: str | None = None,
                 xlabel: str = "number of tokens N", ylabel: str = "score") -> Path:
    """Draw scaling series (points and fitted power law, α in the legend) on one log-x figure, as an image file.

    A poor fit (:attr:`~qfusion.scaling.PowerLawFit.poor`) is marked so in its legend entry.

    series: {name: (num_tokens, scores)} (fitted here, without bootstrap) or
        {name: (num_tokens, scores, fit)} with a :class:`PowerLawFit` of those points.
    path: the image file to write (its format follows the suffix, png without one). Returns it as a Path.
    """
    if not series:
        raise ValueError("series: expected at least one series, got none")
    figure = _figure((6.4, 4.4), "plot_scaling")
    axes = figure.add_subplot()
    for name, value in series.items():
        if not isinstance(value, tuple) or len(value) not in (2, 3):
            raise TypeError(f"series[{name!r}]: expected (num_tokens, scores) or (num_tokens, scores, fit), "
                            f"got {type(value).__name__}")
        n, p = np.asarray(value[0], dtype=np.float64), np.asarray(value[1], dtype=np.float64)
        if len(value) == 3:
            fit = value[2]
        else:
            with warnings.catch_warnings():  # the legend flags a poor fit
                warnings.simplefilter("ignore", PoorFitWarning)
                fit = fit_power_law(n, p, n_bootstrap=0)
        if not isinstance(fit, PowerLawFit):
            raise TypeError(f"series[{name!r}]: expected a PowerLawFit as third item, got {type(fit).__name__}")
        (points,) = axes.plot(n, p, "o")
        grid = np.geomspace(n.min(), n.max(), 200)
        poor = f", POOR FIT (R² {fit.r2:.2f} < {POOR_FIT_R2:g})" if fit.poor else ""
        axes.plot(grid, fit.predict(grid), "-", color=points.get_color(),
                  label=f"{name}: α = {fit.alpha:.3f}, N_c = {fit.n_c:.3g}{poor}")
    axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if title is not None:
        axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_divergence(result: DivergenceResult, path: str | os.PathLike) -> Path:
    """Draw √E(N) against the bound (left) and ρ(N) (right), thresholds marked, as an image file.

    result: what :func:`~qfusion.scaling.divergence_statistics` or :func:`~qfusion.scaling.branch_divergence`
        gives.
    path: the image file to write (its format follows the suffix, png without one). Returns it as a Path.
    """
    if not isinstance(result, DivergenceResult):
        raise TypeError(f"result: expected a DivergenceResult, got {type(result).__name__}")
    figure = _figure((10.0, 4.0), "plot_divergence")
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
    return _save(figure, path)

"""The demo's results: summary over seeds, power-law fits, the gain of fusion, the honesty check, table, JSON, plot."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np

from qfusion.demo.data import QUESTION_TYPES, require
from qfusion.scaling import POOR_FIT_R2, PoorFitWarning, PowerLawFit, fit_power_law

MODES = {"fused": "question fused", "plain": "no question"}
ALL = "all"  # no compression: the LM reads the 9 cell tokens
CELLS_TOKENS = 9
DIGITS_NEEDED = {"cell": 1, "line": 3, "block": 4}  # cells an answer reads: the tokens' worth it needs
REGION_TYPES = ("line", "block")
BASELINE_FLOOR = 0.95  # the uncompressed baseline must reach this on every question type
PLAIN_MARGIN = 0.05  # the no-question compressor at N >= 9 must come this close to the baseline


def summarize(runs: list[dict], budgets: tuple[int, ...]) -> dict:
    """Mean and std over seeds, per mode, budget (and "all") and question type.

    runs: one dict per (seed, mode, budget): {"seed", "mode", "budget", "accuracy": {type: acc}}; the
        uncompressed baseline has budget "all" (mode "none") and is listed under both modes.
    """
    summary: dict = {}
    for mode in MODES:
        summary[mode] = {}
        for budget in [*budgets, ALL]:
            chosen = [r["accuracy"] for r in runs if r["budget"] == budget and (budget == ALL or r["mode"] == mode)]
            summary[mode][str(budget)] = {
                kind: {"mean": float(np.mean([a[kind] for a in chosen])),
                       "std": float(np.std([a[kind] for a in chosen])), "seeds": len(chosen)}
                for kind in QUESTION_TYPES
            }
    return summary


def _fit(budgets: list[int], scores: list[float]) -> dict:
    try:
        with warnings.catch_warnings():  # the printed fits and the figure flag a poor fit
            warnings.simplefilter("ignore", PoorFitWarning)
            return {"budgets": budgets, **fit_power_law(budgets, scores).to_dict()}
    except ValueError as error:
        return {"budgets": budgets, "error": str(error)}


def _poor(fit: dict) -> str:
    """' (poor fit)' for a fit whose R² is below the scaling analysis's threshold, else ''."""
    return " (poor fit)" if PowerLawFit.from_dict(fit).poor else ""


def fit_modes(summary: dict, budgets: tuple[int, ...]) -> dict:
    """P(N) = (N_c / N)^α per mode and question type, on mean accuracy over seeds.

    Two fits each: over every budget ("all"), and over the rising range ("rising"): the budgets up
    to the first N that has room for every cell the answer reads (N <= 3 for a line, 4 for a block),
    past which a question-fused compressor has nothing left to gain. A cell answer reads one cell,
    so it has no rising range. A fit that cannot be made gets {"error": message}.
    """
    fits: dict = {}
    for mode in MODES:
        fits[mode] = {}
        for kind in QUESTION_TYPES:
            scores = {n: summary[mode][str(n)][kind]["mean"] for n in budgets}
            needed = min((n for n in budgets if n >= DIGITS_NEEDED[kind]), default=max(budgets))
            rising = [n for n in budgets if n <= needed]
            fits[mode][kind] = {
                "all": _fit(list(budgets), list(scores.values())),
                "rising": (_fit(rising, [scores[n] for n in rising]) if len(rising) >= 3 else
                           {"budgets": rising, "error": f"only {len(rising)} budget(s) up to N = {needed}"}),
            }
    return fits


def fusion_gain(runs: list[dict], budgets: tuple[int, ...]) -> dict:
    """Question fused minus no question, per region type and budget, against the spread over seeds.

    The two modes of one seed share its host, so the gain is taken per seed; ``spread`` is the sum of
    the two modes' standard deviations over seeds, and ``beats_spread`` says whether the mean gain
    exceeds it. ``small_n`` lists the budgets smaller than the answer's cell count (where a blind
    compressor cannot hold the whole region) at which the gain beats the spread.
    """
    accuracy = {(r["seed"], r["mode"], r["budget"]): r["accuracy"] for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    gain: dict = {}
    for kind in REGION_TYPES:
        gain[kind] = {"per_budget": {}, "small_n": []}
        for n in budgets:
            fused = np.array([accuracy[s, "fused", n][kind] for s in seeds])
            plain = np.array([accuracy[s, "plain", n][kind] for s in seeds])
            per_seed = fused - plain
            spread = float(fused.std() + plain.std())
            beats = bool(per_seed.mean() > spread and (per_seed > 0).all())
            gain[kind]["per_budget"][str(n)] = {"gain": float(per_seed.mean()), "per_seed": per_seed.tolist(),
                                                "spread": spread, "beats_spread": beats}
            if beats and n < DIGITS_NEEDED[kind]:
                gain[kind]["small_n"].append(n)
    return gain


def honesty(summary: dict, budgets: tuple[int, ...]) -> dict:
    """Whether the gap between the modes may be read as a token-budget effect.

    Two conditions: the uncompressed baseline reaches BASELINE_FLOOR on every question type, and the
    no-question compressor at every budget N >= 9 (room for every cell) comes within PLAIN_MARGIN of
    it on every type. If the second fails, the no-question compressor did not learn, and its deficit
    says nothing about the token budget.
    """
    baseline = {kind: summary["plain"][ALL][kind]["mean"] for kind in QUESTION_TYPES}
    roomy = [n for n in budgets if n >= CELLS_TOKENS]
    plain = {str(n): {kind: summary["plain"][str(n)][kind]["mean"] for kind in QUESTION_TYPES} for n in roomy}
    baseline_ok = all(acc >= BASELINE_FLOOR for acc in baseline.values())
    plain_ok = bool(roomy) and all(baseline[kind] - acc <= PLAIN_MARGIN
                                   for at_n in plain.values() for kind, acc in at_n.items())
    return {"baseline": baseline, "baseline_floor": BASELINE_FLOOR, "baseline_ok": baseline_ok,
            "plain_at_n_ge_9": plain, "plain_margin": PLAIN_MARGIN, "plain_ok": plain_ok,
            "budget_effect_reportable": baseline_ok and plain_ok}


def _cell(stat: dict) -> str:
    return f"{100 * stat['mean']:5.1f} ± {100 * stat['std']:3.1f}"


def format_table(summary: dict, chance: dict, budgets: tuple[int, ...], seeds: int, questions: dict) -> str:
    """The printed table: digit accuracy (%) mean ± std over seeds, per N, mode and question type."""
    kinds = QUESTION_TYPES
    header = f"{'N':>4} | " + " | ".join(f"{MODES[m] + ': ' + k:>20}" for m in MODES for k in kinds)
    lines = [f"digit accuracy on unseen handwriting, % (mean ± std over {seeds} seed{'s' * (seeds > 1)}; "
             "test questions: " + ", ".join(f"{k} {questions[k]}" for k in kinds) + ")", header, "-" * len(header)]
    for budget in [*budgets, ALL]:
        row = [f"{_cell(summary[m][str(budget)][k]):>20}" for m in MODES for k in kinds]
        lines.append(f"{str(budget):>4} | " + " | ".join(row))
    lines.append(f"{'':>4} | " + " | ".join(f"{'chance ' + format(100 * chance[k], '.1f'):>20}"
                                            for _ in MODES for k in kinds))
    lines.append(f"N = {ALL}: no compression, the LM reads the 9 cell tokens (the same model in both columns)")
    return "\n".join(lines)


def _fit_text(fit: dict) -> str:
    span = f"N = {fit['budgets'][0]}..{fit['budgets'][-1]}"
    if "error" in fit:
        return f"{span}: no fit ({fit['error']})"
    low, high = fit["alpha_ci"]
    return (f"{span}: alpha = {fit['alpha']:.3f} [{low:.3f}, {high:.3f}], N_c = {fit['n_c']:.3g}, "
            f"R2 (log) = {fit['r2']:.3f}{_poor(fit)}")


def format_fits(fits: dict) -> str:
    """One line per mode and type: α, its bootstrap interval, N_c and log-space R², rising range and all N.

    A fit with R² below :data:`qfusion.scaling.POOR_FIT_R2` is marked "(poor fit)".
    """
    lines = [f"power law P(N) = (N_c / N)^alpha on digit accuracy (alpha with its 95% bootstrap interval; "
             f"poor fit: R2 (log) < {POOR_FIT_R2:g}):"]
    for mode, by_kind in fits.items():
        for kind, fit in by_kind.items():
            lines.append(f"  {MODES[mode]:>14}, {kind:<5}  rising {_fit_text(fit['rising'])};  "
                         f"all {_fit_text(fit['all'])}")
    return "\n".join(lines)


def format_gain(gain: dict) -> str:
    """Per region type: fused − no-question gain in points at each N, against the seeds' spread."""
    lines = ["gain of question fusion (fused − no question, points; spread = sum of the modes' std over seeds):"]
    for kind, result in gain.items():
        cells = [f"N = {n}: {100 * g['gain']:+.1f} (spread {100 * g['spread']:.1f})"
                 for n, g in result["per_budget"].items()]
        lines.append(f"  {kind}: " + ", ".join(cells))
        small = result["small_n"]
        lines.append(f"    beats the spread at small N (< {DIGITS_NEEDED[kind]} tokens): "
                     + (", ".join(f"N = {n}" for n in small) if small else "at no small N"))
    return "\n".join(lines)


def format_honesty(check: dict) -> str:
    """The verdict on whether the fused / no-question gap is a token-budget effect, in plain words."""
    baseline = ", ".join(f"{k} {100 * a:.1f} %" for k, a in check["baseline"].items())
    plain = "; ".join(f"N = {n}: " + ", ".join(f"{k} {100 * a:.1f} %" for k, a in at_n.items())
                      for n, at_n in check["plain_at_n_ge_9"].items())
    facts = (f"uncompressed baseline {baseline} (needs >= {100 * check['baseline_floor']:.0f} % on each); "
             f"no-question compressor with room for every cell: {plain} (needs to be within "
             f"{100 * check['plain_margin']:.0f} points of the baseline on each)")
    if check["budget_effect_reportable"]:
        return (f"honesty check PASSED: {facts}. The no-question compressor learns when it has room, so its "
                "deficit at small N is a token-budget effect: a question-blind compressor must keep the whole "
                "grid, a question-fused one only what the question needs.")
    return (f"honesty check FAILED: {facts}. The gap between the modes is NOT shown as a token-budget effect: "
            "the no-question compressor (or the baseline) did not learn, so its deficit may be an optimisation "
            "failure, not a shortage of tokens.")


def plot(summary: dict, fits: dict, chance: dict, budgets: tuple[int, ...], path: Path) -> Path:
    """Digit accuracy vs N, one panel per question type: both modes (mean ± std), the fused rising-range
    power law, the uncompressed baseline and chance."""
    figure = require("matplotlib.figure").Figure(figsize=(12.0, 4.0))
    require("matplotlib.backends.backend_agg").FigureCanvasAgg(figure)
    n = np.array(budgets, dtype=float)
    for index, (kind, axes) in enumerate(zip(QUESTION_TYPES, figure.subplots(1, len(QUESTION_TYPES), sharey=True))):
        for color, (mode, label) in enumerate(MODES.items()):
            stats = [summary[mode][str(b)][kind] for b in budgets]
            axes.errorbar(n, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], fmt="o-", color=f"C{color}",
                          capsize=3, linewidth=0.8, label=label)
        fit = fits["fused"][kind]["rising"]
        if "error" not in fit:
            grid = np.geomspace(min(fit["budgets"]), max(fit["budgets"]), 100)
            axes.plot(grid, np.exp(fit["beta"] - fit["alpha"] * np.log(grid)), "--", color="C0",
                      label=f"fused fit: α = {fit['alpha']:.2f}, R² = {fit['r2']:.2f}{_poor(fit)}")
        axes.axhline(summary["plain"][ALL][kind]["mean"], color="black", linestyle="--", linewidth=1,
                     label="no compression (9 cell tokens)")
        axes.axhline(chance[kind], color="grey", linestyle=":", linewidth=1, label="chance")
        axes.set_xscale("log", base=2)
        axes.set_xticks(n, [str(b) for b in budgets])
        axes.set_ylim(0, 1.02)
        axes.set_xlabel("fused tokens per question N")
        axes.set_title(f"{kind} questions ({DIGITS_NEEDED[kind]} digit{'s' * (DIGITS_NEEDED[kind] > 1)})")
        axes.grid(True, which="both", alpha=0.3)
        if index == 0:
            axes.set_ylabel("digit accuracy")
        axes.legend(fontsize=7, loc="lower right")
    figure.suptitle("digit grids: question fused vs no question")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def write_json(results: dict, path: Path) -> Path:
    """results.json, with floats kept JSON-valid (NaN becomes null)."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    path.write_text(json.dumps(clean(results), indent=2) + "\n")
    return path

"""The demo's results: summary over seeds, power-law fits, paired comparisons (question fusion's gain, the
baselines against the trained compressors), the honesty check, the tables, JSON and the plot."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from qfusion import files
from qfusion.demo.baselines import pool_shape
from qfusion.demo.data import CELLS, QUESTION_TYPES, require
from qfusion.demo.turns import format_turns
from qfusion.scaling import POOR_FIT_R2, PoorFitWarning, PowerLawFit, fit_power_law

METHODS = {"fused": "question fused", "plain": "no question", "pooled": "average pool", "random": "random cells"}
COMPRESSORS = ("fused", "plain")  # trained QuestionFusion, with and without the question
BASELINES = ("pooled", "random")  # training-free: the cell tokens average-pooled to N, or N of them at random
METHOD_ROWS = {"fused": "question fused (trained)", "plain": "no question (trained)",
               "pooled": "average pool (no training)", "random": "random cells (no training)"}
NONE = "none"  # the uncompressed baseline: the LM reads the 9 cell tokens (budget ALL)
ALL = "all"
DIGITS_NEEDED = {"cell": 1, "line": 3, "block": 4}  # cells an answer reads: the tokens' worth it needs
REGION_TYPES = ("line", "block")
BASELINE_FLOOR = 0.95  # the uncompressed baseline must reach this on every question type
PLAIN_MARGIN = 0.05  # the no-question compressor at N >= 9 must come this close to the baseline


def _stats(accuracies: list[dict]) -> dict:
    return {kind: {"mean": float(np.mean([a[kind] for a in accuracies])),
                   "std": float(np.std([a[kind] for a in accuracies])), "seeds": len(accuracies)}
            for kind in QUESTION_TYPES}


def summarize(runs: list[dict], budgets: tuple[int, ...]) -> dict:
    """Mean and std over seeds, per method, budget and question type.

    runs: one dict per (seed, mode, budget): {"seed", "mode", "budget", "accuracy": {type: acc}}, mode
        one of METHODS or NONE (the uncompressed LM, budget ALL). Returns summary[method][str(N)][type]
        for the methods that were run, and summary[NONE][ALL][type].
    """
    summary = {NONE: {ALL: _stats([r["accuracy"] for r in runs if r["mode"] == NONE])}}
    for method in METHODS:
        if any(r["mode"] == method for r in runs):
            summary[method] = {str(n): _stats([r["accuracy"] for r in runs if r["mode"] == method and r["budget"] == n])
                               for n in budgets}
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
    """P(N) = (N_c / N)^α per trained compressor and question type, on mean accuracy over seeds.

    Two fits each: over every budget ("all"), and over the rising range ("rising"): the budgets up
    to the first N that has room for every cell the answer reads (N <= 3 for a line, 4 for a block),
    past which a question-fused compressor has nothing left to gain. A cell answer reads one cell,
    so it has no rising range. A fit that cannot be made gets {"error": message}.
    """
    fits: dict = {}
    for mode in COMPRESSORS:
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


def _paired(runs: list[dict], first: str, second: str, budget: int, kind: str) -> tuple[np.ndarray, float]:
    """Per seed, accuracy of method first minus method second at one budget and type, and the spread:
    the sum of the two methods' standard deviations over seeds. Both methods of a seed read through
    that seed's frozen LM, so they are compared seed by seed."""
    accuracy = {(r["seed"], r["mode"]): r["accuracy"][kind] for r in runs if r["budget"] == budget}
    seeds = sorted({r["seed"] for r in runs})
    a = np.array([accuracy[s, first] for s in seeds])
    b = np.array([accuracy[s, second] for s in seeds])
    return a - b, float(a.std() + b.std())


def fusion_gain(runs: list[dict], budgets: tuple[int, ...]) -> dict:
    """Question fused minus no question, per region type and budget, against the spread over seeds.

    ``beats_spread`` says whether the mean gain exceeds the spread (and every seed gains).
    ``small_n`` lists the budgets smaller than the answer's cell count (where a blind compressor
    cannot hold the whole region) at which the gain beats the spread.
    """
    gain: dict = {}
    for kind in REGION_TYPES:
        gain[kind] = {"per_budget": {}, "small_n": []}
        for n in budgets:
            per_seed, spread = _paired(runs, "fused", "plain", n, kind)
            beats = bool(per_seed.mean() > spread and (per_seed > 0).all())
            gain[kind]["per_budget"][str(n)] = {"gain": float(per_seed.mean()), "per_seed": per_seed.tolist(),
                                                "spread": spread, "beats_spread": beats}
            if beats and n < DIGITS_NEEDED[kind]:
                gain[kind]["small_n"].append(n)
    return gain


def baselines_vs_compressors(runs: list[dict], budgets: tuple[int, ...]) -> dict:
    """Each training-free baseline against each trained compressor, per budget and question type.

    The verdict on baseline − compressor: "beats" when the mean difference exceeds the spread over
    seeds and every seed is above, "below" when the compressor is ahead by the same rule, else
    "matches" (the difference is within what the seeds vary by). Returns, per "baseline vs
    compressor", the per-budget numbers and, for "beats" and "matches", {str(N): [types]}.
    """
    result: dict = {}
    for baseline in BASELINES:
        for compressor in COMPRESSORS:
            entry = {"per_budget": {}, "beats": {}, "matches": {}}
            for n in budgets:
                entry["per_budget"][str(n)] = {}
                for kind in QUESTION_TYPES:
                    per_seed, spread = _paired(runs, baseline, compressor, n, kind)
                    difference = float(per_seed.mean())
                    verdict = ("beats" if difference > spread and (per_seed > 0).all() else
                               "below" if -difference > spread and (per_seed < 0).all() else "matches")
                    entry["per_budget"][str(n)][kind] = {"difference": difference, "per_seed": per_seed.tolist(),
                                                         "spread": spread, "verdict": verdict}
                    if verdict != "below":
                        entry[verdict].setdefault(str(n), []).append(kind)
            result[f"{baseline} vs {compressor}"] = entry
    return result


def honesty(summary: dict, budgets: tuple[int, ...]) -> dict:
    """Whether the gap between the modes may be read as a token-budget effect.

    Two conditions: the uncompressed baseline reaches BASELINE_FLOOR on every question type, and the
    no-question compressor at every budget N >= 9 (room for every cell) comes within PLAIN_MARGIN of
    it on every type. If the second fails, the no-question compressor did not learn, and its deficit
    says nothing about the token budget.
    """
    baseline = {kind: summary[NONE][ALL][kind]["mean"] for kind in QUESTION_TYPES}
    roomy = [n for n in budgets if n >= CELLS]
    plain = {str(n): {kind: summary["plain"][str(n)][kind]["mean"] for kind in QUESTION_TYPES} for n in roomy}
    baseline_ok = all(acc >= BASELINE_FLOOR for acc in baseline.values())
    plain_ok = bool(roomy) and all(baseline[kind] - acc <= PLAIN_MARGIN
                                   for at_n in plain.values() for kind, acc in at_n.items())
    return {"baseline": baseline, "baseline_floor": BASELINE_FLOOR, "baseline_ok": baseline_ok,
            "plain_at_n_ge_9": plain, "plain_margin": PLAIN_MARGIN, "plain_ok": plain_ok,
            "budget_effect_reportable": baseline_ok and plain_ok}


def _cell(stat: dict) -> str:
    return f"{100 * stat['mean']:5.1f} ± {100 * stat['std']:3.1f}"


def format_table(summary: dict, chance: dict, budgets: tuple[int, ...], seeds: int, questions: dict,
                 random_draws: int) -> str:
    """The printed table: digit accuracy (%) mean ± std over seeds, one row per N and method, a column per type."""
    kinds = QUESTION_TYPES
    header = f"{'N':>4} | {'method':<27} | " + " | ".join(f"{k:>12}" for k in kinds)
    lines = [f"digit accuracy on unseen handwriting, % (mean ± std over {seeds} seed{'s' * (seeds > 1)}; "
             "test questions: " + ", ".join(f"{k} {questions[k]}" for k in kinds) + ")", header, "-" * len(header)]
    for budget in budgets:
        for index, method in enumerate(m for m in METHODS if m in summary):
            row = " | ".join(f"{_cell(summary[method][str(budget)][k]):>12}" for k in kinds)
            lines.append(f"{str(budget) if index == 0 else '':>4} | {METHOD_ROWS[method]:<27} | {row}")
    row = " | ".join(f"{_cell(summary[NONE][ALL][k]):>12}" for k in kinds)
    lines.append(f"{ALL:>4} | {'no compression (9 cells)':<27} | {row}")
    lines.append(f"{'':>4} | {'chance':<27} | " + " | ".join(f"{100 * chance[k]:>12.1f}" for k in kinds))
    shapes = ", ".join(f"{'x'.join(map(str, pool_shape(n)))}" for n in budgets if n < CELLS)
    lines.append(f"average pool: the 3x3 cell tokens averaged to an N-token grid ({shapes}); random cells: N "
                 f"distinct cells per grid, the mean of {random_draws} draws; at N >= {CELLS} both keep "
                 f"the {CELLS} cells")
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
            lines.append(f"  {METHODS[mode]:>14}, {kind:<5}  rising {_fit_text(fit['rising'])};  "
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


def _where(by_budget: dict) -> str:
    if not by_budget:
        return "at no N"
    return "at " + "; ".join(f"N = {n} ({', '.join(kinds)})" for n, kinds in by_budget.items())


def format_baselines(comparison: dict) -> str:
    """Per baseline and trained compressor: the budgets and types where the baseline beats or matches it."""
    lines = ["training-free baselines against the trained compressors (beats: ahead by more than the spread over "
             "seeds, on every seed; matches: within the spread; otherwise below):"]
    for pair, entry in comparison.items():
        baseline, compressor = pair.split(" vs ")
        lines.append(f"  {METHODS[baseline]} vs {METHODS[compressor]}: beats {_where(entry['beats'])}; "
                     f"matches {_where(entry['matches'])}")
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


def render(results: dict) -> str:
    """The demo's printed report, from its results (as run_demo builds them or results.json holds them):
    the table, the baselines against the compressors, the conversations, the fits, the gain and the
    honesty check."""
    recipe, conversations = results["recipe"], results["conversations"]
    budgets, seeds = tuple(recipe["budgets"]), len(recipe["seeds"])
    return "\n\n".join([
        format_table(results["summary"], results["chance"], budgets, seeds, results["test_questions"],
                     recipe["random_draws"]),
        format_baselines(results["baselines_vs_compressors"]),
        format_turns(conversations["summary"], conversations["questions_per_grid"], conversations["grids"], seeds),
        format_fits(results["fits"]),
        format_gain(results["gain"]),
        format_honesty(results["honesty"]),
    ])


def format_timing(results: dict) -> str:
    """How long the run took, on which machine and under what load (results as in results.json)."""
    start, end = (", ".join(f"{x:.1f}" for x in results[f"load_average_1_5_15_min_at_{when}"])
                  for when in ("start", "end"))
    return (f"wall time: {results['wall_time_s']:.0f} s on {results['machine']} ({results['workers']} worker "
            f"processes, 1 thread each; load average (1, 5, 15 min) {start} at the start, {end} at the end: "
            f"other processes on the machine slow the run down); the jobs used {results['cpu_time_s']:.0f} CPU "
            f"seconds in all")


def plot(summary: dict, fits: dict, chance: dict, budgets: tuple[int, ...], path: Path) -> Path:
    """Digit accuracy vs N, one panel per question type: every method (mean ± std), the fused rising-range
    power law, the uncompressed baseline and chance. Written atomically."""
    figure = require("matplotlib.figure").Figure(figsize=(12.0, 4.6))
    require("matplotlib.backends.backend_agg").FigureCanvasAgg(figure)
    n = np.array(budgets, dtype=float)
    styles = {"fused": "o-", "plain": "s-", "pooled": "^:", "random": "v:"}
    for index, (kind, axes) in enumerate(zip(QUESTION_TYPES, figure.subplots(1, len(QUESTION_TYPES), sharey=True))):
        for color, method in enumerate(METHODS):
            stats = [summary[method][str(b)][kind] for b in budgets]
            axes.errorbar(n, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], fmt=styles[method],
                          color=f"C{color}", capsize=3, linewidth=0.8, markersize=4, label=METHOD_ROWS[method])
        axes.axhline(summary[NONE][ALL][kind]["mean"], color="black", linestyle="--", linewidth=1,
                     label="no compression (9 cell tokens)")
        axes.axhline(chance[kind], color="grey", linestyle=":", linewidth=1, label="chance")
        if index == 0:
            figure.legend(*axes.get_legend_handles_labels(), loc="lower center", ncol=6, fontsize=8)
            axes.set_ylabel("digit accuracy")
        fit = fits["fused"][kind]["rising"]
        if "error" not in fit:
            grid = np.geomspace(min(fit["budgets"]), max(fit["budgets"]), 100)
            line, = axes.plot(grid, np.exp(fit["beta"] - fit["alpha"] * np.log(grid)), "--", color="C0")
            label = f"question fused, power law: α = {fit['alpha']:.2f}, R² = {fit['r2']:.2f}{_poor(fit)}"
            axes.legend([line], [label], fontsize=7, loc="upper left", bbox_to_anchor=(0.0, 0.93))
        axes.set_xscale("log", base=2)
        axes.set_xticks(n, [str(b) for b in budgets])
        axes.set_ylim(0, 1.02)
        axes.set_xlabel("tokens per question N")
        axes.set_title(f"{kind} questions ({DIGITS_NEEDED[kind]} digit{'s' * (DIGITS_NEEDED[kind] > 1)})")
        axes.grid(True, which="both", alpha=0.3)
    figure.suptitle("digit grids through one frozen reader: trained compressors vs training-free baselines")
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    return files.write_atomically(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))


def write_json(results: dict, path: Path) -> Path:
    """results.json, with floats kept JSON-valid (NaN becomes null); written atomically."""
    return files.write_json(results, path)

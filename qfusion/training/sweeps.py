"""The sweep (stage 3): every mode from its own stage-2 plugin, one fine-tune and evaluation per budget,
and one comparison of both modes (table, fitted laws, plot).

Per mode (``question``: the question fused; ``no_question``: the paper's ablation, vision + slots
only) the sweep starts from a stage-2 plugin of that mode: ``sweep.plugins[mode]``, or one it
trains first with the generate stage from ``plugin`` (an align plugin, or none) with
``use_question`` set for the mode, so that the no-question mode never borrows a plugin trained with
the question. From it, every budget of ``sweep.budgets`` is fine-tuned on ``sweep.fraction`` of the
data and evaluated (the training-free baselines once per budget, they do not depend on the mode).
Written into ``output_dir``: ``<mode>/base/`` and ``<mode>/m<m>-n<n>/`` (plugin, metrics,
``eval.json``), ``scores.csv`` (every series), ``fits.json`` (the law per series: the modes, their
question types and the baselines; what ``qfusion budget`` reads), ``scaling.png`` (the modes and
baselines on one figure) and ``sweep.json`` (the runs, the comparison table, the fits and the reason
for every series that could not be fitted).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from qfusion.config import RUNTIME_FIELDS, FusionConfig
from qfusion.files import write_json
from qfusion.training.config import MODES, TrainConfig, merge
from qfusion.training.data import ConversationDataset, load_conversations
from qfusion.training.evaluation import score_rows, write_scores_csv
from qfusion.training.host import new_fusion_config, parse_budgets, powers_up_to, process_state
from qfusion.training.run import train

logger = logging.getLogger(__name__)


def sweep_budgets(config: TrainConfig) -> list:
    """The sweep's budgets: ``sweep.budgets``, or the powers of two up to the plugin's codebook_size."""
    base = FusionConfig.from_pretrained(config.plugin) if config.plugin else new_fusion_config(config.fusion)
    values = config.sweep.budgets if config.sweep.budgets is not None else powers_up_to(2, base.codebook_size)
    return parse_budgets(values, "sweep.budgets", base.codebook_size, config.fusion.get("n", base.n))


def fit_series(rows: list[dict], metric: str, bootstrap: int) -> tuple[dict, dict]:
    """(fits, reasons): P(N) fitted per series of rows on ``metric`` (``bootstrap`` resamples for the α
    interval); a series that cannot be fitted (fewer than 3 budgets, a zero score, no power law) is
    left out with the reason."""
    from qfusion.scaling import PoorFitWarning, fit_power_law

    fits, reasons = {}, {}
    for series in dict.fromkeys(row["series"] for row in rows):
        chosen = [row for row in rows if row["series"] == series]
        try:
            with warnings.catch_warnings():  # a poor fit is flagged in the sweep's table and sweep.json instead
                warnings.simplefilter("ignore", PoorFitWarning)
                fits[series] = fit_power_law([row["tokens"] for row in chosen], [row[metric] for row in chosen],
                                             n_bootstrap=bootstrap)
        except ValueError as error:
            reasons[series] = str(error)
    return fits, reasons


def comparison(rows: list[dict], metric: str) -> tuple[list[str], list[dict]]:
    """(columns, one row per budget): the score of every main series (modes, baselines) side by side."""
    columns = list(dict.fromkeys(row["series"] for row in rows if ":" not in row["series"]))
    table = {}
    for row in rows:
        if ":" not in row["series"]:
            table.setdefault((row["m"], row["n"]), {"m": row["m"], "n": row["n"]})[row["series"]] = row[metric]
    return columns, [table[key] for key in sorted(table)]


def format_comparison(columns: list[str], table: list[dict], metric: str, fits: dict) -> str:
    """The comparison of the sweep as text: per budget each series' score, then each main series' law."""
    from qfusion.scaling import POOR_FIT_R2

    header = ["m", "n", *columns]
    cells = [[str(r["m"]), str(r["n"]), *(f"{r[c]:.1f}" if c in r else "-" for c in columns)] for r in table]
    widths = [max(len(row[i]) for row in [header] + cells) for i in range(len(header))]
    lines = [f"{metric} (%) per budget"] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                                             for row in [header] + cells]
    for series in columns:
        if series in fits:
            fit = fits[series]
            note = f"  poor fit (R2 in log space below {POOR_FIT_R2:g})" if fit.poor else ""
            lines.append(f"{series}: alpha = {fit.alpha:.4f}, N_c = {fit.n_c:.4g}, R2 (log) = {fit.r2:.3f}{note}")
        else:
            lines.append(f"{series}: no power law fitted")
    return "\n".join(lines)


def _check_bases(config: TrainConfig) -> None:
    """Every plugin of ``sweep.plugins`` must be of its mode."""
    for mode, given in config.sweep.plugins.items():
        use_question = FusionConfig.from_pretrained(given).use_question
        if use_question != (mode == "question"):
            raise ValueError(f"sweep.plugins.{mode}: {given!r} was trained with use_question={use_question}; the "
                             f"{mode} mode needs a plugin of its own mode")


def _mode_base(config: TrainConfig, mode: str, data, out: Path, host_processor) -> str:
    """The stage-2 plugin a mode's fine-tunes start from: given, or trained here."""
    if mode in config.sweep.plugins:
        return config.sweep.plugins[mode]
    base = out / mode / "base"
    logger.info("sweep: training the %s mode's own stage-2 plugin in %s", mode, base)
    train(config.replace(stage="generate", output_dir=str(base),
                         fusion=merge(config.fusion, {"use_question": mode == "question"})),
          host_processor=host_processor, train_dataset=data)
    return str(base)


def sweep(config: TrainConfig, *, host_processor=None) -> dict:
    """Run the sweep (see the module docstring); returns sweep.json's content.

    host_processor: the host's processor, instead of loading it from ``config.model`` (every run
    loads a fresh host: attaching changes it).
    """
    from qfusion.scaling import plot_scaling, save_fits
    from qfusion.training.evaluation import evaluate

    out = Path(config.output_dir)
    _check_bases(config)
    budgets = sweep_budgets(config)
    data = load_conversations(config.data.train, image_root=config.data.image_root, split=config.data.split,
                              num_frames=config.data.num_frames)
    if not isinstance(data, ConversationDataset):
        raise ValueError("data.streaming: the sweep fine-tunes on a fraction of the data and needs a map-style "
                         "dataset; set data.streaming: false")
    subset = data if config.sweep.fraction == 1 else data.subset(config.sweep.fraction, config.seed)
    runtime = {k: v for k, v in config.fusion.items() if k in RUNTIME_FIELDS}
    runs, rows = [], []
    for mode in [m for m in MODES if m in config.sweep.modes]:
        base = _mode_base(config, mode, data, out, host_processor)
        for budget in budgets:
            name = f"m{budget.m}-n{budget.n}"
            run_dir = out / mode / name
            run = config.replace(stage="generate", plugin=base, output_dir=str(run_dir),
                                 fusion={**runtime, "m": budget.m, "n": budget.n})
            metrics = train(run, host_processor=host_processor, train_dataset=subset)
            baselines = config.eval.baselines if not runs or runs[0]["mode"] == mode else []
            result = evaluate(run.replace(stage="eval", plugin=str(run_dir), eval={"budgets": None}),
                              host_processor=host_processor, mode=mode, baselines=baselines)
            rows += score_rows(result)
            entry = result["budgets"][0]
            runs.append({"name": f"{mode}/{name}", "mode": mode, "m": budget.m, "n": budget.n,
                         "train_loss": metrics.get("train_loss"), "scores": entry["scores"],
                         "skipped": entry["skipped"]})
            logger.info("sweep: %s\n%s", run_dir, result["table"])
    metric = config.sweep.metric
    fits, reasons = fit_series(rows, metric, config.sweep.bootstrap)
    columns, table = comparison(rows, metric)
    summary = {"metric": metric, "runs": runs, "comparison": table,
               "table": format_comparison(columns, table, metric, fits), "fits": {k: f.to_dict() for k, f in fits.items()},
               "poor_fits": sorted(k for k, f in fits.items() if f.poor), "unfitted": reasons}
    if process_state().is_main_process:
        write_scores_csv(rows, out / "scores.csv")
        save_fits(fits, out / "fits.json")
        write_json(summary, out / "sweep.json")
        plotted = {series: ([r["tokens"] for r in rows if r["series"] == series],
                            [r[metric] for r in rows if r["series"] == series], fit)
                   for series, fit in fits.items() if ":" not in series}
        if plotted:
            plot_scaling(plotted, out / "scaling.png", ylabel=f"{metric} (%)")
    for series, reason in reasons.items():
        logger.info("sweep: no power law fitted for %r: %s", series, reason)
    return summary


"""The ``qfusion`` command line: one sub-command per job (``qfusion <command> --help``)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the CPU end-to-end demo and print its result table")
    p.add_argument("--quick", action="store_true", help="a short run (CI smoke test)")
    p.add_argument("--out", default="demo_out", help="folder for results.json and the plot")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from qfusion.demo import run_demo

    return run_demo(quick=args.quick, out_dir=args.out)


def _check_outputs(**paths: str | None) -> None:
    """Raise ValueError naming the option whose file would go into a missing directory (before any work)."""
    for option, path in paths.items():
        if path is not None and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"--{option}: no directory {str(Path(path).parent)!r} to write {path!r} in")


def _add_fit(subparsers) -> None:
    p = subparsers.add_parser("fit", help="fit P(N) = (N_c / N)^alpha to (tokens, score) points from a CSV file")
    p.add_argument("csv", help="CSV file with a header row")
    p.add_argument("--x", default="tokens", help="column of the number of tokens N (default: tokens)")
    p.add_argument("--y", default="score", help="column of the score (default: score)")
    p.add_argument("--group", default=None, help="column naming each row's series (default: one series)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the alpha interval")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--plot", default=None, help="write the points and fitted curves to this image file")
    p.add_argument("--json", default=None, help="write the fits to this JSON file")
    p.set_defaults(func=_run_fit)


def _run_fit(args) -> int:
    from qfusion.scaling import POOR_FIT_R2, PoorFitWarning, fit_power_law, load_points_csv, plot_scaling, save_fits
    from qfusion.scaling.optional import require

    try:
        _check_outputs(plot=args.plot, json=args.json)
        if args.plot:  # before the fits, so that a missing matplotlib costs no work
            require("matplotlib.figure", "qfusion fit --plot")
        points = load_points_csv(args.csv, x=args.x, y=args.y, group=args.group)
        with warnings.catch_warnings():  # a poor fit is flagged in its row instead
            warnings.simplefilter("ignore", PoorFitWarning)
            fits = {name: fit_power_law(n, p, n_bootstrap=args.bootstrap, seed=args.seed)
                    for name, (n, p) in points.items()}
    except (ImportError, ValueError) as error:
        print(f"qfusion fit: {error}", file=sys.stderr)
        return 1
    width = max(len("series"), *(len(name) for name in fits))
    print(f"{'series':<{width}}  {'N_c':>10}  {'alpha':>8}  {'alpha 95% CI':>19}  {'R2 (log)':>8}  "
          f"{'R2 (score)':>10}  {'points':>6}  note")
    for name, fit in fits.items():
        low, high = fit.alpha_ci
        note = "poor fit" if fit.poor else ""
        print(f"{name:<{width}}  {fit.n_c:>10.4g}  {fit.alpha:>8.4f}  {f'[{low:.4f}, {high:.4f}]':>19}  "
              f"{fit.r2:>8.4f}  {fit.r2_score_space:>10.4f}  {fit.num_points:>6}  {note}".rstrip())
    if any(fit.poor for fit in fits.values()):
        print(f"poor fit: R2 (log) below {POOR_FIT_R2:g}, the points do not follow P(N) = (N_c / N)^alpha closely; "
              "N or scores read from the law can be far from the measured ones")
    if args.plot:
        plot_scaling({name: (*points[name], fit) for name, fit in fits.items()}, args.plot, ylabel=args.y)
        print(f"plot: {args.plot}")
    if args.json:
        save_fits(fits, args.json)
        print(f"json: {args.json}")
    return 0


def _add_budget(subparsers) -> None:
    p = subparsers.add_parser("budget", help="the smallest number of tokens N per series that meets a target, "
                                             "from the fits `qfusion fit --json` wrote")
    p.add_argument("fits", help="JSON file of fits, {series: fit} (qfusion fit --json)")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--target", type=float, help="the score to reach, in the fitted scores' units")
    goal.add_argument("--max-loss", type=float, help="the fraction of the score measured at the largest budget "
                                                      "that may be given up, e.g. 0.02 (needs the measured points, "
                                                      "which qfusion fit --json keeps with each fit)")
    p.add_argument("--series", nargs="+", default=None, help="only these series (default: all in the file)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the interval of N")
    p.add_argument("--confidence", type=float, default=0.95, help="coverage of the interval (default: 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--json", default=None, help="write the chosen budgets to this JSON file")
    p.set_defaults(func=_run_budget)


def _run_budget(args) -> int:
    from qfusion.scaling import POOR_FIT_R2, PoorFitWarning, load_fits, smallest_budget
    from qfusion.files import write_json

    try:
        _check_outputs(json=args.json)
        fits = load_fits(args.fits)
        unknown = [name for name in args.series or () if name not in fits]
        if unknown:
            raise ValueError(f"--series: no series {unknown} in {args.fits!r}; it has {list(fits)}")
        pointless = [name for name in args.series or fits if not fits[name].num_tokens]
        if args.max_loss is not None and pointless:
            raise ValueError(f"--max-loss: the fits of series {pointless} in {args.fits!r} carry no measured points "
                             "(an older qfusion fit wrote them without), so the score measured at the largest budget "
                             "is unknown; refit them with qfusion fit, or give --target")
        with warnings.catch_warnings():  # a budget from a poor fit is flagged in its row instead
            warnings.simplefilter("ignore", PoorFitWarning)
            choices = {name: smallest_budget(fits[name], target=args.target, max_loss=args.max_loss,
                                             n_bootstrap=args.bootstrap, seed=args.seed, confidence=args.confidence)
                       for name in args.series or fits}
    except (ImportError, OSError, ValueError) as error:
        print(f"qfusion budget: {error}", file=sys.stderr)
        return 1
    width = max(len("series"), *(len(name) for name in choices))
    level = f"{100 * args.confidence:g}%"
    print(f"{'series':<{width}}  {'target':>10}  {'N':>7}  {level + ' interval':>16}  {'P(N)':>10}  "
          f"{'measured N':>13}  note")
    for name, choice in choices.items():
        low, high = choice.interval
        interval = "n/a" if low is None else f"[{low}, {high}]"
        measured = "n/a" if choice.measured_range is None else "{:g}..{:g}".format(*choice.measured_range)
        notes = ["extrapolated" if choice.extrapolated else "",
                 "fit has no points: no interval" if choice.measured_range is None else "",
                 f"poor fit (R2 {fits[name].r2:.3f})" if choice.poor_fit else ""]
        note = "; ".join(text for text in notes if text)
        print(f"{name:<{width}}  {choice.target:>10.4g}  {choice.num_tokens:>7}  {interval:>16}  "
              f"{choice.predicted:>10.4g}  {measured:>13}  {note}".rstrip())
    if any(choice.poor_fit for choice in choices.values()):
        print(f"poor fit: R2 (log) below {POOR_FIT_R2:g}; N comes from a law that does not describe the measured "
              "points closely: check it against them")
    if args.json:
        write_json({name: choice.to_dict() for name, choice in choices.items()}, args.json)
        print(f"json: {args.json}")
    return 0


def _add_divergence(subparsers) -> None:
    p = subparsers.add_parser("divergence", help="branch divergence of a causal LM over chosen/rejected answers")
    p.add_argument("--model", required=True, help="local directory of a transformers causal LM and its tokenizer")
    p.add_argument("--pairs", required=True, help="JSONL file, one {prompt, chosen, rejected} object a line")
    p.add_argument("--max-len", type=int, default=64, help="cap on answer steps N (default: 64)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass (default: 8)")
    p.add_argument("--r-star", type=float, default=1.0, help="threshold 1: smallest N with r(N) < r* (default: 1)")
    p.add_argument("--eps", type=float, default=1e-3, help="threshold 2: smallest N with |drho| < eps (default: 1e-3)")
    p.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--plot", default=None, help="write sqrt E(N), the bound and rho(N) to this image file")
    p.add_argument("--json", default=None, help="write the statistics to this JSON file")
    p.set_defaults(func=_run_divergence)


def _read_pairs(path: str) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) triples from a JSONL file, one object a line (blank lines skipped)."""
    import json

    from qfusion.files import read_json_lines

    pairs = []
    for number, record in read_json_lines(path, lambda number: f"--pairs: line {number} of {path!r}"):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str)
                                                   for k in ("prompt", "chosen", "rejected")):
            raise ValueError(f"--pairs: line {number} of {path!r}: expected an object with string "
                             f"keys prompt, chosen, rejected, got {json.dumps(record)[:80]!r}")
        pairs.append((record["prompt"], record["chosen"], record["rejected"]))
    return pairs


def _run_divergence(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qfusion.scaling import branch_divergence, plot_divergence
    from qfusion.files import write_json
    from qfusion.scaling.optional import require

    try:
        _check_outputs(plot=args.plot, json=args.json)
        if args.plot:  # before the model runs, so that a missing matplotlib costs no work
            require("matplotlib.figure", "qfusion divergence --plot")
        pairs = _read_pairs(args.pairs)
    except (ImportError, ValueError) as error:
        print(f"qfusion divergence: {error}", file=sys.stderr)
        return 1
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).to(args.device)
    result = branch_divergence(model, tokenizer, pairs, max_len=args.max_len, batch_size=args.batch_size,
                               progress=not args.no_progress, r_star=args.r_star, eps=args.eps)
    print(f"pairs: {result.num_pairs}  sigma: {result.sigma:.4g}")
    print(f"{'N':>4}  {'pairs':>5}  {'E(N)':>10}  {'sqrt E(N)':>10}  {'bound(N)':>10}  {'rho(N)':>8}")
    shown = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if n <= len(result.n)]
    if len(result.n) not in shown:
        shown.append(len(result.n))
    for n in shown:
        i = n - 1
        print(f"{n:>4}  {result.pairs_at_n[i]:>5}  {result.energy[i]:>10.4g}  {result.energy[i] ** 0.5:>10.4g}  "
              f"{result.bound[i]:>10.4g}  {result.rho[i]:>8.4f}")
    print(f"threshold 1, smallest N with r(N) < {result.r_star:g}: {result.threshold_ratio}")
    print(f"threshold 2, smallest N with |rho(N+1) - rho(N)| < {result.eps:g}: {result.threshold_plateau}")
    if args.plot:
        plot_divergence(result, args.plot)
        print(f"plot: {args.plot}")
    if args.json:
        write_json(result.to_dict(), args.json)
        print(f"json: {args.json}")
    return 0


def _add_train(subparsers) -> None:
    # listed here; its arguments (every training setting) are parsed by qfusion.training's own parser
    subparsers.add_parser("train", add_help=False, help="train, evaluate or sweep a plugin on a transformers VLM "
                                                        "host (`qfusion train --help` lists every setting)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qfusion", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_train, _add_fit, _add_budget, _add_divergence):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from qfusion.training import main as train

        return train(argv[1:], prog="qfusion train")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

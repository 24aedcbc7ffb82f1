"""run_demo: train the hosts and both compressors per seed in two worker processes, evaluate every N, report."""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from qfusion.demo.answers import encode_digits
from qfusion.demo.data import QUESTION_TYPES, load_pools, require, sample_grids
from qfusion.demo.evaluate import evaluate
from qfusion.demo.recipe import FULL, QUICK, Recipe
from qfusion.demo.report import (ALL, MODES, fit_modes, format_fits, format_gain, format_honesty, format_table,
                                 fusion_gain, honesty, plot, summarize, write_json)
from qfusion.demo.train import fusion_config, train_fusion, train_host

TEST_SEED = 12345  # the test grids and questions are the same for every seed and mode


def _init_worker() -> None:
    # At this size one thread per process beats two threads in one process.
    torch.set_num_threads(1)


def _seconds(start: tuple[float, float]) -> dict[str, float]:
    """Wall and CPU seconds of this process since start = (perf_counter(), process_time()).

    On a machine shared with other work the wall time grows, the CPU time much less.
    """
    return {"wall": time.perf_counter() - start[0], "cpu": time.process_time() - start[1]}


def _host_job(pools, recipe: Recipe, seed: int, test):
    start = time.perf_counter(), time.process_time()
    host = train_host(pools, recipe, seed)
    return host, evaluate(host, test), _seconds(start)


def _fusion_job(host, digit_table, train_labels, recipe: Recipe, seed: int, mode: str, test):
    start = time.perf_counter(), time.process_time()
    fusion = train_fusion(host, digit_table, train_labels, recipe, seed, use_question=mode == "fused")
    accuracy = {budget: evaluate(host, test, fusion, budget) for budget in recipe.budgets}
    return accuracy, _seconds(start)


def _chance(test) -> dict[str, float]:
    """Digit accuracy of the best image-blind guess per question type: always the type's most frequent digit."""
    answers, mask, kinds = test.answers.flatten(0, 1), test.answer_mask.flatten(0, 1), test.kinds.flatten()
    chance = {}
    for index, kind in enumerate(QUESTION_TYPES):
        digits = answers[(kinds == index)[:, None] & mask]
        chance[kind] = float(torch.bincount(digits).max() / digits.numel())
    return chance


def run_demo(quick: bool = False, out_dir: str | os.PathLike = "demo_out") -> int:
    """Run the digit-grid experiment, print its table, write results.json and scaling.png into out_dir.

    quick: one seed and short schedules (the CI run, under a minute on two idle cores: the
        compressors learn, well above chance, but not to the full run's level); otherwise three seeds.
    Returns 0; the printed honesty check says whether the gap between the modes is a budget effect.
    """
    for module in ("scipy.optimize", "matplotlib.figure"):  # needed only after minutes of training: checked first
        require(module)
    start = time.perf_counter()
    recipe = QUICK if quick else FULL
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pools = load_pools()
    test = sample_grids(pools[3], recipe.test_grids, recipe.test_questions, np.random.default_rng(TEST_SEED))
    print(f"qfusion demo ({'quick' if quick else 'full'}): 3x3 grids of handwritten digits, seeds {list(recipe.seeds)}, "
          f"{recipe.workers} worker processes", flush=True)

    runs, timings = [], {}
    context = multiprocessing.get_context("spawn")
    with context.Pool(recipe.workers, initializer=_init_worker) as pool:
        hosts = {seed: pool.apply_async(_host_job, (pools, recipe, seed, test)) for seed in recipe.seeds}
        digit_table = encode_digits()  # while the workers train the hosts
        jobs, digit_accuracy = {}, {}
        for seed, pending in hosts.items():
            host, accuracy, seconds = pending.get()
            digit_accuracy[seed] = host.digit_accuracy
            timings[f"host seed {seed}"] = seconds
            runs.append({"seed": seed, "mode": "none", "budget": ALL, "accuracy": accuracy})
            print(f"  seed {seed}: encoder {100 * host.digit_accuracy:.1f} % on single digits, LM on 9 cell "
                  "tokens " + ", ".join(f"{k} {100 * a:.1f} %" for k, a in accuracy.items())
                  + f" ({seconds['wall']:.0f} s)", flush=True)
            for mode in MODES:
                jobs[seed, mode] = pool.apply_async(
                    _fusion_job, (host, digit_table, pools[1], recipe, seed, mode, test))
        for (seed, mode), pending in jobs.items():
            accuracy, seconds = pending.get()
            timings[f"{mode} seed {seed}"] = seconds
            runs += [{"seed": seed, "mode": mode, "budget": b, "accuracy": a} for b, a in accuracy.items()]
            print(f"  seed {seed}: {MODES[mode]} compressor trained and evaluated at N = "
                  f"{', '.join(map(str, recipe.budgets))} ({seconds['wall']:.0f} s)", flush=True)

    summary = summarize(runs, recipe.budgets)
    fits = fit_modes(summary, recipe.budgets)
    check = honesty(summary, recipe.budgets)
    gain = fusion_gain(runs, recipe.budgets)
    chance = _chance(test)
    kinds = test.kinds.flatten()
    questions = {kind: int((kinds == i).sum()) for i, kind in enumerate(QUESTION_TYPES)}
    print()
    print(format_table(summary, chance, recipe.budgets, len(recipe.seeds), questions))
    print()
    print(format_fits(fits))
    print()
    print(format_gain(gain))
    print()
    print(format_honesty(check))
    wall = time.perf_counter() - start
    plot(summary, fits, chance, recipe.budgets, out / "scaling.png")
    write_json({
        "quick": quick, "recipe": asdict(recipe),
        "fusion_config": {mode: fusion_config(mode == "fused", recipe.budgets).to_dict() for mode in MODES},
        "question_types": list(QUESTION_TYPES), "test_questions": questions, "chance": chance,
        "budgets": [*map(str, recipe.budgets), ALL], "encoder_digit_accuracy": digit_accuracy,
        "runs": runs, "summary": summary, "fits": fits, "gain": gain, "honesty": check,
        "timings_s": timings, "wall_time_s": wall, "cpu_cores": os.cpu_count(),
        "load_average_1_5_15_min_at_end": list(os.getloadavg()),
    }, out / "results.json")
    print(f"wrote {out / 'results.json'} and {out / 'scaling.png'}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"wall time: {wall:.0f} s on {os.cpu_count()} CPU cores ({recipe.workers} worker processes, 1 thread each; "
          f"load average at the end {load}: other processes on the machine slow the run down); the jobs used "
          f"{sum(t['cpu'] for t in timings.values()):.0f} CPU seconds in all")
    return 0

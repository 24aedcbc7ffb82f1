"""run_demo: train the hosts and both compressors per seed in two worker processes, evaluate every N, report."""

from __future__ import annotations

import multiprocessing
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from qfusion.demo.answers import encode_answers
from qfusion.demo.data import QUESTION_TYPES, load_pools, sample_grids
from qfusion.demo.evaluate import evaluate
from qfusion.demo.recipe import FULL, QUICK, Recipe
from qfusion.demo.report import (ALL, MODES, fit_modes, format_fits, format_honesty, format_table, honesty, plot,
                                 summarize, write_json)
from qfusion.demo.train import fusion_config, train_fusion, train_host

TEST_SEED = 12345  # the test grids and questions are the same for every seed and mode


def _init_worker() -> None:
    # At this size one thread per process beats two threads in one process.
    torch.set_num_threads(1)


def _host_job(pools, recipe: Recipe, seed: int, test):
    start = time.perf_counter()
    host = train_host(pools, recipe, seed)
    return host, evaluate(host, test), time.perf_counter() - start


def _fusion_job(host, answer_table, train_labels, recipe: Recipe, seed: int, mode: str, test):
    start = time.perf_counter()
    fusion = train_fusion(host, answer_table, train_labels, recipe, seed, use_question=mode == "fused")
    accuracy = {budget: evaluate(host, test, fusion, budget) for budget in recipe.budgets}
    return accuracy, time.perf_counter() - start


def _chance(test) -> dict[str, float]:
    """Accuracy of the best answer-blind guess: 1/10 for a cell; the most frequent answer otherwise."""
    chance = {"cell": 0.1}
    kinds, answers = test.kinds.flatten(), test.answers.flatten()
    for index, kind in enumerate(QUESTION_TYPES[1:], start=1):
        chosen = answers[kinds == index]
        chance[kind] = float(torch.bincount(chosen).max() / chosen.numel())
    return chance


def run_demo(quick: bool = False, out_dir: str | os.PathLike = "demo_out") -> int:
    """Run the digit-grid experiment, print its table, write results.json and scaling.png into out_dir.

    quick: one seed and short schedules (a CI smoke test, under a minute); otherwise three seeds.
    Returns 0; the printed honesty check says whether the gap between the modes is a budget effect.
    """
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
        answer_table = encode_answers()  # while the workers train the hosts
        jobs, digit_accuracy = {}, {}
        for seed, pending in hosts.items():
            host, accuracy, seconds = pending.get()
            digit_accuracy[seed] = host.digit_accuracy
            timings[f"host seed {seed}"] = seconds
            runs.append({"seed": seed, "mode": "none", "budget": ALL, "accuracy": accuracy})
            print(f"  seed {seed}: encoder {100 * host.digit_accuracy:.1f} % on single digits, LM on 9 cell "
                  f"tokens {100 * accuracy['cell']:.1f} % on cell questions ({seconds:.0f} s)", flush=True)
            for mode in MODES:
                jobs[seed, mode] = pool.apply_async(
                    _fusion_job, (host, answer_table, pools[1], recipe, seed, mode, test))
        for (seed, mode), pending in jobs.items():
            accuracy, seconds = pending.get()
            timings[f"{mode} seed {seed}"] = seconds
            runs += [{"seed": seed, "mode": mode, "budget": b, "accuracy": a} for b, a in accuracy.items()]
            print(f"  seed {seed}: {MODES[mode]} compressor trained and evaluated at N = "
                  f"{', '.join(map(str, recipe.budgets))} ({seconds:.0f} s)", flush=True)

    summary = summarize(runs, recipe.budgets)
    fits = fit_modes(summary, recipe.budgets)
    check = honesty(summary, recipe.budgets)
    chance = _chance(test)
    kinds = test.kinds.flatten()
    questions = {kind: int((kinds == i).sum()) for i, kind in enumerate(QUESTION_TYPES)}
    print()
    print(format_table(summary, chance, recipe.budgets, len(recipe.seeds), questions))
    print()
    print(format_fits(fits))
    print(format_honesty(check))
    wall = time.perf_counter() - start
    plot(summary, fits, chance, recipe.budgets, out / "scaling.png")
    write_json({
        "quick": quick, "recipe": asdict(recipe),
        "fusion_config": {mode: fusion_config(mode == "fused", recipe.budgets).to_dict() for mode in MODES},
        "question_types": list(QUESTION_TYPES), "test_questions": questions, "chance": chance,
        "budgets": [*map(str, recipe.budgets), ALL], "encoder_digit_accuracy": digit_accuracy,
        "runs": runs, "summary": summary, "fits": fits, "honesty": check,
        "timings_s": timings, "wall_time_s": wall, "cpu_cores": os.cpu_count(),
    }, out / "results.json")
    print(f"wrote {out / 'results.json'} and {out / 'scaling.png'}")
    print(f"wall time: {wall:.0f} s on {os.cpu_count()} CPU cores ({recipe.workers} worker processes, 1 thread each)")
    return 0

"""run_demo: train the hosts and both compressors per seed in two worker processes, evaluate every N, report."""

from __future__ import annotations

import multiprocessing
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from qfusion.demo.answers import encode_digits
from qfusion.demo.data import QUESTION_TYPES, load_pools, require, sample_grids
from qfusion.demo.evaluate import (accuracy_by_type, afresh, compressed, conversation, evaluate, pooled, random_kept,
                                   uncompressed)
from qfusion.demo.recipe import FULL, QUICK, Recipe
from qfusion.demo.report import (ALL, COMPRESSORS, METHODS, NONE, baselines_vs_compressors, fit_modes, format_timing,
                                 fusion_gain, honesty, plot, render, summarize, write_json)
from qfusion.demo.train import fusion_config, train_fusion, train_host
from qfusion.demo.turns import scheme_tokens, summarize_turns, turn_accuracy

TEST_SEED = 12345  # the test grids and questions are the same for every seed and mode
RANDOM_SEED = 777  # the random-cells baseline's draws: seed * 1000 + RANDOM_SEED + draw


def _init_worker() -> None:
    # At this size one thread per process beats two threads in one process.
    torch.set_num_threads(1)


def _seconds(start: tuple[float, float]) -> dict[str, float]:
    """Wall and CPU seconds of this process since start = (perf_counter(), process_time()).

    On a machine shared with other work the wall time grows, the CPU time much less.
    """
    return {"wall": time.perf_counter() - start[0], "cpu": time.process_time() - start[1]}


def _host_job(pools, recipe: Recipe, seed: int, test):
    """Train a seed's host; returns (host, (B, G) per-question accuracies of its LM on the 9 cells, seconds)."""
    start = time.perf_counter(), time.process_time()
    host = train_host(pools, recipe, seed)
    return host, evaluate(host, test, uncompressed), _seconds(start)


def _baselines_job(host, recipe: Recipe, seed: int, test):
    """Score both training-free baselines through a seed's frozen LM at every budget.

    Returns (scores, seconds): scores maps ("pooled", N) to (B, G) per-question accuracies and
    ("random", N) to a list of them, one per draw.
    """
    start = time.perf_counter(), time.process_time()
    scores = {}
    for n in recipe.budgets:
        scores["pooled", n] = evaluate(host, test, pooled(n))
        scores["random", n] = [
            evaluate(host, test, random_kept(n, torch.Generator().manual_seed(seed * 1000 + RANDOM_SEED + draw)))
            for draw in range(recipe.random_draws)]
    return scores, _seconds(start)


def _fusion_job(host, digit_table, train_labels, recipe: Recipe, seed: int, mode: str, test):
    """Train one compressor; score it at every budget and, question fused, in conversations (m/n and afresh).

    Returns (scores, seconds): scores maps (mode, N) and, for the fused mode, ("ask", m, n) and
    ("afresh", m) to (B, G) per-question accuracies.
    """
    start = time.perf_counter(), time.process_time()
    fusion = train_fusion(host, digit_table, train_labels, recipe, seed, use_question=mode == "fused")
    scores = {(mode, n): evaluate(host, test, compressed(fusion, n)) for n in recipe.budgets}
    if mode == "fused":
        for m, n in recipe.conversation_budgets:
            scores["ask", m, n] = evaluate(host, test, conversation(fusion, m, n))
        for m in sorted({m for m, _ in recipe.conversation_budgets}):
            scores["afresh", m] = evaluate(host, test, afresh(fusion, m))
    return scores, _seconds(start)


def _baseline_runs(seed: int, scores: dict, recipe: Recipe, kinds) -> list[dict]:
    """The run records of a seed's baselines; the random baseline's accuracy is the mean over its draws."""
    runs = []
    for n in recipe.budgets:
        draws = scores["random", n]
        runs += [{"seed": seed, "mode": "pooled", "budget": n,
                  "accuracy": accuracy_by_type(scores["pooled", n], kinds)},
                 {"seed": seed, "mode": "random", "budget": n,
                  "accuracy": accuracy_by_type(torch.stack(draws).mean(0), kinds),
                  "accuracy_per_draw": [accuracy_by_type(d, kinds) for d in draws]}]
    return runs


def _turn_runs(seed: int, mode: str, scores: dict, recipe: Recipe, kinds) -> list[dict]:
    """A compressor's conversation records: question fused, m/n through start/ask and afresh with m; no
    question, its N tokens for every turn (the same scores as its table rows, split by turn)."""
    if mode == "fused":
        schemes = []
        for m in sorted({m for m, _ in recipe.conversation_budgets}):  # each m's m/n pairs, then afresh with m
            schemes += [("ask", m, n, scores["ask", m, n]) for first, n in recipe.conversation_budgets if first == m]
            schemes.append(("afresh", m, m, scores["afresh", m]))
    else:
        schemes = [("blind", n, n, scores[mode, n]) for n in recipe.budgets]
    return [{"seed": seed, "scheme": scheme, "m": m, "n": n,
             "tokens": scheme_tokens(scheme, m, n, per_question.shape[1]), **turn_accuracy(per_question, kinds)}
            for scheme, m, n, per_question in schemes]


def _machine() -> str:
    """The machine the run had, for its timings: core count, CPU model (from /proc/cpuinfo where there is one)
    and architecture."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores, {model}, {platform.machine()}"


def _chance(test) -> dict[str, float]:
    """Digit accuracy of the best image-blind guess per question type: always the type's most frequent digit."""
    answers, mask, kinds = test.answers.flatten(0, 1), test.answer_mask.flatten(0, 1), test.kinds.flatten()
    chance = {}
    for index, kind in enumerate(QUESTION_TYPES):
        digits = answers[(kinds == index)[:, None] & mask]
        chance[kind] = float(torch.bincount(digits).max() / digits.numel())
    return chance


def run_demo(quick: bool = False, out_dir: str | os.PathLike = "demo_out") -> int:
    """Run the digit-grid experiment, print its report, write results.json and scaling.png into out_dir.

    quick: one seed and short schedules (the CI run, under a minute on two idle cores: the
        compressors learn, well above chance, but not to the full run's level); otherwise three seeds.
    Returns 0; the printed honesty check says whether the gap between the modes is a budget effect.
    """
    for module in ("scipy.optimize", "matplotlib.figure"):  # needed only after minutes of training: checked first
        require(module)
    start, load_at_start = time.perf_counter(), list(os.getloadavg())
    recipe = QUICK if quick else FULL
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pools = load_pools()
    test = sample_grids(pools[3], recipe.test_grids, recipe.test_questions, np.random.default_rng(TEST_SEED))
    print(f"qfusion demo ({'quick' if quick else 'full'}): 3x3 grids of handwritten digits, seeds {list(recipe.seeds)}, "
          f"{recipe.workers} worker processes", flush=True)

    runs, turn_runs, timings = [], [], {}
    context = multiprocessing.get_context("spawn")
    with context.Pool(recipe.workers, initializer=_init_worker) as pool:
        hosts = {seed: pool.apply_async(_host_job, (pools, recipe, seed, test)) for seed in recipe.seeds}
        digit_table = encode_digits()  # while the workers train the hosts
        jobs, digit_accuracy = {}, {}
        for seed, pending in hosts.items():
            host, scores, seconds = pending.get()
            digit_accuracy[seed] = host.digit_accuracy
            timings[f"host seed {seed}"] = seconds
            accuracy = accuracy_by_type(scores, test.kinds)
            runs.append({"seed": seed, "mode": NONE, "budget": ALL, "accuracy": accuracy})
            print(f"  seed {seed}: encoder {100 * host.digit_accuracy:.1f} % on single digits, LM on 9 cell "
                  "tokens " + ", ".join(f"{k} {100 * a:.1f} %" for k, a in accuracy.items())
                  + f" ({seconds['wall']:.0f} s)", flush=True)
            # the compressors first: they take longest, the baselines fill a worker when one is free
            for mode in COMPRESSORS:
                jobs[seed, mode] = pool.apply_async(
                    _fusion_job, (host, digit_table, pools[1], recipe, seed, mode, test))
            jobs[seed, "baselines"] = pool.apply_async(_baselines_job, (host, recipe, seed, test))
        for (seed, job), pending in jobs.items():
            scores, seconds = pending.get()
            timings[f"{job} seed {seed}"] = seconds
            if job == "baselines":
                runs += _baseline_runs(seed, scores, recipe, test.kinds)
                print(f"  seed {seed}: baselines (average pool, random cells) evaluated at N = "
                      f"{', '.join(map(str, recipe.budgets))} ({seconds['wall']:.0f} s)", flush=True)
            else:
                runs += [{"seed": seed, "mode": job, "budget": n,
                          "accuracy": accuracy_by_type(scores[job, n], test.kinds)} for n in recipe.budgets]
                turn_runs += _turn_runs(seed, job, scores, recipe, test.kinds)
                print(f"  seed {seed}: {METHODS[job]} compressor trained and evaluated at N = "
                      f"{', '.join(map(str, recipe.budgets))}" + (" and in conversations" if job == "fused" else "")
                      + f" ({seconds['wall']:.0f} s)", flush=True)

    summary = summarize(runs, recipe.budgets)
    kinds = test.kinds.flatten()
    results = {
        "quick": quick, "recipe": asdict(recipe),
        "fusion_config": {mode: fusion_config(mode == "fused", recipe.budgets).to_dict() for mode in COMPRESSORS},
        "question_types": list(QUESTION_TYPES),
        "test_questions": {kind: int((kinds == i).sum()) for i, kind in enumerate(QUESTION_TYPES)},
        "chance": _chance(test), "methods": METHODS, "budgets": [*map(str, recipe.budgets), ALL],
        "encoder_digit_accuracy": digit_accuracy, "runs": runs, "summary": summary,
        "fits": fit_modes(summary, recipe.budgets), "gain": fusion_gain(runs, recipe.budgets),
        "baselines_vs_compressors": baselines_vs_compressors(runs, recipe.budgets),
        "honesty": honesty(summary, recipe.budgets),
        "conversations": {"grids": len(test), "questions_per_grid": test.questions.shape[1],
                          "budgets": [list(p) for p in recipe.conversation_budgets], "runs": turn_runs,
                          "summary": summarize_turns(turn_runs)},
    }
    print()
    print(render(results))
    plot(summary, results["fits"], results["chance"], recipe.budgets, out / "scaling.png")
    results.update({"timings_s": timings, "wall_time_s": time.perf_counter() - start,
                    "cpu_time_s": sum(t["cpu"] for t in timings.values()), "workers": recipe.workers,
                    "machine": _machine(), "load_average_1_5_15_min_at_start": load_at_start,
                    "load_average_1_5_15_min_at_end": list(os.getloadavg())})
    write_json(results, out / "results.json")
    print(f"wrote {out / 'results.json'} and {out / 'scaling.png'}")
    print(format_timing(results))
    return 0

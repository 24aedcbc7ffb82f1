import json
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn", reason="the demo needs pip install 'qfusion[demo]'")

from qfusion import QuestionFusion  # noqa: E402
from qfusion.cli import main  # noqa: E402
from qfusion.demo.baselines import pool_cells, pool_shape, random_cells  # noqa: E402
from qfusion.demo.data import (ANSWER_LEN, CELLS, DIGIT_IDS, QUESTION_TYPES, REGIONS, VOCAB, WORDS,  # noqa: E402
                               sample_grids)
from qfusion.demo.evaluate import afresh, compressed, conversation  # noqa: E402
from qfusion.demo.lm import IGNORE, QUESTION_LEN, lm_text  # noqa: E402
from qfusion.demo.reconstruction import reconstruction_loss  # noqa: E402
from qfusion.demo.report import (baselines_vs_compressors, fit_modes, format_fits, format_timing,  # noqa: E402
                                 fusion_gain, honesty, render, summarize)
from qfusion.demo.train import LM_DIM, cell_views, fusion_config  # noqa: E402
from qfusion.demo.turns import scheme_tokens, turn_accuracy  # noqa: E402

BUDGETS = (1, 2, 3, 4, 6, 9, 16)


def grids(num=64, questions=4, seed=0):
    return sample_grids(np.arange(1000) % 10, num, questions, np.random.default_rng(seed))


def test_answers_are_the_digits_of_the_named_cells_in_reading_order():
    batch = grids()
    words = {VOCAB[place]: (kind, cells) for kind, place, cells in REGIONS}
    for b in range(len(batch)):
        for g in range(batch.questions.shape[1]):
            kind, cells = words[int(batch.questions[b, g, -1])]
            assert QUESTION_TYPES[batch.kinds[b, g]] == kind
            expected = [DIGIT_IDS[int(batch.labels[b, c])] for c in cells]
            assert batch.answers[b, g, :len(cells)].tolist() == expected
            assert batch.answer_cells[b, g].tolist() == [*cells, *[-1] * (ANSWER_LEN - len(cells))]
            assert batch.evidence[b, g].nonzero().flatten().tolist() == sorted(cells)


def test_lm_text_scores_the_answer_digits_and_eos_only():
    batch = grids(8, 3)
    text, labels = lm_text(batch)
    lengths = batch.answer_mask.flatten(0, 1).sum(-1)
    for row, length in enumerate(lengths.tolist()):
        kept = (labels[row] != IGNORE).nonzero().flatten().tolist()
        assert kept == list(range(QUESTION_LEN, QUESTION_LEN + length + 1))
        assert WORDS[int(text[row, QUESTION_LEN + length])] == "<eos>"
        answer = batch.answers.flatten(0, 1)[row, :length]
        assert text[row, QUESTION_LEN:QUESTION_LEN + length].tolist() == answer.tolist()


@pytest.mark.parametrize("size", [1, 3, 9, 16])
def test_reader_views_hold_the_evidence_cells_that_fit(size):
    evidence = grids(32, 4).evidence.flatten(0, 1)
    views = cell_views(evidence, size, torch.Generator().manual_seed(0))
    assert views.shape == (evidence.shape[0], size)
    for row, view in zip(evidence, views):
        held = set(view.tolist())
        needed = set(row.nonzero().flatten().tolist())
        assert len(held & needed) == min(len(needed), size)
        if size <= CELLS:
            assert len(held) == size  # distinct cells until there are more slots than cells


def test_reconstruction_is_zero_for_the_cells_in_any_order_and_assigns_distinct_cells():
    torch.manual_seed(0)
    cells = torch.randn(2, CELLS, 8)
    evidence = torch.zeros(2, CELLS, dtype=torch.bool)
    evidence[0, [1, 4, 7]] = True
    evidence[1] = True
    tokens = torch.stack([cells[0, [7, 1, 4, 4]], cells[1, torch.randperm(CELLS)[:4]]])  # (2, 4, 8)
    assert reconstruction_loss(tokens, cells, evidence).item() == pytest.approx(0.0, abs=1e-10)
    # Two slots on one cell: the assignment gives one of them another cell, so the loss is not zero.
    collapsed = torch.stack([cells[0, [1, 1]], cells[1, [0, 0]]])
    assert reconstruction_loss(collapsed, cells, evidence).item() > 0.1


def synthetic_runs(fused_gain=0.3, plain_at_room=0.96, random_offset=0.0):
    """Three seeds of made-up accuracies: a fused compressor ahead of a blind one at small N, a random-cells
    baseline at the blind one's level plus random_offset, and an average pool far below both."""
    runs = []
    for seed in range(3):
        runs.append({"seed": seed, "mode": "none", "budget": "all",
                     "accuracy": {k: 0.96 for k in QUESTION_TYPES}})
        for n in BUDGETS:
            plain = min(plain_at_room, 0.1 + 0.1 * n) + 0.005 * seed
            fused = {"cell": 0.96, "line": min(0.96, 0.35 * n), "block": min(0.96, 0.25 * n)}
            runs.append({"seed": seed, "mode": "plain", "budget": n, "accuracy": {k: plain for k in QUESTION_TYPES}})
            runs.append({"seed": seed, "mode": "fused", "budget": n,
                         "accuracy": {k: (fused[k] if n >= 4 else min(0.96, plain + fused_gain)) if k != "cell"
                                      else 0.96 for k in QUESTION_TYPES}})
            runs.append({"seed": seed, "mode": "random", "budget": n,
                         "accuracy": {k: plain + random_offset - 0.004 * seed for k in QUESTION_TYPES}})
            runs.append({"seed": seed, "mode": "pooled", "budget": n, "accuracy": {k: 0.05 for k in QUESTION_TYPES}})
    return runs


def test_honesty_check_needs_the_roomy_blind_compressor_near_the_baseline():
    assert honesty(summarize(synthetic_runs(), BUDGETS), BUDGETS)["budget_effect_reportable"]
    failed = honesty(summarize(synthetic_runs(plain_at_room=0.75), BUDGETS), BUDGETS)
    assert failed["baseline_ok"] and not failed["plain_ok"] and not failed["budget_effect_reportable"]


def test_gain_counts_only_where_it_exceeds_the_seed_spread():
    gain = fusion_gain(synthetic_runs(), BUDGETS)
    assert gain["line"]["small_n"] == [1, 2] and gain["block"]["small_n"] == [1, 2, 3]
    assert gain["line"]["per_budget"]["1"]["gain"] == pytest.approx(0.3)
    assert fusion_gain(synthetic_runs(fused_gain=0.0), BUDGETS)["line"]["small_n"] == []


def test_fits_use_the_rising_range_of_each_type():
    fits = fit_modes(summarize(synthetic_runs(), BUDGETS), BUDGETS)
    assert fits["fused"]["line"]["rising"]["budgets"] == [1, 2, 3]
    assert fits["fused"]["block"]["rising"]["budgets"] == [1, 2, 3, 4]
    assert "error" in fits["fused"]["cell"]["rising"]  # one budget: a cell answer needs one token
    assert fits["fused"]["line"]["rising"]["alpha"] < 0


def test_printed_fits_flag_the_poor_ones_and_fitting_them_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fits = fit_modes(summarize(synthetic_runs(), BUDGETS), BUDGETS)
    lines = format_fits(fits).splitlines()
    assert lines[0].endswith("poor fit: R2 (log) < 0.9):")
    rising, over_all_n = next(line for line in lines if "question fused, line" in line).split(";  all ")
    assert rising.endswith("R2 (log) = 0.990")  # 0.990 >= 0.9
    assert over_all_n.endswith("R2 (log) = 0.797 (poor fit)")


@pytest.mark.parametrize("module", ["scipy.optimize", "matplotlib.figure"])
def test_a_missing_fitting_or_plotting_library_is_named_with_the_extra_before_any_training(module, tmp_path,
                                                                                          monkeypatch):
    from qfusion.demo import run_demo

    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"the qfusion demo needs '{module}', .*pip install 'qfusion\[demo\]'"):
        run_demo(quick=True, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quick_demo_compressors_learn_above_chance(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert render(results) in printed and format_timing(results) in printed  # what it printed is in the JSON
    assert results["quick"] is True
    chance = results["chance"]
    assert all(0.05 < c < 0.2 for c in chance.values())  # ten digits, about equally frequent
    summary = results["summary"]
    assert set(summary) == {"none", "fused", "plain", "pooled", "random"}
    for mode in ("fused", "plain", "pooled", "random"):
        assert {r["budget"] for r in results["runs"] if r["mode"] == mode} == set(BUDGETS)
    baseline = summary["none"]["all"]
    assert all(baseline[k]["mean"] > chance[k] + 0.6 for k in QUESTION_TYPES)
    # The compressors themselves learn: with room for the answer, well above chance.
    assert summary["fused"]["16"]["cell"]["mean"] > chance["cell"] + 0.4
    assert summary["fused"]["4"]["block"]["mean"] > chance["block"] + 0.3
    assert summary["plain"]["16"]["cell"]["mean"] > chance["cell"] + 0.15
    # and, asked about a line with one token, the fused compressor keeps a cell of that line.
    assert summary["fused"]["1"]["line"]["mean"] > summary["plain"]["1"]["line"]["mean"] + 0.05
    # N random cells hold the asked cell about N/9 of the time: far above chance at N = 6, not at N = 1
    assert summary["random"]["6"]["cell"]["mean"] > summary["random"]["1"]["cell"]["mean"] + 0.3
    # Follow-ups with n = 4 fused tokens answer block questions far better than with n = 1.
    turns = {(row["scheme"], row["m"], row["n"]): row for row in results["conversations"]["summary"]}
    assert {key[0] for key in turns} == {"ask", "afresh", "blind"}
    assert turns["ask", 4, 4]["followups"]["block"]["mean"] > turns["ask", 4, 1]["followups"]["block"]["mean"] + 0.15
    assert [turns["ask", 4, n]["tokens"] for n in (1, 2, 4)] == [7, 10, 16]
    assert set(results["honesty"]) >= {"baseline_ok", "plain_ok", "budget_effect_reportable"}
    assert set(results["fits"]["fused"]) == set(QUESTION_TYPES)
    assert results["cpu_time_s"] > 0 and "CPU cores" in results["machine"]
    assert (tmp_path / "scaling.png").stat().st_size > 1000


def test_baselines_vs_compressors_says_where_a_baseline_beats_or_matches():
    versus = baselines_vs_compressors(synthetic_runs(), BUDGETS)
    # random cells sit at the blind compressor's level, within its spread over seeds: a match at every N
    assert versus["random vs plain"]["matches"] == {str(n): list(QUESTION_TYPES) for n in BUDGETS}
    assert versus["random vs plain"]["beats"] == {}
    # and below the fused compressor where that one is ahead (small N, region questions)
    assert "1" not in versus["random vs fused"]["matches"]
    assert versus["random vs fused"]["per_budget"]["1"]["line"]["verdict"] == "below"
    ahead = baselines_vs_compressors(synthetic_runs(random_offset=0.1), BUDGETS)
    assert ahead["random vs plain"]["beats"] == {str(n): list(QUESTION_TYPES) for n in BUDGETS}
    assert ahead["random vs plain"]["per_budget"]["2"]["cell"]["difference"] == pytest.approx(0.1 - 0.004)
    pooled = baselines_vs_compressors(synthetic_runs(), BUDGETS)["pooled vs plain"]
    assert pooled["beats"] == {} and pooled["matches"] == {}


def test_pooling_averages_fixed_regions_of_the_grid():
    assert [pool_shape(n) for n in (1, 2, 3, 4, 6)] == [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3)]
    cells = torch.randn(2, CELLS, 5)
    grid = cells.view(2, 3, 3, 5)
    torch.testing.assert_close(pool_cells(cells, 1)[:, 0], cells.mean(1))
    torch.testing.assert_close(pool_cells(cells, 3), grid.mean(1))  # one token per column
    blocks = [grid[:, r:r + 2, c:c + 2].mean((1, 2)) for r in (0, 1) for c in (0, 1)]
    torch.testing.assert_close(pool_cells(cells, 4), torch.stack(blocks, 1))  # the four overlapping 2x2 blocks
    assert pool_cells(cells, 9) is cells and pool_cells(cells, 16) is cells
    with pytest.raises(ValueError, match="budget: expected an integer 1 <= N < 9"):
        pool_shape(0)


def test_random_cells_keeps_distinct_cells_of_each_grid():
    cells = torch.arange(4 * CELLS, dtype=torch.float32).view(4, CELLS, 1).expand(-1, -1, 3)
    for n in (1, 4, 9, 16):
        kept = random_cells(cells, n, torch.Generator().manual_seed(n))
        assert kept.shape == (4, min(n, CELLS), 3)
        for grid, row in enumerate(kept[..., 0]):
            ids = row.long().tolist()
            assert len(set(ids)) == len(ids) and all(grid * CELLS <= i < (grid + 1) * CELLS for i in ids)
    draws = {tuple(random_cells(cells, 2, torch.Generator().manual_seed(s))[:, :, 0].flatten().tolist())
             for s in range(5)}
    assert len(draws) > 1  # draws differ with the generator
    with pytest.raises(ValueError, match="budget: expected an integer N >= 1"):
        random_cells(cells, 0, torch.Generator())


def test_conversation_turns_are_m_then_n_fused_tokens_equal_to_the_packed_forward():
    torch.manual_seed(0)
    fusion = QuestionFusion(fusion_config(True, BUDGETS)).eval()
    batch = grids(5, 4)
    cells = torch.randn(5, CELLS, LM_DIM)
    with torch.no_grad():
        turns = conversation(fusion, 4, 2)(cells, batch)
        packed = fusion(cells, batch.question_list(), m=4, n=2).tokens
        fresh = afresh(fusion, 4)(cells, batch)
        equal_budgets = compressed(fusion, 4)(cells, batch)
        same_as_packed = conversation(fusion, 4, 4)(cells, batch)
    assert [t.shape[1] for t in turns] == [4, 2, 2, 2]
    for g, tokens in enumerate(turns):
        torch.testing.assert_close(tokens, torch.stack([sample[g] for sample in packed]))
    # afresh: every question is a first question with m tokens, alone with the cells
    for g, tokens in enumerate(fresh):
        alone = fusion(cells, [[q] for q in batch.questions[:, g]], m=4).tokens
        torch.testing.assert_close(tokens, torch.stack([sample[0] for sample in alone]))
    for a, b in zip(same_as_packed, equal_budgets):
        torch.testing.assert_close(a, b)


def test_conversation_tokens_and_per_turn_accuracy():
    assert scheme_tokens("ask", 4, 1, 4) == 7 and scheme_tokens("afresh", 4, 4, 4) == 16
    assert scheme_tokens("blind", 9, 9, 4) == 9
    with pytest.raises(ValueError, match="scheme: expected one of"):
        scheme_tokens("other", 4, 4, 4)
    scores = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 1.0, 1.0, 1.0]])
    kinds = torch.tensor([[0, 1, 2, 0], [1, 1, 2, 0]])
    result = turn_accuracy(scores, kinds)
    assert result["turn1"] == {"all": 0.5, "cell": 1.0, "line": 0.0, "block": pytest.approx(float("nan"), nan_ok=True)}
    assert result["followups"]["all"] == pytest.approx(3.5 / 6)
    assert result["followups"]["line"] == 0.5 and result["followups"]["block"] == 0.75
    assert result["followups"]["cell"] == 0.5

import json

import numpy as np
import pytest

from qfusion.cli import main
from qfusion.scaling import fit_power_law, load_fits, save_fits, smallest_budget

TOKENS = [16, 36, 64, 144, 256, 576]


@pytest.fixture
def fits_json(tmp_path):
    noise = np.exp(np.random.default_rng(0).normal(0, 0.01, len(TOKENS)))
    fits = {"vqa": fit_power_law(TOKENS, 0.9 * (16 / np.array(TOKENS)) ** -0.08 * noise),
            "pope": fit_power_law(TOKENS, 80 * (16 / np.array(TOKENS)) ** -0.03)}
    return save_fits(fits, tmp_path / "fits.json")


def rows(printed):
    lines = printed.splitlines()
    assert lines[0].split()[:3] == ["series", "target", "N"] and "95% interval" in lines[0]
    return {line.split()[0]: line for line in lines[1:] if not line.startswith("json:")}


def test_budget_prints_the_apis_choice_per_series_and_writes_json(fits_json, tmp_path, capsys):
    out = tmp_path / "budget.json"
    assert main(["budget", str(fits_json), "--max-loss", "0.02", "--bootstrap", "200", "--json", str(out)]) == 0
    printed = rows(capsys.readouterr().out)
    assert set(printed) == {"vqa", "pope"}
    saved = json.loads(out.read_text())
    for name, fit in load_fits(fits_json).items():
        choice = smallest_budget(fit, max_loss=0.02, n_bootstrap=200)
        low, high = choice.interval
        assert printed[name].split()[2] == str(choice.num_tokens)
        assert f"[{low}, {high}]" in printed[name]
        assert saved[name]["num_tokens"] == choice.num_tokens and saved[name]["interval"] == [low, high]


def test_budget_for_a_target_score_on_chosen_series_flags_extrapolation(fits_json, capsys):
    assert main(["budget", str(fits_json), "--target", "1.2", "--series", "vqa", "--bootstrap", "50"]) == 0
    printed = rows(capsys.readouterr().out)
    assert set(printed) == {"vqa"}
    assert int(printed["vqa"].split()[2]) > max(TOKENS) and printed["vqa"].endswith("extrapolated")


def test_budget_reads_what_qfusion_fit_writes(tmp_path, capsys):
    csv = tmp_path / "scores.csv"
    csv.write_text("tokens,score\n" + "".join(f"{n},{0.5 * n ** 0.1:.6f}\n" for n in TOKENS))
    assert main(["fit", str(csv), "--json", str(tmp_path / "fit.json")]) == 0
    capsys.readouterr()
    assert main(["budget", str(tmp_path / "fit.json"), "--max-loss", "0.05"]) == 0
    assert set(rows(capsys.readouterr().out)) == {"score"}


def test_max_loss_target_on_flat_data_is_relative_to_the_measured_score(tmp_path, capsys):
    # Rising up to N = 4, flat from there: the law overshoots at N = 16 (48.97), no measured score exceeds 45.3.
    csv = tmp_path / "flat.csv"
    csv.write_text("tokens,score\n1,30.0\n2,38.5\n4,44.9\n8,45.3\n16,45.1\n")
    assert main(["fit", str(csv), "--json", str(tmp_path / "fits.json")]) == 0
    capsys.readouterr()
    assert main(["budget", str(tmp_path / "fits.json"), "--max-loss", "0.02", "--bootstrap", "200"]) == 0
    printed = capsys.readouterr().out
    row = rows(printed)["score"]
    assert float(row.split()[1]) == pytest.approx(0.98 * 45.1, abs=5e-3)  # printed to 4 digits: 44.2
    assert row.split()[2] == "8"
    # R² 0.752: the law is a poor description of these points, and the row says so.
    assert row.endswith("poor fit (R2 0.752)")
    assert printed.splitlines()[-1] == ("poor fit: R2 (log) below 0.9; N comes from a law that does not describe "
                                        "the measured points closely: check it against them")


def test_a_fits_file_without_measured_points_takes_a_target_but_not_a_relative_loss(fits_json, capsys):
    data = json.loads(fits_json.read_text())
    for fit in data.values():  # as qfusion fit --json wrote them before the points were kept
        del fit["num_tokens"], fit["scores"]
    fits_json.write_text(json.dumps(data))
    assert main(["budget", str(fits_json), "--target", "1.0", "--series", "vqa"]) == 0
    assert rows(capsys.readouterr().out)["vqa"].endswith("fit has no points: no interval")
    assert main(["budget", str(fits_json), "--max-loss", "0.02"]) == 1
    err = capsys.readouterr().err
    assert f"qfusion budget: --max-loss: the fits of series ['vqa', 'pope'] in {str(fits_json)!r} carry no " in err
    assert "refit them with qfusion fit, or give --target" in err


@pytest.mark.parametrize("argv, message", [
    (["--max-loss", "0.02", "--series", "gqa"], "qfusion budget: --series: no series ['gqa']"),
    (["--max-loss", "1.5"], "qfusion budget: max_loss: expected a fraction in [0, 1), got 1.5"),
    (["--target", "-1"], "qfusion budget: target: expected a finite score > 0"),
])
def test_budget_reports_bad_input_without_a_traceback(fits_json, argv, message, capsys):
    assert main(["budget", str(fits_json), *argv]) == 1
    assert message in capsys.readouterr().err


def test_output_files_in_a_missing_directory_are_refused_before_any_work(fits_json, tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["budget", str(fits_json), "--max-loss", "0.02", "--json", str(missing / "b.json")]) == 1
    assert f"qfusion budget: --json: no directory {str(missing)!r}" in capsys.readouterr().err
    csv = tmp_path / "scores.csv"
    csv.write_text("tokens,score\n16,0.5\n64,0.6\n256,0.7\n")
    assert main(["fit", str(csv), "--plot", str(missing / "fit.png")]) == 1
    captured = capsys.readouterr()
    assert f"qfusion fit: --plot: no directory {str(missing)!r}" in captured.err and captured.out == ""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "what", "chosen": "blue", "rejected": "red"}\n')
    # The model directory does not exist either: the check comes first, so the model is never loaded.
    assert main(["divergence", "--model", str(tmp_path / "no-model"), "--pairs", str(pairs),
                 "--json", str(missing / "div.json")]) == 1
    assert f"qfusion divergence: --json: no directory {str(missing)!r}" in capsys.readouterr().err
    assert not missing.exists()


def test_budget_needs_exactly_one_goal_and_a_readable_file(fits_json, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["budget", str(fits_json)])
    with pytest.raises(SystemExit):
        main(["budget", str(fits_json), "--target", "1", "--max-loss", "0.1"])
    assert main(["budget", str(tmp_path / "missing.json"), "--target", "1"]) == 1
    assert "qfusion budget:" in capsys.readouterr().err


def test_docs_budget_block_prints_what_the_api_gives(capsys):
    from readme_blocks import python_blocks

    (block,) = [b for b in python_blocks("Scaling analysis", "docs/scaling.md") if "max_loss=0.05" in b]
    exec(compile(block, "docs/scaling.md (Scaling analysis)", "exec"), {})
    fit = fit_power_law([16, 64, 256, 576], [0.60, 0.72, 0.86, 0.94])
    choice = smallest_budget(fit, max_loss=0.05)
    expected = f"{choice.num_tokens} {choice.interval} {round(choice.target, 3)} {choice.extrapolated}"
    printed = capsys.readouterr().out.strip()
    assert printed == expected
    assert block.rstrip().endswith(f"# {expected}")  # the comment on the page shows the real output

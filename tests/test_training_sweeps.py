"""qfusion.training.sweeps: each mode fine-tuned from a stage-2 plugin of its own mode, every budget evaluated,
one comparison of both modes and the baselines (table, fits, plot) that `qfusion budget` reads."""

import json

import pytest
from training_workspace import settings

from qfusion import cli
from qfusion.scaling import load_fits
from qfusion.training import sweep, train
from qfusion.training.card import read_stages
from qfusion.training.config import TrainConfig, build_config
from qfusion.training.sweeps import sweep_budgets


def config(root, **changes) -> TrainConfig:
    values = settings(root, stage="sweep", **changes)
    values["optim"].update(max_steps=8, lr=1e-3)
    values["eval"].update(batch_size=16, data=str(root / "train.jsonl"))
    values["sweep"] = {"budgets": [1, 2, 4], "fraction": 1.0, "bootstrap": 20}
    return build_config(TrainConfig, values)


def test_sweep_trains_each_mode_from_its_own_base_and_writes_one_comparison(colour_workspace, capsys):
    root = colour_workspace
    out = root / "sweep"
    summary = sweep(config(root, output_dir=str(out)))
    names = ["question/m1-n1", "question/m2-n2", "question/m4-n2", "no_question/m1-n1", "no_question/m2-n2",
             "no_question/m4-n2"]
    assert [run["name"] for run in summary["runs"]] == names
    for mode in ("question", "no_question"):
        base = json.loads((out / mode / "base" / "config.json").read_text())
        assert base["use_question"] is (mode == "question")
    for run in summary["runs"]:
        stages = read_stages(out / run["name"])
        # the no-question mode never borrows a plugin trained with the question
        assert [(s["stage"], s["mode"]) for s in stages] == [("generate", run["mode"])] * 2
        assert stages[-1]["budgets"] == [[run["m"], run["n"]]]
        evaluation = json.loads((out / run["name"] / "eval.json").read_text())
        assert [(b["m"], b["n"]) for b in evaluation["budgets"]] == [(run["m"], run["n"])]
        assert set(run["scores"]) == ({"plugin", "avg_pool", "random"} if run["mode"] == "question" else {"plugin"})
    rows = {(r["m"], r["n"]): r for r in summary["comparison"]}
    assert list(rows) == [(1, 1), (2, 2), (4, 2)]
    assert all(set(r) == {"m", "n", "question", "no_question", "avg_pool", "random"} for r in rows.values())
    by_name = {run["name"]: run for run in summary["runs"]}
    assert rows[(2, 2)]["no_question"] == by_name["no_question/m2-n2"]["scores"]["plugin"]["all"]["vqa_match"]
    table = summary["table"].splitlines()
    assert table[1].split() == ["m", "n", "question", "avg_pool", "random", "no_question"]
    assert [line.split(":")[0] for line in table[5:]] == ["question", "avg_pool", "random", "no_question"]
    assert summary["poor_fits"] == sorted(name for name, fit in summary["fits"].items() if fit["r2"] < 0.9)
    fits = load_fits(out / "fits.json")  # what `qfusion budget` reads
    assert set(fits) | set(summary["unfitted"]) == {
        f"{series}{kind}" for series in ("question", "no_question", "avg_pool", "random")
        for kind in ("", ":color", ":yesno")}
    for series, fit in fits.items():
        assert list(fit.num_tokens) == [1.0, 2.0, 4.0], series
    assert (out / "scaling.png").stat().st_size > 0 and (out / "scores.csv").is_file()
    fitted = [name for name in fits if ":" not in name]
    assert fitted  # on this data every main series follows a law; a series without one is left out with the reason
    assert cli.main(["budget", str(out / "fits.json"), "--max-loss", "0.1", "--bootstrap", "20",
                     "--series", *fitted]) == 0
    assert fitted[0] in capsys.readouterr().out


def test_a_given_base_plugin_must_be_of_its_mode(colour_workspace):
    root = colour_workspace
    question = root / "base-with-question"
    values = settings(root, stage="generate", output_dir=str(question))
    values["optim"]["max_steps"] = 1
    train(build_config(TrainConfig, values))
    wrong = config(root, output_dir=str(root / "sweep-wrong")).replace(sweep={"plugins": {"no_question": str(question)}})
    with pytest.raises(ValueError, match=r"sweep.plugins.no_question: .* was trained with use_question=True; the "
                                         "no_question mode needs a plugin of its own mode"):
        sweep(wrong)
    assert sweep_budgets(wrong) == [(1, 1), (2, 2), (4, 2)]
    with pytest.raises(ValueError, match=r"sweep.budgets\[1\]: expected m <= codebook_size=16, got m=32"):
        sweep_budgets(wrong.replace(sweep={"budgets": [4, 32]}))

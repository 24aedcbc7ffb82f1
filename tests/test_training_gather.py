"""qfusion.training: with several processes the align stage contrasts every process's question groups
(``align.gather_negatives``), so two processes with micro-batches of 2 train like one process with
micro-batches of 4: the same losses and final weights (the identity loss, which stays per process, is
off here). The records are streamed in file order, laid out so that one step leaves one process with
no visual record (it still joins the gather) and another leaves every process without one. Without
gathering, each process contrasts only its own groups and the losses differ. The generation stage
(the plugin alone trains) runs the same steps in two processes like one: a process whose micro-batch
reaches no trained weight still takes part in the gradient reduction."""

import json

import pytest
import torch
from test_training_trainer import RUNNER, finish, start, weights
from training_workspace import metrics

ALIGN = {"identity_weight": 0.0}


def steps_of_records(workspace):
    """32 records, 4 a step: step 1 two visual then two text-only, step 2 four text-only, steps 3-8 visual."""
    records = [json.loads(line) for line in (workspace / "mixed.jsonl").read_text().splitlines()]
    visual = [r for r in records if "image" in r]
    text = [r for r in records if "image" not in r]
    assert len(visual) == 24 and len(text) == 4
    return visual[:2] + text[:2] + text + visual + visual[:2]


@pytest.fixture(scope="module")
def align_runs(colour_workspace, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gather")
    runner = folder / "runner.py"
    runner.write_text(RUNNER)
    data = folder / "laid-out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in steps_of_records(colour_workspace)))
    common = {"stage": "align", "grad_accum": 1, "data": {"train": str(data), "streaming": True}}
    generate = {**common, "stage": "generate"}
    runs = {"one": start(folder, runner, colour_workspace, "one", batch_size=4, align=ALIGN, **common),
            "generate-one": start(folder, runner, colour_workspace, "generate-one", batch_size=4, **generate),
            "generate-two": start(folder, runner, colour_workspace, "generate-two", processes=2, **generate),
            "two": start(folder, runner, colour_workspace, "two", processes=2, align=ALIGN, **common),
            "two-local": start(folder, runner, colour_workspace, "two-local", processes=2,
                               align={**ALIGN, "gather_negatives": False}, **common)}
    for name, process in runs.items():
        code, output = finish(process)
        assert code == 0, f"{name}: {output[-3000:]}"
    return folder


def test_two_processes_contrast_like_one_process_with_the_whole_batch(align_runs):
    one, two = metrics(align_runs / "one"), metrics(align_runs / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 9))
    assert one[1]["loss"] == 0.0  # step 2: no visual record anywhere, nothing to align
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
    expected, got = weights(align_runs / "one"), weights(align_runs / "two")
    assert all(torch.allclose(got[k], expected[k], rtol=1e-4, atol=1e-6) for k in expected)


def test_without_gathering_each_process_contrasts_only_its_own_groups(align_runs):
    one, local = metrics(align_runs / "one"), metrics(align_runs / "two-local")
    assert [r["step"] for r in local] == list(range(1, 9))
    assert any(b["loss"] != pytest.approx(a["loss"], rel=1e-3) for a, b in zip(one, local))


def test_a_process_whose_records_reach_no_trained_weight_still_trains_in_step(align_runs):
    one, two = metrics(align_runs / "generate-one"), metrics(align_runs / "generate-two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 9))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
    expected, got = weights(align_runs / "generate-one"), weights(align_runs / "generate-two")
    assert all(torch.allclose(got[k], expected[k], rtol=1e-4, atol=1e-6) for k in expected)

"""qfusion.training: a run over a streamed data set (``data.streaming``), killed and resumed, continues the
stream where it stopped: the same losses, budget draws and final weights as an uninterrupted streamed run.

The stream is read in file order, and ``mixed.jsonl`` ends with its text-only records: the 7th step's
first micro-batch holds only text-only records, which reach no trained weight of a plugin-only run.
"""

import json
import signal

import pytest
from test_training_trainer import RUNNER, assert_same_run, finish, start
from training_workspace import metrics


@pytest.fixture(scope="module")
def streamed(colour_workspace, tmp_path_factory):
    folder = tmp_path_factory.mktemp("streamed")
    runner = folder / "runner.py"
    runner.write_text(RUNNER)
    stream = {"streaming": True}
    first = {"reference": start(folder, runner, colour_workspace, "reference", data=stream),
             "killed": start(folder, runner, colour_workspace, "killed", "SIGKILL@5", data=stream)}
    codes = {name: finish(process) for name, process in first.items()}
    assert codes["reference"][0] == 0, codes["reference"][1][-3000:]
    assert codes["killed"][0] == -signal.SIGKILL, codes["killed"][1][-3000:]
    killed_steps = [r["step"] for r in metrics(folder / "killed")]
    code, output = finish(start(folder, runner, colour_workspace, "killed", resume=True, data=stream))
    assert code == 0, output[-3000:]
    return folder, killed_steps


def test_a_micro_batch_of_text_only_records_trains_on(colour_workspace, streamed):
    folder, _ = streamed
    records = [json.loads(line) for line in (colour_workspace / "mixed.jsonl").read_text().splitlines()]
    assert len(records) == 28 and not any("image" in r or "video" in r for r in records[24:26])
    assert [r["step"] for r in metrics(folder / "reference")] == list(range(1, 9))


def test_a_killed_streamed_run_resumes_where_the_stream_stopped(streamed):
    folder, killed_steps = streamed
    assert killed_steps == [1, 2, 3, 4]
    assert_same_run(folder, "killed")

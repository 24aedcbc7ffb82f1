"""qfusion.training.trainer: exact, crash-safe resume and distributed training, each run in its own process.

One uninterrupted elastic run (1 process, micro-batch 2, 2 micro-batches per step, 8 steps over more
than one epoch, checkpoints every 2 steps, text-only records in the mix) is the reference. A run
killed with SIGKILL or SIGTERM at a step, or with SIGKILL inside a checkpoint save (after the model
file, before the optimizer file), and resumed, logs every step once with the reference's losses and
budgets and ends with its weights; two processes with micro-batch 2 and no accumulation (the same
samples per step) train and evaluate like it.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from training_workspace import metrics, settings

from qfusion.training import load_config
from qfusion.training.run import resume_point

RUNNER = """
import os, signal, sys
import yaml
from transformers import Trainer, TrainerCallback
from qfusion.training import QFusionTrainer, evaluate, load_config, train

config_file, kill = sys.argv[1], sys.argv[2]
if kill.startswith("save@"):  # killed inside the checkpoint save: after the model file, before the optimizer's
    step, save = int(kill[5:]), Trainer._save_optimizer_and_scheduler
    def die_in_save(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return save(self, output_dir)
    Trainer._save_optimizer_and_scheduler = die_in_save
elif kill != "none":
    name, step = kill.split("@")
    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(step):
                os.kill(os.getpid(), getattr(signal, name))
    setup = QFusionTrainer.__init__
    def with_kill(self, *args, **kwargs):
        setup(self, *args, **kwargs)
        self.add_callback(Kill())
    QFusionTrainer.__init__ = with_kill
config = load_config([config_file])
train(config)
if len(sys.argv) > 3:
    evaluate(config.replace(stage="eval", plugin=config.output_dir, output_dir=sys.argv[3]))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(folder, runner, workspace, name, kill="none", *, resume=False, processes=1, grad_accum=2, eval_dir=None,
          data=None, stage="elastic", batch_size=2, align=None):
    """Start one training run in its own process(es); returns the Popen. data, align: more settings."""
    values = settings(workspace, stage=stage, output_dir=str(folder / name), resume=resume,
                      elastic={"budgets": [1, 2, 4]}, data={"train": str(workspace / "mixed.jsonl"),
                                                           "image_root": str(workspace), **(data or {})},
                      align=align or {})
    values["optim"].update(batch_size=batch_size, grad_accum=grad_accum, max_steps=8, lr=1e-3)
    values["log"].update(save_every=2, save_total_limit=None)
    values["eval"].update(baselines=["random"])
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    launcher = [sys.executable] if processes == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                       "--nproc_per_node", str(processes), "--master_port", str(free_port())]
    command = launcher + [str(runner), str(path), kill] + ([str(folder / eval_dir)] if eval_dir else [])
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def finish(process) -> tuple[int, str]:
    output, _ = process.communicate(timeout=900)
    return process.returncode, output


KILLS = {"killed-SIGKILL": "SIGKILL@5", "killed-SIGTERM": "SIGTERM@3", "killed-in-save": "save@4"}


@pytest.fixture(scope="module")
def runs(colour_workspace, tmp_path_factory):
    """Every run of this module, the independent ones side by side: the reference, the killed runs and the
    two-process run; then the killed runs resumed. Returns the runs' folder and, per killed run, what was
    there between the kill and the resume."""
    folder = tmp_path_factory.mktemp("runs")
    runner = folder / "runner.py"
    runner.write_text(RUNNER)
    first = {"reference": start(folder, runner, colour_workspace, "reference", eval_dir="reference-eval"),
             "two-processes": start(folder, runner, colour_workspace, "two-processes", processes=2, grad_accum=1,
                                    eval_dir="two-processes-eval"),
             **{name: start(folder, runner, colour_workspace, name, kill) for name, kill in KILLS.items()}}
    codes = {name: finish(process) for name, process in first.items()}
    for name in ("reference", "two-processes"):
        assert codes[name][0] == 0, codes[name][1][-3000:]
    killed = {}
    for name in KILLS:
        out = folder / name
        config = load_config([str(folder / f"{name}.yaml")], ["resume=true"])
        killed[name] = {"returncode": codes[name][0], "steps": [r["step"] for r in metrics(out)],
                        "checkpoints": sorted(p.name for p in out.glob("checkpoint-*")),
                        "staged": sorted(p.name for p in (out / ".staging").glob("*/*")),
                        "resumes_from": resume_point(config), "kept": [r["step"] for r in metrics(out)]}
    resumed = {name: start(folder, runner, colour_workspace, name, resume=True) for name in KILLS}
    for name, process in resumed.items():
        code, output = finish(process)
        assert code == 0, output[-3000:]
    return folder, killed


def weights(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


def assert_same_run(folder, name):
    reference, resumed = metrics(folder / "reference"), metrics(folder / name)
    assert [r["step"] for r in resumed] == list(range(1, 9))  # each step logged once
    for a, b in zip(reference, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7), a["step"]
        assert b["budgets"] == a["budgets"]  # the data order and the budget draws continue
    expected, got = weights(folder / "reference"), weights(folder / name)
    assert all(torch.allclose(got[k], expected[k], rtol=1e-5, atol=1e-7) for k in expected)


@pytest.mark.parametrize(("signal_name", "step"), [("SIGKILL", 5), ("SIGTERM", 3)])
def test_a_killed_run_resumes_to_the_same_losses_and_weights(runs, signal_name, step):
    folder, killed = runs
    name = f"killed-{signal_name}"
    state = killed[name]
    assert state["returncode"] == -getattr(signal, signal_name)
    assert state["steps"] == list(range(1, step))  # killed before it logged its step
    assert state["resumes_from"] == str(folder / name / f"checkpoint-{step - 1 - (step - 1) % 2}")
    assert_same_run(folder, name)


def test_a_kill_during_a_checkpoint_save_resumes_from_the_last_complete_checkpoint(runs):
    folder, killed = runs
    name = "killed-in-save"
    state = killed[name]
    assert state["returncode"] == -signal.SIGKILL and state["steps"] == [1, 2, 3, 4]
    assert state["checkpoints"] == ["checkpoint-2"]  # step 4's never became one
    assert "model.safetensors" in state["staged"] and "optimizer.pt" not in state["staged"]
    assert state["resumes_from"] == str(folder / name / "checkpoint-2")
    assert state["kept"] == [1, 2]  # steps 3 and 4 are logged again, once
    assert not (folder / name / ".staging").exists()
    assert_same_run(folder, name)


def test_two_processes_train_and_evaluate_like_one_process(runs):
    folder, _ = runs
    reference, both = metrics(folder / "reference"), metrics(folder / "two-processes")
    assert [r["step"] for r in both] == list(range(1, 9))
    for a, b in zip(reference, both):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
        assert b["budgets"] == a["budgets"][:1]  # process 0's micro-batch: the first of the reference's step
    expected, got = weights(folder / "reference"), weights(folder / "two-processes")
    assert all(torch.allclose(got[k], expected[k], rtol=1e-4, atol=1e-6) for k in expected)
    alone = json.loads((folder / "reference-eval" / "eval.json").read_text())
    shared = json.loads((folder / "two-processes-eval" / "eval.json").read_text())
    assert len(shared["predictions"]["m4-n2"]["plugin"]) == 16
    assert shared["predictions"] == alone["predictions"] and shared["budgets"] == alone["budgets"]

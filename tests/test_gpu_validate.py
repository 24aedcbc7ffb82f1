"""``benchmarks/gpu_validate.py`` runs end to end under the Triton interpreter on tiny sizes.

The script is meant for one short GPU visit; here its ``--smoke`` mode checks that every stage
runs, records its result in the one JSON file, and that the deadline and per-stage error handling
work, so a GPU visit is not wasted on a harness bug.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the validation script drives the Triton kernel")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_validate.py"


def run_script(*args, timeout=600):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_smoke_run_completes_every_stage(tmp_path):
    out = tmp_path / "validate.json"
    done = run_script("--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    stages = result["stages"]
    assert [s for s in stages] == ["S0", "S1", "S2", "S3", "S4", "S5"]
    assert {name: stage["status"] for name, stage in stages.items()} == {name: "ok" for name in stages}
    assert stages["S0"]["matmul_peak_tflops"] and stages["S0"]["triton"]
    assert stages["S0"]["host_libraries_loaded"] == []  # runs with torch and triton alone
    assert stages["S1"]["compiled"] >= 1 and stages["S1"]["problems"] == []
    assert stages["S2"]["passed"] == stages["S2"]["total"] >= 6
    assert {r["case"] for r in stages["S2"]["rows"]} >= {"ragged", "ask", "no-key rows", "d=80"}
    timed = [r for r in stages["S3"]["rows"] if r["impl"] == "triton" and "fwd+bwd_ms" in r]
    assert {r["policy"] for r in timed} == {"causal", "prefix", "grouped"} and any(r["length"] for r in timed)
    assert all("error" not in r for r in stages["S4"]["rows"])
    assert {g["goal"] for g in stages["S5"]["goals"]} >= {"fusion fwd+bwd vs sdpa padded", "causal fwd+bwd vs varlen"}
    assert not list(tmp_path.glob("*.tmp")), "the JSON is written atomically"


def test_deadline_drops_the_last_stages_first_and_the_summary_still_runs(tmp_path):
    out = tmp_path / "validate.json"
    done = run_script("--stages", "S0,S2,S3,S5", "--budget", "25", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    status = {name: stage["status"] for name, stage in json.loads(out.read_text())["stages"].items()}
    assert status == {"S0": "ok", "S2": "dropped: deadline", "S3": "dropped: deadline", "S5": "ok"}


def load_script():
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_validate

    return gpu_validate


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the script in-process under the interpreter")
def test_a_failing_stage_is_recorded_and_the_next_stage_runs(tmp_path, monkeypatch):
    gpu_validate = load_script()

    def broken(ctx):
        raise ZeroDivisionError("stage bug")

    monkeypatch.setitem(gpu_validate.RUNNERS, "S0", broken)
    out = tmp_path / "validate.json"
    result = gpu_validate.main(["--smoke", "--stages", "S0,S5", "--out", str(out)])
    assert result["stages"]["S0"]["status"] == "error" and "ZeroDivisionError: stage bug" in result["stages"]["S0"]["error"]
    assert json.loads(out.read_text())["stages"]["S5"]["status"] == "ok"


def test_unknown_stage_names_are_refused(capsys):
    with pytest.raises(SystemExit):
        load_script().main(["--smoke", "--stages", "S0,S9"])
    assert "--stages: expected names from" in capsys.readouterr().err

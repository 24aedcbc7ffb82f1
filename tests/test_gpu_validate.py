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
import torch

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
    assert [s for s in stages] == ["S0", "S1", "S2", "S3", "S4", "S5", "S6"]
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
    assert_ttft_stage(stages["S6"], done.stdout)
    assert not list(tmp_path.glob("*.tmp")), "the JSON is written atomically"


def assert_ttft_stage(stage: dict, stdout: str):
    """S6 timed both hosts alone and with the plugin at both budgets, and its rows add up."""
    text = sum(stage["text_tokens"].values())
    markers = {"llava": 0, "qwen2_5_vl": 2}  # Qwen's run stands between vision start / end tokens
    assert stage["budgets"] == [8, 4] and set(stage["hosts"]) == set(markers)
    for host, info in stage["hosts"].items():
        assert info["status"] == "ok" and info["attn_implementation"] == dict(llm="sdpa", vision="sdpa", fusion="sdpa")
        assert info["fusion_params"] > info["fusion_params_outside_embeddings"] > 0 and info["llm_params"] > 0
        rows = {(r["case"], r["N"]): r for r in stage["rows"] if r["host"] == host}
        assert set(rows) == {("host", info["vision_tokens"]), ("qfusion", 8), ("qfusion", 4)}
        for (case, count), row in rows.items():
            assert row["llm_tokens"] == 1 + text + markers[host] + count  # bos, the text, the run
            assert set(row["parts_ms"]) == ({"vision", "llm"} if case == "host" else {"vision", "fusion", "llm"})
            assert 0 < sum(row["parts_ms"].values()) <= row["ttft_ms"] and row["ttft_best_ms"] <= row["ttft_ms"]
            host_ms = rows["host", info["vision_tokens"]]["ttft_ms"]
            assert row["speedup"] == pytest.approx(host_ms / row["ttft_ms"])
    assert "speed-up" in stdout and "qwen2_5_vl  qfusion" in stdout


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


def test_looping_stages_leave_the_reserves_of_the_requested_later_stages(tmp_path):
    gpu_validate = load_script()
    ctx = gpu_validate.Context(True, gpu_validate.Deadline(100), tmp_path / "unused.json", requested=("S0", "S3", "S6"))
    reserve = gpu_validate.STAGE_RESERVE
    assert ctx.reserve_after("S1") == reserve["S3"] + reserve["S6"] > 0
    assert ctx.reserve_after("S3") == reserve["S6"] and ctx.reserve_after("S6") == 0


def load_host_ttft():
    sys.path.insert(0, str(SCRIPT.parent))
    import host_ttft

    return host_ttft


def test_ttft_stage_drops_hosts_the_deadline_cannot_fit():
    result = load_host_ttft().run("smoke", "cpu", torch.float32, rounds=1, fusion_impl="sdpa", left=lambda: 10.0,
                                  host_reserve_s=40.0)
    assert result["hosts"] == {name: {"status": "dropped: deadline"} for name in ("llava", "qwen2_5_vl")}
    assert result["rows"] == []


def test_ttft_fused_run_takes_the_positions_qfusion_attach_gives_it():
    # Qwen's M-RoPE: a run of k fused tokens at position p is a 1 x k grid (temporal and height p,
    # width p .. p+k-1) and the text after it goes on at p+k, as the adapter's rule says.
    host_ttft = load_host_ttft()
    host = host_ttft.QwenHost("smoke", "cpu", torch.float32, torch.Generator().manual_seed(0))
    config = host.model.config
    for count in (5, host.vision_tokens):
        ids, start = host.prompt(count)
        assert (ids[0, start:start + count] == config.image_token_id).all()
        assert ids[0, start - 1] == config.vision_start_token_id and ids[0, start + count] == config.vision_end_token_id
    ids, start = host.prompt(5)
    positions = host.positions(ids, 5, fused=True)[:, 0]  # (3, L)
    assert positions[:, :start].tolist() == [list(range(start))] * 3
    assert positions[0, start:start + 5].tolist() == [start] * 5 == positions[1, start:start + 5].tolist()
    assert positions[2, start:start + 5].tolist() == list(range(start, start + 5))
    assert positions[:, start + 5].tolist() == [start + 5] * 3
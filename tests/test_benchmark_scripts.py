"""The benchmark scripts run as shipped (tiny shapes here; the numbers come from their own runs)."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name: str, monkeypatch):
    spec = importlib.util.spec_from_file_location(f"qfusion_benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_forward_benchmark_runs_and_writes_its_json(tmp_path, monkeypatch, capsys):
    bench = load("bench_forward", monkeypatch)
    out = tmp_path / "forward.json"
    result = bench.main(["--vision", "16", "--question", "4", "--m", "2", "--n", "1", "--repeats", "1",
                         "--impls", "eager", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    assert [row["case"] for row in written["rows"]] == [
        "forward, 1 question (eager)", "forward, 2 questions packed (sdpa)", "start (vision prefix only)",
        "ask follow-up on cached prefix"]
    assert all(row["seconds"] > 0 for row in written["rows"])
    assert "ask follow-up on cached prefix" in capsys.readouterr().out

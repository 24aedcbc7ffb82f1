import json

import pytest

pytest.importorskip("sklearn", reason="the demo needs pip install 'qfusion[demo]'")

from qfusion.cli import main  # noqa: E402


def test_quick_demo_writes_results_and_plot_and_the_reader_learns(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy on unseen handwriting" in printed and "honesty check" in printed
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] is True
    assert set(results["summary"]) == {"fused", "plain"}
    assert set(results["honesty"]) >= {"baseline_ok", "plain_ok", "budget_effect_reportable"}
    baseline = [r for r in results["runs"] if r["mode"] == "none"]
    assert baseline and baseline[0]["accuracy"]["cell"] > 0.8  # chance is 0.1
    for mode in ("fused", "plain"):
        budgets = {r["budget"] for r in results["runs"] if r["mode"] == mode}
        assert budgets == {1, 2, 4, 8, 16}
    assert (tmp_path / "scaling.png").stat().st_size > 1000

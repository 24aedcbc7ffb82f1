"""qfusion.scaling.optional: scipy and matplotlib are needed only where used; a missing one names the extra."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qfusion.scaling.optional import EXTRA, require

ROOT = Path(__file__).resolve().parents[1]


def test_scaling_runs_without_scipy_and_matplotlib_until_a_fit_or_a_figure_needs_them(tmp_path):
    # A fresh interpreter in which neither library can be imported, as after a plain install.
    script = textwrap.dedent(f"""
        import sys
        for name in ("scipy", "matplotlib"):
            sys.modules[name] = None
        import numpy as np
        import pytest
        import qfusion, qfusion.cli, qfusion.scaling
        from qfusion.scaling import (PowerLawFit, divergence_statistics, fit_power_law, load_fits, plot_divergence,
                                     plot_scaling, save_fits, smallest_budget)

        fit = PowerLawFit(n_c=10.0, alpha=-0.5, beta=-0.5 * np.log(10.0), r2=1.0, r2_score_space=1.0,
                          alpha_ci=(-0.5, -0.5), num_points=3, num_tokens=(10.0, 40.0, 90.0), scores=(1.0, 2.0, 3.0))
        path = {str(tmp_path / "fits.json")!r}
        assert load_fits(save_fits({{"a": fit}}, path)) == {{"a": fit}}
        assert smallest_budget(fit, target=2.0, n_bootstrap=0).num_tokens == 40
        result = divergence_statistics([np.eye(3)])
        needs = (r"needs {{}}, which is not installed; it comes with qfusion's 'scaling' extra: "
                 r"pip install 'qfusion\\[scaling\\]'")
        with pytest.raises(ImportError, match="fitting the power law " + needs.format("scipy")):
            fit_power_law([10, 40, 90], [1.0, 2.0, 3.0])
        with pytest.raises(ImportError, match="fitting the power law " + needs.format("scipy")):
            smallest_budget(fit, target=2.0, n_bootstrap=10)
        with pytest.raises(ImportError, match="plot_scaling " + needs.format("matplotlib")):
            plot_scaling({{"a": ([10, 40, 90], [1.0, 2.0, 3.0], fit)}}, {str(tmp_path / "a.png")!r})
        with pytest.raises(ImportError, match="plot_divergence " + needs.format("matplotlib")):
            plot_divergence(result, {str(tmp_path / "b.png")!r})
        assert sys.modules["scipy"] is None and sys.modules["matplotlib"] is None
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()


def test_cli_reports_a_missing_optional_library_before_doing_the_work(tmp_path, monkeypatch, capsys):
    from qfusion.cli import main

    csv = tmp_path / "scores.csv"
    csv.write_text("tokens,score\n16,0.5\n64,0.6\n256,0.7\n")
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    assert main(["fit", str(csv), "--json", str(tmp_path / "fit.json")]) == 1
    assert "qfusion fit: fitting the power law needs scipy, which is not installed" in capsys.readouterr().err
    assert not (tmp_path / "fit.json").exists()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["fit", str(csv), "--plot", str(tmp_path / "fit.png")]) == 1
    assert "qfusion fit: qfusion fit --plot needs matplotlib" in capsys.readouterr().err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "what", "chosen": "blue", "rejected": "red"}\n')
    # The model directory does not exist: the check comes first, so the model is never loaded.
    assert main(["divergence", "--model", str(tmp_path / "no-model"), "--pairs", str(pairs),
                 "--plot", str(tmp_path / "div.png")]) == 1
    assert "qfusion divergence: qfusion divergence --plot needs matplotlib" in capsys.readouterr().err


def test_require_names_the_extra_only_when_the_module_itself_is_missing(tmp_path, monkeypatch):
    assert require("json", "reading") is sys.modules["json"]
    with pytest.raises(ImportError, match=rf"the thing needs qfusion_absent_library, .* 'qfusion\[{EXTRA}\]'"):
        require("qfusion_absent_library.sub", "the thing")
    # Installed but broken (one of its own dependencies is missing): its own error, not the extra.
    broken = tmp_path / "qfusion_broken_library"
    broken.mkdir()
    (broken / "__init__.py").write_text("import qfusion_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="qfusion_absent_dependency") as error:
        require("qfusion_broken_library", "the thing")
    assert EXTRA not in str(error.value)

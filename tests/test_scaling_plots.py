"""qfusion.scaling.plots: scaling series and branch divergence drawn to image files."""

import html
import re

import matplotlib
import numpy as np
import pytest

from qfusion.scaling import divergence_statistics, fit_power_law, plot_divergence, plot_scaling

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKENS = np.array([36.0, 64.0, 144.0, 256.0, 576.0, 1024.0, 2304.0])


def law(n_c, alpha, num_tokens=TOKENS):
    return (n_c / np.asarray(num_tokens, dtype=np.float64)) ** alpha


def test_plot_scaling_writes_a_png_with_two_series_and_keeps_the_backend(tmp_path):
    backend = matplotlib.get_backend()
    fitted = fit_power_law(TOKENS, law(5.0, -0.3), n_bootstrap=0)
    path = plot_scaling({"given fit": (TOKENS, law(5.0, -0.3), fitted), "fitted here": (TOKENS, law(9.0, -0.1))},
                        tmp_path / "scaling.png", title="two series")
    assert path == tmp_path / "scaling.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    assert matplotlib.get_backend() == backend
    with pytest.raises(TypeError, match=r"series\['bad'\]: expected \(num_tokens, scores\)"):
        plot_scaling({"bad": TOKENS}, tmp_path / "bad.png")
    with pytest.raises(TypeError, match=r"series\['bad'\]: expected a PowerLawFit"):
        plot_scaling({"bad": (TOKENS, law(5.0, -0.3), {"alpha": -0.3})}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="series: expected at least one series"):
        plot_scaling({}, tmp_path / "bad.png")


def legend_texts(svg_path):
    return [html.unescape(text).strip() for text in re.findall(r"<text[^>]*>([^<]*)</text>", svg_path.read_text())]


def test_a_poor_fit_is_flagged_in_its_legend_entry(tmp_path):
    flat = ([1, 2, 4, 8, 16], [30.0, 38.5, 44.9, 45.3, 45.1])  # R² 0.752 in log space
    good = fit_power_law(TOKENS, law(5.0, -0.3), n_bootstrap=0)
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text in the SVG
        path = plot_scaling({"flat": flat, "good": (TOKENS, law(5.0, -0.3), good)}, tmp_path / "scaling.svg")
    texts = legend_texts(path)
    assert any(t.startswith("flat: α = -0.141") and t.endswith("POOR FIT (R² 0.75 < 0.9)") for t in texts), texts
    assert any(t.startswith("good: α = -0.300") for t in texts) and sum("POOR" in t for t in texts) == 1


def test_plot_divergence_writes_a_png_and_refuses_anything_but_a_result(tmp_path):
    result = divergence_statistics([np.random.default_rng(0).normal(size=(12, 6))])
    path = plot_divergence(result, tmp_path / "divergence.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE) and path.stat().st_size > 5000
    with pytest.raises(TypeError, match="result: expected a DivergenceResult, got dict"):
        plot_divergence(result.to_dict(), tmp_path / "bad.png")


def test_figures_follow_the_suffix_and_default_to_png_without_one(tmp_path):
    result = divergence_statistics([np.random.default_rng(0).normal(size=(12, 6))])
    assert plot_divergence(result, tmp_path / "divergence").read_bytes().startswith(PNG_SIGNATURE)
    assert plot_divergence(result, tmp_path / "divergence.svg").read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["divergence", "divergence.svg"]  # no temporary left

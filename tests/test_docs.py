"""The README and docs/*.md: every python block runs under some test, links resolve, the prefill and serving tables
and the demo's output are the committed JSON's, the README stays short, and the license that pyproject declares is
there."""

import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
from readme_blocks import ROOT, pages, python_blocks, python_blocks_with_headings, section_titles

README_MAX_LINES = 250


def declared_sections(tests_dir: Path) -> dict[str, tuple[tuple[str, str], ...]]:
    """The literal DOC_SECTIONS of every test module, by file name; a module that declares them must use them."""
    found = {}
    for path in sorted(tests_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        values = [node.value for node in tree.body if isinstance(node, ast.Assign)
                  and any(isinstance(target, ast.Name) and target.id == "DOC_SECTIONS" for target in node.targets)]
        if not values:
            continue
        used = any(isinstance(node, ast.Name) and node.id == "DOC_SECTIONS" and isinstance(node.ctx, ast.Load)
                   for node in ast.walk(tree))
        assert used, f"{path.name} declares DOC_SECTIONS but never reads them"
        found[path.name] = ast.literal_eval(values[0])
    return found


def unclaimed_blocks(page: str, claimed: set[str]) -> list[str]:
    """The python blocks of `page` under none of the `claimed` section titles, as 'heading > heading: first line'."""
    return [f"{' > '.join(titles)}: {block.splitlines()[0] if block.strip() else '(empty)'}"
            for titles, block in python_blocks_with_headings(page) if not claimed & set(titles)]


def claims() -> dict[str, set[str]]:
    by_page: dict[str, set[str]] = {}
    for sections in declared_sections(ROOT / "tests").values():
        for page, section in sections:
            by_page.setdefault(page, set()).add(section)
    return by_page


def test_every_python_block_of_every_page_is_run_by_a_test():
    by_page = claims()
    assert "README.md" in by_page and "docs/hosts.md" in by_page
    unrun = {page: blocks for page in pages() if (blocks := unclaimed_blocks(page, by_page.get(page, set())))}
    assert not unrun, f"python blocks that no test's DOC_SECTIONS runs: {unrun}"


def test_every_declared_section_exists_once_and_holds_python_code():
    for module, sections in declared_sections(ROOT / "tests").items():
        for page, section in sections:
            assert page in pages(), f"{module}: {page} is not a documentation page"
            assert python_blocks(section, page), f"{module}: {page} section {section!r} has no python code"


def test_the_block_check_finds_a_block_outside_the_claimed_sections(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n## Run\n\n```python\nx = 1\n```\n\n### Nested\n\n```python\ny = 2\n```\n\n"
                    "## Not run\n\n```bash\n# a comment, not a heading\n```\n\n```python\nz = 3\n```\n")
    assert section_titles(str(page)) == ["Page", "Run", "Nested", "Not run"]
    assert python_blocks("Run", str(page)) == ["x = 1\n", "y = 2\n"]
    assert unclaimed_blocks(str(page), {"Run"}) == ["Page > Not run: z = 3"]
    assert unclaimed_blocks(str(page), {"Page"}) == []
    with pytest.raises(AssertionError, match="0 sections titled 'Missing'"):
        python_blocks("Missing", str(page))


def _anchor(title: str) -> str:
    """The anchor a heading gets when the page is rendered: lower case, punctuation dropped, spaces as '-'."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    broken = []
    for page in pages():
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", (ROOT / page).read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path = (ROOT / page).parent / target if target else ROOT / page
            if not path.exists():
                broken.append(f"{page}: {target}")
            elif anchor and anchor not in {_anchor(t) for t in section_titles(str(path.relative_to(ROOT)))}:
                broken.append(f"{page}: {target}#{anchor}")
    assert not broken, broken


def test_prefill_table_is_printed_from_the_committed_json(monkeypatch):
    spec = importlib.util.spec_from_file_location("qfusion_prefill_benchmark", ROOT / "benchmarks" / "prefill.py")
    prefill = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, prefill)  # its dataclasses look their module up while it loads
    spec.loader.exec_module(prefill)
    table = prefill.markdown_table(json.loads((ROOT / "benchmarks" / "results" / "prefill-cpu.json").read_text()))
    assert table.count("\n") > 10
    assert table in (ROOT / "docs" / "kernels.md").read_text()


def vllm_benchmark():
    """benchmarks/bench_vllm.py as a module, and its committed result."""
    spec = importlib.util.spec_from_file_location("qfusion_vllm_benchmark", ROOT / "benchmarks" / "bench_vllm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench, json.loads((ROOT / "benchmarks" / "results" / "vllm-cpu-x86-64-2-threads.json").read_text())


def test_serving_table_is_printed_from_the_committed_json():
    bench, result = vllm_benchmark()
    table = bench.markdown_table(result)
    assert table.count("\n") > 10
    assert table in (ROOT / "docs" / "kernels.md").read_text()


def test_demo_output_on_its_page_is_the_report_of_the_committed_json():
    from qfusion.demo.report import format_timing, render

    results = json.loads((ROOT / "docs" / "demo_results.json").read_text())
    assert results["quick"] is False and len(results["recipe"]["seeds"]) == 3  # the page shows a full run
    (printed,) = re.findall(r"```text\n(.*?)```", (ROOT / "docs" / "demo.md").read_text(), flags=re.S)
    assert printed.strip() == f"{render(results)}\n{format_timing(results)}"


def test_demo_page_states_no_number_its_report_does_not_print():
    from qfusion.demo.report import format_timing, render

    results = json.loads((ROOT / "docs" / "demo_results.json").read_text())
    report = f"{render(results)}\n{format_timing(results)}"
    prose = re.sub(r"```.*?```", "", (ROOT / "docs" / "demo.md").read_text(), flags=re.S)
    stated = re.findall(r"\d+\.\d+", prose)
    assert stated, "the page states no result"
    assert [number for number in stated if number not in report] == []


def test_readme_stays_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; topic text belongs in docs/"


def test_the_license_pyproject_declares_is_a_file_of_the_package():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n\nCopyright (c) 2026 the qfusion authors\n")


def test_readme_serving_table_is_printed_from_the_committed_json():
    bench, result = vllm_benchmark()
    table = bench.summary_table(result)
    assert table.count("\n") == 1 + len(result["hosts"]) * len(result["modes"])
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Serve"):readme.index("### Benchmark")]
    assert table in section and result["vllm"] in section and "2-core" in section


def test_readme_demo_numbers_are_printed_by_the_committed_run():
    from qfusion.demo.report import format_timing, render

    results = json.loads((ROOT / "docs" / "demo_results.json").read_text())
    report = f"{render(results)}\n{format_timing(results)}"
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### The demo"):readme.index("## Documentation")]
    stated = re.findall(r"\d+\.\d+", section)
    assert len(stated) >= 6
    assert [number for number in stated if number not in report] == []
    assert f"{results['wall_time_s']:.0f} s" in section and str(len(results["recipe"]["seeds"])) + "-seed" in section

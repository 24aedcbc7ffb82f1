"""The README's code runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of one '## section' of the README."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README has no section {section!r}"
    return re.findall(r"```python\n(.*?)```", match.group(1), flags=re.S)


def test_quickstart_incremental_and_losses_sections_run(capsys):
    namespace: dict = {}
    for section in ("Quickstart", "Incremental use: follow-up questions", "Losses"):
        blocks = python_blocks(section)
        assert blocks, f"section {section!r} has no python code"
        for block in blocks:
            exec(compile(block, f"README.md ({section})", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "[[(16, 96), (4, 96)], [(16, 96)]]"
    assert printed[1] == "torch.Size([16, 96]) torch.Size([4, 96]) None"
    assert printed[2] == "True True"

"""Reading the README's code blocks, for the tests that run them."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of the README section '## <section>' (fails if there is no such section)."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert match, f"README has no section {section!r}"
    return re.findall(r"```python\n(.*?)```", match.group(1), flags=re.S)


_PRINT = re.compile(r"^(\s*)print\((.*)\)\s+# (.+)$")


def checked(block: str) -> str:
    """The block with every one-line ``print(...)  # expected`` turned into a check that the printed
    text equals the comment (so the README's stated outputs are asserted, not just shown)."""
    lines = []
    for line in block.splitlines():
        match = _PRINT.match(line)
        if match:
            indent, args, expected = match.groups()
            line = (f"{indent}__printed = ' '.join(str(a) for a in ({args},)); "
                    f"assert __printed == {expected.strip()!r}, (__printed, {expected.strip()!r})")
        lines.append(line)
    return "\n".join(lines) + "\n"

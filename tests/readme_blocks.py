"""Reading the code blocks of README.md and docs/*.md, for the tests that run them.

A test module that runs a page's code declares what it runs as a literal
``DOC_SECTIONS = (("docs/hosts.md", "Wrap a LLaVA checkpoint"), ...)`` and runs every entry;
tests/test_docs.py checks that every ```python block of every page lies in some declared section.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_HEADING = re.compile(r"^(#{1,6}) (.+?)\s*$")


def pages() -> list[str]:
    """The documentation pages, as paths from the repository root: README.md, then docs/*.md."""
    return ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def python_blocks_with_headings(page: str) -> list[tuple[tuple[str, ...], str]]:
    """Every ```python block of `page`, with the titles of the headings it stands under (outermost first)."""
    headings: list[tuple[int, str]] = []
    blocks: list[tuple[tuple[str, ...], str]] = []
    fence: str | None = None  # the language of the open fence, if any
    lines: list[str] = []
    for line in (ROOT / page).read_text().splitlines():
        if fence is None:
            if line.startswith("```"):
                fence, lines = line[3:].strip(), []
                continue
            heading = _HEADING.match(line)
            if heading:
                level = len(heading.group(1))
                headings = [h for h in headings if h[0] < level] + [(level, heading.group(2))]
        elif line.startswith("```"):
            if fence == "python":
                blocks.append((tuple(title for _, title in headings), "\n".join(lines) + "\n"))
            fence = None
        else:
            lines.append(line)
    assert fence is None, f"{page}: a code block is not closed"
    return blocks


def section_titles(page: str) -> list[str]:
    """The titles of every heading of `page` outside code blocks, in order."""
    titles, fenced = [], False
    for line in (ROOT / page).read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := _HEADING.match(line)):
            titles.append(heading.group(2))
    return titles


def python_blocks(section: str, page: str = "README.md") -> list[str]:
    """The ```python blocks under the heading titled `section` of `page` (a path from the repository
    root), its sub-sections included (fails unless `page` has exactly one such heading)."""
    count = section_titles(page).count(section)
    assert count == 1, f"{page} has {count} sections titled {section!r}, expected 1"
    return [block for titles, block in python_blocks_with_headings(page) if section in titles]


_PRINT = re.compile(r"^(\s*)print\((.*)\)\s+# (.+)$")


def checked(block: str) -> str:
    """The block with every one-line ``print(...)  # expected`` turned into a check that the printed
    text equals the comment (so the page's stated outputs are asserted, not just shown)."""
    lines = []
    for line in block.splitlines():
        match = _PRINT.match(line)
        if match:
            indent, args, expected = match.groups()
            line = (f"{indent}__printed = ' '.join(str(a) for a in ({args},)); "
                    f"assert __printed == {expected.strip()!r}, (__printed, {expected.strip()!r})")
        lines.append(line)
    return "\n".join(lines) + "\n"

"""The README's code runs as written."""

from readme_blocks import python_blocks


def test_quickstart_incremental_and_losses_sections_run(capsys):
    namespace: dict = {}
    for section in ("Quickstart", "Incremental use: follow-up questions", "Losses", "Scaling analysis"):
        blocks = python_blocks(section)
        assert blocks, f"section {section!r} has no python code"
        for block in blocks:
            exec(compile(block, f"README.md ({section})", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "[[(16, 96), (4, 96)], [(16, 96)]]"
    assert printed[1] == "torch.Size([16, 96]) torch.Size([4, 96]) None"
    assert printed[2] == "True True"
    assert printed[3] == "-0.5 10.0 62.5"

"""The module's code on the README and the docs pages runs as written."""

from readme_blocks import python_blocks

DOC_SECTIONS = (("README.md", "The fusion module"), ("docs/model.md", "Incremental use: follow-up questions"),
                ("docs/model.md", "Losses"), ("docs/scaling.md", "Scaling analysis"))


def test_quickstart_incremental_losses_and_scaling_sections_run(capsys):
    namespace: dict = {}  # the model page's examples continue the README's quickstart
    for page, section in DOC_SECTIONS:
        blocks = python_blocks(section, page)
        assert blocks, f"{page}: section {section!r} has no python code"
        for block in blocks:
            exec(compile(block, f"{page} ({section})", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "[[(16, 96), (4, 96)], [(16, 96)]]"
    assert printed[1] == "torch.Size([16, 96]) torch.Size([4, 96]) None"
    assert printed[2] == "True True"
    assert printed[3] == "-0.5 10.0 62.5"

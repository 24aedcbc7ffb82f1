"""The >>> examples in public docstrings run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import qfusion

SKIP = {"qfusion.__main__", "qfusion.demo"}
MODULES = sorted(
    info.name for info in pkgutil.walk_packages(qfusion.__path__, "qfusion.")
    if not any(info.name == s or info.name.startswith(s + ".") for s in SKIP)
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:  # an optional dependency (e.g. triton) is not installed
        pytest.skip(f"{name} needs {error.name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"

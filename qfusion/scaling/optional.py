"""The scaling analysis's optional dependencies, which come with qfusion's ``scaling`` extra.

scipy fits the power law and matplotlib draws the figures; the plugin itself needs neither, so they
are imported when first used, and a missing one is an error that says how to install it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA = "scaling"
"""The extra that installs scipy and matplotlib (``pip install 'qfusion[scaling]'``)."""


def require(module: str, needed_for: str) -> ModuleType:
    """Import ``module`` (e.g. ``"scipy.optimize"``), or raise ImportError naming what needs it and the extra.

    needed_for: what needs the module, as the message should name it (e.g. ``"fit_power_law"``).
    A module that is installed but fails to import for another reason raises its own error.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or not module.startswith(error.name):
            raise
        package = module.partition(".")[0]
        raise ImportError(f"{needed_for} needs {package}, which is not installed; it comes with qfusion's "
                          f"{EXTRA!r} extra: pip install 'qfusion[{EXTRA}]' (from a clone: "
                          f"pip install -e '.[{EXTRA}]')") from error

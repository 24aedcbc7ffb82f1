"""The host libraries' supported versions, read from qfusion's own package metadata.

The ranges live in one place, pyproject's ``dependencies``; the installed package carries them in
its metadata, and :func:`check_host_versions` compares the installed host libraries with them. An
older transformers does not fail loudly by itself: it can take the adapter's inputs into ``**kwargs``
and run the LLM without the fused tokens, so the check runs before anything is patched.
"""

from __future__ import annotations

import importlib.metadata as metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

CHECKED = ("transformers", "peft", "huggingface_hub", "accelerate")
"""The libraries whose versions decide whether a host can be attached (as pip spells them)."""


def declared_requirements() -> dict[str, Requirement]:
    """The installed qfusion's requirement on each library in :data:`CHECKED`, by name.

    Only requirements that apply to this environment without an extra are read (their environment
    marker, if any, holds here). An empty dict when qfusion runs from a source tree it was not
    installed from: then there is no metadata to read the ranges from.
    """
    try:
        lines = metadata.requires("qfusion") or []
    except metadata.PackageNotFoundError:
        return {}
    checked = {canonicalize_name(name) for name in CHECKED}
    requirements = {}
    for line in lines:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name in checked and (requirement.marker is None or requirement.marker.evaluate({"extra": ""})):
            requirements[name] = requirement
    return requirements


def installed_version(name: str) -> Version | None:
    """The installed version of distribution ``name``, or None when it is not installed."""
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def check_host_versions() -> None:
    """Raise ImportError naming the first checked library whose installed version qfusion does not support.

    A library that is not installed is not checked (peft is needed only for LoRA); one that is
    installed must satisfy the declared range, e.g. ``transformers>=5.18``. A pre-release counts by
    its number, so a development build of a later release passes.
    """
    for name, requirement in declared_requirements().items():
        version = installed_version(name)
        if version is not None and not requirement.specifier.contains(version, prereleases=True):
            raise ImportError(
                f"{requirement.name}: qfusion needs {requirement.name}{requirement.specifier}, found "
                f"{requirement.name} {version}; install a supported release, "
                f"e.g. pip install '{requirement.name}{requirement.specifier}'"
            )


def check_minimum(name: str, minimum: str, needed_by: str) -> None:
    """Raise ImportError unless distribution ``name`` is installed at ``minimum`` or later (for ``needed_by``)."""
    version = installed_version(name)
    if version is None or version < Version(minimum):
        found = "not installed" if version is None else f"{name} {version}"
        raise ImportError(
            f"{name}: {needed_by} needs {name}>={minimum}, found {found}; install a newer release, "
            f"e.g. pip install '{name}>={minimum}'"
        )

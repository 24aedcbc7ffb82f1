"""The host libraries' version check reads pyproject's ranges from the package metadata."""

import re
from pathlib import Path

import pytest
from conftest_hosts import fusion_config, hosts  # noqa: F401
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import qfusion
from qfusion import _versions

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")


def pyproject_dependencies() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def pyproject_floors() -> dict[str, Version]:
    """Lower bound of each checked library as pyproject states it."""
    floors = {}
    for line in pyproject_dependencies():
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        if name in {canonicalize_name(n) for n in _versions.CHECKED}:
            (bound,) = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
            floors[name] = bound
    return floors


def just_below(version: Version) -> Version:
    """A release number older than ``version`` (5.18 -> 5.17.99, 1.0 -> 0.99)."""
    if version.minor > 0:
        return Version(f"{version.major}.{version.minor - 1}.99")
    return Version(f"{version.major - 1}.99")


@pytest.fixture
def pyproject_metadata(monkeypatch):
    """The installed metadata replaced by pyproject's dependencies plus extras that must be ignored."""
    lines = pyproject_dependencies() + ['peft>=99; extra == "lora"', 'pyyaml>=6.0; extra == "dev"']
    monkeypatch.setattr(_versions.metadata, "requires", lambda name: lines if name == "qfusion" else None)


def fake_installed(monkeypatch, versions: dict[str, Version | None]):
    monkeypatch.setattr(_versions, "installed_version", lambda name: versions[canonicalize_name(name)])


def test_declared_requirements_are_the_metadata_ranges_of_the_checked_libraries(pyproject_metadata):
    declared = _versions.declared_requirements()
    assert set(declared) == {canonicalize_name(name) for name in _versions.CHECKED}
    for name, floor in pyproject_floors().items():
        assert declared[name].specifier.contains(floor) and not declared[name].specifier.contains(just_below(floor))
    assert "99" not in str(declared["peft"].specifier)  # the extra's requirement is not read


@pytest.mark.parametrize("library", _versions.CHECKED)
def test_a_version_below_the_floor_raises_naming_library_version_and_floor(pyproject_metadata, monkeypatch,
                                                                          library):
    floors = pyproject_floors()
    name = canonicalize_name(library)
    installed = dict(floors, **{name: just_below(floors[name])})
    fake_installed(monkeypatch, installed)
    with pytest.raises(ImportError) as error:
        _versions.check_host_versions()
    message = str(error.value)
    assert message.startswith(f"{library}:")
    assert str(installed[name]) in message and f">={floors[name]}" in message


def test_attach_refuses_a_transformers_below_the_floor_before_touching_the_host(hosts, pyproject_metadata,
                                                                              monkeypatch):
    model = hosts.model("llava")
    floors = pyproject_floors()
    old = just_below(floors["transformers"])
    fake_installed(monkeypatch, dict(floors, transformers=old))
    expected = f"needs transformers>={floors['transformers']}, found transformers {old}"
    with pytest.raises(ImportError, match=re.escape(expected)):
        qfusion.attach(model, fusion_config())
    assert "qfusion" not in model._modules and "forward" not in vars(model)


def test_the_floor_and_later_releases_pass(pyproject_metadata, monkeypatch):
    floors = pyproject_floors()
    fake_installed(monkeypatch, floors)
    _versions.check_host_versions()
    later = {name: Version(f"{v.major}.{v.minor + 1}.0.dev0") for name, v in floors.items()}
    fake_installed(monkeypatch, later)
    _versions.check_host_versions()


def test_a_library_that_is_not_installed_is_not_checked(pyproject_metadata, monkeypatch):
    floors = pyproject_floors()
    fake_installed(monkeypatch, dict(floors, peft=None))
    _versions.check_host_versions()


def test_without_installed_metadata_nothing_is_declared(monkeypatch):
    def missing(name):
        raise _versions.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_versions.metadata, "requires", missing)
    assert _versions.declared_requirements() == {}


def test_installed_host_libraries_are_supported():
    _versions.check_host_versions()


def test_floor_constraints_pin_the_pyproject_lower_bounds():
    pins = {}
    for line in (ROOT / "constraints" / "floor.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (pin,) = requirement.specifier
            assert pin.operator == "==", f"constraints/floor.txt: expected name==version, got {line!r}"
            pins[canonicalize_name(requirement.name)] = Version(pin.version)
    assert pins == pyproject_floors()


def test_a_family_newer_than_the_installed_transformers_is_refused_naming_both_versions(hosts, monkeypatch):
    import dataclasses

    import transformers

    from qfusion.adapters import MODEL_TYPES

    monkeypatch.setitem(MODEL_TYPES, "llava", dataclasses.replace(MODEL_TYPES["llava"], min_transformers="99.0"))
    model = hosts.model("llava")
    expected = f"the 'llava' host family needs transformers>=99.0, found transformers {transformers.__version__}"
    with pytest.raises(ImportError, match=re.escape(expected)):
        qfusion.attach(model, fusion_config())
    assert "qfusion" not in model._modules and "forward" not in vars(model)

"""What pyproject.toml declares holds for what is installed here, the versions these tests run against: no floor
above a tested version, no declared package missing, and the extras (ray[train,data,default]) complete."""

from __future__ import annotations

import importlib.metadata
import platform
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

PROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
DECLARED = [Requirement(r) for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"]]


def _unmet(req: Requirement, extra: str = "") -> str | None:
    """Why the installed distribution does not satisfy `req` (None when it does)."""
    if req.marker is not None and not req.marker.evaluate({"extra": extra}):
        return None  # not asked for here (another platform, Python or extra)
    try:
        installed = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return f"{req.name} is not installed"
    if not req.specifier.contains(installed, prereleases=True):  # local builds (2.14.1+cu130) compare as 2.14.1
        return f"{req.name} {installed} is installed"
    return None


@pytest.mark.parametrize("req", DECLARED, ids=str)
def test_installed_version_satisfies_the_declared_one(req):
    problem = _unmet(req)
    assert problem is None, f"pyproject.toml asks for {req}, but {problem}: pip install -e '.[test]'"


@pytest.mark.parametrize("req", [r for r in DECLARED if r.extras], ids=str)
def test_extras_are_installed(req):
    wanted = {Requirement(r) for r in importlib.metadata.requires(req.name) or []}
    problems = [f"{r} ({why})" for extra in sorted(req.extras) for r in wanted if (why := _unmet(r, extra))]
    assert problems == [], f"{req} needs, for its extras: {problems}"


def test_python_satisfies_requires_python():
    assert SpecifierSet(PROJECT["requires-python"]).contains(platform.python_version())


def test_a_floor_above_the_installed_version_is_caught():
    torch = importlib.metadata.version("torch").split("+")[0]
    major, minor, *_ = map(int, torch.split("."))
    assert _unmet(Requirement(f"torch>={major}.{minor + 1}")) == f"torch {importlib.metadata.version('torch')} is installed"
    assert _unmet(Requirement("no-such-package-for-ssm>=1")) == "no-such-package-for-ssm is not installed"
    assert _unmet(Requirement(f"torch>={major}.{minor}")) is None

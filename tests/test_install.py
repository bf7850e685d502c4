"""The install is pinned (constraints.txt): the versions the committed results were computed with."""
import re
import tomllib
from importlib.metadata import version

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.partition("==")
            assert v, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            out[canonicalize_name(name)] = Version(v)
    return out


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_every_declared_dependency_is_pinned_inside_its_range():
    pinned = pins()
    for req in requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is in pyproject.toml but not in constraints.txt: run `make lock`"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={pinned[name]}, outside pyproject.toml's {req.specifier}: run `make lock`"


def test_the_installed_versions_are_the_pinned_ones():
    # `make install` applies the constraints: what runs the pipeline is what the results record
    pinned = pins()
    for req in requirements():
        installed = Version(re.sub(r"\+.*$", "", version(req.name)))  # torch's +cpu local label
        assert installed == pinned[canonicalize_name(req.name)], \
            f"{req.name} {installed} is installed, constraints.txt pins {pinned[canonicalize_name(req.name)]}: run `make install`"

"""Ray and project versions written in cluster/ agree with pyproject.toml; a bump there fails here.

A cluster whose image runs another Ray minor than the driver breaks in confusing ways (Ray Data,
Train and Tune APIs move between minors), so every Ray version literal under cluster/ must satisfy
pyproject's `ray[...]==2.60.*`, and every T2V-Ray image tag must be the project version.
"""

from __future__ import annotations

import re

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.cluster.cluster_helpers import CLUSTER, LAUNCHER_YAMLS, load_yaml, pyproject, ray_requirement

# Where Ray versions appear in cluster/: image tags, pip pins, KubeRay's rayVersion.
RAY_VERSION_PATTERNS = [
    re.compile(r"rayproject/ray:(\d+\.\d+\.\d+)"),
    re.compile(r"""\bray(?:\[[^\]]*\])?==(\d+\.\d+\.\d+)"""),
    re.compile(r"""rayVersion:\s*["']?(\d+\.\d+\.\d+)"""),
]
PROJECT_IMAGE = re.compile(r"/t2v-ray:([0-9][^\s\"']*)")
PYTHON_TAG = re.compile(r"rayproject/ray:[\d.]+-py(\d)(\d+)")
FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "crds" not in p.parts and p.suffix != ".pyc")


def ray_versions(text: str) -> list[str]:
    return [m.group(1) for pattern in RAY_VERSION_PATTERNS for m in pattern.finditer(text)]


def drift(text: str, spec: SpecifierSet) -> list[str]:
    return [v for v in ray_versions(text) if Version(v) not in spec]


def test_pyproject_pins_ray_minor():
    req = Requirement(ray_requirement())
    assert req.name == "ray"
    assert any(s.operator == "==" for s in req.specifier), f"pin Ray's minor in pyproject: {req}"


def test_drift_check_catches_a_bump():
    spec = SpecifierSet("==2.60.*")
    assert drift('image: rayproject/ray:2.59.1-py311-gpu\npip install "ray[default]==2.61.0"', spec) == [
        "2.59.1",
        "2.61.0",
    ]
    assert drift('rayVersion: "2.60.0"\nFROM rayproject/ray:2.60.0-py311-gpu', spec) == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_ray_versions_match_pyproject(path):
    spec = Requirement(ray_requirement()).specifier
    assert not drift(path.read_text(), spec), f"{path.name}: Ray version(s) outside pyproject's {spec}"


def test_every_place_that_sets_ray_is_checked():
    found = {p.name: ray_versions(p.read_text()) for p in FILES}
    for name in ("aws.yaml", "gcp.yaml", "raycluster.yaml", "Dockerfile"):
        assert found.get(name), f"{name} names no Ray version the drift check can see"


def test_project_image_tags_match_pyproject_version():
    version = pyproject()["project"]["version"]
    tags = {(p.name, t) for p in FILES for t in PROJECT_IMAGE.findall(p.read_text())}
    assert tags, "no t2v-ray image tag found in cluster/"
    assert {t for _, t in tags} == {version}, f"t2v-ray image tags must be {version}: {sorted(tags)}"


def test_image_python_satisfies_requires_python():
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    tags = {f"{a}.{b}" for p in FILES for a, b in PYTHON_TAG.findall(p.read_text())}
    assert tags and all(Version(t) in requires for t in tags), (
        f"image Python {tags} vs requires-python {requires}"
    )


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=[p.name for p in LAUNCHER_YAMLS])
def test_launcher_installs_the_project_from_its_pyproject(path):
    """setup_commands pip-install the synced checkout, so nodes get exactly pyproject's pins."""
    config = load_yaml(path)
    (remote,) = [r for r, local in config["file_mounts"].items() if local in (".", "./")]
    assert any(re.search(rf"pip install\b.*\s{re.escape(remote)}(\s|$)", c) for c in config["setup_commands"])


def test_dockerfile_installs_the_project_from_its_pyproject():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^COPY .*pyproject\.toml", text, re.M)
    assert re.search(r"^RUN pip install .*\s\.\s", text, re.M)

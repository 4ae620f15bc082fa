"""Packaging metadata: one version, the licence file, typed-package markers (no wheel build)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

import m3connect

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def project() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_version_lives_in_pyproject_only(project: dict) -> None:
    assert m3connect.__version__ == metadata.version("m3connect") == project["project"]["version"], (
        "the installed metadata is stale: reinstall with pip install -e ."
    )
    source = (REPO / "m3connect" / "__init__.py").read_text()
    assert project["project"]["version"] not in source


def test_license_file_and_metadata(project: dict) -> None:
    meta = project["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text.splitlines()[0] and "m3connect contributors" in text
    assert "Typing :: Typed" in meta["classifiers"]
    assert not [c for c in meta["classifiers"] if c.startswith("License ::")]  # PEP 639: the expression only
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["m3connect"]
    assert (REPO / "m3connect" / "py.typed").is_file()


def test_installed_metadata_matches_pyproject(project: dict) -> None:
    installed = metadata.metadata("m3connect")
    stale = "the installed metadata is stale: reinstall with pip install -e ."
    assert installed["License-Expression"] == project["project"]["license"], stale
    assert set(installed.get_all("Classifier") or []) == set(project["project"]["classifiers"]), stale
    assert "compat" in (installed.get_all("Provides-Extra") or []), stale


def test_langchain_tests_pinned_to_installed(project: dict) -> None:
    try:
        installed = metadata.version("langchain-tests")
    except metadata.PackageNotFoundError:
        pytest.skip("langchain-tests is not installed")
    assert f"langchain-tests=={installed}" in project["project"]["optional-dependencies"]["dev"]

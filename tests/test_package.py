"""The version is single-sourced: the package metadata and CITATION.cff agree with ``cif_jax.__version__``."""

import importlib.metadata
import pathlib
import re

import pytest

import cif_jax as cj

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_installed_metadata_carries_the_package_version():
    assert importlib.metadata.version("cif-jax") == cj.__version__


def test_citation_names_the_package_version():
    text = (ROOT / "CITATION.cff").read_text()
    match = re.search(r"^version:\s*\"?([^\"\n]+)\"?\s*$", text, re.M)
    assert match and match.group(1) == cj.__version__


def test_pyproject_does_not_repeat_the_version():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in config["project"] and "version" in config["project"]["dynamic"]
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "cif_jax.__version__"}

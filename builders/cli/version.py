"""The package version: the installed distribution's, else pyproject.toml's (a source checkout)."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def package_version() -> str:
    try:
        return version("enginesmith")
    except PackageNotFoundError:
        return pyproject_version(PYPROJECT)


def pyproject_version(path: Path) -> str:
    """`[project] version` of a pyproject.toml ("unknown" without one)."""
    try:
        text = path.read_text()
    except OSError:
        return "unknown"
    m = re.search(r'^\[project\]\s*$(.*?)(?=^\[|\Z)', text, re.M | re.S)
    v = m and re.search(r'^version\s*=\s*"([^"]+)"', m.group(1), re.M)
    return v.group(1) if v else "unknown"

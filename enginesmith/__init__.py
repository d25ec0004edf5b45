"""enginesmith: the one import root of the project's packages.

`enginesmith.builders`, `.runtime`, `.triton_repo` and `.client` are the repository's top-level folders of those
names. The wheel installs them inside this package. In a source checkout (this folder's parent holds
pyproject.toml and builders/) the checkout root is appended to `__path__`, so they import from their folders
with nothing installed. Each of them refuses to be imported under its bare name (a second name would load its
modules twice).
"""

from __future__ import annotations

from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent

if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "builders").is_dir():
    __path__.append(str(_CHECKOUT))


def __getattr__(name: str) -> str:
    """`__version__`: the installed distribution's, else the checkout's pyproject.toml (as `--version` prints)."""
    if name != "__version__":
        raise AttributeError(f"module 'enginesmith' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("enginesmith")
    except PackageNotFoundError:
        from enginesmith.builders.cli.version import package_version

        return package_version()

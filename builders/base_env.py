"""The Python environment enginesmith is installed over, when it already holds torch (NVIDIA's containers).

In `tritonserver:<yy.mm>-trtllm-python-py3` and the TensorRT-LLM containers, torch, TensorRT-LLM and
Triton-lang are the container's builds; a pip-installed copy in a venv would shadow them. `make venv`
then makes the venv see the base environment's packages and forbids pip to replace them. Standard library
only: the Makefile runs this file with the base Python before anything is installed.

    python builders/base_env.py has-torch        # "yes" when this Python imports torch
    python builders/base_env.py constraints      # pip constraints: the held packages at their versions
    python builders/base_env.py pth              # a .pth line that adds this Python's site-packages
    VENV/bin/python builders/base_env.py report CONSTRAINTS   # after the install: nothing held was replaced
"""

from __future__ import annotations

import importlib.util
import site
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# distribution -> module: what the base environment's builds must keep providing.
HELD = {"torch": "torch", "triton": "triton", "tensorrt-llm": "tensorrt_llm", "transformers": "transformers",
        "tokenizers": "tokenizers", "numpy": "numpy"}


def dist_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def held_versions() -> dict[str, str]:
    """Distribution -> version of the HELD packages this Python has."""
    return {d: v for d in HELD if (v := dist_version(d)) is not None}


def module_dir(module: str) -> Path | None:
    """Where `module` is imported from (no import: TensorRT-LLM's import initialises CUDA)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent


def _inside(path: Path, root: str) -> bool:
    return Path(root).resolve() in path.parents


def replaced(constraints: str) -> list[str]:
    """Held packages (named in `constraints`) that this venv now imports from inside itself."""
    out = []
    for line in constraints.splitlines():
        dist = line.split("==")[0].strip()
        where = module_dir(HELD.get(dist, dist))
        if where is not None and sys.prefix != sys.base_prefix and _inside(where, sys.prefix):
            out.append(f"{dist} ({where})")
    return out


def report(constraints: str) -> int:
    bad = replaced(constraints)
    if bad:
        print(f"error: pip installed {', '.join(bad)} into {sys.prefix} over the base environment's; remove the "
              "venv and run `make venv` again (the constraints file pins what the base holds)", file=sys.stderr)
        return 1
    held = held_versions()
    trt = held.get("tensorrt-llm")
    where = module_dir("tensorrt_llm")
    print(f"base environment kept: {', '.join(f'{d} {v}' for d, v in held.items()) or 'nothing held'}")
    print(f"TensorRT-LLM {trt} ({where})" if trt else "TensorRT-LLM: not installed in the base environment")
    return 0


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else ""
    if cmd == "has-torch":
        print("yes" if importlib.util.find_spec("torch") is not None else "no")
    elif cmd == "constraints":
        print("\n".join(f"{d}=={v}" for d, v in held_versions().items()))
    elif cmd == "pth":
        dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
        print("; ".join(["import site", *(f"site.addsitedir({d!r})" for d in dirs)]))
    elif cmd == "report" and len(argv) == 2:
        return report(Path(argv[1]).read_text())
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

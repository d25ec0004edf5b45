"""The interpreter the reference runtime spawns its processes with (rank workers, the engine process)."""

from __future__ import annotations

import os
import sys


def python_executable() -> str:
    """The interpreter for spawned processes: inside Triton's Python stub sys.executable is the stub binary."""
    exe = sys.executable or ""
    if os.path.basename(exe).startswith("python"):
        return exe
    return os.environ.get("ENGINESMITH_PYTHON") or os.path.join(sys.prefix, "bin", "python3")

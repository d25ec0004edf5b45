"""One-line messages for the file-system errors a command meets on paths the user chose (no tracebacks)."""

from __future__ import annotations

import os
from pathlib import Path


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def write_error(e: OSError, option: str, value: str | Path) -> str:
    """`--out out: cannot write out/x/checkpoint (Permission denied); choose a writable --out ...`."""
    where = e.filename if e.filename is not None else value
    return (f"{option} {value}: cannot write {where} ({_reason(e)}); choose a writable {option} or fix that "
            "folder's permissions")


def fs_error(e: OSError, option: str, value: str | Path) -> str:
    """`write_error` when the failing path lies under `value` (or is unknown), else the path a command read."""
    if e.filename is None:
        return write_error(e, option, value)
    failed, root = Path(os.path.abspath(e.filename)), Path(os.path.abspath(value))
    if failed == root or root in failed.parents or failed in root.parents:
        return write_error(e, option, value)
    return f"{e.filename}: {_reason(e)}; check that it exists and can be read"

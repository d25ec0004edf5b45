"""One-line messages for the file-system errors a command meets on paths the user chose (no tracebacks)."""

from __future__ import annotations

from pathlib import Path


def write_error(e: OSError, option: str, value: str | Path) -> str:
    """`--out out: cannot write out/x/checkpoint (Permission denied); choose a writable --out ...`."""
    where = e.filename if e.filename is not None else value
    reason = e.strerror or str(e) or type(e).__name__
    return (f"{option} {value}: cannot write {where} ({reason}); choose a writable {option} or fix that "
            "folder's permissions")

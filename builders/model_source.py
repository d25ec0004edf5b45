"""Whether a recipe's `model.source` names a local folder or a Hugging Face repo id, and where the folder is.

The rule (first match wins), so that a mistyped or not-yet-created path is reported as a missing folder
instead of failing on the Hub:
1. it exists on disk (a folder or a file) -> local;
2. it starts with '/', '.' or '~', or holds a backslash -> local;
3. it has more than one '/' (a Hub id is `name` or `org/name`) -> local;
4. it is not a valid Hub id (letters, digits, '-', '_', '.'; no '--' or '..'; at most 96 characters) -> local;
5. its first part names an existing folder (`out/model` while `out/` exists) -> local;
6. otherwise a Hub id; when the Hub cannot serve it, the error also names the local folder it was not.
Relative paths resolve against the current working directory (not the recipe's folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class SourceRef:
    """`model.source` classified."""

    text: str
    path: Path
    """Absolute path the text names as a local folder (`~` expanded, relative to the working directory)."""
    local: bool
    """True: a local path (rules 1-5); False: a Hub repo id."""
    why: str
    """Which rule decided, for messages."""

    @property
    def relative(self) -> bool:
        return not Path(self.text).expanduser().is_absolute()

    def resolution(self) -> str:
        """How the text became `path`: 'an absolute path', or resolved against the working directory."""
        if not self.relative:
            return "an absolute path"
        return f"resolved relative to the current directory {Path.cwd()}, not the recipe's folder"

    def missing(self) -> str:
        """One line: the local folder does not exist, how it was resolved, the fix."""
        return (f"model.source={self.text!r}: no folder {self.path} ({self.why}; {self.resolution()}); create it, "
                "fix the path (an absolute one works from anywhere), or run from the directory it is relative to")

    def not_local_either(self) -> str:
        """For a Hub id the Hub could not serve: the local folder it might have meant."""
        return f"no local folder {self.path} either ({self.resolution()})"


def _hub_id_problem(text: str) -> str | None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return "not a valid Hugging Face repo id (letters, digits, '-', '_', '.'; name or org/name)"
    return None


def classify_source(text: str) -> SourceRef:
    """Apply the module's rule to `text`."""
    expanded = Path(text).expanduser()
    path = Path(os.path.abspath(expanded))

    def local(why: str) -> SourceRef:
        return SourceRef(text, path, True, why)

    if expanded.exists():
        return local("it exists")
    if text.startswith(("/", ".", "~")) or "\\" in text:
        return local(f"a path: it starts with {text[0]!r}" if text[0] in "/.~" else "a path: it holds '\\'")
    if text.count("/") > 1:
        return local("a path: a Hub id has at most one '/' (org/name)")
    if (problem := _hub_id_problem(text)) is not None:
        return local(f"a path: {problem}")
    if "/" in text and Path(text.split("/")[0]).is_dir():
        return local(f"a path: {text.split('/')[0]}/ is a folder here")
    return SourceRef(text, path, False, "a Hugging Face repo id")

"""The one error type of the converter: a checkpoint, layout or option it cannot turn into rank files."""

from __future__ import annotations


class ConvertError(ValueError):
    """Raised before anything is written; the message names the tensor or field and what was expected."""

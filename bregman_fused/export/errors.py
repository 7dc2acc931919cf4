"""The one error type of the export package."""
from __future__ import annotations

__all__ = ["ExportError"]


class ExportError(ValueError):
    """A model or file that export cannot handle; the message names it and says what to do."""

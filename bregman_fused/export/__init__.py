"""Sparse export (placeholder docstring, written below)."""
from .errors import ExportError
from .shrink import shrink

__all__ = ["ExportError", "shrink"]

"""Classify H&E nuclei into cell types and return the result to QuPath."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

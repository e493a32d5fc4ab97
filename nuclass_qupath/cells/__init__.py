"""Cells: the cell table, QuPath-dialect GeoJSON in and out, the nucleus detector."""

from nuclass_qupath.cells.table import CellTable

__all__ = ["CellTable"]

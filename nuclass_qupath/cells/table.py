"""The cell table shared by every stage.

Coordinates are in QuPath's image frame: level-0 pixels of the slide, origin at
the top-left of the image as QuPath shows it (for OpenSlide slides with a
bounding box this is OpenSlide's ``(bounds-x, bounds-y)``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class CellTable:
    """Cells of one image, one row per cell.

    Attributes
    ----------
    ids
        Stable object ids: the input's, or a new UUID4 string.
    centroids_px
        ``(N, 2)`` float64 array of nucleus centroids ``(x, y)`` in QuPath
        level-0 pixels.
    geometries
        Nucleus outline per cell as a shapely geometry in the same frame, or
        ``None`` where only a point is known.
    labels
        Class name per cell where the input carries one (training input),
        else ``None``.
    features
        The input GeoJSON feature per cell, kept so that properties the
        package does not own survive a round trip; ``None`` for detected cells.
    """

    ids: list[str]
    centroids_px: np.ndarray
    geometries: list[Any] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    features: list[dict | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.centroids_px = np.asarray(self.centroids_px, dtype=np.float64).reshape(-1, 2)
        n = len(self.centroids_px)
        if len(self.ids) != n:
            raise ValueError(f"ids has {len(self.ids)} entries but there are {n} centroids")
        if not self.geometries:
            self.geometries = [None] * n
        if not self.labels:
            self.labels = [None] * n
        if not self.features:
            self.features = [None] * n
        for name in ("geometries", "labels", "features"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected {n}")

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_points(
        cls,
        xy_px: np.ndarray,
        labels: list[str | None] | None = None,
        ids: list[str] | None = None,
    ) -> "CellTable":
        """Build a table from centroids alone, giving each cell a new UUID if no ids are given."""
        xy_px = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
        if ids is None:
            ids = [str(uuid.uuid4()) for _ in range(len(xy_px))]
        return cls(ids=list(ids), centroids_px=xy_px, labels=list(labels) if labels else [])

    def subset(self, index: np.ndarray | list[int]) -> "CellTable":
        """Return the rows at ``index`` (integer positions or a boolean mask) as a new table."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return CellTable(
            ids=[self.ids[i] for i in index],
            centroids_px=self.centroids_px[index],
            geometries=[self.geometries[i] for i in index],
            labels=[self.labels[i] for i in index],
            features=[self.features[i] for i in index],
        )

    def bounds_px(self) -> tuple[float, float, float, float]:
        """Return ``(min_x, min_y, max_x, max_y)`` of the centroids; raises on an empty table."""
        if len(self) == 0:
            raise ValueError("the cell table is empty")
        lo = self.centroids_px.min(axis=0)
        hi = self.centroids_px.max(axis=0)
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])

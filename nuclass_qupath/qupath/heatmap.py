"""Heatmap tiles: class fractions and mean confidence on a square grid, as QuPath tile objects.

Each non-empty grid square becomes a GeoJSON feature with ``objectType:
"tile"``, named :data:`~nuclass_qupath.qupath.results.TILE_NAME`, whose
measurements QuPath's Measurement Maps can colour:
``NuClass: cells``, ``NuClass: mean confidence`` and ``NuClass: fraction <class>``
for every model class (the same names on every tile, zeros included).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from nuclass_qupath.errors import CellsError, MissingMppError
from nuclass_qupath.qupath.results import (
    TILE_CELLS_MEASUREMENT,
    TILE_MEAN_CONFIDENCE_MEASUREMENT,
    TILE_NAME,
    fraction_measurement,
)

logger = logging.getLogger(__name__)

# Coordinates are written with this many decimals (QuPath stores ROI vertices as float32 or double).
_DECIMALS = 3


def heatmap_tiles(
    centroids_px: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    confidence: np.ndarray,
    *,
    mpp: float,
    tile_um: float = 100.0,
    image_width_px: int,
    image_height_px: int,
    region: BaseGeometry | None = None,
    predicted: np.ndarray | None = None,
) -> list[dict]:
    """Summarise classified cells on a grid of square tiles.

    The grid starts at the image origin; tile ``(col, row)`` covers
    ``[col * s, (col + 1) * s) x [row * s, (row + 1) * s)`` level-0 pixels
    with ``s = tile_um / mpp``. A cell belongs to the tile that contains its
    centroid. Tiles are clipped to the image and, when ``region`` is given, to
    that region (cells outside it are left out). Tiles without cells are omitted.

    Parameters
    ----------
    centroids_px
        ``(N, 2)`` cell centroids ``(x, y)`` in QuPath level-0 pixels.
    probs
        ``(N, C)`` class probabilities, used for the predicted class when
        ``predicted`` is not given.
    class_names
        The ``C`` model class names, in column order.
    confidence
        ``(N,)`` confidence per cell.
    mpp
        Pixel size of level 0 in µm per pixel.
    tile_um
        Tile edge length in µm.
    image_width_px, image_height_px
        Level-0 image size in pixels; tiles are clipped to it and cells
        outside it are left out with a warning.
    region
        Optional area (shapely geometry in level-0 pixels) such as an annotation.
    predicted
        Optional ``(N,)`` predicted class index per cell; defaults to the argmax of ``probs``.

    Returns
    -------
    list of dict
        QuPath GeoJSON tile features, ordered by row then column. The fractions
        of one tile sum to 1 and the ``NuClass: cells`` values sum to the
        number of cells counted.
    """
    centroids_px, probs, confidence, predicted = _check_inputs(
        centroids_px, probs, class_names, confidence, predicted
    )
    tile_px = _tile_size_px(mpp, tile_um)
    if image_width_px <= 0 or image_height_px <= 0:
        raise CellsError(f"image size must be positive, got {image_width_px} x {image_height_px} px")

    x, y = centroids_px[:, 0], centroids_px[:, 1]
    keep = (x >= 0) & (y >= 0) & (x < image_width_px) & (y < image_height_px)
    outside = int((~keep).sum())
    if outside:
        logger.warning(
            "%d of %d cell centroids lie outside the %d x %d px image and are left out of the heatmap",
            outside, len(x), image_width_px, image_height_px,
        )
    if region is not None:
        keep &= shapely.contains_xy(region, x, y)

    n_cols = math.ceil(image_width_px / tile_px)
    n_rows = math.ceil(image_height_px / tile_px)
    cols = np.minimum((x[keep] // tile_px).astype(np.int64), n_cols - 1)
    rows = np.minimum((y[keep] // tile_px).astype(np.int64), n_rows - 1)
    flat = rows * n_cols + cols
    n_classes = len(class_names)

    # Per-tile sums over the occupied tiles only, so the grid size never matters.
    occupied, inverse = np.unique(flat, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(occupied))
    confidence_sums = np.bincount(inverse, weights=confidence[keep], minlength=len(occupied))
    class_counts = np.bincount(
        inverse * n_classes + predicted[keep], minlength=len(occupied) * n_classes
    ).reshape(len(occupied), n_classes)

    tile_rows, tile_cols = np.divmod(occupied, n_cols)
    x0 = tile_cols * tile_px
    y0 = tile_rows * tile_px
    x1 = np.minimum(x0 + tile_px, image_width_px)
    y1 = np.minimum(y0 + tile_px, image_height_px)
    boxes = shapely.box(x0, y0, x1, y1)
    if region is not None:
        boxes = shapely.intersection(boxes, region)
    boxes = shapely.transform(boxes, lambda coords: np.round(coords, _DECIMALS))
    geometries = [json.loads(text) for text in shapely.to_geojson(boxes)]

    fraction_names = [fraction_measurement(name) for name in class_names]
    fractions = class_counts / counts[:, None]
    mean_confidence = confidence_sums / counts
    tiles = []
    for i, geometry in enumerate(geometries):
        measurements = {
            TILE_CELLS_MEASUREMENT: int(counts[i]),
            TILE_MEAN_CONFIDENCE_MEASUREMENT: float(mean_confidence[i]),
        }
        measurements.update(zip(fraction_names, fractions[i].tolist()))
        tiles.append(
            {
                "type": "Feature",
                "geometry": geometry,
                "properties": {"objectType": "tile", "name": TILE_NAME, "measurements": measurements},
            }
        )
    logger.info(
        "heatmap: %d cells in %d tiles of %.1f µm (%.1f px)", int(counts.sum()), len(tiles), tile_um, tile_px
    )
    return tiles


def _tile_size_px(mpp: float | None, tile_um: float) -> float:
    if mpp is None or not math.isfinite(mpp) or mpp <= 0:
        raise MissingMppError(
            f"the heatmap needs the pixel size in µm per pixel, got mpp={mpp!r}; "
            "set the pixel size of the image in QuPath or pass --mpp"
        )
    if not math.isfinite(tile_um) or tile_um <= 0:
        raise CellsError(f"tile size must be a positive number of µm, got tile_um={tile_um!r}")
    return tile_um / mpp


def _check_inputs(
    centroids_px: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    confidence: np.ndarray,
    predicted: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    centroids_px = np.asarray(centroids_px, dtype=np.float64).reshape(-1, 2)
    n = len(centroids_px)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (n, len(class_names)):
        raise CellsError(
            f"probs has shape {probs.shape}, expected ({n}, {len(class_names)}) for "
            f"{n} cells and {len(class_names)} classes"
        )
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    if len(confidence) != n:
        raise CellsError(f"confidence has {len(confidence)} values, expected {n}")
    if predicted is None:
        predicted = probs.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64).reshape(-1)
    if len(predicted) != n:
        raise CellsError(f"predicted has {len(predicted)} values, expected {n}")
    if n and (predicted.min() < 0 or predicted.max() >= len(class_names)):
        raise CellsError(f"predicted class indices must be in 0..{len(class_names) - 1}")
    if not np.isfinite(centroids_px).all():
        raise CellsError("cell centroids contain NaN or infinite coordinates")
    return centroids_px, probs, confidence, predicted

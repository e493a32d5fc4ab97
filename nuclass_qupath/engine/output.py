"""Turn predictions into QuPath objects: GeoJSON features with class and measurements."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from nuclass_qupath.cells.table import CellTable
from nuclass_qupath.engine.predictions import Predictions
from nuclass_qupath.model.config import ModelConfig

MEASUREMENT_PREFIX = "NuClass: "
CONFIDENCE = f"{MEASUREMENT_PREFIX}confidence"
GATE = f"{MEASUREMENT_PREFIX}gate"


def probability_name(class_name: str) -> str:
    """Measurement name of a class probability, e.g. ``NuClass: p(Tumor)``."""
    return f"{MEASUREMENT_PREFIX}p({class_name})"


def cell_measurements(predictions: Predictions, i: int) -> dict[str, float]:
    """The measurements written for cell ``i``: confidence, gate and one probability per class."""
    values = {
        CONFIDENCE: float(predictions.probs[i].max()),
        GATE: float(predictions.gate[i]),
    }
    for j, name in enumerate(predictions.class_names):
        values[probability_name(name)] = float(predictions.probs[i, j])
    return {k: round(v, 5) for k, v in values.items()}


def prediction_features(
    cells: CellTable, predictions: Predictions, config: ModelConfig, *, point_radius_px: float = 4.0
) -> Iterator[dict]:
    """Yield one QuPath GeoJSON feature per cell, keeping the input feature's other properties.

    Cells from a GeoJSON input keep their object type, geometry and nucleus
    geometry; detected cells become detections with their nucleus polygon.
    """
    from nuclass_qupath.cells.geojson import prediction_feature
    from shapely.geometry import Point

    colors = {c.name: c.color for c in config.classes}
    predicted = predictions.predicted
    for i in range(len(cells)):
        if not math.isfinite(float(predictions.probs[i, 0])):
            continue
        class_name = predictions.class_names[int(predicted[i])]
        base = cells.features[i]
        geometry = cells.geometries[i]
        nucleus = None
        object_type = "detection"
        if base is not None:
            props = base.get("properties") or {}
            object_type = props.get("objectType", "detection")
            geometry = base.get("geometry")
            nucleus = props.get("nucleusGeometry")
        if geometry is None:
            x, y = cells.centroids_px[i]
            geometry = Point(float(x), float(y)).buffer(point_radius_px, quad_segs=4)
        yield prediction_feature(
            cell_id=cells.ids[i],
            geometry=geometry,
            nucleus_geometry=nucleus,
            object_type=object_type,
            class_name=class_name,
            color=colors[class_name],
            measurements=cell_measurements(predictions, i),
            base_feature=base,
        )


def class_counts(predictions: Predictions) -> dict[str, int]:
    counts = np.bincount(predictions.predicted, minlength=len(predictions.class_names)) if len(predictions) else []
    return {name: int(c) for name, c in zip(predictions.class_names, counts)}

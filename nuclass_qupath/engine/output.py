"""Turn predictions into QuPath objects: GeoJSON features with class and measurements."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from nuclass_qupath.cells.table import CellTable
from nuclass_qupath.engine.predictions import Predictions
from nuclass_qupath.model.config import ModelConfig

MEASUREMENT_PREFIX = "NuClass: "
CONFIDENCE = f"{MEASUREMENT_PREFIX}confidence"
GATE = f"{MEASUREMENT_PREFIX}gate"
# Decimals kept for the measurements written.
MEASUREMENT_DECIMALS = 5
# Cells converted together: geometries, measurements and rounding run as one
# numpy call per chunk, and a chunk of features is at most a few MB.
FEATURE_CHUNK = 4096


def probability_name(class_name: str) -> str:
    """Return the measurement name of a class probability, e.g. ``NuClass: p(Tumor)``."""
    return f"{MEASUREMENT_PREFIX}p({class_name})"


def cell_measurements(predictions: Predictions, i: int) -> dict[str, float]:
    """Return the measurements written for cell ``i``: confidence, gate and one probability per class."""
    values = {
        CONFIDENCE: float(predictions.probs[i].max()),
        GATE: float(predictions.gate[i]),
    }
    for j, name in enumerate(predictions.class_names):
        values[probability_name(name)] = float(predictions.probs[i, j])
    return {k: round(v, MEASUREMENT_DECIMALS) for k, v in values.items()}


def prediction_features(
    cells: CellTable, predictions: Predictions, config: ModelConfig, *, point_radius_px: float = 4.0
) -> Iterator[dict]:
    """Yield one QuPath GeoJSON feature per cell, keeping the input feature's other properties.

    Cells from a GeoJSON input keep their object type, geometry and nucleus
    geometry; detected cells become detections with their nucleus polygon.
    Cells without a finite prediction are left out.
    """
    for start in range(0, len(cells), FEATURE_CHUNK):
        index = np.arange(start, min(start + FEATURE_CHUNK, len(cells)))
        yield from batch_features(
            cells, index, predictions.probs[index], predictions.gate[index], predictions.class_names, config,
            point_radius_px=point_radius_px,
        )


def batch_features(
    cells: CellTable,
    index: np.ndarray,
    probs: np.ndarray,
    gate: np.ndarray,
    class_names: Sequence[str],
    config: ModelConfig,
    *,
    point_radius_px: float = 4.0,
) -> Iterator[dict]:
    """Yield the features of the cells at positions ``index`` of ``cells``, given their (N, C) probabilities and gate.

    The features are those :func:`prediction_features` writes; a streaming
    writer calls this once per batch of the engine.
    """
    from nuclass_qupath.cells.geojson import prediction_feature
    from nuclass_qupath.cells.geojson_write import classification_json, polygons_to_geojson

    probs = np.asarray(probs, dtype=np.float64)
    finite = np.isfinite(probs[:, 0]) if len(probs) else np.zeros(0, dtype=bool)
    colors = {c.name: c.color for c in config.classes}
    predicted = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)

    # Measurements of the whole batch, rounded at once.
    values = np.column_stack([probs.max(axis=1), np.asarray(gate, dtype=np.float64), probs])
    rows = np.round(values, MEASUREMENT_DECIMALS).tolist()
    names = [CONFIDENCE, GATE, *(probability_name(name) for name in class_names)]

    # Detected cells carry shapely polygons; convert those in one go.
    positions = index.tolist()
    bases = [cells.features[i] for i in positions]
    shapes = [cells.geometries[i] if bases[k] is None else None for k, i in enumerate(positions)]
    converted = polygons_to_geojson(shapes)

    classifications = {name: classification_json(name, colors[name]) for name in class_names}
    for k, i in enumerate(positions):
        if not finite[k]:
            continue
        class_name = class_names[int(predicted[k])]
        base = bases[k]
        if base is None and converted[k] is not None and all(math.isfinite(v) for v in rows[k]):
            # What prediction_feature makes of a detection without an input feature, built directly.
            yield {
                "type": "Feature",
                "id": str(cells.ids[i]),
                "geometry": converted[k],
                "properties": {
                    "objectType": "detection",
                    "classification": _copy_classification(classifications[class_name]),
                    "measurements": dict(zip(names, rows[k])),
                },
            }
            continue
        geometry = converted[k] if converted[k] is not None else cells.geometries[i]
        nucleus = None
        object_type = "detection"
        if base is not None:
            props = base.get("properties") or {}
            object_type = props.get("objectType", "detection")
            geometry = base.get("geometry")
            nucleus = props.get("nucleusGeometry")
        if geometry is None:
            from shapely.geometry import Point

            x, y = cells.centroids_px[i]
            geometry = Point(float(x), float(y)).buffer(point_radius_px, quad_segs=4)
        yield prediction_feature(
            cell_id=cells.ids[i],
            geometry=geometry,
            nucleus_geometry=nucleus,
            object_type=object_type,
            class_name=class_name,
            color=colors[class_name],
            measurements=dict(zip(names, rows[k])),
            base_feature=base,
        )


def _copy_classification(classification: dict) -> dict:
    # Each feature gets its own lists, so that a caller editing one feature changes no other.
    return {key: list(value) if isinstance(value, list) else value for key, value in classification.items()}


def class_counts(predictions: Predictions) -> dict[str, int]:
    """Return the number of cells per predicted class, in the model's class order."""
    counts = np.bincount(predictions.predicted, minlength=len(predictions.class_names)) if len(predictions) else []
    return {name: int(c) for name, c in zip(predictions.class_names, counts)}

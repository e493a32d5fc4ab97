"""Rules for the classes, measurements and tiles this package writes into QuPath objects, and their re-runs.

Pure Python on QuPath-dialect GeoJSON features (the dicts QuPath's own
GeoJSON export writes), so the paquo layer, the GeoJSON export and the tests
share one set of rules. The Groovy scripts in ``groovy/`` repeat the same
rules in QuPath's script language; a change here must be made there too.

The rules:

* Every measurement this package writes starts with :data:`MEASUREMENT_PREFIX`
  (``"NuClass: "``). A re-run removes every measurement with that prefix,
  including ``NuClass: p(<class>)`` of classes the new model no longer has,
  then writes the new ones. No other measurement is touched.
* The classification of an object with a result is replaced by the predicted
  class; an object without a result keeps its class.
* Heatmap tiles are QuPath tile objects named :data:`TILE_NAME` that carry
  :data:`TILE_CELLS_MEASUREMENT`. A re-run removes all such tiles before adding
  the new ones, so tiles are never duplicated.
* Object ids (QuPath UUIDs) are never changed; results are matched by id.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Point, Polygon, shape
from shapely.errors import GEOSException
from shapely.geometry.base import BaseGeometry

from nuclass_qupath.cells.table import CellTable
from nuclass_qupath.errors import CellsError

logger = logging.getLogger(__name__)

MEASUREMENT_PREFIX = "NuClass: "
CONFIDENCE_MEASUREMENT = MEASUREMENT_PREFIX + "confidence"
GATE_MEASUREMENT = MEASUREMENT_PREFIX + "gate"

TILE_NAME = "NuClass heatmap"
TILE_CELLS_MEASUREMENT = MEASUREMENT_PREFIX + "cells"
TILE_MEAN_CONFIDENCE_MEASUREMENT = MEASUREMENT_PREFIX + "mean confidence"

# Keys of the image entry metadata in project.qpproj.
METADATA_MODEL_KEY = "NuClass model"
METADATA_VERSION_KEY = "NuClass version"

# Results of a shell batch run: <project folder>/nuclass_results/<image name>.nuclass.geojson
RESULTS_DIR_NAME = "nuclass_results"
RESULTS_SUFFIX = ".nuclass.geojson"

# Object types that can be classified; tiles, annotations and TMA cores never are.
CELL_OBJECT_TYPES = ("cell", "detection")

RGB = tuple[int, int, int]


def probability_measurement(class_name: str) -> str:
    """Return the measurement name of the probability of ``class_name``: ``NuClass: p(<class>)``."""
    return f"{MEASUREMENT_PREFIX}p({class_name})"


def fraction_measurement(class_name: str) -> str:
    """Return the tile measurement name of the fraction of cells of ``class_name``."""
    return f"{MEASUREMENT_PREFIX}fraction {class_name}"


def is_nuclass_measurement(name: str) -> bool:
    """Return whether a measurement name is one this package writes (and so replaces on a re-run)."""
    return name.startswith(MEASUREMENT_PREFIX)


def merge_measurements(existing: Mapping[str, float], new: Mapping[str, float]) -> dict[str, float]:
    """Replace this package's measurements in ``existing`` by ``new``; keep all others unchanged.

    Every name in ``existing`` that starts with :data:`MEASUREMENT_PREFIX` is
    dropped, including names the new results do not contain. The other
    measurements keep their values and order; the new ones follow them.

    Raises
    ------
    CellsError
        If a name in ``new`` lacks the prefix, because writing it could
        overwrite a measurement made by QuPath or by the user.
    """
    foreign = [name for name in new if not is_nuclass_measurement(name)]
    if foreign:
        raise CellsError(
            f"measurement names {foreign[:3]} do not start with {MEASUREMENT_PREFIX!r}; "
            "this package writes only measurements with that prefix"
        )
    merged = {name: value for name, value in existing.items() if not is_nuclass_measurement(name)}
    merged.update(new)
    return merged


def feature_properties(feature_or_props: Mapping[str, Any]) -> Mapping[str, Any]:
    """Return the ``properties`` of a GeoJSON feature, or the argument itself if it is already properties."""
    if feature_or_props.get("type") == "Feature" or "geometry" in feature_or_props:
        return feature_or_props.get("properties") or {}
    return feature_or_props


def is_nuclass_tile(feature_or_props: Mapping[str, Any]) -> bool:
    """Return whether a feature (or its properties) is a heatmap tile written by this package.

    A tile is ours when its object type is ``tile`` and it is named
    :data:`TILE_NAME` or carries the :data:`TILE_CELLS_MEASUREMENT`
    measurement, so a tile renamed by the user is still recognised.
    """
    props = feature_properties(feature_or_props)
    if props.get("objectType") != "tile":
        return False
    if props.get("name") == TILE_NAME:
        return True
    return TILE_CELLS_MEASUREMENT in _measurements_of(props)


def results_file_name(image_name: str) -> str:
    """Return the batch-results file name for a QuPath image name, with path separators replaced."""
    safe = re.sub(r"[/\\:]", "_", image_name).strip() or "image"
    return safe + RESULTS_SUFFIX


def run_metadata_path(results_path: str | Path) -> Path:
    """Return the run metadata JSON written beside a results file (``X.nuclass.geojson`` -> ``X.nuclass.run.json``).

    The file records ``version`` (of nuclass-qupath) and ``model.model_id``,
    which the Groovy scripts copy into the image metadata.
    """
    path = Path(results_path)
    name = path.name
    for suffix in (".geojson.gz", ".json.gz", ".geojson", ".json", ".gz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(name + ".run.json")


def default_results_dir(project_path: str | Path) -> Path:
    """Return ``<project folder>/nuclass_results`` for a project folder or its ``project.qpproj``."""
    path = Path(project_path)
    folder = path.parent if path.suffix == ".qpproj" else path
    return folder / RESULTS_DIR_NAME


@dataclass(frozen=True)
class ObjectResult:
    """The result for one QuPath object: its new class and its ``NuClass: `` measurements."""

    class_name: str | None
    measurements: dict[str, float] = field(default_factory=dict)


def results_from_predictions(
    ids: Sequence[str],
    class_names: Sequence[str],
    probs: np.ndarray,
    confidence: np.ndarray,
    *,
    gate: np.ndarray | None = None,
    predicted: np.ndarray | None = None,
) -> dict[str, ObjectResult]:
    """Build per-object results from prediction arrays.

    Parameters
    ----------
    ids
        Object ids (QuPath UUIDs), one per row.
    class_names
        Model class names, one per column of ``probs``.
    probs
        ``(N, C)`` class probabilities.
    confidence
        ``(N,)`` confidence per object.
    gate
        Optional ``(N,)`` gate value per object (the weight of the global path).
    predicted
        Optional ``(N,)`` predicted class index; the argmax of ``probs`` if omitted.

    Returns
    -------
    dict
        ``id -> ObjectResult`` with ``NuClass: confidence``, ``NuClass: gate``
        (when given) and ``NuClass: p(<class>)`` per class.
    """
    probs = np.asarray(probs, dtype=np.float64)
    n = len(ids)
    if probs.ndim != 2 or probs.shape != (n, len(class_names)):
        raise CellsError(
            f"probs has shape {probs.shape}, expected ({n}, {len(class_names)}) for "
            f"{n} ids and {len(class_names)} classes"
        )
    confidence = _column(confidence, n, "confidence")
    gate = None if gate is None else _column(gate, n, "gate")
    if predicted is None:
        predicted = probs.argmax(axis=1) if n else np.zeros(0, dtype=int)
    predicted = np.asarray(predicted, dtype=np.int64).reshape(-1)
    if len(predicted) != n or (n and (predicted.min() < 0 or predicted.max() >= len(class_names))):
        raise CellsError(f"predicted must hold {n} class indices in 0..{len(class_names) - 1}")

    prob_names = [probability_measurement(name) for name in class_names]
    results: dict[str, ObjectResult] = {}
    for i, object_id in enumerate(ids):
        measurements = {CONFIDENCE_MEASUREMENT: float(confidence[i])}
        if gate is not None:
            measurements[GATE_MEASUREMENT] = float(gate[i])
        measurements.update(zip(prob_names, probs[i].tolist()))
        results[str(object_id)] = ObjectResult(class_names[int(predicted[i])], measurements)
    return results


def results_from_features(features: Iterable[Mapping[str, Any]]) -> dict[str, ObjectResult]:
    """Read per-object results from classified GeoJSON features (the output of ``classify``).

    Only features with an ``id`` are used; tiles are skipped. The class is the
    feature's classification name (``None`` when unclassified), and the
    measurements are those that start with :data:`MEASUREMENT_PREFIX`.
    """
    results: dict[str, ObjectResult] = {}
    for feature in features:
        props = feature.get("properties") or {}
        object_id = feature.get("id")
        if object_id is None or props.get("objectType") == "tile":
            continue
        measurements = {
            name: float(value)
            for name, value in _measurements_of(props).items()
            if is_nuclass_measurement(name) and value is not None
        }
        results[str(object_id)] = ObjectResult(classification_name(props), measurements)
    return results


def class_colors(classes: Iterable[Any]) -> dict[str, RGB]:
    """Return ``name -> (r, g, b)`` from model class specs (objects with ``.name`` and ``.color``) or pairs."""
    colors: dict[str, RGB] = {}
    for spec in classes:
        if hasattr(spec, "name") and hasattr(spec, "color"):
            name, color = spec.name, spec.color
        else:
            name, color = spec
        rgb = tuple(int(c) for c in color)
        if len(rgb) != 3 or any(not 0 <= c <= 255 for c in rgb):
            raise CellsError(f"colour of class {name!r} must be three values in 0-255, got {color!r}")
        colors[str(name)] = rgb  # type: ignore[assignment]
    return colors


def classification_name(props: Mapping[str, Any]) -> str | None:
    """Return the class name of a feature's properties as QuPath shows it (``"Tumor: Positive"``), or None."""
    classification = props.get("classification")
    if not classification:
        return None
    if isinstance(classification, str):
        return classification
    if "names" in classification:
        return ": ".join(classification["names"])
    return classification.get("name")


@dataclass
class ApplyStats:
    """Counts from applying results to a list of features."""

    classified: int = 0
    results_without_object: int = 0
    tiles_removed: int = 0
    tiles_added: int = 0


def apply_results_to_features(
    features: Sequence[Mapping[str, Any]],
    results: Mapping[str, ObjectResult],
    *,
    colors: Mapping[str, RGB],
    tiles: Sequence[Mapping[str, Any]] | None = None,
) -> tuple[list[dict], ApplyStats]:
    """Apply results to QuPath GeoJSON features by id, following the module's merge rules.

    Features are copied, never changed in place. An object with a result gets
    the result's class (coloured from ``colors``; a class missing there keeps
    no colour) and its measurements merged with :func:`merge_measurements`.
    When ``tiles`` is given, existing heatmap tiles of this package are removed
    and ``tiles`` are appended; with ``tiles=None`` existing tiles stay.
    Applying the same results twice gives the same features as applying them once.
    """
    stats = ApplyStats()
    matched: set[str] = set()
    output: list[dict] = []
    for feature in features:
        if tiles is not None and is_nuclass_tile(feature):
            stats.tiles_removed += 1
            continue
        object_id = feature.get("id")
        result = results.get(str(object_id)) if object_id is not None else None
        if result is None:
            output.append(dict(feature))
            continue
        props = dict(feature.get("properties") or {})
        props["measurements"] = merge_measurements(_measurements_of(props), result.measurements)
        if result.class_name is not None:
            classification: dict[str, Any] = {"name": result.class_name}
            if result.class_name in colors:
                classification["color"] = list(colors[result.class_name])
            props["classification"] = classification
        updated = dict(feature)
        updated["properties"] = props
        output.append(updated)
        matched.add(str(object_id))
        stats.classified += 1
    stats.results_without_object = len(set(results) - matched)
    if tiles is not None:
        output.extend(dict(tile) for tile in tiles)
        stats.tiles_added = len(tiles)
    return output, stats


def annotation_region(features: Iterable[Mapping[str, Any]], class_name: str) -> BaseGeometry | None:
    """Return the union of the area ROIs of annotations classified ``class_name``, or None if there are none.

    Points and lines are ignored because they enclose no cells. The class is
    compared with the name QuPath shows, so a derived class is ``"Tumor: Positive"``.
    """
    parts = []
    for feature in features:
        props = feature.get("properties") or {}
        if props.get("objectType") != "annotation" or classification_name(props) != class_name:
            continue
        geometry = _shape_or_none(feature.get("geometry"))
        if geometry is None:
            continue
        if not geometry.is_valid:
            geometry = shapely.make_valid(geometry)
        area = _polygonal_part(geometry)
        if area is not None:
            parts.append(area)
    if not parts:
        return None
    return shapely.union_all(parts)


def features_to_cell_table(
    features: Iterable[Mapping[str, Any]],
    *,
    object_types: Sequence[str] = CELL_OBJECT_TYPES,
    region: BaseGeometry | None = None,
) -> tuple[CellTable, Counter]:
    """Convert QuPath GeoJSON features of cells and detections into a :class:`CellTable`.

    Coordinates stay in QuPath level-0 pixels. For a cell the nucleus outline
    (``nucleusGeometry``) is used, else the object's geometry. Objects the model
    cannot take are skipped and counted under a reason in the returned counter:

    * ``no id``: features without an ``id``, because results are matched by id.
    * ``no ROI`` / ``empty ROI``: nothing to place the object.
    * ``line ROI``: lines and polylines enclose no nucleus.
    * ``multi-point ROI``: several points in one object are several cells, not one.

    Kept with a count, because the object still marks one nucleus:

    * ``point ROI``: the point becomes the centroid; no outline.
    * ``cell without nucleus ROI``: the cell outline is used.
    * ``polygon with holes``: holes are filled.
    * ``multi-part ROI``: the largest polygon is used (QuPath also writes a
      self-intersecting polygon as several parts).

    ``region``, if given, keeps only objects whose centroid lies inside it,
    which is QuPath's own rule for detections inside an annotation.
    Each table row keeps its feature in ``features`` and its class name in ``labels``.
    """
    allowed = set(object_types)
    notes: Counter = Counter()
    ids: list[str] = []
    centroids: list[tuple[float, float]] = []
    geometries: list[BaseGeometry | None] = []
    labels: list[str | None] = []
    kept: list[dict | None] = []
    for feature in features:
        props = feature.get("properties") or {}
        if props.get("objectType") not in allowed:
            continue
        object_id = feature.get("id")
        if object_id is None:
            notes["no id"] += 1
            continue
        raw = feature.get("nucleusGeometry")
        if raw is None:
            raw = feature.get("geometry")
            if props.get("objectType") == "cell" and raw is not None:
                notes["cell without nucleus ROI"] += 1
        nucleus, reason = _nucleus_geometry(raw)
        if reason is not None:
            notes[reason] += 1
        if nucleus is None:
            continue
        point = nucleus if isinstance(nucleus, Point) else nucleus.centroid
        ids.append(str(object_id))
        centroids.append((point.x, point.y))
        geometries.append(None if isinstance(nucleus, Point) else nucleus)
        labels.append(classification_name(props))
        kept.append(feature if isinstance(feature, dict) else dict(feature))
    table = CellTable(
        ids=ids,
        centroids_px=np.asarray(centroids, dtype=np.float64).reshape(-1, 2),
        geometries=geometries,
        labels=labels,
        features=kept,
    )
    if region is not None and len(table):
        inside = shapely.contains_xy(region, table.centroids_px[:, 0], table.centroids_px[:, 1])
        notes["outside region"] += int((~inside).sum())
        table = table.subset(inside)
    return table, notes


def log_skipped(notes: Counter, *, source: str) -> None:
    """Log one warning per reason in ``notes`` from :func:`features_to_cell_table`."""
    skipped = {"no id", "no ROI", "empty ROI", "line ROI", "multi-point ROI"}
    for reason, count in sorted(notes.items()):
        if reason == "outside region":
            continue
        action = "skipped" if reason in skipped else "kept"
        logger.warning("%s: %d object(s) with %s %s", source, count, reason, action)


def _nucleus_geometry(raw: Mapping[str, Any] | None) -> tuple[BaseGeometry | None, str | None]:
    """Return the geometry to classify (a polygon or a point) and the note to count, if any."""
    geometry = _shape_or_none(raw)
    if geometry is None:
        return None, "no ROI"
    if geometry.is_empty:
        return None, "empty ROI"
    kind = geometry.geom_type
    if kind == "Point":
        return geometry, "point ROI"
    if kind == "MultiPoint":
        if len(geometry.geoms) == 1:
            return geometry.geoms[0], "point ROI"
        return None, "multi-point ROI"
    if kind in ("LineString", "MultiLineString", "LinearRing"):
        return None, "line ROI"
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry)
    polygon = _polygonal_part(geometry)
    if polygon is None:
        return None, "line ROI"
    note = None
    if isinstance(polygon, MultiPolygon):
        polygon = max(polygon.geoms, key=lambda part: part.area)
        note = "multi-part ROI"
    if polygon.interiors:
        polygon = Polygon(polygon.exterior)
        note = note or "polygon with holes"
    return polygon, note


def _polygonal_part(geometry: BaseGeometry) -> Polygon | MultiPolygon | None:
    """Return the polygons of a geometry (dropping points and lines of a collection), or None."""
    if isinstance(geometry, (Polygon, MultiPolygon)):
        return geometry if geometry.area > 0 else None
    if geometry.geom_type == "GeometryCollection":
        polygons = [g for g in geometry.geoms if isinstance(g, (Polygon, MultiPolygon)) and g.area > 0]
        if not polygons:
            return None
        merged = shapely.union_all(polygons)
        return merged if isinstance(merged, (Polygon, MultiPolygon)) else None
    return None


def _shape_or_none(raw: Mapping[str, Any] | None) -> BaseGeometry | None:
    if not raw:
        return None
    try:
        return shape(raw)
    except (ValueError, TypeError, KeyError, AttributeError, GEOSException) as exc:
        logger.debug("unreadable geometry %r: %s", raw.get("type"), exc)
        return None


def _measurements_of(props: Mapping[str, Any]) -> dict[str, float]:
    """Return measurements as a dict; QuPath before 0.4 wrote a list of ``{name, value}``."""
    measurements = props.get("measurements") or {}
    if isinstance(measurements, list):
        return {m["name"]: m.get("value", math.nan) for m in measurements}
    return dict(measurements)


def _column(values: Any, n: int, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(array) != n:
        raise CellsError(f"{name} has {len(array)} values, expected {n}")
    return array

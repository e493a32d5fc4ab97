"""Read cells from QuPath-dialect GeoJSON.

QuPath (0.4 to 0.6) exports each object as a GeoJSON ``Feature`` whose ``id`` is
the object's UUID. The object type sits in ``properties.objectType``
(``annotation``, ``detection``, ``cell``, ``tile``, ``tmaCore``), the class in
``properties.classification`` as ``{"name": ..., "color": [r, g, b]}`` or, for a
derived class, ``{"names": [...], "color": ...}``, and a cell's nucleus outline
in a ``nucleusGeometry`` member next to ``geometry``. Coordinates are level-0
pixels of the image, origin top-left. Older exports (QuPath 0.2 and 0.3) put the
object type in the feature ``id``, which the reader also understands.

The file is parsed one feature at a time (see
:mod:`nuclass_qupath.cells.geojson_stream`), so the JSON text of a large export
is never in memory as a whole.
"""

from __future__ import annotations

import collections
import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from nuclass_qupath.cells.geojson_stream import iter_geojson_features
from nuclass_qupath.cells.table import CellTable
from nuclass_qupath.errors import CellsError

logger = logging.getLogger(__name__)

#: Object types that :func:`read_cells_geojson` can return as cells.
CELL_OBJECT_TYPES = ("detection", "cell", "annotation", "tile")

# QuPath's spellings of each object type: current names, the 0.2 class names
# that were stored in the feature id, and the snake_case alias its reader accepts.
_OBJECT_TYPE_ALIASES = {
    "detection": "detection",
    "PathDetectionObject": "detection",
    "cell": "cell",
    "PathCellObject": "cell",
    "annotation": "annotation",
    "PathAnnotationObject": "annotation",
    "tile": "tile",
    "PathTileObject": "tile",
    "tmaCore": "tmaCore",
    "tma_core": "tmaCore",
    "TMACoreObject": "tmaCore",
    "root": "root",
    "PathRootObject": "root",
}
_LEGACY_TYPE_IDS = {name for name in _OBJECT_TYPE_ALIASES if name.startswith(("Path", "TMA"))}

# An annotation is a region (a parent in QuPath's hierarchy), not a cell, when
# it contains the centroid of another object with less than this share of its area.
_REGION_AREA_RATIO = 0.5



class _Where:
    """Feature index and id for error messages, formatted only when a message is built."""

    __slots__ = ("index", "feature_id")

    def __init__(self, index: int, feature_id: Any) -> None:
        self.index = index
        self.feature_id = feature_id

    def __str__(self) -> str:
        return f"feature {self.index}" + (f" (id {self.feature_id})" if self.feature_id is not None else "")


def _object_type(feature: dict, properties: dict) -> tuple[str, bool]:
    """Return the normalised object type and whether the spelling was recognised.

    Unknown or missing types become ``annotation``, as in QuPath's own import.
    """
    for key in ("objectType", "object_type", "type"):
        value = properties.get(key)
        if isinstance(value, str):
            normalised = _OBJECT_TYPE_ALIASES.get(value)
            return (normalised, True) if normalised else ("annotation", False)
    legacy = feature.get("id")
    if isinstance(legacy, str) and legacy in _LEGACY_TYPE_IDS:
        return _OBJECT_TYPE_ALIASES[legacy], True
    return "annotation", True


def _feature_id(feature: dict, properties: dict) -> str | None:
    for value in (feature.get("id"), properties.get("id")):
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (str, int)):
            text = str(value).strip()
            if text and text not in _LEGACY_TYPE_IDS:
                return text
    return None


def _class_name(properties: dict, where: str, source: str) -> str | None:
    """Return QuPath's class string: ``name``, or ``names`` joined with ": " for a derived class."""
    classification = properties.get("classification")
    if classification is None:
        return None
    if isinstance(classification, str):
        return classification.strip() or None
    if isinstance(classification, dict):
        names = classification.get("names")
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return ": ".join(names)
        name = classification.get("name")
        if isinstance(name, str):
            return name.strip() or None
        if not classification or "colorRGB" in classification or "parentClass" in classification:
            return None
    raise CellsError(
        f"{source}: {where} has a classification QuPath cannot read: {classification!r}; "
        'expected {"name": "Tumor", "color": [r, g, b]}, {"names": [...], ...} or a class name string'
    )


def _coordinates(value: Any, where: _Where, source: str, *, check_finite: bool = True) -> np.ndarray:
    """Convert a GeoJSON position list to an ``(n, 2)`` float64 array of x, y."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CellsError(
            f"{source}: {where} has coordinates that are not a list of [x, y] number pairs ({exc}); "
            "fix or remove that feature"
        ) from exc
    if array.ndim != 2 or array.shape[1] < 2:
        raise CellsError(
            f"{source}: {where} has coordinates of shape {array.shape}, expected a list of [x, y] "
            "number pairs; fix or remove that feature"
        )
    if check_finite and not np.isfinite(array[:, :2]).all():
        raise _non_finite_error(where, source)
    return array[:, :2]


def _non_finite_error(where: _Where, source: str) -> CellsError:
    return CellsError(f"{source}: {where} has NaN or infinite coordinates; fix or remove that feature")


class _Skip(Exception):
    """A feature whose geometry cannot be a cell (a line, a polygon with fewer than 3 vertices)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _ring(value: Any, where: _Where, source: str, *, check_finite: bool = True) -> np.ndarray:
    """Return the vertices of one polygon ring, raising _Skip when fewer than 3 remain."""
    if isinstance(value, list) and len(value) - int(len(value) > 1 and value[0] == value[-1]) < 3:
        raise _Skip("polygon with fewer than 3 vertices")
    return _coordinates(value, where, source, check_finite=check_finite)


def _polygon(rings: Any, where: _Where, source: str) -> shapely.Polygon:
    if not isinstance(rings, list) or not rings:
        raise _Skip("empty polygon")
    arrays = [_ring(ring, where, source) for ring in rings]
    return shapely.polygons(arrays[0], holes=arrays[1:] or None)


def _parse_geometry(geometry: Any, where: _Where, source: str) -> tuple[str, Any]:
    """Check a GeoJSON geometry and return it as ``(kind, value)`` for :class:`_Collected`.

    ``kind`` is one of:

    - ``"point"`` with an ``(x, y)`` tuple,
    - ``"ring"`` with the vertex array of a polygon without holes, built later
      in batches because that is about ten times faster than one by one,
    - ``"points"`` with the ``(n, 2)`` array of a MultiPoint,
    - ``"shape"`` with a shapely Polygon or MultiPolygon.

    Raises ``_Skip`` for lines and geometry collections, and CellsError for
    malformed input.
    """
    if not isinstance(geometry, dict):
        raise CellsError(
            f"{source}: {where} has no geometry (found {geometry!r}); every QuPath object has a ROI, "
            "so give the feature a Point or Polygon geometry or remove it"
        )
    kind = geometry.get("type")
    coordinates = geometry.get("coordinates")
    if kind in ("LineString", "MultiLineString", "GeometryCollection"):
        raise _Skip(kind)
    if coordinates is None:
        raise CellsError(f"{source}: {where} has a {kind!r} geometry without coordinates; fix or remove it")
    if kind == "Point":
        x, y = _coordinates([coordinates], where, source)[0]
        return "point", (x, y)
    if kind == "MultiPoint":
        if not coordinates:
            raise _Skip("empty MultiPoint")
        return "points", _coordinates(coordinates, where, source)
    if kind == "Polygon":
        if isinstance(coordinates, list) and len(coordinates) == 1:
            return "ring", _ring(coordinates[0], where, source, check_finite=False)
        return "shape", _polygon(coordinates, where, source)
    if kind == "MultiPolygon":
        if not isinstance(coordinates, list) or not coordinates:
            raise _Skip("empty MultiPolygon")
        return "shape", shapely.multipolygons([_polygon(rings, where, source) for rings in coordinates])
    raise CellsError(
        f"{source}: {where} has geometry type {kind!r}; expected Point, MultiPoint, Polygon or MultiPolygon"
    )


def _polygonal_part(geometry: Any) -> Any:
    """Return the Polygon or MultiPolygon inside a ``make_valid`` result, or None if it has no area."""
    if isinstance(geometry, (shapely.Polygon, shapely.MultiPolygon)):
        return geometry
    polygons = [g for g in getattr(geometry, "geoms", []) if isinstance(g, (shapely.Polygon, shapely.MultiPolygon))]
    if not polygons:
        return None
    return shapely.union_all(polygons)


def assign_unique_ids(ids: Iterable[str | None], *, source: str) -> list[str]:
    """Return ``ids`` with a new UUID4 for each missing id and for each repeat of an earlier id.

    A repeated id is logged once as a warning with the count, because QuPath
    keeps one object per UUID and would merge or drop the repeats.
    """
    result: list[str] = []
    seen: set[str] = set()
    duplicates: list[str] = []
    for value in ids:
        if value is None:
            value = str(uuid.uuid4())
        elif value in seen:
            duplicates.append(value)
            value = str(uuid.uuid4())
        seen.add(value)
        result.append(value)
    if duplicates:
        logger.warning(
            "%s: %d objects repeat an earlier id (first: %s); they were given new UUIDs",
            source,
            len(duplicates),
            duplicates[0],
        )
    return result


def _point_ids(feature_id: str | None, count: int) -> list[str | None]:
    """Give each point of a MultiPoint a stable id derived from the feature id."""
    if feature_id is None:
        return [None] * count
    return [str(uuid.uuid5(uuid.NAMESPACE_URL, f"qupath-point:{feature_id}:{k}")) for k in range(count)]


def _region_mask(geometries: np.ndarray, areas: np.ndarray, centroids: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Mark annotations that contain the centroid of a much smaller object as regions."""
    regions = np.zeros(len(geometries), dtype=bool)
    rows = np.flatnonzero(candidates & (areas > 0))
    if len(rows) == 0 or len(geometries) < 2:
        return regions
    tree = shapely.STRtree(shapely.points(centroids))
    outer, inner = tree.query(geometries[rows], predicate="contains")
    outer_rows = rows[outer]
    is_child = (inner != outer_rows) & (areas[inner] < _REGION_AREA_RATIO * areas[outer_rows])
    regions[outer_rows[is_child]] = True
    return regions


class _Collected:
    """Parallel lists of the objects found in one file, one entry per future cell.

    Points and polygons without holes are queued and turned into shapely
    geometries in batches of ``_BATCH`` by :meth:`flush`.
    """

    _BATCH = 65536

    def __init__(self, source: str) -> None:
        self.source = source
        self.types: list[str] = []
        self.ids: list[str | None] = []
        self.labels: list[str | None] = []
        self.geometries: list[Any] = []
        self.features: list[dict | None] = []
        self._ring_rows: list[int] = []
        self._ring_wheres: list[_Where] = []
        self._rings: list[np.ndarray] = []
        self._point_rows: list[int] = []
        self._points: list[tuple[float, float]] = []

    def add(self, object_type: str, feature_id: str | None, label: str | None, feature: dict | None) -> int:
        self.types.append(object_type)
        self.ids.append(feature_id)
        self.labels.append(label)
        self.geometries.append(None)
        self.features.append(feature)
        return len(self.types) - 1

    def add_geometry(self, row: int, kind: str, value: Any, where: _Where) -> None:
        if kind == "ring":
            self._ring_rows.append(row)
            self._ring_wheres.append(where)
            self._rings.append(value)
            if len(self._rings) >= self._BATCH:
                self.flush()
        elif kind == "point":
            self._point_rows.append(row)
            self._points.append(value)
            if len(self._points) >= self._BATCH:
                self.flush()
        else:
            self.geometries[row] = value

    def flush(self) -> None:
        """Build the queued points and polygons."""
        if self._rings:
            lengths = np.fromiter((len(r) for r in self._rings), dtype=np.intp, count=len(self._rings))
            coordinates = np.concatenate(self._rings)
            finite = np.isfinite(coordinates).all(axis=1)
            if not finite.all():
                first_bad = int(np.searchsorted(np.cumsum(lengths), np.argmin(finite), side="right"))
                raise _non_finite_error(self._ring_wheres[first_bad], self.source)
            rings = shapely.linearrings(coordinates, indices=np.repeat(np.arange(len(lengths)), lengths))
            for row, polygon in zip(self._ring_rows, shapely.polygons(rings)):
                self.geometries[row] = polygon
            self._ring_rows, self._ring_wheres, self._rings = [], [], []
        if self._points:
            for row, point in zip(self._point_rows, shapely.points(np.asarray(self._points, dtype=np.float64))):
                self.geometries[row] = point
            self._point_rows, self._points = [], []


def _validate_object_types(object_types: Iterable[str] | None) -> set[str] | None:
    if object_types is None:
        return None
    if isinstance(object_types, str):
        object_types = [object_types]
    requested_types = set()
    for name in object_types:
        normalised = _OBJECT_TYPE_ALIASES.get(name)
        if normalised not in CELL_OBJECT_TYPES:
            raise CellsError(f"object type {name!r} cannot be read as cells; choose from {', '.join(CELL_OBJECT_TYPES)}")
        requested_types.add(normalised)
    return requested_types


def read_cells_geojson(
    path: str | os.PathLike,
    *,
    object_types: Iterable[str] | None = None,
    class_names: Iterable[str] | None = None,
    keep_features: bool = True,
) -> CellTable:
    """Read the cells of a QuPath GeoJSON export into a :class:`CellTable`.

    Parameters
    ----------
    path
        ``.geojson`` or ``.json`` file, plain or gzip-compressed, holding a
        FeatureCollection, an array of features or one Feature.
    object_types
        QuPath object types to read, from ``detection``, ``cell``,
        ``annotation`` and ``tile``. The default (None) reads detections and
        cells, and reads annotations only when the file has neither, because a
        file with cells usually also has the tissue or region annotations that
        contain them. Tiles are read only when listed.
    class_names
        Keep only cells of these classes (QuPath class strings such as
        ``"Tumor"`` or ``"Tumor: Positive"``). None keeps all, unclassified included.
    keep_features
        Store each input feature in ``CellTable.features``, so that names,
        measurements and metadata survive a round trip. False saves memory.

    Returns
    -------
    CellTable
        One row per cell. Centroids are level-0 pixels of the image the file
        was exported from: the nucleus centroid for a cell with a
        ``nucleusGeometry``, else the centroid of the object's geometry (for a
        MultiPolygon, of all its parts together). ``geometries`` contains the
        nucleus or object polygon, or None for point objects. Each point of a
        MultiPoint (QuPath's points annotation) becomes one cell with an id
        derived from the feature id.

    Raises
    ------
    CellsError
        If the file is missing or not GeoJSON, a feature has no or malformed
        geometry, or no usable cell remains (the message lists the object types
        found).

    Notes
    -----
    An annotation whose area contains the centroid of another object (of any
    type) less than half its size is a region, such as a tissue outline, and is
    never read as a cell. Lines are skipped with a warning. Invalid polygons
    (for example self-intersecting ones) are repaired with ``make_valid``, and
    the count is logged as a warning. Ids come from the feature ``id``, else
    ``properties.id``, else a new UUID4; repeated ids get new UUIDs.
    """
    path = Path(path)
    source = str(path)
    requested_types = _validate_object_types(object_types)
    class_filter = None if class_names is None else set(class_names)

    collected = _Collected(source)
    type_counts: collections.Counter[str] = collections.Counter()
    skipped: collections.Counter[tuple[str, str]] = collections.Counter()
    unknown_types: collections.Counter[str] = collections.Counter()
    n_features = 0

    for index, feature in enumerate(iter_geojson_features(path)):
        n_features += 1
        if not isinstance(feature, dict) or feature.get("type", "Feature") != "Feature":
            found = feature.get("type") if isinstance(feature, dict) else type(feature).__name__
            raise CellsError(f"{source}: feature {index} is {found!r}, not a GeoJSON Feature; fix or remove it")
        properties = feature.get("properties") or {}
        if not isinstance(properties, dict):
            raise CellsError(f"{source}: {_Where(index, feature.get('id'))} has properties that are not an object")

        object_type, known = _object_type(feature, properties)
        if not known:
            unknown_types[str(properties.get("objectType") or properties.get("object_type") or properties.get("type"))] += 1
        type_counts[object_type] += 1
        if object_type in ("tmaCore", "root"):
            continue

        feature_id = _feature_id(feature, properties)
        where = _Where(index, feature_id)
        label = _class_name(properties, where, source)

        # A cell's nucleus is the part to classify; a cell without one uses its outline.
        geometry = feature.get("geometry")
        if object_type == "cell":
            nucleus = feature.get("nucleusGeometry", properties.get("nucleusGeometry"))
            if nucleus is not None:
                geometry = nucleus
        try:
            kind, value = _parse_geometry(geometry, where, source)
        except _Skip as skip:
            skipped[object_type, skip.reason] += 1
            continue

        if kind != "points":
            row = collected.add(object_type, feature_id, label, feature if keep_features else None)
            collected.add_geometry(row, kind, value, where)
            continue
        # Each point of a MultiPoint (a QuPath points annotation) is one labelled cell.
        for point_id, (x, y) in zip(_point_ids(feature_id, len(value)), value.tolist()):
            point_feature = None
            if keep_features:
                point_feature = {
                    "type": "Feature",
                    "id": point_id,
                    "geometry": {"type": "Point", "coordinates": [x, y]},
                    "properties": properties,
                }
            row = collected.add(object_type, point_id, label, point_feature)
            collected.add_geometry(row, "point", (x, y), where)
    collected.flush()

    if unknown_types:
        logger.warning(
            "%s: %d features have an unknown object type (%s); they were read as annotations, as QuPath does",
            source,
            sum(unknown_types.values()),
            ", ".join(f"{k!r}: {v}" for k, v in unknown_types.items()),
        )
    geometries = np.empty(len(collected.geometries), dtype=object)
    geometries[:] = collected.geometries
    invalid = np.flatnonzero(~shapely.is_valid(geometries)) if len(geometries) else np.array([], dtype=int)
    for row in invalid:
        repaired = shapely.make_valid(geometries[row])
        polygonal = _polygonal_part(repaired)
        geometries[row] = polygonal if polygonal is not None else repaired
    if len(invalid):
        logger.warning(
            "%s: repaired %d invalid geometries with make_valid (self-intersections, for example)",
            source,
            len(invalid),
        )
    centroid_points = shapely.centroid(geometries)
    centroids = np.column_stack([shapely.get_x(centroid_points), shapely.get_y(centroid_points)]).reshape(-1, 2)
    areas = shapely.area(geometries)
    types = np.asarray(collected.types, dtype=object)

    if requested_types is None:
        has_cells = bool(type_counts["detection"] or type_counts["cell"])
        requested_types = {"detection", "cell"} if has_cells else {"annotation"}
        if has_cells and type_counts["annotation"]:
            logger.info(
                "%s: ignored %d annotations because the file has detections or cells; to classify them, "
                "export the annotations to a file of their own (in Python: object_types=('annotation',))",
                source,
                type_counts["annotation"],
            )
    skipped_requested = {key: n for key, n in skipped.items() if key[0] in requested_types}
    if skipped_requested:
        logger.warning(
            "%s: skipped %d objects without an area or a point (%s)",
            source,
            sum(skipped_requested.values()),
            ", ".join(f"{kind} {reason}: {n}" for (kind, reason), n in skipped_requested.items()),
        )
    keep = np.isin(types, sorted(requested_types)) & ~np.isnan(centroids[:, 0])
    if "annotation" in requested_types:
        regions = _region_mask(geometries, areas, centroids, keep & (types == "annotation"))
        if regions.any():
            logger.info("%s: %d annotations contain other objects and were read as regions, not cells", source, int(regions.sum()))
        keep &= ~regions
    if class_filter is not None:
        keep &= np.fromiter((label in class_filter for label in collected.labels), dtype=bool, count=len(types))

    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        present = ", ".join(f"{k}: {v}" for k, v in sorted(type_counts.items())) or "none"
        message = (
            f"no usable cell objects found in {source} ({n_features} features; object types present: {present}; "
            f"object types read: {', '.join(sorted(requested_types))}"
        )
        if class_filter is not None:
            labels_present = sorted({str(label) for label in collected.labels})
            message += f"; classes requested: {sorted(class_filter)}, classes present: {labels_present}"
        fix = "Export detections, cells or point annotations from QuPath"
        if object_types is not None or class_names is not None:
            # Only Python callers pass these; the CLI reads the default object types and every class.
            fix += ", or pass other object_types or class_names"
        raise CellsError(f"{message}). {fix}")

    ids = assign_unique_ids((collected.ids[i] for i in rows), source=source)
    table_geometries = [
        geometries[i] if isinstance(geometries[i], (shapely.Polygon, shapely.MultiPolygon)) else None for i in rows
    ]
    table = CellTable(
        ids=ids,
        centroids_px=centroids[rows],
        geometries=table_geometries,
        labels=[collected.labels[i] for i in rows],
        features=[collected.features[i] for i in rows],
    )
    kept_types = collections.Counter(types[rows].tolist())
    logger.info(
        "read %d cells from %s (%s) out of %d features",
        len(table),
        source,
        ", ".join(f"{k}: {v}" for k, v in sorted(kept_types.items())),
        n_features,
    )
    return table


def _fits(xy: np.ndarray, width_px: float, height_px: float) -> float:
    """Return the share of points inside ``[0, width) x [0, height)``."""
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < width_px) & (xy[:, 1] >= 0) & (xy[:, 1] < height_px)
    return float(inside.mean())


def _frame_hints(xy: np.ndarray, width_px: int, height_px: int, mpp: float | None) -> list[str]:
    """Name simple coordinate mix-ups under which at least 99% of the cells would fit the image."""
    hints = []
    if _fits(xy[:, ::-1], width_px, height_px) >= 0.99:
        hints.append("x and y look swapped")
    for factor in (2, 4, 8, 16, 32):
        if _fits(xy / factor, width_px, height_px) >= 0.99:
            hints.append(
                f"dividing by {factor} would fit them, so they may come from an image {factor} times "
                "larger (another pyramid level or scan)"
            )
            break
    if mpp and _fits(xy / mpp, width_px, height_px) >= 0.99:
        hints.append(f"they may be in µm: dividing by the pixel size {mpp} µm/px would fit them")
    return hints


def check_cells_in_image(
    cells: CellTable,
    width_px: int,
    height_px: int,
    *,
    source: str,
    max_outside_fraction: float = 0.01,
    mpp: float | None = None,
) -> np.ndarray:
    """Check that the cell centroids lie inside the image, and return the mask of those that do.

    Parameters
    ----------
    cells
        Cells with centroids in level-0 pixels (QuPath's image frame).
    width_px, height_px
        Level-0 size of the image in QuPath's frame.
    source
        Where the cells came from, for messages (a file name).
    max_outside_fraction
        Largest share of centroids outside ``[0, width) x [0, height)`` that is
        tolerated: below it the outliers are only logged, so that a few cells
        on the border do not stop a run.
    mpp
        Pixel size of the image in µm/px, used only to suggest a fix.

    Returns
    -------
    numpy.ndarray
        Boolean mask, True for cells whose centroid lies inside the image.

    Raises
    ------
    CellsError
        If more than ``max_outside_fraction`` of the centroids lie outside the
        image. The cells then look like they belong to another coordinate
        frame: exported from a cropped or different image, or written in µm
        instead of pixels. The message gives the counts, the bounding box of
        the cells and the image size.
    """
    xy = cells.centroids_px
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < width_px) & (xy[:, 1] >= 0) & (xy[:, 1] < height_px)
    n_outside = int((~inside).sum())
    if n_outside == 0:
        return inside

    min_x, min_y, max_x, max_y = cells.bounds_px()
    summary = (
        f"{n_outside} of {len(cells)} cells in {source} lie outside the image "
        f"(cells span x {min_x:.1f} to {max_x:.1f}, y {min_y:.1f} to {max_y:.1f} px; "
        f"the image is {width_px} x {height_px} px)"
    )
    if n_outside <= max_outside_fraction * len(cells):
        logger.warning("%s; those cells are left out", summary)
        return inside

    hints = _frame_hints(xy, width_px, height_px, mpp)
    hint_text = f" Possible cause: {'; '.join(hints)}." if hints else ""
    raise CellsError(
        f"{summary}. The cells look like they are in another coordinate frame, for example exported "
        "from a cropped or different image, or written in µm instead of level-0 pixels."
        f"{hint_text} Export the cells from the same image in QuPath, with coordinates in pixels."
    )

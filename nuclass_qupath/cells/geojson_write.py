"""Write QuPath-dialect GeoJSON that QuPath 0.4 to 0.6 imports.

The features follow what QuPath's own export writes and its import reads
(``PathObjectTypeAdapters`` and ``GsonTools`` in QuPath 0.6):

- ``id``: the object's UUID, at feature level.
- ``geometry``: the object ROI.
- ``nucleusGeometry``: the nucleus ROI of a cell, at feature level.
- ``properties``: ``objectType``, ``classification`` as
  ``{"name": ..., "color": [r, g, b]}`` (``"names": [...]`` for a derived class
  such as ``Tumor: Positive``), and ``measurements`` as a name-to-number object.

QuPath rejects a classification object without ``color``, so one is always
written.

Coordinates are rounded to 2 decimals, as QuPath's exporter does. Measurements
keep full precision, but NaN and infinite values are left out, because JSON
cannot represent them. QuPath's Gson is set to serialize special floating-point
values, so QuPath itself writes a bare ``NaN`` token that strict parsers reject.
QuPath reads a missing measurement as NaN, so nothing is lost.

NOTE: the format was checked against QuPath's source and its 0.6.0 exports, and
QuPath's import was not run on these files here; 0.4 and 0.5 are covered only
through the version notes in that source.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import io
import json
import logging
import math
import os
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import shapely
import shapely.geometry

from nuclass_qupath._atomic import atomic_path
from nuclass_qupath.cells.geojson_format import format_polygon_coordinates
from nuclass_qupath.errors import CellsError

logger = logging.getLogger(__name__)

#: Decimals kept for coordinates, as in QuPath's GeoJSON export.
COORDINATE_DECIMALS = 2
#: gzip level of ``.gz`` outputs. Measured with benchmarks/bench_geojson.py on
#: 100,000 detector nuclei (2 shared CPU cores): level 4 wrote 40 µs and 189 B
#: per feature, level 6 52 µs and 174 B, level 1 42 µs and 232 B, and the plain
#: file 25 µs and 926 B. Level 4 is nearly as fast as level 1 for 8% more size
#: than level 6.
GZIP_LEVEL = 4

_WRITABLE_OBJECT_TYPES = ("detection", "cell", "annotation", "tile")
_OBJECT_TYPE_NAMES = {
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathAnnotationObject": "annotation",
    "PathTileObject": "tile",
}
# QuPath rebuilds an ellipse from the bounding box of the polygon when the
# geometry has "isEllipse": true, and this tolerance (px) decides that a new geometry
# still has the base feature's bounding box.
_ENVELOPE_TOLERANCE_PX = 0.01


def _round_positions(value: Any, decimals: int) -> Any:
    """Round a nested list of positions, one numpy call per innermost list of positions."""
    if not isinstance(value, (list, tuple)) or not value:
        return value
    first = value[0]
    if not isinstance(first, (list, tuple)):
        # One position: [x, y] or [x, y, z].
        return np.asarray(value, dtype=np.float64).round(decimals).tolist()
    if first and not isinstance(first[0], (list, tuple)):
        # A list of positions: a ring, a line or a MultiPoint.
        return np.asarray(value, dtype=np.float64).round(decimals).tolist()
    return [_round_positions(item, decimals) for item in value]


def _round_geometry(geometry: Any, decimals: int) -> Any:
    if not isinstance(geometry, dict):
        return geometry
    rounded = dict(geometry)
    coordinates = rounded.get("coordinates")
    if isinstance(coordinates, RoundedCoordinates) and coordinates.decimals <= decimals:
        return rounded
    if "coordinates" in rounded:
        rounded["coordinates"] = _round_positions(coordinates, decimals)
    if isinstance(rounded.get("geometries"), list):
        rounded["geometries"] = [_round_geometry(g, decimals) for g in rounded["geometries"]]
    return rounded


class RoundedCoordinates(list):
    """GeoJSON ``coordinates`` already rounded to ``decimals``, which :class:`GeoJSONWriter` writes as they are.

    A list of rings otherwise, which JSON encodes like any list.
    :func:`polygons_to_geojson` makes them, so that coordinates rounded in one
    numpy call per batch are not rounded again feature by feature. They also
    store their JSON text, formatted for the whole batch at once. Rings and
    positions are tuples, so only the outer list can change, and the writer
    uses the text only while that list still equals the rings it was made
    from. An equal ring with int values, such as ``(5, 2)`` for ``(5.0, 2.0)``,
    is therefore written as ``[5.0,2.0]``.
    """

    __slots__ = ("decimals", "_text", "_snapshot")

    def __init__(
        self,
        values: Iterable[Any] = (),
        decimals: int = COORDINATE_DECIMALS,
        *,
        text: str | None = None,
        snapshot: list | None = None,
    ) -> None:
        super().__init__(values)
        self.decimals = decimals
        self._text = text
        self._snapshot = snapshot

    def json_text(self) -> str | None:
        """Return the stored JSON text of the coordinates, or None if there is none or the rings were changed."""
        if self._text is None or not list.__eq__(self, self._snapshot):
            return None
        return self._text


def _finite_measurements(measurements: Any) -> tuple[Any, int]:
    """Drop NaN and infinite values from a measurement object or list; return it and the number dropped."""
    if isinstance(measurements, dict):
        # Fast path: a finite sum means every value is a finite number.
        try:
            if math.isfinite(math.fsum(measurements.values())):
                return measurements, 0
        except (TypeError, ValueError, OverflowError):
            pass
        clean = {}
        for name, value in measurements.items():
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
                value = float(value) if isinstance(value, (float, np.floating)) else int(value)
                if isinstance(value, float) and not math.isfinite(value):
                    continue
            clean[name] = value
        return clean, len(measurements) - len(clean)
    if isinstance(measurements, list):
        clean_list = [
            item
            for item in measurements
            if not (isinstance(item, dict) and isinstance(item.get("value"), float) and not math.isfinite(item["value"]))
        ]
        return clean_list, len(measurements) - len(clean_list)
    return measurements, 0


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class GeoJSONWriter:
    """Stream features into a GeoJSON FeatureCollection file, atomically.

    The file is written through a temporary file beside ``path`` and renamed
    onto it when the ``with`` block ends without an exception, so a failed run
    leaves no partial file. Memory stays flat: each feature is encoded and
    written as it arrives, one feature per line. Coordinates that
    :func:`polygons_to_geojson` stored as JSON text are copied into the output
    as they are, which makes a nucleus polygon about twice as fast to write.

    Parameters
    ----------
    path
        Output file. A name ending in ``.gz`` is gzip-compressed.
    compress
        Force gzip on (True) or off (False) whatever the name.
    coordinate_decimals
        Decimals kept for coordinates of ``geometry`` and ``nucleusGeometry``;
        None keeps them as given.
    compresslevel
        gzip level, 0-9, for compressed outputs; see :data:`GZIP_LEVEL`.
    ensure_ascii
        Escape non-ASCII characters (``µ`` becomes ``\\u00b5``). QuPath reads
        GeoJSON with the Java platform charset, which is UTF-8 from Java 18 on
        but may not be in QuPath 0.4 (Java 17) on Windows, so escaping is the
        safe choice for names with such characters there.

    Notes
    -----
    QuPath's object import (``PathIO.readObjects``) opens ``.geojson``,
    ``.json`` and ``.zip`` files, not ``.gz``, so a gzip output must be
    decompressed before it is dragged onto QuPath.

    Attributes
    ----------
    count
        Number of features written so far.
    dropped_measurements
        Number of NaN or infinite measurement values left out.

    Examples
    --------
    >>> with GeoJSONWriter("cells.geojson.gz") as writer:  # doctest: +SKIP
    ...     for feature in features:
    ...         writer.write(feature)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        compress: bool | None = None,
        coordinate_decimals: int | None = COORDINATE_DECIMALS,
        ensure_ascii: bool = False,
        compresslevel: int = GZIP_LEVEL,
    ) -> None:
        self.path = Path(path)
        self.count = 0
        self.dropped_measurements = 0
        self._compress = compress
        self._decimals = coordinate_decimals
        self._context: Any = None
        self._handle: IO[str] | None = None
        self._compresslevel = compresslevel
        # check_circular=False cut the encoding time by about a sixth in a
        # measurement. A circular structure then raises RecursionError, which
        # write() reports.
        self._encoder = json.JSONEncoder(
            ensure_ascii=ensure_ascii,
            separators=(",", ":"),
            allow_nan=False,
            default=_json_default,
            check_circular=False,
        )
        # Stand-ins for preformatted coordinates: a NUL byte is always escaped in
        # JSON and the random part cannot occur in a feature by chance.
        nonce = uuid.uuid4().hex
        self._placeholders = {
            key: (f"\x00{nonce}:{key}\x00", self._encoder.encode(f"\x00{nonce}:{key}\x00"))
            for key in ("geometry", "nucleusGeometry")
        }

    def __enter__(self) -> "GeoJSONWriter":
        if not 0 <= self._compresslevel <= 9:
            raise ValueError(f"compresslevel must be 0-9, got {self._compresslevel}")
        compress = str(self.path).endswith(".gz") if self._compress is None else self._compress
        self._context = contextlib.ExitStack()
        try:
            tmp = self._context.enter_context(atomic_path(self.path))
            raw: IO[bytes] = self._context.enter_context(open(tmp, "wb"))
            if compress:
                # The header gets the final name, not the temporary one, and mtime 0,
                # so that the same features give the same bytes on every run.
                raw = self._context.enter_context(
                    gzip.GzipFile(self.path.name, "wb", self._compresslevel, raw, mtime=0)
                )
            self._handle = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
            self._context.callback(self._handle.detach)
            self._context.callback(self._handle.flush)
        except BaseException:
            self._context.__exit__(*sys.exc_info())
            raise
        self._handle.write('{"type":"FeatureCollection","features":[')
        return self

    def write(self, feature: Mapping[str, Any]) -> None:
        """Encode one GeoJSON Feature and append it to the file.

        The caller's dict is not changed: coordinates are rounded and
        non-finite measurements dropped in a copy.
        """
        if self._handle is None:
            raise RuntimeError("GeoJSONWriter.write() called outside its 'with' block")
        # The dict check first, because isinstance against the Mapping ABC is slow.
        if not (isinstance(feature, dict) or isinstance(feature, Mapping)) or feature.get("type") != "Feature":
            raise CellsError(f"expected a GeoJSON Feature dict, got {type(feature).__name__} {str(feature)[:80]}")

        output = dict(feature)
        if self._decimals is not None:
            for key in ("geometry", "nucleusGeometry"):
                if key not in output:
                    continue
                try:
                    output[key] = _round_geometry(output[key], self._decimals)
                except (TypeError, ValueError) as exc:
                    raise CellsError(
                        f"feature {feature.get('id')} has {key} coordinates that are not numbers ({exc})"
                    ) from exc
        properties = output.get("properties")
        if (isinstance(properties, dict) or isinstance(properties, Mapping)) and "measurements" in properties:
            measurements, dropped = _finite_measurements(properties["measurements"])
            if dropped:
                self.dropped_measurements += dropped
                output["properties"] = {**properties, "measurements": measurements}

        text = self._encode(output)
        self._handle.write(("\n" if self.count == 0 else ",\n") + text)
        self.count += 1

    def _encode(self, output: dict[str, Any]) -> str:
        """Encode a feature, splicing in the stored JSON text of coordinates from :func:`polygons_to_geojson`."""
        spliced = dict(output)
        splices = []
        for key, (placeholder, placeholder_json) in self._placeholders.items():
            geometry = spliced.get(key)
            coordinates = geometry.get("coordinates") if isinstance(geometry, dict) else None
            if isinstance(coordinates, RoundedCoordinates):
                coordinates_json = coordinates.json_text()
                if coordinates_json is not None:
                    spliced[key] = {**geometry, "coordinates": placeholder}
                    splices.append((placeholder_json, coordinates_json))
        try:
            text = self._encoder.encode(spliced)
            if splices and not all(text.count(placeholder_json) == 1 for placeholder_json, _ in splices):
                # The feature contains a placeholder string of its own: encode it whole.
                return self._encoder.encode(output)
        except ValueError as exc:
            raise CellsError(
                f"feature {output.get('id')} contains NaN or an infinite number outside its measurements, "
                f"which JSON cannot represent ({exc}); replace it with null or leave the key out"
            ) from exc
        except RecursionError as exc:
            raise CellsError(
                f"feature {output.get('id')} contains a circular reference or is nested too deeply to encode"
            ) from exc
        for placeholder_json, coordinates_json in splices:
            text = text.replace(placeholder_json, coordinates_json, 1)
        return text

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        handle, context = self._handle, self._context
        self._handle = None
        self._context = None
        if exc_type is None and handle is not None:
            handle.write("\n]}\n")
        # The stack flushes and detaches the text layer, closes the file, and
        # renames it onto the path only when there was no exception.
        result = context.__exit__(exc_type, exc, traceback) if context is not None else None
        if exc_type is None:
            if self.dropped_measurements:
                logger.warning(
                    "%s: left out %d NaN or infinite measurement values, which QuPath reads as missing",
                    self.path,
                    self.dropped_measurements,
                )
            logger.info("wrote %d features to %s", self.count, self.path)
        return result


def write_features(
    path: str | os.PathLike,
    features: Iterable[Mapping[str, Any]],
    *,
    compress: bool | None = None,
    ensure_ascii: bool = False,
) -> int:
    """Write ``features`` to a GeoJSON FeatureCollection file atomically and return how many were written."""
    with GeoJSONWriter(path, compress=compress, ensure_ascii=ensure_ascii) as writer:
        for feature in features:
            writer.write(feature)
    return writer.count


def _positions(geometry: Any) -> list[list[float]]:
    return shapely.get_coordinates(geometry).tolist()


def geometry_to_geojson(geometry: Any) -> dict[str, Any]:
    """Convert a shapely geometry (level-0 px) to a GeoJSON geometry dict with list coordinates.

    An invalid polygon is repaired with ``make_valid`` first, keeping its
    polygonal part, because QuPath repairs it on import anyway and other
    readers may reject it.

    Raises
    ------
    ValueError
        If the geometry is empty or not a point, line or polygon type.
    """
    if geometry is None or shapely.is_empty(geometry):
        raise ValueError(f"cannot write an empty geometry: {geometry!r}")
    if isinstance(geometry, (shapely.Polygon, shapely.MultiPolygon)) and not geometry.is_valid:
        repaired = shapely.make_valid(geometry)
        if not isinstance(repaired, (shapely.Polygon, shapely.MultiPolygon)):
            parts = [g for g in getattr(repaired, "geoms", []) if isinstance(g, (shapely.Polygon, shapely.MultiPolygon))]
            if not parts:
                raise ValueError(f"polygon has no area after repair: {geometry.wkt[:120]}")
            repaired = shapely.union_all(parts)
        geometry = repaired

    if isinstance(geometry, shapely.Point):
        return {"type": "Point", "coordinates": _positions(geometry)[0]}
    if isinstance(geometry, (shapely.MultiPoint, shapely.LineString)):
        return {"type": geometry.geom_type, "coordinates": _positions(geometry)}
    if isinstance(geometry, shapely.Polygon):
        rings = [geometry.exterior, *geometry.interiors]
        return {"type": "Polygon", "coordinates": [_positions(ring) for ring in rings]}
    if isinstance(geometry, shapely.MultiPolygon):
        return {
            "type": "MultiPolygon",
            "coordinates": [[_positions(ring) for ring in [p.exterior, *p.interiors]] for p in geometry.geoms],
        }
    return dict(shapely.geometry.mapping(geometry))


def polygons_to_geojson(geometries: Sequence[Any], decimals: int = COORDINATE_DECIMALS) -> list[dict[str, Any] | None]:
    """Convert many shapely polygons (level-0 px) to GeoJSON geometry dicts at once, with rounded coordinates.

    Gives what :func:`geometry_to_geojson` gives for each valid, non-empty
    Polygon, with coordinates rounded to ``decimals`` in one numpy call and
    marked as :class:`RoundedCoordinates`. Other entries (None, points,
    multipolygons, invalid polygons that need repair) come back as None, for
    the caller to convert one by one.
    """
    result: list[dict[str, Any] | None] = [None] * len(geometries)
    if not len(geometries):
        return result
    array = np.empty(len(geometries), dtype=object)
    array[:] = list(geometries)
    polygon = shapely.get_type_id(array) == shapely.GeometryType.POLYGON
    convertible = polygon.copy()
    convertible[polygon] = shapely.is_valid(array[polygon]) & ~shapely.is_empty(array[polygon])
    positions = np.flatnonzero(convertible)
    if positions.size == 0:
        return result

    _, coordinates, (ring_offsets, polygon_offsets) = shapely.to_ragged_array(array[positions], include_z=False)
    rounded = np.round(coordinates, decimals)
    texts = format_polygon_coordinates(rounded, ring_offsets, polygon_offsets, decimals)
    # Making a list per point at once triggers many full passes of the cyclic
    # garbage collector over every live object. These lists cannot form cycles.
    with _gc_paused():
        # Positions and rings are tuples, so that only the outer list can change,
        # and a shallow copy of it is enough to tell whether the text still holds.
        pairs = np.ascontiguousarray(rounded).view([("x", np.float64), ("y", np.float64)]).ravel()
        points = tuple(pairs.tolist())
        ring_offsets = ring_offsets.tolist()
        polygon_offsets = polygon_offsets.tolist()
        for k, position in enumerate(positions.tolist()):
            ring_range = range(polygon_offsets[k], polygon_offsets[k + 1])
            rings = [points[ring_offsets[r] : ring_offsets[r + 1]] for r in ring_range]
            coordinates_json = RoundedCoordinates(rings, decimals, text=texts[k], snapshot=list(rings))
            result[position] = {"type": "Polygon", "coordinates": coordinates_json}
    return result


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Disable the cyclic garbage collector for the block, unless it is already off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def _measurement_dict(measurements: Any) -> dict[str, float]:
    """Return QuPath measurements as a dict, from the 0.4+ object form or the older list form.

    Values that are not finite numbers are dropped, because QuPath stores only
    numbers and reads a missing measurement as NaN.
    """
    if isinstance(measurements, Mapping):
        pairs = measurements.items()
    elif isinstance(measurements, list):
        pairs = [
            (item["name"], item.get("value"))
            for item in measurements
            if isinstance(item, Mapping) and isinstance(item.get("name"), str)
        ]
    else:
        return {}
    return {str(name): float(value) for name, value in pairs if _is_finite_number(value)}


def classification_json(class_name: str, color: Sequence[int] | None) -> dict[str, Any]:
    """Return QuPath's ``classification`` object for a class name and ``(r, g, b)`` colour.

    Raises
    ------
    ValueError
        If the colour is missing or not 3 or 4 integers in 0-255.
    """
    if color is None:
        raise ValueError(
            f"class {class_name!r} needs a colour: QuPath rejects a classification without 'color'"
        )
    rgb = [int(c) for c in color]
    if len(rgb) not in (3, 4) or not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"colour of class {class_name!r} must be 3 or 4 integers in 0-255, got {list(color)}")
    names = [part.strip() for part in class_name.split(":")]
    if len(names) > 1 and all(names):
        return {"names": names, "color": rgb}
    return {"name": class_name, "color": rgb}


def _carry_geometry_members(new: dict[str, Any], new_shape: Any, base_geometry: Any) -> dict[str, Any]:
    """Copy QuPath's extra geometry members (``plane``, ``isEllipse``) from the base geometry where still true."""
    if not isinstance(base_geometry, dict):
        return new
    if "plane" in base_geometry:
        new["plane"] = base_geometry["plane"]
    if base_geometry.get("isEllipse") and isinstance(new_shape, shapely.Polygon):
        try:
            base_bounds = np.asarray(shapely.geometry.shape(base_geometry).bounds)
        except (ValueError, TypeError, AttributeError, shapely.errors.GEOSException):
            return new
        if np.allclose(base_bounds, new_shape.bounds, atol=_ENVELOPE_TOLERANCE_PX):
            new["isEllipse"] = True
    return new


def prediction_feature(
    *,
    cell_id: str,
    geometry: Any = None,
    nucleus_geometry: Any = None,
    object_type: str | None = None,
    class_name: str | None,
    color: Sequence[int] | None,
    measurements: Mapping[str, float],
    base_feature: Mapping[str, Any] | None = None,
    point_radius_px: float | None = None,
) -> dict[str, Any]:
    """Build a QuPath-dialect GeoJSON feature for one classified cell.

    Parameters
    ----------
    cell_id
        Object id, written as the feature ``id`` (QuPath keeps it when it is a UUID).
    geometry
        Object ROI as a shapely geometry or GeoJSON dict, level-0 px. None keeps
        ``base_feature``'s geometry as it is, which is the way to return cells
        read from QuPath unchanged (for a QuPath cell, ``CellTable.geometries``
        contains the nucleus, not the cell outline).
    nucleus_geometry
        Nucleus ROI for ``object_type="cell"``. None keeps the base feature's
        ``nucleusGeometry``, if any.
    object_type
        ``detection``, ``cell``, ``annotation`` or ``tile``. None takes the base
        feature's type, else ``detection``.
    class_name
        QuPath class string (``"Tumor"``, or ``"Tumor: Positive"`` for a derived
        class). None writes the object unclassified.
    color
        Class colour ``(r, g, b)``, 0-255; required with ``class_name``.
    measurements
        Measurements to set. They are merged over the base feature's
        measurements, which are kept; a non-finite value removes the name.
    base_feature
        Input feature of this cell. Its other properties (name, colour,
        ``isLocked``, metadata) and foreign members are kept as they were.
    point_radius_px
        If given, a Point geometry is written as a circle polygon of this
        radius. By default a point stays a point: QuPath imports a Point as an
        object with a points ROI at the labelled position, which shows its
        class and measurements but has no area.

    Returns
    -------
    dict
        A GeoJSON Feature that :class:`GeoJSONWriter` can write. The base
        feature is not modified.

    Raises
    ------
    ValueError
        If no geometry is given and the base feature has none, the object type
        is unknown, a nucleus is given for a non-cell, or the colour is missing
        or out of range.
    """
    base: Mapping[str, Any] = base_feature or {}
    base_properties = base.get("properties")
    base_properties = dict(base_properties) if isinstance(base_properties, Mapping) else {}

    if object_type is None:
        base_type = base_properties.get("objectType") or base_properties.get("object_type")
        base_type = _OBJECT_TYPE_NAMES.get(base_type, base_type)
        object_type = base_type if base_type in _WRITABLE_OBJECT_TYPES else "detection"
    if object_type not in _WRITABLE_OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {', '.join(_WRITABLE_OBJECT_TYPES)}, got {object_type!r}")
    if nucleus_geometry is not None and object_type != "cell":
        raise ValueError(f"a nucleus geometry is only written for cells, but object_type is {object_type!r}")

    # Geometry: the given one, else the base feature's, untouched.
    if geometry is None:
        geometry_json = base.get("geometry")
        if not isinstance(geometry_json, Mapping):
            raise ValueError(f"cell {cell_id}: no geometry given and the base feature has none")
        geometry_json = dict(geometry_json)
    elif isinstance(geometry, Mapping):
        geometry_json = dict(geometry)
    else:
        if point_radius_px is not None and isinstance(geometry, shapely.Point):
            geometry = geometry.buffer(point_radius_px, quad_segs=8)
        geometry_json = _carry_geometry_members(geometry_to_geojson(geometry), geometry, base.get("geometry"))

    nucleus_json = None
    if object_type == "cell":
        if nucleus_geometry is None:
            nucleus_json = base.get("nucleusGeometry", base_properties.get("nucleusGeometry"))
        elif isinstance(nucleus_geometry, Mapping):
            nucleus_json = dict(nucleus_geometry)
        else:
            nucleus_json = geometry_to_geojson(nucleus_geometry)

    merged = _measurement_dict(base_properties.get("measurements"))
    for name, value in measurements.items():
        value = float(value)
        if math.isfinite(value):
            merged[str(name)] = value
        else:
            merged.pop(str(name), None)

    properties: dict[str, Any] = {"objectType": object_type}
    for key, value in base_properties.items():
        # QuPath reads nucleusGeometry only at feature level, so it moves there.
        if key not in ("objectType", "object_type", "classification", "measurements", "nucleusGeometry"):
            properties[key] = value
    if class_name is not None:
        properties["classification"] = classification_json(class_name, color)
    if merged:
        properties["measurements"] = merged

    feature: dict[str, Any] = {"type": "Feature", "id": str(cell_id), "geometry": geometry_json}
    if nucleus_json is not None:
        feature["nucleusGeometry"] = nucleus_json
    feature["properties"] = properties
    for key, value in base.items():
        if key in ("type", "id", "geometry", "nucleusGeometry", "properties"):
            continue
        if key == "bbox" and geometry is not None:
            continue  # the bounding box of the old geometry would be wrong
        feature[key] = value
    return feature

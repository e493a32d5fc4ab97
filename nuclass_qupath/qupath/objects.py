"""QuPath objects as plain Python values, their geometries and their GeoJSON form.

:class:`QuPathObject` contains what a ``data.qpdata`` file stores for one
object of the hierarchy.  :func:`build_geometries` turns ROIs into the shapely
geometries that QuPath 0.6's ``ROI.getGeometry()`` returns, and
:meth:`QuPathObject.to_geojson_feature` writes the feature that QuPath 0.6's
``exportObjectsToGeoJson`` writes for the same object.  Coordinates are QuPath
level-0 pixels (x to the right, y down, origin at the top-left of the image).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

OBJECT_KINDS = ("root", "annotation", "detection", "cell", "tile", "tmaCore")

RGB = tuple[int, int, int]


@dataclass
class QuPathObject:
    """One object of a QuPath object hierarchy.

    Attributes
    ----------
    kind
        ``"root"``, ``"annotation"``, ``"detection"``, ``"cell"``, ``"tile"`` or
        ``"tmaCore"`` (QuPath's GeoJSON ``objectType``).
    id
        The object's UUID as a string.
    name
        Object name, or ``None``.
    path_class
        Classification as names from the base class down, e.g.
        ``("Tumor", "Positive")`` for the derived class ``Tumor: Positive``, or
        ``None`` when unclassified.
    class_color
        ``(r, g, b)`` of the classification as stored in the data file.
    color
        ``(r, g, b)`` of the object's own colour, or ``None`` when not set.
    geometry
        ROI geometry in level-0 pixels, as QuPath's ``ROI.getGeometry()`` builds
        it (0.01 px grid, normalized); ``None`` for the root.
    nucleus_geometry
        Nucleus ROI geometry of a cell, or ``None``.
    measurements
        Measurement name to value, in QuPath's order.
    is_locked
        Whether the ROI is locked.
    parent_id
        UUID of the parent object; ``None`` for the root.
    metadata
        Object metadata (annotation descriptions are under ``ANNOTATION_DESCRIPTION``).
    is_missing
        For TMA cores, whether the core is marked missing; ``None`` otherwise.
    roi_type
        QuPath's ROI name: ``Polygon``, ``Rectangle``, ``Ellipse``, ``Line``,
        ``Polyline``, ``Points``, ``Geometry`` or ``Area``; ``None`` without ROI.
    nucleus_roi_type
        ROI name of the nucleus, or ``None``.
    class_probability
        Classification probability stored with the object (NaN when unset).
    java_class
        Fully qualified Java class of the object.
    """

    kind: str
    id: str
    name: str | None = None
    path_class: tuple[str, ...] | None = None
    class_color: RGB | None = None
    color: RGB | None = None
    geometry: BaseGeometry | None = None
    nucleus_geometry: BaseGeometry | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    is_locked: bool = False
    parent_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    is_missing: bool | None = None
    roi_type: str | None = None
    nucleus_roi_type: str | None = None
    class_probability: float = math.nan
    java_class: str = ""

    @property
    def class_name(self) -> str | None:
        """Classification as QuPath prints it (``"Tumor: Positive"``), or ``None``."""
        if not self.path_class:
            return None
        return ": ".join(self.path_class)

    def to_geojson_feature(
        self,
        *,
        include_measurements: bool = True,
        class_colors: Mapping[str, RGB] | None = None,
    ) -> dict[str, Any]:
        """Return the GeoJSON feature that QuPath 0.6 exports for this object.

        Parameters
        ----------
        include_measurements
            Write the ``measurements`` property (QuPath's default).
        class_colors
            Classification colour by class name (``"Tumor: Positive"``), for
            example from the project's ``classifiers/classes.json``.  QuPath
            keeps one colour per class name in a session, so its export uses
            the project's colour where the data file stores an older one.

        Raises
        ------
        ValueError
            For the root object, which QuPath does not export.
        """
        if self.kind == "root" or self.geometry is None:
            raise ValueError(f"object {self.id} ({self.kind}) has no ROI and no GeoJSON form")
        feature: dict[str, Any] = {
            "type": "Feature",
            "id": self.id,
            "geometry": geometry_to_geojson(self.geometry, is_ellipse=self.roi_type == "Ellipse"),
        }
        if self.nucleus_geometry is not None:
            feature["nucleusGeometry"] = geometry_to_geojson(
                self.nucleus_geometry, is_ellipse=self.nucleus_roi_type == "Ellipse"
            )
        properties: dict[str, Any] = {"objectType": self.kind}
        if self.name is not None:
            properties["name"] = self.name
        if self.color is not None:
            properties["color"] = list(self.color)
        classification = self._classification(class_colors)
        if classification is not None:
            properties["classification"] = classification
        if self.is_locked:
            properties["isLocked"] = True
        if include_measurements and self.measurements:
            properties["measurements"] = dict(self.measurements)
        if self.metadata:
            properties["metadata"] = dict(self.metadata)
        if self.kind == "tmaCore":
            properties["isMissing"] = bool(self.is_missing)
        feature["properties"] = properties
        return feature

    def _classification(self, class_colors: Mapping[str, RGB] | None) -> dict[str, Any] | None:
        if not self.path_class:
            return None
        color = self.class_color
        if class_colors is not None and self.class_name in class_colors:
            color = tuple(class_colors[self.class_name])
        classification: dict[str, Any]
        if len(self.path_class) == 1:
            classification = {"name": self.path_class[0]}
        else:
            classification = {"names": list(self.path_class)}
        if color is not None:
            classification["color"] = list(color)
        return classification


def geometry_to_geojson(geometry: BaseGeometry, *, is_ellipse: bool = False) -> dict[str, Any]:
    """Return a GeoJSON geometry object; QuPath adds ``"isEllipse": true`` for ellipse ROIs."""
    result: dict[str, Any] = {"type": geometry.geom_type, "coordinates": _coordinates(geometry)}
    if is_ellipse:
        result["isEllipse"] = True
    return result


def _coordinates(geometry: BaseGeometry) -> list[Any]:
    # shapely.geometry.mapping builds an empty ring per polygon to compare
    # with, which makes it several times slower than reading the rings here.
    type_id = shapely.get_type_id(geometry)
    if type_id == 0:
        return shapely.get_coordinates(geometry)[0].tolist() if not geometry.is_empty else []
    if type_id in (1, 2):
        return shapely.get_coordinates(geometry).tolist()
    if type_id == 3:
        if geometry.is_empty:
            return []
        rings = [
            shapely.get_exterior_ring(geometry),
            *shapely.get_interior_ring(geometry, range(shapely.get_num_interior_rings(geometry))),
        ]
        return [shapely.get_coordinates(ring).tolist() for ring in rings]
    if type_id == 4:
        return shapely.get_coordinates(geometry).tolist()
    return [_coordinates(part) for part in shapely.get_parts(geometry)]


# -- ROI geometries as QuPath builds them ----------------------------------------------

# JTS GeometricShapeFactory draws ellipses with 100 points (its default), and
# QuPath 0.6 GeometryTools uses it for EllipseROI.getGeometry().
ELLIPSE_POINTS = 100
# GeometryTools.getDefaultFactory() uses PrecisionModel(-0.01): coordinates of
# every ROI geometry are snapped to a 0.01 px grid.
GRID_SCALE = 100.0


@dataclass(frozen=True)
class RoiValue:
    """A deserialized ROI, before its geometry is built.

    Attributes
    ----------
    roi_type
        QuPath's ROI name (``Polygon``, ``Rectangle``, ``Ellipse``, ``Line``,
        ``Polyline``, ``Points``, ``Geometry``, ``Area``).
    data
        Vertices in level-0 pixels as ``(x, y)`` arrays as stored, the bounds
        ``(x1, y1, x2, y2)`` of rectangles and ellipses, a list of ``(x, y)``
        rings for ``Area``, or the finished geometry for ``Geometry``.
    plane
        ``(c, z, t)`` of the ROI.
    """

    roi_type: str
    data: Any
    plane: tuple[int, int, int]


def snap_to_grid(coords: np.ndarray) -> np.ndarray:
    """Round coordinates to QuPath's 0.01 px grid, half up as Java's ``Math.round``."""
    scaled = np.asarray(coords, dtype=np.float64) * GRID_SCALE
    scaled += 0.5
    np.floor(scaled, out=scaled)
    scaled /= GRID_SCALE
    return scaled


def _stack(xy: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Return ``(n, 2)`` vertices on the 0.01 px grid from separate x and y arrays."""
    x, y = xy
    coords = np.empty((len(x), 2))
    coords[:, 0] = x
    coords[:, 1] = y
    return snap_to_grid(coords)


def normalize(geometries: Any) -> np.ndarray:
    """Normalize geometries as JTS ``Geometry.norm()`` does.

    GEOS (behind shapely) and JTS put rings in the same order and orientation,
    but GEOS sorts the parts of a collection in descending order where JTS sorts
    them ascending, so the parts are reversed here.
    """
    result = shapely.normalize(np.asarray(geometries, dtype=object))
    multi = np.flatnonzero(shapely.get_type_id(result) >= 4)
    for index in multi:
        result[index] = _reverse_parts(result[index])
    return result


def _reverse_parts(geometry: BaseGeometry) -> BaseGeometry:
    parts = [_reverse_parts(part) if shapely.get_type_id(part) >= 4 else part for part in geometry.geoms]
    return type(geometry)(parts[::-1])


def build_geometries(rois: list[RoiValue | None]) -> list[BaseGeometry | None]:
    """Build the geometries QuPath 0.6's ``ROI.getGeometry()`` returns, for many ROIs at once.

    Every geometry is on the 0.01 px grid.  All but ``Geometry`` ROIs are
    normalized as QuPath 0.6.0 does with ``Geometry.norm()``: rings start at
    their lowest vertex, and shells run clockwise with y pointing up, which is
    counter-clockwise as drawn on the image.
    """
    result: list[BaseGeometry | None] = [None] * len(rois)
    by_type: dict[str, list[int]] = {}
    for index, roi in enumerate(rois):
        if roi is not None:
            by_type.setdefault(roi.roi_type, []).append(index)
    for roi_type, indices in by_type.items():
        data = [rois[index].data for index in indices]  # type: ignore[union-attr]
        geometries = _BUILDERS[roi_type](data)
        for index, geometry in zip(indices, geometries):
            result[index] = geometry
    return result


def _polygons(rings: list[tuple[np.ndarray, np.ndarray]]) -> list[BaseGeometry]:
    # QuPath 0.6 turns a polygon ROI into a java.awt.geom.Area, nodes its outline
    # and polygonizes it: repeated vertices disappear and a self-intersecting
    # ring becomes several valid polygons.
    result: list[BaseGeometry] = [shapely.Polygon()] * len(rings)
    present = [index for index, (x, _) in enumerate(rings) if len(x)]
    if not present:
        return result
    sizes = [len(rings[index][0]) for index in present]
    coords = np.empty((sum(sizes), 2))
    coords[:, 0] = np.concatenate([rings[index][0] for index in present])
    coords[:, 1] = np.concatenate([rings[index][1] for index in present])
    coords = snap_to_grid(coords)
    starts = np.zeros(len(present), dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    # Drop each vertex equal to the one before it within the same ring.
    keep = np.ones(len(coords), dtype=bool)
    differs = coords[1:] != coords[:-1]
    keep[1:] = differs[:, 0] | differs[:, 1]
    keep[starts] = True
    lengths = np.add.reduceat(keep.astype(np.int64), starts)
    usable = lengths >= 3
    coords = coords[keep & np.repeat(usable, np.diff(np.append(starts, len(coords))))]
    usable_lengths = lengths[usable]
    ring_offsets = np.zeros(len(usable_lengths) + 1, dtype=np.int64)
    np.cumsum(usable_lengths, out=ring_offsets[1:])
    polygon_offsets = np.arange(len(usable_lengths) + 1, dtype=np.int64)
    polygons = shapely.from_ragged_array(
        shapely.GeometryType.POLYGON, np.ascontiguousarray(coords), (ring_offsets, polygon_offsets)
    )
    for position in np.flatnonzero(~shapely.is_valid(polygons)):
        ring = coords[ring_offsets[position] : ring_offsets[position + 1]]
        polygons[position] = polygon_from_rings([ring])
    targets = [index for index, ok in zip(present, usable) if ok]
    for index, polygon in zip(targets, normalize(polygons)):
        result[index] = polygon
    return result


def _drop_repeats(xy: np.ndarray) -> np.ndarray:
    if len(xy) < 2:
        return xy
    differs = xy[1:] != xy[:-1]
    keep = differs[:, 0] | differs[:, 1]
    if keep.all():
        return xy
    return xy[np.concatenate([[True], keep])]


def polygon_from_rings(rings: list[np.ndarray]) -> BaseGeometry:
    """Build a valid polygonal geometry from closed rings by noding and polygonizing them."""
    cleaned = [ring for ring in (_drop_repeats(ring) for ring in rings) if len(ring) >= 3]
    if not cleaned:
        return shapely.Polygon()
    if len(cleaned) == 1:
        polygon = shapely.polygons(cleaned[0])
        if shapely.is_valid(polygon):
            return polygon
    lines = [shapely.LineString(np.vstack([ring, ring[:1]])) for ring in cleaned]
    # NOTE: QuPath fills the outlines with the non-zero winding rule of
    # java.awt.geom.Area; build_area alternates inside and outside (even-odd).
    # The two agree unless a ring winds around a region more than once.
    return shapely.build_area(shapely.union_all(lines))


def _areas(ring_lists: list[list[tuple[np.ndarray, np.ndarray]]]) -> list[BaseGeometry]:
    return list(normalize([polygon_from_rings([_stack(ring) for ring in rings]) for rings in ring_lists]))


def _rectangles(bounds: list[tuple[float, float, float, float]]) -> list[BaseGeometry]:
    # GeometricShapeFactory.createRectangle with 4 points: the corners from
    # (minX, minY) clockwise in image coordinates.
    b = np.asarray(bounds, dtype=np.float64).reshape(-1, 4)
    corners = np.stack([b[:, [0, 1]], b[:, [2, 1]], b[:, [2, 3]], b[:, [0, 3]]], axis=1)
    return _closed_shapes(snap_to_grid(corners))


def _ellipses(bounds: list[tuple[float, float, float, float]]) -> list[BaseGeometry]:
    # GeometricShapeFactory.createEllipse: ELLIPSE_POINTS points at equal angles
    # from 0 (the right-hand end of the horizontal axis).
    b = np.asarray(bounds, dtype=np.float64).reshape(-1, 4)
    x_radius = (b[:, 2] - b[:, 0]) / 2.0
    y_radius = (b[:, 3] - b[:, 1]) / 2.0
    angles = np.arange(ELLIPSE_POINTS) * (2 * math.pi / ELLIPSE_POINTS)
    x = x_radius[:, None] * np.cos(angles)[None, :] + (b[:, 0] + x_radius)[:, None]
    y = y_radius[:, None] * np.sin(angles)[None, :] + (b[:, 1] + y_radius)[:, None]
    return _closed_shapes(snap_to_grid(np.stack([x, y], axis=2)))


def _closed_shapes(vertices: np.ndarray) -> list[BaseGeometry]:
    # vertices: (n shapes, points per shape, 2), rings not yet closed.
    n, points, _ = vertices.shape
    if n == 0:
        return []
    ring_offsets = np.arange(n + 1, dtype=np.int64) * points
    polygon_offsets = np.arange(n + 1, dtype=np.int64)
    polygons = shapely.from_ragged_array(
        shapely.GeometryType.POLYGON,
        np.ascontiguousarray(vertices.reshape(-1, 2)),
        (ring_offsets, polygon_offsets),
    )
    return list(normalize(polygons))


def _lines(coords: list[tuple[np.ndarray, np.ndarray]]) -> list[BaseGeometry]:
    return list(normalize([shapely.LineString(_stack(xy)) for xy in coords]))


def _points(coords: list[tuple[np.ndarray, np.ndarray]]) -> list[BaseGeometry]:
    stacked = [_stack(xy) for xy in coords]
    geometries = [shapely.Point(xy[0]) if len(xy) == 1 else shapely.MultiPoint(xy) for xy in stacked]
    return list(normalize(geometries))


def _finished(geometries: list[BaseGeometry]) -> list[BaseGeometry]:
    return list(geometries)


_BUILDERS: dict[str, Callable[[list[Any]], list[BaseGeometry]]] = {
    "Polygon": _polygons,
    "Area": _areas,
    "Rectangle": _rectangles,
    "Ellipse": _ellipses,
    "Line": _lines,
    "Polyline": _lines,
    "Points": _points,
    "Geometry": _finished,
}

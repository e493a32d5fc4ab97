"""QuPath's serialized class layouts and the version flags that change them.

This module describes how QuPath writes ``data.qpdata``: the data file
versions, the Java classes of objects, ROIs, measurement lists and
classifications, and how their deserialized fields become Python values.
:mod:`nuclass_qupath.qupath.qpdata` drives the stream and branches on the
flags defined here.

The layouts were read from QuPath's own ``readExternal``/``writeExternal`` and
serialization-proxy code (``qupath-core``, packages ``qupath.lib.objects``,
``qupath.lib.roi``, ``qupath.lib.measurements``, ``qupath.lib.io.PathIO``) and
checked byte by byte against files that QuPath 0.6.0 wrote.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from shapely.errors import GEOSException

from nuclass_qupath.errors import QpdataError
from nuclass_qupath.qupath.javaser import Converter, JavaObject
from nuclass_qupath.qupath.objects import RoiValue, snap_to_grid

logger = logging.getLogger(__name__)


# -- data file versions and their flags -----------------------------------------


@dataclass(frozen=True)
class VersionFlag:
    """A layout difference between data file versions.

    Attributes
    ----------
    name
        Attribute name on :class:`Layout`.
    first_version
        First data file version with the behaviour.
    reason
        What changed in QuPath and why the reader has to know.
    """

    name: str
    first_version: int
    reason: str


VERSION_FLAGS: tuple[VersionFlag, ...] = (
    VersionFlag(
        "locale_record",
        2,
        "Version 2 writes the java.util.Locale used for number formatting right after "
        "the server record. Version 1 (QuPath 0.1) wrote no Locale.",
    ),
    VersionFlag(
        "server_as_json",
        3,
        "Version 3 (QuPath 0.3 and later) stores the image server as a JSON "
        "ServerBuilderWrapper (dataVersion, qupathVersion, server, id). Versions 1 and 2 "
        "store the string 'Image path: <path>'.",
    ),
    VersionFlag(
        "object_uuid_record",
        4,
        "Version 4 (written only on request by QuPath 0.4 to 0.6) writes each object's "
        "java.util.UUID, then an int count of further fields (metadata, measurements). "
        "Version 3 keeps the id as metadata key 'Object ID', so that QuPath 0.3 can still "
        "read the file.",
    ),
)

# Newest data file version whose layout this module describes.  QuPath 0.6.0
# writes version 3 unless asked for version 4.
MAX_DATA_FILE_VERSION = 4
DATA_FILE_PREFIX = "Data file version"


@dataclass(frozen=True)
class Layout:
    """The flags of :data:`VERSION_FLAGS` resolved for one data file version."""

    data_file_version: int
    locale_record: bool
    server_as_json: bool
    object_uuid_record: bool


def parse_data_file_version(header: str, source: str) -> int:
    """Return the data file version number from the first string of a ``.qpdata`` stream.

    QuPath 0.6 writes ``"Data file version 3"``.  Version 1 was written as ``1.0``.
    """
    if not header.startswith(DATA_FILE_PREFIX):
        raise QpdataError(
            f"{source}: not a QuPath data file: it starts with {header[:40]!r} "
            f"instead of {DATA_FILE_PREFIX!r}"
        )
    text = header[len(DATA_FILE_PREFIX) :].strip()
    try:
        return int(float(text))
    except ValueError as exc:
        raise QpdataError(f"{source}: invalid data file version {text!r} in {header!r}") from exc


def layout_for_version(version: int, source: str) -> Layout:
    """Resolve :data:`VERSION_FLAGS` for a data file version.

    Raises
    ------
    QpdataError
        If the version is outside 1 to :data:`MAX_DATA_FILE_VERSION`.
    """
    if not 1 <= version <= MAX_DATA_FILE_VERSION:
        raise QpdataError(
            f"{source}: data file version {version} is not understood: this reader reads "
            f"the layouts of versions 1 to {MAX_DATA_FILE_VERSION} (QuPath 0.1 to 0.6). "
            "Open the image in the QuPath version that wrote it and export the objects "
            "as GeoJSON instead."
        )
    values = {flag.name: version >= flag.first_version for flag in VERSION_FLAGS}
    return Layout(data_file_version=version, **values)


# -- Java standard library classes in QuPath data files ----------------------------


def block_int_prefix(data: list[Any], count: int) -> tuple[tuple[int, ...], list[Any]]:
    """Split ``count`` leading big-endian ints off custom data; return them and the rest."""
    head = data[0] if data and isinstance(data[0], bytes) else b""
    need = 4 * count
    if len(head) < need:
        raise ValueError(f"custom data starts with {len(head)} bytes, expected at least {need}")
    rest = list(data[1:])
    if len(head) > need:
        rest.insert(0, head[need:])
    return struct.unpack_from(f">{count}i", head), rest


def _objects(items: list[Any], expected: int, what: str) -> list[Any]:
    objects = [item for item in items if not isinstance(item, bytes)]
    if len(objects) != expected:
        raise ValueError(f"{what} should have {expected} elements but has {len(objects)}")
    return objects


def _convert_hash_map(obj: JavaObject) -> dict[Any, Any]:
    # HashMap.writeObject: int bucket count, int size, then keys and values.
    (_, size), rest = block_int_prefix(obj.annotations["java.util.HashMap"], 2)
    items = _objects(rest, 2 * size, f"map of size {size}")
    return dict(zip(items[0::2], items[1::2]))


def _convert_tree_map(obj: JavaObject) -> dict[Any, Any]:
    (size,), rest = block_int_prefix(obj.annotations["java.util.TreeMap"], 1)
    items = _objects(rest, 2 * size, f"map of size {size}")
    return dict(zip(items[0::2], items[1::2]))


def _convert_array_list(obj: JavaObject) -> list[Any]:
    # ArrayList.writeObject: the size field, then int capacity and the elements.
    size = obj.get("size")
    return _objects(obj.annotations["java.util.ArrayList"], size, f"list of size {size}")


def _convert_hash_set(obj: JavaObject) -> list[Any]:
    # HashSet.writeObject: int capacity, float load factor, int size, elements.
    data = obj.annotations["java.util.HashSet"]
    head = data[0] if data and isinstance(data[0], bytes) else b""
    if len(head) < 12:
        raise ValueError(f"set data starts with {len(head)} bytes, expected 12")
    size = struct.unpack_from(">i", head, 8)[0]
    return _objects(data, size, f"set of size {size}")


def _convert_collser(obj: JavaObject) -> Any:
    # java.util.CollSer replaces List.of, Set.of and Map.of (Java 9 and later)
    # in streams: the tag field, then int size and the elements.
    tag = obj.get("tag", 0) & 0xFF
    (size,), rest = block_int_prefix(obj.annotations["java.util.CollSer"], 1)
    if tag == 3:
        items = _objects(rest, 2 * size, f"map of size {size}")
        return dict(zip(items[0::2], items[1::2]))
    return _objects(rest, size, f"immutable collection of size {size}")


def _convert_wrapper(obj: JavaObject) -> Any:
    # Collections.unmodifiable*/synchronized* wrap the collection in field m, c or list.
    for name in ("m", "c", "list"):
        value = obj.get(name)
        if value is not None:
            return value
    return obj


def _convert_uuid(obj: JavaObject) -> uuid.UUID:
    most = obj.get("mostSigBits") & 0xFFFFFFFFFFFFFFFF
    least = obj.get("leastSigBits") & 0xFFFFFFFFFFFFFFFF
    return uuid.UUID(int=(most << 64) | least)


def _convert_locale(obj: JavaObject) -> str:
    # The Locale.toString() form: language, then _country and _variant when set.
    parts = [obj.get("language") or "", obj.get("country") or "", obj.get("variant") or ""]
    while len(parts) > 1 and not parts[-1]:
        parts.pop()
    return "_".join(parts)


JAVA_CONVERTERS: dict[str, Converter] = {
    **{
        f"java.lang.{name}": lambda obj: obj.get("value")
        for name in ("Boolean", "Byte", "Character", "Double", "Float", "Integer", "Long", "Short")
    },
    "java.util.HashMap": _convert_hash_map,
    "java.util.LinkedHashMap": _convert_hash_map,
    "java.util.TreeMap": _convert_tree_map,
    "java.util.ArrayList": _convert_array_list,
    "java.util.HashSet": _convert_hash_set,
    "java.util.LinkedHashSet": _convert_hash_set,
    "java.util.CollSer": _convert_collser,
    "java.util.Collections$SingletonMap": lambda obj: {obj.get("k"): obj.get("v")},
    "java.util.Collections$SingletonList": lambda obj: [obj.get("element")],
    "java.util.Collections$UnmodifiableMap": _convert_wrapper,
    "java.util.Collections$UnmodifiableList": _convert_wrapper,
    "java.util.Collections$UnmodifiableRandomAccessList": _convert_wrapper,
    "java.util.Collections$UnmodifiableCollection": _convert_wrapper,
    "java.util.Collections$SynchronizedMap": _convert_wrapper,
    "java.util.Collections$SynchronizedCollection": _convert_wrapper,
    "java.util.UUID": _convert_uuid,
    "java.util.Locale": _convert_locale,
}


# -- class names ----------------------------------------------------------------

HIERARCHY_CLASS = "qupath.lib.objects.hierarchy.PathObjectHierarchy"
HIERARCHY_ROOT_FIELD = "rootObject"
IMAGE_TYPE_CLASS = "qupath.lib.images.ImageData$ImageType"
STAINS_CLASS = "qupath.lib.color.ColorDeconvolutionStains"
WORKFLOW_CLASS = "qupath.lib.plugins.workflow.Workflow"
LOCALE_CLASS = "java.util.Locale"
END_OF_DATA = "EOF"

# Object type per PathObject class, as QuPath's GeoJSON export names it.
PATH_OBJECT_KINDS: dict[str, str] = {
    "qupath.lib.objects.PathRootObject": "root",
    "qupath.lib.objects.PathAnnotationObject": "annotation",
    "qupath.lib.objects.PathDetectionObject": "detection",
    "qupath.lib.objects.PathCellObject": "cell",
    "qupath.lib.objects.PathTileObject": "tile",
    "qupath.lib.objects.TMACoreObject": "tmaCore",
}
# Kinds whose externalized data ends with PathROIObject's part
# (Boolean lock, PathClass, ROI, double class probability).
ROI_OBJECT_KINDS = frozenset({"annotation", "detection", "cell", "tile", "tmaCore"})


def path_object_kind(class_names: list[str]) -> tuple[str, str] | None:
    """Return ``(kind, known class name)`` for a PathObject class or its nearest known ancestor.

    ``class_names`` lists the class and its serializable superclasses, most
    derived first, as in :meth:`JavaClassDesc.class_names`.  Extensions may
    subclass QuPath's objects; their data starts with the ancestor's layout.
    """
    for name in class_names:
        kind = PATH_OBJECT_KINDS.get(name)
        if kind is not None:
            return kind, name
    return None


# -- small value types built by the converters ----------------------------------


@dataclass(frozen=True)
class PathClassValue:
    """A deserialized ``PathClass``: names from the base class down, and packed ARGB colour."""

    names: tuple[str, ...]
    color: int | None


@dataclass(frozen=True)
class MetadataValue:
    """A deserialized ``MetadataMap`` (insertion-ordered string keys and values)."""

    items: dict[str, str]


@dataclass(frozen=True)
class MeasurementsValue:
    """A deserialized measurement list, in QuPath's order."""

    items: dict[str, float]
    java_class: str


def rgb_from_packed(value: int | None) -> tuple[int, int, int] | None:
    """Split a packed Java ``int`` ARGB colour into ``(r, g, b)``."""
    if value is None:
        return None
    value &= 0xFFFFFF
    return (value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF


# -- converters for QuPath classes ------------------------------------------------


def _convert_path_class(obj: JavaObject) -> PathClassValue | None:
    # QuPath 0.6 writes PathClass as a plain Serializable with fields parentClass,
    # name and colorRGB. On reading, QuPath swaps in its singleton of that name.
    parent = obj.get("parentClass")
    name = obj.get("name")
    if name is None:
        return parent if isinstance(parent, PathClassValue) else None
    names: tuple[str, ...] = (str(name),)
    if isinstance(parent, PathClassValue):
        names = parent.names + names
    color = obj.get("colorRGB")
    return PathClassValue(names, int(color) if isinstance(color, int) else None)


def _convert_metadata_map(obj: JavaObject) -> MetadataValue:
    # MetadataMap.writeExternal: Integer version, Object[] keys, Object[] values.
    items = [item for item in obj.annotations[obj.class_name] if not isinstance(item, bytes)]
    if len(items) != 3:
        raise ValueError(f"expected version, keys and values, found {len(items)} objects")
    _, keys, values = items
    if not isinstance(keys, list) or not isinstance(values, list) or len(keys) != len(values):
        raise ValueError("keys and values are not two object arrays of equal length")
    return MetadataValue({str(key): "" if value is None else str(value) for key, value in zip(keys, values)})


def _convert_numeric_measurements(obj: JavaObject) -> MeasurementsValue:
    # NumericMeasurementList.FloatList/DoubleList: a name list (an ArrayList while
    # the list is open, an immutable List.of copy once closed) and a value array
    # that may be longer than the name list, because it grows in steps of 8.
    names = obj.get("names") or []
    values = obj.get("values")
    if values is None:
        values = np.zeros(0)
    if len(values) < len(names):
        raise ValueError(f"{len(names)} measurement names but only {len(values)} values")
    numbers = np.asarray(values[: len(names)], dtype=np.float64).tolist()
    return MeasurementsValue(dict(zip(names, numbers)), obj.class_name)


def _convert_measurement(obj: JavaObject) -> tuple[str, float]:
    return str(obj.get("name")), float(obj.get("value"))


def _convert_default_measurements(obj: JavaObject) -> MeasurementsValue:
    items: dict[str, float] = {}
    for measurement in obj.get("list") or []:
        if isinstance(measurement, tuple):
            items[measurement[0]] = measurement[1]
        else:
            logger.warning("skipped a measurement of unknown class %s", _class_of(measurement))
    return MeasurementsValue(items, obj.class_name)


def _convert_stains(obj: JavaObject) -> dict[str, Any]:
    # ColorDeconvolutionStains.writeExternal: int version, then the stains as the
    # JSON-like text that QuPath's setColorDeconvolutionStains command also takes.
    texts = [item for item in obj.annotations[obj.class_name] if isinstance(item, str)]
    if not texts:
        raise ValueError("no stain description string")
    return parse_stains(texts[0])


def parse_stains(text: str) -> dict[str, Any]:
    """Parse QuPath's stain description (``{"Name" : ..., "Stain 1" : ..., "Values 1" : "r g b"}``).

    Returns ``{"name": str, "stains": [{"name": str, "vector": (r, g, b)}], "background": (r, g, b)}``.
    Text that is not JSON is kept as ``{"text": text}``.
    """
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        return {"text": text}
    if not isinstance(raw, dict):
        return {"text": text}
    stains = []
    for index in range(1, 4):
        name = raw.get(f"Stain {index}")
        values = raw.get(f"Values {index}")
        if name is None or values is None:
            continue
        stains.append({"name": name, "vector": tuple(float(v) for v in str(values).split())})
    background = raw.get("Background")
    return {
        "name": raw.get("Name"),
        "stains": stains,
        "background": tuple(float(v) for v in str(background).split()) if background else None,
    }


def _class_of(value: Any) -> str:
    return value.class_name if isinstance(value, JavaObject) else type(value).__name__


# -- ROIs ---------------------------------------------------------------------------
#
# ROI serialization proxies are decoded into RoiValue records that hold QuPath's
# vertices. objects.build_geometries turns many of them into shapely geometries
# at once, because one vectorized call per batch is much faster than one per object.


def _plane(obj: JavaObject) -> tuple[int, int, int]:
    return int(obj.get("c", -1)), int(obj.get("z", 0)), int(obj.get("t", 0))


def _xy(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray) or len(x) != len(y):
        raise ValueError("x and y coordinate arrays are missing or of different lengths")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("ROI coordinates are not finite")
    return x, y


def _bounds(obj: JavaObject) -> tuple[float, float, float, float]:
    # Bounded ROI proxies store x, y and x2 = x + width, y2 = y + height.
    bounds = (float(obj.get("x")), float(obj.get("y")), float(obj.get("x2")), float(obj.get("y2")))
    if not all(math.isfinite(value) for value in bounds):
        raise ValueError(f"ROI bounds {bounds} are not finite")
    return bounds


def _convert_polygon_roi(obj: JavaObject) -> RoiValue:
    return RoiValue("Polygon", _xy(obj.get("x"), obj.get("y")), _plane(obj))


def _convert_area_roi(obj: JavaObject) -> RoiValue:
    # AreaROI, which AWTAreaROI is also written as: one float[] pair per ring.
    rings = [_xy(x, y) for x, y in zip(obj.get("x") or [], obj.get("y") or [])]
    return RoiValue("Area", rings, _plane(obj))


def _convert_rectangle_roi(obj: JavaObject) -> RoiValue:
    return RoiValue("Rectangle", _bounds(obj), _plane(obj))


def _convert_ellipse_roi(obj: JavaObject) -> RoiValue:
    return RoiValue("Ellipse", _bounds(obj), _plane(obj))


def _convert_line_roi(obj: JavaObject) -> RoiValue:
    x1, y1, x2, y2 = _bounds(obj)
    return RoiValue("Line", (np.array([x1, x2]), np.array([y1, y2])), _plane(obj))


def _convert_polyline_roi(obj: JavaObject) -> RoiValue:
    return RoiValue("Polyline", _xy(obj.get("x"), obj.get("y")), _plane(obj))


def _convert_points_roi(obj: JavaObject) -> RoiValue:
    return RoiValue("Points", _xy(obj.get("x"), obj.get("y")), _plane(obj))


def _convert_geometry_roi(obj: JavaObject) -> RoiValue:
    wkb = obj.get("wkb")
    if not isinstance(wkb, bytes):
        raise ValueError("GeometryROI proxy without WKB bytes")
    # GeometryROI.getGeometry() returns the stored geometry as it is, without
    # the normalization that QuPath 0.6 applies to the other ROI types.
    geometry = shapely.transform(shapely.from_wkb(wkb), snap_to_grid)
    return RoiValue("Geometry", geometry, _plane(obj))


def _geos_errors_as_value_errors(convert: Converter) -> Converter:
    # The stream reader reports ValueError with the byte offset; GEOS errors on
    # corrupt WKB would otherwise escape without one.
    def wrapper(obj: JavaObject) -> Any:
        try:
            return convert(obj)
        except GEOSException as exc:
            raise ValueError(f"invalid geometry: {exc}") from exc

    return wrapper


ROI_CONVERTERS: dict[str, Converter] = {
    "qupath.lib.roi.PolygonROI$SerializationProxy": _convert_polygon_roi,
    "qupath.lib.roi.PolylineROI$SerializationProxy": _convert_polyline_roi,
    "qupath.lib.roi.RectangleROI$SerializationProxy": _convert_rectangle_roi,
    "qupath.lib.roi.EllipseROI$SerializationProxy": _convert_ellipse_roi,
    "qupath.lib.roi.LineROI$SerializationProxy": _convert_line_roi,
    "qupath.lib.roi.PointsROI$SerializationProxy": _convert_points_roi,
    "qupath.lib.roi.GeometryROI$WKBSerializationProxy": _geos_errors_as_value_errors(_convert_geometry_roi),
    "qupath.lib.roi.AreaROI$SerializationProxy": _convert_area_roi,
}

# ROI layouts that QuPath has written but this reader cannot decode, with the reason.
UNSUPPORTED_ROI_CLASSES: dict[str, str] = {
    "qupath.lib.roi.GeometryROI$SerializationProxy": (
        "this proxy stores a Java-serialized JTS geometry, whose classes this reader does "
        "not decode; the QuPath versions this reader was written against store GeometryROI "
        "as WKB (WKBSerializationProxy)"
    ),
}

METADATA_MAP_CLASS = "qupath.lib.objects.MetadataMap"
PATH_CLASS_CLASS = "qupath.lib.objects.classes.PathClass"

QUPATH_CONVERTERS: dict[str, Callable[[JavaObject], Any]] = {
    **JAVA_CONVERTERS,
    PATH_CLASS_CLASS: _convert_path_class,
    METADATA_MAP_CLASS: _convert_metadata_map,
    "qupath.lib.measurements.NumericMeasurementList$FloatList": _convert_numeric_measurements,
    "qupath.lib.measurements.NumericMeasurementList$DoubleList": _convert_numeric_measurements,
    "qupath.lib.measurements.DefaultMeasurementList": _convert_default_measurements,
    "qupath.lib.measurements.DoubleMeasurement": _convert_measurement,
    "qupath.lib.measurements.FloatMeasurement": _convert_measurement,
    STAINS_CLASS: _convert_stains,
    **ROI_CONVERTERS,
}

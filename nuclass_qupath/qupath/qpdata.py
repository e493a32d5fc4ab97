"""Read QuPath ``data.qpdata`` files into :class:`QuPathObject` values, without Java.

QuPath's ``PathIO.writeImageData`` writes one Java serialization stream: the
string ``"Data file version 3"``, the image server (JSON since version 3), the
number-format Locale, the image type, the stain vectors, the command history,
the object hierarchy, a property map and the string ``"EOF"``.

:func:`read_image_data` reads everything before the hierarchy.
:meth:`ImageData.iter_objects` then streams the hierarchy: each object is
decoded as QuPath's ``readExternal`` methods read it, and the large values
(ROI coordinates, measurement values) are dropped from the stream's handle
table once their object is built.  In ``"stream"`` order, memory use does not
grow with the number of objects.  ``"hierarchy"`` order (QuPath's order, parents
before children) keeps each top-level object's descendants until the parent
is complete, because QuPath writes a parent's ROI after its children.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from shapely.errors import GEOSException

from nuclass_qupath.errors import QpdataError
from nuclass_qupath.qupath import layouts
from nuclass_qupath.qupath.javaser import (
    SC_SERIALIZABLE,
    TC_NULL,
    TC_OBJECT,
    JavaArray,
    JavaClassDesc,
    JavaEnum,
    JavaObject,
    ObjectStreamReader,
    describe,
)
from nuclass_qupath.qupath.layouts import (
    Layout,
    MeasurementsValue,
    MetadataValue,
    PathClassValue,
    rgb_from_packed,
)
from nuclass_qupath.qupath.objects import QuPathObject, RoiValue, build_geometries
from nuclass_qupath.qupath.project_files import PixelCalibration, ServerInfo

logger = logging.getLogger(__name__)

METADATA_KEY_ID = "Object ID"
# Objects whose geometries are built together; see objects.build_geometries.
_GEOMETRY_BATCH = 256
ORDERS = ("hierarchy", "stream")
# Values that QuPath never shares between objects, dropped from the handle table
# once their object is complete.
_RELEASABLE = (RoiValue, MeasurementsValue, MetadataValue, JavaArray, np.ndarray, bytes)
_RELEASABLE_JAVA_CLASSES = frozenset(
    {"qupath.lib.roi.ClosedShapeStatistics", "qupath.lib.roi.GeometryROI$GeometryStats"}
)


# An object with its ROI and nucleus ROI, whose geometries are not built yet.
_Item = tuple[QuPathObject, "RoiValue | None", "RoiValue | None"]


# Handle-table stand-in for TMA cores already read: the TMA grid after the
# root object refers back to them, and this reader does not use the grid.
_READ_PATH_OBJECT = object()


@dataclass
class ImageData:
    """Header of a ``data.qpdata`` file, and access to its objects.

    Attributes
    ----------
    path
        The data file.
    data_file_version
        Version number from the file's first string (QuPath 0.6 writes 3).
    layout
        Version flags for this file, see :mod:`nuclass_qupath.qupath.layouts`.
    qupath_version
        QuPath version that wrote the file (data file version 3 and later).
    server
        Image server description (URIs, size, pixel calibration).
    server_path
        Server path or id as stored (``"Image path: ..."`` before version 3).
    image_type
        QuPath image type, e.g. ``"BRIGHTFIELD_H_E"``.
    stains
        Stain vectors, see :func:`layouts.parse_stains`.
    locale
        Number-format locale of the writer, e.g. ``"en"``.
    properties
        The image property map; ``None`` until :meth:`iter_objects` has read
        to the end, because QuPath writes it after the hierarchy.
    """

    path: Path
    data_file_version: int
    layout: Layout
    qupath_version: str | None = None
    server: ServerInfo | None = None
    server_path: str | None = None
    image_type: str | None = None
    stains: dict[str, Any] | None = None
    locale: str | None = None
    properties: dict[str, Any] | None = None
    _hierarchy_offset: int | None = field(default=None, repr=False)
    _hierarchy_handles: tuple[dict[int, Any], int] = field(default=({}, 0), repr=False)

    @property
    def calibration(self) -> PixelCalibration:
        return self.server.calibration if self.server else PixelCalibration()

    @property
    def mpp(self) -> float | None:
        """Pixel size in µm per pixel, or ``None`` when the image has none."""
        return self.calibration.mpp

    @property
    def width_px(self) -> int | None:
        return self.server.width_px if self.server else None

    @property
    def height_px(self) -> int | None:
        return self.server.height_px if self.server else None

    def iter_objects(self, *, order: str = "hierarchy", include_root: bool = False) -> Iterator[QuPathObject]:
        """Stream the objects of the hierarchy.

        Parameters
        ----------
        order
            ``"hierarchy"``: QuPath's order, each parent before its children
            (depth first), as ``getAllObjects`` and the GeoJSON export list them.
            ``"stream"``: each object as soon as it is complete, children
            before their parent; memory stays flat.
        include_root
            Also yield the root object (first in hierarchy order, last in stream order).

        Raises
        ------
        QpdataError
            If the hierarchy is truncated or does not match QuPath's layout.
        """
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is not one of {ORDERS}")
        if self._hierarchy_offset is None:
            return
        with open(self.path, "rb") as stream:
            stream.seek(self._hierarchy_offset)
            reader = _new_reader(stream, self.path, start_offset=self._hierarchy_offset)
            reader.restore_handles(self._hierarchy_handles)
            reader.enter_top_level()
            walker = _HierarchyWalker(reader, self, order, include_root)
            batch: list[_Item] = []
            for item in walker.walk():
                batch.append(item)
                if len(batch) >= _GEOMETRY_BATCH:
                    yield from _with_geometries(batch, self.path)
                    batch = []
            yield from _with_geometries(batch, self.path)
            self.properties = _read_trailer(reader, self.path)

    def objects(self, *, order: str = "hierarchy", include_root: bool = False) -> list[QuPathObject]:
        """Return all objects as a list; see :meth:`iter_objects`."""
        return list(self.iter_objects(order=order, include_root=include_root))


def read_image_data(path: str | os.PathLike) -> ImageData:
    """Read the header of a QuPath ``data.qpdata`` file.

    Parameters
    ----------
    path
        A ``data.qpdata`` file written by QuPath 0.1 to 0.6.

    Returns
    -------
    ImageData
        Image type, server, pixel size and stains; objects stream from
        :meth:`ImageData.iter_objects`.

    Raises
    ------
    QpdataError
        If the file is not a QuPath data file, is truncated or uses a layout
        this reader does not know.  The message names the file and byte offset.
    """
    path = Path(path)
    if not path.is_file():
        raise QpdataError(f"QuPath data file not found: {path}")
    start = time.perf_counter()
    with open(path, "rb") as stream:
        reader = _new_reader(stream, path)
        try:
            reader.read_header()
        except QpdataError as exc:
            raise QpdataError(f"{path} is not a QuPath data file: {exc}") from exc
        header = reader.read_utf()
        version = layouts.parse_data_file_version(header, str(path))
        image = ImageData(
            path=path, data_file_version=version, layout=layouts.layout_for_version(version, str(path))
        )
        _read_header_records(reader, image)
    logger.info(
        "read %s header: data file version %d, QuPath %s, image type %s, %.3f s",
        path,
        version,
        image.qupath_version or "unknown",
        image.image_type,
        time.perf_counter() - start,
    )
    return image


def _with_geometries(batch: list[_Item], source: Path) -> list[QuPathObject]:
    """Set the geometries of a batch of objects, built together, and return the objects."""
    try:
        geometries = build_geometries([roi for _, roi, _ in batch] + [nucleus for _, _, nucleus in batch])
    except GEOSException as exc:
        ids = ", ".join(obj.id for obj, _, _ in batch[:3])
        raise QpdataError(f"{source}: invalid ROI geometry among the objects from {ids}: {exc}") from exc
    n = len(batch)
    for index, (obj, _, _) in enumerate(batch):
        obj.geometry = geometries[index]
        obj.nucleus_geometry = geometries[n + index]
    return [obj for obj, _, _ in batch]


def _new_reader(stream: Any, path: Path, *, start_offset: int = 0) -> ObjectStreamReader:
    return ObjectStreamReader(
        stream, str(path), converters=layouts.QUPATH_CONVERTERS, start_offset=start_offset
    )


def _read_header_records(reader: ObjectStreamReader, image: ImageData) -> None:
    """Read the records before the hierarchy, and remember where the hierarchy starts."""
    source = str(image.path)
    server_record = reader.read_string_object()
    _set_server(image, server_record, source)
    while True:
        offset = reader.offset
        handles = reader.snapshot_handles()
        if reader.at_end():
            raise reader.error("unexpected end of data before the object hierarchy; the file is truncated")
        if reader.peek_byte() != TC_OBJECT:
            value = reader.read_object()
            if _is_end_marker(value):
                logger.warning("%s has no object hierarchy", source)
                return
            if isinstance(value, JavaEnum) and value.class_name == layouts.IMAGE_TYPE_CLASS:
                image.image_type = value.constant
            elif value is not None:
                logger.warning(
                    "%s: skipped unexpected record %s at byte offset %d", source, _describe(value), offset
                )
            continue
        desc, handle = reader.begin_object()
        if desc.name == layouts.HIERARCHY_CLASS:
            image._hierarchy_offset = offset
            image._hierarchy_handles = handles
            if image.layout.locale_record and image.locale is None:
                logger.warning(
                    "%s: data file version %d should contain a Locale record but has none",
                    source,
                    image.data_file_version,
                )
            return
        value = reader.finish_object(desc, handle)
        if desc.name == layouts.LOCALE_CLASS:
            image.locale = value if isinstance(value, str) else None
        elif desc.name == layouts.STAINS_CLASS:
            image.stains = value if isinstance(value, dict) else None
        elif desc.name == layouts.WORKFLOW_CLASS:
            continue
        elif isinstance(value, dict):
            image.properties = value
        else:
            logger.warning("%s: skipped unknown class %s at byte offset %d", source, desc.name, offset)


def _set_server(image: ImageData, record: str | None, source: str) -> None:
    if record is None:
        return
    if not image.layout.server_as_json:
        image.server_path = record.removeprefix("Image path:").strip()
        return
    try:
        wrapper = json.loads(record)
    except json.JSONDecodeError as exc:
        raise QpdataError(
            f"{source}: data file version {image.data_file_version} should store the image server "
            f"as JSON, but its server record is not JSON ({exc.msg} at column {exc.colno})"
        ) from exc
    if not isinstance(wrapper, dict):
        raise QpdataError(
            f"{source}: the server record is a JSON {type(wrapper).__name__}, expected an object"
        )
    image.qupath_version = wrapper.get("qupathVersion")
    image.server_path = wrapper.get("id")
    image.server = ServerInfo.from_builder(wrapper.get("server"))


def _read_trailer(reader: ObjectStreamReader, path: Path) -> dict[str, Any]:
    """Read the property map and the ``"EOF"`` marker after the hierarchy."""
    properties: dict[str, Any] = {}
    while not reader.at_end():
        value = reader.read_object()
        if _is_end_marker(value):
            return properties
        if isinstance(value, dict):
            properties.update(value)
    logger.warning("%s ends without QuPath's EOF marker", path)
    return properties


class _HierarchyWalker:
    """Reads a ``PathObjectHierarchy`` record and its objects as QuPath's readExternal does."""

    def __init__(self, reader: ObjectStreamReader, image: ImageData, order: str, include_root: bool) -> None:
        self.reader = reader
        self.source = str(image.path)
        self.layout = image.layout
        self.order = order
        self.include_root = include_root
        self.count = 0
        self.warned: set[str] = set()

    def walk(self) -> Iterator[_Item]:
        """Yield ``(object, ROI, nucleus ROI)`` in the requested order; geometries come later."""
        start = time.perf_counter()
        reader = self.reader
        desc, handle = reader.begin_object()
        root_fields = [
            java_field
            for class_desc in desc.hierarchy()
            if class_desc.name == layouts.HIERARCHY_CLASS
            for java_field in class_desc.fields
            if java_field.name == layouts.HIERARCHY_ROOT_FIELD
        ]
        if not root_fields:
            raise reader.error(
                f"data file version {self.layout.data_file_version} layout not understood: "
                f"{desc.name} has no field {layouts.HIERARCHY_ROOT_FIELD!r}"
            )
        with reader.object_fields():
            for class_desc in desc.hierarchy():
                if not class_desc.flags & SC_SERIALIZABLE:
                    continue
                for java_field in class_desc.fields:
                    if (
                        class_desc.name == layouts.HIERARCHY_CLASS
                        and java_field.name == layouts.HIERARCHY_ROOT_FIELD
                    ):
                        yield from self._read_path_object(parent_id=None)
                    else:
                        reader.read_field(java_field)
                if class_desc.has_write_method:
                    reader.skip_custom_data(class_desc.name)
        reader.set_handle(handle, None)
        elapsed = time.perf_counter() - start
        logger.info(
            "read %d objects from %s in %.2f s (%.0f objects/s)",
            self.count,
            self.source,
            elapsed,
            self.count / elapsed if elapsed > 0 else math.inf,
        )

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self.warned:
            self.warned.add(key)
            logger.warning(message, *args)

    def _read_path_object(self, parent_id: str | None) -> Iterator[_Item]:
        """Read one PathObject record with its descendants, yielding them in the requested order."""
        reader = self.reader
        start = reader.offset
        if reader.peek_byte() == TC_NULL:
            reader.read_object()
            return
        first_handle = reader.handle_count
        desc, handle = reader.begin_object()
        known = layouts.path_object_kind(desc.class_names())
        if known is None or not desc.is_externalizable:
            self._skip_unknown_object(desc, handle, start)
            return
        kind, known_class = known
        if known_class != desc.name:
            self._warn_once(
                desc.name,
                "%s: reading objects of class %s with the layout of its QuPath superclass %s",
                self.source,
                desc.name,
                known_class,
            )

        obj = QuPathObject(kind=kind, id="", parent_id=parent_id, java_class=desc.name)
        item: _Item = (obj, None, None)
        descendants: list[_Item] = []
        with reader.external_data(desc.name):
            self._read_path_object_fields(obj, start)
            n_children = reader.read_int()
            if n_children < 0:
                raise reader.error(f"{desc.name} {obj.id} has a negative child count {n_children}")
            if kind == "root" and self.include_root and self.order == "hierarchy":
                yield item
            if kind == "root" or self.order == "stream":
                for _ in range(n_children):
                    yield from self._read_path_object(obj.id)
            else:
                descendants = [child for _ in range(n_children) for child in self._read_path_object(obj.id)]
            if kind in layouts.ROI_OBJECT_KINDS:
                item = (obj, *self._read_roi_object_fields(obj, kind))

        # Drop what no later record refers to. The TMA grid after the root
        # refers back to TMA cores. An object's own id string is never shared,
        # unlike measurement names, which first appear inside an object.
        if kind == "tmaCore":
            reader.set_handle(handle, _READ_PATH_OBJECT)
        else:
            reader.drop_handle(handle)
        object_id = obj.id
        reader.release_handles(
            first_handle,
            lambda value: _is_releasable(value) or (isinstance(value, str) and value == object_id),
        )

        if kind == "root":
            if self.include_root and self.order == "stream":
                yield item
            return
        self.count += 1
        yield item
        yield from descendants

    def _skip_unknown_object(self, desc: JavaClassDesc, handle: int, start: int) -> None:
        self._warn_once(
            desc.name,
            "%s: skipped an object of unknown class %s at byte offset %d, with any child objects it holds",
            self.source,
            desc.name,
            start,
        )
        self.reader.finish_object(desc, handle)

    def _read_path_object_fields(self, obj: QuPathObject, start: int) -> None:
        # PathObject.writeExternal: name, color, then the id and fields (see the
        # object_uuid_record flag), then the child count and the children.
        reader = self.reader
        name = reader.read_object()
        obj.name = name if isinstance(name, str) else None
        color = reader.read_object()
        # QuPath ignores colours that are not Integer (pre-release java.awt.Color).
        obj.color = rgb_from_packed(color) if isinstance(color, int) and not isinstance(color, bool) else None
        record = reader.read_object()
        metadata: MetadataValue | None = None
        measurements: MeasurementsValue | None = None
        object_id: uuid.UUID | None = None
        if self.layout.object_uuid_record:
            if not isinstance(record, uuid.UUID):
                raise self._layout_error(start, "the object's UUID", record)
            object_id = record
            for _ in range(reader.read_int()):
                value = reader.read_object()
                if isinstance(value, MetadataValue):
                    metadata = value
                elif isinstance(value, MeasurementsValue):
                    measurements = value
        else:
            if isinstance(record, MetadataValue):
                metadata = record
                record = reader.read_object()
            if isinstance(record, MeasurementsValue):
                measurements = record
            elif record is not None:
                raise self._layout_error(start, "a MetadataMap, a measurement list or null", record)
        items = dict(metadata.items) if metadata else {}
        id_text = items.get(METADATA_KEY_ID)
        if object_id is None and id_text is not None and len(id_text) <= 36 and "-" in id_text:
            try:
                object_id = uuid.UUID(id_text)
                del items[METADATA_KEY_ID]
            except ValueError:
                logger.debug("%s: metadata 'Object ID' %r is not a UUID", self.source, id_text)
        if object_id is None:
            # QuPath gives an object read without a stored id a random one.
            object_id = uuid.uuid4()
        obj.id = str(object_id)
        obj.metadata = items
        obj.measurements = dict(measurements.items) if measurements else {}

    def _read_roi_object_fields(
        self, obj: QuPathObject, kind: str
    ) -> tuple[RoiValue | None, RoiValue | None]:
        # PathROIObject.writeExternal: Boolean lock (missing in files from early
        # QuPath versions), PathClass or null, ROI, double class probability.
        # PathCellObject adds its nucleus ROI, TMACoreObject its boolean isMissing.
        reader = self.reader
        value = reader.read_object()
        if isinstance(value, bool):
            obj.is_locked = value
            value = reader.read_object()
        if isinstance(value, PathClassValue):
            obj.path_class = value.names
            obj.class_color = rgb_from_packed(value.color)
        elif value is not None:
            self._warn_unknown(value, "classification", obj)
        roi = self._roi(reader.read_object(), obj)
        obj.roi_type = roi.roi_type if roi else None
        obj.class_probability = reader.read_double()
        nucleus = None
        if kind == "cell":
            nucleus = self._roi(reader.read_object(), obj)
            obj.nucleus_roi_type = nucleus.roi_type if nucleus else None
        elif kind == "tmaCore":
            obj.is_missing = reader.read_boolean()
        return roi, nucleus

    def _roi(self, value: Any, obj: QuPathObject) -> RoiValue | None:
        if isinstance(value, RoiValue):
            return value
        if value is not None:
            self._warn_unknown(value, "ROI", obj)
        return None

    def _warn_unknown(self, value: Any, role: str, obj: QuPathObject) -> None:
        class_name = value.class_name if isinstance(value, JavaObject) else type(value).__name__
        reason = layouts.UNSUPPORTED_ROI_CLASSES.get(class_name, "the class is not a known QuPath layout")
        self._warn_once(
            f"{role}:{class_name}",
            "%s: skipped %s of unknown class %s (first on object %s): %s",
            self.source,
            role,
            class_name,
            obj.id,
            reason,
        )

    def _layout_error(self, start: int, expected: str, found: Any) -> QpdataError:
        return self.reader.error(
            f"data file version {self.layout.data_file_version} layout not understood: the object "
            f"starting here should continue with {expected}, but contains {_describe(found)}",
            offset=start,
        )


def _is_end_marker(value: Any) -> bool:
    return isinstance(value, str) and value == layouts.END_OF_DATA


def _describe(value: Any) -> str:
    """Name the Java class behind a decoded value, for error messages."""
    if isinstance(value, MetadataValue):
        return f"a {layouts.METADATA_MAP_CLASS}"
    if isinstance(value, MeasurementsValue):
        return f"a {value.java_class}"
    if isinstance(value, PathClassValue):
        return f"a {layouts.PATH_CLASS_CLASS}"
    if isinstance(value, RoiValue):
        return f"a {value.roi_type} ROI"
    if isinstance(value, uuid.UUID):
        return "a java.util.UUID"
    return describe(value)


def _is_releasable(value: Any) -> bool:
    if isinstance(value, _RELEASABLE):
        return True
    return isinstance(value, JavaObject) and value.class_name in _RELEASABLE_JAVA_CLASSES

"""Test helpers: a small Java serialization writer and synthetic QuPath data files.

The writer emits the records of the Java Object Serialization Stream Protocol
the way ``java.io.ObjectOutputStream`` does (stream version 5, protocol
version 2): primitive data of ``writeObject``/``writeExternal`` and of the top
level goes into block-data records, flushed before each object.

The QuPath helpers lay objects out as QuPath 0.6 ``writeExternal`` does.  With
them, tests build data files in layouts that the sample projects lack: data
file version 4, objects without the lock record of early QuPath versions,
double-valued and ``DefaultMeasurementList`` measurements, and unknown
classes.  The benchmark uses them for large files.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TC_NULL, TC_REFERENCE, TC_CLASSDESC, TC_OBJECT, TC_STRING, TC_ARRAY = 0x70, 0x71, 0x72, 0x73, 0x74, 0x75
TC_BLOCKDATA, TC_ENDBLOCKDATA, TC_RESET, TC_BLOCKDATALONG = 0x77, 0x78, 0x79, 0x7A
TC_LONGSTRING, TC_PROXYCLASSDESC, TC_ENUM = 0x7C, 0x7D, 0x7E
SC_WRITE_METHOD, SC_SERIALIZABLE, SC_EXTERNALIZABLE, SC_BLOCK_DATA, SC_ENUM = 0x01, 0x02, 0x04, 0x08, 0x10
BASE_WIRE_HANDLE = 0x7E0000
MAX_BLOCK = 1024


def modified_utf8(text: str) -> bytes:
    """Encode as Java's modified UTF-8: U+0000 as C0 80, other planes as surrogate pairs."""
    out = bytearray()
    for char in text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass"):
        code = ord(char)
        if code == 0:
            out += b"\xc0\x80"
        else:
            out += char.encode("utf-8", "surrogatepass")
    return bytes(out)


def _utf16_units(text: str) -> str:
    # Split characters outside the BMP into surrogate pairs, as Java strings hold them.
    raw = text.encode("utf-16-le", "surrogatepass")
    return "".join(chr(int.from_bytes(raw[i : i + 2], "little")) for i in range(0, len(raw), 2))


@dataclass
class Desc:
    """A class description to write: fields as ``(typecode, name, type signature)``."""

    name: str
    flags: int
    fields: Sequence[tuple[str, str, str | None]] = ()
    super_desc: Desc | None = None
    suid: int = 1


class StreamWriter:
    """Build a Java serialization stream in memory."""

    def __init__(self, *, block_size: int = MAX_BLOCK) -> None:
        self.out = bytearray(b"\xac\xed\x00\x05")
        self.pending = bytearray()
        self.block_size = block_size
        self.handles: dict[Any, int] = {}
        self.next_handle = 0

    # -- primitive data (block mode) -----------------------------------------------

    def flush(self) -> None:
        data, self.pending = bytes(self.pending), bytearray()
        for start in range(0, len(data), self.block_size):
            chunk = data[start : start + self.block_size]
            if len(chunk) <= 255:
                self.out += bytes([TC_BLOCKDATA, len(chunk)]) + chunk
            else:
                self.out += bytes([TC_BLOCKDATALONG]) + struct.pack(">i", len(chunk)) + chunk

    def prim(self, fmt: str, *values: Any) -> None:
        self.pending += struct.pack(">" + fmt, *values)

    def utf(self, text: str) -> None:
        data = modified_utf8(_utf16_units(text))
        self.pending += struct.pack(">H", len(data)) + data

    # -- objects -----------------------------------------------------------------------

    def _new_handle(self, key: Any) -> int:
        handle = self.next_handle
        self.next_handle += 1
        if key is not None:
            self.handles[key] = handle
        return handle

    def reference(self, handle: int) -> None:
        self.flush()
        self.out += bytes([TC_REFERENCE]) + struct.pack(">i", BASE_WIRE_HANDLE + handle)

    def reset(self) -> None:
        self.flush()
        self.out.append(TC_RESET)
        self.handles.clear()
        self.next_handle = 0

    def null(self) -> None:
        self.flush()
        self.out.append(TC_NULL)

    def string(self, text: str | None, *, share: bool = True) -> None:
        if text is None:
            self.null()
            return
        self.flush()
        key = ("str", text)
        if share and key in self.handles:
            self.reference(self.handles[key])
            return
        data = modified_utf8(_utf16_units(text))
        if len(data) <= 0xFFFF:
            self.out += bytes([TC_STRING]) + struct.pack(">H", len(data)) + data
        else:
            self.out += bytes([TC_LONGSTRING]) + struct.pack(">q", len(data)) + data
        self._new_handle(key if share else None)

    def class_desc(self, desc: Desc | None) -> None:
        if desc is None:
            self.out.append(TC_NULL)
            return
        key = ("desc", desc.name)
        if key in self.handles:
            self.out += bytes([TC_REFERENCE]) + struct.pack(">i", BASE_WIRE_HANDLE + self.handles[key])
            return
        name = modified_utf8(desc.name)
        self.out += bytes([TC_CLASSDESC]) + struct.pack(">H", len(name)) + name + struct.pack(">q", desc.suid)
        self._new_handle(key)
        self.out += bytes([desc.flags]) + struct.pack(">H", len(desc.fields))
        for typecode, field_name, signature in desc.fields:
            encoded = modified_utf8(field_name)
            self.out += typecode.encode() + struct.pack(">H", len(encoded)) + encoded
            if typecode in "L[":
                self.string(signature)
        self.out.append(TC_ENDBLOCKDATA)
        self.class_desc(desc.super_desc)

    def proxy_class_desc(self, interfaces: Sequence[str]) -> None:
        self.out.append(TC_PROXYCLASSDESC)
        self._new_handle(None)
        self.out += struct.pack(">i", len(interfaces))
        for name in interfaces:
            encoded = modified_utf8(name)
            self.out += struct.pack(">H", len(encoded)) + encoded
        self.out.append(TC_ENDBLOCKDATA)
        self.class_desc(
            Desc(
                "java.lang.reflect.Proxy",
                SC_SERIALIZABLE,
                [("L", "h", "Ljava/lang/reflect/InvocationHandler;")],
            )
        )

    def serializable(
        self,
        desc: Desc,
        write_fields: Callable[[], None],
        *,
        annotation: Callable[[], None] | None = None,
        key: Any = None,
    ) -> None:
        """Write a Serializable object; ``write_fields`` writes its field values in desc order."""
        self.flush()
        self.out.append(TC_OBJECT)
        self.class_desc(desc)
        self._new_handle(key)
        write_fields()
        if annotation is not None:
            annotation()
            self.flush()
            self.out.append(TC_ENDBLOCKDATA)

    def external(self, desc: Desc, body: Callable[[], None], *, key: Any = None) -> None:
        """Write an Externalizable object; ``body`` is its writeExternal (block mode)."""
        self.flush()
        self.out.append(TC_OBJECT)
        self.class_desc(desc)
        self._new_handle(key)
        saved, self.pending = self.pending, bytearray()
        body()
        self.flush()
        self.out.append(TC_ENDBLOCKDATA)
        self.pending = saved

    def raw_fields(self, fmt: str, *values: Any) -> None:
        """Write primitive field values (outside block mode)."""
        self.out += struct.pack(">" + fmt, *values)

    def array(
        self, signature: str, values: Sequence[Any], *, write_item: Callable[[Any], None] | None = None
    ) -> None:
        self.flush()
        self.out.append(TC_ARRAY)
        self.class_desc(Desc(signature, SC_SERIALIZABLE, []))
        self._new_handle(None)
        self.out += struct.pack(">i", len(values))
        element = signature[1]
        if element in "BCDFIJSZ":
            code = {"B": "b", "C": "H", "D": "d", "F": "f", "I": "i", "J": "q", "S": "h", "Z": "?"}[element]
            self.out += struct.pack(f">{len(values)}{code}", *values)
        else:
            for value in values:
                (write_item or self.string)(value)

    def enum(self, class_name: str, constant: str) -> None:
        self.flush()
        self.out.append(TC_ENUM)
        self.class_desc(
            Desc(
                class_name,
                SC_SERIALIZABLE | SC_ENUM,
                [],
                Desc("java.lang.Enum", SC_SERIALIZABLE | SC_ENUM, []),
            )
        )
        self._new_handle(None)
        self.string(constant)

    def boxed(self, class_name: str, typecode: str, value: Any) -> None:
        """Write a boxed primitive (``java.lang.Integer`` with typecode ``"I"``, ...), shared by value."""
        key = ("boxed", class_name, value)
        if key in self.handles:
            self.reference(self.handles[key])
            return
        number = None if class_name == "java.lang.Boolean" else Desc("java.lang.Number", SC_SERIALIZABLE, [])
        desc = Desc(class_name, SC_SERIALIZABLE, [(typecode, "value", None)], number)
        fmt = {"B": "b", "C": "H", "D": "d", "F": "f", "I": "i", "J": "q", "S": "h", "Z": "?"}[typecode]
        self.serializable(desc, lambda: self.raw_fields(fmt, value), key=key)

    def uuid(self, value: uuid.UUID) -> None:
        desc = Desc(
            "java.util.UUID", SC_SERIALIZABLE, [("J", "leastSigBits", None), ("J", "mostSigBits", None)]
        )
        least = value.int & 0xFFFFFFFFFFFFFFFF
        most = value.int >> 64
        signed = [v - (1 << 64) if v >= 1 << 63 else v for v in (least, most)]
        self.serializable(desc, lambda: self.raw_fields("qq", *signed))

    def hash_map(self, items: dict[str, Any]) -> None:
        desc = Desc(
            "java.util.HashMap",
            SC_SERIALIZABLE | SC_WRITE_METHOD,
            [("F", "loadFactor", None), ("I", "threshold", None)],
        )

        def annotation() -> None:
            self.prim("ii", 16, len(items))
            for key, value in items.items():
                self.string(key)
                self.string(value)

        self.serializable(desc, lambda: self.raw_fields("fi", 0.75, 12), annotation=annotation)

    def bytes(self) -> bytes:
        self.flush()
        return bytes(self.out)


# -- QuPath layouts ---------------------------------------------------------------------

PKG = "qupath.lib.objects."
PATH_OBJECT = Desc(PKG + "PathObject", SC_EXTERNALIZABLE | SC_BLOCK_DATA)
PATH_ROI_OBJECT = Desc(PKG + "PathROIObject", SC_EXTERNALIZABLE | SC_BLOCK_DATA, super_desc=PATH_OBJECT)
KIND_DESCS = {
    "root": Desc(PKG + "PathRootObject", SC_EXTERNALIZABLE | SC_BLOCK_DATA, super_desc=PATH_OBJECT),
    "annotation": Desc(
        PKG + "PathAnnotationObject", SC_EXTERNALIZABLE | SC_BLOCK_DATA, super_desc=PATH_ROI_OBJECT
    ),
    "detection": Desc(
        PKG + "PathDetectionObject", SC_EXTERNALIZABLE | SC_BLOCK_DATA, super_desc=PATH_ROI_OBJECT
    ),
    "tile": Desc(PKG + "PathTileObject", SC_EXTERNALIZABLE | SC_BLOCK_DATA, super_desc=PATH_ROI_OBJECT),
    "tmaCore": Desc(PKG + "TMACoreObject", SC_EXTERNALIZABLE | SC_BLOCK_DATA, super_desc=PATH_ROI_OBJECT),
}
KIND_DESCS["cell"] = Desc(
    PKG + "PathCellObject", SC_EXTERNALIZABLE | SC_BLOCK_DATA, super_desc=KIND_DESCS["detection"]
)
METADATA_MAP = Desc(PKG + "MetadataMap", SC_EXTERNALIZABLE | SC_BLOCK_DATA)
PATH_CLASS = Desc(
    PKG + "classes.PathClass",
    SC_SERIALIZABLE,
    [
        ("L", "colorRGB", "Ljava/lang/Integer;"),
        ("L", "name", "Ljava/lang/String;"),
        ("L", "parentClass", "Lqupath/lib/objects/classes/PathClass;"),
    ],
)
HIERARCHY = Desc(
    PKG + "hierarchy.PathObjectHierarchy",
    SC_SERIALIZABLE,
    [
        ("L", "rootObject", "Lqupath/lib/objects/PathRootObject;"),
        ("L", "tmaGrid", "Lqupath/lib/objects/hierarchy/TMAGrid;"),
    ],
)
_NUMERIC = PKG.replace("objects.", "measurements.") + "NumericMeasurementList$"
ABSTRACT_NUMERIC = Desc(
    _NUMERIC + "AbstractNumericMeasurementList",
    SC_SERIALIZABLE,
    [("Z", "isClosed", None), ("L", "map", "Ljava/util/Map;"), ("L", "names", "Ljava/util/List;")],
)
FLOAT_LIST = Desc(_NUMERIC + "FloatList", SC_SERIALIZABLE, [("[", "values", "[F")], ABSTRACT_NUMERIC)
DOUBLE_LIST = Desc(_NUMERIC + "DoubleList", SC_SERIALIZABLE, [("[", "values", "[D")], ABSTRACT_NUMERIC)
DEFAULT_LIST = Desc(
    "qupath.lib.measurements.DefaultMeasurementList",
    SC_SERIALIZABLE,
    [("L", "list", "Ljava/util/ArrayList;")],
)
DOUBLE_MEASUREMENT = Desc(
    "qupath.lib.measurements.DoubleMeasurement",
    SC_SERIALIZABLE,
    [("D", "value", None), ("L", "name", "Ljava/lang/String;")],
)
LOCALE = Desc(
    "java.util.Locale",
    SC_SERIALIZABLE | SC_WRITE_METHOD,
    [("I", "hashcode", None)]
    + [
        ("L", name, "Ljava/lang/String;")
        for name in ("country", "extensions", "language", "script", "variant")
    ],
)
COLLSER = Desc("java.util.CollSer", SC_SERIALIZABLE | SC_WRITE_METHOD, [("I", "tag", None)])
ARRAY_LIST = Desc("java.util.ArrayList", SC_SERIALIZABLE | SC_WRITE_METHOD, [("I", "size", None)])
_ROI = "qupath.lib.roi."
_PLANE = [("I", "c", None), ("I", "t", None), ("I", "z", None)]
POLYGON_PROXY = Desc(
    _ROI + "PolygonROI$SerializationProxy",
    SC_SERIALIZABLE,
    _PLANE
    + [
        ("L", "name", "Ljava/lang/String;"),
        ("L", "stats", "Lqupath/lib/roi/ClosedShapeStatistics;"),
        ("[", "x", "[F"),
        ("[", "y", "[F"),
    ],
)
_BOUNDED = [("D", "x", None), ("D", "x2", None), ("D", "y", None), ("D", "y2", None)]
RECTANGLE_PROXY = Desc(
    _ROI + "RectangleROI$SerializationProxy",
    SC_SERIALIZABLE,
    [("I", "c", None), ("I", "t", None), *_BOUNDED[:], ("I", "z", None), ("L", "name", "Ljava/lang/String;")],
)
ELLIPSE_PROXY = Desc(_ROI + "EllipseROI$SerializationProxy", SC_SERIALIZABLE, RECTANGLE_PROXY.fields)
AREA_PROXY = Desc(
    _ROI + "AreaROI$SerializationProxy",
    SC_SERIALIZABLE,
    _PLANE
    + [
        ("L", "name", "Ljava/lang/String;"),
        ("L", "stats", "Lqupath/lib/roi/ClosedShapeStatistics;"),
        ("[", "x", "[[F"),
        ("[", "y", "[[F"),
    ],
)


@dataclass
class SyntheticObject:
    """An object to write into a synthetic data file (level-0 pixel coordinates)."""

    kind: str
    id: uuid.UUID = field(default_factory=uuid.uuid4)
    name: str | None = None
    path_class: tuple[tuple[str, int], ...] | None = None  # (name, packed colour) from the base class down
    roi: tuple[str, Any] | None = (
        None  # ("polygon", [(x, y)...]) | ("rectangle"/"ellipse", (x1, y1, x2, y2)) | ("area", [ring...]) | ("unknown", class name)
    )
    nucleus: tuple[str, Any] | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    measurement_list: str = "float"  # "float", "double", "float open", "double open", "default"
    metadata: dict[str, str] = field(default_factory=dict)
    locked: bool | None = False  # None: no lock record (QuPath 0.1 layout)
    is_missing: bool = False
    children: list[SyntheticObject] = field(default_factory=list)
    java_class: str | None = None  # subclass name written instead of the kind's class


class QpdataWriter:
    """Write QuPath data files with the layout of QuPath 0.6's ``PathIO.writeImageData``."""

    def __init__(self, *, data_file_version: int = 3, block_size: int = MAX_BLOCK) -> None:
        self.version = data_file_version
        self.w = StreamWriter(block_size=block_size)

    def build(
        self,
        root_children: list[SyntheticObject],
        *,
        image_type: str = "BRIGHTFIELD_H_E",
        server: dict[str, Any] | None = None,
        properties: dict[str, str] | None = None,
        eof: bool = True,
    ) -> bytes:
        w = self.w
        w.utf(f"Data file version {self.version}")
        if self.version >= 3:
            wrapper = {
                "dataVersion": self.version,
                "qupathVersion": "0.6.0",
                "server": server or {},
                "id": "synthetic",
            }
            w.string(json.dumps(wrapper))
        else:
            w.string("Image path: /data/synthetic.svs")
        if self.version >= 2:
            w.serializable(
                LOCALE,
                lambda: (
                    w.raw_fields("i", -1),
                    w.string(""),
                    w.string(""),
                    w.string("en"),
                    w.string(""),
                    w.string(""),
                ),
                annotation=lambda: None,
            )
        w.enum("qupath.lib.images.ImageData$ImageType", image_type)

        def hierarchy_fields() -> None:
            self.path_object(SyntheticObject("root", children=root_children))
            w.null()

        w.serializable(HIERARCHY, hierarchy_fields)
        w.hash_map(properties or {})
        if eof:
            w.string("EOF")
        return w.bytes()

    def write(self, path: Path, root_children: list[SyntheticObject], **kwargs: Any) -> Path:
        path.write_bytes(self.build(root_children, **kwargs))
        return path

    def path_object(self, obj: SyntheticObject) -> None:
        w = self.w
        desc = KIND_DESCS[obj.kind]
        if obj.java_class:
            desc = Desc(obj.java_class, SC_EXTERNALIZABLE | SC_BLOCK_DATA, super_desc=desc)

        def body() -> None:
            w.string(obj.name)
            w.null()  # colour
            if self.version >= 4:
                w.uuid(obj.id)
                w.prim("i", 1 + bool(obj.metadata))
                if obj.metadata:
                    self.metadata(obj.metadata)
                self.measurements(obj)
            else:
                self.metadata({**obj.metadata, "Object ID": str(obj.id)})
                self.measurements(obj)
            w.prim("i", len(obj.children))
            for child in obj.children:
                self.path_object(child)
            if obj.kind != "root":
                if obj.locked is not None:
                    w.boxed("java.lang.Boolean", "Z", obj.locked)
                self.path_class(obj.path_class)
                self.roi(obj.roi)
                w.prim("d", float("nan"))
                if obj.kind == "cell":
                    self.roi(obj.nucleus)
                if obj.kind == "tmaCore":
                    w.prim("?", obj.is_missing)

        w.external(desc, body)

    def metadata(self, items: dict[str, str]) -> None:
        w = self.w

        def body() -> None:
            w.boxed("java.lang.Integer", "I", 1)
            w.array("[Ljava.lang.Object;", list(items))
            w.array("[Ljava.lang.Object;", list(items.values()))

        w.external(METADATA_MAP, body)

    def measurements(self, obj: SyntheticObject) -> None:
        w = self.w
        if not obj.measurements:
            w.null()
            return
        names = list(obj.measurements)
        values = list(obj.measurements.values())
        if obj.measurement_list == "default":

            def default_fields() -> None:
                def items() -> None:
                    w.prim("i", len(names))
                    for name, value in zip(names, values):
                        w.serializable(
                            DOUBLE_MEASUREMENT, lambda n=name, v=value: (w.raw_fields("d", v), w.string(n))
                        )

                w.serializable(ARRAY_LIST, lambda: w.raw_fields("i", len(names)), annotation=items)

            w.serializable(DEFAULT_LIST, default_fields)
            return
        desc, code = (FLOAT_LIST, "[F") if obj.measurement_list.startswith("float") else (DOUBLE_LIST, "[D")

        def list_fields() -> None:
            # Closed lists, as QuPath writes them: one shared List.of copy of the names.
            w.raw_fields("?", True)
            w.null()
            key = ("names", tuple(names))
            if key in w.handles:
                w.reference(w.handles[key])
            else:
                w.serializable(
                    COLLSER,
                    lambda: w.raw_fields("i", 1),
                    annotation=lambda: (w.prim("i", len(names)), [w.string(n) for n in names]),
                    key=key,
                )
            w.array(code, values)

        def open_list_fields() -> None:
            # Open lists: an ArrayList of names and spare capacity after the last value.
            w.raw_fields("?", False)
            w.null()
            w.serializable(
                ARRAY_LIST,
                lambda: w.raw_fields("i", len(names)),
                annotation=lambda: (w.prim("i", len(names)), [w.string(n) for n in names]),
            )
            w.array(code, values + [0.0] * 3)

        w.serializable(desc, open_list_fields if obj.measurement_list.endswith("open") else list_fields)

    def path_class(self, spec: tuple[tuple[str, int], ...] | None) -> None:
        w = self.w
        if not spec:
            w.null()
            return
        key = ("class", spec)
        if key in w.handles:
            w.reference(w.handles[key])
            return

        def fields() -> None:
            w.boxed("java.lang.Integer", "I", spec[-1][1])
            w.string(spec[-1][0])
            self.path_class(spec[:-1])

        w.serializable(PATH_CLASS, fields, key=key)

    def roi(self, spec: tuple[str, Any] | None) -> None:
        w = self.w
        if spec is None:
            w.null()
            return
        kind, data = spec
        if kind == "polygon":
            xs = [p[0] for p in data]
            ys = [p[1] for p in data]
            w.serializable(
                POLYGON_PROXY,
                lambda: (
                    w.raw_fields("iii", -1, 0, 0),
                    w.null(),
                    w.null(),
                    w.array("[F", xs),
                    w.array("[F", ys),
                ),
            )
        elif kind in ("rectangle", "ellipse"):
            x1, y1, x2, y2 = data
            desc = RECTANGLE_PROXY if kind == "rectangle" else ELLIPSE_PROXY
            w.serializable(desc, lambda: (w.raw_fields("iiddddi", -1, 0, x1, x2, y1, y2, 0), w.null()))
        elif kind == "area":

            def ring_array(coord: int) -> None:
                w.array("[[F", data, write_item=lambda ring: w.array("[F", [p[coord] for p in ring]))

            w.serializable(
                AREA_PROXY,
                lambda: (w.raw_fields("iii", -1, 0, 0), w.null(), w.null(), ring_array(0), ring_array(1)),
            )
        elif kind == "unknown":
            w.serializable(Desc(data, SC_SERIALIZABLE, [("I", "value", None)]), lambda: w.raw_fields("i", 7))
        else:
            raise ValueError(f"unknown synthetic ROI kind {kind!r}")


def synthetic_cells(n: int, *, seed: int = 0, measurements: int = 41) -> list[SyntheticObject]:
    """Return one annotation holding ``n`` cells with 12-vertex polygon ROIs and float measurements."""
    import numpy as np

    rng = np.random.default_rng(seed)
    names = [f"Measurement {i}" for i in range(measurements)]
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    centres = rng.uniform(0, 20000, (n, 2))
    radii = rng.uniform(4, 8, n)
    unit = np.column_stack([np.cos(angles), np.sin(angles)])
    nuclei = centres[:, None, :] + radii[:, None, None] * unit[None, :, :]
    outlines = centres[:, None, :] + 1.6 * radii[:, None, None] * unit[None, :, :]
    values = rng.normal(size=(n, measurements)).astype(np.float32).tolist()
    cells = [
        SyntheticObject(
            "cell",
            roi=("polygon", outlines[index].tolist()),
            nucleus=("polygon", nuclei[index].tolist()),
            measurements=dict(zip(names, values[index])),
            path_class=(("Tumor", -3670016),) if index % 2 else None,
        )
        for index in range(n)
    ]
    region = SyntheticObject(
        "annotation", name="Region", roi=("rectangle", (0, 0, 20000, 20000)), children=cells, locked=True
    )
    return [region]

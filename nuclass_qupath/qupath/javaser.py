"""Reader for the Java Object Serialization Stream Protocol.

The grammar follows the Java SE specification, "Object Serialization Stream
Protocol" (chapter 6 of the Java Object Serialization Specification): stream
version 5, with protocol version 2 block data for externalizable objects.
The reader never loads or runs Java code. It turns the stream into plain
Python values:

* ``java.lang.String`` becomes :class:`str`, decoded from modified UTF-8.
* Primitive arrays become big-endian :mod:`numpy` arrays, except ``byte[]``,
  which becomes :class:`bytes`. Object arrays become :class:`JavaArray` lists.
* Enum constants become :class:`JavaEnum`, ``Class`` objects :class:`JavaClass`.
* Every other object becomes a :class:`JavaObject` with its field values per
  class and the custom data that its ``writeObject`` or ``writeExternal``
  method wrote.  A converter registered for the class name replaces it with a
  Python value (:mod:`nuclass_qupath.qupath.layouts` has those for the Java
  and QuPath classes in QuPath's data files).

The input is read in chunks, so the file is never held in memory whole.
Values that a later ``TC_REFERENCE`` record may refer to stay in the handle
table, as in Java's ``ObjectInputStream``.  Streaming callers drop large values
that no record refers back to with :meth:`ObjectStreamReader.release_handles`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from nuclass_qupath.errors import QpdataError

logger = logging.getLogger(__name__)

STREAM_MAGIC = 0xACED
STREAM_VERSION = 5

TC_NULL = 0x70
TC_REFERENCE = 0x71
TC_CLASSDESC = 0x72
TC_OBJECT = 0x73
TC_STRING = 0x74
TC_ARRAY = 0x75
TC_CLASS = 0x76
TC_BLOCKDATA = 0x77
TC_ENDBLOCKDATA = 0x78
TC_RESET = 0x79
TC_BLOCKDATALONG = 0x7A
TC_EXCEPTION = 0x7B
TC_LONGSTRING = 0x7C
TC_PROXYCLASSDESC = 0x7D
TC_ENUM = 0x7E

BASE_WIRE_HANDLE = 0x7E0000

SC_WRITE_METHOD = 0x01
SC_SERIALIZABLE = 0x02
SC_EXTERNALIZABLE = 0x04
SC_BLOCK_DATA = 0x08
SC_ENUM = 0x10

# Java primitive type code to struct format and numpy dtype (big-endian).
_STRUCTS = {code: struct.Struct(">" + fmt) for code, fmt in zip("BCDFIJSZ", "bHdfiqh?")}
_DTYPES = {
    code: np.dtype(name) for code, name in zip("CDFIJSZ", (">u2", ">f8", ">f4", ">i4", ">i8", ">i2", "?"))
}
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")

_CHUNK_BYTES = 1 << 20
_MAX_READ_BYTES = 1 << 26
# Nesting depth at which a stream is taken to be corrupt. QuPath's deepest
# chain (hierarchy, nested objects, ROI, arrays) is far shallower.
_MAX_DEPTH = 400
# Result of looking up a handle dropped by ObjectStreamReader.release_handles.
_RELEASED = object()


@dataclass(frozen=True)
class JavaField:
    """One serializable field of a class description."""

    typecode: str
    name: str
    class_name: str | None = None


@dataclass(eq=False)
class JavaClassDesc:
    """A class description (``TC_CLASSDESC`` or ``TC_PROXYCLASSDESC``)."""

    name: str
    serial_version_uid: int
    flags: int
    fields: tuple[JavaField, ...]
    annotations: list[Any]
    super_desc: JavaClassDesc | None
    proxy_interfaces: tuple[str, ...] | None = None
    _hierarchy: list[JavaClassDesc] | None = field(default=None, init=False, repr=False)
    _class_names: list[str] | None = field(default=None, init=False, repr=False)
    _steps: list[tuple[Any, Any]] | None = field(default=None, init=False, repr=False)

    @property
    def is_externalizable(self) -> bool:
        return bool(self.flags & SC_EXTERNALIZABLE)

    @property
    def has_write_method(self) -> bool:
        return bool(self.flags & SC_WRITE_METHOD)

    def hierarchy(self) -> list[JavaClassDesc]:
        """Return this class and its serializable superclasses, topmost first."""
        if self._hierarchy is None:
            chain = []
            desc: JavaClassDesc | None = self
            while desc is not None:
                chain.append(desc)
                desc = desc.super_desc
            self._hierarchy = chain[::-1]
        return self._hierarchy

    def class_names(self) -> list[str]:
        """Return the class names of :meth:`hierarchy`, this class first."""
        if self._class_names is None:
            self._class_names = [desc.name for desc in reversed(self.hierarchy())]
        return self._class_names

    def field_steps(self) -> list[tuple[Any, Any]]:
        """Return how to read this class's field values, in stream order.

        Each step is ``(struct, names)`` for a run of primitive fields, read
        with one ``unpack``, or ``(None, name)`` for an object field.
        """
        if self._steps is None:
            steps: list[tuple[Any, Any]] = []
            codes, names = "", []
            for java_field in self.fields:
                if java_field.typecode in _STRUCTS:
                    codes += _STRUCTS[java_field.typecode].format[1:]
                    names.append(java_field.name)
                    continue
                if names:
                    steps.append((struct.Struct(">" + codes), tuple(names)))
                    codes, names = "", []
                steps.append((None, java_field.name))
            if names:
                steps.append((struct.Struct(">" + codes), tuple(names)))
            self._steps = steps
        return self._steps


class JavaObject:
    """A deserialized object of a class without a converter.

    Attributes
    ----------
    class_name
        Fully qualified Java class name.
    desc
        The class description.
    fields
        Field values per class name, for every serializable class of the hierarchy.
    annotations
        Custom data per class name, as written by ``writeObject`` or
        ``writeExternal``: :class:`bytes` for primitive data (consecutive
        block-data records joined) and deserialized objects, in order.
    """

    __slots__ = ("class_name", "desc", "fields", "annotations")

    def __init__(self, class_name: str, desc: JavaClassDesc) -> None:
        self.class_name = class_name
        self.desc = desc
        self.fields: dict[str, dict[str, Any]] = {}
        self.annotations: dict[str, list[Any]] = {}

    def __repr__(self) -> str:
        return f"JavaObject({self.class_name!r}, fields={self.fields!r}, annotations={self.annotations!r})"

    def get(self, name: str, default: Any = None) -> Any:
        """Return field ``name`` from the most derived class that declares it."""
        values = self.fields.get(self.class_name)
        if values is not None and name in values:
            return values[name]
        for class_name in self.desc.class_names():
            values = self.fields.get(class_name)
            if values is not None and name in values:
                return values[name]
        return default


class JavaArray(list):
    """An array of objects (``TC_ARRAY`` of a reference type), with its Java class name."""

    __slots__ = ("class_name",)

    def __init__(self, class_name: str, items: list[Any]) -> None:
        super().__init__(items)
        self.class_name = class_name


@dataclass(frozen=True)
class JavaEnum:
    """An enum constant (``TC_ENUM``)."""

    class_name: str
    constant: str


@dataclass(frozen=True)
class JavaClass:
    """A ``java.lang.Class`` object (``TC_CLASS``)."""

    desc: JavaClassDesc


# Turns a fully read object into a Python value.
Converter = Callable[[JavaObject], Any]


def decode_modified_utf8(data: bytes) -> str:
    """Decode Java's modified UTF-8 (``DataOutput.writeUTF``).

    Modified UTF-8 writes U+0000 as ``C0 80`` and characters outside the Basic
    Multilingual Plane as two 3-byte surrogates (CESU-8).

    Raises
    ------
    UnicodeDecodeError
        If the bytes are not modified UTF-8.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.replace(b"\xc0\x80", b"\x00").decode("utf-8", errors="surrogatepass")
        return text.encode("utf-16-le", errors="surrogatepass").decode("utf-16-le", errors="surrogatepass")


class ObjectStreamReader:
    """Pull reader for one Java serialization stream.

    Parameters
    ----------
    stream
        Binary file object positioned at the stream magic ``AC ED``, or at
        ``start_offset`` of a stream read earlier (see :meth:`restore_handles`).
    source
        Name used in error messages, usually the file path.
    converters
        Class name to a function that turns the finished :class:`JavaObject`
        into a Python value; the value replaces the object in the handle table.
    start_offset
        Byte offset of the stream's current position, for error messages.

    Raises
    ------
    QpdataError
        On a bad magic number, truncated data or a record that breaks the
        grammar.  The message names ``source`` and the byte offset.
    """

    def __init__(
        self,
        stream: IO[bytes],
        source: str,
        *,
        converters: dict[str, Converter] | None = None,
        start_offset: int = 0,
    ) -> None:
        self.source = source
        self.converters = dict(converters or {})
        self._stream = stream
        self._size = _stream_size(stream)
        self._buf = b""
        self._pos = 0
        self._base = start_offset
        # Handle number to value. Released handles are deleted, so the table
        # only keeps values that later records may refer to.
        self._handles: dict[int, Any] = {}
        self._next_handle = 0
        self._block_mode = False
        self._block_remaining = 0
        self._depth = 0

    # -- input buffer -------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Byte offset of the next unread byte."""
        return self._base + self._pos

    def error(self, message: str, offset: int | None = None) -> QpdataError:
        """Build a :class:`QpdataError` that names the source and byte offset."""
        where = self.offset if offset is None else offset
        return QpdataError(f"{self.source}: {message} at byte offset {where}")

    def _fill(self, n: int) -> None:
        """Make ``n`` bytes available from the current position, reading ahead in chunks."""
        rest = self._buf[self._pos :]
        self._base += self._pos
        self._pos = 0
        need = n - len(rest)
        # A corrupt length field must fail here rather than allocate its size.
        if self._size is not None and need > self._size - self._base - len(rest):
            raise self._truncated(n, self._size - self._base)
        chunks = [rest]
        target = max(need, _CHUNK_BYTES)
        got = 0
        while got < need:
            chunk = self._stream.read(min(target - got, _MAX_READ_BYTES))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        self._buf = b"".join(chunks)
        if len(self._buf) < n:
            raise self._truncated(n, len(self._buf))

    def _truncated(self, needed: int, left: int) -> QpdataError:
        return self.error(
            f"unexpected end of data: the stream is truncated ({needed} bytes needed, {left} left)",
            offset=self._base + max(left, 0),
        )

    def _take(self, n: int) -> bytes:
        if self._pos + n > len(self._buf):
            self._fill(n)
        start = self._pos
        self._pos = start + n
        return self._buf[start : self._pos]

    def _u8(self) -> int:
        if self._pos >= len(self._buf):
            self._fill(1)
        value = self._buf[self._pos]
        self._pos += 1
        return value

    def _unpack(self, fmt: struct.Struct) -> Any:
        if self._pos + fmt.size > len(self._buf):
            self._fill(fmt.size)
        value = fmt.unpack_from(self._buf, self._pos)[0]
        self._pos += fmt.size
        return value

    def _decode(self, data: bytes) -> str:
        try:
            return decode_modified_utf8(data)
        except UnicodeDecodeError as exc:
            raise self.error(f"invalid modified UTF-8 string data ({exc.reason})") from exc

    def peek_byte(self) -> int:
        """Return the next byte without consuming it."""
        if self._pos >= len(self._buf):
            self._fill(1)
        return self._buf[self._pos]

    def at_end(self) -> bool:
        """Return True when no bytes are left."""
        if self._pos < len(self._buf):
            return False
        try:
            self._fill(1)
        except QpdataError:
            return True
        return False

    # -- header and primitive data -------------------------------------------------

    def read_header(self) -> None:
        """Read and check the stream magic number and version, then enter block-data mode.

        ``ObjectOutputStream`` writes top-level primitives (``writeUTF``,
        ``writeInt``) as block data between the top-level objects.
        """
        if self._size is not None and self._size < 4:
            raise QpdataError(
                f"{self.source}: not a Java serialization stream: shorter than its 4-byte header"
            )
        magic = self._unpack(_U16)
        version = self._unpack(_U16)
        if magic != STREAM_MAGIC:
            raise self.error(
                f"not a Java serialization stream: magic number 0x{magic:04X}, expected 0x{STREAM_MAGIC:04X}",
                offset=0,
            )
        if version != STREAM_VERSION:
            raise self.error(
                f"unsupported Java serialization stream version {version}, expected {STREAM_VERSION}",
                offset=2,
            )
        self._block_mode = True
        self._block_remaining = 0

    def enter_top_level(self) -> None:
        """Switch to the block-data mode of a stream's top level, for a stream resumed mid-way."""
        self._block_mode = True
        self._block_remaining = 0

    def _read_block(self, n: int) -> bytes:
        """Read ``n`` bytes of primitive data, across block-data records if needed."""
        if self._block_remaining >= n:
            self._block_remaining -= n
            return self._take(n)
        parts = []
        while n > 0:
            if self._block_remaining == 0:
                self._block_remaining = self._read_block_header()
            count = min(n, self._block_remaining)
            parts.append(self._take(count))
            self._block_remaining -= count
            n -= count
        return b"".join(parts)

    def _read_block_header(self) -> int:
        start = self.offset
        tc = self._u8()
        if tc == TC_BLOCKDATA:
            return self._u8()
        if tc == TC_BLOCKDATALONG:
            size = self._unpack(_I32)
            if size < 0:
                raise self.error(f"negative block-data length {size}", offset=start)
            return size
        raise self.error(
            f"expected primitive block data but found record type 0x{tc:02X}; "
            "the custom data of the current object is shorter than its expected layout",
            offset=start,
        )

    def read_primitive(self, typecode: str) -> Any:
        """Read one primitive value by its Java type code (``"I"`` for ``int``, ...)."""
        fmt = _STRUCTS[typecode]
        if self._block_mode:
            return fmt.unpack(self._read_block(fmt.size))[0]
        return self._unpack(fmt)

    def read_int(self) -> int:
        """Read a 32-bit signed integer (``readInt``)."""
        return self.read_primitive("I")

    def read_long(self) -> int:
        """Read a 64-bit signed integer (``readLong``)."""
        return self.read_primitive("J")

    def read_double(self) -> float:
        """Read a 64-bit float (``readDouble``)."""
        return self.read_primitive("D")

    def read_boolean(self) -> bool:
        """Read a boolean (``readBoolean``)."""
        return self.read_primitive("Z")

    def read_bytes(self, n: int) -> bytes:
        """Read ``n`` raw bytes (``readFully``)."""
        if n < 0:
            raise self.error(f"negative byte count {n}")
        return self._read_block(n) if self._block_mode else self._take(n)

    def read_utf(self) -> str:
        """Read a string written by ``writeUTF`` (2-byte length, modified UTF-8)."""
        length = _U16.unpack(self.read_bytes(2))[0]
        return self._decode(self.read_bytes(length))

    # -- handles ---------------------------------------------------------------------

    @property
    def handle_count(self) -> int:
        """Number of handles assigned since the last reset."""
        return self._next_handle

    def set_handle(self, handle: int, value: Any) -> None:
        """Replace the value that later references to ``handle`` resolve to."""
        self._handles[handle] = value

    def drop_handle(self, handle: int) -> None:
        """Drop one handle's value, like :meth:`release_handles`."""
        self._handles.pop(handle, None)

    def snapshot_handles(self) -> tuple[dict[int, Any], int]:
        """Return a copy of the handle table, for :meth:`restore_handles`."""
        return dict(self._handles), self._next_handle

    def restore_handles(self, snapshot: tuple[dict[int, Any], int]) -> None:
        """Replace the handle table, to resume a stream read earlier."""
        handles, next_handle = snapshot
        self._handles = dict(handles)
        self._next_handle = next_handle

    def release_handles(self, start: int, release: Callable[[Any], bool]) -> None:
        """Drop handle values from ``start`` on for which ``release`` returns True.

        A later reference to a released handle raises :class:`QpdataError`,
        so only values that the writer never shares may be released.
        """
        handles = self._handles
        released = []
        # Dicts keep insertion order, which is handle order: walk back to start.
        for index in reversed(handles):
            if index < start:
                break
            if release(handles[index]):
                released.append(index)
        for index in released:
            del handles[index]

    def _new_handle(self, value: Any) -> int:
        handle = self._next_handle
        self._handles[handle] = value
        self._next_handle = handle + 1
        return handle

    def _reset(self) -> None:
        self._handles.clear()
        self._next_handle = 0

    def _reference(self) -> Any:
        # The TC_REFERENCE byte was just consumed.
        pos = self._pos
        if pos + 4 > len(self._buf):
            self._fill(4)
            pos = self._pos
        handle = _I32.unpack_from(self._buf, pos)[0] - BASE_WIRE_HANDLE
        self._pos = pos + 4
        value = self._handles.get(handle, _RELEASED)
        if value is _RELEASED:
            start = self._base + pos - 1
            if not 0 <= handle < self._next_handle:
                raise self.error(
                    f"reference to unknown handle 0x{handle + BASE_WIRE_HANDLE:X} "
                    f"({self._next_handle} handles defined)",
                    offset=start,
                )
            raise self.error(
                f"reference to handle 0x{handle + BASE_WIRE_HANDLE:X}, whose value was released "
                "while streaming; the stream shares a value that QuPath does not share",
                offset=start,
            )
        return value

    # -- objects ----------------------------------------------------------------------

    def read_object(self) -> Any:
        """Read one object record (``readObject``) and return its Python value."""
        if self._block_remaining and self._block_mode:
            raise self.error(
                f"expected an object but {self._block_remaining} bytes of primitive data "
                "are unread; the custom data does not match the expected layout"
            )
        pos = self._pos
        if pos >= len(self._buf):
            self._fill(1)
            pos = self._pos
        tc = self._buf[pos]
        self._pos = pos + 1

        # The most frequent records first.
        if tc == TC_REFERENCE:
            return self._reference()
        if tc == TC_OBJECT:
            # _nested(_read_new_object), inlined because this is the hottest path.
            self._depth += 1
            if self._depth > _MAX_DEPTH:
                raise self.error(f"objects are nested more than {_MAX_DEPTH} levels deep")
            saved_mode = self._block_mode
            self._block_mode = False
            try:
                desc = self.read_class_desc()
                if desc is None:
                    raise self.error("object record without a class description")
                return self._read_object_data(desc, self._new_handle(None))
            finally:
                self._block_mode = saved_mode
                self._depth -= 1
        if tc == TC_NULL:
            return None
        if tc == TC_STRING:
            return self._new_string(self._unpack(_U16))
        if tc == TC_ARRAY:
            return self._nested(self._read_new_array)
        if tc == TC_RESET:
            self._reset()
            return self.read_object()
        if tc == TC_LONGSTRING:
            return self._new_string(self._unpack(_I64))
        if tc == TC_ENUM:
            return self._read_new_enum()
        if tc == TC_CLASS:
            value = JavaClass(self._read_desc_or_fail("class"))
            self._new_handle(value)
            return value
        if tc in (TC_CLASSDESC, TC_PROXYCLASSDESC):
            self._pos -= 1
            return self.read_class_desc()

        start = self._base + pos
        if tc == TC_EXCEPTION:
            raise self.error("the writer recorded an exception (TC_EXCEPTION)", offset=start)
        if tc in (TC_BLOCKDATA, TC_BLOCKDATALONG):
            raise self.error("expected an object but found primitive block data", offset=start)
        if tc == TC_ENDBLOCKDATA:
            raise self.error("expected an object but found the end of the custom data", offset=start)
        raise self.error(f"unknown record type 0x{tc:02X}", offset=start)

    def read_string_object(self) -> str | None:
        """Read an object record that must be a string or null."""
        start = self.offset
        value = self.read_object()
        if value is not None and not isinstance(value, str):
            raise self.error(f"expected a string but found {describe(value)}", offset=start)
        return value

    def _nested(self, read: Callable[[], Any]) -> Any:
        self._depth += 1
        if self._depth > _MAX_DEPTH:
            raise self.error(f"objects are nested more than {_MAX_DEPTH} levels deep")
        saved_mode = self._block_mode
        self._block_mode = False
        try:
            return read()
        finally:
            self._block_mode = saved_mode
            self._depth -= 1

    def _new_string(self, length: int) -> str:
        if length < 0:
            raise self.error(f"negative string length {length}")
        value = self._decode(self._take(length))
        self._new_handle(value)
        return value

    def read_class_desc(self) -> JavaClassDesc | None:
        """Read a class description record, a reference to one, or null."""
        pos = self._pos
        buf = self._buf
        if pos + 5 <= len(buf) and buf[pos] == TC_REFERENCE:
            # After its first use, every class description is a reference.
            handle = _I32.unpack_from(buf, pos + 1)[0] - BASE_WIRE_HANDLE
            value = self._handles.get(handle)
            if isinstance(value, JavaClassDesc):
                self._pos = pos + 5
                return value

        start = self.offset
        tc = self._u8()
        if tc == TC_NULL:
            return None
        if tc == TC_REFERENCE:
            value = self._reference()
            if not isinstance(value, JavaClassDesc):
                raise self.error(f"expected a class description but found {describe(value)}", start)
            return value
        if tc == TC_CLASSDESC:
            name = self._decode(self._take(self._unpack(_U16)))
            desc = JavaClassDesc(name, self._unpack(_I64), 0, (), [], None)
            self._new_handle(desc)
            desc.flags = self._u8()
            desc.fields = tuple(self._read_field_desc() for _ in range(self._unpack(_U16)))
        elif tc == TC_PROXYCLASSDESC:
            desc = JavaClassDesc("<proxy>", 0, SC_SERIALIZABLE, (), [], None)
            self._new_handle(desc)
            count = self._unpack(_I32)
            if count < 0:
                raise self.error(f"negative proxy interface count {count}", start)
            desc.proxy_interfaces = tuple(self._decode(self._take(self._unpack(_U16))) for _ in range(count))
            desc.name = "<proxy " + ", ".join(desc.proxy_interfaces) + ">"
        else:
            raise self.error(f"expected a class description but found record type 0x{tc:02X}", start)

        desc.annotations = self._read_annotation()
        desc.super_desc = self.read_class_desc()
        return desc

    def _read_desc_or_fail(self, record: str) -> JavaClassDesc:
        desc = self.read_class_desc()
        if desc is None:
            raise self.error(f"{record} record without a class description")
        return desc

    def _read_field_desc(self) -> JavaField:
        start = self.offset
        typecode = chr(self._u8())
        name = self._decode(self._take(self._unpack(_U16)))
        if typecode in _STRUCTS:
            return JavaField(typecode, name)
        if typecode in ("L", "["):
            class_name = self._nested(self.read_object)
            if not isinstance(class_name, str):
                raise self.error(f"field {name!r} has no type name string", offset=start)
            return JavaField(typecode, name, class_name)
        raise self.error(f"field {name!r} has unknown type code {typecode!r}", offset=start)

    def _read_annotation(self) -> list[Any]:
        """Read custom data up to ``TC_ENDBLOCKDATA`` as bytes and objects."""
        items: list[Any] = []
        saved_mode = self._block_mode
        self._block_mode = True
        try:
            while True:
                tc = self.peek_byte()
                if tc == TC_ENDBLOCKDATA:
                    self._pos += 1
                    return items
                if tc in (TC_BLOCKDATA, TC_BLOCKDATALONG):
                    data = self._take(self._read_block_header())
                    if items and isinstance(items[-1], bytes):
                        items[-1] += data
                    else:
                        items.append(data)
                else:
                    items.append(self.read_object())
        finally:
            self._block_mode = saved_mode
            self._block_remaining = 0

    def skip_custom_data(self, class_name: str) -> None:
        """Discard unread custom data up to and including ``TC_ENDBLOCKDATA``.

        Unread data means that the layout used to read the object was shorter
        than what the writer wrote, so it is logged as a warning.
        """
        start = self.offset
        skipped_bytes = self._block_remaining
        if self._block_remaining:
            self._take(self._block_remaining)
            self._block_remaining = 0
        skipped_objects = 0
        for item in self._read_annotation():
            if isinstance(item, bytes):
                skipped_bytes += len(item)
            else:
                skipped_objects += 1
        if skipped_bytes or skipped_objects:
            logger.warning(
                "%s: skipped %d bytes and %d objects of unread custom data of %s at byte offset %d",
                self.source,
                skipped_bytes,
                skipped_objects,
                class_name,
                start,
            )

    # -- objects read by the caller, part by part ------------------------------------

    def begin_object(self) -> tuple[JavaClassDesc, int]:
        """Read the ``TC_OBJECT`` marker and class description of a new object.

        The caller then reads the class data, with :meth:`finish_object` or
        part by part with :meth:`object_fields`, :meth:`read_field` and
        :meth:`external_data`, and sets the final value with :meth:`set_handle`.
        Until then the object's handle resolves to ``None``.
        """
        if self._block_mode and self._block_remaining:
            raise self.error(
                f"expected an object but {self._block_remaining} bytes of primitive data "
                "are unread; the custom data does not match the expected layout"
            )
        start = self.offset
        tc = self._u8()
        while tc == TC_RESET:
            self._reset()
            start = self.offset
            tc = self._u8()
        if tc != TC_OBJECT:
            raise self.error(f"expected a new object (TC_OBJECT) but found record type 0x{tc:02X}", start)
        desc = self._read_desc_or_fail("object")
        return desc, self._new_handle(None)

    def finish_object(self, desc: JavaClassDesc, handle: int) -> Any:
        """Read the class data of an object started with :meth:`begin_object` and return its value."""
        return self._nested(lambda: self._read_object_data(desc, handle))

    @contextlib.contextmanager
    def object_fields(self) -> Iterator[None]:
        """Context for reading the field values of an object (outside block-data mode)."""
        self._depth += 1
        saved_mode = self._block_mode
        self._block_mode = False
        try:
            yield
        finally:
            self._block_mode = saved_mode
            self._depth -= 1

    @contextlib.contextmanager
    def external_data(self, class_name: str) -> Iterator[None]:
        """Context for reading the custom data of an externalizable object (block-data mode).

        On normal exit, unread custom data is skipped up to ``TC_ENDBLOCKDATA``
        with a warning, see :meth:`skip_custom_data`.
        """
        self._depth += 1
        if self._depth > _MAX_DEPTH:
            raise self.error(f"objects are nested more than {_MAX_DEPTH} levels deep")
        saved_mode = self._block_mode
        self._block_mode = True
        self._block_remaining = 0
        try:
            yield
            self.skip_custom_data(class_name)
        finally:
            self._block_mode = saved_mode
            self._block_remaining = 0
            self._depth -= 1

    def read_field(self, java_field: JavaField) -> Any:
        """Read the value of one serializable field."""
        fmt = _STRUCTS.get(java_field.typecode)
        return self._unpack(fmt) if fmt is not None else self.read_object()

    def read_fields(self, desc: JavaClassDesc) -> dict[str, Any]:
        """Read the serializable field values of one class of an object."""
        values: dict[str, Any] = {}
        steps = desc._steps if desc._steps is not None else desc.field_steps()
        for fmt, names in steps:
            if fmt is None:
                values[names] = self.read_object()
                continue
            if self._pos + fmt.size > len(self._buf):
                self._fill(fmt.size)
            values.update(zip(names, fmt.unpack_from(self._buf, self._pos)))
            self._pos += fmt.size
        return values

    def _read_new_object(self) -> Any:
        desc = self._read_desc_or_fail("object")
        return self._read_object_data(desc, self._new_handle(None))

    def _read_object_data(self, desc: JavaClassDesc, handle: int) -> Any:
        obj = JavaObject(desc.name, desc)
        handles = self._handles
        handles[handle] = obj
        if desc._steps is not None and desc.super_desc is None and desc.flags == SC_SERIALIZABLE:
            # Fast path for the common case: one plain Serializable class.
            obj.fields[desc.name] = self.read_fields(desc)
        elif desc.flags & SC_EXTERNALIZABLE:
            if not desc.flags & SC_BLOCK_DATA:
                raise self.error(
                    f"externalizable {desc.name} was written with stream protocol version 1, "
                    "which stores its data without block-data records; only the class's own "
                    "code can read it"
                )
            obj.annotations[desc.name] = self._read_annotation()
        else:
            for class_desc in desc.hierarchy():
                flags = class_desc.flags
                if flags & SC_SERIALIZABLE:
                    obj.fields[class_desc.name] = self.read_fields(class_desc)
                    if flags & SC_WRITE_METHOD:
                        obj.annotations[class_desc.name] = self._read_annotation()
        converter = self.converters.get(desc.name)
        if converter is None:
            return obj
        try:
            value = converter(obj)
        except (ValueError, TypeError, KeyError, IndexError, struct.error) as exc:
            raise self.error(f"invalid data for {desc.name}: {exc}") from exc
        handles[handle] = value
        return value

    def _read_new_array(self) -> Any:
        desc = self.read_class_desc()
        if desc is None or not desc.name.startswith("[") or len(desc.name) < 2:
            raise self.error("array record without an array class description")
        handle = self._new_handle(None)
        size = self._unpack(_I32)
        if size < 0:
            raise self.error(f"negative array length {size}")
        element = desc.name[1]
        value: Any
        if element == "B":
            value = self._take(size)
        elif element in _DTYPES:
            dtype = _DTYPES[element]
            value = np.frombuffer(self._take(size * dtype.itemsize), dtype=dtype)
        else:
            value = JavaArray(desc.name, [self.read_object() for _ in range(size)])
        self._handles[handle] = value
        return value

    def _read_new_enum(self) -> JavaEnum:
        desc = self._read_desc_or_fail("enum")
        handle = self._new_handle(None)
        value = JavaEnum(desc.name, self.read_string_object() or "")
        self._handles[handle] = value
        return value


def _stream_size(stream: IO[bytes]) -> int | None:
    """Return the total size of a file-backed stream, or ``None`` if unknown."""
    try:
        return os.fstat(stream.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def describe(value: Any) -> str:
    """Name the Java type of a deserialized value, for error messages."""
    if isinstance(value, JavaObject):
        return f"an object of class {value.class_name}"
    if isinstance(value, JavaEnum):
        return f"enum constant {value.class_name}.{value.constant}"
    return f"a value of Python type {type(value).__name__}"

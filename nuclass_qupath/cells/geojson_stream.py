"""Stream the features of a GeoJSON file without loading the whole text.

QuPath writes a FeatureCollection, a bare array of features or a single
Feature, depending on the export options, compact or pretty-printed, plain or
gzip-compressed. :func:`iter_geojson_features` reads all of them one feature at
a time, so memory grows with the largest single feature, not with the file.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from nuclass_qupath.errors import CellsError

_CHUNK_CHARS = 1 << 20
_NON_WHITESPACE = re.compile(r"[^ \t\n\r]")
_GZIP_MAGIC = b"\x1f\x8b"


class _JsonStream:
    """Incremental reader of the ``features`` of a GeoJSON text.

    Each feature is decoded with :meth:`json.JSONDecoder.raw_decode` from a
    buffer that contains the unread part of the current chunk, so memory grows with
    the largest single feature, not with the file.
    """

    def __init__(self, handle: TextIO, source: str, chunk_chars: int = _CHUNK_CHARS) -> None:
        self._handle = handle
        self._source = source
        self._chunk_chars = chunk_chars
        self._buffer = ""
        self._pos = 0
        self._eof = False
        # Position of the buffer start in the file, for error messages.
        self._line_offset = 0
        self._column_offset = 0
        self._decoder = json.JSONDecoder()
        #: "FeatureCollection", "list" or "Feature", once known.
        self.container: str | None = None

    def _read_more(self, min_chars: int = 0) -> bool:
        """Drop the consumed text and append the next chunk; return False at the end of the file."""
        if self._eof:
            return False
        consumed = self._pos
        newlines = self._buffer.count("\n", 0, consumed)
        if newlines:
            self._line_offset += newlines
            self._column_offset = consumed - self._buffer.rfind("\n", 0, consumed) - 1
        else:
            self._column_offset += consumed
        try:
            text = self._handle.read(max(self._chunk_chars, min_chars))
        except UnicodeDecodeError as exc:
            raise CellsError(
                f"{self._source} is not UTF-8 text ({exc.reason} at byte {exc.start} of a chunk); "
                "export the objects again from QuPath, which writes UTF-8"
            ) from exc
        except (OSError, EOFError) as exc:
            raise CellsError(
                f"could not read {self._source}: {exc}; if it is gzip-compressed, check that it is complete"
            ) from exc
        self._buffer = self._buffer[consumed:] + text
        self._pos = 0
        if not text:
            self._eof = True
        return bool(text)

    def _location(self, pos: int) -> tuple[int, int]:
        newlines = self._buffer.count("\n", 0, pos)
        if newlines == 0:
            return self._line_offset + 1, self._column_offset + pos + 1
        return self._line_offset + newlines + 1, pos - self._buffer.rfind("\n", 0, pos)

    def _syntax_error(self, message: str, pos: int) -> CellsError:
        line, column = self._location(pos)
        return CellsError(
            f"{self._source} is not valid JSON: {message} at line {line}, column {column}; "
            "the file may be truncated or hand-edited, so export the objects from QuPath again"
        )

    def _peek(self) -> str:
        """Skip whitespace and return the next character, or '' at the end of the text."""
        while True:
            match = _NON_WHITESPACE.search(self._buffer, self._pos)
            if match:
                self._pos = match.start()
                return self._buffer[self._pos]
            self._pos = len(self._buffer)
            if not self._read_more():
                return ""

    def _expect(self, characters: str, context: str) -> str:
        found = self._peek()
        if not found or found not in characters:
            expected = " or ".join(repr(c) for c in characters)
            raise self._syntax_error(f"expected {expected} {context}, found {found or 'end of file'!r}", self._pos)
        self._pos += 1
        return found

    def _decode_value(self) -> Any:
        self._peek()
        while True:
            try:
                value, end = self._decoder.raw_decode(self._buffer, self._pos)
            except json.JSONDecodeError as exc:
                # The value may continue in the next chunk. Reading at least as
                # much again as is pending keeps retries on a huge feature O(size).
                # Reading moves the buffer, so decode again before reporting a position.
                if not self._eof:
                    self._read_more(min_chars=2 * (len(self._buffer) - self._pos))
                    continue
                raise self._syntax_error(exc.msg, exc.pos) from exc
            # A number or literal that ends with the buffer may go on in the next chunk.
            if end == len(self._buffer) and not self._eof:
                self._read_more()
                continue
            self._pos = end
            return value

    def _array_items(self) -> Iterator[Any]:
        self._expect("[", "to open the features array")
        if self._peek() == "]":
            self._pos += 1
            return
        while True:
            yield self._decode_value()
            if self._expect(",]", "after a feature") == "]":
                return

    def _expect_end(self) -> None:
        if self._peek():
            raise self._syntax_error("unexpected text after the end of the JSON document", self._pos)

    def features(self) -> Iterator[Any]:
        """Yield each element of ``features`` (or of a top-level array, or the one Feature)."""
        first = self._peek()
        if first == "":
            raise CellsError(f"{self._source} is empty; export the objects from QuPath again")
        if first == "[":
            self.container = "list"
            yield from self._array_items()
            self._expect_end()
            return
        if first != "{":
            raise self._syntax_error("expected a JSON object or array", self._pos)

        self._pos += 1
        members: dict[str, Any] = {}
        saw_features = False
        if self._peek() == "}":
            self._pos += 1
        else:
            while True:
                if self._peek() != '"':
                    raise self._syntax_error("expected a member name in double quotes", self._pos)
                key = self._decode_value()
                self._expect(":", f"after member name {key!r}")
                if key == "features" and self._peek() == "[":
                    saw_features = True
                    self.container = "FeatureCollection"
                    yield from self._array_items()
                else:
                    members[key] = self._decode_value()
                if self._expect(",}", "after an object member") == "}":
                    break
        self._expect_end()

        if saw_features:
            return
        if members.get("type") == "Feature":
            self.container = "Feature"
            yield members
            return
        found = ", ".join(repr(k) for k in members) or "none"
        raise CellsError(
            f"{self._source} is JSON but not GeoJSON: it has no 'features' array and is not a single "
            f"Feature (top-level keys: {found}); export the objects with QuPath's "
            "File > Export objects as GeoJSON"
        )


def _open_text(path: Path) -> TextIO:
    """Open ``path`` as UTF-8 text, decompressing gzip whatever the file suffix is."""
    try:
        with open(path, "rb") as probe:
            magic = probe.read(2)
    except FileNotFoundError as exc:
        raise CellsError(f"GeoJSON file not found: {path}; check the path") from exc
    except IsADirectoryError as exc:
        raise CellsError(f"{path} is a folder, not a GeoJSON file") from exc
    except OSError as exc:
        raise CellsError(f"could not open {path}: {exc}") from exc
    # utf-8-sig drops a byte-order mark, which some editors add on Windows.
    if magic == _GZIP_MAGIC:
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def iter_geojson_features(path: str | os.PathLike, *, chunk_chars: int = _CHUNK_CHARS) -> Iterator[Any]:
    """Yield the features of a GeoJSON file one by one, without loading the whole text.

    Parameters
    ----------
    path
        ``.geojson`` or ``.json`` file, optionally gzip-compressed (detected from
        the content). It may hold a FeatureCollection, a bare array of features
        or a single Feature: QuPath writes each of these, depending on the
        export options.
    chunk_chars
        Characters read per step.

    Yields
    ------
    Any
        Each decoded feature, unvalidated (normally a dict).

    Raises
    ------
    CellsError
        If the file is missing, not UTF-8, not JSON (the message gives line and
        column) or JSON without features.
    """
    path = Path(path)
    with _open_text(path) as handle:
        yield from _JsonStream(handle, str(path), chunk_chars).features()

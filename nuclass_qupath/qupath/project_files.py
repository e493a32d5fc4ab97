"""Read a QuPath project folder (``project.qpproj`` and ``data/<id>/``) without Java.

A QuPath project stores absolute image URIs.  When the project folder has
moved, :class:`QuPathProjectFiles` finds the images the way QuPath's
``qupath.lib.io.UriUpdater.fixUris`` does (qupath-core; the class dates from
2021, the QuPath 0.3 era, and the copy read for this module is a later one):

1. A URI whose file exists is kept.
2. Otherwise its path relative to the folder of the project's previous
   location (the ``uri`` at the top of ``project.qpproj``) is applied to the
   current project folder, if both share a filesystem root and the result exists.
3. Otherwise files with the same name are searched in the current project
   folder and its subfolders, 4 levels deep, skipping hidden entries.

An optional ``image_root_remap`` (old path prefix to new prefix) is tried
before steps 2 and 3, for images that moved independently of the project.
A missing image is reported through :attr:`ProjectImageEntry.exists` and a
warning, and its objects can still be read from ``data.qpdata``.

NOTE: step 2 is checked against the QuPath 0.6.0 sample projects, which were
saved under another folder; steps 1 and 3 only against folders the tests build.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nuclass_qupath.errors import ProjectError

if TYPE_CHECKING:
    from nuclass_qupath.qupath.qpdata import ImageData

logger = logging.getLogger(__name__)

PROJECT_FILE = "project.qpproj"
DATA_FILE = "data.qpdata"
SERVER_FILE = "server.json"
SUMMARY_FILE = "summary.json"
CLASSES_FILE = Path("classifiers") / "classes.json"
# UriUpdater.fixUris searches the project folder 4 levels deep for file names.
SEARCH_DEPTH = 4
MICROMETER_UNITS = frozenset({"µm", "um", "μm", "micron", "microns", "micrometer"})


@dataclass(frozen=True)
class PixelCalibration:
    """Pixel size of an image server.

    Attributes
    ----------
    pixel_width, pixel_height
        Size of one level-0 pixel in ``unit``; ``None`` when not stored.
    unit
        QuPath's unit string: ``"µm"``, or ``"px"`` when the image has no pixel size.
    """

    pixel_width: float | None = None
    pixel_height: float | None = None
    unit: str | None = None

    @property
    def mpp(self) -> float | None:
        """Mean pixel size in µm per pixel, or ``None`` unless the unit is micrometres."""
        if self.unit not in MICROMETER_UNITS or self.pixel_width is None:
            return None
        if self.pixel_height is None:
            return self.pixel_width
        return (self.pixel_width + self.pixel_height) / 2.0

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> PixelCalibration:
        """Read ``pixelCalibration`` from QuPath's ImageServerMetadata JSON."""
        calibration = metadata.get("pixelCalibration") or {}
        width = calibration.get("pixelWidth") or {}
        height = calibration.get("pixelHeight") or {}
        return cls(
            pixel_width=_float_or_none(width.get("value")),
            pixel_height=_float_or_none(height.get("value")),
            unit=width.get("unit") or height.get("unit"),
        )


@dataclass(frozen=True)
class ServerInfo:
    """The parts of a QuPath ``ServerBuilder`` JSON that describe the image.

    Attributes
    ----------
    uris
        Every ``uri`` in the builder, searched recursively as QuPath does, so
        wrapped servers (rotated, sparse, pyramidized) list their sources.
    width_px, height_px
        Level-0 size in pixels, from the builder metadata.
    """

    builder_type: str | None
    provider: str | None
    uris: tuple[str, ...]
    name: str | None
    width_px: int | None
    height_px: int | None
    calibration: PixelCalibration
    magnification: float | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_builder(cls, builder: Mapping[str, Any] | None) -> ServerInfo:
        """Parse a ``serverBuilder`` object (``project.qpproj``, ``server.json`` or ``data.qpdata``)."""
        builder = dict(builder) if isinstance(builder, Mapping) else {}
        metadata = builder.get("metadata")
        metadata = metadata if isinstance(metadata, Mapping) else {}
        return cls(
            builder_type=builder.get("builderType"),
            provider=builder.get("providerClassName"),
            uris=tuple(collect_uris(builder)),
            name=metadata.get("name"),
            width_px=_int_or_none(metadata.get("width")),
            height_px=_int_or_none(metadata.get("height")),
            calibration=PixelCalibration.from_metadata(metadata),
            magnification=_float_or_none(metadata.get("magnification")),
            raw=builder,
        )


def collect_uris(element: Any, uris: list[str] | None = None) -> list[str]:
    """Return every string ``uri`` field in a JSON value, depth first, like QuPath's getURIsRecursive."""
    if uris is None:
        uris = []
    if isinstance(element, Mapping):
        uri = element.get("uri")
        if isinstance(uri, str) and uri not in uris:
            uris.append(uri)
        for value in element.values():
            if isinstance(value, Mapping | list):
                collect_uris(value, uris)
    elif isinstance(element, list):
        for item in element:
            collect_uris(item, uris)
    return uris


def uri_to_path(uri: str) -> Path | None:
    """Return the local path of a ``file:`` URI, or ``None`` for other schemes."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme.lower() != "file":
        return None
    path = urllib.request.url2pathname(parsed.path)
    if parsed.netloc and parsed.netloc.lower() != "localhost":
        path = f"//{parsed.netloc}{path}"
    return Path(path)


@dataclass
class ProjectImageEntry:
    """One image entry of a QuPath project.

    Attributes
    ----------
    entry_id
        QuPath's ``entryID``; the image data lives in ``data/<entry_id>/``.
    image_name
        Name shown in QuPath's project list.
    uris
        Image URIs as stored in ``project.qpproj``.
    image_paths
        Local path per URI after relocation (``None`` for non-file URIs).
    image_path
        First entry of ``image_paths``: the image file to open.
    exists
        True if every local image file exists, False if one is missing, and
        ``None`` when no URI is a local file.
    relocated
        Whether any path differs from the stored URI.
    server
        Image size and pixel size from ``server.json`` (or the project entry).
    """

    entry_id: int
    image_name: str
    description: str | None
    metadata: dict[str, str]
    tags: list[str]
    uris: tuple[str, ...]
    image_paths: tuple[Path | None, ...]
    exists: bool | None
    relocated: bool
    server: ServerInfo
    data_dir: Path
    summary: dict[str, Any] | None = None

    @property
    def image_path(self) -> Path | None:
        return self.image_paths[0] if self.image_paths else None

    @property
    def qpdata_path(self) -> Path:
        """Path of the entry's ``data.qpdata`` (it may not exist for an image never saved)."""
        return self.data_dir / DATA_FILE

    @property
    def has_data(self) -> bool:
        return self.qpdata_path.is_file()

    @property
    def calibration(self) -> PixelCalibration:
        return self.server.calibration

    @property
    def width_px(self) -> int | None:
        return self.server.width_px

    @property
    def height_px(self) -> int | None:
        return self.server.height_px

    def read_image_data(self) -> ImageData:
        """Read the entry's ``data.qpdata`` header; objects stream from :meth:`ImageData.iter_objects`."""
        from nuclass_qupath.qupath.qpdata import read_image_data

        if not self.has_data:
            raise ProjectError(
                f"image entry {self.entry_id} ({self.image_name!r}) has no {self.qpdata_path}; "
                "open and save the image in QuPath to create it"
            )
        return read_image_data(self.qpdata_path)


class QuPathProjectFiles:
    """A QuPath project read from its files, without QuPath or Java.

    Parameters
    ----------
    path
        The project folder or its ``project.qpproj`` file.
    image_root_remap
        Old path prefix to new path prefix, applied to missing image files
        before QuPath's own relocation steps, e.g.
        ``{"/srv/nuclass-data/slides": "/data/slides"}``.

    Raises
    ------
    ProjectError
        If the project file is missing or not valid JSON, or an image entry
        lacks its ``entryID`` or data folder.
    """

    def __init__(self, path: str | os.PathLike, *, image_root_remap: Mapping[str, str] | None = None) -> None:
        path = Path(path).expanduser()
        self.project_file = path / PROJECT_FILE if path.is_dir() else path
        if not self.project_file.is_file():
            raise ProjectError(
                f"QuPath project not found: {self.project_file} does not exist; pass the "
                f"project folder or its {PROJECT_FILE}"
            )
        self.folder = self.project_file.parent.resolve()
        self.image_root_remap = dict(image_root_remap or {})
        raw = _load_json(self.project_file)
        if not isinstance(raw, dict):
            raise ProjectError(
                f"{self.project_file} is invalid: it contains a JSON {type(raw).__name__}, expected an object"
            )
        self.raw = raw
        self.version: str | None = raw.get("version")
        self.previous_uri: str | None = raw.get("uri")
        self.create_timestamp: int | None = raw.get("createTimestamp")
        self.modify_timestamp: int | None = raw.get("modifyTimestamp")
        self.last_id: int | None = raw.get("lastID")
        entries = raw.get("images") or []
        if not isinstance(entries, list):
            raise ProjectError(
                f"{self.project_file} is invalid: 'images' is a JSON {type(entries).__name__}, expected a list"
            )
        self.images = [self._read_entry(index, entry) for index, entry in enumerate(entries)]
        missing = [image for image in self.images if image.exists is False]
        logger.info(
            "read QuPath project %s (QuPath %s): %d images, %d missing",
            self.project_file,
            self.version,
            len(self.images),
            len(missing),
        )

    @property
    def missing_images(self) -> list[ProjectImageEntry]:
        """Images whose local file could not be found, even after relocation."""
        return [image for image in self.images if image.exists is False]

    def image(self, key: int | str) -> ProjectImageEntry:
        """Return the image with this ``entryID`` (int) or image name (str).

        Raises
        ------
        KeyError
            If no image matches.
        """
        for image in self.images:
            if (isinstance(key, int) and image.entry_id == key) or image.image_name == key:
                return image
        raise KeyError(
            f"no image {key!r} in {self.project_file}; images: {[i.image_name for i in self.images]}"
        )

    def path_classes(self) -> dict[str, tuple[int, int, int]]:
        """Return class name to ``(r, g, b)`` from ``classifiers/classes.json`` (empty if absent)."""
        classes_file = self.folder / CLASSES_FILE
        if not classes_file.is_file():
            return {}
        raw = _load_json(classes_file)
        result: dict[str, tuple[int, int, int]] = {}
        entries = raw.get("pathClasses") if isinstance(raw, dict) else None
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            name, color = entry.get("name"), entry.get("color")
            if isinstance(name, str) and isinstance(color, int):
                value = color & 0xFFFFFF
                result[name] = ((value >> 16) & 0xFF, (value >> 8) & 0xFF, value & 0xFF)
        return result

    # -- entries and relocation --------------------------------------------------

    def _read_entry(self, index: int, entry: Any) -> ProjectImageEntry:
        if not isinstance(entry, dict):
            raise ProjectError(
                f"{self.project_file}: image entry {index} is a JSON {type(entry).__name__}, expected an object"
            )
        name = entry.get("imageName") or f"image #{index}"
        entry_id = entry.get("entryID")
        if not isinstance(entry_id, int):
            raise ProjectError(
                f"{self.project_file}: image entry {index} ({name!r}) has no integer entryID; "
                f"projects written by QuPath 0.1 (version {self.version!r}) are not supported, "
                "open the project in QuPath 0.2 or later and save it"
            )
        data_dir = self.folder / "data" / str(entry_id)
        if not data_dir.is_dir():
            raise ProjectError(
                f"{self.project_file}: image entry {entry_id} ({name!r}) has no data folder "
                f"{data_dir}; the project folder is incomplete"
            )

        builder = entry.get("serverBuilder") or {}
        server_file = data_dir / SERVER_FILE
        server = ServerInfo.from_builder(_load_json(server_file) if server_file.is_file() else builder)
        uris = tuple(collect_uris(builder)) or server.uris
        paths = tuple(self.locate(uri) for uri in uris)
        local = [path for path in paths if path is not None]
        # Some formats are folders (OME-Zarr), so any existing path counts.
        exists = all(path.exists() for path in local) if local else None
        relocated = any(path is not None and path != uri_to_path(uri) for uri, path in zip(uris, paths))

        if exists is False:
            logger.warning(
                "image entry %d (%r): image file not found: %s",
                entry_id,
                name,
                ", ".join(str(path) for path in local if not path.exists()),
            )

        summary_file = data_dir / SUMMARY_FILE
        return ProjectImageEntry(
            entry_id=entry_id,
            image_name=name,
            description=entry.get("description"),
            metadata={str(k): str(v) for k, v in (entry.get("metadata") or {}).items()},
            tags=list(entry.get("tags") or []),
            uris=uris,
            image_paths=paths,
            exists=exists,
            relocated=relocated,
            server=server,
            data_dir=data_dir,
            summary=_load_json(summary_file) if summary_file.is_file() else None,
        )

    def locate(self, uri: str) -> Path | None:
        """Return the local file for an image URI after relocation; see the module docstring.

        Returns the stored path unchanged when nothing better exists, and
        ``None`` for URIs that are not local files.
        """
        path = uri_to_path(uri)
        if path is None or path.exists():
            return path
        for old, new in self.image_root_remap.items():
            if str(path).startswith(old):
                candidate = Path(new + str(path)[len(old) :])
                if candidate.exists():
                    return candidate
        relative = self._relative_to_previous_folder(path)
        if relative is not None:
            return relative
        found = _search_by_name(self.folder, path.name, SEARCH_DEPTH)
        return found if found is not None else path

    def _relative_to_previous_folder(self, path: Path) -> Path | None:
        previous = uri_to_path(self.previous_uri) if self.previous_uri else None
        if previous is None:
            return None
        # QuPath relativizes against folders, not the project file itself.
        previous_dir = previous if previous.is_dir() else previous.parent
        if previous_dir == self.folder or path.anchor != previous_dir.anchor:
            return None
        relative = os.path.relpath(path, previous_dir)
        candidate = Path(os.path.normpath(self.folder / relative))
        return candidate if candidate.exists() else None


def _search_by_name(folder: Path, name: str, depth: int) -> Path | None:
    # Files of a folder first, then its subfolders, as UriUpdater.searchDirectoriesRecursive.
    if depth <= 0 or not folder.is_dir():
        return None
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return None
    subfolders = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.name == name:
            return entry
        if entry.is_dir():
            subfolders.append(entry)
    for subfolder in subfolders:
        found = _search_by_name(subfolder, name, depth - 1)
        if found is not None:
            return found
    return None


def _load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ProjectError(f"{path} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise ProjectError(f"cannot read {path}: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProjectError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from exc


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

"""Export the objects of a QuPath project as GeoJSON, one file per image, without QuPath.

The files match what QuPath 0.6's ``exportAllObjectsToGeoJson(path,
"FEATURE_COLLECTION")`` writes and what QuPath 0.4 and later import. Each file
is one FeatureCollection with every object of the image except the root, in
QuPath's hierarchy order. Each feature has its ``id``, ``objectType``,
``classification`` (``names`` for a derived class), colours, ``measurements``
and, for cells, ``nucleusGeometry``. Objects are read from ``data.qpdata`` with
the Java-free reader, so neither QuPath nor paquo is needed, and an image whose
file is missing is exported all the same.

Two differences from QuPath's own export: NaN and infinite measurements are
left out (QuPath writes a bare ``NaN`` token, which is not JSON; QuPath reads
a missing measurement as NaN), and each feature is on its own line.

File names are ``<image name>.geojson`` (``.geojson.gz`` with gzip), with the
image name made safe by :func:`safe_file_name`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nuclass_qupath.errors import ProjectError
from nuclass_qupath.qupath.batch import UnknownImageError
from nuclass_qupath.qupath.objects import OBJECT_KINDS

logger = logging.getLogger(__name__)

#: Object types that can be exported (QuPath's GeoJSON ``objectType`` values).
EXPORT_OBJECT_TYPES = tuple(kind for kind in OBJECT_KINDS if kind != "root")

# QuPath's GeneralTools.stripInvalidFilenameChars removes these (0.6); control characters are added here.
_UNSAFE_CHARACTERS = re.compile(r'[\\/:"*?<>|\x00-\x1f\x7f]+')
# Names Windows reserves for devices, with or without an extension.
_WINDOWS_DEVICE_NAMES = {"CON", "PRN", "AUX", "NUL"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)}
_MAX_NAME_CHARS = 200


@dataclass
class ExportedImage:
    """The outcome of exporting one image.

    Attributes
    ----------
    image_name
        QuPath image name.
    entry_id
        QuPath's entry id of the image.
    path
        File written, or None when the export failed.
    object_counts
        Objects written per object type.
    error
        Why the export failed, or None.
    """

    image_name: str
    entry_id: int
    path: Path | None
    object_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


def safe_file_name(image_name: str) -> str:
    """Return a file name stem for a QuPath image name that is valid on Linux, macOS and Windows.

    Each run of the characters that QuPath removes from file names
    (``\\ / : " * ? < > |``) and of control characters becomes one ``_``.
    Leading and trailing spaces and trailing dots are removed, because Windows
    drops them. A Windows device name such as ``CON`` gets a leading ``_``.
    A name that ends up empty becomes ``image``, and names are cut to 200
    characters. The image name itself stays unchanged inside the file.
    """
    name = _UNSAFE_CHARACTERS.sub("_", image_name).strip().rstrip(". ")
    if not name:
        return "image"
    if name.split(".")[0].upper() in _WINDOWS_DEVICE_NAMES:
        name = "_" + name
    return name[:_MAX_NAME_CHARS]


def export_project_geojson(
    project_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    image_names: Sequence[str] | None = None,
    compress: bool = False,
    object_types: Iterable[str] | None = None,
    image_root_remap: Mapping[str, str] | None = None,
    on_image: Callable[[ExportedImage], None] | None = None,
) -> list[ExportedImage]:
    """Write one QuPath GeoJSON file per image of a project.

    Parameters
    ----------
    project_path
        Project folder or its ``project.qpproj``.
    output_dir
        Folder for the files; created if missing.
    image_names
        Images to export by QuPath image name; None for all.
    compress
        Write gzip files (``.geojson.gz``). QuPath's import does not open
        them, so they must be decompressed first.
    object_types
        Object types to write (see :data:`EXPORT_OBJECT_TYPES`); None for all.
    image_root_remap
        Passed to :class:`~nuclass_qupath.qupath.project_files.QuPathProjectFiles`;
        only the image paths shown in logs depend on it.
    on_image
        Called with each :class:`ExportedImage` as soon as it is done. A
        caller that passes it reports failures, so they are then logged at
        DEBUG level only.

    Returns
    -------
    list of ExportedImage
        One per image, in project order. An image whose data file cannot be
        read has ``error`` set and no file; the other images are still written.

    Raises
    ------
    ProjectError
        If the project cannot be read or an object type is unknown.
    UnknownImageError
        If an image name is not in the project; the message lists the names.
    """
    from nuclass_qupath.qupath.project_files import QuPathProjectFiles

    types = _check_object_types(object_types)
    project = QuPathProjectFiles(project_path, image_root_remap=dict(image_root_remap or {}))
    entries = _select_entries(project, image_names)
    class_colors = project.path_classes()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    suffix = ".geojson.gz" if compress else ".geojson"

    used_names: set[str] = set()
    exported = []
    for entry in entries:
        stem = safe_file_name(entry.image_name)
        if stem.lower() in used_names:
            # Two images with the same safe name: the entry id makes the file names unique.
            stem = f"{stem} ({entry.entry_id})"
        used_names.add(stem.lower())
        path = output_dir / (stem + suffix)
        started = time.perf_counter()
        try:
            counts = export_image_geojson(entry, path, class_colors=class_colors, object_types=types, compress=compress)
            result = ExportedImage(entry.image_name, entry.entry_id, path, counts)
        except ProjectError as exc:
            level = logging.DEBUG if on_image is not None else logging.WARNING
            logger.log(level, "%s: export failed: %s", entry.image_name, exc)
            result = ExportedImage(entry.image_name, entry.entry_id, None, error=str(exc))
        result.seconds = time.perf_counter() - started
        exported.append(result)
        if on_image is not None:
            on_image(result)
    return exported


def export_image_geojson(
    entry,
    path: str | os.PathLike,
    *,
    class_colors: Mapping[str, tuple[int, int, int]] | None = None,
    object_types: Iterable[str] = EXPORT_OBJECT_TYPES,
    compress: bool = False,
) -> dict[str, int]:
    """Write the objects of one project image to a GeoJSON FeatureCollection file, atomically.

    ``entry`` is a :class:`~nuclass_qupath.qupath.project_files.ProjectImageEntry`.
    An image without ``data.qpdata`` (never saved in QuPath) has no objects
    and gets an empty FeatureCollection. Coordinates are QuPath level-0 pixels.

    Returns
    -------
    dict
        Number of objects written per object type.

    Raises
    ------
    QpdataError
        If the data file is truncated or not understood; no file is written then.
    """
    from nuclass_qupath.cells.geojson import GeoJSONWriter

    wanted = set(object_types)
    counts: Counter = Counter()
    with GeoJSONWriter(path, compress=compress) as writer:
        if entry.has_data:
            for obj in entry.read_image_data().iter_objects(order="hierarchy"):
                if obj.kind not in wanted or obj.geometry is None:
                    continue
                writer.write(obj.to_geojson_feature(class_colors=class_colors))
                counts[obj.kind] += 1
        else:
            logger.warning("%s: no %s, so no objects; wrote an empty FeatureCollection", entry.image_name, entry.qpdata_path)
    logger.info(
        "%s: wrote %d objects (%s) to %s",
        entry.image_name, sum(counts.values()), ", ".join(f"{k} {v}" for k, v in counts.items()) or "none", path,
    )
    if writer.dropped_measurements:
        logger.info("%s: left out %d NaN or infinite measurement values", entry.image_name, writer.dropped_measurements)
    return dict(counts)


def _check_object_types(object_types: Iterable[str] | None) -> tuple[str, ...]:
    if object_types is None:
        return EXPORT_OBJECT_TYPES
    types = tuple(object_types)
    unknown = [t for t in types if t not in EXPORT_OBJECT_TYPES]
    if unknown:
        raise ProjectError(f"unknown object types {unknown}; choose from {', '.join(EXPORT_OBJECT_TYPES)}")
    return types


def _select_entries(project, image_names: Sequence[str] | None) -> list:
    if image_names is None:
        return list(project.images)
    available = [entry.image_name for entry in project.images]
    unknown = [name for name in image_names if name not in available]
    if unknown:
        raise UnknownImageError(
            f"no image named {', '.join(repr(n) for n in unknown)} in {project.project_file}; "
            f"images: {', '.join(repr(n) for n in available) or 'none'}"
        )
    wanted = set(image_names)
    return [entry for entry in project.images if entry.image_name in wanted]

"""QuPath projects through paquo: list images, read cells, write classes and measurements back.

This is the only module that imports paquo. Importing ``paquo.projects``
starts a Java VM with the jars of a QuPath installation (found through
``PAQUO_QUPATH_DIR``), so paquo is imported inside :func:`open_project`, and
importing this module needs neither QuPath nor Java.

Objects are read in bulk through QuPath's own GeoJSON serialiser, so a cell
from a project and a cell from a GeoJSON export become the same
:class:`~nuclass_qupath.cells.table.CellTable` row (see
:func:`~nuclass_qupath.qupath.results.features_to_cell_table`). Results are
written with the merge rules of :mod:`nuclass_qupath.qupath.results`.

QuPath writes no lock file into a project, so nothing stops QuPath and this
module from writing the same image. Before saving an image this module
checks that its ``data.qpdata`` is unchanged since it was read, and raises
:class:`~nuclass_qupath.errors.ProjectError` otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePath
from typing import Any

from nuclass_qupath import __version__
from nuclass_qupath.cells.table import CellTable
from nuclass_qupath.errors import ProjectError
from nuclass_qupath.qupath.results import (
    CELL_OBJECT_TYPES,
    METADATA_MODEL_KEY,
    METADATA_VERSION_KEY,
    ObjectResult,
    annotation_region,
    class_colors,
    classification_name,
    features_to_cell_table,
    is_nuclass_tile,
    log_skipped,
    merge_measurements,
)

logger = logging.getLogger(__name__)

# Object UUIDs, which results are matched by, exist since QuPath 0.4.0.
MIN_QUPATH_VERSION = "0.4.0"
BACKUP_MARK = ".nuclass-backup-"
# Objects serialised to GeoJSON per call into Java; bounds the size of one JSON string.
_GEOJSON_CHUNK = 20000
_MICRON_UNITS = {"µm", "μm", "um", "micron", "microns"}


@dataclass
class ProjectImage:
    """One image entry of a QuPath project.

    Attributes
    ----------
    entry_id
        QuPath's entry id, the name of the folder ``data/<entry_id>``.
    name
        Image name as QuPath shows it.
    uri
        Image URI after relocation, or None when QuPath stores several URIs.
    path
        Local path of the image file, or None for a non-file URI.
    exists
        Whether ``path`` is an existing file.
    width_px, height_px
        Level-0 size in pixels from the project, or None when not stored.
    mpp
        Pixel size in µm per pixel, or None when QuPath has no µm calibration.
    data_path
        The image's ``data.qpdata``.
    """

    entry_id: str
    name: str
    uri: str | None
    path: Path | None
    exists: bool
    width_px: int | None
    height_px: int | None
    mpp: float | None
    data_path: Path
    entry: Any = field(repr=False, compare=False, default=None)


@dataclass
class WriteSummary:
    """Counts of the changes :meth:`QuPathProjectSession.write_results` made in one image."""

    image_name: str
    classified: int
    results_without_object: int
    tiles_removed: int
    tiles_added: int
    backup_path: Path | None
    class_color_conflicts: list[str]


def open_project(
    path: str | os.PathLike,
    *,
    mode: str = "r",
    image_root_remap: Mapping[str | os.PathLike, str | os.PathLike] | str | os.PathLike | None = None,
) -> "QuPathProjectSession":
    """Open a QuPath project with paquo.

    Images whose file is missing are relocated like QuPath does for a moved
    project (the image path relative to the folder the project was saved in,
    applied to the current folder), then with ``image_root_remap``. Images
    still missing are listed with ``exists=False`` and logged once each.

    Parameters
    ----------
    path
        Project folder or its ``project.qpproj``.
    mode
        ``"r"`` to read only, ``"r+"`` to write results back.
    image_root_remap
        Either a mapping ``{old folder: new folder}`` applied to image paths
        that start with the old folder, or one folder in which missing images
        are looked up by file name. In ``"r+"`` mode the relocated paths are
        saved into the project, as QuPath does.

    Raises
    ------
    ProjectError
        If the project does not exist, QuPath cannot be started, or the
        installed QuPath is older than 0.4 or than the QuPath that saved the project.
    """
    if mode not in ("r", "r+"):
        raise ProjectError(f"mode must be 'r' or 'r+', got {mode!r}")
    project_file = _project_file(path)
    saved_version = _saved_qupath_version(project_file)
    paquo_projects, qupath_version = _start_paquo()
    _check_versions(project_file, saved_version, qupath_version)

    import jpype

    try:
        project = paquo_projects.QuPathProject(project_file, mode=mode)
    except (OSError, ValueError, jpype.JException) as exc:
        raise ProjectError(f"QuPath could not load the project {project_file}: {exc}") from exc
    session = QuPathProjectSession(project, project_file, mode, str(qupath_version))
    session.relocate_images(image_root_remap)
    return session


class QuPathProjectSession:
    """An open QuPath project. Use :func:`open_project` to create one; close it or use it in a ``with`` block."""

    def __init__(self, project: Any, project_file: Path, mode: str, qupath_version: str) -> None:
        self._project = project
        self.project_file = project_file
        self.mode = mode
        self.qupath_version = qupath_version
        self._detections: dict[str, tuple[list[Any], list[dict]]] = {}
        self._fingerprints: dict[str, tuple[int, int]] = {}
        self._backups: dict[str, Path | None] = {}
        self.images: list[ProjectImage] = self._list_images()

    def __enter__(self) -> "QuPathProjectSession":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop cached objects. Results are saved by :meth:`write_results`, never here."""
        self._detections.clear()

    @property
    def project_dir(self) -> Path:
        """The folder containing ``project.qpproj``."""
        return self.project_file.parent

    def image(self, key: str) -> ProjectImage:
        """Return the image with entry id or image name ``key``."""
        for image in self.images:
            if key in (image.entry_id, image.name):
                return image
        names = ", ".join(repr(image.name) for image in self.images) or "none"
        raise ProjectError(f"no image {key!r} in {self.project_file}; images: {names}")

    def missing_images(self) -> list[ProjectImage]:
        """Return the images whose file was not found, after relocation."""
        return [image for image in self.images if not image.exists]

    def relocate_images(
        self, image_root_remap: Mapping[str | os.PathLike, str | os.PathLike] | str | os.PathLike | None
    ) -> int:
        """Point missing images at their new location; return the number relocated (see :func:`open_project`)."""
        import jpype

        missing_before = len(self.missing_images())
        if not missing_before:
            return 0
        try:
            self._project.update_image_paths(try_relative=True)
        except jpype.JException as exc:
            logger.warning("relocating images relative to the project folder failed: %s", exc)
        self.images = self._list_images()
        if image_root_remap is not None:
            from paquo.images import ImageProvider

            uri2uri = {}
            for image in self.missing_images():
                if image.path is None or image.uri is None:
                    continue
                new_path = remap_image_path(image.path, image_root_remap)
                if new_path is not None:
                    uri2uri[image.uri] = ImageProvider.uri_from_path(new_path.absolute())
            if uri2uri:
                self._project.update_image_paths(uri2uri=uri2uri)
                self.images = self._list_images()
        relocated = missing_before - len(self.missing_images())
        for image in self.missing_images():
            logger.warning("%s: image file not found: %s", image.name, image.path or image.uri)
        if relocated:
            logger.info("relocated %d image path(s) in %s", relocated, self.project_file)
        return relocated

    def read_cells(
        self,
        image: ProjectImage,
        *,
        annotation_class: str | None = None,
        object_types: Sequence[str] = CELL_OBJECT_TYPES,
    ) -> CellTable:
        """Read the cells and detections of an image as a :class:`CellTable` (QuPath level-0 pixels).

        Ids are the objects' QuPath UUIDs and ``features`` hold each object
        as QuPath GeoJSON. Cells are represented by their nucleus outline.
        With ``annotation_class``, only objects whose centroid lies inside an
        annotation of that class are read. Objects that cannot be classified
        (no ROI, lines, several points) are skipped with one warning per reason.

        Raises
        ------
        ProjectError
            If ``annotation_class`` is given but the image has no area annotation of that class.
        """
        _, features = self._load_detections(image)
        region = None
        if annotation_class is not None:
            annotations = self._annotation_features(image)
            region = annotation_region(annotations, annotation_class)
            if region is None:
                present = sorted({classification_name(a.get("properties") or {}) or "Unclassified" for a in annotations})
                raise ProjectError(
                    f"image {image.name!r} has no area annotation of class {annotation_class!r}; "
                    f"annotation classes present: {present or 'none'}"
                )
        table, notes = features_to_cell_table(features, object_types=object_types, region=region)
        log_skipped(notes, source=image.name)
        where = f"inside {annotation_class!r} annotations" if annotation_class else "in the whole image"
        logger.info("%s: read %d cells %s", image.name, len(table), where)
        return table

    def object_features(self, image: ProjectImage) -> list[dict]:
        """Return the annotations, then the detections (cells and tiles included), of an image as QuPath GeoJSON."""
        _, detections = self._load_detections(image)
        return self._annotation_features(image) + list(detections)

    def is_done(self, image: ProjectImage, model_id: str) -> bool:
        """Return whether results of the model ``model_id`` were already written to ``image`` (for ``--resume``)."""
        return image.entry.metadata.get(METADATA_MODEL_KEY) == model_id

    def write_results(
        self,
        image: ProjectImage,
        results: Mapping[str, ObjectResult],
        *,
        classes: Iterable[Any],
        model_id: str,
        version: str = __version__,
        tiles: Sequence[Mapping[str, Any]] | None = None,
    ) -> WriteSummary:
        """Write classes, ``NuClass: `` measurements and heatmap tiles into an image and save it.

        Objects are matched to ``results`` by QuPath UUID. Measurements are
        merged with :func:`~nuclass_qupath.qupath.results.merge_measurements`;
        when ``tiles`` is given, earlier heatmap tiles of this package are
        replaced. The model's classes are added to the project with the
        model's colours; a class the project already has keeps the project's
        colour, with a warning. The first write to an image in a session
        copies its ``data.qpdata`` to ``data.qpdata.nuclass-backup-<time>``.
        The image metadata records ``NuClass model`` and ``NuClass version``.

        Raises
        ------
        ProjectError
            If the project is read-only, the image file is missing (QuPath
            saves image data only for images it can find), the data file
            changed since it was read, or a result names a class not in ``classes``.
        """
        if self.mode != "r+":
            raise ProjectError(f"{self.project_file} is open read-only; open it with mode='r+' to write results")
        if not image.exists:
            raise ProjectError(
                f"image file of {image.name!r} not found ({image.path or image.uri}); relocate it with "
                "image_root_remap, because QuPath does not save data for images it cannot find"
            )
        from paquo.pathobjects import QuPathPathDetectionObject, QuPathPathTileObject

        colors = class_colors(classes)
        unknown = sorted({r.class_name for r in results.values() if r.class_name and r.class_name not in colors})
        if unknown:
            raise ProjectError(f"results name classes {unknown} that are not among the model classes")
        objects, features = self._load_detections(image)
        by_id = {feature["id"]: obj for obj, feature in zip(objects, features) if "id" in feature}
        self._check_unchanged(image)
        backup = self._backup(image)
        path_classes, conflicts = self._register_classes(colors)

        classified = 0
        tiles_removed = tiles_added = 0
        hierarchy = image.entry.hierarchy
        with hierarchy.no_autoflush():
            for object_id, result in results.items():
                java_object = by_id.get(object_id)
                if java_object is None:
                    continue
                # A wrapper without update callback: paquo's proxies re-insert the object on every change.
                wrapper = QuPathPathDetectionObject(java_object)
                existing = dict(wrapper.measurements)
                merged = merge_measurements(existing, result.measurements)
                for name in existing:
                    if name not in merged:
                        del wrapper.measurements[name]
                for name, value in result.measurements.items():
                    wrapper.measurements[name] = float(value)
                if result.class_name is not None:
                    wrapper.update_path_class(path_classes[result.class_name])
                classified += 1
            if tiles is not None:
                detections = hierarchy.detections
                old_tiles = [QuPathPathTileObject(obj) for obj, f in zip(objects, features) if is_nuclass_tile(f)]
                if old_tiles:
                    detections -= old_tiles
                new_tiles = [_tile_object(tile) for tile in tiles]
                if new_tiles:
                    detections |= new_tiles
                tiles_removed, tiles_added = len(old_tiles), len(new_tiles)

        image.entry.metadata[METADATA_MODEL_KEY] = str(model_id)
        image.entry.metadata[METADATA_VERSION_KEY] = str(version)
        self._save(image)
        summary = WriteSummary(
            image_name=image.name,
            classified=classified,
            results_without_object=len(results) - classified,
            tiles_removed=tiles_removed,
            tiles_added=tiles_added,
            backup_path=backup,
            class_color_conflicts=conflicts,
        )
        if summary.results_without_object:
            logger.warning(
                "%s: %d result(s) match no object of the image and were not written",
                image.name, summary.results_without_object,
            )
        logger.info(
            "%s: wrote %d classified objects, %d heatmap tiles (%d replaced)",
            image.name, classified, tiles_added, tiles_removed,
        )
        return summary

    # Internals.

    def _list_images(self) -> list[ProjectImage]:
        metadata = _server_metadata_by_entry(self.project_file)
        return [_image_info(entry, metadata.get(str(entry.entry_id))) for entry in self._project.images]

    def _load_detections(self, image: ProjectImage) -> tuple[list[Any], list[dict]]:
        """Return the image's detections (cells and tiles included) as Java objects and as GeoJSON, cached."""
        if image.entry_id not in self._detections:
            from paquo.java import PathDetectionObject

            if image.data_path.is_file():
                stat = image.data_path.stat()
                self._fingerprints.setdefault(image.entry_id, (stat.st_mtime_ns, stat.st_size))
            java_hierarchy = image.entry.hierarchy.java_object
            objects = list(java_hierarchy.getObjects(None, PathDetectionObject))
            self._detections[image.entry_id] = (objects, _to_geojson(objects))
        return self._detections[image.entry_id]

    def _annotation_features(self, image: ProjectImage) -> list[dict]:
        java_hierarchy = image.entry.hierarchy.java_object
        return _to_geojson(list(java_hierarchy.getAnnotationObjects()))

    def _register_classes(self, colors: Mapping[str, tuple[int, int, int]]) -> tuple[dict[str, Any], list[str]]:
        """Return ``name -> QuPathPathClass`` for the model classes, adding missing ones to the project."""
        from paquo.classes import QuPathPathClass

        existing = list(self._project.path_classes)
        by_name = {pc.id: pc for pc in existing}
        path_classes: dict[str, Any] = {}
        added = []
        conflicts = []
        for name, rgb in colors.items():
            path_class = by_name.get(name)
            if path_class is not None:
                project_rgb = tuple(path_class.color.to_rgb()) if path_class.color is not None else None
                if project_rgb != tuple(rgb):
                    conflicts.append(f"{name!r} (project {project_rgb}, model {tuple(rgb)})")
            else:
                try:
                    path_class = QuPathPathClass(name, color=rgb)
                except ValueError as exc:
                    raise ProjectError(f"model class name {name!r} is not a valid QuPath class name: {exc}") from exc
                # The Java VM may already hold a class of this name with QuPath's default colour.
                path_class.color = rgb
                added.append(path_class)
            path_classes[name] = path_class
        if added:
            self._project.path_classes = existing + added
        if conflicts:
            logger.warning(
                "project classes keep their own colour where it differs from the model's: %s", ", ".join(conflicts)
            )
        return path_classes, conflicts

    def _check_unchanged(self, image: ProjectImage) -> None:
        before = self._fingerprints.get(image.entry_id)
        if before is None or not image.data_path.is_file():
            return
        stat = image.data_path.stat()
        if (stat.st_mtime_ns, stat.st_size) != before:
            raise ProjectError(
                f"{image.data_path} changed since it was read, probably saved by QuPath; "
                "close the image in QuPath and run again"
            )

    def _backup(self, image: ProjectImage) -> Path | None:
        if image.entry_id in self._backups:
            return self._backups[image.entry_id]
        source = image.data_path
        target = None
        if source.is_file():
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            target = source.with_name(f"{source.name}{BACKUP_MARK}{stamp}")
            counter = 1
            while target.exists():
                target = source.with_name(f"{source.name}{BACKUP_MARK}{stamp}-{counter}")
                counter += 1
            shutil.copy2(source, target)
            logger.info("%s: backed up %s to %s", image.name, source.name, target.name)
        self._backups[image.entry_id] = target
        return target

    def _save(self, image: ProjectImage) -> None:
        import jpype

        # NOTE: paquo saves only image data that QuPath marks as changed. The flush at the end of
        # no_autoflush fires a hierarchy event that should mark it, and this makes sure.
        image.entry._image_data.setChanged(True)
        try:
            image.entry.save()
            self._project.save(images=False)
        except (OSError, jpype.JException) as exc:
            raise ProjectError(f"saving {image.name!r} in {self.project_file} failed: {exc}") from exc
        # The saved file is now the reference for the next write, and tiles changed.
        stat = image.data_path.stat()
        self._fingerprints[image.entry_id] = (stat.st_mtime_ns, stat.st_size)
        self._detections.pop(image.entry_id, None)


def remap_image_path(
    path: PurePath, image_root_remap: Mapping[str | os.PathLike, str | os.PathLike] | str | os.PathLike
) -> Path | None:
    """Return the new location of a missing image file, or None if the remap finds no existing file.

    With a mapping ``{old folder: new folder}`` the longest old folder that
    contains ``path`` is replaced. With a single folder, the file is looked up
    there by name.
    """
    if isinstance(image_root_remap, Mapping):
        prefixes = sorted(image_root_remap.items(), key=lambda item: len(str(item[0])), reverse=True)
        for old, new in prefixes:
            try:
                relative = PurePath(path).relative_to(PurePath(old))
            except ValueError:
                continue
            candidate = Path(new) / relative
            return candidate if candidate.is_file() else None
        return None
    candidate = Path(image_root_remap) / PurePath(path).name
    return candidate if candidate.is_file() else None


def _project_file(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    project_file = path if path.suffix == ".qpproj" else path / "project.qpproj"
    if not project_file.is_file():
        raise ProjectError(
            f"QuPath project not found: {project_file} does not exist; pass a project folder or its project.qpproj"
        )
    return project_file.absolute()


def _read_project_json(project_file: Path) -> dict:
    try:
        return json.loads(project_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProjectError(f"{project_file} is not a readable QuPath project file: {exc}") from exc


def _saved_qupath_version(project_file: Path) -> str | None:
    version = _read_project_json(project_file).get("version")
    return str(version) if version else None


def _start_paquo() -> tuple[Any, Any]:
    """Import paquo, which starts the Java VM; return ``paquo.projects`` and the QuPath version."""
    try:
        import paquo.java
        import paquo.projects
    except (ValueError, OSError, RuntimeError, ImportError) as exc:
        raise ProjectError(
            f"QuPath could not be started through paquo ({exc}); install QuPath 0.5 or 0.6 and set "
            "PAQUO_QUPATH_DIR to its installation folder"
        ) from exc
    return paquo.projects, paquo.java.qupath_version


def _check_versions(project_file: Path, saved: str | None, installed: Any) -> None:
    from paquo._utils import QuPathVersion

    if installed is None:
        raise ProjectError(
            "paquo could not detect the QuPath version; set PAQUO_QUPATH_DIR to a QuPath 0.5 or 0.6 installation"
        )
    if installed < QuPathVersion(MIN_QUPATH_VERSION):
        raise ProjectError(
            f"QuPath {installed} has no object ids; install QuPath {MIN_QUPATH_VERSION} or newer "
            "(0.5 or 0.6) and set PAQUO_QUPATH_DIR to it"
        )
    if saved is None:
        logger.warning("%s records no QuPath version; reading it with QuPath %s", project_file, installed)
        return
    try:
        saved_version = QuPathVersion(saved)
    except ValueError as exc:
        raise ProjectError(f"{project_file} records an unknown QuPath version {saved!r}") from exc
    if saved_version > installed:
        raise ProjectError(
            f"{project_file} was saved by QuPath {saved}, but paquo uses QuPath {installed}, which may not "
            f"read its data files; install QuPath {saved} or newer and set PAQUO_QUPATH_DIR to it"
        )


def _server_metadata_by_entry(project_file: Path) -> dict[str, dict]:
    """Return the image server metadata stored in ``project.qpproj``, by entry id."""
    metadata = {}
    for entry in _read_project_json(project_file).get("images", []):
        builder = entry.get("serverBuilder") or {}
        if "metadata" in builder:
            metadata[str(entry.get("entryID"))] = builder["metadata"]
    return metadata


def _image_info(entry: Any, server_metadata: dict | None) -> ProjectImage:
    from paquo.images import ImageProvider

    try:
        uri = entry.uri
    except (RuntimeError, NotImplementedError):
        uri = None
    path = None
    if uri is not None and uri.startswith("file:"):
        try:
            path = Path(ImageProvider.path_from_uri(uri))
        except (ValueError, NotImplementedError):
            path = None
    entry_path = Path(entry.entry_path)
    if server_metadata is None:
        server_metadata = _server_json_metadata(entry_path)
    return ProjectImage(
        entry_id=str(entry.entry_id),
        name=entry.image_name,
        uri=uri,
        path=path,
        exists=path is not None and path.is_file(),
        width_px=server_metadata.get("width"),
        height_px=server_metadata.get("height"),
        mpp=_mpp_from_metadata(server_metadata),
        data_path=entry_path / "data.qpdata",
        entry=entry,
    )


def _server_json_metadata(entry_path: Path) -> dict:
    try:
        return json.loads((entry_path / "server.json").read_text(encoding="utf-8")).get("metadata", {})
    except (OSError, json.JSONDecodeError):
        return {}


def _mpp_from_metadata(metadata: Mapping[str, Any]) -> float | None:
    """Return the mean pixel size in µm, or None when QuPath's calibration is not in µm."""
    calibration = metadata.get("pixelCalibration") or {}
    sizes = []
    for key in ("pixelWidth", "pixelHeight"):
        value = calibration.get(key) or {}
        if value.get("unit") not in _MICRON_UNITS or not value.get("value"):
            return None
        sizes.append(float(value["value"]))
    return sum(sizes) / len(sizes)


def _to_geojson(java_objects: list[Any]) -> list[dict]:
    """Serialise QuPath objects with QuPath's own GeoJSON type adapter, in chunks."""
    from paquo.java import ArrayList, GsonTools

    gson = GsonTools.getInstance()
    features: list[dict] = []
    for start in range(0, len(java_objects), _GEOJSON_CHUNK):
        chunk = ArrayList()
        for java_object in java_objects[start : start + _GEOJSON_CHUNK]:
            chunk.add(java_object)
        features.extend(json.loads(str(gson.toJson(chunk))))
    return features


def _tile_object(tile: Mapping[str, Any]) -> Any:
    """Build a paquo tile object from a heatmap tile feature."""
    from paquo.pathobjects import QuPathPathTileObject
    from shapely.geometry import shape

    props = tile.get("properties") or {}
    measurements = {name: float(value) for name, value in (props.get("measurements") or {}).items()}
    tile_object = QuPathPathTileObject.from_shapely(shape(tile["geometry"]), None, measurements)
    if props.get("name"):
        tile_object.name = props["name"]
    return tile_object

"""Classify the cells of every image of a QuPath project (``nuclass-qupath project``).

Images are classified one at a time with one model, loaded once. Each image
ends with a :class:`ImageRunResult`: classified, skipped (``resume``) or
failed. A failed image (missing file, no cells, no pixel size, unreadable
data) is reported and the run goes on with the next one.

Two backends return the results to QuPath:

* ``paquo`` writes classes, ``NuClass: `` measurements and heatmap tiles into
  the project through :mod:`nuclass_qupath.qupath.paquo_project`, which backs
  up each ``data.qpdata`` before the first write and records the model id in
  the image metadata. It needs a QuPath installation.
* ``files`` reads the project with the Java-free reader and writes
  ``<output dir>/<image name>.nuclass.geojson`` (the classified objects with
  QuPath's ids and measurements, the results and heatmap tiles) and
  ``<image name>.nuclass.run.json`` beside it, which
  ``groovy/import_batch_results.groovy`` applies inside QuPath.

``auto`` uses paquo and falls back to files when paquo finds no QuPath.

The pixel size of an image comes from the slide's metadata, else from the
project's calibration when its unit is µm, else from ``mpp`` of the request.
Coordinates are QuPath level-0 pixels throughout.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import shapely

from nuclass_qupath import __version__
from nuclass_qupath._atomic import atomic_path
from nuclass_qupath.cells.table import CellTable
from nuclass_qupath.errors import CellsError, MissingMppError, NuclassError, ProjectError
from nuclass_qupath.qupath.results import (
    ObjectResult,
    annotation_region,
    class_colors,
    classification_name,
    default_results_dir,
    features_to_cell_table,
    log_skipped,
    results_file_name,
    run_metadata_path,
)

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "paquo", "files")
IMPORT_SCRIPT = "groovy/import_batch_results.groovy"
ProgressFactory = Callable[[int, str], Callable[[int], None]]


class UnknownImageError(ProjectError, ValueError):
    """An image name requested for the run is not in the project."""


@dataclass
class ProjectRunRequest:
    """Request for a project run: the images to classify and the options.

    Attributes
    ----------
    project_path
        Project folder or its ``project.qpproj``.
    output_dir
        Folder for the results files (files backend) and run metadata;
        default ``<project folder>/nuclass_results``.
    image_names
        Images to classify, by QuPath image name; None for all.
    annotation_class
        Classify only cells whose centroid lies inside annotations of this class.
    detect
        Detect nuclei with the built-in detector in images that have no cells or detections.
    heatmap_tile_um
        Side of the heatmap tiles in µm; None writes no tiles and keeps earlier ones.
    model_path
        Model file; None for the bundled model.
    resume
        Skip images that already have results of the same model id.
    image_root_remap
        Old image folder prefix to new prefix, for images moved after the project was saved.
    mpp
        Pixel size in µm/px for images whose slide and project have none.
    backend
        ``"auto"``, ``"paquo"`` or ``"files"``.
    """

    project_path: Path
    output_dir: Path | None = None
    image_names: Sequence[str] | None = None
    annotation_class: str | None = None
    detect: bool = False
    heatmap_tile_um: float | None = None
    model_path: Path | None = None
    resume: bool = False
    image_root_remap: Mapping[str, str] = field(default_factory=dict)
    mpp: float | None = None
    backend: str = "auto"
    mode: str = "fast"
    arguments: dict[str, Any] = field(default_factory=dict)  # recorded in the run metadata

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir is not None else default_results_dir(self.project_path)


@dataclass
class ImageRunResult:
    """The outcome of one image: ``status`` is ``"classified"``, ``"skipped"`` or ``"failed"``."""

    image_name: str
    status: str
    n_cells: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    message: str = ""
    outputs: list[Path] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.status == "failed"


@dataclass
class ProjectRunReport:
    """The outcome of a project run: the backend used and one result per image."""

    backend: str
    output_dir: Path
    results: list[ImageRunResult]
    fallback_reason: str | None = None

    @property
    def n_failed(self) -> int:
        return sum(result.failed for result in self.results)


@dataclass
class BatchImage:
    """One project image, with the fields the batch run uses from either backend."""

    name: str
    image_path: Path | None
    exists: bool | None
    project_mpp: float | None
    handle: Any = field(repr=False, default=None)


class ProjectBatch:
    """A project opened for a batch run; use :meth:`run`, then :meth:`close` (or a ``with`` block).

    Opening selects the backend and the images, so that a wrong image name
    or project path is reported before any model is loaded. When ``auto``
    falls back to the files backend, the reason is in :attr:`fallback_reason`
    and is logged as a warning unless ``log_fallback`` is False (for callers
    that show it themselves).

    Raises
    ------
    ProjectError
        If the project cannot be read, QuPath cannot be started for the
        paquo backend, or it has no images.
    UnknownImageError
        If a requested image name is not in the project; the message lists the names.
    """

    def __init__(self, request: ProjectRunRequest, *, log_fallback: bool = True) -> None:
        if request.backend not in BACKENDS:
            raise ProjectError(f"backend must be one of {BACKENDS}, got {request.backend!r}")
        self.request = request
        self._log_fallback = log_fallback
        # Level for failed and skipped images; None means WARNING and INFO, set by run().
        self._outcome_level: int | None = None
        self.output_dir = request.resolved_output_dir()
        self.fallback_reason: str | None = None
        self._backend = self._open_backend()
        self.images = self._select_images()

    @property
    def backend_name(self) -> str:
        return self._backend.name

    def __enter__(self) -> "ProjectBatch":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._backend.close()

    def run(
        self,
        *,
        progress_factory: ProgressFactory | None = None,
        on_result: Callable[[int, int, ImageRunResult], None] | None = None,
    ) -> ProjectRunReport:
        """Classify the selected images one at a time and return the report.

        ``progress_factory(total, description)`` returns a callback that takes
        a number of classified cells; ``on_result(index, total, result)`` is
        called after each image, with ``index`` counted from 1. A caller that
        passes ``on_result`` reports the outcomes, so failed and skipped
        images are then logged at DEBUG level only.

        Raises
        ------
        ModelError
            If the model cannot be loaded; no image is touched then.
        """
        from nuclass_qupath.engine import EngineOptions, SlideClassifier
        from nuclass_qupath.model import load_model

        model = load_model(self.request.model_path)
        classifier = SlideClassifier(model, EngineOptions(mode=self.request.mode))
        results = []
        written_names: set[str] = set()
        self._outcome_level = logging.DEBUG if on_result is not None else None
        for index, image in enumerate(self.images, start=1):
            started = time.perf_counter()
            try:
                result = self._run_image(image, classifier, written_names, progress_factory)
            except (NuclassError, OSError) as exc:
                logger.log(self._outcome_level or logging.WARNING, "%s: failed: %s", image.name, exc)
                logger.debug("%s: failure details", image.name, exc_info=True)
                result = ImageRunResult(image.name, "failed", message=str(exc))
            result.seconds = time.perf_counter() - started
            results.append(result)
            if on_result is not None:
                on_result(index, len(self.images), result)
        return ProjectRunReport(self.backend_name, self.output_dir, results, self.fallback_reason)

    # One image ----------------------------------------------------------------

    def _run_image(
        self, image: BatchImage, classifier: Any, written_names: set[str], progress_factory: ProgressFactory | None
    ) -> ImageRunResult:
        request = self.request
        config = classifier.config
        backend = self._backend
        if request.resume and backend.is_done(image, config.model_id):
            logger.log(
                self._outcome_level or logging.INFO, "%s: skipped, results of model %s exist", image.name, config.model_id
            )
            return ImageRunResult(image.name, "skipped", message=f"already classified by model {config.model_id}")
        if backend.name == "files":
            # The import script finds results by image name, so two images may not share one file.
            file_name = results_file_name(image.name)
            if file_name in written_names:
                raise ProjectError(
                    f"another image of this run writes {file_name}; rename one of the images named "
                    f"{image.name!r} in QuPath, or select one with --images"
                )
            written_names.add(file_name)
        _check_image_file(image, request.image_root_remap)

        # Cells from the project, restricted to the annotations if requested
        annotations, detections = backend.read_features(image)
        region = None
        if request.annotation_class is not None:
            region = _annotation_region(image, annotations, request.annotation_class)
        cells, notes = features_to_cell_table(detections, region=region)
        log_skipped(notes, source=image.name)
        if len(cells) == 0 and not request.detect:
            where = f" inside annotations of class {request.annotation_class!r}" if region is not None else ""
            raise CellsError(
                f"image {image.name!r} has no cells or detections{where}; run cell detection in QuPath "
                "first, or pass --detect to detect nuclei with the built-in detector"
            )

        from nuclass_qupath.engine.output import cell_measurements, class_counts

        slide, mpp_source = _open_slide(image, request.mpp)
        with slide:
            cell_source = "project"
            if len(cells) == 0:
                features = _detected_features(slide, region)
                backend.add_detections(image, features)
                cells, _ = features_to_cell_table(features, region=region)
                cell_source = "detector"
                if len(cells) == 0:
                    raise CellsError(f"the detector found no nuclei in image {image.name!r}; is the image blank?")
            logger.info("%s: classifying %d cells (%s)", image.name, len(cells), cell_source)
            progress = progress_factory(len(cells), image.name) if progress_factory else None
            predictions = classifier.classify(slide, cells, progress=progress)
            tiles = None
            if request.heatmap_tile_um:
                from nuclass_qupath.qupath.heatmap import heatmap_tiles

                tiles = heatmap_tiles(
                    cells.centroids_px, predictions.probs, predictions.class_names, predictions.confidence,
                    mpp=slide.mpp, tile_um=request.heatmap_tile_um,
                    image_width_px=slide.width, image_height_px=slide.height, region=region,
                )
            slide_info = {
                "path": str(slide.path),
                "width_px": slide.width,
                "height_px": slide.height,
                "mpp": slide.mpp,
                "mpp_source": mpp_source,
            }

        names = predictions.class_names
        predicted = predictions.predicted
        results = {
            cells.ids[i]: ObjectResult(names[int(predicted[i])], cell_measurements(predictions, i))
            for i in range(len(cells))
        }
        counts = class_counts(predictions)
        metadata = self._run_metadata(image, slide_info, config, cell_source, len(cells), counts, tiles)
        metadata["timings_s"] = {key: round(value, 3) for key, value in predictions.timings_s.items()}
        outputs = backend.write(image, cells, results, tiles, config=config, metadata=metadata)
        return ImageRunResult(image.name, "classified", n_cells=len(cells), class_counts=counts, outputs=outputs)

    def _run_metadata(
        self, image: BatchImage, slide_info: dict, config: Any, cell_source: str, n_cells: int,
        counts: dict[str, int], tiles: list[dict] | None,
    ) -> dict[str, Any]:
        request = self.request
        return {
            "tool": "nuclass-qupath",
            "version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv,
            "arguments": request.arguments,
            "python": platform.python_version(),
            "backend": self.backend_name,
            "project": str(Path(request.project_path).resolve()),
            "image": {"name": image.name, **slide_info},
            "model": {
                "model_id": config.model_id,
                "path": str(request.model_path) if request.model_path else "bundled",
                "classes": [c.model_dump() for c in config.classes],
                "mpp": config.mpp,
            },
            "cells": {"count": n_cells, "source": cell_source, "annotation_class": request.annotation_class},
            "heatmap": None if tiles is None else {"tile_um": request.heatmap_tile_um, "tiles": len(tiles)},
            "class_counts": counts,
        }

    # Backend and image selection ----------------------------------------------

    def _open_backend(self) -> Any:
        request = self.request
        remap = dict(request.image_root_remap)
        if request.backend == "files":
            return _FilesBackend(request.project_path, remap, self.output_dir)
        from nuclass_qupath.qupath.paquo_project import open_project

        try:
            session = open_project(request.project_path, mode="r+", image_root_remap=remap or None)
        except ProjectError as exc:
            if request.backend != "auto" or not qupath_not_found(exc):
                raise
            self.fallback_reason = (
                f"QuPath is not installed ({exc.__cause__}), so results are written to {self.output_dir} "
                f"next to the project; import them in QuPath with {IMPORT_SCRIPT} (Run for project)"
            )
            logger.log(logging.WARNING if self._log_fallback else logging.DEBUG, "%s", self.fallback_reason)
            return _FilesBackend(request.project_path, remap, self.output_dir)
        return _PaquoBackend(session, self.output_dir)

    def _select_images(self) -> list[BatchImage]:
        images = self._backend.images
        if not images:
            raise ProjectError(f"QuPath project {self.request.project_path} has no images; add images in QuPath first")
        if self.request.image_names is None:
            return list(images)
        available = [image.name for image in images]
        unknown = [name for name in self.request.image_names if name not in available]
        if unknown:
            raise UnknownImageError(
                f"no image named {', '.join(repr(n) for n in unknown)} in {self.request.project_path}; "
                f"images: {', '.join(repr(n) for n in available)}"
            )
        wanted = set(self.request.image_names)
        return [image for image in images if image.name in wanted]


def run_project(
    request: ProjectRunRequest,
    *,
    progress_factory: ProgressFactory | None = None,
    on_result: Callable[[int, int, ImageRunResult], None] | None = None,
) -> ProjectRunReport:
    """Classify the images of a QuPath project; see :class:`ProjectBatch` and :meth:`ProjectBatch.run`."""
    with ProjectBatch(request) as batch:
        return batch.run(progress_factory=progress_factory, on_result=on_result)


def qupath_not_found(exc: ProjectError) -> bool:
    """Return whether ``exc`` from :func:`~nuclass_qupath.qupath.paquo_project.open_project` means "no QuPath".

    True when paquo or JPype is not installed, or when paquo's search for a
    QuPath installation found none (paquo 0.9 raises ``ValueError("no valid
    qupath installation found")``) and ``PAQUO_QUPATH_DIR`` is unset. A
    ``PAQUO_QUPATH_DIR`` that points at no usable QuPath is a setup error
    that the user should fix, so it is not a reason to fall back.
    """
    cause = exc.__cause__
    if isinstance(cause, ImportError):
        return True
    if os.environ.get("PAQUO_QUPATH_DIR"):
        return False
    return isinstance(cause, ValueError) and "no valid qupath installation" in str(cause).lower()


def parse_image_root(value: str) -> tuple[str, str]:
    """Parse ``OLD=NEW`` into an image folder remap pair.

    Raises
    ------
    ValueError
        If the value has no ``=`` or an empty side.
    """
    old, sep, new = value.partition("=")
    if not sep or not old or not new:
        raise ValueError(f"expected OLD=NEW (old image folder = new image folder), got {value!r}")
    return old, new


# Steps of one image ------------------------------------------------------------


def _check_image_file(image: BatchImage, remap: Mapping[str, str]) -> None:
    if image.image_path is None:
        raise ProjectError(f"image {image.name!r} is not a local file; only images stored as files can be classified")
    if not image.exists:
        hint = "check --image-root OLD=NEW" if remap else "pass --image-root OLD=NEW if the images moved"
        raise ProjectError(f"image file not found: {image.image_path}; {hint}")


def _annotation_region(image: BatchImage, annotations: list[dict], class_name: str) -> Any:
    region = annotation_region(annotations, class_name)
    if region is None:
        present = sorted({classification_name(a.get("properties") or {}) or "Unclassified" for a in annotations})
        raise CellsError(
            f"image {image.name!r} has no area annotation of class {class_name!r}; "
            f"annotation classes present: {', '.join(present) or 'none'}"
        )
    return region


def _open_slide(image: BatchImage, fallback_mpp: float | None) -> tuple[Any, str]:
    """Open the image file with the pixel size of its metadata, else the project's, else ``fallback_mpp``."""
    from nuclass_qupath.slides import open_slide

    try:
        return open_slide(image.image_path), "slide metadata"
    except MissingMppError:
        pass
    if image.project_mpp is not None:
        return open_slide(image.image_path, mpp=image.project_mpp), "QuPath project"
    if fallback_mpp is not None:
        return open_slide(image.image_path, mpp=fallback_mpp), "--mpp"
    raise MissingMppError(
        f"image {image.name!r} has no pixel size: neither {image.image_path.name} nor the QuPath project "
        "gives one in µm; pass --mpp MICRONS_PER_PIXEL (e.g. 0.25 for a 40x scan, 0.5 for 20x), "
        "or set it in QuPath (Image tab, Pixel width and height)"
    )


def _detected_features(slide: Any, region: Any) -> list[dict]:
    """Detect nuclei in the region's bounding box (or the whole slide) and return them as detection features."""
    from nuclass_qupath.cells.detector import detect_nuclei
    from nuclass_qupath.cells.geojson import geometry_to_geojson

    region_px = None
    if region is not None:
        x0, y0, x1, y1 = region.bounds
        region_px = (x0, y0, x1 - x0, y1 - y0)
    detected = detect_nuclei(slide, region_px=region_px)
    features = []
    for object_id, geometry, (x, y) in zip(detected.ids, detected.geometries, detected.centroids_px):
        if geometry is None:
            geometry = shapely.Point(float(x), float(y))
        features.append(
            {
                "type": "Feature",
                "id": object_id,
                "geometry": geometry_to_geojson(geometry),
                "properties": {"objectType": "detection"},
            }
        )
    return features


def _write_run_metadata(path: Path, metadata: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# Backends -----------------------------------------------------------------------


class _FilesBackend:
    """Reads the project with the Java-free reader; writes results files for the Groovy import script."""

    name = "files"

    def __init__(self, project_path: Path, remap: Mapping[str, str], output_dir: Path) -> None:
        from nuclass_qupath.qupath.project_files import QuPathProjectFiles

        self.output_dir = output_dir
        self.project = QuPathProjectFiles(project_path, image_root_remap=remap)
        self.class_colors = self.project.path_classes()
        self.images = [
            BatchImage(entry.image_name, entry.image_path, entry.exists, entry.calibration.mpp, entry)
            for entry in self.project.images
        ]

    def close(self) -> None:
        """Nothing to release: the reader holds no open files between calls."""

    def read_features(self, image: BatchImage) -> tuple[list[dict], list[dict]]:
        """Return the annotations and the cells and detections of an image as QuPath GeoJSON."""
        annotations, detections = [], []
        for obj in image.handle.read_image_data().iter_objects():
            if obj.kind == "annotation" and obj.geometry is not None:
                annotations.append(obj.to_geojson_feature(class_colors=self.class_colors))
            elif obj.kind in ("cell", "detection") and obj.geometry is not None:
                detections.append(obj.to_geojson_feature(class_colors=self.class_colors))
        return annotations, detections

    def add_detections(self, image: BatchImage, features: list[dict]) -> None:
        # NOTE: the import script applies results only to objects that exist in QuPath, so
        # detected nuclei must be imported as objects (File > Import objects) instead.
        logger.warning(
            "%s: %d detected nuclei are new objects; import %s into QuPath with File > Import objects, "
            "because the import script only updates existing objects",
            image.name, len(features), results_file_name(image.name),
        )

    def is_done(self, image: BatchImage, model_id: str) -> bool:
        """Return whether the image's results file exists and its run metadata names ``model_id``."""
        results_path = self.output_dir / results_file_name(image.name)
        metadata_path = run_metadata_path(results_path)
        if not results_path.is_file() or not metadata_path.is_file():
            return False
        try:
            recorded = json.loads(metadata_path.read_text(encoding="utf-8")).get("model", {}).get("model_id")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
            logger.warning("%s: unreadable run metadata %s (%s); classifying again", image.name, metadata_path, exc)
            return False
        return recorded == model_id

    def write(
        self, image: BatchImage, cells: CellTable, results: dict[str, ObjectResult], tiles: list[dict] | None,
        *, config: Any, metadata: dict,
    ) -> list[Path]:
        """Write ``<image name>.nuclass.geojson`` and its run metadata, both atomically."""
        from nuclass_qupath.cells.geojson import GeoJSONWriter
        from nuclass_qupath.qupath.results import apply_results_to_features

        features, stats = apply_results_to_features(
            [f for f in cells.features if f is not None], results, colors=class_colors(config.classes), tiles=tiles
        )
        results_path = self.output_dir / results_file_name(image.name)
        metadata_path = run_metadata_path(results_path)
        with contextlib.ExitStack() as stack:
            with GeoJSONWriter(results_path) as writer:
                for feature in features:
                    writer.write(feature)
                # The metadata is written inside the writer's block, so a failure there discards both.
                metadata_tmp = stack.enter_context(atomic_path(metadata_path))
                metadata_tmp.write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        logger.info(
            "%s: wrote %d classified objects and %d heatmap tiles to %s",
            image.name, stats.classified, stats.tiles_added, results_path,
        )
        return [results_path, metadata_path]


class _PaquoBackend:
    """Reads and writes the project through paquo, in QuPath's own data files."""

    name = "paquo"

    def __init__(self, session: Any, output_dir: Path) -> None:
        self.session = session
        self.output_dir = output_dir
        self.images = [BatchImage(image.name, image.path, image.exists, image.mpp, image) for image in session.images]

    def close(self) -> None:
        self.session.close()

    def read_features(self, image: BatchImage) -> tuple[list[dict], list[dict]]:
        features = self.session.object_features(image.handle)
        annotations = [f for f in features if (f.get("properties") or {}).get("objectType") == "annotation"]
        detections = [f for f in features if (f.get("properties") or {}).get("objectType") in ("cell", "detection")]
        return annotations, detections

    def add_detections(self, image: BatchImage, features: list[dict]) -> None:
        """Add detected nuclei to the image's hierarchy; they are saved with the results."""
        hierarchy = image.handle.entry.hierarchy
        hierarchy.load_geojson(features, raise_on_skip=True)
        # close() drops the session's cached objects, so write_results reads the new detections too.
        self.session.close()
        logger.info("%s: added %d detected nuclei to the hierarchy", image.name, len(features))

    def is_done(self, image: BatchImage, model_id: str) -> bool:
        return self.session.is_done(image.handle, model_id)

    def write(
        self, image: BatchImage, cells: CellTable, results: dict[str, ObjectResult], tiles: list[dict] | None,
        *, config: Any, metadata: dict,
    ) -> list[Path]:
        """Write the results into the project, then the run metadata into the output folder."""
        summary = self.session.write_results(
            image.handle, results, classes=config.classes, model_id=config.model_id, version=__version__, tiles=tiles
        )
        metadata["backup"] = str(summary.backup_path) if summary.backup_path else None
        metadata_path = run_metadata_path(self.output_dir / results_file_name(image.name))
        _write_run_metadata(metadata_path, metadata)
        return [image.handle.data_path, metadata_path]

"""The main job: classify every nucleus of one slide and write QuPath GeoJSON.

Used by ``nuclass-qupath classify`` and by the Groovy script through it.
All outputs of a run (GeoJSON, run metadata, preview) are written to temporary
files first and renamed together at the end, so a failed run leaves none.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from nuclass_qupath import __version__
from nuclass_qupath._atomic import atomic_path
from nuclass_qupath.cells.table import CellTable
from nuclass_qupath.errors import CellsError

logger = logging.getLogger(__name__)


@dataclass
class ClassifyRequest:
    """What to classify and where to write it."""

    slide_path: Path
    output_path: Path
    cells_path: Path | None = None
    model_path: Path | None = None
    mpp: float | None = None
    preview_path: Path | None = None
    metadata_path: Path | None = None  # default: <output>.run.json
    mode: str = "fast"
    region_px: int = 1024
    threads: int | None = None
    precision: str = "auto"
    heatmap_tile_um: float | None = None
    arguments: dict[str, Any] = field(default_factory=dict)  # recorded in the run metadata

    def resolved_metadata_path(self) -> Path:
        if self.metadata_path is not None:
            return self.metadata_path
        name = self.output_path.name
        for suffix in (".geojson.gz", ".json.gz", ".geojson", ".json", ".gz"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        return self.output_path.with_name(name + ".run.json")


@dataclass
class ClassifyResult:
    n_cells: int
    class_counts: dict[str, int]
    timings_s: dict[str, float]
    outputs: list[Path]
    metadata: dict[str, Any]


def load_cells(request: ClassifyRequest, slide, progress=None) -> tuple[CellTable, str]:
    """Cells from the request's GeoJSON, or from the built-in detector when none is given."""
    if request.cells_path is not None:
        from nuclass_qupath.cells.geojson import read_cells_geojson

        cells = read_cells_geojson(request.cells_path)
        source = f"geojson:{request.cells_path}"
    else:
        from nuclass_qupath.cells.detector import detect_nuclei

        cells = detect_nuclei(slide, progress=progress)
        source = "detector"
    if len(cells) == 0:
        raise CellsError(
            f"no nuclei to classify on {request.slide_path.name}: "
            + ("the cell file holds no cells" if request.cells_path else "the detector found none (is the slide blank?)")
        )
    return cells, source


def classify_file(
    request: ClassifyRequest,
    *,
    progress_factory: Callable[[int, str], Callable[[int], None]] | None = None,
) -> ClassifyResult:
    """Run the classify job described by ``request``.

    ``progress_factory(total, description)`` returns a callback that takes a
    number of finished items; the CLI passes one backed by a progress bar.
    """
    from nuclass_qupath.cells.geojson import GeoJSONWriter
    from nuclass_qupath.engine import EngineOptions, SlideClassifier
    from nuclass_qupath.engine.output import class_counts, prediction_features
    from nuclass_qupath.model import load_model
    from nuclass_qupath.slides import open_slide

    timings: dict[str, float] = {}
    started = time.perf_counter()

    t = time.perf_counter()
    slide = open_slide(request.slide_path, mpp=request.mpp)
    timings["open_slide"] = time.perf_counter() - t
    with slide:
        logger.info(
            "slide %s: %d x %d px, %.4f µm/px (%s), %s",
            request.slide_path.name, slide.width, slide.height, slide.mpp, slide.mpp_source, slide.backend,
        )
        t = time.perf_counter()
        model = load_model(request.model_path)
        timings["load_model"] = time.perf_counter() - t

        t = time.perf_counter()
        cells, cell_source = load_cells(request, slide)
        timings["cells"] = time.perf_counter() - t
        logger.info("cells: %d from %s in %.1f s", len(cells), cell_source, timings["cells"])

        options = EngineOptions(
            mode=request.mode, region_px=request.region_px, threads=request.threads, precision=request.precision
        )
        classifier = SlideClassifier(model, options)
        progress = progress_factory(len(cells), "classifying") if progress_factory else None
        predictions = classifier.classify(slide, cells, progress=progress)
        for key, value in predictions.timings_s.items():
            timings[f"classify_{key}"] = value

        counts = class_counts(predictions)
        metadata = _run_metadata(request, slide, model.config, cells, cell_source, counts, options)

        t = time.perf_counter()
        outputs = [request.output_path, request.resolved_metadata_path()]
        with contextlib.ExitStack() as stack:
            with GeoJSONWriter(request.output_path) as writer:
                for feature in prediction_features(cells, predictions, model.config):
                    writer.write(feature)
                if request.heatmap_tile_um:
                    from nuclass_qupath.qupath.heatmap import heatmap_tiles

                    for tile in heatmap_tiles(
                        cells.centroids_px, predictions.probs, predictions.class_names, predictions.confidence,
                        mpp=slide.mpp, tile_um=request.heatmap_tile_um,
                        image_width_px=slide.width, image_height_px=slide.height,
                    ):
                        writer.write(tile)
                # The metadata and preview are made inside the writer's block, so that
                # a failure there also discards the GeoJSON.
                if request.preview_path is not None:
                    from nuclass_qupath.preview import write_preview

                    preview_tmp = stack.enter_context(atomic_path(request.preview_path))
                    write_preview(slide, cells, predictions, model.config, preview_tmp)
                    outputs.append(request.preview_path)
                timings["write"] = time.perf_counter() - t
                timings["total"] = time.perf_counter() - started
                metadata["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
                metadata_file = stack.enter_context(atomic_path(request.resolved_metadata_path()))
                metadata_file.write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info(
        "wrote %d cells to %s (%s) in %.1f s total, %.0f cells/s end to end",
        len(cells), request.output_path, ", ".join(f"{k} {v}" for k, v in counts.items()),
        timings["total"], len(cells) / max(timings["total"], 1e-9),
    )
    return ClassifyResult(len(cells), counts, timings, outputs, metadata)


def _run_metadata(request, slide, config, cells, cell_source, counts, options) -> dict[str, Any]:
    return {
        "tool": "nuclass-qupath",
        "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "arguments": request.arguments,
        "python": platform.python_version(),
        "slide": {
            "path": str(request.slide_path.resolve()),
            "width_px": slide.width,
            "height_px": slide.height,
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "backend": slide.backend,
        },
        "model": {
            "model_id": config.model_id,
            "path": str(request.model_path) if request.model_path else "bundled",
            "classes": [c.model_dump() for c in config.classes],
            "mpp": config.mpp,
            "description": config.description,
            "training": config.training,
        },
        "cells": {"count": len(cells), "source": cell_source},
        "engine": {"mode": options.mode, "region_px": options.region_px, "precision": options.precision},
        "class_counts": counts,
    }

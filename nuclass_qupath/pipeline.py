"""The main job: classify every nucleus of one slide and write QuPath GeoJSON.

Used by ``nuclass-qupath classify`` and by the Groovy script through it.
All outputs of a run (GeoJSON, run metadata, preview) are written to temporary
files first and renamed together at the end, so a failed run leaves none.

With ``low_memory`` the job streams: the detector runs block by block (the
next block in a thread while the current one is classified), and every batch
of predictions is written as soon as the engine yields it. Memory then stays
flat in the number of cells, apart from 20 bytes per cell kept for a preview
or heatmap tiles when those are requested.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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
    region_px: int = 1536
    threads: int | None = None
    precision: str = "fp32"
    heatmap_tile_um: float | None = None
    low_memory: bool = False
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

        options = EngineOptions(
            mode=request.mode, region_px=request.region_px, threads=request.threads, precision=request.precision
        )
        if request.low_memory:
            return _classify_streaming(request, slide, model, options, timings, started)

        t = time.perf_counter()
        cells, cell_source = load_cells(request, slide)
        timings["cells"] = time.perf_counter() - t
        logger.info("cells: %d from %s in %.1f s", len(cells), cell_source, timings["cells"])

        classifier = SlideClassifier(model, options)
        progress = progress_factory(len(cells), "classifying") if progress_factory else None
        predictions = classifier.classify(slide, cells, progress=progress)
        for key, value in predictions.timings_s.items():
            timings[f"classify_{key}"] = value

        counts = class_counts(predictions)
        metadata = _run_metadata(request, slide, model.config, len(cells), cell_source, counts, classifier)

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


def _run_metadata(request, slide, config, n_cells, cell_source, counts, classifier) -> dict[str, Any]:
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
        "cells": {"count": n_cells, "source": cell_source},
        "engine": {
            "mode": classifier.options.mode,
            "region_px": classifier.options.region_px,
            # What ran: "auto" resolves to bf16 or fp32 when the classifier is built.
            "precision": classifier.precision,
            "low_memory": request.low_memory,
        },
        "class_counts": counts,
    }


# ---------------------------------------------------------------------------
# Streaming (low-memory) job

# Cores of the engine per side of a detection block; 4 cores of 1536 px at
# 0.5 µm/px make blocks of 3 mm.
CORES_PER_BLOCK = 4


@dataclass
class _StreamTotals:
    """Totals of a streaming run: class counts, and centroids and mixtures only for a preview or heatmap."""

    class_names: list[str]
    keep_predictions: bool
    n_cells: int = 0
    counts: np.ndarray | None = None
    centroids: list[np.ndarray] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    gates: list[np.ndarray] = field(default_factory=list)

    def add(self, centroids_px: np.ndarray, probs: np.ndarray, gate: np.ndarray) -> None:
        predicted = probs.argmax(axis=1)
        batch_counts = np.bincount(predicted, minlength=len(self.class_names))
        self.counts = batch_counts if self.counts is None else self.counts + batch_counts
        self.n_cells += len(probs)
        if self.keep_predictions:
            self.centroids.append(np.asarray(centroids_px, dtype=np.float64))
            self.probs.append(probs.astype(np.float32))
            self.gates.append(gate.astype(np.float32))

    def class_counts(self) -> dict[str, int]:
        counts = self.counts if self.counts is not None else np.zeros(len(self.class_names), dtype=np.int64)
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    def table(self):
        """Return the kept cells as a point CellTable and their Predictions (mixture and gate only)."""
        from nuclass_qupath.engine.predictions import Predictions

        n = len(self.class_names)
        probs = np.concatenate(self.probs) if self.probs else np.zeros((0, n), np.float32)
        gate = np.concatenate(self.gates) if self.gates else np.zeros(0, np.float32)
        xy = np.concatenate(self.centroids) if self.centroids else np.zeros((0, 2))
        # The paths' own probabilities are not kept, so the mixture replaces them.
        predictions = Predictions(self.class_names, probs, gate, probs, probs)
        return CellTable.from_points(xy), predictions


def detection_blocks(slide, block_l0_px: float) -> list[tuple[float, float, float, float]]:
    """Return the ``(x, y, w, h)`` level-0 blocks, row by row, that tile the slide."""
    blocks = []
    n_x = max(1, math.ceil(slide.width / block_l0_px))
    n_y = max(1, math.ceil(slide.height / block_l0_px))
    for row in range(n_y):
        for col in range(n_x):
            x, y = col * block_l0_px, row * block_l0_px
            blocks.append((x, y, min(block_l0_px, slide.width - x), min(block_l0_px, slide.height - y)))
    return blocks


def _detected_blocks(slide, blocks, seconds: dict[str, float]) -> Iterator[CellTable]:
    """Yield the nuclei of each block; the next block is detected in a thread while the caller works.

    The detector spends most of its time in numpy, scipy and scikit-image
    calls that release the GIL, so on two cores detection and the encoders
    run side by side.
    """
    from nuclass_qupath.cells.detector import detect_nuclei

    def detect(block):
        t = time.perf_counter()
        cells = detect_nuclei(slide, region_px=block)
        return cells, time.perf_counter() - t

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nuclass-detect") as executor:
        pending = executor.submit(detect, blocks[0]) if blocks else None
        for i in range(len(blocks)):
            t = time.perf_counter()
            cells, detect_s = pending.result()
            seconds["cells_wait"] = seconds.get("cells_wait", 0.0) + time.perf_counter() - t
            seconds["cells"] = seconds.get("cells", 0.0) + detect_s
            pending = executor.submit(detect, blocks[i + 1]) if i + 1 < len(blocks) else None
            yield cells


def _classify_streaming(request: ClassifyRequest, slide, model, options, timings: dict[str, float], started: float):
    """Run the job with bounded memory: detect, classify and write block by block."""
    from nuclass_qupath.cells.geojson import GeoJSONWriter
    from nuclass_qupath.engine import SlideClassifier
    from nuclass_qupath.engine.output import batch_features

    config = model.config
    classifier = SlideClassifier(model, options)
    if request.cells_path is not None:
        from nuclass_qupath.cells.geojson import read_cells_geojson

        t = time.perf_counter()
        tables: Iterator[CellTable] = iter([read_cells_geojson(request.cells_path)])
        timings["cells"] = time.perf_counter() - t
        cell_source = f"geojson:{request.cells_path}"
    else:
        block_l0_px = CORES_PER_BLOCK * options.region_px * config.mpp / slide.mpp
        blocks = detection_blocks(slide, block_l0_px)
        logger.info("streaming: detecting nuclei in %d blocks of %.0f level-0 px", len(blocks), block_l0_px)
        tables = _detected_blocks(slide, blocks, timings)
        cell_source = "detector"

    keep = request.preview_path is not None or bool(request.heatmap_tile_um)
    totals = _StreamTotals(config.class_names, keep)
    stage_s: dict[str, float] = {}
    write_s = 0.0
    outputs = [request.output_path, request.resolved_metadata_path()]
    with contextlib.ExitStack() as stack:
        with GeoJSONWriter(request.output_path) as writer:
            for cells in tables:
                for index, output, batch_s in classifier.iter_batches(slide, cells):
                    for key, value in batch_s.items():
                        stage_s[key] = stage_s.get(key, 0.0) + value
                    t = time.perf_counter()
                    probs = output.probs.float().numpy()
                    gate = output.gate.float().numpy()
                    for feature in batch_features(cells, index, probs, gate, config.class_names, config):
                        writer.write(feature)
                    totals.add(cells.centroids_px[index], probs, gate)
                    write_s += time.perf_counter() - t
            if totals.n_cells == 0:
                raise CellsError(
                    f"no nuclei to classify on {request.slide_path.name}: "
                    + ("the cell file holds no cells" if request.cells_path else "the detector found none (is the slide blank?)")
                )
            logger.info("cells: %d from %s", totals.n_cells, cell_source)
            for key, value in stage_s.items():
                timings[f"classify_{key}"] = value

            counts = totals.class_counts()
            metadata = _run_metadata(request, slide, config, totals.n_cells, cell_source, counts, classifier)
            t = time.perf_counter()
            if keep:
                cells, predictions = totals.table()
                if request.heatmap_tile_um:
                    from nuclass_qupath.qupath.heatmap import heatmap_tiles

                    for tile in heatmap_tiles(
                        cells.centroids_px, predictions.probs, predictions.class_names, predictions.confidence,
                        mpp=slide.mpp, tile_um=request.heatmap_tile_um,
                        image_width_px=slide.width, image_height_px=slide.height,
                    ):
                        writer.write(tile)
                if request.preview_path is not None:
                    from nuclass_qupath.preview import write_preview

                    preview_tmp = stack.enter_context(atomic_path(request.preview_path))
                    write_preview(slide, cells, predictions, config, preview_tmp)
                    outputs.append(request.preview_path)
            timings["write"] = write_s + time.perf_counter() - t
            timings["total"] = time.perf_counter() - started
            metadata["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
            metadata_file = stack.enter_context(atomic_path(request.resolved_metadata_path()))
            metadata_file.write_text(json.dumps(metadata, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    logger.info(
        "wrote %d cells to %s (%s) in %.1f s total, %.0f cells/s end to end, streaming",
        totals.n_cells, request.output_path, ", ".join(f"{k} {v}" for k, v in counts.items()),
        timings["total"], totals.n_cells / max(timings["total"], 1e-9),
    )
    return ClassifyResult(totals.n_cells, counts, timings, outputs, metadata)

"""Build a training-set store from slides with labelled cells, chunk by chunk, resumably.

A build runs in two steps:

1. **Plan.** Each slide's labels file is read, and cells of unknown classes
   or below the minimum confidence are dropped. The rest are put in spatial
   order and their per-cell arrays (label, confidence, names, ids,
   centroids, and the cell centres in their crops) are appended to the
   store, one slide at a time. The group
   attributes then record the slides' row ranges and a fingerprint of the
   inputs and settings.
2. **Crops.** The image arrays are filled one chunk (``cells_per_chunk``
   rows, one shard file per array) at a time: the chunk's cells are cut from
   their slide through a tile cache, the shard is written in a background
   thread while the next chunk is cut, and only then is the chunk added to
   ``build_state.json`` (written atomically). Memory holds two chunks and the
   tile cache, whatever the number of cells. Crops are cut with the engine's
   exact-mode reader, on the encoders' stride grid.

Running the same build again resumes it: a store with the same fingerprint
skips its recorded chunks and rewrites any other, including one whose write
was cut short. A store with another fingerprint is rejected unless
``overwrite`` is set. An interrupted plan starts over.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from nuclass_qupath import __version__
from nuclass_qupath._atomic import atomic_open
from nuclass_qupath.errors import CellsError
from nuclass_qupath.model.config import ClassSpec
from nuclass_qupath.training.crops import cell_crop_centres, read_cell_crops
from nuclass_qupath.training.label_sources import (
    LabelledCells,
    LabelSource,
    check_unique_names,
    class_colours_beside,
    read_labelled_cells,
)
from nuclass_qupath.training.store import (
    ATTRIBUTE_KEY,
    CENTRE_ARRAYS,
    IMAGE_ARRAYS,
    STORE_FORMAT_VERSION,
    CropStore,
    StoreGeometry,
    require_zarr3,
)

logger = logging.getLogger(__name__)

STATE_FILE = "build_state.json"
CELL_ARRAY_CHUNK = 65536
# Blosc's zstd at level 1: on CMU-1 crops it packs 1.34x (crops) and 1.62x
# (contexts), within 2 % of level 3, and encodes three times faster.
COMPRESSION_LEVEL = 1


@dataclass(frozen=True)
class BuildSettings:
    """Choices of a build that change which cells and pixels the store contains."""

    min_confidence: float = 0.0
    label_map: dict[str, str] | None = None
    skip_other_classes: bool = False
    cells_per_chunk: int = 64


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _file_signature(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _fingerprint(sources, geometry, classes, settings) -> str:
    data = {
        "sources": [
            {**s.record(), "slide_file": _file_signature(s.slide_path), "labels_file": _file_signature(s.labels_path)}
            for s in sources
        ],
        "geometry": geometry.to_dict(),
        "classes": [c.name for c in classes] if classes else None,
        "settings": {
            "min_confidence": settings.min_confidence,
            "label_map": settings.label_map,
            "skip_other_classes": settings.skip_other_classes,
            "cells_per_chunk": settings.cells_per_chunk,
        },
        "format_version": STORE_FORMAT_VERSION,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------
# Completion record


def _merge_interval(intervals: list[list[int]], chunk: int) -> list[list[int]]:
    """Add ``chunk`` to sorted, disjoint ``[start, stop)`` intervals of chunk numbers."""
    merged = sorted(intervals + [[chunk, chunk + 1]])
    out: list[list[int]] = []
    for start, stop in merged:
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append([start, stop])
    return out


def _is_done(intervals: list[list[int]], chunk: int) -> bool:
    return any(start <= chunk < stop for start, stop in intervals)


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise CellsError(f"the build record {path / STATE_FILE} is unreadable ({exc}); rebuild with --overwrite") from exc


def _write_state(path: Path, state: dict) -> None:
    state["updated"] = _utc_now()
    with atomic_open(path / STATE_FILE, "w") as handle:
        json.dump(state, handle)


# ---------------------------------------------------------------------------
# Planning


def _filter_cells(cells: LabelledCells, source: LabelSource, class_index: dict[str, int], settings: BuildSettings) -> LabelledCells:
    known = np.array([label in class_index for label in cells.labels], dtype=bool)
    if not known.all():
        unknown = sorted(set(np.array(cells.labels, dtype=object)[~known].tolist()))
        if not settings.skip_other_classes:
            raise CellsError(
                f"{source.labels_path}: labels {unknown} are not among the classes {list(class_index)}; add them with "
                "--classes, map them with --label-map, or drop them with --skip-other-classes"
            )
        logger.info("%s: dropped %d cells of other classes %s", source.name, int((~known).sum()), unknown)
    confident = cells.confidence >= settings.min_confidence
    if (known & ~confident).any():
        logger.info("%s: dropped %d cells below confidence %.3g", source.name, int((known & ~confident).sum()), settings.min_confidence)
    return cells.subset(known & confident)


def collect_classes(sources: list[LabelSource], settings: BuildSettings) -> list[ClassSpec]:
    """Return every class of the labels files above the minimum confidence, sorted, with colours.

    Colours come from a ``xenium-labels`` summary beside a labels file, else
    from the default palette.
    """
    from nuclass_qupath.training.setup import parse_class_specs

    found: set[str] = set()
    colours: dict[str, tuple[int, int, int]] = {}
    for source in sources:
        cells = read_labelled_cells(source.labels_path, settings.label_map)
        found.update(label for label, c in zip(cells.labels, cells.confidence) if c >= settings.min_confidence)
        colours.update(class_colours_beside(source.labels_path))
    names = sorted(found)
    if len(names) < 2:
        raise CellsError(f"a training set needs at least two classes, the labels files hold {names}")
    specs = parse_class_specs(names)
    return [ClassSpec(name=s.name, color=colours.get(s.name, s.color)) for s in specs]


def _open_source_slide(source: LabelSource):
    from nuclass_qupath.slides import open_slide

    return open_slide(source.slide_path, mpp=source.mpp)


def _plan(group, sources, geometry: StoreGeometry, classes: list[ClassSpec], settings: BuildSettings) -> list[dict]:
    """Append every slide's per-cell arrays; return the slide records with their row ranges."""
    from nuclass_qupath.cells.table import CellTable
    from nuclass_qupath.engine.classify import check_centroids
    from nuclass_qupath.training.region_cache import spatial_order

    class_index = {c.name: i for i, c in enumerate(classes)}
    arrays = {
        "label": group.create_array("label", shape=(0,), chunks=(CELL_ARRAY_CHUNK,), dtype="int32", fill_value=-1),
        "confidence": group.create_array("confidence", shape=(0,), chunks=(CELL_ARRAY_CHUNK,), dtype="float32"),
        "x_px": group.create_array("x_px", shape=(0,), chunks=(CELL_ARRAY_CHUNK,), dtype="float64"),
        "y_px": group.create_array("y_px", shape=(0,), chunks=(CELL_ARRAY_CHUNK,), dtype="float64"),
    }
    for name in CENTRE_ARRAYS:
        arrays[name] = group.create_array(name, shape=(0, 2), chunks=(CELL_ARRAY_CHUNK, 2), dtype="float32")
    for name in ("slide", "organ", "cohort", "cell_id"):
        arrays[name] = group.create_array(name, shape=(0,), chunks=(CELL_ARRAY_CHUNK,), dtype=str)

    records = []
    start = 0
    for source in sources:
        cells = _filter_cells(read_labelled_cells(source.labels_path, settings.label_map), source, class_index, settings)
        with _open_source_slide(source) as slide:
            check_centroids(CellTable.from_points(cells.centroids_px, ids=cells.ids), slide)
            slide_mpp = slide.mpp
        # Spatial order keeps the tiles that consecutive cells read in the cache.
        band_px = geometry.context_size_px * geometry.context_mpp / slide_mpp
        cells = cells.subset(spatial_order(cells.centroids_px, band_px))
        n = len(cells)
        if n:
            arrays["label"].append(np.array([class_index[label] for label in cells.labels], dtype=np.int32))
            arrays["confidence"].append(cells.confidence.astype(np.float32))
            arrays["x_px"].append(cells.centroids_px[:, 0])
            arrays["y_px"].append(cells.centroids_px[:, 1])
            for name, value in (("slide", source.name), ("organ", source.organ), ("cohort", source.cohort)):
                arrays[name].append(np.array([value] * n, dtype=str))
            arrays["cell_id"].append(np.array(cells.ids, dtype=str))
            # The same arithmetic as the crop reader, so these are the centres it returns for the cut crops.
            local_scale, context_scale = geometry.mpp / slide_mpp, geometry.context_mpp / slide_mpp
            arrays["local_centre_px"].append(
                cell_crop_centres(
                    cells.centroids_px, local_scale, geometry.local_crop_px, geometry.local_margin_px,
                    geometry.local_align_px,
                ),
                axis=0,
            )
            arrays["context_centre_px"].append(
                cell_crop_centres(
                    cells.centroids_px, context_scale, geometry.context_encoder_px, geometry.context_margin_px,
                    geometry.context_align_px,
                ),
                axis=0,
            )
        records.append({**source.record(), "slide_mpp": slide_mpp, "rows": [start, start + n]})
        logger.info("planned %s: %d cells, rows %d-%d", source.name, n, start, start + n)
        start += n
    return records


# ---------------------------------------------------------------------------
# Cutting and writing chunks


class _SlideCursor:
    """Keeps the slide of the current rows open, with its tile cache, and moves to the next when needed."""

    def __init__(self, sources: dict[str, LabelSource]) -> None:
        self._sources = sources
        self._name: str | None = None
        self._slide = None
        self._close: Callable[[], None] | None = None

    def slide(self, name: str):
        from nuclass_qupath.training.region_cache import cached_slide

        if name != self._name:
            self.close()
            raw = _open_source_slide(self._sources[name])
            cached = cached_slide(raw)
            self._name, self._slide = name, cached

            def close() -> None:
                cached.close()
                raw.close()

            self._close = close
        return self._slide

    def close(self) -> None:
        if self._close is not None:
            self._close()
        self._name, self._slide, self._close = None, None, None


def _cut_rows(cursor, records, starts, group, geometry, start: int, stop: int, pool) -> tuple[np.ndarray, np.ndarray]:
    """Cut the crops and contexts of store rows ``[start, stop)``, which may span several slides."""
    xy = np.column_stack([group["x_px"][start:stop], group["y_px"][start:stop]])
    local = np.empty((stop - start, geometry.local_size_px, geometry.local_size_px, 3), dtype=np.uint8)
    context = np.empty((stop - start, geometry.context_size_px, geometry.context_size_px, 3), dtype=np.uint8)
    row = start
    while row < stop:
        record = records[bisect.bisect_right(starts, row) - 1]
        segment_stop = min(stop, record["rows"][1])
        slide = cursor.slide(record["name"])

        def cut(i: int) -> None:
            local[i], _, context[i], _ = read_cell_crops(slide, xy[i], geometry)

        list(pool.map(cut, range(row - start, segment_stop - start)))
        row = segment_stop
    return local, context


def _pending_chunks(n_chunks: int, done: list[list[int]]) -> Iterator[int]:
    return (k for k in range(n_chunks) if not _is_done(done, k))


def _fill_chunks(path, group, records, geometry, settings, state, sources, workers, progress) -> None:
    chunk = settings.cells_per_chunk
    n_cells = records[-1]["rows"][1] if records else 0
    n_chunks = -(-n_cells // chunk)
    starts = [r["rows"][0] for r in records]
    arrays = {name: group[name] for name in IMAGE_ARRAYS}
    todo = list(_pending_chunks(n_chunks, state["chunks_done"]))
    logger.info("cutting %d of %d chunks (%d cells per chunk) with %d threads", len(todo), n_chunks, chunk, workers)

    def write(k: int, local: np.ndarray, context: np.ndarray) -> int:
        # zarr merges a write into the shard file already there, so a shard
        # left half-written by an interrupted build is deleted first. Keys are
        # zarr v3's default "c/<shard>/0/0/0".
        for name in IMAGE_ARRAYS:
            (path / name / "c" / str(k) / "0" / "0" / "0").unlink(missing_ok=True)
        arrays["local"][k * chunk : k * chunk + len(local)] = local
        arrays["context"][k * chunk : k * chunk + len(context)] = context
        return len(local)

    n_todo_cells = sum(min((k + 1) * chunk, n_cells) - k * chunk for k in todo)

    def finish(k: int, future: Future) -> None:
        n = future.result()
        state["chunks_done"] = _merge_interval(state["chunks_done"], k)
        _write_state(path, state)
        if progress is not None:
            progress(n, n_todo_cells)

    started = time.perf_counter()
    by_source = {s.name: s for s in sources}
    with ExitStack() as stack, ThreadPoolExecutor(workers) as pool, ThreadPoolExecutor(1) as writer:
        cursor = _SlideCursor(by_source)
        stack.callback(cursor.close)
        pending: tuple[int, Future] | None = None
        for k in todo:
            local, context = _cut_rows(cursor, records, starts, group, geometry, k * chunk, min((k + 1) * chunk, n_cells), pool)
            # One write in flight: the next chunk is cut while this one is compressed and written.
            if pending is not None:
                finish(*pending)
            pending = (k, writer.submit(write, k, local, context))
        if pending is not None:
            finish(*pending)
    elapsed = time.perf_counter() - started
    if n_todo_cells:
        logger.info("wrote %d cells in %.1f s (%.1f cells/s)", n_todo_cells, elapsed, n_todo_cells / max(elapsed, 1e-9))


# ---------------------------------------------------------------------------
# Entry point


def _remove_store(path: Path) -> None:
    if (path / "zarr.json").is_file() or (path / STATE_FILE).is_file():
        shutil.rmtree(path)
    elif path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    elif path.exists():
        raise CellsError(f"{path} exists and is not a training-set store; choose another output path")


def _remove_partial_files(path: Path) -> None:
    # zarr writes each file as a temporary ``*.partial`` and renames it; a killed build leaves them behind.
    for partial in path.rglob("*.partial"):
        partial.unlink(missing_ok=True)


def _create_store(path, sources, geometry, classes, settings, fingerprint):
    zarr = require_zarr3()
    from zarr.codecs import BloscCodec

    _remove_store(path)
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    _write_state(path, {"fingerprint": fingerprint, "planned": False, "chunks_done": []})
    records = _plan(group, sources, geometry, classes, settings)
    n_cells = records[-1]["rows"][1] if records else 0
    if n_cells == 0:
        raise CellsError("no labelled cell is left to store; check the labels files, --classes and --min-confidence")

    # Images: one shard file per chunk of cells, one compressed inner chunk per cell.
    compressor = BloscCodec(cname="zstd", clevel=COMPRESSION_LEVEL, shuffle="noshuffle")
    for name, size in (("local", geometry.local_size_px), ("context", geometry.context_size_px)):
        group.create_array(
            name,
            shape=(n_cells, size, size, 3),
            shards=(settings.cells_per_chunk, size, size, 3),
            chunks=(1, size, size, 3),
            dtype="uint8",
            compressors=compressor,
            fill_value=0,
            dimension_names=("cell", "y", "x", "rgb"),
        )
    group.attrs[ATTRIBUTE_KEY] = {
        "format_version": STORE_FORMAT_VERSION,
        "geometry": geometry.to_dict(),
        "classes": [{"name": c.name, "color": list(c.color)} for c in classes],
        "slides": records,
        "n_cells": n_cells,
        "cells_per_chunk": settings.cells_per_chunk,
        "settings": {
            "min_confidence": settings.min_confidence,
            "label_map": settings.label_map,
            "skip_other_classes": settings.skip_other_classes,
        },
        "fingerprint": fingerprint,
        "created": _utc_now(),
        "finished": None,
        "complete": False,
        "tool": "nuclass-qupath",
        "tool_version": __version__,
        "zarr_format": 3,
        "zarr_version": zarr.__version__,
    }
    state = {"fingerprint": fingerprint, "planned": True, "chunks_done": []}
    _write_state(path, state)
    return group, state


def build_store(
    sources: list[LabelSource],
    path: str | Path,
    geometry: StoreGeometry,
    *,
    classes: list[ClassSpec] | None = None,
    settings: BuildSettings | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CropStore:
    """Build, or resume building, a training-set store at ``path``.

    Parameters
    ----------
    sources
        Slides with their labels files (see
        :func:`~nuclass_qupath.training.label_sources.read_manifest`).
    geometry
        Pixel size and crop sizes to cut, usually ``StoreGeometry.from_config(config)``.
    classes
        Class names and colours, in label order. None takes every class found,
        sorted by name.
    settings
        Minimum confidence, label map, handling of other classes, cells per chunk.
    overwrite
        Delete an existing store at ``path`` built from other inputs, instead of raising.
    workers
        Threads that cut crops (default: CPU count, at most 8).
    progress
        Called as ``progress(n, total)`` after each chunk is written: ``n``
        cells of the ``total`` this run writes.

    Returns
    -------
    CropStore
        The complete store, opened for reading.

    Raises
    ------
    CellsError
        If a source is invalid, no cell is left, or ``path`` contains a store
        built from other inputs and ``overwrite`` is False.
    """
    zarr = require_zarr3()
    settings = settings or BuildSettings()
    if settings.cells_per_chunk < 1:
        raise CellsError(f"cells_per_chunk must be at least 1, got {settings.cells_per_chunk}")
    if not sources:
        raise CellsError("no slides to build a store from")
    check_unique_names(sources)
    path = Path(path)
    workers = workers or min(8, os.cpu_count() or 1)
    fingerprint = _fingerprint(sources, geometry, classes, settings)

    state = _read_state(path) if path.exists() else None
    resumable = state is not None and state.get("planned") and state.get("fingerprint") == fingerprint
    if path.exists() and not resumable:
        if state is not None and state.get("fingerprint") != fingerprint and not overwrite:
            raise CellsError(
                f"store {path} was built from other slides, labels or settings; pass --overwrite to replace it, "
                "or choose another output path"
            )
        if state is None and (path / "zarr.json").is_file() and not overwrite:
            raise CellsError(f"{path} is a zarr store without a build record; pass --overwrite to replace it")
    if resumable:
        group = zarr.open_group(str(path), mode="r+")
        _remove_partial_files(path)
        done = sum(stop - start for start, stop in state["chunks_done"])
        logger.info("resuming store %s: %d chunks already written", path, done)
    else:
        classes = classes or collect_classes(sources, settings)
        group, state = _create_store(path, sources, geometry, classes, settings, fingerprint)

    attrs = dict(group.attrs[ATTRIBUTE_KEY])
    _fill_chunks(path, group, attrs["slides"], geometry, settings, state, sources, workers, progress)
    if not attrs["complete"]:
        attrs.update(complete=True, finished=_utc_now())
        group.attrs[ATTRIBUTE_KEY] = attrs
        state["complete"] = True
        _write_state(path, state)
    store = CropStore(path)
    logger.info("store %s complete: %d cells, %d slides, classes %s", path, store.n_cells, len(store.slides), store.class_names)
    return store

"""The training-set store: every labelled cell's crops in one chunked zarr group.

A store is a zarr v3 group (a folder, ``*.zarr``) written by
:func:`~nuclass_qupath.training.store_build.build_store`. Rows are cells,
contiguous per slide and in spatial order within a slide:

========================  ===================  =======================================
array                     shape, dtype         content
========================  ===================  =======================================
``local``                 (N, L, L, 3) uint8   crop at ``mpp`` on the local encoder's
                                               stride grid, ``L = local_size_px``
``context``               (N, C, C, 3) uint8   context at ``context_mpp`` on the global
                                               encoder's stride grid, ``C =
                                               context_size_px``
``local_centre_px``,      (N, 2) float32       cell centre (x, y) in the pixels of its
``context_centre_px``                          crop and of its context
``label``                 (N,) int32           index into the store's classes
``confidence``            (N,) float32         label confidence, 0-1 (1 when not given)
``slide``, ``organ``,     (N,) string          per-cell slide name, organ, cohort and
``cohort``, ``cell_id``                        the cell id of the labels file
``x_px``, ``y_px``        (N,) float64         centroid, level-0 px of the slide
========================  ===================  =======================================

Crops are cut as the engine's exact mode cuts them (see
:mod:`nuclass_qupath.training.crops`), so the cell lies up to one stride off
the crop centre. The image arrays are sharded: a shard (one file) contains ``cells_per_chunk``
cells, and inside it every cell is its own blosc-zstd compressed chunk, so a
training batch reads single cells without decoding their neighbours. The
group attribute ``nuclass_store`` contains the crop geometry, the classes with
their QuPath colours, the slides with their row ranges and sources, the build
settings, times and tool version, and ``complete``. A build in progress also
keeps ``build_state.json`` in the folder (see ``store_build``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nuclass_qupath.errors import CellsError, ModelError, NuclassError
from nuclass_qupath.model.config import ClassSpec, ModelConfig
from nuclass_qupath.training.crops import CropBatch, CropGeometry

logger = logging.getLogger(__name__)

# Version 1 stored crops centred on the cell, off the encoders' stride grid.
STORE_FORMAT_VERSION = 2
ATTRIBUTE_KEY = "nuclass_store"
IMAGE_ARRAYS = ("local", "context")
CENTRE_ARRAYS = ("local_centre_px", "context_centre_px")
CELL_ARRAYS = ("label", "confidence", "slide", "organ", "cohort", "cell_id", "x_px", "y_px", *CENTRE_ARRAYS)
# The geometry of a store is the geometry of its crops.
StoreGeometry = CropGeometry
# Consecutive rows closer than this are read in one slice: decoding a few
# unused cells costs less than another read call.
MAX_READ_GAP_ROWS = 2


def require_zarr3():
    """Import zarr, raising NuclassError unless it is version 3 or later."""
    import zarr

    if int(zarr.__version__.split(".")[0]) < 3:
        raise NuclassError(
            f"the training-set store needs zarr 3 or later (sharded zarr v3 format), found zarr {zarr.__version__}; "
            "install it with: pip install 'zarr>=3'"
        )
    return zarr


def check_geometry(store_geometry: StoreGeometry, config: ModelConfig, store_path: Path | str) -> None:
    """Raise ModelError when ``config`` expects crops of another geometry than the store contains."""
    differences = store_geometry.differences(StoreGeometry.from_config(config))
    if differences:
        raise ModelError(
            f"store {store_path} contains crops of another geometry than model {config.model_id!r} expects "
            f"(store vs model: {'; '.join(differences)}; the align values are the encoders' strides). Build a "
            "store for this model with `nuclass-qupath build-store --geometry-from MODEL.json`, or let "
            "`train --store` take the geometry from the store and choose backbones and feature indexes of "
            "the same strides."
        )


def row_runs(rows: np.ndarray, max_gap: int = MAX_READ_GAP_ROWS) -> list[tuple[int, int]]:
    """Group sorted ``rows`` into ``[start, stop)`` slices with gaps of at most ``max_gap`` rows."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) > max_gap + 1)
    starts = np.concatenate([[0], breaks + 1])
    stops = np.concatenate([breaks, [len(rows) - 1]])
    return [(int(rows[a]), int(rows[b]) + 1) for a, b in zip(starts, stops)]


class CropStore:
    """A training-set store opened for reading.

    Per-cell arrays are read on first use and kept; images are read per call
    of :meth:`read_images`. Use :func:`open_store` to open one.
    """

    def __init__(self, path: str | Path) -> None:
        zarr = require_zarr3()
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise CellsError(f"training-set store not found: {self.path} (no zarr.json); build it with `nuclass-qupath build-store`")
        try:
            self._group = zarr.open_group(str(self.path), mode="r")
            attrs = dict(self._group.attrs).get(ATTRIBUTE_KEY)
        except (OSError, ValueError) as exc:
            raise CellsError(f"cannot open training-set store {self.path}: {exc}") from exc
        if not isinstance(attrs, dict):
            raise CellsError(f"{self.path} is a zarr group but not a training-set store (no {ATTRIBUTE_KEY!r} attribute)")
        if attrs.get("format_version") != STORE_FORMAT_VERSION:
            raise CellsError(
                f"store {self.path} has format version {attrs.get('format_version')}, this version of nuclass-qupath "
                f"reads version {STORE_FORMAT_VERSION} (crops on the encoders' stride grid, with each cell's centre "
                "in its crop); rebuild it with `nuclass-qupath build-store` and the same inputs, adding --overwrite"
            )
        self.attrs = attrs
        self.geometry = StoreGeometry.from_dict(attrs["geometry"])
        self.classes = [ClassSpec(name=c["name"], color=tuple(c["color"])) for c in attrs["classes"]]
        self.slides: list[dict] = list(attrs["slides"])
        self.n_cells = int(attrs["n_cells"])
        self._cache: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.n_cells

    def __repr__(self) -> str:
        return (
            f"CropStore({str(self.path)!r}, {self.n_cells} cells, {len(self.slides)} slides, "
            f"classes={self.class_names}, complete={self.complete})"
        )

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def cell_array(self, name: str) -> np.ndarray:
        """Return the whole per-cell array ``name`` (see the module docstring), read once."""
        if name not in CELL_ARRAYS:
            raise KeyError(f"no per-cell array {name!r}; the store has {CELL_ARRAYS}")
        if name not in self._cache:
            values = self._group[name][:]
            if values.dtype.kind in ("T", "U", "O"):
                values = values.astype(object)
            self._cache[name] = values
        return self._cache[name]

    @property
    def labels(self) -> np.ndarray:
        return self.cell_array("label").astype(np.int64)

    @property
    def confidence(self) -> np.ndarray:
        return self.cell_array("confidence")

    @property
    def centroids_px(self) -> np.ndarray:
        """(N, 2) level-0 (x, y) centroids in each cell's slide."""
        return np.column_stack([self.cell_array("x_px"), self.cell_array("y_px")])

    def slide_field(self, key: str) -> np.ndarray:
        """Return per cell the ``key`` (``name``, ``organ``, ``cohort``) of its slide, from the slides' row ranges."""
        values = np.array([slide[key] for slide in self.slides], dtype=object)
        counts = [slide["rows"][1] - slide["rows"][0] for slide in self.slides]
        return np.repeat(values, counts) if self.slides else np.zeros(0, dtype=object)

    def read_batch(self, rows: np.ndarray) -> CropBatch:
        """Read the crops and cell centres of ``rows`` (any order, repeats allowed), in that order."""
        local, context = self.read_images(rows)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        return CropBatch(
            local, context, self.cell_array("local_centre_px")[rows], self.cell_array("context_centre_px")[rows]
        )

    def read_images(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Read the local crops and contexts of ``rows`` (any order, repeats allowed), in that order.

        Rows are sorted and read as runs of nearby rows, so cells that share a
        shard are read together.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n_cells):
            raise IndexError(f"rows must be in 0..{self.n_cells - 1}, got {rows.min()}..{rows.max()}")
        unique, inverse = np.unique(rows, return_inverse=True)
        out = []
        for name, size in (("local", self.geometry.local_size_px), ("context", self.geometry.context_size_px)):
            array = self._group[name]
            images = np.empty((len(unique), size, size, 3), dtype=np.uint8)
            position = 0
            for start, stop in row_runs(unique):
                block = array[start:stop]
                wanted = unique[position:][unique[position:] < stop]
                images[position : position + len(wanted)] = block[wanted - start]
                position += len(wanted)
            out.append(images[inverse])
        return out[0], out[1]

    def check_geometry(self, config: ModelConfig) -> None:
        """Raise ModelError when ``config`` expects crops of another geometry than this store contains."""
        check_geometry(self.geometry, config, self.path)

    def crops(self, *, group_by: str = "slide", class_names: list[str] | None = None) -> "StoreCrops":
        """Return the store's cells as a :class:`StoreCrops` training source.

        ``group_by`` (``slide`` or ``cohort``) sets the groups that splits keep
        whole. ``class_names`` keeps only cells of these store classes,
        relabelled in the given order; None keeps all.
        """
        if group_by not in ("slide", "cohort"):
            raise ValueError(f"group_by must be 'slide' or 'cohort', got {group_by!r}")
        if not self.complete:
            raise CellsError(
                f"store {self.path} is incomplete (its build was interrupted); run the same build-store command "
                "again to finish it"
            )
        labels = self.labels
        names = list(self.class_names)
        rows = np.arange(self.n_cells, dtype=np.int64)
        if class_names is not None:
            missing = [name for name in class_names if name not in names]
            if missing:
                raise CellsError(f"classes {missing} are not in store {self.path}; its classes are {names}")
            mapping = np.full(len(names), -1, dtype=np.int64)
            for new, name in enumerate(class_names):
                mapping[names.index(name)] = new
            labels = mapping[labels]
            rows = rows[labels >= 0]
            labels = labels[labels >= 0]
            names = list(class_names)
        groups = self.slide_field("name" if group_by == "slide" else "cohort")[rows]
        return StoreCrops(self, rows, labels, self.confidence[rows].astype(np.float32), groups, names)


@dataclass
class StoreCrops:
    """Cells of a :class:`CropStore` as a training source (``CropSource``); images stay on disk.

    ``rows`` are store rows; ``labels``, ``weights`` (label confidences) and
    ``groups`` (slide or cohort names) are per row, in memory.
    """

    store: CropStore
    rows: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    groups: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.rows)

    def get_batch(self, index: np.ndarray) -> CropBatch:
        """Read the crops and cell centres of the examples at ``index`` (positions or a slice)."""
        return self.store.read_batch(self.rows[index])

    def subset(self, mask: np.ndarray) -> "StoreCrops":
        return StoreCrops(
            self.store, self.rows[mask], self.labels[mask], self.weights[mask], self.groups[mask], self.class_names
        )

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    def check_geometry(self, config: ModelConfig) -> None:
        self.store.check_geometry(config)


def open_store(path: str | Path) -> CropStore:
    """Open a training-set store for reading; raises CellsError when ``path`` is not one."""
    store = CropStore(path)
    logger.info(
        "opened store %s: %d cells from %d slides, %d classes, %s",
        store.path, store.n_cells, len(store.slides), len(store.classes), "complete" if store.complete else "incomplete",
    )
    return store

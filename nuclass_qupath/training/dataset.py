"""Labelled cells to training crops.

A training example is a cell's local crop and its context, cut exactly as the
engine's exact mode cuts them (on the encoders' stride grid, see
:mod:`nuclass_qupath.training.crops`), the cell's centre in each crop, an
integer label, a weight (label confidence) and a group (the slide it came
from, for splits by slide).

The trainer reads examples through the :class:`CropSource` interface, which
both the in-memory :class:`CropSet` and the zarr store's
:class:`~nuclass_qupath.training.store.StoreCrops` implement.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from nuclass_qupath.cells.table import CellTable
from nuclass_qupath.errors import CellsError, ModelError
from nuclass_qupath.model.config import ModelConfig
from nuclass_qupath.training.crops import CropBatch, CropGeometry, extract_crops

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".png", ".jpg", ".jpeg")
LABEL_SUFFIXES = (".geojson", ".json", ".geojson.gz", ".csv")


@dataclass
class LabelledImage:
    """An image and the file of labelled cells on it."""

    image_path: Path
    labels_path: Path
    group: str


@runtime_checkable
class CropSource(Protocol):
    """Training examples the trainer can draw batches from.

    ``labels`` (N,) int64 index into ``class_names``, ``weights`` (N,) float32
    label confidences and ``groups`` (N,) str (slide or cohort) are kept in
    memory. The crops and cell centres are read per batch by :meth:`get_batch`.
    """

    labels: np.ndarray
    weights: np.ndarray
    groups: np.ndarray
    class_names: list[str]

    def __len__(self) -> int: ...

    def get_batch(self, index: np.ndarray) -> CropBatch:
        """Return the crops and cell centres of the examples at ``index``, in that order."""
        ...

    def subset(self, mask: np.ndarray) -> "CropSource": ...

    def class_counts(self) -> dict[str, int]: ...

    def check_geometry(self, config: ModelConfig) -> None:
        """Raise ModelError when the crops were not cut for ``config``'s geometry and encoder strides."""
        ...


@dataclass
class CropSet:
    """Training examples held in memory: crops with cell centres, labels, weights and groups.

    ``local`` and ``context`` are uint8 (N, L, L, 3) and (N, C, C, 3) crops of
    ``geometry``; ``local_centres_px`` and ``context_centres_px`` are float32
    (N, 2) cell centres ``(x, y)`` in crop pixels (see
    :class:`~nuclass_qupath.training.crops.CropBatch`).
    """

    local: np.ndarray
    context: np.ndarray
    local_centres_px: np.ndarray
    context_centres_px: np.ndarray
    labels: np.ndarray  # (N,) int64 index into class_names
    weights: np.ndarray  # (N,) float32
    groups: np.ndarray  # (N,) str
    class_names: list[str] = field(default_factory=list)
    # Geometry the crops were cut with; None when they come from elsewhere,
    # and then only the crop sizes are checked against a model.
    geometry: CropGeometry | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, index: np.ndarray) -> CropBatch:
        """Return copies of the crops and cell centres at ``index`` (positions or a slice)."""
        return CropBatch(
            self.local[index], self.context[index], self.local_centres_px[index], self.context_centres_px[index]
        )

    def subset(self, mask: np.ndarray) -> "CropSet":
        return CropSet(
            self.local[mask], self.context[mask], self.local_centres_px[mask], self.context_centres_px[mask],
            self.labels[mask], self.weights[mask], self.groups[mask], self.class_names, self.geometry,
        )

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    def check_geometry(self, config: ModelConfig) -> None:
        """Raise ModelError when the crops were cut for another geometry or stride than ``config``'s."""
        expected = CropGeometry.from_config(config)
        if self.geometry is not None:
            differences = self.geometry.differences(expected)
            if differences:
                raise ModelError(
                    f"the crops were cut for another geometry than model {config.model_id!r} expects (crops vs "
                    f"model: {'; '.join(differences)}); cut them again with this configuration"
                )
        local_px, context_px = expected.local_size_px, expected.context_size_px
        if self.local.shape[1:] != (local_px, local_px, 3) or self.context.shape[1:] != (context_px, context_px, 3):
            raise ModelError(
                f"the crops are {self.local.shape[1:3]} px and the contexts {self.context.shape[1:3]} px, but the "
                f"model configuration needs {local_px} and {context_px} px (window, margins and encoder stride); "
                "cut them again with this configuration"
            )


def _strip_label_suffix(name: str) -> str:
    for suffix in LABEL_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def pair_images_and_labels(image_dir: Path, label_dir: Path) -> list[LabelledImage]:
    """Match each label file to the image with the same stem (``a.png`` with ``a.csv`` or ``a.geojson``)."""
    if not image_dir.is_dir():
        raise CellsError(f"image folder not found: {image_dir}")
    if not label_dir.is_dir():
        raise CellsError(f"label folder not found: {label_dir}")
    images = {}
    for path in sorted(image_dir.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images[path.stem] = path
            # QuPath exports are often named after the image with its extension: a.svs.geojson.
            images[path.name] = path
    pairs = []
    unmatched = []
    for path in sorted(label_dir.iterdir()):
        if not any(path.name.lower().endswith(s) for s in LABEL_SUFFIXES):
            continue
        key = _strip_label_suffix(path.name)
        if key in images:
            pairs.append(LabelledImage(images[key], path, images[key].stem))
        else:
            unmatched.append(path.name)
    if unmatched:
        logger.warning("%d label files have no image of the same name in %s: %s", len(unmatched), image_dir, ", ".join(unmatched[:5]))
    if not pairs:
        raise CellsError(
            f"no label file in {label_dir} matches an image in {image_dir}; name them after the image "
            "(image.png with image.csv or image.geojson)"
        )
    return pairs


def load_labelled_cells(path: Path, label_map: dict[str, str] | None = None) -> CellTable:
    """Read labelled cells from QuPath GeoJSON (classified objects) or a point CSV (``x,y,class``)."""
    if path.name.lower().endswith(".csv"):
        from nuclass_qupath.cells.points_csv import read_points_csv

        cells = read_points_csv(path)
    else:
        from nuclass_qupath.cells.geojson import read_cells_geojson

        cells = read_cells_geojson(path)
    if label_map:
        cells.labels = [label_map.get(str(label), label) if label is not None else None for label in cells.labels]
    keep = np.array([label is not None for label in cells.labels], dtype=bool)
    if not keep.all():
        logger.info("%s: %d of %d cells have no class and are not used", path.name, int((~keep).sum()), len(cells))
        cells = cells.subset(keep)
    return cells


def label_confidence(cells: CellTable) -> np.ndarray:
    """Return each cell's ``Label confidence`` measurement as float32, 1 where the cell has none."""
    weights = np.ones(len(cells), dtype=np.float32)
    for i, feature in enumerate(cells.features):
        confidence = ((feature or {}).get("properties", {}).get("measurements") or {}).get("Label confidence")
        if isinstance(confidence, (int, float)):
            weights[i] = float(confidence)
    return weights


def build_crop_set(
    images: Iterable[LabelledImage],
    config: ModelConfig,
    *,
    mpp: float | None = None,
    label_map: dict[str, str] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> CropSet:
    """Read every labelled image and cut crops of the cells whose class the model knows.

    The crops are cut on the stride grid of ``config``'s encoders, as the
    engine's exact mode cuts them; raises CellsError for labels outside the
    model's classes or when no labelled cell is found.
    """
    from nuclass_qupath.slides import open_slide

    class_index = {name: i for i, name in enumerate(config.class_names)}
    geometry = CropGeometry.from_config(config)
    parts = []
    unknown: dict[str, int] = {}
    images = list(images)
    for item in progress(images) if progress else images:
        cells = load_labelled_cells(item.labels_path, label_map)
        known = np.array([label in class_index for label in cells.labels], dtype=bool)
        for label in np.array(cells.labels, dtype=object)[~known]:
            unknown[label] = unknown.get(label, 0) + 1
        cells = cells.subset(known)
        if len(cells) == 0:
            continue
        with open_slide(item.image_path, mpp=mpp) as slide:
            from nuclass_qupath.engine.classify import check_centroids

            check_centroids(cells, slide)
            crops = extract_crops(slide, cells.centroids_px, geometry)
        labels = np.array([class_index[label] for label in cells.labels], dtype=np.int64)
        weights = label_confidence(cells)
        groups = np.full(len(cells), item.group, dtype=object)
        parts.append((crops.local, crops.context, crops.local_centres_px, crops.context_centres_px, labels, weights, groups))
    if unknown:
        raise CellsError(
            "labels not among the model's classes "
            + ", ".join(f"{name!r} ({count} cells)" for name, count in sorted(unknown.items()))
            + f"; the classes are {config.class_names}. Add them with --classes or map them with --label-map."
        )
    if not parts:
        raise CellsError("no labelled cells found in the training images")
    arrays = [np.concatenate(p) for p in zip(*parts)]
    crop_set = CropSet(*arrays, class_names=list(config.class_names), geometry=geometry)
    logger.info(
        "cut %d cells from %d images: crops %d px at %.3g µm/px, contexts %d px at %.3g µm/px",
        len(crop_set), len(parts), geometry.local_size_px, geometry.mpp, geometry.context_size_px, geometry.context_mpp,
    )
    return crop_set

"""Labelled cells to training crops.

A training example is a cell's local crop and its context, cut exactly as the
engine's exact mode cuts them, with an integer label, a weight (label
confidence) and a group (the slide it came from, for splits by slide).

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
from nuclass_qupath.engine.classify import read_centred
from nuclass_qupath.errors import CellsError, ModelError
from nuclass_qupath.model.config import ModelConfig

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
    memory. The images are read per batch by :meth:`get_batch`.
    """

    labels: np.ndarray
    weights: np.ndarray
    groups: np.ndarray
    class_names: list[str]

    def __len__(self) -> int: ...

    def get_batch(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the uint8 (B, H, W, 3) local crops and contexts of the examples at ``index``, in that order."""
        ...

    def subset(self, mask: np.ndarray) -> "CropSource": ...

    def class_counts(self) -> dict[str, int]: ...

    def check_geometry(self, config: ModelConfig) -> None:
        """Raise ModelError when the crops were not cut for ``config``'s geometry."""
        ...


@dataclass
class CropSet:
    """Training examples held in memory: crops, contexts, labels, weights and groups."""

    local: np.ndarray  # (N, crop + 2 margin, same, 3) uint8
    context: np.ndarray  # (N, encoder px + 2 margin, same, 3) uint8
    labels: np.ndarray  # (N,) int64 index into class_names
    weights: np.ndarray  # (N,) float32
    groups: np.ndarray  # (N,) str
    class_names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def get_batch(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return copies of the local crops and contexts at ``index`` (positions or a slice)."""
        return self.local[index], self.context[index]

    def subset(self, mask: np.ndarray) -> "CropSet":
        return CropSet(
            self.local[mask], self.context[mask], self.labels[mask], self.weights[mask], self.groups[mask], self.class_names
        )

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    def check_geometry(self, config: ModelConfig) -> None:
        """Raise ModelError when the arrays' sizes differ from ``config``'s crop and context sizes with margins."""
        local_px = config.local_crop_px + 2 * config.local_margin_px
        context_px = config.context_encoder_px + 2 * config.context_margin_px
        if self.local.shape[1:] != (local_px, local_px, 3) or self.context.shape[1:] != (context_px, context_px, 3):
            raise ModelError(
                f"the crops are {self.local.shape[1:3]} px and the contexts {self.context.shape[1:3]} px, but the "
                f"model configuration needs {local_px} and {context_px} px; cut them again with this configuration"
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


def extract_crops(slide, centroids_px: np.ndarray, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Cut each cell's local crop and context from ``slide``, as the engine's exact mode does.

    ``centroids_px`` are (N, 2) level-0 (x, y) in QuPath's frame. ``config``
    may be a :class:`ModelConfig` or anything with its geometry attributes
    (``mpp``, ``context_mpp``, ``local_crop_px``, ``local_margin_px``,
    ``context_encoder_px``, ``context_margin_px``), such as the store's
    :class:`~nuclass_qupath.training.store.StoreGeometry`.
    """
    local_scale = config.mpp / slide.mpp
    context_scale = config.context_mpp / slide.mpp
    n = len(centroids_px)
    local_px = config.local_crop_px + 2 * config.local_margin_px
    context_px = config.context_encoder_px + 2 * config.context_margin_px
    local = np.empty((n, local_px, local_px, 3), dtype=np.uint8)
    context = np.empty((n, context_px, context_px, 3), dtype=np.uint8)
    for i, centre in enumerate(centroids_px):
        local[i], _ = read_centred(slide, centre, local_scale, config.mpp, local_px)
        context[i], _ = read_centred(slide, centre, context_scale, config.context_mpp, context_px)
    return local, context


def build_crop_set(
    images: Iterable[LabelledImage],
    config: ModelConfig,
    *,
    mpp: float | None = None,
    label_map: dict[str, str] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> CropSet:
    """Read every labelled image and cut crops of the cells whose class the model knows."""
    from nuclass_qupath.slides import open_slide

    class_index = {name: i for i, name in enumerate(config.class_names)}
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
            local, context = extract_crops(slide, cells.centroids_px, config)
        labels = np.array([class_index[label] for label in cells.labels], dtype=np.int64)
        weights = label_confidence(cells)
        parts.append((local, context, labels, weights, np.full(len(cells), item.group, dtype=object)))
    if unknown:
        raise CellsError(
            "labels not among the model's classes "
            + ", ".join(f"{name!r} ({count} cells)" for name, count in sorted(unknown.items()))
            + f"; the classes are {config.class_names}. Add them with --classes or map them with --label-map."
        )
    if not parts:
        raise CellsError("no labelled cells found in the training images")
    local, context, labels, weights, groups = (np.concatenate(p) for p in zip(*parts))
    return CropSet(local, context, labels, weights, groups, list(config.class_names))

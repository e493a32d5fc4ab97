"""Inputs of a training run: class lists, label maps and train/validation splits by image."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from nuclass_qupath.errors import CellsError
from nuclass_qupath.model.config import ClassSpec
from nuclass_qupath.training.dataset import LabelledImage, load_labelled_cells

logger = logging.getLogger(__name__)

# Distinct colours for classes that come without one (QuPath-like defaults first).
PALETTE = [
    (200, 0, 0), (150, 200, 150), (160, 90, 160), (250, 200, 0), (0, 128, 255),
    (255, 128, 0), (0, 160, 120), (120, 60, 20), (90, 90, 255), (255, 0, 255),
    (0, 200, 200), (128, 128, 0), (60, 60, 60), (255, 160, 200), (100, 160, 255),
]


def parse_class_specs(values: list[str]) -> list[ClassSpec]:
    """Parse ``name`` or ``name=r,g,b`` items into class specs, filling missing colours from a palette."""
    specs = []
    for i, value in enumerate(values):
        name, _, color_text = value.partition("=")
        name = name.strip()
        if not name:
            raise CellsError(f"empty class name in --classes item {value!r}")
        if color_text:
            try:
                color = tuple(int(c) for c in color_text.split(","))
            except ValueError as exc:
                raise CellsError(f"invalid colour in --classes item {value!r}; expected name=r,g,b") from exc
            if len(color) != 3 or any(not 0 <= c <= 255 for c in color):
                raise CellsError(f"invalid colour in --classes item {value!r}; expected three values 0-255")
        else:
            color = PALETTE[i % len(PALETTE)]
        specs.append(ClassSpec(name=name, color=color))
    return specs


def read_label_map(path: Path) -> dict[str, str]:
    """Read a YAML mapping of raw labels to class names (``0: tumor_any``)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CellsError(f"label map not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise CellsError(f"label map {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or not data:
        raise CellsError(f"label map {path} must be a mapping of labels to class names, e.g. '0: Tumor'")
    return {str(k): str(v) for k, v in data.items()}


def classes_from_labels(images: list[LabelledImage], label_map: dict[str, str] | None) -> list[ClassSpec]:
    """Class list made of every label found, in the label map's order, else sorted by name."""
    found: set[str] = set()
    for item in images:
        found.update(label for label in load_labelled_cells(item.labels_path, label_map).labels if label)
    if label_map:
        names = [name for name in dict.fromkeys(label_map.values()) if name in found]
        names += sorted(found - set(names))
    else:
        names = sorted(found)
    if len(names) < 2:
        raise CellsError(f"training needs at least two classes, the labels hold {names}")
    return parse_class_specs(names)


def split_by_image(
    images: list[LabelledImage], *, val_names: list[str] | None, val_fraction: float, seed: int
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """Split images (never cells) into training and validation sets."""
    if val_names:
        wanted = set(val_names)
        known = {item.group for item in images}
        missing = sorted(wanted - known)
        if missing:
            raise CellsError(f"validation images not found among the training images: {missing}")
        val = [item for item in images if item.group in wanted]
    else:
        if val_fraction <= 0:
            return images, []
        rng = np.random.default_rng(seed)
        n_val = max(1, round(len(images) * val_fraction))
        if n_val >= len(images):
            raise CellsError(f"{len(images)} images are too few to hold out {val_fraction:.0%} for validation")
        chosen = set(rng.choice(len(images), size=n_val, replace=False).tolist())
        val = [item for i, item in enumerate(images) if i in chosen]
    train = [item for item in images if item not in val]
    if not train:
        raise CellsError("no training images left after the validation split")
    logger.info("split by image: %d training, %d validation images", len(train), len(val))
    return train, val

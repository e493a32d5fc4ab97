"""Helpers for the QuPath results tests: real QuPath exports and stand-in predictions.

The stand-in "model" sorts nuclei into three size classes from QuPath's own
``Nucleus: Area`` measurement. It is not a classifier; it gives every cell a
deterministic, plausible probability vector so that the writing and merging
code can be checked on real QuPath objects without model weights.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np

from nuclass_qupath.cells.table import CellTable

STAND_IN_CLASSES = [
    ("Small nucleus (area stand-in)", (0, 160, 255)),
    ("Medium nucleus (area stand-in)", (40, 200, 40)),
    ("Large nucleus (area stand-in)", (230, 60, 30)),
]
STAND_IN_MODEL_ID = "area-bins-stand-in-v1"
# Bin centres of the nucleus area in µm² (CMU-1 cells range from 10 to about 150 µm²).
_AREA_CENTRES_UM2 = np.array([15.0, 30.0, 60.0])


def load_export(shared_data: Path, project: str, image_file_name: str) -> list[dict]:
    """Return the features of QuPath's GeoJSON export of one image of a sample project."""
    path = shared_data / "qupath" / project / "export" / f"{image_file_name}.geojson"
    return json.loads(path.read_text(encoding="utf-8"))["features"]


def area_stand_in_predictions(cells: CellTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(probs, confidence, gate)`` of the nucleus-area stand-in for cells read from QuPath.

    Probabilities are a softmax of the negative log-distance of each nucleus
    area to the three bin centres; cells without ``Nucleus: Area`` get equal
    probabilities.
    """
    areas = np.array(
        [
            ((feature or {}).get("properties", {}).get("measurements", {}) or {}).get("Nucleus: Area", np.nan)
            for feature in cells.features
        ],
        dtype=np.float64,
    )
    logits = -np.abs(np.log(areas[:, None]) - np.log(_AREA_CENTRES_UM2[None, :])) / 0.3
    logits = np.where(np.isfinite(logits), logits, 0.0)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    confidence = probs.max(axis=1)
    gate = np.clip(areas / 100.0, 0.0, 1.0)
    gate = np.where(np.isfinite(gate), gate, 0.5)
    return probs, confidence, gate


def copy_project(source: Path, target: Path) -> Path:
    """Copy a read-only sample project to ``target`` and make the copy writable."""
    shutil.copytree(source, target, copy_function=shutil.copyfile)
    for folder, _, files in os.walk(target):
        os.chmod(folder, os.stat(folder).st_mode | stat.S_IWUSR | stat.S_IXUSR)
        for name in files:
            file = Path(folder) / name
            os.chmod(file, os.stat(file).st_mode | stat.S_IWUSR)
    return target

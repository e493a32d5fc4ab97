"""Slides with labelled cells, as listed in a manifest, read into one shape.

A manifest is a CSV with a header and one row per slide::

    slide,labels,organ,cohort,mpp,name
    he/S1.svs,labels/S1.csv,breast,site-A,,
    he/S2.ome.tif,labels/S2.geojson,breast,site-B,0.2125,S2

``slide`` and ``labels`` are required, and relative paths are resolved against
the manifest's folder. ``organ`` and ``cohort`` are free text recorded per
cell. ``mpp`` overrides the slide's pixel size, which PNG tiles need. ``name``
is the slide's name in the store (default: the slide file name without its
suffix) and must be unique.

A labels file is one of:

* a label table from ``nuclass-qupath xenium-labels``: ``cell_id, x_px, y_px,
  class, confidence, reason``. Rows with an empty class or with a reason (why
  the cell is unlabelled) are skipped;
* any CSV with ``x``/``y`` (or ``x_px``/``y_px``) and ``class`` columns, and
  optionally ``confidence`` and ``id``/``cell_id``;
* QuPath GeoJSON of classified objects, with an optional ``Label confidence``
  measurement.

All coordinates are level-0 pixels of the slide in QuPath's frame.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nuclass_qupath.cells.table import CellTable
from nuclass_qupath.errors import CellsError

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("slide", "labels", "organ", "cohort", "mpp", "name")
_CONFIDENCE_NAMES = ("confidence", "label_confidence", "label confidence")
_REASON_NAMES = ("reason",)


@dataclass(frozen=True)
class LabelSource:
    """One slide and the file of labelled cells on it.

    Attributes
    ----------
    slide_path, labels_path
        The slide, and its labelled cells in level-0 px of that slide.
    name
        The slide's name in the store; unique among the sources of one store.
    organ, cohort
        Free text recorded for each of the slide's cells (may be empty).
    mpp
        µm/px that overrides the slide's metadata, or None to use the metadata.
    """

    slide_path: Path
    labels_path: Path
    name: str
    organ: str = ""
    cohort: str = ""
    mpp: float | None = None

    def record(self) -> dict:
        """Return the source as a JSON-ready dict, as stored in the store's attributes."""
        return {
            "name": self.name,
            "slide": str(self.slide_path),
            "labels": str(self.labels_path),
            "organ": self.organ,
            "cohort": self.cohort,
            "mpp": self.mpp,
        }


@dataclass
class LabelledCells:
    """Labelled cells of one slide: ids, level-0 (x, y) centroids, class names and confidences (0-1)."""

    ids: list[str]
    centroids_px: np.ndarray
    labels: list[str]
    confidence: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray) -> "LabelledCells":
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return LabelledCells(
            [self.ids[i] for i in index], self.centroids_px[index], [self.labels[i] for i in index], self.confidence[index]
        )


def slide_name(path: Path) -> str:
    """Return the default store name of a slide: its file name without the suffix."""
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def check_unique_names(sources: list[LabelSource]) -> None:
    """Raise CellsError when two sources share a slide name."""
    seen: dict[str, Path] = {}
    for source in sources:
        if source.name in seen:
            raise CellsError(
                f"two slides are named {source.name!r} ({seen[source.name]} and {source.slide_path}); "
                "give each a unique name in the manifest's 'name' column"
            )
        seen[source.name] = source.slide_path


def _parse_mpp(text: str, where: str) -> float | None:
    if not text.strip():
        return None
    try:
        mpp = float(text)
    except ValueError as exc:
        raise CellsError(f"{where}: mpp {text!r} is not a number; write µm/px such as 0.25, or leave it empty") from exc
    if not np.isfinite(mpp) or mpp <= 0:
        raise CellsError(f"{where}: mpp must be a positive number of µm/px, got {text!r}")
    return mpp


def read_manifest(
    path: str | Path, *, organ: str = "", cohort: str = "", mpp: float | None = None
) -> list[LabelSource]:
    """Read a manifest CSV of slides and label files.

    ``organ``, ``cohort`` and ``mpp`` fill rows that leave those columns
    empty. Raises CellsError naming the line for a missing column, file or
    duplicate slide name.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise CellsError(f"manifest not found: {path}") from exc
    rows = list(csv.reader(line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")))
    if not rows:
        raise CellsError(f"manifest {path} is empty; expected a header 'slide,labels,organ,cohort' and one row per slide")
    header = [h.strip().lower() for h in rows[0]]
    missing = [name for name in ("slide", "labels") if name not in header]
    unknown = [name for name in header if name not in MANIFEST_COLUMNS]
    if missing:
        raise CellsError(f"manifest {path} has no {' or '.join(missing)} column; its header is {rows[0]}")
    if unknown:
        raise CellsError(f"manifest {path} has unknown columns {unknown}; known columns are {list(MANIFEST_COLUMNS)}")

    sources = []
    for line_number, row in enumerate(rows[1:], start=2):
        where = f"{path}, line {line_number}"
        values = dict(zip(header, (cell.strip() for cell in row)))
        if not values.get("slide") or not values.get("labels"):
            raise CellsError(f"{where}: slide and labels must both be given, found {row}")
        slide_path = (path.parent / values["slide"]).resolve()
        labels_path = (path.parent / values["labels"]).resolve()
        for what, file in (("slide", slide_path), ("labels file", labels_path)):
            if not file.is_file():
                raise CellsError(f"{where}: {what} not found: {file}")
        row_mpp = _parse_mpp(values.get("mpp", ""), where)
        sources.append(
            LabelSource(
                slide_path=slide_path,
                labels_path=labels_path,
                name=values.get("name") or slide_name(slide_path),
                organ=values.get("organ") or organ,
                cohort=values.get("cohort") or cohort,
                mpp=row_mpp if row_mpp is not None else mpp,
            )
        )
    if not sources:
        raise CellsError(f"manifest {path} lists no slides")
    check_unique_names(sources)
    logger.info("manifest %s: %d slides", path, len(sources))
    return sources


def _column(header: list[str], names: tuple[str, ...]) -> str | None:
    lowered = {h.strip().lower(): h for h in header}
    for name in names:
        if name in lowered:
            return lowered[name]
    return None


def _read_table_csv(path: Path, label_map: dict[str, str] | None) -> LabelledCells:
    """Read a CSV with a confidence column (such as a Xenium label table)."""
    import pandas as pd

    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    header = list(table.columns)
    x_col = _column(header, ("x_px", "x", "centroid_x"))
    y_col = _column(header, ("y_px", "y", "centroid_y"))
    class_col = _column(header, ("class", "label", "class_name"))
    if x_col is None or y_col is None or class_col is None:
        raise CellsError(f"{path}: header {header} lacks x, y or class columns; expected cell_id,x_px,y_px,class,confidence")
    id_col = _column(header, ("cell_id", "id", "object_id"))
    confidence_col = _column(header, _CONFIDENCE_NAMES)
    reason_col = _column(header, _REASON_NAMES)

    labels = table[class_col].str.strip()
    keep = labels != ""
    if reason_col is not None:
        keep &= table[reason_col].str.strip() == ""
    table = table.loc[keep]
    labels = labels.loc[keep]
    xy = np.column_stack([pd.to_numeric(table[x_col], errors="coerce"), pd.to_numeric(table[y_col], errors="coerce")])
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise CellsError(
            f"{path}: {int(bad.sum())} labelled rows have no numeric x, y; the first is cell "
            f"{table.iloc[first][id_col] if id_col else first!r}"
        )
    confidence = np.ones(len(table), dtype=np.float32)
    if confidence_col is not None:
        # An empty confidence means none was given, which counts as certain.
        values = pd.to_numeric(table[confidence_col].replace("", "1"), errors="coerce").to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            raise CellsError(f"{path}: column {confidence_col!r} has values that are not numbers")
        confidence = values.astype(np.float32)
    ids = table[id_col].tolist() if id_col else [f"{path.name}:{i}" for i in table.index]
    names = [label_map.get(label, label) for label in labels] if label_map else labels.tolist()
    logger.info("read %d labelled cells of %d rows from %s", len(names), int(keep.size), path.name)
    return LabelledCells([str(i) for i in ids], xy.astype(np.float64), names, confidence)


def _csv_header(path: Path) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as handle:
        for row in csv.reader(handle):
            if row and "".join(row).strip() and not row[0].lstrip().startswith("#"):
                return [cell.strip().lower() for cell in row]
    return []


def read_labelled_cells(path: str | Path, label_map: dict[str, str] | None = None) -> LabelledCells:
    """Read the labelled cells of one slide, skipping unlabelled ones.

    ``label_map`` renames raw labels (``{"0": "Tumor"}``) before anything
    else. Confidence comes from a ``confidence`` column or a ``Label
    confidence`` measurement, and is 1 where none is given.
    """
    path = Path(path)
    if not path.is_file():
        raise CellsError(f"labels file not found: {path}")
    if path.name.lower().endswith(".csv") and any(h in _CONFIDENCE_NAMES + _REASON_NAMES for h in _csv_header(path)):
        return _read_table_csv(path, label_map)

    from nuclass_qupath.training.dataset import label_confidence, load_labelled_cells

    cells: CellTable = load_labelled_cells(path, label_map)
    return LabelledCells(list(cells.ids), cells.centroids_px, [str(label) for label in cells.labels], label_confidence(cells))


def class_colours_beside(labels_path: Path) -> dict[str, tuple[int, int, int]]:
    """Return class colours from the summary JSON that ``xenium-labels`` writes beside a label table.

    The summary of ``labels.csv`` is ``labels.summary.json``; without one the result is empty.
    """
    summary_path = labels_path.with_suffix(".summary.json")
    if not summary_path.is_file():
        return {}
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("ignoring class colours in %s: %s", summary_path, exc)
        return {}
    colours = {}
    for entry in summary.get("classes") or []:
        color = entry.get("color") if isinstance(entry, dict) else None
        if isinstance(color, list) and len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color):
            colours[str(entry.get("name"))] = tuple(color)
    return colours

"""Read labelled cell points from CSV files.

Each row is one cell: ``x, y, class`` in level-0 pixels of the image the labels
belong to, origin top-left. A header line is optional. Without one the columns
are x, y and (optionally) class, and further columns are ignored. With one, the
columns are found by name (``x``, ``y``, ``class``/``label``, ``id``), so extra
columns may come in any order. Numeric classes, as in NuCLS label files, can be
translated to names with a label map (``{0: "tumor_any", ...}``).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from nuclass_qupath.cells.geojson_read import assign_unique_ids
from nuclass_qupath.cells.table import CellTable
from nuclass_qupath.errors import CellsError

logger = logging.getLogger(__name__)

# Header names accepted for each column, compared in lower case.
_X_NAMES = ("x", "x_px", "centroid_x", "centroid x", "x_centroid")
_Y_NAMES = ("y", "y_px", "centroid_y", "centroid y", "y_centroid")
_CLASS_NAMES = ("class", "label", "class_name", "classification", "cell_type", "type")
_ID_NAMES = ("id", "cell_id", "object_id", "uuid")


def read_label_map(path: str | os.PathLike) -> dict[int, str]:
    """Read a YAML label map of integer class codes to class names, such as ``0: "tumor_any"``.

    Raises
    ------
    CellsError
        If the file is missing, not YAML, or not a mapping of integers to names.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CellsError(f"label map not found: {path}; check the path") from exc
    except yaml.YAMLError as exc:
        raise CellsError(f"label map {path} is not valid YAML: {exc}") from exc
    return _validate_label_map(data, str(path))


def _validate_label_map(data: object, source: str) -> dict[int, str]:
    if not isinstance(data, Mapping) or not data:
        raise CellsError(f"label map {source} must map integer codes to class names, like 0: tumor_any")
    label_map: dict[int, str] = {}
    for code, name in data.items():
        if isinstance(code, bool) or not isinstance(code, int) or not isinstance(name, str) or not name.strip():
            raise CellsError(
                f"label map {source}: entry {code!r}: {name!r} is not an integer code with a class name; "
                "write entries like 0: tumor_any"
            )
        label_map[code] = name.strip()
    return label_map


def _column_index(header: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _translate(value: str, label_map: Mapping[int, str] | None, where: str) -> str | None:
    """Return the class name for a raw CSV value: mapped when numeric and a label map is given."""
    value = value.strip()
    if not value:
        return None
    if label_map is None:
        return value
    try:
        number = float(value)
    except ValueError:
        if value in label_map.values():
            return value
        raise CellsError(
            f"{where}: class {value!r} is neither a code nor a name of the label map "
            f"(codes {sorted(label_map)}); fix the row or the label map"
        ) from None
    if not number.is_integer() or int(number) not in label_map:
        raise CellsError(
            f"{where}: class code {value} is not in the label map (codes {sorted(label_map)}); "
            "add it to the label map or fix the row"
        )
    return label_map[int(number)]


def read_points_csv(
    path: str | os.PathLike,
    *,
    label_map: Mapping[int, str] | str | os.PathLike | None = None,
) -> CellTable:
    """Read cell points with optional classes from a CSV file into a :class:`CellTable`.

    Parameters
    ----------
    path
        CSV file (comma- or tab-separated) with one cell per row: x, y in
        level-0 pixels and an optional class. Blank lines and lines starting
        with ``#`` are skipped.
    label_map
        Integer class code to class name, as a dict or the path of a YAML file
        (see :func:`read_label_map`). Without it, classes are kept as written.

    Returns
    -------
    CellTable
        Centroids from the file, labels (None where the class is empty or
        there is no class column), ids from an ``id`` column or new UUID4s,
        and no geometries.

    Raises
    ------
    CellsError
        If the file is missing or empty, the header lacks x or y, or a row has
        a missing or non-numeric coordinate or an unknown class code. The
        message names the file and line.
    """
    path = Path(path)
    source = str(path)
    if label_map is not None and not isinstance(label_map, Mapping):
        label_map = read_label_map(label_map)
    elif label_map is not None:
        label_map = _validate_label_map(label_map, "given as a dict")

    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise CellsError(f"points CSV not found: {path}; check the path") from exc
    except UnicodeDecodeError as exc:
        raise CellsError(f"{path} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise CellsError(f"could not read {path}: {exc}") from exc

    lines = text.splitlines()
    first = next((line for line in lines if line.strip() and not line.lstrip().startswith("#")), None)
    if first is None:
        raise CellsError(f"{path} has no rows; expected lines of x,y,class")
    delimiter = "\t" if "\t" in first and "," not in first else ","

    xs: list[float] = []
    ys: list[float] = []
    labels: list[str | None] = []
    ids: list[str | None] = []
    x_col, y_col, class_col, id_col = 0, 1, 2, None
    header_seen = False

    for line_number, row in enumerate(csv.reader(lines, delimiter=delimiter), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        where = f"{path}, line {line_number}"

        if not header_seen and not xs:
            header_seen = True
            if len(row) >= 2 and not (_is_number(row[0]) and _is_number(row[1])):
                x_found, y_found = _column_index(row, _X_NAMES), _column_index(row, _Y_NAMES)
                if x_found is None or y_found is None:
                    raise CellsError(
                        f"{where}: header {row} has no x and y columns; name them 'x' and 'y', "
                        "or leave out the header and write x,y,class"
                    )
                x_col, y_col = x_found, y_found
                class_col = _column_index(row, _CLASS_NAMES)
                id_col = _column_index(row, _ID_NAMES)
                continue

        needed = max(x_col, y_col) + 1
        if len(row) < needed:
            raise CellsError(f"{where}: expected at least {needed} columns (x, y), found {len(row)}: {row}")
        try:
            x = float(row[x_col])
            y = float(row[y_col])
        except ValueError as exc:
            raise CellsError(
                f"{where}: x and y must be numbers, found {row[x_col]!r}, {row[y_col]!r}"
            ) from exc
        if not (math.isfinite(x) and math.isfinite(y)):
            raise CellsError(f"{where}: x and y must be finite, found {x}, {y}")

        raw_class = row[class_col] if class_col is not None and class_col < len(row) else ""
        raw_id = row[id_col].strip() if id_col is not None and id_col < len(row) else ""
        xs.append(x)
        ys.append(y)
        labels.append(_translate(raw_class, label_map, where))
        ids.append(raw_id or None)

    if not xs:
        raise CellsError(f"{path} has a header but no rows; expected lines of x,y,class")

    table = CellTable(
        ids=assign_unique_ids(ids, source=source),
        centroids_px=np.column_stack([xs, ys]),
        labels=labels,
    )
    logger.info(
        "read %d points from %s (%d labelled)", len(table), source, sum(label is not None for label in labels)
    )
    return table

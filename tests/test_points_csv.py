"""Point CSVs: NuCLS label files without a header, labelled files with one, and bad rows."""

from __future__ import annotations

import collections
import csv
from pathlib import Path

import numpy as np
import pytest

from nuclass_qupath.cells.geojson import read_label_map, read_points_csv
from nuclass_qupath.errors import CellsError


@pytest.fixture(scope="module")
def nucls_dir(shared_data: Path) -> Path:
    return shared_data / "nucls"


@pytest.fixture(scope="module")
def nucls_labels(nucls_dir: Path) -> list[Path]:
    return sorted(nucls_dir.glob("*/labels/*.csv"))


def test_nucls_file_without_header(nucls_labels):
    path = nucls_labels[0]
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    cells = read_points_csv(path)
    assert len(cells) == len(rows)
    np.testing.assert_array_equal(cells.centroids_px, [[float(r[0]), float(r[1])] for r in rows])
    assert cells.labels == [r[2] for r in rows]
    assert len(set(cells.ids)) == len(rows)
    assert all(g is None for g in cells.geometries)


def test_nucls_label_map_translates_all_files(nucls_dir, nucls_labels):
    label_map = read_label_map(nucls_dir / "label_map.yaml")
    counts: collections.Counter[str] = collections.Counter()
    for path in nucls_labels:
        counts.update(read_points_csv(path, label_map=label_map).labels)
    assert label_map == {0: "tumor_any", 1: "nonTIL_stromal", 2: "sTIL", 3: "other_nucleus"}
    assert counts == {"sTIL": 323, "nonTIL_stromal": 95, "tumor_any": 89, "other_nucleus": 77}


def test_label_map_given_as_path(nucls_dir, nucls_labels):
    cells = read_points_csv(nucls_labels[0], label_map=nucls_dir / "label_map.yaml")
    assert set(cells.labels) <= {"tumor_any", "nonTIL_stromal", "sTIL", "other_nucleus"}


def test_header_with_id_and_extra_columns(tmp_path):
    path = tmp_path / "labelled.csv"
    path.write_text("id,score,Y,X,Label\ncell-1,0.5,20.5,10.25,Tumor\ncell-2,0.1,40,30,\n# a comment\n\ncell-3,0.2,60,50,Stroma\n")
    cells = read_points_csv(path)
    assert cells.ids == ["cell-1", "cell-2", "cell-3"]
    np.testing.assert_array_equal(cells.centroids_px, [[10.25, 20.5], [30, 40], [50, 60]])
    assert cells.labels == ["Tumor", None, "Stroma"]


def test_tab_separated_without_class(tmp_path):
    path = tmp_path / "points.tsv"
    path.write_text("x\ty\n1\t2\n3\t4\n")
    cells = read_points_csv(path)
    np.testing.assert_array_equal(cells.centroids_px, [[1, 2], [3, 4]])
    assert cells.labels == [None, None]


def test_label_map_accepts_names_and_float_codes(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_text("1,2,0\n3,4,sTIL\n5,6,2.0\n")
    cells = read_points_csv(path, label_map={0: "tumor_any", 2: "sTIL"})
    assert cells.labels == ["tumor_any", "sTIL", "sTIL"]


def test_bad_coordinate_names_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("1,2,0\n3,4,1\nfive,6,1\n")
    with pytest.raises(CellsError, match=r"bad.csv, line 3: x and y must be numbers, found 'five', '6'"):
        read_points_csv(path)


def test_short_row_names_line(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("1,2,0\n\n7\n")
    with pytest.raises(CellsError, match=r"short.csv, line 3: expected at least 2 columns"):
        read_points_csv(path)


def test_unknown_class_code_names_line(tmp_path):
    path = tmp_path / "codes.csv"
    path.write_text("1,2,0\n3,4,7\n")
    with pytest.raises(CellsError, match=r"codes.csv, line 2: class code 7 is not in the label map \(codes \[0, 1\]\)"):
        read_points_csv(path, label_map={0: "a", 1: "b"})


def test_header_without_xy_columns(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("col_a,col_b,class\n1,2,3\n")
    with pytest.raises(CellsError, match=r"line 1: header \['col_a', 'col_b', 'class'\] has no x and y columns"):
        read_points_csv(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(CellsError, match="points CSV not found"):
        read_points_csv(tmp_path / "absent.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("\n# only a comment\n")
    with pytest.raises(CellsError, match="has no rows"):
        read_points_csv(empty)
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("x,y,class\n")
    with pytest.raises(CellsError, match="has a header but no rows"):
        read_points_csv(header_only)


def test_invalid_label_map(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text("tumor: 0\n")
    with pytest.raises(CellsError, match=r"entry 'tumor': 0 is not an integer code with a class name"):
        read_label_map(path)

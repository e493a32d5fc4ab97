"""``export-geojson``: our export of each sample image against QuPath 0.6.0's own export of it."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely

from nuclass_qupath.cli import main
from nuclass_qupath.errors import ProjectError
from nuclass_qupath.qupath.batch import UnknownImageError
from nuclass_qupath.qupath.export import export_project_geojson, safe_file_name
from qupath_results_fixtures import copy_project

EXPORTED_IMAGES = [
    # 3803 objects: a few seconds on one free CPU core.
    pytest.param("cmu1_cells", "CMU-1-Small-Region.svs", marks=pytest.mark.slow),
    ("mixed_objects", "CMU-1-Small-Region.svs"),
    ("mixed_objects", "cmu1_crop_rgb.tif"),
    ("missing_image", "deleted_after_save.tif"),
]
# QuPath puts every vertex on a 0.01 px grid; the reader may land one step away.
GRID_TOLERANCE_PX = 0.0100001
_NESTING = {"Point": 0, "LineString": 1, "MultiPoint": 1, "Polygon": 2, "MultiLineString": 2, "MultiPolygon": 3}


def _rings(coordinates: list, nesting: int) -> list[np.ndarray]:
    """Return one ``(n, 2)`` array per ring, line or point list of GeoJSON coordinates."""
    if nesting <= 1:
        return [np.asarray(coordinates, dtype=np.float64).reshape(-1, 2)]
    return [ring for part in coordinates for ring in _rings(part, nesting - 1)]


def assert_same_geometry(ours: dict, theirs: dict, where: str) -> None:
    """Assert two GeoJSON geometries have the same type, rings and vertices, within QuPath's grid step."""
    assert ours["type"] == theirs["type"], where
    assert ours.get("isEllipse") == theirs.get("isEllipse"), where
    nesting = _NESTING[theirs["type"]]
    our_rings = _rings(ours["coordinates"], nesting)
    their_rings = _rings(theirs["coordinates"], nesting)
    assert [r.shape for r in our_rings] == [r.shape for r in their_rings], where
    for mine, reference in zip(our_rings, their_rings):
        np.testing.assert_allclose(mine, reference, rtol=0, atol=GRID_TOLERANCE_PX, err_msg=where)


def assert_features_match(ours: list[dict], theirs: list[dict]) -> None:
    """Assert our features equal QuPath's export feature by feature.

    Ids, object types, names, classes, colours, metadata and measurements
    must be equal, except that QuPath's NaN measurements are absent from ours
    (JSON has no NaN). Geometries must agree within :data:`GRID_TOLERANCE_PX`.
    """
    assert [f["id"] for f in ours] == [f["id"] for f in theirs]
    for mine, reference in zip(ours, theirs):
        where = reference["id"]
        assert mine.keys() == reference.keys(), where
        their_props = dict(reference["properties"])
        their_measurements = their_props.pop("measurements", None)
        my_props = dict(mine["properties"])
        my_measurements = my_props.pop("measurements", None)
        assert my_props == their_props, where
        if their_measurements is not None:
            finite = {k: v for k, v in their_measurements.items() if not (isinstance(v, float) and math.isnan(v))}
            assert my_measurements == finite, where
            assert list(my_measurements) == list(finite), where
        for key in ("geometry", "nucleusGeometry"):
            if key in reference:
                assert_same_geometry(mine[key], reference[key], f"{where} {key}")


def _load(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def _qupath_export(shared_data: Path, project: str, image: str) -> list[dict]:
    return _load(shared_data / "qupath" / project / "export" / f"{image}.geojson")["features"]


@pytest.mark.parametrize(("project_name", "image_name"), EXPORTED_IMAGES)
def test_export_matches_qupath_export(shared_data: Path, tmp_path: Path, project_name: str, image_name: str) -> None:
    results = export_project_geojson(shared_data / "qupath" / project_name, tmp_path, image_names=[image_name])

    assert [r.image_name for r in results] == [image_name]
    assert results[0].error is None
    assert results[0].path == tmp_path / f"{image_name}.geojson"
    collection = _load(results[0].path)
    assert collection["type"] == "FeatureCollection"
    expected = _qupath_export(shared_data, project_name, image_name)
    assert_features_match(collection["features"], expected)
    assert sum(results[0].object_counts.values()) == len(expected)


def test_export_geometries_equal_qupath_shapes(shared_data: Path, tmp_path: Path) -> None:
    # The self-intersecting polygon, holes, ellipses, lines and points of mixed_objects, compared as shapes.
    [result] = export_project_geojson(shared_data / "qupath" / "mixed_objects", tmp_path, image_names=["CMU-1-Small-Region.svs"])
    ours = [json.dumps(f["geometry"]) for f in _load(result.path)["features"]]
    theirs = [json.dumps(f["geometry"]) for f in _qupath_export(shared_data, "mixed_objects", "CMU-1-Small-Region.svs")]

    distances = shapely.hausdorff_distance(shapely.from_geojson(ours), shapely.from_geojson(theirs))

    assert distances.max() <= GRID_TOLERANCE_PX


def test_export_gzip_equals_plain(shared_data: Path, tmp_path: Path) -> None:
    project = shared_data / "qupath" / "mixed_objects"
    [plain] = export_project_geojson(project, tmp_path / "plain", image_names=["cmu1_crop_rgb.tif"])
    [packed] = export_project_geojson(project, tmp_path / "gz", image_names=["cmu1_crop_rgb.tif"], compress=True)

    assert packed.path.name == "cmu1_crop_rgb.tif.geojson.gz"
    assert packed.path.read_bytes()[:2] == b"\x1f\x8b"
    assert _load(packed.path) == _load(plain.path)


def test_export_object_types_filter(shared_data: Path, tmp_path: Path) -> None:
    [result] = export_project_geojson(
        shared_data / "qupath" / "mixed_objects", tmp_path, image_names=["CMU-1-Small-Region.svs"],
        object_types=["cell", "tile"],
    )
    features = _load(result.path)["features"]
    expected = [
        f for f in _qupath_export(shared_data, "mixed_objects", "CMU-1-Small-Region.svs")
        if f["properties"]["objectType"] in ("cell", "tile")
    ]

    assert result.object_counts == {"cell": 158, "tile": 12}
    assert_features_match(features, expected)


def test_export_rejects_unknown_object_type(shared_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match="unknown object types"):
        export_project_geojson(shared_data / "qupath" / "mixed_objects", tmp_path, object_types=["nucleus"])


def test_export_unknown_image_lists_names(shared_data: Path, tmp_path: Path) -> None:
    with pytest.raises(UnknownImageError, match="'cmu1_crop_rgb.tif'") as caught:
        export_project_geojson(shared_data / "qupath" / "mixed_objects", tmp_path, image_names=["nope.svs"])
    assert "'nope.svs'" in str(caught.value)


@pytest.mark.parametrize(
    ("image_name", "file_name"),
    [
        ("CMU-1-Small-Region.svs", "CMU-1-Small-Region.svs"),
        ("slide 1 - Series 2", "slide 1 - Series 2"),
        ("a/b\\c:d", "a_b_c_d"),
        ('what?*"<>|', "what_"),
        ("tab\there\nnewline", "tab_here_newline"),
        ("  trailing dots... ", "trailing dots"),
        ("CON", "_CON"),
        ("nul.tif", "_nul.tif"),
        ("///", "_"),
        ("", "image"),
        ("...", "image"),
        ("Größe µm 染色", "Größe µm 染色"),
    ],
)
def test_safe_file_name(image_name: str, file_name: str) -> None:
    assert safe_file_name(image_name) == file_name


def test_export_same_names_get_entry_ids(shared_data: Path, tmp_path: Path) -> None:
    # QuPath allows two images with one name; the second file gets its entry id.
    project = copy_project(shared_data / "qupath" / "mixed_objects", tmp_path / "project")
    qpproj = project / "project.qpproj"
    raw = json.loads(qpproj.read_text(encoding="utf-8"))
    raw["images"][1]["imageName"] = "same/name"
    raw["images"][0]["imageName"] = "same:name"
    qpproj.write_text(json.dumps(raw), encoding="utf-8")

    results = export_project_geojson(project, tmp_path / "out")

    assert [r.path.name for r in results] == ["same_name.geojson", "same_name (2).geojson"]
    assert [r.object_counts.get("tmaCore", 0) for r in results] == [0, 4]


def test_export_cli_reports_failed_image(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # A truncated data file fails that image only; the other one is written and the exit status is 1.
    project = copy_project(shared_data / "qupath" / "mixed_objects", tmp_path / "project")
    data_file = project / "data" / "1" / "data.qpdata"
    data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])

    status = main(["export-geojson", str(project), "-o", str(tmp_path / "out")])
    output = capsys.readouterr().out

    assert status == 1
    assert "CMU-1-Small-Region.svs: FAILED:" in output
    assert "cmu1_crop_rgb.tif: tmaCore 4, annotation 2, detection 3 -> " in output
    assert not (tmp_path / "out" / "CMU-1-Small-Region.svs.geojson").exists()
    assert (tmp_path / "out" / "cmu1_crop_rgb.tif.geojson").is_file()
    assert "2 images: 1 exported, 1 failed" in output


def test_export_cli_unknown_image_exits_2(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status = main(["export-geojson", str(shared_data / "qupath" / "tcga_no_mpp"), "-o", str(tmp_path), "--images", "x"])
    error = capsys.readouterr().err

    assert status == 2
    assert "no image named 'x'" in error
    assert "'TCGA-CR-7395-01A-01-TS1.svs'" in error


def test_export_cli_gzip_and_types(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    status = main([
        "export-geojson", str(shared_data / "qupath" / "tcga_no_mpp"), "-o", str(tmp_path),
        "--gzip", "--object-types", "detection",
    ])

    assert status == 0
    features = _load(tmp_path / "TCGA-CR-7395-01A-01-TS1.svs.geojson.gz")["features"]
    assert len(features) == 3
    assert {f["properties"]["objectType"] for f in features} == {"detection"}
    assert "detection 3" in capsys.readouterr().out


def test_export_project_without_images(shared_data: Path, tmp_path: Path) -> None:
    assert export_project_geojson(shared_data / "qupath" / "empty", tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_export_image_without_data_file(shared_data: Path, tmp_path: Path) -> None:
    # An image never saved in QuPath has no data.qpdata: an empty FeatureCollection, as QuPath would export.
    project = copy_project(shared_data / "qupath" / "tcga_no_mpp", tmp_path / "project")
    (project / "data" / "1" / "data.qpdata").unlink()
    shutil.rmtree(tmp_path / "out", ignore_errors=True)

    [result] = export_project_geojson(project, tmp_path / "out")

    assert result.error is None
    assert result.object_counts == {}
    assert _load(result.path) == {"type": "FeatureCollection", "features": []}

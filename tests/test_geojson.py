"""QuPath-dialect GeoJSON: reading QuPath 0.6.0's own exports, writing features QuPath imports."""

from __future__ import annotations

import collections
import copy
import gzip
import json
import logging
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import geojson
import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from nuclass_qupath.cells.geojson import (
    GeoJSONWriter,
    check_cells_in_image,
    geometry_to_geojson,
    iter_geojson_features,
    prediction_feature,
    read_cells_geojson,
    write_features,
)
from nuclass_qupath.cells.geojson_write import polygons_to_geojson
from nuclass_qupath.errors import CellsError

CMU1_EXPORT = "qupath/cmu1_cells/export/CMU-1-Small-Region.svs.geojson"
MIXED_EXPORT = "qupath/mixed_objects/export/CMU-1-Small-Region.svs.geojson"


@pytest.fixture(scope="module")
def cmu1_export(shared_data: Path) -> Path:
    return shared_data / CMU1_EXPORT


@pytest.fixture(scope="module")
def mixed_export(shared_data: Path) -> Path:
    return shared_data / MIXED_EXPORT


@pytest.fixture(scope="module")
def cmu1_raw(cmu1_export: Path) -> list[dict]:
    return json.loads(cmu1_export.read_text(encoding="utf-8"))["features"]


@pytest.fixture(scope="module")
def cmu1_cells(cmu1_export: Path):
    return read_cells_geojson(cmu1_export)


def _write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _square(x: float, y: float, size: float = 10.0) -> dict:
    return {
        "type": "Polygon",
        "coordinates": [[[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]],
    }


def _detection(feature_id: str | None, geometry: dict, **properties) -> dict:
    feature = {"type": "Feature", "geometry": geometry, "properties": {"objectType": "detection", **properties}}
    if feature_id is not None:
        feature["id"] = feature_id
    return feature


# Reading QuPath's exports


def test_read_cmu1_keeps_cells_skips_tissue(cmu1_cells, cmu1_raw):
    cell_features = [f for f in cmu1_raw if f["properties"]["objectType"] == "cell"]
    assert len(cmu1_cells) == 3802
    assert cmu1_cells.ids == [f["id"] for f in cell_features]
    assert all(label is None for label in cmu1_cells.labels)
    assert all(f["properties"]["objectType"] == "cell" for f in cmu1_cells.features)


def test_read_cmu1_centroids_are_nucleus_centroids(cmu1_cells, cmu1_raw):
    cell_features = [f for f in cmu1_raw if f["properties"]["objectType"] == "cell"]
    nuclei = [shape(f["nucleusGeometry"]) for f in cell_features]
    expected = np.array([[n.centroid.x, n.centroid.y] for n in nuclei])
    np.testing.assert_allclose(cmu1_cells.centroids_px, expected, atol=1e-9)
    assert cmu1_cells.geometries[0].equals_exact(nuclei[0], 1e-9)
    cell_outline = shape(cell_features[0]["geometry"])
    assert not cmu1_cells.geometries[0].equals_exact(cell_outline, 1e-3)


def test_read_mixed_objects_default_classes(mixed_export):
    cells = read_cells_geojson(mixed_export)
    counts = collections.Counter(cells.labels)
    types = collections.Counter(f["properties"]["objectType"] for f in cells.features)
    assert types == {"cell": 158, "detection": 6}
    assert counts == {
        "Immune cells": 79,
        "Tumor": 78,
        "Stroma": 1,
        "Tumor: Positive": 2,
        "Tumor: Negative": 2,
        None: 2,
    }


def test_read_cell_without_nucleus_uses_outline(mixed_export):
    cells = read_cells_geojson(mixed_export)
    row = next(i for i, f in enumerate(cells.features) if f["properties"].get("name") == "Cell without nucleus")
    outline = shape(cells.features[row]["geometry"])
    assert "nucleusGeometry" not in cells.features[row]
    assert cells.geometries[row].equals_exact(outline, 1e-9)
    np.testing.assert_allclose(cells.centroids_px[row], [outline.centroid.x, outline.centroid.y])


def test_read_annotations_skips_regions_and_lines(mixed_export, caplog):
    with caplog.at_level(logging.INFO):
        cells = read_cells_geojson(mixed_export, object_types=["annotation"])
    names = collections.Counter(f["properties"].get("name") for f in cells.features)
    assert len(cells) == 12
    assert names["Points (5)"] == 5
    assert names[None] == 2  # the polygon with a hole and the single point
    for region in ("Tumor region 1", "Cell detection region", "Nested: outer", "Nested: middle", "Locked stroma rectangle"):
        assert region not in names
    assert "Nested: inner (unclassified)" in names
    assert "skipped 2 objects without an area or a point (annotation LineString: 2)" in caplog.text
    assert "5 annotations contain other objects" in caplog.text


def test_read_multipoint_gives_one_cell_per_point(mixed_export, shared_data):
    raw = json.loads((shared_data / MIXED_EXPORT).read_text(encoding="utf-8"))["features"]
    points_feature = next(f for f in raw if f["properties"].get("name") == "Points (5)")
    cells = read_cells_geojson(mixed_export, object_types=["annotation"], class_names=["Lymphocyte"])
    assert len(cells) == 5
    assert len(set(cells.ids)) == 5
    assert points_feature["id"] not in cells.ids
    np.testing.assert_allclose(cells.centroids_px, points_feature["geometry"]["coordinates"])
    assert all(g is None for g in cells.geometries)
    assert cells.features[0]["geometry"]["type"] == "Point"
    again = read_cells_geojson(mixed_export, object_types=["annotation"], class_names=["Lymphocyte"])
    assert again.ids == cells.ids


def test_read_tiles_only_when_requested(mixed_export):
    default = read_cells_geojson(mixed_export)
    tiles = read_cells_geojson(mixed_export, object_types=["tile"])
    assert all(f["properties"]["objectType"] != "tile" for f in default.features)
    assert len(tiles) == 12
    assert {f["properties"]["name"] for f in tiles.features} == {f"Tile {i}" for i in range(1, 13)}


def test_read_class_filter(mixed_export):
    tumor = read_cells_geojson(mixed_export, class_names=["Tumor"])
    positive = read_cells_geojson(mixed_export, class_names=["Tumor: Positive"])
    assert len(tumor) == 78
    assert set(tumor.labels) == {"Tumor"}
    assert len(positive) == 2
    assert positive.features[0]["properties"]["classification"]["names"] == ["Tumor", "Positive"]


def test_read_keeps_duplicate_metadata_feature(mixed_export):
    cells = read_cells_geojson(mixed_export)
    named = next(f for f in cells.features if f["properties"].get("name") == "Detection with a name")
    assert named["properties"]["metadata"] == {"source": "manual detection with metadata"}
    assert named["properties"]["measurements"]["Größe: Fläche"] == 0.0


def test_read_without_features_saves_memory(mixed_export):
    cells = read_cells_geojson(mixed_export, keep_features=False)
    assert len(cells) == 164
    assert all(f is None for f in cells.features)


def test_read_gzip_and_json_suffix(cmu1_raw, cmu1_cells, tmp_path):
    text = json.dumps({"type": "FeatureCollection", "features": cmu1_raw[:301]}, ensure_ascii=False)
    gz_path = tmp_path / "cells.geojson.gz"
    gz_path.write_bytes(gzip.compress(text.encode("utf-8")))
    renamed = tmp_path / "cells.json"
    renamed.write_text(text, encoding="utf-8")
    for path in (gz_path, renamed):
        cells = read_cells_geojson(path)
        assert cells.ids == cmu1_cells.ids[:300]
        np.testing.assert_array_equal(cells.centroids_px, cmu1_cells.centroids_px[:300])


def test_read_bare_list_and_single_feature(cmu1_raw, tmp_path):
    cells_only = [f for f in cmu1_raw if f["properties"]["objectType"] == "cell"][:50]
    as_list = read_cells_geojson(_write_json(tmp_path / "list.geojson", cells_only))
    single = read_cells_geojson(_write_json(tmp_path / "one.geojson", cells_only[7]))
    assert as_list.ids == [f["id"] for f in cells_only]
    assert single.ids == [cells_only[7]["id"]]
    np.testing.assert_allclose(single.centroids_px[0], as_list.centroids_px[7])


def test_stream_matches_json_load_across_chunks(cmu1_export, cmu1_raw, mixed_export):
    assert list(iter_geojson_features(cmu1_export, chunk_chars=4093)) == cmu1_raw
    mixed_raw = json.loads(mixed_export.read_text(encoding="utf-8"))["features"]
    assert list(iter_geojson_features(mixed_export, chunk_chars=97)) == mixed_raw


def test_stream_reads_pretty_printed_numbers_at_chunk_ends(tmp_path):
    features = [_detection(f"id-{i}", {"type": "Point", "coordinates": [i * 1.5, 123456.25]}) for i in range(40)]
    path = tmp_path / "pretty.geojson"
    path.write_text(json.dumps({"features": features, "type": "FeatureCollection"}, indent=3))
    for chunk_chars in (1, 2, 7, 64):
        assert list(iter_geojson_features(path, chunk_chars=chunk_chars)) == features


def test_read_id_fallbacks_and_legacy_types(tmp_path):
    features = [
        _detection(None, _square(0, 0), id="from-properties"),
        {
            "type": "Feature",
            "id": "PathCellObject",
            "geometry": _square(20, 0),
            "properties": {"classification": {"name": "Tumor", "colorRGB": -3670016}, "measurements": [{"name": "a", "value": 1.0}]},
        },
        _detection(None, _square(40, 0)),
    ]
    cells = read_cells_geojson(_write_json(tmp_path / "legacy.geojson", {"type": "FeatureCollection", "features": features}))
    assert cells.ids[0] == "from-properties"
    assert cells.ids[1] != "PathCellObject"
    assert len(cells.ids[2]) == 36
    assert cells.labels == [None, "Tumor", None]


def test_read_duplicate_ids_get_new_uuids(tmp_path, caplog):
    features = [_detection("same", _square(x, 0)) for x in (0, 20, 40)]
    with caplog.at_level(logging.WARNING):
        cells = read_cells_geojson(_write_json(tmp_path / "dup.geojson", features))
    assert cells.ids[0] == "same"
    assert len(set(cells.ids)) == 3
    assert "2 objects repeat an earlier id (first: same)" in caplog.text


def test_read_repairs_self_intersecting_polygon(tmp_path, caplog):
    bow_tie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    with caplog.at_level(logging.WARNING):
        cells = read_cells_geojson(_write_json(tmp_path / "bowtie.geojson", [_detection("a", bow_tie)]))
    assert "repaired 1 invalid geometries" in caplog.text
    assert cells.geometries[0].is_valid
    assert cells.geometries[0].area == pytest.approx(50.0)
    np.testing.assert_allclose(cells.centroids_px[0], [5.0, 5.0])


def test_read_multipolygon_centroid_of_union(tmp_path):
    multi = {
        "type": "MultiPolygon",
        "coordinates": [_square(0, 0)["coordinates"], _square(100, 0, size=20)["coordinates"]],
    }
    cells = read_cells_geojson(_write_json(tmp_path / "multi.geojson", [_detection("m", multi)]))
    expected_x = (5 * 100 + 110 * 400) / 500
    expected_y = (5 * 100 + 10 * 400) / 500
    np.testing.assert_allclose(cells.centroids_px[0], [expected_x, expected_y])


def test_read_annotation_only_points_file(tmp_path):
    features = [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 6]}, "properties": {"classification": "sTIL"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [7, 8]}, "properties": {"objectType": "annotation"}},
    ]
    cells = read_cells_geojson(_write_json(tmp_path / "points.geojson", {"type": "FeatureCollection", "features": features}))
    assert cells.labels == ["sTIL", None]
    np.testing.assert_array_equal(cells.centroids_px, [[5, 6], [7, 8]])


# Reading bad input


def test_read_missing_file_names_path(tmp_path):
    with pytest.raises(CellsError, match="not found: .*nothing.geojson"):
        read_cells_geojson(tmp_path / "nothing.geojson")


def test_read_truncated_file_gives_line_and_column(cmu1_export, tmp_path):
    text = cmu1_export.read_text(encoding="utf-8")[:5000]
    path = tmp_path / "truncated.geojson"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CellsError, match=r"truncated.geojson is not valid JSON: .* at line 1, column \d+"):
        read_cells_geojson(path)


def test_read_syntax_error_location_matches_json(tmp_path):
    features = [_detection(f"id-{i}", _square(i * 20, 0)) for i in range(30)]
    text = json.dumps({"type": "FeatureCollection", "features": features}, indent=2)
    broken = text.replace('"id-17"', '"id-17" "oops"')
    path = tmp_path / "broken.geojson"
    path.write_text(broken)
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(broken)
    expected = f"line {reference.value.lineno}, column {reference.value.colno}"
    for chunk_chars in (50, 1 << 20):
        with pytest.raises(CellsError, match=expected):
            list(iter_geojson_features(path, chunk_chars=chunk_chars))


def test_read_json_that_is_not_geojson(tmp_path):
    with pytest.raises(CellsError, match=r"not GeoJSON: .*top-level keys: 'cells', 'version'"):
        read_cells_geojson(_write_json(tmp_path / "other.json", {"cells": [], "version": 2}))


def test_read_feature_without_geometry_names_it(tmp_path):
    features = [_detection("ok", _square(0, 0)), {"type": "Feature", "id": "empty-one", "geometry": None, "properties": {}}]
    with pytest.raises(CellsError, match=r"feature 1 \(id empty-one\) has no geometry"):
        read_cells_geojson(_write_json(tmp_path / "nogeom.geojson", features))


def test_read_non_numeric_coordinates_names_feature(tmp_path):
    bad = _detection("bad-coords", {"type": "Polygon", "coordinates": [[["a", 0], [1, 0], [1, 1], ["a", 0]]]})
    with pytest.raises(CellsError, match=r"feature 0 \(id bad-coords\) has coordinates that are not"):
        read_cells_geojson(_write_json(tmp_path / "strings.geojson", [bad]))


def test_read_non_feature_element(tmp_path):
    with pytest.raises(CellsError, match="feature 1 is 'int', not a GeoJSON Feature"):
        read_cells_geojson(_write_json(tmp_path / "mixed.geojson", [_detection("a", _square(0, 0)), 5]))


def test_read_only_lines_reports_types_present(tmp_path):
    line = {"type": "LineString", "coordinates": [[0, 0], [10, 10]]}
    features = [{"type": "Feature", "geometry": line, "properties": {"objectType": "annotation"}}] * 2
    with pytest.raises(CellsError, match=r"no usable cell objects .*object types present: annotation: 2"):
        read_cells_geojson(_write_json(tmp_path / "lines.geojson", features))


def test_read_class_filter_without_match_lists_classes(mixed_export):
    with pytest.raises(CellsError, match=r"classes requested: \['Lymphocyte'\], classes present: .*'Tumor'"):
        read_cells_geojson(mixed_export, class_names=["Lymphocyte"])


def test_read_rejects_unknown_object_type_argument(mixed_export):
    with pytest.raises(CellsError, match="object type 'tmaCore' cannot be read as cells"):
        read_cells_geojson(mixed_export, object_types=["tmaCore"])


# Cells against the image frame


def test_check_cells_inside_image(cmu1_cells):
    inside = check_cells_in_image(cmu1_cells, 2220, 2967, source="cmu1")
    assert inside.all()


def test_check_cells_from_other_frame_raises(cmu1_cells):
    with pytest.raises(CellsError, match=r"of 3802 cells in cmu1 lie outside the image .*the image is 512 x 512 px"):
        check_cells_in_image(cmu1_cells, 512, 512, source="cmu1")


def test_check_cells_suggests_swap_and_scale(cmu1_cells):
    with pytest.raises(CellsError, match="x and y look swapped"):
        check_cells_in_image(cmu1_cells, 2967, 2220, source="cmu1")
    with pytest.raises(CellsError, match="dividing by 2 would fit them"):
        check_cells_in_image(cmu1_cells, 1110, 1484, source="cmu1")
    with pytest.raises(CellsError, match="may be in µm: dividing by the pixel size 2.5 µm/px"):
        check_cells_in_image(cmu1_cells, 900, 1200, source="cmu1", mpp=2.5)


def test_check_cells_few_outside_warns(cmu1_cells, caplog):
    shifted = cmu1_cells.subset(np.arange(len(cmu1_cells)))
    shifted.centroids_px[:5, 0] = -3.0
    with caplog.at_level(logging.WARNING):
        inside = check_cells_in_image(shifted, 2220, 2967, source="cmu1")
    assert int((~inside).sum()) == 5
    assert "5 of 3802 cells in cmu1 lie outside the image" in caplog.text


# Writing


def _reread_raw(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)["features"]


def test_round_trip_cmu1_export(cmu1_cells, cmu1_raw, tmp_path):
    out = tmp_path / "predictions.geojson"
    with GeoJSONWriter(out) as writer:
        for i in range(len(cmu1_cells)):
            writer.write(
                prediction_feature(
                    cell_id=cmu1_cells.ids[i],
                    class_name="Tumor" if i % 2 else "Stroma",
                    color=(200, 0, 0) if i % 2 else (150, 200, 150),
                    measurements={"NuClass: confidence": 0.25 + i / 10000},
                    base_feature=cmu1_cells.features[i],
                )
            )
    assert writer.count == 3802

    back = read_cells_geojson(out)
    written = _reread_raw(out)
    originals = [f for f in cmu1_raw if f["properties"]["objectType"] == "cell"]
    assert back.ids == cmu1_cells.ids
    np.testing.assert_allclose(back.centroids_px, cmu1_cells.centroids_px, atol=1e-9)
    assert back.labels[:2] == ["Stroma", "Tumor"]
    for original, feature in zip(originals, written):
        assert shape(feature["geometry"]).equals_exact(shape(original["geometry"]), 0.005)
        assert shape(feature["nucleusGeometry"]).equals_exact(shape(original["nucleusGeometry"]), 0.005)
        assert feature["properties"]["objectType"] == "cell"
        measurements = feature["properties"]["measurements"]
        assert {k: measurements[k] for k in original["properties"]["measurements"]} == original["properties"]["measurements"]
    assert written[1]["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert written[1]["properties"]["measurements"]["NuClass: confidence"] == pytest.approx(0.2501)


def test_round_trip_keeps_qupath_properties(mixed_export, tmp_path):
    cells = read_cells_geojson(mixed_export)
    out = tmp_path / "mixed.geojson.gz"
    count = write_features(
        out,
        (
            prediction_feature(cell_id=cells.ids[i], class_name=None, color=None, measurements={}, base_feature=f)
            for i, f in enumerate(cells.features)
        ),
    )
    written = {f["id"]: f for f in _reread_raw(out)}
    named = next(f for f in cells.features if f["properties"].get("name") == "Detection with a name")
    assert count == 164
    assert written[named["id"]]["properties"]["metadata"] == {"source": "manual detection with metadata"}
    assert written[named["id"]]["properties"]["measurements"]["Score (0–1)"] == named["properties"]["measurements"]["Score (0–1)"]
    assert written[named["id"]]["geometry"]["isEllipse"] is True
    assert "classification" not in written[named["id"]]["properties"]
    text = gzip.decompress(out.read_bytes()).decode("utf-8")
    assert "Größe: Fläche" in text
    parsed = geojson.loads(text)
    assert parsed.is_valid
    assert len(parsed["features"]) == 164


def test_writer_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "partial.geojson"
    out.write_text("previous result")
    with pytest.raises(RuntimeError, match="stop halfway"):
        with GeoJSONWriter(out) as writer:
            writer.write(prediction_feature(cell_id="a", geometry=shapely.box(0, 0, 5, 5), class_name=None, color=None, measurements={}))
            raise RuntimeError("stop halfway")
    assert out.read_text() == "previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partial.geojson"]


def test_writer_drops_nan_measurements(tmp_path, caplog):
    out = tmp_path / "nan.geojson"
    feature = {
        "type": "Feature",
        "id": "n",
        "geometry": _square(0, 0),
        "properties": {"objectType": "detection", "measurements": {"ok": 1.5, "bad": float("nan"), "inf": float("inf"), "n": np.float32(0.5)}},
    }
    with caplog.at_level(logging.WARNING):
        with GeoJSONWriter(out) as writer:
            writer.write(feature)

    def reject(token: str):
        raise AssertionError(f"non-standard JSON token {token}")

    written = json.loads(out.read_text(), parse_constant=reject)["features"][0]
    assert written["properties"]["measurements"] == {"ok": 1.5, "n": 0.5}
    assert writer.dropped_measurements == 2
    assert math.isnan(feature["properties"]["measurements"]["bad"])
    assert "left out 2 NaN or infinite measurement values" in caplog.text


def test_writer_rejects_nan_elsewhere(tmp_path):
    feature = {"type": "Feature", "id": "x", "geometry": _square(0, 0), "properties": {"score": float("nan")}}
    with pytest.raises(CellsError, match="feature x contains NaN"):
        with GeoJSONWriter(tmp_path / "bad.geojson") as writer:
            writer.write(feature)
    assert not (tmp_path / "bad.geojson").exists()


def test_writer_rounds_coordinates(tmp_path):
    out = tmp_path / "round.geojson"
    polygon = shapely.Polygon([(0.123456, 1.98765), (10.004999, 1.5), (5.555555, 8.0)])
    write_features(out, [prediction_feature(cell_id="r", geometry=polygon, class_name=None, color=None, measurements={"m": 1 / 3})])
    written = _reread_raw(out)[0]
    assert written["geometry"]["coordinates"][0][0] == [0.12, 1.99]
    assert written["properties"]["measurements"]["m"] == 1 / 3
    assert out.read_text().startswith('{"type":"FeatureCollection","features":[\n{"type":"Feature"')


def test_writer_empty_collection_is_valid(tmp_path):
    out = tmp_path / "empty.geojson"
    assert write_features(out, []) == 0
    assert json.loads(out.read_text()) == {"type": "FeatureCollection", "features": []}
    with pytest.raises(CellsError, match="no usable cell objects"):
        read_cells_geojson(out)


# Building features


def test_prediction_feature_derived_class_and_colour():
    feature = prediction_feature(
        cell_id="c", geometry=shapely.box(0, 0, 4, 4), class_name="Tumor: Positive", color=np.array([200, 50, 50]), measurements={}
    )
    assert feature["properties"]["classification"] == {"names": ["Tumor", "Positive"], "color": [200, 50, 50]}
    assert feature["properties"]["objectType"] == "detection"
    with pytest.raises(ValueError, match="needs a colour"):
        prediction_feature(cell_id="c", geometry=shapely.box(0, 0, 4, 4), class_name="Tumor", color=None, measurements={})
    with pytest.raises(ValueError, match="0-255"):
        prediction_feature(cell_id="c", geometry=shapely.box(0, 0, 4, 4), class_name="Tumor", color=(300, 0, 0), measurements={})


def test_prediction_feature_point_stays_point_or_becomes_circle():
    point = prediction_feature(cell_id="p", geometry=shapely.Point(3, 4), class_name=None, color=None, measurements={})
    circle = prediction_feature(
        cell_id="p", geometry=shapely.Point(3, 4), class_name=None, color=None, measurements={}, point_radius_px=5
    )
    assert point["geometry"] == {"type": "Point", "coordinates": [3.0, 4.0]}
    assert circle["geometry"]["type"] == "Polygon"
    assert shape(circle["geometry"]).area == pytest.approx(math.pi * 25, rel=0.02)


def test_prediction_feature_merges_and_keeps_base(mixed_export):
    cells = read_cells_geojson(mixed_export)
    base = next(f for f in cells.features if f["properties"].get("name") == "Detection with a name")
    legacy = copy.deepcopy(base)
    legacy["properties"]["measurements"] = [{"name": k, "value": v} for k, v in base["properties"]["measurements"].items()]
    legacy["properties"]["measurements"].append({"name": "text", "value": "not a number"})
    before = copy.deepcopy(legacy)

    feature = prediction_feature(
        cell_id=base["id"],
        class_name="Tumor",
        color=(200, 0, 0),
        measurements={"plain": 9.0, "Größe: Fläche": float("nan"), "NuClass: gate": 0.75},
        base_feature=legacy,
    )
    measurements = feature["properties"]["measurements"]
    assert legacy == before
    assert measurements["plain"] == 9.0
    assert "Größe: Fläche" not in measurements
    assert measurements["Nucleus: Area µm^2"] == 120.0
    assert measurements["NuClass: gate"] == 0.75
    assert "text" not in measurements
    assert feature["properties"]["name"] == "Detection with a name"
    assert feature["properties"]["metadata"] == {"source": "manual detection with metadata"}
    assert feature["geometry"] == base["geometry"]


def test_prediction_feature_cell_type_and_nucleus(cmu1_cells):
    base = cmu1_cells.features[0]
    kept = prediction_feature(cell_id="k", class_name=None, color=None, measurements={}, base_feature=base)
    assert kept["properties"]["objectType"] == "cell"
    assert kept["nucleusGeometry"] == base["nucleusGeometry"]
    new_nucleus = shapely.box(1080, 88, 1086, 94)
    replaced = prediction_feature(
        cell_id="k", class_name=None, color=None, measurements={}, base_feature=base, nucleus_geometry=new_nucleus
    )
    assert shape(replaced["nucleusGeometry"]).equals(new_nucleus)
    with pytest.raises(ValueError, match="only written for cells"):
        prediction_feature(
            cell_id="d", geometry=shapely.box(0, 0, 1, 1), object_type="detection", nucleus_geometry=new_nucleus,
            class_name=None, color=None, measurements={},
        )


def test_prediction_feature_keeps_ellipse_only_with_same_bounds(mixed_export):
    cells = read_cells_geojson(mixed_export)
    base = next(f for f in cells.features if f["geometry"].get("isEllipse"))
    ellipse = shape(base["geometry"])
    same = prediction_feature(cell_id="e", geometry=ellipse, class_name=None, color=None, measurements={}, base_feature=base)
    moved = prediction_feature(
        cell_id="e", geometry=shapely.affinity.translate(ellipse, 5, 0), class_name=None, color=None, measurements={}, base_feature=base
    )
    assert same["geometry"]["isEllipse"] is True
    assert "isEllipse" not in moved["geometry"]


def test_prediction_feature_repairs_invalid_polygon():
    bow_tie = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])
    feature = prediction_feature(cell_id="b", geometry=bow_tie, class_name=None, color=None, measurements={})
    repaired = shape(feature["geometry"])
    assert repaired.is_valid
    assert repaired.area == pytest.approx(50.0)


_STREAM_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np, shapely
    from nuclass_qupath.cells.geojson import GeoJSONWriter, prediction_feature

    n = int(sys.argv[2])
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    circle = np.column_stack([np.cos(angles), np.sin(angles)]) * 6.0
    with GeoJSONWriter(sys.argv[1]) as writer:
        for i in range(n):
            polygon = shapely.polygons(circle + (i % 1000 * 20.0, i // 1000 * 20.0))
            writer.write(prediction_feature(
                cell_id=f"00000000-0000-4000-8000-{i:012d}", geometry=polygon, class_name="Tumor",
                color=(200, 0, 0), measurements={"NuClass: confidence": 0.9, "NuClass: gate": 0.5}))
    # VmHWM belongs to this process's own address space; ru_maxrss can carry
    # the parent's peak across fork and exec.
    with open("/proc/self/status") as status:
        peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(writer.count, peak_kb // 1024)
    """
)


@pytest.mark.slow
def test_writer_memory_stays_flat(tmp_path):
    # Peak memory must not grow with the number of features written; the
    # million-feature figure is measured by benchmarks/bench_geojson.py.
    peaks = {}
    for n in (5_000, 50_000):
        out = tmp_path / f"cells_{n}.geojson.gz"
        result = subprocess.run(
            [sys.executable, "-c", _STREAM_SCRIPT, str(out), str(n)], capture_output=True, text=True, check=True
        )
        count, peaks[n] = map(int, result.stdout.split())
        assert count == n
    assert peaks[50_000] < 500
    assert peaks[50_000] - peaks[5_000] < 30


def test_read_non_finite_ring_names_feature(tmp_path):
    features = [_detection(f"ok-{i}", _square(i * 20, 0)) for i in range(3)]
    features.append(_detection("bad-ring", {"type": "Polygon", "coordinates": [[[0, 0], [1e400, 0], [1, 1], [0, 0]]]}))
    path = tmp_path / "infinite.geojson"
    path.write_text(json.dumps(features))
    with pytest.raises(CellsError, match=r"feature 3 \(id bad-ring\) has NaN or infinite coordinates"):
        read_cells_geojson(path)


def test_read_skips_degenerate_polygon(tmp_path, caplog):
    sliver = {"type": "Polygon", "coordinates": [[[0, 0], [5, 5], [0, 0]]]}
    features = [_detection("sliver", sliver), _detection("fine", _square(0, 0))]
    with caplog.at_level(logging.WARNING):
        cells = read_cells_geojson(_write_json(tmp_path / "sliver.geojson", features))
    assert cells.ids == ["fine"]
    assert "detection polygon with fewer than 3 vertices: 1" in caplog.text


def test_writer_ensure_ascii_escapes(tmp_path):
    out = tmp_path / "ascii.geojson"
    feature = prediction_feature(
        cell_id="a", geometry=shapely.box(0, 0, 2, 2), class_name=None, color=None, measurements={"Area µm^2": 4.0}
    )
    write_features(out, [feature], ensure_ascii=True)
    raw_bytes = out.read_bytes()
    assert raw_bytes.isascii()
    assert b"Area \\u00b5m^2" in raw_bytes
    assert _reread_raw(out)[0]["properties"]["measurements"] == {"Area µm^2": 4.0}


@pytest.mark.qupath
def test_qupath_imports_written_features(cmu1_cells, tmp_path):
    from jpype import JClass
    from paquo.java import PathIO  # starts the JVM with QuPath's classes

    features = [
        prediction_feature(
            cell_id=cmu1_cells.ids[i],
            class_name="Tumor",
            color=(200, 0, 0),
            measurements={"NuClass: confidence": 0.9, "Area µm^2": float(i)},
            base_feature=cmu1_cells.features[i],
        )
        for i in range(5)
    ]
    features.append(
        prediction_feature(
            cell_id="9b0c6a43-3c1f-4f7e-9e55-1b8f5b7d2a10",
            geometry=shapely.Point(100.5, 200.25),
            class_name="Tumor: Positive",
            color=(200, 50, 50),
            measurements={"NuClass: gate": 0.5},
        )
    )
    out = tmp_path / "for_qupath.geojson"
    write_features(out, features)

    objects = list(PathIO.readObjects(JClass("java.io.File")(str(out))))
    assert len(objects) == 6
    first, point = objects[0], objects[-1]
    assert str(first.getID()) == cmu1_cells.ids[0]
    assert first.isCell()
    assert first.getNucleusROI() is not None
    assert str(first.getPathClass()) == "Tumor"
    assert first.getMeasurementList().get("NuClass: confidence") == pytest.approx(0.9)
    assert first.getMeasurementList().get("Nucleus: Area") == cmu1_cells.features[0]["properties"]["measurements"]["Nucleus: Area"]
    assert objects[3].getMeasurementList().get("Area µm^2") == 3.0
    assert point.isDetection()
    assert point.getROI().isPoint()
    assert str(point.getPathClass()) == "Tumor: Positive"
    assert str(point.getID()) == "9b0c6a43-3c1f-4f7e-9e55-1b8f5b7d2a10"


# Preformatted coordinates from polygons_to_geojson


def _plain_lists(value):
    """Return GeoJSON coordinates as nested plain lists, without any stored JSON text."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
        return [_plain_lists(item) for item in value]
    return list(value) if isinstance(value, (list, tuple)) else value


def _edge_polygons(cmu1_cells) -> list:
    """CMU-1 nuclei from QuPath's export, plus polygons with signs, holes, zeros and huge values."""
    rng = np.random.default_rng(7)
    polygons = [g for g in cmu1_cells.geometries[:300]]
    polygons += [shapely.Polygon(rng.normal(size=(12, 2)) * scale).convex_hull for scale in (1e-3, 0.5, 1e6, 1e12, 1e16)]
    polygons.append(shapely.box(-0.004, -0.001, 0.003, 0.004))  # rounds to -0.0 and 0.0
    polygons.append(shapely.box(-10.005, -0.125, 99999.995, 10.015))
    polygons.append(shapely.Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], [[(2, 2), (3, 2), (3, 3)], [(5, 5), (6, 5), (6, 6.125)]]))
    return polygons


@pytest.mark.parametrize("decimals", [0, 1, 2, 3, 4])
def test_polygon_text_matches_json_dumps(cmu1_cells, decimals):
    polygons = _edge_polygons(cmu1_cells)
    converted = polygons_to_geojson(polygons, decimals)
    for polygon, geometry in zip(polygons, converted):
        coordinates = geometry["coordinates"]
        exterior = np.round(shapely.get_coordinates(polygon.exterior), decimals)
        np.testing.assert_array_equal(np.asarray(coordinates[0]), exterior)
        text = coordinates.json_text()
        largest = np.abs(shapely.get_coordinates(polygon)).max()
        if largest < 1e9:
            assert text is not None
        if largest > 1e15:
            assert text is None
        if text is not None:
            assert text == json.dumps(_plain_lists(coordinates), separators=(",", ":"))


def test_polygon_text_left_out_beyond_four_decimals(cmu1_cells):
    converted = polygons_to_geojson(cmu1_cells.geometries[:5], decimals=5)
    assert [g["coordinates"].json_text() for g in converted] == [None] * 5


def _detector_features(cmu1_cells, count: int) -> list[dict]:
    """Features as the engine builds them for detected nuclei: polygon, class with colour, NuClass measurements."""
    polygons = polygons_to_geojson(cmu1_cells.geometries[:count])
    features = []
    for i, geometry in enumerate(polygons):
        features.append(
            {
                "type": "Feature",
                "id": cmu1_cells.ids[i],
                "geometry": geometry,
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": "Tumor" if i % 3 else "Stroma", "color": [200, 0, 0] if i % 3 else [150, 200, 150]},
                    "measurements": {"NuClass: confidence": round(0.5 + i / 1000, 5), "NuClass: p(Tumor)": round(i / 997, 5)},
                },
            }
        )
    return features


@pytest.mark.parametrize("suffix", [".geojson", ".geojson.gz"])
def test_writer_text_path_same_bytes_as_encoder(cmu1_cells, tmp_path, suffix):
    features = _detector_features(cmu1_cells, 400)
    plain = copy.deepcopy(features)
    for feature in plain:
        feature["geometry"]["coordinates"] = _plain_lists(feature["geometry"]["coordinates"])
    # Same file name, because gzip stores it in its header.
    fast, slow = tmp_path / "fast" / f"cells{suffix}", tmp_path / "slow" / f"cells{suffix}"
    write_features(fast, features)
    write_features(slow, plain)
    assert fast.read_bytes() == slow.read_bytes()


def test_writer_round_trip_detector_features(cmu1_cells, tmp_path):
    features = _detector_features(cmu1_cells, 500)
    out = tmp_path / "detections.geojson.gz"
    assert write_features(out, features) == 500

    back = read_cells_geojson(out)
    assert back.ids == [f["id"] for f in features]
    assert back.labels == [f["properties"]["classification"]["name"] for f in features]
    for i, feature in enumerate(features):
        assert back.features[i]["properties"]["measurements"] == feature["properties"]["measurements"]
        assert back.features[i]["properties"]["classification"] == feature["properties"]["classification"]
        assert back.geometries[i].equals_exact(cmu1_cells.geometries[i], 0.005)
        assert back.features[i]["geometry"]["coordinates"] == _plain_lists(feature["geometry"]["coordinates"])


def test_writer_uses_edited_coordinates(cmu1_cells, tmp_path):
    features = _detector_features(cmu1_cells, 2)
    coordinates = features[0]["geometry"]["coordinates"]
    coordinates[0] = ((1.5, 2.0), (10.0, 2.0), (10.0, 9.25), (1.5, 2.0))
    out = tmp_path / "edited.geojson"
    write_features(out, features)
    written = _reread_raw(out)
    assert written[0]["geometry"]["coordinates"] == [[[1.5, 2.0], [10.0, 2.0], [10.0, 9.25], [1.5, 2.0]]]
    assert written[1]["geometry"]["coordinates"] == _plain_lists(features[1]["geometry"]["coordinates"])


def test_writer_keeps_nul_in_property_strings(cmu1_cells, tmp_path):
    features = _detector_features(cmu1_cells, 1)
    features[0]["properties"]["name"] = "a\x00b"
    out = tmp_path / "nul.geojson"
    write_features(out, features)
    written = _reread_raw(out)[0]
    assert written["properties"]["name"] == "a\x00b"
    assert written["geometry"]["coordinates"] == _plain_lists(features[0]["geometry"]["coordinates"])


def test_writer_rejects_circular_feature(tmp_path):
    properties: dict = {"objectType": "detection"}
    properties["self"] = properties
    feature = {"type": "Feature", "id": "loop", "geometry": _square(0, 0), "properties": properties}
    with pytest.raises(CellsError, match="feature loop contains a circular reference"):
        write_features(tmp_path / "loop.geojson", [feature])
    assert not (tmp_path / "loop.geojson").exists()


def test_writer_gzip_reproducible_with_final_name(cmu1_cells, tmp_path):
    features = _detector_features(cmu1_cells, 50)
    first, second = tmp_path / "a" / "cells.geojson.gz", tmp_path / "b" / "cells.geojson.gz"
    write_features(first, features)
    write_features(second, features)
    raw = first.read_bytes()
    assert raw == second.read_bytes()
    # gzip header: flags byte 3 has FNAME (8), the name starts at byte 10.
    assert raw[3] & 8
    assert raw[10 : 10 + len(b"cells.geojson\x00")] == b"cells.geojson\x00"


def test_writer_compresslevel_trades_size_for_time(cmu1_cells, tmp_path):
    features = _detector_features(cmu1_cells, 400)
    sizes = {}
    for level in (1, 9):
        out = tmp_path / f"level{level}.geojson.gz"
        with GeoJSONWriter(out, compresslevel=level) as writer:
            for feature in features:
                writer.write(feature)
        sizes[level] = out.stat().st_size
        assert len(_reread_raw(out)) == 400
    assert sizes[9] < sizes[1]
    with pytest.raises(ValueError, match="compresslevel must be 0-9, got 11"):
        with GeoJSONWriter(tmp_path / "bad.geojson.gz", compresslevel=11):
            pass


@pytest.mark.slow
def test_benchmark_script_runs(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_geojson.py"
    result = subprocess.run(
        [sys.executable, str(script), "--cells", "5000", "--out", str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert "equal the engine's batch_features" in result.stdout
    assert "geojson.gz" in result.stdout
    assert result.stdout.count(": parsed") == 2
    assert list(tmp_path.iterdir()) == []

"""Results mapping on QuPath's own GeoJSON exports: reading cells, merging, idempotent re-runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import shape

from nuclass_qupath.errors import CellsError
from nuclass_qupath.qupath.heatmap import heatmap_tiles
from nuclass_qupath.qupath.results import (
    CONFIDENCE_MEASUREMENT,
    GATE_MEASUREMENT,
    MEASUREMENT_PREFIX,
    TILE_CELLS_MEASUREMENT,
    TILE_NAME,
    ObjectResult,
    annotation_region,
    apply_results_to_features,
    class_colors,
    default_results_dir,
    features_to_cell_table,
    is_nuclass_measurement,
    is_nuclass_tile,
    merge_measurements,
    probability_measurement,
    results_file_name,
    results_from_features,
    results_from_predictions,
)
from qupath_results_fixtures import STAND_IN_CLASSES, area_stand_in_predictions, load_export

CMU1_WIDTH_PX, CMU1_HEIGHT_PX, CMU1_MPP = 2220, 2967, 0.499


@pytest.fixture(scope="module")
def cmu1_features(shared_data: Path) -> list[dict]:
    return load_export(shared_data, "cmu1_cells", "CMU-1-Small-Region.svs")


@pytest.fixture(scope="module")
def mixed_features(shared_data: Path) -> list[dict]:
    return load_export(shared_data, "mixed_objects", "CMU-1-Small-Region.svs")


def _stand_in_results(features: list[dict], classes=STAND_IN_CLASSES) -> dict[str, ObjectResult]:
    table, _ = features_to_cell_table(features)
    probs, confidence, gate = area_stand_in_predictions(table)
    names = [name for name, _ in classes]
    return results_from_predictions(table.ids, names, probs[:, : len(names)], confidence, gate=gate)


def _properties_snapshot(features: list[dict]) -> list[tuple]:
    """Return ids, classes and measurements of features, copied, to detect changes in place."""
    return [
        (f.get("id"), copy.deepcopy(f["properties"].get("classification")), dict(f["properties"].get("measurements", {})))
        for f in features
    ]


def _roundtrip(features: list[dict]) -> list[dict]:
    """Return features as they would be read back from a GeoJSON file."""
    return json.loads(json.dumps(features))


def test_cell_table_from_cmu1_export(cmu1_features):
    table, notes = features_to_cell_table(cmu1_features)
    cells = [f for f in cmu1_features if f["properties"]["objectType"] == "cell"]
    assert len(table) == 3802
    assert table.ids == [f["id"] for f in cells]
    assert not notes
    assert all(label is None for label in table.labels)
    assert (table.centroids_px >= 0).all()
    assert (table.centroids_px[:, 0] < CMU1_WIDTH_PX).all()
    assert (table.centroids_px[:, 1] < CMU1_HEIGHT_PX).all()
    nucleus = shape(cells[0]["nucleusGeometry"])
    assert table.geometries[0].equals(nucleus)
    assert table.centroids_px[0] == pytest.approx([nucleus.centroid.x, nucleus.centroid.y])
    assert table.features[0] is cells[0]


def test_cell_table_region_keeps_cells_of_annotation(mixed_features):
    region = annotation_region(mixed_features, "Region*")
    table, notes = features_to_cell_table(mixed_features, object_types=("cell",), region=region)
    # QuPath nested exactly the 156 cells of its cell detection under this annotation, by centroid.
    assert len(table) == 156
    assert notes["outside region"] == 2


def test_cell_table_from_mixed_objects(mixed_features):
    table, notes = features_to_cell_table(mixed_features)
    n_cells = sum(f["properties"]["objectType"] == "cell" for f in mixed_features)
    n_detections = sum(f["properties"]["objectType"] == "detection" for f in mixed_features)
    assert (n_cells, n_detections) == (158, 6)
    assert len(table) == n_cells + n_detections
    assert notes["cell without nucleus ROI"] == 1
    assert "Tumor" in table.labels
    assert "Tumor: Positive" in table.labels
    tile_ids = {f["id"] for f in mixed_features if f["properties"]["objectType"] == "tile"}
    assert not tile_ids & set(table.ids)


def _feature(object_id, geometry, object_type="detection"):
    feature = {"type": "Feature", "geometry": geometry, "properties": {"objectType": object_type}}
    if object_id is not None:
        feature["id"] = object_id
    return feature


def test_cell_table_roi_rules():
    square = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    hole = [[4, 4], [6, 4], [6, 6], [4, 6], [4, 4]]
    small = [[20, 20], [22, 20], [22, 22], [20, 22], [20, 20]]
    features = [
        _feature("point", {"type": "Point", "coordinates": [5, 6]}),
        _feature("holes", {"type": "Polygon", "coordinates": [square, hole]}),
        _feature("parts", {"type": "MultiPolygon", "coordinates": [[square], [small]]}),
        _feature("line", {"type": "LineString", "coordinates": [[0, 0], [5, 5]]}),
        _feature("points", {"type": "MultiPoint", "coordinates": [[0, 0], [5, 5]]}),
        _feature("none", None),
        _feature(None, {"type": "Polygon", "coordinates": [square]}),
        _feature("annotation", {"type": "Polygon", "coordinates": [square]}, object_type="annotation"),
    ]
    table, notes = features_to_cell_table(features)
    assert table.ids == ["point", "holes", "parts"]
    assert table.centroids_px[0] == pytest.approx([5, 6])
    assert table.geometries[0] is None
    assert table.geometries[1].area == pytest.approx(100)
    assert table.geometries[2].area == pytest.approx(100)
    assert table.centroids_px[2] == pytest.approx([5, 5])
    assert notes == {
        "point ROI": 1,
        "polygon with holes": 1,
        "multi-part ROI": 1,
        "line ROI": 1,
        "multi-point ROI": 1,
        "no ROI": 1,
        "no id": 1,
    }


def test_merge_measurements_replaces_only_prefixed():
    existing = {"Nucleus: Area": 12.0, "NuClass: p(Old class)": 0.3, "NuClass: confidence": 0.1, "plain": 1.0}
    new = {"NuClass: confidence": 0.9, "NuClass: p(New class)": 0.9}
    merged = merge_measurements(existing, new)
    assert merged == {"Nucleus: Area": 12.0, "plain": 1.0, "NuClass: confidence": 0.9, "NuClass: p(New class)": 0.9}
    assert list(merged)[:2] == ["Nucleus: Area", "plain"]
    assert existing["NuClass: p(Old class)"] == 0.3


def test_merge_measurements_rejects_unprefixed_names():
    with pytest.raises(CellsError, match="Nucleus: Area"):
        merge_measurements({}, {"Nucleus: Area": 1.0})


def test_apply_twice_equals_once_on_cmu1(cmu1_features):
    snapshot = _properties_snapshot(cmu1_features)
    results = _stand_in_results(cmu1_features)
    colors = class_colors(STAND_IN_CLASSES)
    once, stats = apply_results_to_features(cmu1_features, results, colors=colors)
    twice, stats_again = apply_results_to_features(once, results, colors=colors)

    assert _properties_snapshot(cmu1_features) == snapshot
    assert twice == once
    assert stats.classified == stats_again.classified == 3802
    assert stats.results_without_object == 0
    assert [f["id"] for f in once] == [f["id"] for f in cmu1_features]
    for before, after in zip(cmu1_features, once):
        qupath_measurements = before["properties"].get("measurements", {})
        written = after["properties"].get("measurements", {})
        for name, value in qupath_measurements.items():
            assert written[name] == value
        if before["properties"]["objectType"] == "cell":
            assert len(qupath_measurements) == 41
            assert len(written) == 41 + 2 + len(STAND_IN_CLASSES)


def test_apply_sets_class_and_colour(cmu1_features):
    results = _stand_in_results(cmu1_features)
    applied, _ = apply_results_to_features(cmu1_features, results, colors=class_colors(STAND_IN_CLASSES))
    by_id = {f["id"]: f for f in applied}
    colors = dict(STAND_IN_CLASSES)
    for object_id, result in list(results.items())[:50]:
        props = by_id[object_id]["properties"]
        assert props["classification"] == {"name": result.class_name, "color": list(colors[result.class_name])}
        probs = [props["measurements"][probability_measurement(name)] for name, _ in STAND_IN_CLASSES]
        assert sum(probs) == pytest.approx(1.0)
        assert props["measurements"][CONFIDENCE_MEASUREMENT] == pytest.approx(max(probs))
    tissue = by_id[cmu1_features[0]["id"]]["properties"]
    assert tissue["classification"]["name"] == "Tissue"


def test_rerun_with_fewer_classes_drops_old_probabilities(cmu1_features):
    colors = class_colors(STAND_IN_CLASSES)
    first, _ = apply_results_to_features(cmu1_features, _stand_in_results(cmu1_features), colors=colors)
    two_classes = STAND_IN_CLASSES[:2]
    second, _ = apply_results_to_features(
        first, _stand_in_results(cmu1_features, two_classes), colors=class_colors(two_classes)
    )
    dropped = probability_measurement(STAND_IN_CLASSES[2][0])
    cells = [f for f in second if f["properties"]["objectType"] == "cell"]
    assert all(dropped not in f["properties"]["measurements"] for f in cells)
    assert all(len(f["properties"]["measurements"]) == 41 + 2 + 2 for f in cells)


def test_results_roundtrip_through_features(cmu1_features):
    results = _stand_in_results(cmu1_features)
    applied, _ = apply_results_to_features(cmu1_features, results, colors=class_colors(STAND_IN_CLASSES))
    read_back = results_from_features(applied)
    assert set(read_back) == set(results) | {cmu1_features[0]["id"]}
    some_id = next(iter(results))
    assert read_back[some_id] == results[some_id]
    assert read_back[cmu1_features[0]["id"]] == ObjectResult("Tissue", {})


def test_is_nuclass_tile_rules(mixed_features):
    qupath_tiles = [f for f in mixed_features if f["properties"]["objectType"] == "tile"]
    assert len(qupath_tiles) == 12
    assert not any(is_nuclass_tile(f) for f in qupath_tiles)
    ours = {"type": "Feature", "geometry": None, "properties": {"objectType": "tile", "name": TILE_NAME}}
    renamed = {"objectType": "tile", "name": "my tile", "measurements": {TILE_CELLS_MEASUREMENT: 3}}
    annotation = {"objectType": "annotation", "name": TILE_NAME}
    assert is_nuclass_tile(ours)
    assert is_nuclass_tile(ours["properties"])
    assert is_nuclass_tile(renamed)
    assert not is_nuclass_tile(annotation)


def test_tiles_replaced_not_duplicated(mixed_features):
    table, _ = features_to_cell_table(mixed_features, object_types=("cell",))
    probs, confidence, _ = area_stand_in_predictions(table)
    names = [name for name, _ in STAND_IN_CLASSES]
    tiles = heatmap_tiles(
        table.centroids_px, probs, names, confidence,
        mpp=CMU1_MPP, tile_um=50.0, image_width_px=CMU1_WIDTH_PX, image_height_px=CMU1_HEIGHT_PX,
    )
    results = results_from_predictions(table.ids, names, probs, confidence)
    colors = class_colors(STAND_IN_CLASSES)
    once, stats = apply_results_to_features(mixed_features, results, colors=colors, tiles=tiles)
    twice, stats_again = apply_results_to_features(once, results, colors=colors, tiles=tiles)

    assert stats.tiles_removed == 0
    assert stats_again.tiles_removed == stats_again.tiles_added == len(tiles)
    assert twice == once
    assert _roundtrip(twice) == _roundtrip(once)
    assert sum(is_nuclass_tile(f) for f in twice) == len(tiles)
    qupath_tile_count = sum(f["properties"]["objectType"] == "tile" and not is_nuclass_tile(f) for f in twice)
    assert qupath_tile_count == 12
    assert len(twice) == len(mixed_features) + len(tiles)


def test_results_from_predictions_names_and_values():
    ids = ["a", "b"]
    probs = np.array([[0.7, 0.3], [0.2, 0.8]])
    results = results_from_predictions(ids, ["X", "Y"], probs, [0.7, 0.8], gate=[0.1, 0.9])
    assert results["a"].class_name == "X"
    assert results["b"].class_name == "Y"
    assert results["b"].measurements == {
        CONFIDENCE_MEASUREMENT: 0.8,
        GATE_MEASUREMENT: 0.9,
        "NuClass: p(X)": 0.2,
        "NuClass: p(Y)": 0.8,
    }
    assert all(is_nuclass_measurement(name) for name in results["a"].measurements)
    assert MEASUREMENT_PREFIX == "NuClass: "


def test_results_from_predictions_rejects_bad_shapes():
    with pytest.raises(CellsError, match="probs has shape"):
        results_from_predictions(["a"], ["X", "Y"], np.ones((1, 3)), [1.0])
    with pytest.raises(CellsError, match="confidence has 2 values"):
        results_from_predictions(["a"], ["X", "Y"], np.ones((1, 2)), [1.0, 1.0])


def test_class_colors_rejects_bad_colour():
    with pytest.raises(CellsError, match="'Tumor'"):
        class_colors([("Tumor", (300, 0, 0))])


def test_results_file_names(tmp_path):
    assert results_file_name("CMU-1-Small-Region.svs") == "CMU-1-Small-Region.svs.nuclass.geojson"
    assert results_file_name("a/b:c") == "a_b_c.nuclass.geojson"
    assert default_results_dir(tmp_path / "project.qpproj") == tmp_path / "nuclass_results"
    assert default_results_dir(tmp_path) == tmp_path / "nuclass_results"

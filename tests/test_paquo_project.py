"""QuPath projects through paquo: reading cells and writing results back.

Tests marked ``qupath`` start QuPath through paquo and run only where
PAQUO_QUPATH_DIR points at a QuPath 0.5 or 0.6 installation. They work on
copies of the sample projects that QuPath 0.6.0 wrote, relocated to the slides
beside the repository, and use the nucleus-area stand-in predictions of
``qupath_results_fixtures`` in place of a trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import shape

from nuclass_qupath.errors import ProjectError
from nuclass_qupath.qupath.heatmap import heatmap_tiles
from nuclass_qupath.qupath.paquo_project import BACKUP_MARK, _mpp_from_metadata, open_project, remap_image_path
from nuclass_qupath.qupath.results import (
    CONFIDENCE_MEASUREMENT,
    METADATA_MODEL_KEY,
    METADATA_VERSION_KEY,
    TILE_CELLS_MEASUREMENT,
    is_nuclass_measurement,
    probability_measurement,
    results_from_predictions,
)
from qupath_results_fixtures import (
    STAND_IN_CLASSES,
    STAND_IN_MODEL_ID,
    area_stand_in_predictions,
    copy_project,
    load_export,
)

OLD_SLIDES_DIR = "/srv/nuclass-data/slides"
OLD_IMAGES_DIR = "/srv/nuclass-data/qupath/images"
NAMES = [name for name, _ in STAND_IN_CLASSES]


# Checks that need no QuPath.


def test_open_project_missing_folder(tmp_path):
    with pytest.raises(ProjectError, match="QuPath project not found"):
        open_project(tmp_path / "no_such_project")


def test_open_project_invalid_json(tmp_path):
    (tmp_path / "project.qpproj").write_text("{not json", encoding="utf-8")
    with pytest.raises(ProjectError, match="not a readable QuPath project file"):
        open_project(tmp_path)


def test_open_project_rejects_write_mode(tmp_path):
    with pytest.raises(ProjectError, match="mode must be"):
        open_project(tmp_path, mode="w")


def test_remap_image_path_by_prefix(slides_dir):
    old = Path(OLD_SLIDES_DIR) / "CMU-1-Small-Region.svs"
    remap = {"/srv": "/nowhere", OLD_SLIDES_DIR: slides_dir}
    assert remap_image_path(old, remap) == slides_dir / "CMU-1-Small-Region.svs"
    assert remap_image_path(Path("/elsewhere/CMU-1-Small-Region.svs"), remap) is None
    assert remap_image_path(Path(OLD_SLIDES_DIR) / "missing.svs", remap) is None


def test_remap_image_path_by_folder(slides_dir):
    old = Path(OLD_SLIDES_DIR) / "CMU-1-Small-Region.svs"
    assert remap_image_path(old, slides_dir) == slides_dir / "CMU-1-Small-Region.svs"
    assert remap_image_path(Path("/x/missing.svs"), slides_dir) is None


def test_mpp_from_project_metadata(shared_data):
    def metadata(project):
        return json.loads((shared_data / "qupath" / project / "project.qpproj").read_text())["images"][0][
            "serverBuilder"
        ]["metadata"]

    assert _mpp_from_metadata(metadata("cmu1_cells")) == pytest.approx(0.499)
    assert _mpp_from_metadata(metadata("tcga_no_mpp")) is None


# Checks against a real QuPath.


@pytest.fixture
def cmu1_project(shared_data, tmp_path) -> Path:
    return copy_project(shared_data / "qupath" / "cmu1_cells", tmp_path / "cmu1_cells")


def _write_stand_in(session, image, *, tiles=True, classes=STAND_IN_CLASSES):
    cells = session.read_cells(image)
    probs, confidence, gate = area_stand_in_predictions(cells)
    names = [name for name, _ in classes]
    probs = probs[:, : len(names)] / probs[:, : len(names)].sum(axis=1, keepdims=True)
    results = results_from_predictions(cells.ids, names, probs, probs.max(axis=1), gate=gate)
    heatmap = None
    if tiles:
        heatmap = heatmap_tiles(
            cells.centroids_px, probs, names, probs.max(axis=1),
            mpp=image.mpp, tile_um=100.0, image_width_px=image.width_px, image_height_px=image.height_px,
        )
    summary = session.write_results(
        image, results, classes=classes, model_id=STAND_IN_MODEL_ID, version="test", tiles=heatmap
    )
    return cells, results, heatmap, summary


def _read_back(project: Path, slides_dir: Path) -> tuple[list[dict], dict]:
    """Return the image's detections as QuPath GeoJSON and its metadata, from a fresh session."""
    with open_project(project, image_root_remap={OLD_SLIDES_DIR: slides_dir}) as session:
        image = session.images[0]
        features = [f for f in session.object_features(image) if f["properties"]["objectType"] != "annotation"]
        return features, dict(image.entry.metadata)


@pytest.mark.qupath
def test_images_listed_and_relocated(cmu1_project, slides_dir):
    with open_project(cmu1_project, image_root_remap={OLD_SLIDES_DIR: slides_dir}) as session:
        assert len(session.images) == 1
        image = session.images[0]
        assert image.name == "CMU-1-Small-Region.svs"
        assert image.exists
        assert image.path == slides_dir / "CMU-1-Small-Region.svs"
        assert (image.width_px, image.height_px) == (2220, 2967)
        assert image.mpp == pytest.approx(0.499)
        assert image.data_path == cmu1_project / "data" / "1" / "data.qpdata"
        assert not session.missing_images()


@pytest.mark.qupath
def test_missing_image_reported(shared_data, tmp_path, slides_dir):
    project = copy_project(shared_data / "qupath" / "missing_image", tmp_path / "missing_image")
    with open_project(project, mode="r+", image_root_remap={OLD_SLIDES_DIR: slides_dir}) as session:
        missing = session.missing_images()
        assert [image.name for image in missing] == ["deleted_after_save.tif"]
        assert missing[0].path == Path(OLD_IMAGES_DIR) / "deleted_after_save.tif"
        assert session.image("CMU-1-Small-Region.svs").exists
        with pytest.raises(ProjectError, match="deleted_after_save.tif"):
            session.write_results(missing[0], {}, classes=STAND_IN_CLASSES, model_id="m")


@pytest.mark.qupath
def test_read_cells_match_qupath_export(cmu1_project, slides_dir, shared_data):
    export = load_export(shared_data, "cmu1_cells", "CMU-1-Small-Region.svs")
    exported = {f["id"]: f for f in export if f["properties"]["objectType"] == "cell"}
    with open_project(cmu1_project, image_root_remap={OLD_SLIDES_DIR: slides_dir}) as session:
        image = session.images[0]
        cells = session.read_cells(image)
        inside = session.read_cells(image, annotation_class="Tissue")
        with pytest.raises(ProjectError, match="no area annotation of class 'Tumor'"):
            session.read_cells(image, annotation_class="Tumor")
    assert len(cells) == 3802
    assert set(cells.ids) == set(exported)
    assert len(inside) == 3802
    first = cells.ids[0]
    nucleus = shape(exported[first]["nucleusGeometry"])
    assert cells.geometries[0].equals_exact(nucleus, tolerance=0.01)
    assert len(cells.features[0]["properties"]["measurements"]) == 41


@pytest.mark.qupath
def test_write_results_and_read_back(cmu1_project, slides_dir, shared_data):
    original_data = (cmu1_project / "data" / "1" / "data.qpdata").read_bytes()
    with open_project(cmu1_project, mode="r+", image_root_remap={OLD_SLIDES_DIR: slides_dir}) as session:
        image = session.images[0]
        assert not session.is_done(image, STAND_IN_MODEL_ID)
        cells, results, heatmap, summary = _write_stand_in(session, image)
        assert session.is_done(image, STAND_IN_MODEL_ID)
        assert not session.is_done(image, "another-model")
    assert summary.classified == 3802
    assert summary.results_without_object == 0
    assert summary.tiles_removed == 0
    assert summary.tiles_added == len(heatmap)
    assert summary.backup_path.read_bytes() == original_data
    assert summary.backup_path.name.startswith("data.qpdata" + BACKUP_MARK)

    features, metadata = _read_back(cmu1_project, slides_dir)
    assert metadata[METADATA_MODEL_KEY] == STAND_IN_MODEL_ID
    assert metadata[METADATA_VERSION_KEY] == "test"
    by_id = {f["id"]: f for f in features}
    for object_id in cells.ids[:200]:
        props = by_id[object_id]["properties"]
        assert props["classification"]["name"] == results[object_id].class_name
        measurements = props["measurements"]
        assert len([n for n in measurements if not is_nuclass_measurement(n)]) == 41
        for name, value in results[object_id].measurements.items():
            # Cell measurement lists store float32.
            assert measurements[name] == pytest.approx(value, rel=1e-6, abs=1e-6)
    tiles = [f for f in features if f["properties"]["objectType"] == "tile"]
    assert len(tiles) == len(heatmap)
    assert sum(t["properties"]["measurements"][TILE_CELLS_MEASUREMENT] for t in tiles) == 3802

    classes_json = json.loads((cmu1_project / "classifiers" / "classes.json").read_text())
    saved = {c["name"]: c["color"] for c in classes_json["pathClasses"]}
    for name, (r, g, b) in STAND_IN_CLASSES:
        assert saved[name] & 0xFFFFFF == (r << 16) | (g << 8) | b
    assert "Tissue" in saved


@pytest.mark.qupath
def test_write_twice_is_idempotent(cmu1_project, slides_dir):
    remap = {OLD_SLIDES_DIR: slides_dir}
    with open_project(cmu1_project, mode="r+", image_root_remap=remap) as session:
        _write_stand_in(session, session.images[0])
    first, _ = _read_back(cmu1_project, slides_dir)
    with open_project(cmu1_project, mode="r+", image_root_remap=remap) as session:
        _, _, heatmap, summary = _write_stand_in(session, session.images[0])
    second, _ = _read_back(cmu1_project, slides_dir)

    assert summary.tiles_removed == len(heatmap)
    assert len(second) == len(first)
    cells_first = {f["id"]: f["properties"] for f in first if f["properties"]["objectType"] == "cell"}
    cells_second = {f["id"]: f["properties"] for f in second if f["properties"]["objectType"] == "cell"}
    assert cells_first == cells_second
    tiles_second = [f for f in second if f["properties"]["objectType"] == "tile"]
    assert len(tiles_second) == len(heatmap)
    backups = sorted((cmu1_project / "data" / "1").glob("data.qpdata" + BACKUP_MARK + "*"))
    assert len(backups) == 2


@pytest.mark.qupath
def test_rerun_with_fewer_classes_drops_old_measurements(cmu1_project, slides_dir):
    remap = {OLD_SLIDES_DIR: slides_dir}
    with open_project(cmu1_project, mode="r+", image_root_remap=remap) as session:
        _write_stand_in(session, session.images[0], tiles=False)
        _write_stand_in(session, session.images[0], tiles=False, classes=STAND_IN_CLASSES[:2])
    features, _ = _read_back(cmu1_project, slides_dir)
    dropped = probability_measurement(STAND_IN_CLASSES[2][0])
    cells = [f for f in features if f["properties"]["objectType"] == "cell"]
    assert all(dropped not in f["properties"]["measurements"] for f in cells)
    assert all(CONFIDENCE_MEASUREMENT in f["properties"]["measurements"] for f in cells)


@pytest.mark.qupath
def test_project_class_keeps_its_colour(cmu1_project, slides_dir):
    classes = [("Tumor", (1, 2, 3)), ("Stand-in other", (10, 20, 30))]
    with open_project(cmu1_project, mode="r+", image_root_remap={OLD_SLIDES_DIR: slides_dir}) as session:
        image = session.images[0]
        cells = session.read_cells(image)
        probs = np.tile([0.9, 0.1], (len(cells), 1))
        results = results_from_predictions(cells.ids, ["Tumor", "Stand-in other"], probs, probs.max(axis=1))
        summary = session.write_results(image, results, classes=classes, model_id="m")
    assert len(summary.class_color_conflicts) == 1
    assert "Tumor" in summary.class_color_conflicts[0]
    classes_json = json.loads((cmu1_project / "classifiers" / "classes.json").read_text())
    saved = {c["name"]: c["color"] & 0xFFFFFF for c in classes_json["pathClasses"]}
    assert saved["Tumor"] != 0x010203
    assert saved["Stand-in other"] == (10 << 16) | (20 << 8) | 30


@pytest.mark.qupath
def test_read_only_session_rejects_writes(cmu1_project, slides_dir):
    with open_project(cmu1_project, image_root_remap={OLD_SLIDES_DIR: slides_dir}) as session:
        with pytest.raises(ProjectError, match="read-only"):
            session.write_results(session.images[0], {}, classes=STAND_IN_CLASSES, model_id="m")


@pytest.mark.qupath
def test_data_file_changed_by_another_program(cmu1_project, slides_dir):
    with open_project(cmu1_project, mode="r+", image_root_remap={OLD_SLIDES_DIR: slides_dir}) as session:
        image = session.images[0]
        session.read_cells(image)
        with open(image.data_path, "ab") as data_file:
            data_file.write(b"\0")
        with pytest.raises(ProjectError, match="changed since it was read"):
            _write_stand_in(session, image)

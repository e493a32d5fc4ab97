"""``nuclass-qupath project``: classify every image of the QuPath 0.6.0 sample projects.

The files backend runs everywhere, on copies of the sample projects, with a
tiny untrained model whose classes are arbitrary: the tests check what is
written and matched, not what the model predicts. The model reads the slide at
2 µm/px, so the 3802 cells of CMU-1 take seconds. Tests marked ``qupath`` run
the paquo backend and need a QuPath installation (PAQUO_QUPATH_DIR).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import shapely
import torch
from shapely.geometry import shape

from nuclass_qupath.cli import main
from nuclass_qupath.errors import ProjectError
from nuclass_qupath.model import ClassSpec, ModelConfig, NuClass, save_model
from nuclass_qupath.qupath.batch import ProjectRunRequest, parse_image_root, qupath_not_found, run_project
from nuclass_qupath.qupath.project_files import QuPathProjectFiles
from nuclass_qupath.qupath.results import (
    CONFIDENCE_MEASUREMENT,
    GATE_MEASUREMENT,
    METADATA_MODEL_KEY,
    TILE_CELLS_MEASUREMENT,
    TILE_NAME,
    apply_results_to_features,
    fraction_measurement,
    probability_measurement,
    results_from_features,
)
from qupath_results_fixtures import copy_project, load_export

OLD_SLIDES_DIR = "/srv/nuclass-data/slides"
OLD_IMAGES_DIR = "/srv/nuclass-data/qupath/images"
CMU1 = "CMU-1-Small-Region.svs"
TCGA = "TCGA-CR-7395-01A-01-TS1.svs"
MODEL_ID = "tiny-batch-test"
CLASSES = [("Tumor", (200, 0, 0)), ("Stroma", (150, 200, 150)), ("Immune cells", (160, 90, 160))]
NUCLASS_NAMES = [CONFIDENCE_MEASUREMENT, GATE_MEASUREMENT] + [probability_measurement(name) for name, _ in CLASSES]
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(
        model_id=MODEL_ID,
        classes=[ClassSpec(name=name, color=color) for name, color in CLASSES],
        mpp=2.0,
        local_crop_px=64,
        context_px=256,
        context_encoder_px=64,
        local_feature_index=2,
        global_feature_index=2,
        embed_dim=16,
        gate_hidden=8,
        local_sigma_px=8.0,
        global_sigma_px=32.0,
    )
    weights, _ = save_model(NuClass(config), tmp_path_factory.mktemp("model") / "tiny")
    return weights


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """Run ``nuclass-qupath`` in this process; return the exit status, standard output and standard error."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(arg) for arg in args])
    return status, out.getvalue(), err.getvalue()


def read_results(project: Path, image_name: str) -> tuple[list[dict], list[dict], dict]:
    """Return the object features, the tiles and the run metadata written for one image."""
    folder = project / "nuclass_results"
    features = json.loads((folder / f"{image_name}.nuclass.geojson").read_text(encoding="utf-8"))["features"]
    metadata = json.loads((folder / f"{image_name}.nuclass.run.json").read_text(encoding="utf-8"))
    objects = [f for f in features if f["properties"]["objectType"] != "tile"]
    tiles = [f for f in features if f["properties"]["objectType"] == "tile"]
    return objects, tiles, metadata


@pytest.fixture(scope="module")
def cmu1_run(shared_data: Path, slides_dir: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The files backend run once on a copy of cmu1_cells, with 200 µm heatmap tiles."""
    project = copy_project(shared_data / "qupath" / "cmu1_cells", tmp_path_factory.mktemp("cmu1") / "cmu1_cells")
    args = [
        "project", project, "--backend", "files", "--model", tiny_model, "--heatmap-um", "200",
        "--image-root", f"{OLD_SLIDES_DIR}={slides_dir}",
    ]
    status, out, err = run_cli(args)
    objects, tiles, metadata = read_results(project, CMU1)
    export = load_export(shared_data, "cmu1_cells", CMU1)
    return SimpleNamespace(
        project=project, args=args, status=status, out=out, err=err,
        objects=objects, tiles=tiles, metadata=metadata, export=export,
        results_path=project / "nuclass_results" / f"{CMU1}.nuclass.geojson",
    )


# The files backend on cmu1_cells ------------------------------------------------


@pytest.mark.slow
def test_files_backend_classifies_every_cell(cmu1_run) -> None:
    qupath_cells = [f for f in cmu1_run.export if f["properties"]["objectType"] == "cell"]

    assert cmu1_run.status == 0, cmu1_run.err
    assert len(cmu1_run.objects) == 3802
    assert [f["id"] for f in cmu1_run.objects] == [f["id"] for f in qupath_cells]
    assert {f["properties"]["objectType"] for f in cmu1_run.objects} == {"cell"}
    assert all("nucleusGeometry" in f for f in cmu1_run.objects)
    assert f"[1/1] {CMU1}: 3802 cells (Tumor " in cmu1_run.out
    assert "1 images: 1 classified, 0 skipped, 0 failed" in cmu1_run.out


@pytest.mark.slow
def test_files_backend_keeps_qupath_measurements(cmu1_run) -> None:
    qupath_by_id = {f["id"]: f for f in cmu1_run.export}
    colors = {name: list(color) for name, color in CLASSES}
    for feature in cmu1_run.objects:
        qupath = qupath_by_id[feature["id"]]["properties"]["measurements"]
        measurements = feature["properties"]["measurements"]
        assert len(qupath) == 41
        assert list(measurements) == list(qupath) + NUCLASS_NAMES, feature["id"]
        assert {k: measurements[k] for k in qupath} == qupath, feature["id"]
        probs = [measurements[probability_measurement(name)] for name, _ in CLASSES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert measurements[CONFIDENCE_MEASUREMENT] == pytest.approx(max(probs), abs=1e-5)
        classification = feature["properties"]["classification"]
        assert classification["color"] == colors[classification["name"]]
        assert CLASSES[int(np.argmax(probs))][0] == classification["name"]


@pytest.mark.slow
def test_files_backend_heatmap_tiles(cmu1_run) -> None:
    assert cmu1_run.tiles
    assert sum(t["properties"]["measurements"][TILE_CELLS_MEASUREMENT] for t in cmu1_run.tiles) == 3802
    side_px = 200 / 0.499
    for tile in cmu1_run.tiles:
        props = tile["properties"]
        assert props["name"] == TILE_NAME
        fractions = [props["measurements"][fraction_measurement(name)] for name, _ in CLASSES]
        assert sum(fractions) == pytest.approx(1.0)
        x0, y0, x1, y1 = shape(tile["geometry"]).bounds
        assert x1 - x0 <= side_px + 0.01
        assert y1 - y0 <= side_px + 0.01


@pytest.mark.slow
def test_files_backend_run_metadata(cmu1_run) -> None:
    metadata = cmu1_run.metadata

    assert metadata["model"]["model_id"] == MODEL_ID
    assert metadata["backend"] == "files"
    assert metadata["image"]["name"] == CMU1
    assert metadata["image"]["mpp"] == pytest.approx(0.499)
    assert metadata["image"]["mpp_source"] == "slide metadata"
    assert metadata["cells"] == {"count": 3802, "source": "project", "annotation_class": None}
    assert sum(metadata["class_counts"].values()) == 3802
    assert metadata["heatmap"]["tiles"] == len(cmu1_run.tiles)


@pytest.mark.slow
def test_files_results_apply_to_qupath_objects(cmu1_run) -> None:
    # The import script's rules, applied in Python to QuPath's own export of the image.
    results = results_from_features(cmu1_run.objects)
    applied, stats = apply_results_to_features(
        cmu1_run.export, results, colors=dict(CLASSES), tiles=cmu1_run.tiles
    )

    assert stats.classified == 3802
    assert stats.results_without_object == 0
    assert stats.tiles_added == len(cmu1_run.tiles)
    assert len(applied) == len(cmu1_run.export) + len(cmu1_run.tiles)


@pytest.mark.slow
def test_files_backend_rerun_is_idempotent(cmu1_run) -> None:
    before = cmu1_run.results_path.read_bytes()

    status, _, err = run_cli(cmu1_run.args)

    assert status == 0, err
    assert cmu1_run.results_path.read_bytes() == before


@pytest.mark.slow
def test_files_backend_resume_skips_done_image(cmu1_run) -> None:
    modified_ns = cmu1_run.results_path.stat().st_mtime_ns

    status, out, err = run_cli([*cmu1_run.args, "--resume"])

    assert status == 0, err
    assert f"[1/1] {CMU1}: skipped, already classified by model {MODEL_ID}" in out
    assert "1 images: 0 classified, 1 skipped, 0 failed" in out
    assert cmu1_run.results_path.stat().st_mtime_ns == modified_ns


# Failures, options and other projects ---------------------------------------------


@pytest.mark.slow
def test_missing_image_fails_and_run_goes_on(shared_data: Path, slides_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    # Image 1 has only a Tumor rectangle, so its nuclei are detected there; image 2's file is gone.
    project = copy_project(shared_data / "qupath" / "missing_image", tmp_path / "missing_image")

    status, out, err = run_cli([
        "project", project, "--backend", "files", "--model", tiny_model, "--detect",
        "--annotation-class", "Tumor", "--image-root", f"{OLD_SLIDES_DIR}={slides_dir}",
    ])

    assert status == 1, err
    assert f"[1/2] {CMU1}: " in out
    assert "[2/2] deleted_after_save.tif: FAILED: image file not found: /srv/nuclass-data/qupath/images/deleted_after_save.tif" in out
    assert "2 images: 1 classified, 0 skipped, 1 failed" in out
    objects, _, metadata = read_results(project, CMU1)
    assert objects
    assert metadata["cells"]["source"] == "detector"
    assert {f["properties"]["objectType"] for f in objects} == {"detection"}
    rectangle = shapely.box(900, 2000, 1300, 2300)
    centroids = [shape(f["geometry"]).centroid for f in objects]
    assert all(rectangle.contains(point) for point in centroids)
    assert not (project / "nuclass_results" / "deleted_after_save.tif.nuclass.geojson").exists()


def test_image_without_cells_names_detect(shared_data: Path, slides_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    project = copy_project(shared_data / "qupath" / "missing_image", tmp_path / "missing_image")

    status, out, _ = run_cli([
        "project", project, "--backend", "files", "--model", tiny_model, "--images", CMU1,
        "--image-root", f"{OLD_SLIDES_DIR}={slides_dir}",
    ])

    assert status == 1
    assert f"[1/1] {CMU1}: FAILED: image '{CMU1}' has no cells or detections" in out
    assert "--detect" in out


def test_no_pixel_size_fails_without_mpp(shared_data: Path, slides_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    project = copy_project(shared_data / "qupath" / "tcga_no_mpp", tmp_path / "tcga_no_mpp")

    status, out, _ = run_cli([
        "project", project, "--backend", "files", "--model", tiny_model,
        "--image-root", f"{OLD_SLIDES_DIR}={slides_dir}",
    ])

    assert status == 1
    assert f"[1/1] {TCGA}: FAILED: image '{TCGA}' has no pixel size" in out
    assert "pass --mpp" in out
    assert not (project / "nuclass_results" / f"{TCGA}.nuclass.geojson").exists()


@pytest.mark.slow
def test_no_pixel_size_works_with_mpp(shared_data: Path, slides_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    project = copy_project(shared_data / "qupath" / "tcga_no_mpp", tmp_path / "tcga_no_mpp")

    status, out, err = run_cli([
        "project", project, "--backend", "files", "--model", tiny_model, "--mpp", "0.5", "--heatmap-um", "50",
        "--image-root", f"{OLD_SLIDES_DIR}={slides_dir}",
    ])

    assert status == 0, err
    assert f"[1/1] {TCGA}: 106 cells (" in out
    objects, tiles, metadata = read_results(project, TCGA)
    expected = [f["id"] for f in load_export(shared_data, "tcga_no_mpp", TCGA) if f["properties"]["objectType"] != "annotation"]
    assert [f["id"] for f in objects] == expected
    assert metadata["image"]["mpp"] == 0.5
    assert metadata["image"]["mpp_source"] == "--mpp"
    assert sum(t["properties"]["measurements"][TILE_CELLS_MEASUREMENT] for t in tiles) == 106


@pytest.mark.slow
def test_annotation_class_selects_cells(shared_data: Path, slides_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    project = copy_project(shared_data / "qupath" / "mixed_objects", tmp_path / "mixed_objects")
    export = load_export(shared_data, "mixed_objects", CMU1)
    [region] = [
        shape(f["geometry"]) for f in export
        if f["properties"]["objectType"] == "annotation"
        and (f["properties"].get("classification") or {}).get("name") == "Region*"
    ]
    expected = [
        f["id"] for f in export
        if f["properties"]["objectType"] in ("cell", "detection")
        and region.contains(shape(f.get("nucleusGeometry") or f["geometry"]).centroid)
    ]

    status, out, err = run_cli([
        "project", project, "--backend", "files", "--model", tiny_model, "--images", CMU1,
        "--annotation-class", "Region*", "--heatmap-um", "50", "--image-root", f"{OLD_SLIDES_DIR}={slides_dir}",
    ])

    assert status == 0, err
    objects, tiles, metadata = read_results(project, CMU1)
    assert len(expected) == 156
    assert [f["id"] for f in objects] == expected
    assert metadata["cells"]["annotation_class"] == "Region*"
    assert all(region.buffer(0.01).contains(shape(t["geometry"])) for t in tiles)
    assert not (project / "nuclass_results" / "cmu1_crop_rgb.tif.nuclass.geojson").exists()


def test_missing_annotation_class_lists_classes(shared_data: Path, slides_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    project = copy_project(shared_data / "qupath" / "tcga_no_mpp", tmp_path / "tcga_no_mpp")

    status, out, _ = run_cli([
        "project", project, "--backend", "files", "--model", tiny_model, "--mpp", "0.5",
        "--annotation-class", "Necrosis", "--image-root", f"{OLD_SLIDES_DIR}={slides_dir}",
    ])

    assert status == 1
    assert "no area annotation of class 'Necrosis'; annotation classes present: Tumor" in out


def test_images_option_selects_one_image(shared_data: Path, tiny_model: Path, tmp_path: Path) -> None:
    project = copy_project(shared_data / "qupath" / "mixed_objects", tmp_path / "mixed_objects")
    images_dir = shared_data / "qupath" / "images"

    status, out, err = run_cli([
        "project", project, "--backend", "files", "--model", tiny_model, "--images", "cmu1_crop_rgb.tif",
        "--image-root", f"{OLD_IMAGES_DIR}={images_dir}",
    ])

    assert status == 0, err
    assert "[1/1] cmu1_crop_rgb.tif: 3 cells (" in out
    objects, _, metadata = read_results(project, "cmu1_crop_rgb.tif")
    assert [f["properties"]["objectType"] for f in objects] == ["detection"] * 3
    assert metadata["image"]["mpp"] == pytest.approx(0.499)
    assert not (project / "nuclass_results" / f"{CMU1}.nuclass.geojson").exists()


def test_unknown_image_name_exits_2(shared_data: Path, tiny_model: Path, tmp_path: Path) -> None:
    status, out, err = run_cli([
        "project", shared_data / "qupath" / "mixed_objects", "--backend", "files", "--model", tiny_model,
        "--images", "CMU-1.svs", "--output-dir", tmp_path,
    ])

    assert status == 2
    assert "no image named 'CMU-1.svs'" in err
    assert f"images: '{CMU1}', 'cmu1_crop_rgb.tif'" in err
    assert list(tmp_path.iterdir()) == []


def test_output_dir_option(shared_data: Path, slides_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    # The shared project is read-only: --output-dir puts the results elsewhere.
    status, _, err = run_cli([
        "project", shared_data / "qupath" / "tcga_no_mpp", "--backend", "files", "--model", tiny_model,
        "--mpp", "0.5", "--output-dir", tmp_path / "out", "--image-root", f"{OLD_SLIDES_DIR}={slides_dir}",
    ])

    assert status == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"{TCGA}.nuclass.geojson", f"{TCGA}.nuclass.run.json",
    ]


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("PAQUO_QUPATH_DIR")), reason="QuPath is installed, so auto uses paquo")
def test_auto_backend_falls_back_to_files(shared_data: Path, slides_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    project = copy_project(shared_data / "qupath" / "tcga_no_mpp", tmp_path / "tcga_no_mpp")

    status, out, err = run_cli([
        "project", project, "--model", tiny_model, "--mpp", "0.5", "--image-root", f"{OLD_SLIDES_DIR}={slides_dir}",
    ])

    assert status == 0, err
    assert "QuPath is not installed" in out
    assert "groovy/import_batch_results.groovy" in out
    assert str(project / "nuclass_results") in out
    assert (project / "nuclass_results" / f"{TCGA}.nuclass.geojson").is_file()


def test_bad_image_root_exits_2(shared_data: Path, tmp_path: Path) -> None:
    status, _, err = run_cli(["project", shared_data / "qupath" / "empty", "--image-root", "/old/only"])

    assert status == 2
    assert "expected OLD=NEW" in err


def test_project_without_images_fails(shared_data: Path, tmp_path: Path) -> None:
    status, _, err = run_cli(["project", shared_data / "qupath" / "empty", "--backend", "files", "--output-dir", tmp_path])

    assert status == 1
    assert "has no images" in err


@pytest.mark.parametrize(
    ("value", "expected"),
    [("/srv/slides=/data/slides", ("/srv/slides", "/data/slides")), ("C:/a=D:/b=c", ("C:/a", "D:/b=c"))],
)
def test_parse_image_root(value: str, expected: tuple[str, str]) -> None:
    assert parse_image_root(value) == expected


def test_qupath_not_found_is_narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    def chained(cause: BaseException) -> ProjectError:
        try:
            raise ProjectError("QuPath could not be started through paquo") from cause
        except ProjectError as exc:
            return exc

    monkeypatch.delenv("PAQUO_QUPATH_DIR", raising=False)
    assert qupath_not_found(chained(ValueError("no valid qupath installation found")))
    assert qupath_not_found(chained(ModuleNotFoundError("No module named 'jpype'")))
    assert not qupath_not_found(chained(FileNotFoundError("qupath installation is incompatible")))
    assert not qupath_not_found(ProjectError("QuPath project not found: /x/project.qpproj does not exist"))
    monkeypatch.setenv("PAQUO_QUPATH_DIR", "/opt/QuPath")
    assert not qupath_not_found(chained(ValueError("no valid qupath installation found")))


# The sample project in the repository ---------------------------------------------


def test_sample_project_resolves_its_slide(shared_data: Path) -> None:
    project = QuPathProjectFiles(REPO_ROOT / "sample_projects" / "cmu1_project")
    [image] = project.images

    assert image.image_name == CMU1
    assert image.exists is True
    assert image.image_path == (REPO_ROOT / "sample_projects" / CMU1).resolve()
    assert image.calibration.mpp == pytest.approx(0.499)
    header = image.read_image_data()
    assert (header.width_px, header.height_px) == (2220, 2967)


def test_sample_project_is_qupaths_files(shared_data: Path) -> None:
    # Only the project's recorded location differs from what QuPath wrote.
    sample = REPO_ROOT / "sample_projects" / "cmu1_project"
    original = shared_data / "qupath" / "cmu1_cells"
    ours = json.loads((sample / "project.qpproj").read_text(encoding="utf-8"))
    theirs = json.loads((original / "project.qpproj").read_text(encoding="utf-8"))

    assert ours.pop("uri") == "file:/srv/nuclass-data/slides/cmu1_project/project.qpproj"
    theirs.pop("uri")
    assert ours == theirs
    for name in ("data/1/data.qpdata", "data/1/server.json", "data/1/summary.json", "classifiers/classes.json"):
        assert (sample / name).read_bytes() == (original / name).read_bytes(), name


# The paquo backend (needs QuPath) -------------------------------------------------


@pytest.mark.qupath
@pytest.mark.slow
def test_paquo_backend_writes_into_project(shared_data: Path, slides_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    from nuclass_qupath.qupath.paquo_project import BACKUP_MARK, open_project

    project = copy_project(shared_data / "qupath" / "cmu1_cells", tmp_path / "cmu1_cells")
    request = ProjectRunRequest(
        project_path=project, model_path=tiny_model, heatmap_tile_um=200.0, backend="paquo",
        image_root_remap={OLD_SLIDES_DIR: str(slides_dir)},
    )

    report = run_project(request)

    assert report.backend == "paquo"
    assert [(r.status, r.n_cells) for r in report.results] == [("classified", 3802)]
    assert list((project / "data" / "1").glob(f"data.qpdata{BACKUP_MARK}*"))
    assert (project / "nuclass_results" / f"{CMU1}.nuclass.run.json").is_file()
    with open_project(project, image_root_remap={OLD_SLIDES_DIR: slides_dir}) as session:
        image = session.images[0]
        features = session.object_features(image)
        assert image.entry.metadata[METADATA_MODEL_KEY] == MODEL_ID
    cells = [f for f in features if f["properties"]["objectType"] == "cell"]
    tiles = [f for f in features if f["properties"]["objectType"] == "tile"]
    assert len(cells) == 3802
    assert all(f["properties"]["classification"]["name"] in dict(CLASSES) for f in cells)
    assert all(list(f["properties"]["measurements"])[-5:] == NUCLASS_NAMES for f in cells)
    assert sum(t["properties"]["measurements"][TILE_CELLS_MEASUREMENT] for t in tiles) == 3802

    resumed = run_project(dataclasses.replace(request, resume=True))
    assert [r.status for r in resumed.results] == ["skipped"]


@pytest.mark.qupath
def test_paquo_backend_adds_detected_nuclei(shared_data: Path, slides_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    from nuclass_qupath.qupath.paquo_project import open_project

    project = copy_project(shared_data / "qupath" / "missing_image", tmp_path / "missing_image")
    report = run_project(ProjectRunRequest(
        project_path=project, model_path=tiny_model, backend="auto", detect=True, annotation_class="Tumor",
        image_names=[CMU1], image_root_remap={OLD_SLIDES_DIR: str(slides_dir)},
    ))

    assert report.backend == "paquo"
    [result] = report.results
    assert result.status == "classified"
    with open_project(project, image_root_remap={OLD_SLIDES_DIR: slides_dir}) as session:
        features = session.object_features(session.image(CMU1))
    detections = [f for f in features if f["properties"]["objectType"] == "detection"]
    assert len(detections) == result.n_cells
    assert all(f["properties"]["classification"]["name"] in dict(CLASSES) for f in detections)

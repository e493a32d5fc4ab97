"""Command-line input checks: bounds, output paths, messages, Ctrl-C and command loading.

Every check here runs before a slide is read or a model is loaded, so these
tests classify nothing, except the ``project`` runs, which load a tiny
untrained model and fail on a missing image file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nuclass_qupath.cli as cli
from nuclass_qupath.cli import main
from nuclass_qupath.cli._args import GEOJSON_SUFFIXES, OutputPathError, check_output_dir, check_output_file
from nuclass_qupath.cells.geojson import read_cells_geojson
from nuclass_qupath.errors import CellsError
from qupath_results_fixtures import copy_project

REPO_ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
HEAVY_MODULES = ("torch", "timm", "openslide")
MISSING_IMAGE = "deleted_after_save.tif"


def run_cli(args: list) -> tuple[int, str, str]:
    """Run ``nuclass-qupath`` in this process; return the exit status, standard output and standard error.

    An argparse error exits through SystemExit, whose code is returned.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(arg) for arg in args])
        except SystemExit as exc:
            status = exc.code
    return status, out.getvalue(), err.getvalue()


def run_cli_process(args: list) -> tuple[int, str, list[str], float]:
    """Run the CLI in a fresh interpreter; return its status, standard error, heavy modules imported, and seconds."""
    script = (
        "import json, sys\n"
        "from nuclass_qupath.cli import main\n"
        "try:\n"
        "    status = main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    status = exc.code\n"
        f"print(json.dumps(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)))\n"
        "sys.exit(status)\n"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", script, *[str(arg) for arg in args]],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    seconds = time.perf_counter() - started
    return done.returncode, done.stderr, json.loads(done.stdout.strip().splitlines()[-1]), seconds


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained model: enough for a project run whose images all fail."""
    import torch

    from nuclass_qupath.model import ClassSpec, ModelConfig, NuClass, save_model

    torch.manual_seed(0)
    config = ModelConfig(
        model_id="tiny-cli-test",
        classes=[ClassSpec(name="Tumor", color=(200, 0, 0)), ClassSpec(name="Stroma", color=(150, 200, 150))],
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


# classify: output destinations --------------------------------------------------


def test_classify_output_under_file_exits_1(cmu1_path: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")

    status, out, err = run_cli(["classify", cmu1_path, "-o", blocker / "cells.geojson"])

    assert status == 1
    assert error_lines(err) == [
        f"nuclass-qupath classify: error: --output: cannot write {blocker / 'cells.geojson'} because {blocker} "
        "is a file, not a folder; choose another path"
    ]
    assert out == ""


def test_classify_output_folder_exits_1(cmu1_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cells.geojson"
    folder.mkdir()

    status, _, err = run_cli(["classify", cmu1_path, "-o", folder])

    assert status == 1
    assert error_lines(err) == [
        f"nuclass-qupath classify: error: --output: {folder} is a folder; "
        f"give a file name such as {folder / 'output.geojson'}"
    ]


def test_classify_preview_folder_exits_1(cmu1_path: Path, tmp_path: Path) -> None:
    status, _, err = run_cli(["classify", cmu1_path, "-o", tmp_path / "cells.geojson", "--preview", tmp_path])

    assert status == 1
    assert f"--preview: {tmp_path} is a folder; give a file name such as {tmp_path / 'output.png'}" in err
    assert list(tmp_path.iterdir()) == []


def test_classify_preview_needs_png(cmu1_path: Path, tmp_path: Path) -> None:
    status, _, err = run_cli(["classify", cmu1_path, "-o", tmp_path / "c.geojson", "--preview", tmp_path / "p.jpg"])

    assert status == 1
    assert f"--preview: {tmp_path / 'p.jpg'} must end in .png; e.g. {tmp_path / 'p.png'}" in err


@pytest.mark.skipif(IS_ROOT, reason="root may write into any folder, whatever its permissions")
def test_classify_output_read_only_folder_exits_1(cmu1_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        status, _, err = run_cli(["classify", cmu1_path, "-o", folder / "new" / "cells.geojson"])
    finally:
        folder.chmod(0o755)

    assert status == 1
    assert f"--output: folder {folder} (the closest existing folder of {folder / 'new'}) is not writable" in err


def test_classify_output_missing_folders_pass(tmp_path: Path) -> None:
    # The writers create missing folders, so only the closest existing one must be writable.
    target = tmp_path / "new" / "deeper" / "cells.geojson"

    check_output_file(target, "--output", GEOJSON_SUFFIXES)

    assert list(tmp_path.iterdir()) == []


def test_classify_missing_slide_exits_1(tmp_path: Path) -> None:
    status, _, err = run_cli(["classify", tmp_path / "absent.svs", "-o", tmp_path / "cells.geojson"])

    assert status == 1
    assert error_lines(err) == [f"nuclass-qupath classify: error: SLIDE: {tmp_path / 'absent.svs'} not found; check the path"]


def test_classify_same_output_and_metadata(cmu1_path: Path, tmp_path: Path) -> None:
    target = tmp_path / "cells.json"

    status, _, err = run_cli(["classify", cmu1_path, "-o", target, "--metadata", target])

    assert status == 1
    assert f"--output and --metadata both write {target}; give them different file names" in err


def test_classify_output_naming_cells_input_exits_1(cmu1_path: Path, tmp_path: Path) -> None:
    cells = tmp_path / "cells.geojson"
    original = '{"type": "FeatureCollection", "features": []}'
    cells.write_text(original, encoding="utf-8")

    status, _, err = run_cli(["classify", cmu1_path, "--cells", cells, "-o", tmp_path / "." / "cells.geojson"])

    assert status == 1
    assert f"--output would overwrite the --cells file {cells}; write to another file name" in err
    assert cells.read_text(encoding="utf-8") == original


def test_classify_path_checks_skip_heavy_imports(cmu1_path: Path, tmp_path: Path) -> None:
    status, err, heavy, seconds = run_cli_process(["classify", cmu1_path, "-o", tmp_path])

    assert status == 1, err
    assert "is a folder" in err
    assert heavy == []
    assert seconds < 10


# classify: output suffix ----------------------------------------------------------


@pytest.mark.parametrize("name", ["cells.csv", "cells.geojsonl", "cells.gz", "cells"])
def test_classify_rejects_output_suffix(cmu1_path: Path, tmp_path: Path, name: str) -> None:
    status, _, err = run_cli(["classify", cmu1_path, "-o", tmp_path / name])

    assert status == 1
    assert f"--output: {tmp_path / name} must end in .geojson, .geojson.gz, .json, .json.gz;" in err
    assert len(error_lines(err)) == 1


@pytest.mark.parametrize("name", ["cells.geojson", "cells.geojson.gz", "cells.json", "cells.json.gz", "CELLS.GEOJSON"])
def test_output_check_accepts_writer_suffixes(tmp_path: Path, name: str) -> None:
    check_output_file(tmp_path / name, "--output", GEOJSON_SUFFIXES)


# export-geojson and project: output folders ----------------------------------------


def test_export_output_dir_is_file_exits_1(shared_data: Path, tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("a file")

    status, out, err = run_cli(["export-geojson", shared_data / "qupath" / "tcga_no_mpp", "-o", target])

    assert status == 1
    assert error_lines(err) == [
        f"nuclass-qupath export-geojson: error: --output-dir: {target} is a file, not a folder; choose a folder"
    ]
    assert out == ""


def test_export_output_dir_under_file_exits_1(shared_data: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")

    status, _, err = run_cli(["export-geojson", shared_data / "qupath" / "tcga_no_mpp", "-o", blocker / "out"])

    assert status == 1
    assert f"--output-dir: cannot create folder {blocker / 'out'} because {blocker} is a file" in err


@pytest.mark.skipif(IS_ROOT, reason="root may write into any folder, whatever its permissions")
def test_export_read_only_output_dir_exits_1(shared_data: Path, tmp_path: Path) -> None:
    tmp_path.chmod(0o555)
    try:
        status, _, err = run_cli(["export-geojson", shared_data / "qupath" / "tcga_no_mpp", "-o", tmp_path])
    finally:
        tmp_path.chmod(0o755)

    assert status == 1
    assert f"--output-dir: folder {tmp_path} is not writable; choose a folder you can write to" in err


def test_project_output_dir_under_file_exits_1(shared_data: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")

    status, out, err = run_cli([
        "project", shared_data / "qupath" / "tcga_no_mpp", "--backend", "files", "--output-dir", blocker / "results",
    ])

    assert status == 1
    assert error_lines(err) == [
        f"nuclass-qupath project: error: --output-dir: cannot create folder {blocker / 'results'} because "
        f"{blocker} is a file; choose another folder"
    ]
    assert out == ""


def test_project_default_results_folder_names_option(shared_data: Path, tmp_path: Path) -> None:
    project = copy_project(shared_data / "qupath" / "tcga_no_mpp", tmp_path / "project")
    (project / "nuclass_results").write_text("a file where the results folder goes")

    status, _, err = run_cli(["project", project, "--backend", "files"])

    assert status == 1
    assert (
        f"results folder (choose another with --output-dir): {project / 'nuclass_results'} is a file, not a folder"
        in err
    )


def test_check_output_dir_accepts_new_folder(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "a" / "b", "--output-dir")

    assert not (tmp_path / "a").exists()


def test_check_output_dir_rejects_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")

    with pytest.raises(OutputPathError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "f", "--output-dir")


# Numeric bounds --------------------------------------------------------------------

BOUNDS = [
    (["classify", "s.svs", "-o", "c.geojson", "--region-px", "0"], "--region-px: must be at least 64 and at most 8192 px, got 0"),
    (["classify", "s.svs", "-o", "c.geojson", "--region-px", "100000"], "must be at least 64 and at most 8192 px, got 100000"),
    (["classify", "s.svs", "-o", "c.geojson", "--region-px", "1.5"], "--region-px: expected a whole number of px, got '1.5'"),
    (["classify", "s.svs", "-o", "c.geojson", "--mpp", "0"], "--mpp: must be at least 0.01 and at most 10 µm/px, got 0"),
    (["classify", "s.svs", "-o", "c.geojson", "--mpp", "nan"], "--mpp: must be at least 0.01 and at most 10 µm/px, got nan"),
    (["classify", "s.svs", "-o", "c.geojson", "--mpp", "250"], "got 250; give the level-0 pixel size in µm per pixel"),
    (["classify", "s.svs", "-o", "c.geojson", "--mpp", "abc"], "--mpp: expected a number of µm/px, got 'abc'"),
    (["classify", "s.svs", "-o", "c.geojson", "--heatmap-um", "0"], "--heatmap-um: must be at least 1 and at most 10000 µm, got 0"),
    (["classify", "s.svs", "-o", "c.geojson", "--heatmap-um", "inf"], "--heatmap-um: must be at least 1 and at most 10000 µm"),
    (["classify", "s.svs", "-o", "c.geojson", "--threads", "0"], "--threads: must be at least 1 and at most"),
    (["classify", "s.svs", "-o", "c.geojson", "--threads", "100000"], "got 100000; this machine has"),
    (["project", "p", "--mpp", "-0.5"], "--mpp: must be at least 0.01 and at most 10 µm/px, got -0.5"),
    (["project", "p", "--heatmap-um", "-1"], "--heatmap-um: must be at least 1 and at most 10000 µm, got -1"),
    (["explain", "s.svs", "--xy", "nan,5", "-o", "d"], "X and Y must be finite level-0 pixel coordinates, got 'nan,5'"),
    (["explain", "s.svs", "--xy", "1,2", "--mpp", "0", "-o", "d"], "--mpp: must be at least 0.01"),
    (["xenium-labels", "b", "--he", "s", "--alignment", "a", "-o", "l.csv", "--min-confidence", "1.5"],
     "--min-confidence: must be at least 0 and at most 1, got 1.5"),
    (["xenium-labels", "b", "--he", "s", "--alignment", "a", "-o", "l.csv", "--n-neighbors", "0"],
     "--n-neighbors: must be at least 1, got 0"),
    (["xenium-labels", "b", "--he", "s", "--alignment", "a", "-o", "l.csv", "--leiden-resolution", "0"],
     "--leiden-resolution: must be greater than 0, got 0"),
    (["xenium-labels", "b", "--he", "s", "--alignment", "a", "-o", "l.csv", "--max-off-slide", "2"],
     "--max-off-slide: must be at least 0 and at most 1, got 2"),
    (["xenium-info", "b", "--qv-min", "-1"], "--qv-min: must be at least 0, got -1"),
]


@pytest.mark.parametrize(("argv", "message"), BOUNDS, ids=[" ".join(argv[-2:]) for argv, _ in BOUNDS])
def test_numeric_option_out_of_bounds_exits_2(argv: list[str], message: str) -> None:
    status, out, err = run_cli(argv)

    assert status == 2
    assert message in err
    assert out == ""


@pytest.mark.parametrize(("option", "value", "attribute", "expected"), [
    ("--region-px", "64", "region_px", 64),
    ("--region-px", "8192", "region_px", 8192),
    ("--mpp", "0.25", "mpp", 0.25),
    ("--heatmap-um", "1", "heatmap_um", 1.0),
    ("--threads", "1", "threads", 1),
])
def test_numeric_option_at_bound_parses(option: str, value: str, attribute: str, expected: float) -> None:
    args = cli.build_parser().parse_args(["classify", "s.svs", "-o", "c.geojson", option, value])

    assert getattr(args, attribute) == expected


def test_bad_mpp_fails_before_heavy_imports(cmu1_path: Path, tmp_path: Path) -> None:
    status, err, heavy, seconds = run_cli_process(["classify", cmu1_path, "-o", tmp_path / "c.geojson", "--mpp", "0"])

    assert status == 2
    assert "--mpp: must be at least 0.01 and at most 10 µm/px, got 0" in err
    assert heavy == []
    assert seconds < 10


# Messages for CLI users -------------------------------------------------------------


def _write_features(path: Path, features: list[dict]) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}), encoding="utf-8")
    return path


def _feature(object_type: str, geometry: dict) -> dict:
    return {"type": "Feature", "geometry": geometry, "properties": {"objectType": object_type}}


def test_no_cells_message_names_no_python_parameters(tmp_path: Path) -> None:
    line = _feature("annotation", {"type": "LineString", "coordinates": [[0, 0], [10, 10]]})
    path = _write_features(tmp_path / "lines.geojson", [line])

    with pytest.raises(CellsError) as raised:
        read_cells_geojson(path)

    message = str(raised.value)
    assert "Export detections, cells or point annotations from QuPath" in message
    assert "object_types" not in message
    assert "class_names" not in message


def test_no_cells_message_names_parameters_passed(tmp_path: Path) -> None:
    square = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    path = _write_features(tmp_path / "cells.geojson", [_feature("detection", square)])

    with pytest.raises(CellsError, match="pass other object_types or class_names"):
        read_cells_geojson(path, class_names=["Tumor"])


def test_ignored_annotations_log_says_what_to_export(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    square = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]]}
    far_square = {"type": "Polygon", "coordinates": [[[50, 50], [60, 50], [60, 60], [50, 60], [50, 50]]]}
    path = _write_features(tmp_path / "mixed.geojson", [_feature("detection", square), _feature("annotation", far_square)])

    with caplog.at_level(logging.INFO, logger="nuclass_qupath.cells"):
        cells = read_cells_geojson(path)

    assert len(cells) == 1
    [record] = [r for r in caplog.records if "ignored 1 annotations" in r.getMessage()]
    assert "export the annotations to a file of their own" in record.getMessage()


# project: output printed once -------------------------------------------------------


@pytest.fixture(scope="module")
def missing_image_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    """Run ``project`` once on an image whose file is gone; return the project, status, output and log records.

    Without QuPath the ``auto`` backend falls back to files, so one run shows
    the fallback line too. Building the classifier takes about 20 s on two
    busy cores, which is why the project tests share this run.
    """
    project = copy_project(shared_data / "qupath" / "missing_image", tmp_path_factory.mktemp("run") / "missing_image")
    backend = "files" if os.environ.get("PAQUO_QUPATH_DIR") else "auto"
    handler = _RecordingHandler()
    package_logger = logging.getLogger("nuclass_qupath")
    previous_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG)
    try:
        status, out, err = run_cli([
            "project", project, "--backend", backend, "--model", tiny_model, "--images", MISSING_IMAGE,
        ])
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)
    return project, status, out, err, handler.records


class _RecordingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.slow
def test_project_failure_printed_once(missing_image_run) -> None:
    _, status, out, err, records = missing_image_run

    assert status == 1, err
    assert out.count(f"{MISSING_IMAGE}: FAILED: image file not found") == 1
    # The CLI prints the outcome, so the library logs it at DEBUG only.
    failure_records = [r for r in records if r.getMessage().startswith(f"{MISSING_IMAGE}: failed:")]
    assert [r.levelno for r in failure_records] == [logging.DEBUG]


@pytest.mark.slow
def test_project_summary_without_results_names_no_folder(missing_image_run) -> None:
    project, status, out, _, _ = missing_image_run

    assert status == 1
    assert "1 images: 0 classified, 0 skipped, 1 failed; no new results written" in out
    assert "results in" not in out
    assert not (project / "nuclass_results").exists()


@pytest.mark.slow
@pytest.mark.skipif(bool(os.environ.get("PAQUO_QUPATH_DIR")), reason="QuPath is installed, so auto uses paquo")
def test_project_fallback_printed_once(missing_image_run) -> None:
    _, status, out, _, records = missing_image_run

    assert status == 1
    assert out.count("QuPath is not installed") == 1
    fallback_records = [r for r in records if "QuPath is not installed" in r.getMessage()]
    assert [r.levelno for r in fallback_records] == [logging.DEBUG]


# Ctrl-C --------------------------------------------------------------------------------


def test_interrupt_exits_130_and_keeps_finished_files(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nuclass_qupath.qupath.export as export

    write_image = export.export_image_geojson

    def write_then_interrupt(entry, path, **kwargs):
        # As if Ctrl-C came right after the first file was renamed into place.
        write_image(entry, path, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_image_geojson", write_then_interrupt)
    out_dir = tmp_path / "out"

    status, _, err = run_cli(["export-geojson", shared_data / "qupath" / "mixed_objects", "-o", out_dir])

    assert status == 130
    assert error_lines(err) == ["nuclass-qupath export-geojson: interrupted; no partial output was written"]
    [written] = list(out_dir.iterdir())
    assert written.name == "CMU-1-Small-Region.svs.geojson"
    assert json.loads(written.read_text(encoding="utf-8"))["type"] == "FeatureCollection"


def test_write_error_exits_1_without_traceback(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import nuclass_qupath.qupath.export as export

    def disk_full(entry, path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(export, "export_image_geojson", disk_full)
    out_dir = tmp_path / "out"

    status, _, err = run_cli(["export-geojson", shared_data / "qupath" / "mixed_objects", "-o", out_dir])

    assert status == 1
    [line] = error_lines(err)
    assert line.startswith("nuclass-qupath export-geojson: error: No space left on device: ")
    assert "free space or choose another output folder" in line
    assert "Traceback" not in err


# Command modules ---------------------------------------------------------------------


def test_missing_command_module_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "no_such_command"))

    with pytest.raises(ImportError, match=r"nuclass_qupath\.cli\.no_such_command failed to import") as raised:
        cli.build_parser()

    assert raised.value.name == "nuclass_qupath.cli.no_such_command"


def test_command_with_missing_dependency_is_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "needs_missing_package.py").write_text("import nuclass_no_such_package\n", encoding="utf-8")
    monkeypatch.setattr(cli, "__path__", [*cli.__path__, str(tmp_path)])
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "needs_missing_package"))

    with pytest.raises(ImportError, match="No module named 'nuclass_no_such_package'") as raised:
        cli.build_parser()

    assert raised.value.name == "nuclass_no_such_package"
    assert "reinstall nuclass-qupath" in str(raised.value)

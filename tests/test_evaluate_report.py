"""The evaluation report: numbers against metrics computed directly, HTML structure, figures, the command."""

from __future__ import annotations

import base64
import dataclasses
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from evaluation_fixtures import (  # noqa: F401
    nucls_class_names,
    nucls_dir,
    nucls_set,
    nucls_work_dir,
    tiny_config,
    trained_tiny_model,
)
from PIL import Image

from nuclass_qupath.cli import main
from nuclass_qupath.errors import CellsError
from nuclass_qupath.evaluation.metrics import classification_report, expected_calibration_error
from nuclass_qupath.evaluation.report import PATH_TITLES, evaluate_model, evaluation_from_outputs, write_report
from nuclass_qupath.model import NuClass, save_model
from nuclass_qupath.model.config import Temperatures
from nuclass_qupath.training.trainer import predict_crop_set

# Keys of predict_crop_set's probabilities for each report path.
OUTPUT_KEYS = {"local": "probs_local", "global": "probs_global", "gated": "probs"}
TEST_TEMPERATURES = Temperatures(local=1.7, global_=0.8, mixture=1.3, fitted_on="values set by the test")


class ReportParser(HTMLParser):
    """Collect the text of every table cell by table id, the images and the title."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self.title = ""
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_title:
            self.title += data


def parse_report(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


# Real cells: the tiny model on the held-out NuCLS tiles ---------------------------


@pytest.fixture(scope="module")
def report_run(nucls_dir, nucls_work_dir, tmp_path_factory):
    """The report of the tiny model with set temperatures, and its outputs computed directly."""
    _, _, crops = nucls_set(nucls_dir, "holdout", nucls_work_dir)
    model = trained_tiny_model(nucls_dir, nucls_work_dir)
    model.config.temperatures = TEST_TEMPERATURES
    evaluation = evaluate_model(model, crops)
    out_dir = tmp_path_factory.mktemp("report")
    files = write_report(evaluation, out_dir, data_description="held-out NuCLS tiles")
    calibrated = predict_crop_set(model, crops, calibrated=True)
    uncalibrated = predict_crop_set(model, crops, calibrated=False)
    return crops, evaluation, files, calibrated, uncalibrated


@pytest.mark.slow
def test_report_writes_expected_files(report_run):
    _, _, files, _, _ = report_run
    names = sorted(p.name for p in files.html.parent.iterdir())
    assert names == [
        "confusion_gated.png", "confusion_global.png", "confusion_local.png", "reliability.png",
        "report.html", "report.json",
    ]


@pytest.mark.slow
def test_report_html_parses_with_title(report_run):
    _, _, files, _, _ = report_run
    parser = parse_report(files.html)
    assert parser.title == "NuClass evaluation: tiny-nucls"
    assert set(parser.tables) == {"summary", "per-class", "cells", "gate"}
    assert "tumor_any, nonTIL_stromal, sTIL, other_nucleus" in files.html.read_text(encoding="utf-8")


@pytest.mark.slow
def test_report_per_class_table_matches_metrics(report_run):
    crops, _, files, calibrated, _ = report_run
    rows = parse_report(files.html).tables["per-class"]
    data = {row[0]: row for row in rows if row[0] in crops.class_names}
    assert list(data) == crops.class_names
    for column, path in enumerate(PATH_TITLES):
        expected = classification_report(crops.labels, calibrated[OUTPUT_KEYS[path]], crops.class_names)
        for i, name in enumerate(crops.class_names):
            row = data[name]
            assert row[1] == str(int(expected.support[i]))
            cells = row[2 + 3 * column : 5 + 3 * column]
            assert cells == [f"{expected.precision[i]:.3f}", f"{expected.recall[i]:.3f}", f"{expected.f1[i]:.3f}"], (path, name)


@pytest.mark.slow
def test_report_summary_matches_metrics(report_run):
    crops, _, files, calibrated, uncalibrated = report_run
    rows = parse_report(files.html).tables["summary"]
    by_title = {row[0]: row for row in rows[1:]}
    for path, title in PATH_TITLES.items():
        expected = classification_report(crops.labels, calibrated[OUTPUT_KEYS[path]], crops.class_names)
        ece_raw = expected_calibration_error(uncalibrated[OUTPUT_KEYS[path]], crops.labels)
        assert by_title[title][1:] == [
            f"{expected.accuracy:.3f}", f"{expected.macro_f1:.3f}", f"{expected.ece:.3f}", f"{ece_raw:.3f}",
        ], path


@pytest.mark.slow
def test_report_temperatures_change_ece_not_accuracy(report_run):
    _, evaluation, _, _, _ = report_run
    for path in PATH_TITLES:
        report = evaluation.reports[path]
        assert report.ece != pytest.approx(evaluation.ece_uncalibrated(path), abs=1e-6), path
        assert report.accuracy == classification_report(
            evaluation.labels, evaluation.probs_uncalibrated[path], evaluation.class_names
        ).accuracy, path


@pytest.mark.slow
def test_report_data_and_gate_tables(report_run):
    crops, _, files, calibrated, _ = report_run
    tables = parse_report(files.html).tables
    cells = {row[0]: row[1:] for row in tables["cells"][1:]}
    for image in sorted(set(crops.groups)):
        counts = np.bincount(crops.labels[crops.groups == image], minlength=4)
        assert cells[image] == [str(c) for c in counts] + [str(counts.sum())]
    assert cells["all images"][-1] == str(len(crops))

    gate = {row[0]: row[1:] for row in tables["gate"][1:]}
    predicted = calibrated["probs"].argmax(axis=1)
    for i, name in enumerate(crops.class_names):
        assert gate[name][0] == f"{calibrated['gate'][crops.labels == i].mean():.3f}"
        expected = f"{calibrated['gate'][predicted == i].mean():.3f}" if (predicted == i).any() else "–"
        assert gate[name][1] == expected


@pytest.mark.slow
def test_report_json_matches_metrics(report_run):
    crops, _, files, calibrated, _ = report_run
    data = json.loads(files.json.read_text(encoding="utf-8"))
    assert data["n_cells"] == len(crops)
    assert data["temperatures"]["global"] == 0.8
    assert data["cells_per_class"] == crops.class_counts()
    for path in PATH_TITLES:
        expected = classification_report(crops.labels, calibrated[OUTPUT_KEYS[path]], crops.class_names).as_dict()
        entry = data["paths"][path]
        for key in ("accuracy", "macro_f1", "ece", "per_class", "confusion"):
            assert entry[key] == expected[key], (path, key)
        assert sum(entry["reliability"]["count"]) == len(crops)


@pytest.mark.slow
def test_report_figures_are_readable_pngs(report_run):
    _, _, files, _, _ = report_run
    for name, path in files.figures.items():
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            width, height = image.size
            pixels = np.asarray(image.convert("L"))
        assert image.format == "PNG", name
        assert 800 <= width <= 2500, (name, width)
        assert 350 <= height <= 1500, (name, height)
        assert pixels.std() > 10, name  # not a blank canvas


@pytest.mark.slow
def test_report_html_embeds_the_figures(report_run):
    _, _, files, _, _ = report_run
    sources = parse_report(files.html).images
    assert len(sources) == 4
    embedded = {base64.b64decode(src.split(",", 1)[1]) for src in sources}
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    assert embedded == {path.read_bytes() for path in files.figures.values()}


def test_evaluate_model_rejects_other_classes(nucls_dir, nucls_work_dir):
    _, _, crops = nucls_set(nucls_dir, "holdout", nucls_work_dir)
    model = NuClass(tiny_config(nucls_class_names(nucls_dir)))
    renamed = dataclasses.replace(crops, class_names=["a", "b", "c", "d"])
    with pytest.raises(CellsError, match="the model predicts"):
        evaluate_model(model, renamed)


# Synthetic outputs: the pieces that need no model ----------------------------------


def synthetic_outputs(n: int, n_classes: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes - 1, n)  # the last class has no cells
    logits_local = rng.normal(0, 1, (n, n_classes))
    logits_local[np.arange(n), labels] += 2
    logits_global = rng.normal(0, 1, (n, n_classes))
    gate = rng.random(n)

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    outputs = {
        "logits_local": logits_local, "logits_global": logits_global, "gate": gate,
        "probs_local": softmax(logits_local / 2), "probs_global": softmax(logits_global / 2),
        "probs": softmax(logits_local / 2),
    }
    return outputs, labels


def test_evaluation_rebuilds_uncalibrated_mixture():
    outputs, labels = synthetic_outputs(50, 3)
    evaluation = evaluation_from_outputs(
        outputs, labels, np.array(["a"] * 50), class_names=["x", "y", "z"], model_id="m", temperatures=Temperatures(),
    )
    gate = outputs["gate"][:, None]
    local = np.exp(outputs["logits_local"]) / np.exp(outputs["logits_local"]).sum(axis=1, keepdims=True)
    glob = np.exp(outputs["logits_global"]) / np.exp(outputs["logits_global"]).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(evaluation.probs_uncalibrated["gated"], (1 - gate) * local + gate * glob)
    np.testing.assert_allclose(evaluation.probs_uncalibrated["local"], local)


@pytest.mark.slow
def test_report_marks_class_without_cells(tmp_path):
    outputs, labels = synthetic_outputs(60, 3)
    evaluation = evaluation_from_outputs(
        outputs, labels, np.array(["img-1", "img-2"] * 30), class_names=["Tumor", "Stroma", "Rare <b>"],
        model_id="synthetic", temperatures=Temperatures(),
    )
    files = write_report(evaluation, tmp_path / "report")
    parser = parse_report(files.html)
    gate = {row[0]: row[1:] for row in parser.tables["gate"][1:]}
    assert gate["Rare <b>"][0] == "–"
    per_class = {row[0]: row for row in parser.tables["per-class"]}
    assert per_class["Rare <b>"][1] == "0"
    data = json.loads(files.json.read_text(encoding="utf-8"))
    assert data["mean_gate"]["by_true_class"]["Rare <b>"] is None
    assert data["cells_per_image"]["img-2"] == {"Tumor": int((labels[1::2] == 0).sum()), "Stroma": int((labels[1::2] == 1).sum()), "Rare <b>": 0}
    assert "Rare &lt;b&gt;" in files.html.read_text(encoding="utf-8")


# The evaluate command ---------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_command_writes_report(nucls_dir, nucls_work_dir, tmp_path, capsys):
    images_dir, labels_dir, crops = nucls_set(nucls_dir, "holdout", nucls_work_dir)
    weights, _ = save_model(trained_tiny_model(nucls_dir, nucls_work_dir), tmp_path / "model")
    rc = main(["evaluate", "--model", str(weights), "--images", str(images_dir), "--labels", str(labels_dir),
               "-o", str(tmp_path / "report")])
    assert rc == 0
    assert "report written to" in capsys.readouterr().out
    data = json.loads((tmp_path / "report" / "report.json").read_text(encoding="utf-8"))
    assert data["n_cells"] == len(crops)
    assert sorted(data["cells_per_image"]) == ["train_4", "train_5"]
    assert data["run"]["model"] == str(weights)
    assert data["temperatures"]["fitted_on"] is None
    parser = parse_report(tmp_path / "report" / "report.html")
    assert len(parser.images) == 4


def test_evaluate_command_reports_missing_images(tmp_path, capsys):
    rc = main(["evaluate", "--images", str(tmp_path / "none"), "--labels", str(tmp_path), "--model",
               str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "report")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "m.safetensors" in err
    assert not (tmp_path / "report").exists()


# Cells from a training-set store -------------------------------------------------------------


@pytest.fixture(scope="module")
def holdout_store(nucls_dir, nucls_work_dir, tmp_path_factory):
    """A store of the held-out tiles, one slide per tile, cut with the tiny model's geometry."""
    from nuclass_qupath.training.label_sources import LabelSource
    from nuclass_qupath.training.store import StoreGeometry
    from nuclass_qupath.training.store_build import build_store

    images_dir, labels_dir, crops = nucls_set(nucls_dir, "holdout", nucls_work_dir)
    config = tiny_config(nucls_class_names(nucls_dir))
    sources = [
        LabelSource(image, labels_dir / f"{image.stem}.csv", image.stem, cohort=f"cohort-{i}")
        for i, image in enumerate(sorted(images_dir.glob("*.tif")))
    ]
    path = tmp_path_factory.mktemp("store") / "holdout.zarr"
    build_store(sources, path, StoreGeometry.from_config(config), classes=config.classes, workers=1)
    return path, crops


@pytest.mark.slow
def test_evaluate_command_reads_store_groups(nucls_dir, nucls_work_dir, holdout_store, tmp_path):
    store_path, crops = holdout_store
    weights, _ = save_model(trained_tiny_model(nucls_dir, nucls_work_dir), tmp_path / "model")
    rc = main(["evaluate", "--model", str(weights), "--store", str(store_path), "--groups", "train_5",
               "-o", str(tmp_path / "report")])
    assert rc == 0
    data = json.loads((tmp_path / "report" / "report.json").read_text(encoding="utf-8"))
    assert data["n_cells"] == int((crops.groups == "train_5").sum())
    assert list(data["cells_per_image"]) == ["train_5"]
    assert data["run"]["groups"] == ["train_5"]
    assert data["data_description"] == f"store {store_path}, train_5"


def test_evaluate_command_rejects_unknown_store_group(nucls_dir, holdout_store, tmp_path, capsys):
    store_path, _ = holdout_store
    weights, _ = save_model(NuClass(tiny_config(nucls_class_names(nucls_dir))), tmp_path / "model")
    rc = main(["evaluate", "--model", str(weights), "--store", str(store_path), "--groups", "train_9",
               "-o", str(tmp_path / "report")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "['train_9'] not found" in err
    assert "['train_4', 'train_5']" in err


def test_evaluate_command_rejects_store_with_images(holdout_store, tmp_path, capsys):
    store_path, _ = holdout_store
    rc = main(["evaluate", "--store", str(store_path), "--images", str(tmp_path), "-o", str(tmp_path / "report")])
    assert rc == 1
    assert "with --store the cells" in capsys.readouterr().err


def test_evaluate_command_requires_store_for_groups(tmp_path, capsys):
    rc = main(["evaluate", "--images", str(tmp_path), "--labels", str(tmp_path), "--groups", "a",
               "-o", str(tmp_path / "report")])
    assert rc == 1
    assert "give --store too" in capsys.readouterr().err

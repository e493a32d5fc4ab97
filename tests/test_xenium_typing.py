"""Marker panels, cell typing with scanpy, label output and the xenium-labels command."""

from __future__ import annotations

import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from nuclass_qupath.cli import main
from nuclass_qupath.errors import XeniumError
from nuclass_qupath.xenium import celltyping
from nuclass_qupath.xenium.bundle import read_xenium
from nuclass_qupath.xenium.celltyping import LABEL_COLUMNS, type_cells
from nuclass_qupath.xenium.panel import MarkerPanel, load_panel
from nuclass_qupath.xenium.registration import register_to_slide

# The fixtures module is also loaded as a plugin below; mark it before importing from it.
pytest.register_assert_rewrite("xenium_fixtures")
from xenium_fixtures import TRUE_CLASSES  # noqa: E402

logger = logging.getLogger(__name__)

CMU1_SIZE_PX = (2220, 2967)

# Session fixtures (bundles written once) shared by every Xenium test module.
pytest_plugins = ["xenium_fixtures"]


@pytest.fixture(scope="module")
def registered(bundle_dirs, synthetic_run):
    adata = read_xenium(bundle_dirs["xoa2_parquet_h5"])
    register_to_slide(adata, synthetic_run.alignment, slide_width_px=CMU1_SIZE_PX[0], slide_height_px=CMU1_SIZE_PX[1])
    return adata


@pytest.fixture(scope="module")
def typed(registered, default_panel):
    return type_cells(registered, default_panel)


@pytest.fixture(scope="module")
def small(registered):
    """The first 800 cells, for tests that only need typing to run."""
    return registered[:800].copy()


def _accuracy(result, run, mask=None):
    labelled = result.labelled if mask is None else result.labelled & mask
    return float(np.mean(result.table["class"].to_numpy()[labelled] == run.true_class[labelled])), int(labelled.sum())


def _panel_with(panel: MarkerPanel, **changes) -> MarkerPanel:
    data = panel.model_dump()
    for key, value in changes.items():
        data[key] = value
    return MarkerPanel.model_validate(data)


# ---------------------------------------------------------------- panel


def test_default_panel_is_valid(default_panel):
    names = default_panel.class_names
    for required in ("Epithelial", "Fibroblast", "Smooth muscle", "Endothelial", "T cell", "B cell",
                     "Plasma cell", "Macrophage", "Mast cell", "Acinar", "Ductal", "Endocrine",
                     "Airway epithelium", "Alveolar"):  # fmt: skip
        assert required in names
    for marker_class in default_panel.classes:
        assert len(marker_class.positive) >= 1
        assert all(0 <= c <= 255 for c in marker_class.color)
        if marker_class.organ:
            assert marker_class.parent == "Epithelial"
    assert len({c.color for c in default_panel.classes}) == len(names)


def test_default_panel_cites_sources():
    from importlib import resources

    text = resources.files("nuclass_qupath.xenium").joinpath("panels").joinpath("default.yaml").read_text()
    data = yaml.safe_load(text)
    lines = text.splitlines()
    for entry in data["classes"]:
        index = next(i for i, line in enumerate(lines) if line.strip() == f"- name: {entry['name']}")
        comment = lines[index - 1].strip()
        assert comment.startswith("#") and "Source" in comment, f"no source comment above {entry['name']}"


@pytest.mark.parametrize(
    "classes, message",
    [
        ([{"name": "A", "color": [300, 0, 0], "positive": ["X"]}], "0-255"),
        ([{"name": "A", "color": [1, 2, 3], "positive": []}], "at least 1"),
        (
            [{"name": "A", "color": [1, 2, 3], "positive": ["X"]}, {"name": "A", "color": [1, 2, 4], "positive": ["Y"]}],
            "unique",
        ),
        ([{"name": "A", "color": [1, 2, 3], "positive": ["X"], "parent": "B"}], "parent 'B'"),
        ([{"name": "A", "color": [1, 2, 3], "positive": ["X"], "negative": ["X"]}], "both positive and negative"),
        ([{"name": "A", "color": [1, 2, 3], "positive": ["X"], "colour": [1, 2, 3]}], "colour"),
    ],
)
def test_invalid_panel_raises(tmp_path, classes, message):
    path = tmp_path / "panel.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "classes": classes}), encoding="utf-8")
    with pytest.raises(XeniumError) as info:
        load_panel(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_panel_file_not_mapping_raises(tmp_path):
    path = tmp_path / "panel.yaml"
    path.write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(XeniumError, match="mapping"):
        load_panel(path)


def test_panel_missing_file_raises(tmp_path):
    with pytest.raises(XeniumError, match="not found"):
        load_panel(tmp_path / "absent.yaml")


# ---------------------------------------------------------------- typing


def test_type_cells_recovers_classes(typed, synthetic_run):
    run = synthetic_run
    clean = ~run.noise & ~run.mixed
    accuracy, n_labelled = _accuracy(typed, run, clean)
    overall, n_all = _accuracy(typed, run, ~run.noise)
    labelled_share = typed.labelled[clean].mean()
    mixed_share = typed.labelled[run.mixed].mean()
    logger.info(
        "label recovery: %.3f on %d labelled clean cells, %.3f on %d labelled cells with mixed ones, "
        "%.0f%% of clean and %.0f%% of mixed cells labelled",
        accuracy, n_labelled, overall, n_all, 100 * labelled_share, 100 * mixed_share,
    )  # fmt: skip
    assert accuracy >= 0.90
    assert overall >= 0.90
    assert labelled_share >= 0.7
    # Cells with two classes' markers are labelled less often than clean cells.
    assert mixed_share < labelled_share - 0.1
    assert set(typed.table.loc[typed.labelled, "class"]) == set(TRUE_CLASSES)


def test_type_cells_drops_noise_as_few_transcripts(typed, synthetic_run):
    reasons = typed.table["reason"].to_numpy()
    assert (reasons[synthetic_run.noise] == celltyping.REASON_FEW_TRANSCRIPTS).all()
    few = typed.table["transcript_counts"].to_numpy() < 10
    assert (reasons[few] == celltyping.REASON_FEW_TRANSCRIPTS).all()
    assert np.isnan(typed.table["confidence"].to_numpy()[few]).all()
    assert set(typed.dropped()) <= {
        celltyping.REASON_FEW_TRANSCRIPTS,
        celltyping.REASON_LOW_CONFIDENCE,
        celltyping.REASON_NO_MARKER_SIGNAL,
    }
    assert sum(typed.dropped().values()) + int(typed.labelled.sum()) == len(typed.table)


def test_type_cells_confidence_threshold(typed):
    table = typed.table
    assert (table.loc[typed.labelled, "confidence"] >= 0.5).all()
    low = table["reason"] == celltyping.REASON_LOW_CONFIDENCE
    assert (table.loc[low, "confidence"] < 0.5).all()
    assert ((table["confidence"].dropna() >= 0) & (table["confidence"].dropna() <= 1)).all()


def test_type_cells_leaves_out_unmeasured_organ_classes(typed):
    assert set(typed.skipped_classes) == {"Acinar", "Ductal", "Endocrine", "Airway epithelium", "Alveolar"}
    assert typed.panel.class_names == list(TRUE_CLASSES)


def test_type_cells_with_leiden(registered, default_panel, synthetic_run):
    result = type_cells(registered, default_panel, leiden=True)
    clean = ~synthetic_run.noise & ~synthetic_run.mixed
    accuracy, n_labelled = _accuracy(result, synthetic_run, clean)
    logger.info("Leiden label recovery: %.3f on %d labelled clean cells", accuracy, n_labelled)
    assert accuracy >= 0.90
    assert (result.table.loc[result.labelled, "cluster"] >= 0).all()
    assert result.parameters["leiden"] is True


def test_leiden_without_package_names_install(monkeypatch):
    real_find_spec = celltyping.importlib.util.find_spec
    monkeypatch.setattr(
        celltyping.importlib.util, "find_spec", lambda name: None if name == "leidenalg" else real_find_spec(name)
    )
    with pytest.raises(XeniumError, match=r"pip install nuclass-qupath\[leiden\]"):
        celltyping._require_leiden()


def test_missing_panel_genes_warn(small, default_panel, caplog):
    t_cell = default_panel.get("T cell")
    classes = [
        c.model_dump() | ({"positive": [*t_cell.positive, "NOTAGENE1"]} if c.name == "T cell" else {})
        for c in default_panel.classes
    ]
    panel = _panel_with(default_panel, classes=classes)
    with caplog.at_level("WARNING", logger="nuclass_qupath.xenium.celltyping"):
        result = type_cells(small, panel)
    assert "NOTAGENE1" in caplog.text
    assert "'T cell'" in caplog.text
    assert result.missing_genes["T cell"] == ["NOTAGENE1"]
    assert result.summary()["missing_genes"]["T cell"] == ["NOTAGENE1"]


def test_class_without_measured_genes_raises(small, default_panel):
    extra = {"name": "Neuron", "color": [10, 10, 10], "positive": ["RBFOX3", "SNAP25"]}
    panel = _panel_with(default_panel, classes=[c.model_dump() for c in default_panel.classes] + [extra])
    with pytest.raises(XeniumError) as info:
        type_cells(small, panel)
    assert "'Neuron'" in str(info.value)
    assert "RBFOX3" in str(info.value)


def test_requested_organ_without_genes_raises(small, default_panel):
    with pytest.raises(XeniumError, match="'Acinar'"):
        type_cells(small, default_panel, organs=["pancreas"])


def test_mouse_brain_with_human_panel_raises(shared_data, default_panel):
    adata = read_xenium(shared_data / "xenium" / "mouse_brain_mini" / "sample1")
    with pytest.raises(XeniumError, match="'Epithelial'"):
        type_cells(adata, default_panel)


def test_empty_class_warns_and_blocks_training(small, default_panel, caplog):
    # A gene with no transcript at all: its class can never win.
    widened = ad.AnnData(
        X=sp.hstack([small.X, sp.csr_matrix((small.n_obs, 1), dtype=np.float32)]).tocsr(),
        obs=small.obs.copy(),
        var=pd.DataFrame(index=[*small.var_names, "ZEROGENE"]),
        obsm={"slide_px": small.obsm["slide_px"]},
    )
    ghost = {"name": "Ghost", "color": [1, 1, 1], "positive": ["ZEROGENE"]}
    panel = _panel_with(default_panel, classes=[c.model_dump() for c in default_panel.classes] + [ghost])
    with caplog.at_level("WARNING", logger="nuclass_qupath.xenium.celltyping"):
        result = type_cells(widened, panel)
    assert result.empty_classes() == ["Ghost"]
    assert "Ghost" in caplog.text
    with pytest.raises(XeniumError, match="Ghost"):
        result.to_cell_table()
    cells = result.to_cell_table(require_all_classes=False)
    assert len(cells) == int(result.labelled.sum())
    assert "Ghost" not in set(cells.labels)


def test_invalid_min_confidence_raises(small, default_panel):
    with pytest.raises(XeniumError, match="min_confidence"):
        type_cells(small, default_panel, min_confidence=1.5)


# ---------------------------------------------------------------- output


def test_write_labels_and_summary(typed, synthetic_run, tmp_path):
    labels_path = tmp_path / "labels.csv"
    typed.write_csv(labels_path)
    summary = typed.write_summary(tmp_path / "labels.summary.json", {"bundle": "x"})

    table = pd.read_csv(labels_path, keep_default_na=False, dtype={"cell_id": str, "class": str, "reason": str})
    assert table.columns.tolist() == LABEL_COLUMNS
    assert len(table) == len(synthetic_run.cell_ids)
    assert table["cell_id"].tolist() == synthetic_run.cell_ids.tolist()
    assert np.abs(table[["x_px", "y_px"]].to_numpy(dtype=float) - synthetic_run.he_px).max() < 0.01
    assert ((table["class"] == "") == (table["reason"] != "")).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv", "labels.summary.json"]

    written = json.loads((tmp_path / "labels.summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert written["bundle"] == "x"
    assert written["n_cells"] == len(table)
    assert written["n_labelled"] == int((table["class"] != "").sum())
    assert written["cells_per_class"] == table.loc[table["class"] != "", "class"].value_counts().to_dict() | {
        name: 0 for name in written["cells_per_class"] if name not in set(table["class"])
    }
    assert sum(written["dropped"].values()) == int((table["class"] == "").sum())


def test_to_cell_table_for_training(typed):
    cells = typed.to_cell_table()
    assert len(cells) == int(typed.labelled.sum())
    assert set(cells.labels) == set(TRUE_CLASSES)
    assert np.isfinite(cells.centroids_px).all()


def test_write_labels_requires_registration(bundle_dirs, default_panel, tmp_path):
    adata = read_xenium(bundle_dirs["zarr_cells_transcripts"])[:600].copy()
    result = type_cells(adata, default_panel)
    with pytest.raises(XeniumError, match="register"):
        result.write_csv(tmp_path / "labels.csv")
    assert not (tmp_path / "labels.csv").exists()


# ---------------------------------------------------------------- command line


def test_cli_xenium_labels(bundle_dirs, synthetic_run, cmu1_path, tmp_path, capsys):
    bundle = bundle_dirs["xoa1_csv_mex"]
    output = tmp_path / "out" / "labels.csv"
    code = main(
        [
            "xenium-labels",
            str(bundle),
            "--he",
            str(cmu1_path),
            "--alignment",
            str(bundle / "cmu1_he_imagealignment.csv"),
            "-o",
            str(output),
            "--skip-registration-check",
        ]
    )
    assert code == 0
    assert "cells labelled" in capsys.readouterr().out
    table = pd.read_csv(output, keep_default_na=False, dtype={"cell_id": str, "class": str})
    labelled = (table["class"] != "").to_numpy()
    clean = ~synthetic_run.noise & ~synthetic_run.mixed
    accuracy = np.mean(table["class"].to_numpy()[labelled & clean] == synthetic_run.true_class[labelled & clean])
    assert accuracy >= 0.9
    summary = json.loads((tmp_path / "out" / "labels.summary.json").read_text())
    assert summary["registration"] is None
    assert summary["xenium"]["counts_source"] == "cell_feature_matrix"
    assert summary["slide_mpp"] == pytest.approx(0.499)
    assert summary["n_labelled"] == int(labelled.sum())


def test_cli_xenium_labels_bad_alignment_is_one_line(bundle_dirs, cmu1_path, tmp_path, capsys):
    bad = tmp_path / "singular.csv"
    bad.write_text("1,2,0\n2,4,0\n0,0,1\n", encoding="utf-8")
    code = main(
        [
            "xenium-labels",
            str(bundle_dirs["xoa1_csv_mex"]),
            "--he",
            str(cmu1_path),
            "--alignment",
            str(bad),
            "-o",
            str(tmp_path / "labels.csv"),
        ]
    )
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "not invertible" in err[0]
    assert not (tmp_path / "labels.csv").exists()


def test_cli_xenium_info(shared_data, capsys):
    code = main(["xenium-info", str(shared_data / "xenium" / "mouse_brain_mini" / "sample2")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_cells"] == 9
    assert report["cells_with_nucleus"] == 5
    assert report["files"]["transcripts"] == "transcripts.csv"
    assert report["panel_name"] == "Xenium Mouse Brain GEX"


@pytest.mark.slow
def test_cli_xenium_labels_checks_registration(bundle_dirs, cmu1_path, tmp_path):
    pytest.importorskip("nuclass_qupath.cells.detector")
    bundle = bundle_dirs["xoa2_parquet_h5"]
    output = tmp_path / "labels.csv"
    code = main(
        [
            "xenium-labels",
            str(bundle),
            "--he",
            str(cmu1_path),
            "--alignment",
            str(bundle / "cmu1_he_imagealignment.csv"),
            "-o",
            str(output),
            "--summary",
            str(tmp_path / "summary.json"),
        ]
    )
    assert code == 0
    registration = json.loads((tmp_path / "summary.json").read_text())["registration"]
    logger.info("registration check with the built-in detector: %s", registration)
    assert registration["n_checked"] > 2000
    assert registration["share_on_nucleus"] > 0.5
    assert registration["median_offset_um"] < 3.0

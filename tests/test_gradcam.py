"""Grad-CAM of both paths on real CMU-1 cells, for CNN and ViT encoders, the panels and the explain command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from evaluation_fixtures import tiny_config
from PIL import Image

from nuclass_qupath.cells.geojson import read_cells_geojson
from nuclass_qupath.cli import main
from nuclass_qupath.engine.classify import EngineOptions, cell_crop_size, classify_slide
from nuclass_qupath.errors import CellsError
from nuclass_qupath.model import NuClass, bundled_model_path, save_model
from nuclass_qupath.model.gradcam import explain_cells, grad_cam, panel_file_name, panel_size_px, write_explanation_panel
from nuclass_qupath.slides import open_slide

CLASSES = ["Tumor", "Stroma", "Immune cells"]
# Rows of QuPath's cell export of CMU-1 used here: cells inside the tissue, far apart.
CELL_ROWS = [1200, 2600]


@pytest.fixture(scope="module")
def cmu1_cells(shared_data):
    cells = read_cells_geojson(shared_data / "qupath" / "cmu1_cells" / "export" / "CMU-1-Small-Region.svs.geojson")
    return cells.subset(CELL_ROWS)


@pytest.fixture(scope="module")
def cnn_model():
    torch.manual_seed(0)
    return NuClass(tiny_config(CLASSES)).eval()


def vit_model() -> NuClass:
    """A tiny model whose encoders are ViT-Tiny blocks 0-2, accepting any input size that is a multiple of 16.

    ``FeatureEncoder`` builds timm models for their default 224 px input, so
    the test rebuilds each encoder body with timm's ``dynamic_img_size`` and
    ``dynamic_img_pad``. The channels and stride stay the same.
    """
    torch.manual_seed(0)
    name = "vit_tiny_patch16_224"
    model = NuClass(tiny_config(CLASSES, local_backbone=name, global_backbone=name))
    for encoder in (model.local_encoder, model.global_encoder):
        encoder.body = timm.create_model(
            name, pretrained=False, features_only=True, out_indices=(2,), dynamic_img_size=True, dynamic_img_pad=True
        )
    return model.eval()


@pytest.fixture(scope="module")
def cnn_explanations(cmu1_path, cmu1_cells, cnn_model):
    with open_slide(cmu1_path) as slide:
        return explain_cells(cnn_model, slide, cmu1_cells.centroids_px, cell_ids=list(cmu1_cells.ids))


def check_heatmaps(explanation, model: NuClass) -> None:
    cfg = model.config
    # Crops start on the encoders' stride grid, as in the engine's exact mode.
    local_side = cell_crop_size(cfg.local_crop_px, cfg.local_margin_px, model.local_encoder.stride)
    context_side = cell_crop_size(cfg.context_encoder_px, cfg.context_margin_px, model.global_encoder.stride)
    for image, cam, side in (
        (explanation.local_image, explanation.local_cam, local_side),
        (explanation.context_image, explanation.context_cam, context_side),
    ):
        assert image.shape == (side, side, 3)
        assert cam.shape == (side, side)
        assert np.isfinite(cam).all()
        assert cam.min() >= 0.0
        assert cam.max() == pytest.approx(1.0)
        assert cam.std() > 0.01


# Grad-CAM on CMU-1 -----------------------------------------------------------------


def test_explain_cells_cnn_heatmaps(cnn_explanations, cnn_model, cmu1_cells):
    assert [e.cell_id for e in cnn_explanations] == list(cmu1_cells.ids)
    for explanation in cnn_explanations:
        check_heatmaps(explanation, cnn_model)


def test_explain_cells_vit_heatmaps(cmu1_path, cmu1_cells):
    model = vit_model()
    with open_slide(cmu1_path) as slide:
        explanations = explain_cells(model, slide, cmu1_cells.centroids_px, cell_ids=list(cmu1_cells.ids))
    assert model.local_encoder.stride == 16
    for explanation in explanations:
        check_heatmaps(explanation, model)


def test_explain_cells_matches_exact_engine(cmu1_path, cmu1_cells, cnn_model, cnn_explanations):
    options = EngineOptions(mode="exact", precision="fp32", channels_last=False)
    with open_slide(cmu1_path) as slide:
        predictions = classify_slide(slide, cmu1_cells, cnn_model, options=options)
    for i, explanation in enumerate(cnn_explanations):
        np.testing.assert_allclose(explanation.probs, predictions.probs[i], atol=1e-5)
        np.testing.assert_allclose(explanation.probs_local, predictions.local_probs[i], atol=1e-5)
        assert explanation.gate == pytest.approx(float(predictions.gate[i]), abs=1e-5)
        assert explanation.predicted_class == int(predictions.probs[i].argmax())
        assert explanation.target_class == explanation.predicted_class


def test_explain_cells_windows_centre_on_cell(cnn_explanations, cnn_model):
    cfg = cnn_model.config
    for explanation in cnn_explanations:
        x0, y0, x1, y1 = explanation.local_window_px
        assert x1 - x0 == cfg.local_crop_px
        # The cell is off the crop centre by less than one stride; its window keeps the margin.
        side = explanation.local_image.shape[1]
        assert abs((x0 + x1) / 2 - side / 2) <= cnn_model.local_encoder.stride
        assert x0 >= cfg.local_margin_px and x1 <= side - cfg.local_margin_px
        cx0, _, cx1, _ = explanation.cell_window_px
        assert cx1 - cx0 == pytest.approx(cfg.local_crop_px * cfg.mpp / cfg.context_mpp)


def test_explain_cells_chosen_class(cmu1_path, cmu1_cells, cnn_model, cnn_explanations):
    with open_slide(cmu1_path) as slide:
        chosen = explain_cells(cnn_model, slide, cmu1_cells.centroids_px[:1], target_class="Stroma")
    assert chosen[0].target_class == 1
    assert chosen[0].cell_id == "x{:.0f}_y{:.0f}".format(*cmu1_cells.centroids_px[0])
    np.testing.assert_allclose(chosen[0].probs, cnn_explanations[0].probs, atol=1e-6)
    if cnn_explanations[0].target_class != 1:
        assert not np.allclose(chosen[0].local_cam, cnn_explanations[0].local_cam)


def test_explain_cells_rejects_unknown_class(cmu1_path, cmu1_cells, cnn_model):
    with open_slide(cmu1_path) as slide, pytest.raises(CellsError, match="'Necrosis' is not one of"):
        explain_cells(cnn_model, slide, cmu1_cells.centroids_px, target_class="Necrosis")


def test_explain_cells_rejects_cell_outside_slide(cmu1_path, cnn_model):
    with open_slide(cmu1_path) as slide, pytest.raises(CellsError, match="outside the slide"):
        explain_cells(cnn_model, slide, np.array([[5000.0, 100.0]]))


# grad_cam on hand-made maps ------------------------------------------------------------


def test_grad_cam_weights_channels_by_mean_gradient():
    feature_map = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]]])
    gradient = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[-0.25, -0.25], [-0.25, -0.25]]]])
    cam = grad_cam(feature_map, gradient, (2, 2), stride=1)
    # Channel weights 1 and -0.25: 1 at the top left, ReLU(-0.5) = 0 at the bottom right.
    np.testing.assert_allclose(cam[0], [[1.0, 0.0], [0.0, 0.0]])


def test_grad_cam_pads_to_image_size():
    feature_map = torch.rand(2, 4, 3, 3)
    cam = grad_cam(feature_map, torch.ones_like(feature_map), (52, 50), stride=16)
    assert cam.shape == (2, 52, 50)
    np.testing.assert_array_equal(cam[:, 48:, :], np.repeat(cam[:, 47:48, :], 4, axis=1))


def test_grad_cam_all_negative_stays_zero():
    feature_map = torch.rand(1, 3, 4, 4)
    cam = grad_cam(feature_map, -torch.ones_like(feature_map), (32, 32), stride=8)
    assert np.all(cam == 0.0)


# Panels -------------------------------------------------------------------------------------


def test_explanation_panel_png_size(cnn_explanations, cnn_model, tmp_path):
    explanation = cnn_explanations[0]
    path = write_explanation_panel(explanation, tmp_path / panel_file_name(explanation.cell_id),
                                   [c.color for c in cnn_model.config.classes])
    assert path.name == f"cell_{explanation.cell_id}.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == panel_size_px() == (1600, 480)
        assert np.asarray(image.convert("L")).std() > 10


def test_panel_file_name_replaces_unsafe_characters():
    assert panel_file_name("a/b c:ü") == "cell_a_b_c__.png"


# The explain command ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_arguments(cnn_model, tmp_path_factory) -> list[str]:
    """``--model`` for the command: none when the bundled model is installed, else the tiny random model."""
    if bundled_model_path().is_file():
        return []
    weights, _ = save_model(cnn_model, tmp_path_factory.mktemp("model") / "tiny")
    return ["--model", str(weights)]


@pytest.mark.slow
def test_explain_command_writes_panels(cmu1_path, cmu1_cells, shared_data, model_arguments, tmp_path, capsys):
    export = shared_data / "qupath" / "cmu1_cells" / "export" / "CMU-1-Small-Region.svs.geojson"
    rc = main(["explain", str(cmu1_path), *model_arguments, "--cells", str(export), "--ids", *cmu1_cells.ids,
               "-o", str(tmp_path / "panels")])
    assert rc == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "panels" / "explanations.json").read_text(encoding="utf-8"))
    assert [cell["id"] for cell in summary["cells"]] == list(cmu1_cells.ids)
    for cell in summary["cells"]:
        assert cell["predicted_class"] in summary["classes"]
        assert sum(cell["probabilities"]["gated"].values()) == pytest.approx(1.0, abs=1e-3)
        assert cell["panel"] in out
        with Image.open(tmp_path / "panels" / cell["panel"]) as image:
            assert image.size == panel_size_px()


@pytest.mark.slow
def test_explain_command_xy(cmu1_path, model_arguments, tmp_path):
    rc = main(["explain", str(cmu1_path), *model_arguments, "--xy", "1100,1500", "-o", str(tmp_path)])
    assert rc == 0
    assert (tmp_path / "cell_x1100_y1500.png").is_file()


def test_explain_command_reports_unknown_id(cmu1_path, shared_data, model_arguments, tmp_path, capsys):
    export = shared_data / "qupath" / "cmu1_cells" / "export" / "CMU-1-Small-Region.svs.geojson"
    rc = main(["explain", str(cmu1_path), *model_arguments, "--cells", str(export), "--ids", "no-such-cell",
               "-o", str(tmp_path)])
    assert rc == 1
    assert "no-such-cell" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_explain_command_requires_ids_with_cells(cmu1_path, shared_data, tmp_path, capsys):
    export = shared_data / "qupath" / "cmu1_cells" / "export" / "CMU-1-Small-Region.svs.geojson"
    rc = main(["explain", str(cmu1_path), "--cells", str(export), "-o", str(tmp_path)])
    assert rc == 1
    assert "--ids" in capsys.readouterr().err


def test_explain_command_rejects_bad_xy(cmu1_path, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["explain", str(cmu1_path), "--xy", "1100;1500", "-o", str(tmp_path)])
    assert "1100;1500" in capsys.readouterr().err

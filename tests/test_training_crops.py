"""Training crops are the engine's exact-mode crops: placement, centres, augmentation and predictions.

A model scores a training crop through ``predict_crop_set`` exactly as the
engine's exact mode scores the same cell on the slide, because both read the
crop with ``read_cell_crop`` and pool at the cell's centre in it. The check
runs on CMU-1 cells exported by QuPath, with a small random model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nuclass_qupath.cells.geojson import read_cells_geojson
from nuclass_qupath.cells.table import CellTable
from nuclass_qupath.engine import EngineOptions, classify_slide
from nuclass_qupath.model import ClassSpec, ModelConfig, NuClass
from nuclass_qupath.slides import open_slide
from nuclass_qupath.training.augment import augment_pair, rotate_flip, rotate_flip_centres
from nuclass_qupath.training.crops import CropGeometry, cell_crop_centres, encoder_stride, extract_crops
from nuclass_qupath.training.dataset import CropSet
from nuclass_qupath.training.label_sources import LabelSource
from nuclass_qupath.training.store_build import BuildSettings, build_store
from nuclass_qupath.training.trainer import predict_crop_set

CMU1_EXPORT = "qupath/cmu1_cells/export/CMU-1-Small-Region.svs.geojson"
CLASSES = ["Tumor", "Stroma", "Immune cells"]


def small_config(**overrides) -> ModelConfig:
    values = dict(
        model_id="training-crops-test",
        classes=[ClassSpec(name=name, color=(60 * i, 100, 200)) for i, name in enumerate(CLASSES)],
        local_crop_px=64,
        context_px=256,
        context_encoder_px=64,
        local_feature_index=2,
        global_feature_index=2,
        embed_dim=16,
        gate_hidden=8,
        local_sigma_px=8.0,
        global_sigma_px=32.0,
        # The geometry tests below compute crop sizes from these margins.
        local_margin_px=32,
        context_margin_px=16,
    )
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture(scope="module")
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def small_model() -> NuClass:
    torch.manual_seed(0)
    return NuClass(small_config()).eval()


@pytest.fixture(scope="module")
def cmu1_cells(shared_data: Path) -> CellTable:
    """Up to ten QuPath cells of CMU-1: the four nearest the slide's edges and six spread over it."""
    cells = read_cells_geojson(shared_data / CMU1_EXPORT)
    xy = cells.centroids_px
    extremes = [int(xy[:, 0].argmin()), int(xy[:, 0].argmax()), int(xy[:, 1].argmin()), int(xy[:, 1].argmax())]
    spread = np.linspace(0, len(cells) - 1, 6).astype(int).tolist()
    return cells.subset(np.array(sorted(set(extremes + spread))))


# ---------------------------------------------------------------------------
# Geometry


def test_encoder_stride_of_efficientnet_lite_stages():
    assert encoder_stride("tf_efficientnet_lite0", 2) == 8
    assert encoder_stride("tf_efficientnet_lite0", 3) == 16


def test_geometry_from_config_takes_encoder_strides():
    geometry = CropGeometry.from_config(small_config(global_feature_index=3))
    assert geometry.local_align_px == 8
    assert geometry.context_align_px == 16
    # 64 + 2 * 32 = 128 rounds to 128 at stride 8, plus one stride of play.
    assert geometry.local_size_px == 136
    # 64 + 2 * 16 = 96 rounds to 96 at stride 16, plus one stride.
    assert geometry.context_size_px == 112


def test_extract_crops_start_on_stride_grid(cmu1_path, cmu1_cells):
    geometry = CropGeometry.from_config(small_config())
    with open_slide(cmu1_path) as slide:
        crops = extract_crops(slide, cmu1_cells.centroids_px, geometry)
        scale = geometry.mpp / slide.mpp
    # Crop origin = cell centre in model pixels minus its centre in the crop.
    origins = cmu1_cells.centroids_px / scale - crops.local_centres_px.astype(np.float64)
    assert np.allclose(origins / 8, np.round(origins / 8), atol=1e-3)
    assert crops.local_centres_px.dtype == np.float32
    assert np.array_equal(
        crops.local_centres_px, cell_crop_centres(cmu1_cells.centroids_px, scale, 64, 32, 8)
    )


# ---------------------------------------------------------------------------
# Augmentation moves the centres with the pixels


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("quarter_turns", [0, 1, 2, 3])
def test_rotate_flip_centre_follows_bright_pixel(flip, quarter_turns):
    size = 24
    centre = torch.tensor([17.3, 5.8])
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    image[:, 5, 17] = 255  # the pixel that contains the centre
    moved = rotate_flip(image, flip, quarter_turns)
    row, column = (moved[0] == 255).nonzero()[0].tolist()
    x, y = rotate_flip_centres(centre, size, flip, quarter_turns).tolist()
    assert column <= x < column + 1
    assert row <= y < row + 1


def test_augment_pair_moves_centres_with_content():
    generator = torch.Generator().manual_seed(3)
    n, local_size, context_size = 32, 40, 24
    local = torch.zeros(n, 3, local_size, local_size, dtype=torch.uint8)
    context = torch.zeros(n, 3, context_size, context_size, dtype=torch.uint8)
    local_centres = torch.tensor([[26.5, 9.5]]).repeat(n, 1)
    context_centres = torch.tensor([[3.25, 17.75]]).repeat(n, 1)
    local[:, :, 9, 26] = 255
    context[:, :, 17, 3] = 255
    # No stain or brightness change, so the bright pixel stays the brightest.
    out = augment_pair(local, context, local_centres, context_centres, generator, stain_sigma=0.0, brightness=0.0)
    seen = set()
    for i in range(n):
        for image, centres in ((out.local[i], out.local_centres_px[i]), (out.context[i], out.context_centres_px[i])):
            row, column = divmod(int(image[0].argmax()), image.shape[-1])
            x, y = centres.tolist()
            assert column <= x < column + 1, i
            assert row <= y < row + 1, i
        seen.add(tuple(out.local_centres_px[i].tolist()))
    # Eight rotations and flips, all drawn among 32 pairs with this seed.
    assert len(seen) == 8


# ---------------------------------------------------------------------------
# Predictions on training crops equal the engine's exact mode


def exact_mode_probs(model: NuClass, slide_path: Path, cells: CellTable):
    with open_slide(slide_path) as slide:
        options = EngineOptions(mode="exact", precision="fp32", optimize=False, prefetch=False)
        return classify_slide(slide, cells, model, options=options)


def test_crop_set_predictions_equal_exact_mode(cmu1_path, cmu1_cells, small_model, one_torch_thread):
    geometry = CropGeometry.from_config(small_model.config)
    with open_slide(cmu1_path) as slide:
        crops = extract_crops(slide, cmu1_cells.centroids_px, geometry)
    n = len(cmu1_cells)
    crop_set = CropSet(
        crops.local, crops.context, crops.local_centres_px, crops.context_centres_px,
        np.arange(n) % 3, np.ones(n, np.float32), np.full(n, "CMU-1", dtype=object), CLASSES, geometry,
    )
    crop_set.check_geometry(small_model.config)
    outputs = predict_crop_set(small_model, crop_set, batch_size=4)
    engine = exact_mode_probs(small_model, cmu1_path, cmu1_cells)
    np.testing.assert_allclose(outputs["probs"], engine.probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(outputs["probs_local"], engine.local_probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(outputs["probs_global"], engine.global_probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(outputs["gate"], engine.gate, atol=1e-5, rtol=0)


def test_store_predictions_equal_exact_mode(cmu1_path, cmu1_cells, small_model, one_torch_thread, tmp_path):
    labels_path = tmp_path / "cells.csv"
    rows = ["cell_id,x_px,y_px,class"]
    for i, (x, y) in enumerate(cmu1_cells.centroids_px):
        rows.append(f"{cmu1_cells.ids[i]},{float(x)!r},{float(y)!r},{CLASSES[i % 3]}")
    labels_path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    store = build_store(
        [LabelSource(cmu1_path, labels_path, "CMU-1")],
        tmp_path / "cells.zarr",
        CropGeometry.from_config(small_model.config),
        classes=small_model.config.classes,
        settings=BuildSettings(cells_per_chunk=4),
        workers=1,
    )
    crops = store.crops()
    crops.check_geometry(small_model.config)
    outputs = predict_crop_set(small_model, crops, batch_size=4)

    # The store keeps cells in spatial order; classify them in that order too.
    ordered = CellTable.from_points(store.centroids_px, ids=list(store.cell_array("cell_id")))
    assert sorted(ordered.ids) == sorted(cmu1_cells.ids)
    engine = exact_mode_probs(small_model, cmu1_path, ordered)
    np.testing.assert_allclose(outputs["probs"], engine.probs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(outputs["gate"], engine.gate, atol=1e-5, rtol=0)

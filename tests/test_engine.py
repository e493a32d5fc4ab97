"""The classification engine: fast and exact modes, grouping, streaming and output features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch

from nuclass_qupath.cells.geojson import GeoJSONWriter, geometry_to_geojson, prediction_feature, read_cells_geojson
from nuclass_qupath.cells.table import CellTable
from nuclass_qupath.engine import EngineOptions, SlideClassifier, classify_slide
from nuclass_qupath.engine.classify import (
    cell_crop_size,
    covering_box,
    group_cells_by_core,
    plan_regions,
    read_cell_crop,
)
from nuclass_qupath.engine.encoders import optimize_encoder
from nuclass_qupath.engine.output import cell_measurements, prediction_features
from nuclass_qupath.errors import CellsError
from nuclass_qupath.model import ClassSpec, ModelConfig, NuClass, load_model
from nuclass_qupath.model.io import bundled_model_path
from nuclass_qupath.pipeline import ClassifyRequest, classify_file
from nuclass_qupath.slides import open_slide

CMU1_EXPORT = "qupath/cmu1_cells/export/CMU-1-Small-Region.svs.geojson"


def small_config(**overrides) -> ModelConfig:
    values = dict(
        model_id="engine-test",
        classes=[
            ClassSpec(name="Tumor", color=(200, 0, 0)),
            ClassSpec(name="Stroma", color=(150, 200, 150)),
            ClassSpec(name="Immune cells", color=(160, 90, 160)),
        ],
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
    values.update(overrides)
    return ModelConfig(**values)


@pytest.fixture(scope="module")
def small_model() -> NuClass:
    torch.manual_seed(0)
    return NuClass(small_config()).eval()


@pytest.fixture(scope="module")
def cmu1_qupath_cells(shared_data: Path) -> CellTable:
    return read_cells_geojson(shared_data / CMU1_EXPORT)


def cells_in_window(cells: CellTable, x0: float, y0: float, side: float) -> CellTable:
    xy = cells.centroids_px
    inside = (xy[:, 0] >= x0) & (xy[:, 0] < x0 + side) & (xy[:, 1] >= y0) & (xy[:, 1] < y0 + side)
    return cells.subset(np.flatnonzero(inside))


def fast_options(**overrides) -> EngineOptions:
    values = dict(mode="fast", precision="fp32", optimize=False, threads=None)
    values.update(overrides)
    return EngineOptions(**values)


# ---------------------------------------------------------------------------
# Pixel grid and grouping


def test_cell_crop_is_subgrid_of_covering_region(cmu1_path):
    # A cell's crop contains the pixels of a fast-mode region at the same place. Pillow computes
    # the resampling weights from the box offset in floats, so a few pixels differ by one level.
    centres = np.array([[900.3, 1200.7], [1010.0, 1333.5], [955.9, 1250.2]])
    align, window, margin = 16, 224, 32
    with open_slide(cmu1_path) as slide:
        for target_mpp in (0.5, 2.0):
            scale = target_mpp / slide.mpp
            origin, size = covering_box(centres / scale, window / 2 + margin, align)
            region = slide.read_region_at_mpp(origin[0] * scale, origin[1] * scale, int(size[0]), int(size[1]), target_mpp)
            for centre in centres:
                crop, position = read_cell_crop(slide, centre, scale, target_mpp, window, margin, align)
                offset = np.round(centre / scale - position - origin).astype(int)
                assert np.all(offset % align == 0)
                side = crop.shape[0]
                same_place = region[offset[1] : offset[1] + side, offset[0] : offset[0] + side].astype(int)
                difference = np.abs(crop.astype(int) - same_place)
                assert difference.max() <= 1
                assert (difference > 0).mean() < 1e-3


def test_cell_crop_keeps_margin_around_window():
    size = cell_crop_size(224, 32, 16)
    assert size == 304
    assert size % 16 == 0
    rng = np.random.default_rng(1)
    for centre in rng.uniform(0, 5000, 200):
        origin = 16 * np.floor((centre - 112 - 32) / 16)
        assert centre - 112 - origin >= 32
        assert origin + size - (centre + 112) >= 32


def test_group_cells_by_core_is_row_major():
    xy = np.array([[10, 10], [1100, 20], [20, 1100], [1030, 1030], [15, 12]], dtype=float)
    groups = group_cells_by_core(xy, 1024)
    assert [g.tolist() for g in groups] == [[0, 4], [1], [2], [3]]


def test_plan_regions_partitions_cells_into_nested_cores():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 10000, (3000, 2))
    plan = plan_regions(xy, 1000, 3)
    seen = np.concatenate([np.concatenate(cores) for _, cores in plan])
    assert sorted(seen.tolist()) == list(range(len(xy)))
    for group, cores in plan:
        assert np.array_equal(np.sort(np.concatenate(cores)), group)
        group_keys = {tuple(k) for k in np.floor(xy[group] / 3000).astype(int)}
        assert len(group_keys) == 1
        for core in cores:
            assert np.all(np.diff(core) > 0)
            core_keys = {tuple(k) for k in np.floor(xy[core] / 1000).astype(int)}
            assert len(core_keys) == 1


def test_plan_regions_of_no_cells_is_empty():
    assert plan_regions(np.zeros((0, 2)), 1000, 2) == []


# ---------------------------------------------------------------------------
# Fast against exact mode


def test_fast_mode_matches_exact_mode_with_small_model(cmu1_path, cmu1_qupath_cells, small_model):
    cells = cells_in_window(cmu1_qupath_cells, 900, 1500, 300)
    n_cells = len(cells)
    assert 60 <= n_cells <= 300
    with open_slide(cmu1_path) as slide:
        fast = classify_slide(slide, cells, small_model, options=fast_options())
        exact = classify_slide(slide, cells, small_model, options=fast_options(mode="exact"))
    agreement = (fast.predicted == exact.predicted).mean()
    assert agreement >= 0.99
    assert np.abs(fast.probs - exact.probs).max() < 0.05
    assert np.abs(fast.gate - exact.gate).max() < 0.05


@pytest.mark.slow
def test_fast_mode_matches_exact_mode_with_bundled_model(cmu1_path, cmu1_qupath_cells):
    if not bundled_model_path().is_file():
        pytest.skip("the bundled model is not installed")
    model = load_model()
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(cmu1_qupath_cells), 150, replace=False))
    with open_slide(cmu1_path) as slide:
        fast = classify_slide(slide, cmu1_qupath_cells, model, options=EngineOptions(mode="fast"))
        exact = classify_slide(slide, cmu1_qupath_cells.subset(sample), model, options=EngineOptions(mode="exact"))
    agreement = (fast.predicted[sample] == exact.predicted).mean()
    assert agreement >= 0.99
    assert np.abs(fast.probs[sample] - exact.probs).max() < 0.1


def test_sparse_cells_use_crops_with_same_predictions(cmu1_path, cmu1_qupath_cells, small_model):
    # Three far-apart cells: their own crops read fewer pixels than the covering region.
    cells = cmu1_qupath_cells.subset([0, len(cmu1_qupath_cells) // 2, len(cmu1_qupath_cells) - 1])
    with open_slide(cmu1_path) as slide:
        crops = classify_slide(slide, cells, small_model, options=fast_options(region_px=4096))
        regions = classify_slide(slide, cells, small_model, options=fast_options(region_px=4096, sparse_crops=False))
    assert np.array_equal(crops.predicted, regions.predicted)
    assert np.abs(crops.probs - regions.probs).max() < 0.05


# ---------------------------------------------------------------------------
# Predictions and input checks


def test_predictions_are_finite_probabilities(cmu1_path, cmu1_qupath_cells, small_model):
    cells = cells_in_window(cmu1_qupath_cells, 900, 1500, 400)
    with open_slide(cmu1_path) as slide:
        predictions = classify_slide(slide, cells, small_model, options=fast_options(region_px=256))
    assert predictions.probs.shape == (len(cells), 3)
    for name in ("probs", "local_probs", "global_probs", "gate"):
        assert np.all(np.isfinite(getattr(predictions, name))), name
    np.testing.assert_allclose(predictions.probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(predictions.local_probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.all((predictions.gate >= 0) & (predictions.gate <= 1))
    assert predictions.timings_s["local"] > 0
    assert predictions.timings_s["total"] >= predictions.timings_s["local"]


def test_iter_batches_yields_every_cell_once(cmu1_path, cmu1_qupath_cells, small_model):
    cells = cells_in_window(cmu1_qupath_cells, 900, 1500, 450)
    classifier = SlideClassifier(small_model, fast_options(region_px=200, context_region_px=100))
    with open_slide(cmu1_path) as slide:
        batches = list(classifier.iter_batches(slide, cells))
    assert len(batches) > 4
    index = np.concatenate([b[0] for b in batches])
    assert sorted(index.tolist()) == list(range(len(cells)))
    for batch_index, output, stage_s in batches:
        assert output.probs.shape == (len(batch_index), 3)
        assert set(stage_s) >= {"read", "local", "global", "gate"}


def test_cells_outside_slide_raise_cells_error(cmu1_path, small_model):
    cells = CellTable.from_points(np.array([[100.0, 100.0], [5000.0, 100.0]]))
    with open_slide(cmu1_path) as slide, pytest.raises(CellsError, match="1 of 2 cells lie outside the slide"):
        classify_slide(slide, cells, small_model, options=fast_options())


def test_non_finite_centroid_raises_cells_error(cmu1_path, small_model):
    cells = CellTable.from_points(np.array([[100.0, np.nan]]))
    with open_slide(cmu1_path) as slide, pytest.raises(CellsError, match="non-finite"):
        classify_slide(slide, cells, small_model, options=fast_options(mode="exact"))


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_empty_cell_table_gives_empty_predictions(cmu1_path, small_model, mode):
    cells = CellTable.from_points(np.zeros((0, 2)))
    with open_slide(cmu1_path) as slide:
        predictions = classify_slide(slide, cells, small_model, options=fast_options(mode=mode))
    assert len(predictions) == 0
    assert predictions.probs.shape == (0, 3)
    assert predictions.class_names == ["Tumor", "Stroma", "Immune cells"]


def test_engine_rejects_unknown_mode(small_model):
    with pytest.raises(ValueError, match="mode must be 'fast' or 'exact'"):
        SlideClassifier(small_model, EngineOptions(mode="quick"))


@pytest.mark.parametrize(
    ("field", "value"),
    [("region_px", 0), ("context_region_px", -1024), ("batch_size", 0), ("batch_size", 2.5), ("threads", 0)],
)
def test_engine_options_reject_invalid_sizes(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a positive whole number"):
        EngineOptions(**{field: value})


def test_engine_options_reject_unknown_precision():
    with pytest.raises(ValueError, match="precision must be 'auto', 'fp32' or 'bf16'"):
        EngineOptions(precision="fp16")


# ---------------------------------------------------------------------------
# Encoder graph


def test_optimized_encoder_matches_eager_encoder(small_model):
    encoder = small_model.local_encoder
    graph = optimize_encoder(encoder, 96, channels_last=True)
    assert graph is not encoder
    x = (torch.rand(1, 3, 144, 176) * 4 - 2).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = encoder(x)
        actual = graph(x)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() < 1e-3 * expected.abs().max().item()


def test_optimize_encoder_disabled_returns_encoder(small_model):
    assert optimize_encoder(small_model.local_encoder, 96, channels_last=False, enabled=False) is small_model.local_encoder


# ---------------------------------------------------------------------------
# Output features and the streaming job


def test_prediction_features_match_per_cell_features(cmu1_path, cmu1_qupath_cells, small_model):
    # Detected cells (polygons, no input feature) go through the batched conversion.
    sub = cells_in_window(cmu1_qupath_cells, 900, 1500, 300)
    polygons = [shapely.Point(x, y).buffer(4.123, quad_segs=5) for x, y in sub.centroids_px]
    polygons[0] = shapely.Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])  # invalid, repaired one by one
    polygons[1] = None  # no outline: written as a circle around the centroid
    cells = CellTable(ids=list(sub.ids), centroids_px=sub.centroids_px, geometries=polygons)
    with open_slide(cmu1_path) as slide:
        predictions = classify_slide(slide, cells, small_model, options=fast_options())
    config = small_model.config
    colors = {c.name: c.color for c in config.classes}
    features = list(prediction_features(cells, predictions, config))
    assert len(features) == len(cells)
    for i, feature in enumerate(features):
        geometry = cells.geometries[i]
        if geometry is None:
            geometry = shapely.Point(*cells.centroids_px[i]).buffer(4.0, quad_segs=4)
        name = predictions.class_names[int(predictions.predicted[i])]
        expected = prediction_feature(
            cell_id=cells.ids[i], geometry=geometry_to_geojson(geometry), class_name=name, color=colors[name],
            measurements=cell_measurements(predictions, i),
        )
        assert json.dumps(feature["properties"], sort_keys=True) == json.dumps(expected["properties"], sort_keys=True)
        np.testing.assert_allclose(
            np.asarray(feature["geometry"]["coordinates"][0]), np.asarray(expected["geometry"]["coordinates"][0]),
            atol=0.005,
        )


def test_writer_output_of_batched_features_is_rounded(tmp_path, cmu1_path, cmu1_qupath_cells, small_model):
    sub = cells_in_window(cmu1_qupath_cells, 900, 1500, 200)
    polygons = [shapely.Point(x, y).buffer(3.33333, quad_segs=3) for x, y in sub.centroids_px]
    cells = CellTable(ids=list(sub.ids), centroids_px=sub.centroids_px, geometries=polygons)
    with open_slide(cmu1_path) as slide:
        predictions = classify_slide(slide, cells, small_model, options=fast_options())
    path = tmp_path / "cells.geojson"
    with GeoJSONWriter(path) as writer:
        for feature in prediction_features(cells, predictions, small_model.config):
            writer.write(feature)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert len(data["features"]) == len(cells)
    for feature, polygon in zip(data["features"], polygons):
        ring = np.asarray(feature["geometry"]["coordinates"][0])
        np.testing.assert_array_equal(ring, np.round(shapely.get_coordinates(polygon.exterior), 2))


def test_low_memory_job_matches_table_job(tmp_path, cmu1_path, shared_data, small_model):
    from nuclass_qupath.model import save_model

    # QuPath's export cut down to the cells of one window, to keep the two jobs short.
    export = json.loads((shared_data / CMU1_EXPORT).read_text(encoding="utf-8"))
    kept = [
        f for f in export["features"]
        if f["properties"].get("objectType") == "cell"
        and 900 <= np.mean(np.asarray(f["nucleusGeometry"]["coordinates"][0])[:, 0]) < 1200
        and 1500 <= np.mean(np.asarray(f["nucleusGeometry"]["coordinates"][0])[:, 1]) < 1800
    ]
    cells_path = tmp_path / "cells.geojson"
    cells_path.write_text(json.dumps({"type": "FeatureCollection", "features": kept}), encoding="utf-8")
    model_path, _ = save_model(small_model, tmp_path / "model")

    results = {}
    for low_memory in (False, True):
        request = ClassifyRequest(
            slide_path=cmu1_path,
            output_path=tmp_path / f"out-{low_memory}.geojson",
            cells_path=cells_path,
            model_path=model_path,
            low_memory=low_memory,
            preview_path=tmp_path / f"preview-{low_memory}.png",
        )
        result = classify_file(request)
        features = json.loads(request.output_path.read_text(encoding="utf-8"))["features"]
        results[low_memory] = (result, {f["id"]: f["properties"]["classification"]["name"] for f in features})
        assert request.resolved_metadata_path().is_file()
        assert request.preview_path.is_file()
    table, streamed = results[False], results[True]
    assert streamed[0].n_cells == table[0].n_cells == len(kept)
    assert streamed[0].class_counts == table[0].class_counts
    assert streamed[1] == table[1]
    assert streamed[0].metadata["engine"]["low_memory"] is True
    assert table[0].metadata["engine"]["low_memory"] is False
    # The metadata records the precision that ran, never the request "auto".
    assert table[0].metadata["engine"]["precision"] in ("fp32", "bf16")


def test_bf16_is_checked_against_fp32(cmu1_path, cmu1_qupath_cells, small_model):
    # bf16 runs emulated on CPUs without native support: slow, but the same numbers.
    classifier = SlideClassifier(small_model, fast_options(precision="bf16"))
    assert classifier.precision == "bf16"
    cells = cells_in_window(cmu1_qupath_cells, 900, 1500, 150)
    with open_slide(cmu1_path) as slide:
        reduced = classifier.classify(slide, cells)
        full = classify_slide(slide, cells, small_model, options=fast_options())
    assert np.abs(reduced.probs - full.probs).max() < 0.05


def test_bf16_falls_back_to_fp32_when_it_changes_probabilities(small_model, monkeypatch):
    import nuclass_qupath.engine.classify as engine_classify

    monkeypatch.setattr(engine_classify, "BF16_TOLERANCE", 0.0)
    assert SlideClassifier(small_model, fast_options(precision="bf16")).precision == "fp32"

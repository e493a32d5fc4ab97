"""Heatmap tiles on the real CMU-1 cells that QuPath detected."""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import box, shape

from nuclass_qupath.errors import CellsError, MissingMppError
from nuclass_qupath.qupath.heatmap import heatmap_tiles
from nuclass_qupath.qupath.results import (
    TILE_CELLS_MEASUREMENT,
    TILE_MEAN_CONFIDENCE_MEASUREMENT,
    TILE_NAME,
    annotation_region,
    features_to_cell_table,
    fraction_measurement,
    is_nuclass_tile,
)
from qupath_results_fixtures import STAND_IN_CLASSES, area_stand_in_predictions, load_export

WIDTH_PX, HEIGHT_PX, MPP = 2220, 2967, 0.499
NAMES = [name for name, _ in STAND_IN_CLASSES]


@pytest.fixture(scope="module")
def cmu1(shared_data: Path):
    features = load_export(shared_data, "cmu1_cells", "CMU-1-Small-Region.svs")
    table, _ = features_to_cell_table(features)
    probs, confidence, _ = area_stand_in_predictions(table)
    return features, table.centroids_px, probs, confidence


def _tiles(cmu1, **kwargs):
    _, xy, probs, confidence = cmu1
    options = dict(mpp=MPP, tile_um=100.0, image_width_px=WIDTH_PX, image_height_px=HEIGHT_PX)
    options.update(kwargs)
    return heatmap_tiles(xy, probs, NAMES, confidence, **options)


def test_heatmap_counts_sum_to_cells(cmu1):
    tiles = _tiles(cmu1)
    assert sum(t["properties"]["measurements"][TILE_CELLS_MEASUREMENT] for t in tiles) == 3802


def test_heatmap_omits_empty_tiles(cmu1):
    _, xy, _, _ = cmu1
    tile_px = 100.0 / MPP
    occupied = {(int(x // tile_px), int(y // tile_px)) for x, y in xy}
    tiles = _tiles(cmu1)
    assert len(tiles) == len(occupied)
    assert all(t["properties"]["measurements"][TILE_CELLS_MEASUREMENT] >= 1 for t in tiles)
    grid = math.ceil(WIDTH_PX / tile_px) * math.ceil(HEIGHT_PX / tile_px)
    assert len(tiles) < grid


def test_heatmap_fractions_sum_to_one(cmu1):
    for tile in _tiles(cmu1):
        measurements = tile["properties"]["measurements"]
        assert sum(measurements[fraction_measurement(name)] for name in NAMES) == pytest.approx(1.0)


def test_heatmap_tile_matches_cells_inside(cmu1):
    _, xy, probs, confidence = cmu1
    tiles = _tiles(cmu1)
    busiest = max(tiles, key=lambda t: t["properties"]["measurements"][TILE_CELLS_MEASUREMENT])
    x0, y0, x1, y1 = shape(busiest["geometry"]).bounds
    inside = (xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)
    measurements = busiest["properties"]["measurements"]
    assert measurements[TILE_CELLS_MEASUREMENT] == inside.sum()
    assert measurements[TILE_MEAN_CONFIDENCE_MEASUREMENT] == pytest.approx(confidence[inside].mean())
    counts = Counter(probs[inside].argmax(axis=1).tolist())
    for index, name in enumerate(NAMES):
        assert measurements[fraction_measurement(name)] == pytest.approx(counts[index] / inside.sum())


def test_heatmap_tile_size_in_pixels(cmu1):
    tile_px = 100.0 / MPP
    tiles = _tiles(cmu1)
    interior = [shape(t["geometry"]) for t in tiles]
    interior = [g for g in interior if g.bounds[2] < WIDTH_PX and g.bounds[3] < HEIGHT_PX]
    assert interior
    for geometry in interior:
        x0, y0, x1, y1 = geometry.bounds
        assert x1 - x0 == pytest.approx(tile_px, abs=2e-3)
        assert y1 - y0 == pytest.approx(tile_px, abs=2e-3)
        assert x0 / tile_px == pytest.approx(round(x0 / tile_px), abs=1e-4)


def test_heatmap_edge_tiles_clipped_to_image(cmu1):
    tile_px = 100.0 / MPP
    bounds = [shape(t["geometry"]).bounds for t in _tiles(cmu1)]
    assert max(b[2] for b in bounds) <= WIDTH_PX
    assert max(b[3] for b in bounds) <= HEIGHT_PX
    last_row = [b for b in bounds if b[3] == HEIGHT_PX]
    assert last_row
    expected_height = HEIGHT_PX - math.floor(HEIGHT_PX / tile_px) * tile_px
    for b in last_row:
        assert b[3] - b[1] == pytest.approx(expected_height, abs=2e-3)


def test_heatmap_clipped_to_region(cmu1):
    features, xy, _, _ = cmu1
    tissue = annotation_region(features, "Tissue")
    small = box(500, 500, 1500, 1500).intersection(tissue)
    tiles = _tiles(cmu1, tile_um=50.0, region=small)
    inside = sum(small.contains(shape({"type": "Point", "coordinates": p})) for p in xy.tolist())
    assert sum(t["properties"]["measurements"][TILE_CELLS_MEASUREMENT] for t in tiles) == inside
    for tile in tiles:
        geometry = shape(tile["geometry"])
        assert geometry.difference(small.buffer(0.01)).area == pytest.approx(0.0, abs=1e-3)


def test_heatmap_tiles_are_qupath_tiles_with_fixed_names(cmu1):
    tiles = _tiles(cmu1)
    expected = {TILE_CELLS_MEASUREMENT, TILE_MEAN_CONFIDENCE_MEASUREMENT} | {fraction_measurement(n) for n in NAMES}
    for tile in tiles:
        assert tile["type"] == "Feature"
        assert tile["geometry"]["type"] == "Polygon"
        assert tile["properties"]["objectType"] == "tile"
        assert tile["properties"]["name"] == TILE_NAME
        assert set(tile["properties"]["measurements"]) == expected
        assert is_nuclass_tile(tile)


def test_heatmap_leaves_out_cells_outside_image(caplog):
    xy = np.array([[10.0, 10.0], [-5.0, 10.0], [10.0, 5000.0]])
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    with caplog.at_level(logging.WARNING):
        tiles = heatmap_tiles(
            xy, probs, ["A", "B"], probs.max(axis=1), mpp=0.5, image_width_px=100, image_height_px=100
        )
    assert len(tiles) == 1
    assert tiles[0]["properties"]["measurements"][TILE_CELLS_MEASUREMENT] == 1
    assert "2 of 3 cell centroids lie outside" in caplog.text


def test_heatmap_rejects_bad_input():
    xy = np.zeros((2, 2))
    probs = np.full((2, 2), 0.5)
    with pytest.raises(MissingMppError, match="mpp=None"):
        heatmap_tiles(xy, probs, ["A", "B"], [1, 1], mpp=None, image_width_px=10, image_height_px=10)
    with pytest.raises(CellsError, match="probs has shape"):
        heatmap_tiles(xy, probs, ["A", "B", "C"], [1, 1], mpp=0.5, image_width_px=10, image_height_px=10)
    with pytest.raises(CellsError, match="tile_um=-1"):
        heatmap_tiles(xy, probs, ["A", "B"], [1, 1], mpp=0.5, tile_um=-1, image_width_px=10, image_height_px=10)


def test_heatmap_100k_cells_counted_once():
    rng = np.random.default_rng(7)
    n = 100_000
    xy = rng.uniform(0, [40_000, 30_000], size=(n, 2))
    probs = rng.dirichlet(np.ones(6), size=n)
    tiles = heatmap_tiles(
        xy, probs, list("ABCDEF"), probs.max(axis=1), mpp=0.25, image_width_px=40_000, image_height_px=30_000
    )
    assert sum(t["properties"]["measurements"][TILE_CELLS_MEASUREMENT] for t in tiles) == n

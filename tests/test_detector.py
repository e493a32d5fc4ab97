"""Nucleus detector: agreement with QuPath's own detection, coordinates, tiling and input checks."""

from __future__ import annotations

import json
import logging
import time
import uuid

import numpy as np
import pytest
import shapely
from scipy.spatial import cKDTree
from shapely.geometry import shape

from nuclass_qupath.cells.detector import detect_nuclei, hematoxylin_od
from nuclass_qupath.errors import CellsError
from nuclass_qupath.slides import open_slide
from slide_fixtures import nuclei_rgb, write_leica_scn, write_ome_pyramid

# Centroids count as the same nucleus within this distance.
MATCH_UM = 4.0


def _qupath_cells(path):
    """Return nucleus centroids (x, y) of QuPath's cells and the union of its annotations."""
    features = json.loads(path.read_text(encoding="utf-8"))["features"]
    cells = [f for f in features if f["properties"]["objectType"] == "cell"]
    centroids = np.array([shape(f["nucleusGeometry"]).centroid.coords[0] for f in cells])
    annotations = shapely.union_all([shape(f["geometry"]) for f in features
                                     if f["properties"]["objectType"] == "annotation"])
    return centroids, annotations


def _match_rates(ours: np.ndarray, reference: np.ndarray, tolerance_px: float) -> tuple[float, float]:
    """Return the share of reference points near one of ours, and of ours near a reference point."""
    found = cKDTree(ours).query(reference)[0] <= tolerance_px
    correct = cKDTree(reference).query(ours)[0] <= tolerance_px
    return float(found.mean()), float(correct.mean())


@pytest.fixture(scope="module")
def cmu1_slide(cmu1_path):
    with open_slide(cmu1_path) as slide:
        yield slide


@pytest.fixture(scope="module")
def cmu1_qupath(shared_data):
    return _qupath_cells(shared_data / "qupath" / "cmu1_cells" / "export" / "CMU-1-Small-Region.svs.geojson")


@pytest.fixture(scope="module")
def cmu1_detection(cmu1_slide):
    """Detect nuclei on the whole CMU-1 slide once, timing it in CPU and wall seconds."""
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    cells = detect_nuclei(cmu1_slide)
    return cells, time.perf_counter() - start_wall, time.process_time() - start_cpu


# ---------------------------------------------------------------------------
# Agreement with QuPath


def test_region_matches_qupath_cells(cmu1_slide, cmu1_qupath):
    region = (700, 1300, 600, 600)
    cells = detect_nuclei(cmu1_slide, region_px=region)
    reference, _ = cmu1_qupath
    x, y, w, h = region
    # Leave out a margin where QuPath's cells could sit across the region edge.
    margin = 8
    inner_ref = reference[(reference[:, 0] > x + margin) & (reference[:, 0] < x + w - margin)
                          & (reference[:, 1] > y + margin) & (reference[:, 1] < y + h - margin)]
    xy = cells.centroids_px
    inner_ours = xy[(xy[:, 0] > x + margin) & (xy[:, 0] < x + w - margin)
                    & (xy[:, 1] > y + margin) & (xy[:, 1] < y + h - margin)]
    found, correct = _match_rates(inner_ours, inner_ref, MATCH_UM / cmu1_slide.mpp)
    print(f"\nregion: QuPath {len(inner_ref)}, ours {len(inner_ours)}, found {found:.3f}, correct {correct:.3f}")
    assert 0.8 * len(inner_ref) <= len(inner_ours) <= 1.2 * len(inner_ref)
    assert found >= 0.75
    assert correct >= 0.75


@pytest.mark.slow
def test_cmu1_matches_qupath_cells(cmu1_slide, cmu1_qupath, cmu1_detection):
    cells, wall_s, cpu_s = cmu1_detection
    reference, tissue = cmu1_qupath
    xy = cells.centroids_px
    ours = xy[shapely.contains_xy(tissue, xy[:, 0], xy[:, 1])]
    found, correct = _match_rates(ours, reference, MATCH_UM / cmu1_slide.mpp)
    print(f"\nCMU-1: QuPath {len(reference)}, ours {len(ours)} in tissue ({len(cells)} in all), "
          f"QuPath nuclei found {found:.3f}, our nuclei confirmed {correct:.3f}")
    assert len(reference) == 3802
    assert 0.85 * len(reference) <= len(ours) <= 1.15 * len(reference)
    assert found >= 0.8
    assert correct >= 0.8


@pytest.mark.slow
def test_cmu1_nucleus_areas_like_qupath(cmu1_slide, cmu1_qupath, cmu1_detection, shared_data):
    cells, _, _ = cmu1_detection
    features = json.loads((shared_data / "qupath" / "cmu1_cells" / "export" / "CMU-1-Small-Region.svs.geojson")
                          .read_text(encoding="utf-8"))["features"]
    reference_um2 = np.array([f["properties"]["measurements"]["Nucleus: Area"] for f in features
                              if f["properties"]["objectType"] == "cell"])
    ours_um2 = np.array([g.area for g in cells.geometries]) * cmu1_slide.mpp**2
    print(f"\nmedian nucleus area: QuPath {np.median(reference_um2):.1f} µm², ours {np.median(ours_um2):.1f} µm²")
    assert np.median(ours_um2) == pytest.approx(np.median(reference_um2), rel=0.25)


@pytest.mark.slow
def test_cmu1_detection_speed(cmu1_slide, cmu1_detection):
    cells, wall_s, cpu_s = cmu1_detection
    mpx = cmu1_slide.width * cmu1_slide.height * (cmu1_slide.mpp / 0.5) ** 2 / 1e6
    print(f"\nCMU-1 read+detect: {mpx:.2f} Mpx at 0.5 µm/px, {len(cells)} nuclei, "
          f"{wall_s:.1f} s wall ({mpx / wall_s:.2f} Mpx/s), {cpu_s:.1f} s CPU ({mpx / cpu_s:.2f} Mpx/s)")
    # A loose floor for a shared test machine; an idle core reaches about 2 Mpx/s.
    assert mpx / cpu_s > 0.5


def test_tcga_matches_qupath_pixel_parameters(slides_dir, shared_data):
    # QuPath ran on this slide without a pixel size, with its pixel defaults
    # (background 15 px, sigma 3 px, area 10-1000 px²). With mpp=1 the µm
    # parameters below are the same numbers in pixels.
    reference, rectangle = _qupath_cells(shared_data / "qupath" / "tcga_no_mpp" / "export"
                                         / "TCGA-CR-7395-01A-01-TS1.svs.geojson")
    x0, y0, x1, y1 = rectangle.bounds
    with open_slide(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs", mpp=1.0) as slide:
        cells = detect_nuclei(slide, region_px=(x0, y0, x1 - x0, y1 - y0), detection_mpp=1.0,
                              background_radius_um=15, sigma_um=3, min_area_um2=10, max_area_um2=1000)
    found, correct = _match_rates(cells.centroids_px, reference, 4.0)
    print(f"\nTCGA rectangle: QuPath {len(reference)}, ours {len(cells)}, found {found:.3f}, correct {correct:.3f}")
    assert len(reference) == 103
    assert 0.7 * len(reference) <= len(cells) <= 1.3 * len(reference)
    # The rectangle is 160 px wide, so nuclei cut by its edge weigh more than on CMU-1.
    assert found >= 0.65
    assert correct >= 0.75


# ---------------------------------------------------------------------------
# Other real slides


def test_he_example_ome_detects_nuclei(slides_dir):
    with open_slide(slides_dir / "HE_example_ome.tif") as slide:
        cells = detect_nuclei(slide, region_px=(0, 0, 700, 700))
        area_mm2 = 700 * 700 * slide.mpp**2 / 1e6
        areas_um2 = np.array([g.area for g in cells.geometries]) * slide.mpp**2
    density = len(cells) / area_mm2
    print(f"\nHE_example_ome: {len(cells)} nuclei, {density:.0f} per mm², median {np.median(areas_um2):.1f} µm²")
    # Dense H&E tissue contains a few thousand nuclei per mm².
    assert 2000 < density < 15000
    assert 10 < np.median(areas_um2) < 60


def test_tcga_with_given_mpp(slides_dir):
    with open_slide(slides_dir / "TCGA-CR-7395-01A-01-TS1.svs", mpp=0.25) as slide:
        assert slide.mpp_source == "user"
        cells = detect_nuclei(slide, region_px=(1500, 1200, 1000, 1000))
    xy = cells.centroids_px
    # At 0.25 µm/px this frozen section's nuclei measure only a few µm², so few pass 10 µm².
    assert len(cells) > 0
    assert np.all((xy[:, 0] >= 1500) & (xy[:, 0] < 2500))
    assert np.all((xy[:, 1] >= 1200) & (xy[:, 1] < 2200))


# ---------------------------------------------------------------------------
# Coordinates, outlines, tiling


def test_synthetic_nuclei_in_qupath_frame_of_bounded_slide(tmp_path):
    # Discs of radius 8 px at 0.5 µm/px: 50 µm² each. The last two overlap.
    centres = [(60.5, 80.5), (200.0, 100.0), (300.25, 250.75), (420.0, 300.0), (100.0, 300.0),
               (250.0, 50.0), (263.0, 50.0)]
    path = tmp_path / "nuclei.scn"
    write_leica_scn(path, main=nuclei_rgb(384, 512, centres, 8.0))
    with open_slide(path) as slide:
        assert slide.origin_px == (100, 60)
        cells = detect_nuclei(slide)
    assert len(cells) == len(centres)
    distance, _ = cKDTree(cells.centroids_px).query(np.array(centres))
    assert distance[:5].max() < 0.5
    # Splitting the touching pair moves each centroid a little away from the neck.
    assert distance[5:].max() < 1.5


def test_synthetic_nuclei_scaled_from_pyramid(tmp_path):
    # At 0.25 µm/px the detector reads the 2x level; centroids must come back in level-0 pixels.
    centres = [(90.75, 120.75), (300.0, 150.0), (450.375, 376.125), (630.0, 450.0), (150.0, 450.0)]
    path = tmp_path / "nuclei.ome.tif"
    write_ome_pyramid(path, mpp=0.25, image=nuclei_rgb(600, 800, centres, 14.0))
    with open_slide(path) as slide:
        cells = detect_nuclei(slide)
    distance, _ = cKDTree(cells.centroids_px).query(np.array(centres))
    assert len(cells) == len(centres)
    assert distance.max() < 0.5
    areas_um2 = np.array([g.area for g in cells.geometries]) * 0.25**2
    assert np.allclose(areas_um2, np.pi * (14 * 0.25) ** 2, rtol=0.1)


def test_outlines_are_valid_and_hold_their_centroid(cmu1_slide):
    cells = detect_nuclei(cmu1_slide, region_px=(900, 1500, 400, 400))
    assert len(cells) > 50
    polygons = np.array(cells.geometries, dtype=object)
    assert all(g.geom_type == "Polygon" for g in polygons)
    assert shapely.is_valid(polygons).all()
    xy = cells.centroids_px
    distance = shapely.distance(polygons, shapely.points(xy))
    assert np.quantile(distance, 0.99) == 0.0
    areas_um2 = shapely.area(polygons) * cmu1_slide.mpp**2
    # Outlines run through pixel-edge midpoints, so they are slightly smaller than the pixel area.
    assert areas_um2.min() >= 0.8 * 10.0
    assert areas_um2.max() <= 400.0


def test_outlines_clipped_at_image_edge(cmu1_slide):
    # Nuclei cut by the bottom edge of CMU-1 were traced up to 1 px past it.
    width, height = cmu1_slide.width, cmu1_slide.height
    cells = detect_nuclei(cmu1_slide, region_px=(1100, height - 200, 400, 200))
    polygons = np.array(cells.geometries, dtype=object)
    bounds = shapely.bounds(polygons)
    assert len(cells) > 20
    assert all(g.geom_type == "Polygon" for g in polygons)
    assert shapely.is_valid(polygons).all()
    assert bounds[:, 0].min() >= 0
    assert bounds[:, 1].min() >= 0
    assert bounds[:, 2].max() <= width
    assert bounds[:, 3].max() <= height
    on_edge = bounds[:, 3] == height
    assert on_edge.sum() >= 2
    # A clipped outline still contains its nucleus centroid, which lies in the image.
    assert shapely.contains_xy(polygons[on_edge], *cells.centroids_px[on_edge].T).all()


def test_ids_are_unique_uuids(cmu1_slide):
    cells = detect_nuclei(cmu1_slide, region_px=(900, 1500, 300, 300))
    assert len(set(cells.ids)) == len(cells)
    assert all(uuid.UUID(value).version == 4 for value in cells.ids)
    assert cells.labels == [None] * len(cells)


def test_small_tiles_give_same_nuclei_without_duplicates(cmu1_slide):
    region = (800, 1400, 500, 500)
    one_tile = detect_nuclei(cmu1_slide, region_px=region)
    tiled = detect_nuclei(cmu1_slide, region_px=region, tile_px=256)
    pairs = cKDTree(tiled.centroids_px).query_pairs(r=2.0)
    assert not pairs
    # Each tile estimates its own background, so a few outlines near seams
    # shift by a pixel or two. None may appear twice or go missing in bulk.
    found, correct = _match_rates(tiled.centroids_px, one_tile.centroids_px, 2.0)
    assert abs(len(tiled) - len(one_tile)) <= 0.02 * len(one_tile)
    assert found >= 0.93
    assert correct >= 0.93


def test_region_limits_centroids(cmu1_slide):
    region = (1000.5, 1600.25, 250, 180)
    cells = detect_nuclei(cmu1_slide, region_px=region)
    xy = cells.centroids_px
    assert len(cells) > 10
    assert np.all((xy[:, 0] >= region[0]) & (xy[:, 0] < region[0] + region[2]))
    assert np.all((xy[:, 1] >= region[1]) & (xy[:, 1] < region[1] + region[3]))


def test_region_outside_image_is_empty(cmu1_slide):
    cells = detect_nuclei(cmu1_slide, region_px=(5000, 5000, 300, 300))
    assert len(cells) == 0
    assert cells.centroids_px.shape == (0, 2)


def test_white_slide_is_empty(tmp_path):
    path = tmp_path / "blank.ome.tif"
    write_ome_pyramid(path, image=np.full((600, 800, 3), 250, dtype=np.uint8))
    with open_slide(path) as slide:
        cells = detect_nuclei(slide)
    assert len(cells) == 0


def test_otsu_threshold_runs(cmu1_slide):
    cells = detect_nuclei(cmu1_slide, region_px=(900, 1500, 300, 300), threshold_od="otsu")
    fixed = detect_nuclei(cmu1_slide, region_px=(900, 1500, 300, 300))
    assert 0 < len(cells) <= len(fixed)


def test_progress_reports_every_tile(cmu1_slide):
    calls = []
    detect_nuclei(cmu1_slide, region_px=(900, 1500, 300, 300), tile_px=128, progress=lambda done, total: calls.append((done, total)))
    # 300 level-0 px at 0.499 µm/px are 300 detection px: 3 x 3 tiles of 128.
    assert calls == [(i, 9) for i in range(1, 10)]


def test_logs_one_info_line(cmu1_slide, caplog):
    with caplog.at_level(logging.INFO, logger="nuclass_qupath.cells.detector"):
        cells = detect_nuclei(cmu1_slide, region_px=(900, 1500, 200, 200))
    messages = [r.getMessage() for r in caplog.records if r.name == "nuclass_qupath.cells.detector"]
    assert len(messages) == 1
    assert f"detected {len(cells)} nuclei" in messages[0]
    assert "w=200 h=200" in messages[0]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"min_area_um2": 50, "max_area_um2": 20}, "min_area_um2"),
        ({"sigma_um": -1}, "sigma_um"),
        ({"detection_mpp": 0}, "detection_mpp"),
        ({"threshold_od": "mean"}, "threshold_od"),
        ({"region_px": (0, 0, -5, 10)}, "negative"),
        ({"region_px": (0, 0, 10)}, "region_px"),
    ],
)
def test_rejects_invalid_parameters(cmu1_slide, options, fragment):
    with pytest.raises(CellsError, match=fragment):
        detect_nuclei(cmu1_slide, **options)


def test_hematoxylin_od_separates_stains():
    white = np.full((1, 1, 3), 255, dtype=np.uint8)
    purple = np.array([[[80, 50, 130]]], dtype=np.uint8)
    pink = np.array([[[235, 150, 200]]], dtype=np.uint8)
    assert hematoxylin_od(white)[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert hematoxylin_od(purple)[0, 0] > 0.3
    assert hematoxylin_od(pink)[0, 0] < hematoxylin_od(purple)[0, 0] / 3

"""Slide reading: formats, pixel size, QuPath's frame, resampling and broken files."""

from __future__ import annotations

import logging
import math
import shutil
import time

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from nuclass_qupath.errors import MissingMppError, SlideError, SlideNotFoundError, UnsupportedSlideError
from nuclass_qupath.slides import open_slide, qupath_frame
from slide_fixtures import gradient_rgb, write_leica_scn, write_ome_pyramid, write_plain_tiff


@pytest.fixture(scope="module")
def he_ome_path(slides_dir):
    return slides_dir / "HE_example_ome.tif"


@pytest.fixture(scope="module")
def tcga_path(slides_dir):
    return slides_dir / "TCGA-CR-7395-01A-01-TS1.svs"


def _openslide_rgb(path, location, level, size) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as handle:
        return np.asarray(handle.read_region(location, level, size))[..., :3]


# ---------------------------------------------------------------------------
# Opening and metadata


def test_open_slide_reads_cmu1_metadata(cmu1_path):
    with open_slide(cmu1_path) as slide:
        assert slide.backend == "openslide"
        assert (slide.width, slide.height) == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "metadata"
        assert slide.level_downsamples == (1.0,)
        assert slide.level_dimensions == ((2220, 2967),)
        assert "CMU-1-Small-Region.svs" in repr(slide)
        assert "0.499" in repr(slide)


def test_open_slide_reads_ome_tiff_with_tifffile(he_ome_path):
    with open_slide(he_ome_path) as slide:
        assert slide.backend == "tifffile"
        assert (slide.width, slide.height) == (1380, 1484)
        assert slide.mpp == pytest.approx(0.50008, abs=1e-5)
        region = slide.read_region(300, 400, 256, 128)
    expected = tifffile.imread(he_ome_path)[400:528, 300:556]
    assert region.dtype == np.uint8
    assert np.array_equal(region, expected)


def test_open_slide_reads_imagej_calibration(shared_data):
    # QuPath reads this crop as 0.49900000000000005 µm/px from its ImageJ calibration.
    with open_slide(shared_data / "qupath" / "images" / "cmu1_crop_rgb.tif") as slide:
        assert slide.mpp == pytest.approx(0.499, rel=1e-9)
        assert (slide.width, slide.height) == (512, 512)


def test_missing_mpp_names_the_option(tcga_path):
    with pytest.raises(MissingMppError) as info:
        open_slide(tcga_path)
    message = str(info.value)
    assert str(tcga_path) in message
    assert "no pixel size" in message
    assert "--mpp MICRONS_PER_PIXEL" in message


def test_user_mpp_overrides_metadata(cmu1_path, caplog):
    with caplog.at_level(logging.INFO, logger="nuclass_qupath.slides"):
        with open_slide(cmu1_path, mpp=0.25) as slide:
            assert slide.mpp == 0.25
            assert slide.mpp_source == "user"
    assert any("instead of 0.499" in record.getMessage() for record in caplog.records)


def test_user_mpp_opens_slide_without_metadata(tcga_path):
    with open_slide(tcga_path, mpp=0.25) as slide:
        assert slide.mpp == 0.25
        assert slide.mpp_source == "user"
        assert slide.level_dimensions == ((4443, 3567), (2221, 1783))


@pytest.mark.parametrize("bad_mpp", [0, -0.5, math.nan, math.inf])
def test_rejects_invalid_mpp(cmu1_path, bad_mpp):
    with pytest.raises(SlideError, match="invalid pixel size"):
        open_slide(cmu1_path, mpp=bad_mpp)


def test_desktop_dpi_is_not_mpp(tmp_path):
    path = tmp_path / "scan.tif"
    write_plain_tiff(path, gradient_rgb(64, 64), resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(MissingMppError):
        open_slide(path)


def test_striped_tiff_reads_resolution_in_cm(tmp_path):
    path = tmp_path / "striped.tif"
    image = gradient_rgb(300, 400)
    write_plain_tiff(path, image, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with open_slide(path) as slide:
        assert slide.backend == "tifffile"
        assert slide.mpp == pytest.approx(0.5)
        assert np.array_equal(slide.read_region(50, 60, 200, 100), image[60:160, 50:250])


# ---------------------------------------------------------------------------
# Errors


def test_missing_file_raises_not_found(tmp_path):
    path = tmp_path / "absent.svs"
    with pytest.raises(SlideNotFoundError, match="absent.svs"):
        open_slide(path)
    with pytest.raises(FileNotFoundError):
        open_slide(path)


def test_unsupported_file_names_formats(tmp_path):
    path = tmp_path / "photo.gif"
    Image.fromarray(gradient_rgb(32, 32)).save(path)
    with pytest.raises(UnsupportedSlideError) as info:
        open_slide(path)
    assert str(path) in str(info.value)
    assert "OME-TIFF" in str(info.value)
    assert "Aperio" in str(info.value)


def test_truncated_cmu1_raises_slide_error(cmu1_path, tmp_path):
    path = tmp_path / "truncated.svs"
    data = cmu1_path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError) as info:
        open_slide(path)
    assert str(path) in str(info.value)
    assert "truncated or corrupt" in str(info.value)


def test_corrupt_tile_raises_slide_error_on_read(cmu1_path, tmp_path):
    path = tmp_path / "corrupt.svs"
    shutil.copy(cmu1_path, path)
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages.first.dataoffsets[0]
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * 4096)

    with open_slide(path) as slide:
        with pytest.raises(SlideError) as info:
            slide.read_region(0, 0, 240, 240)
    message = str(info.value)
    assert str(path) in message
    assert "x=0, y=0, w=240, h=240" in message
    assert isinstance(info.value.__cause__, openslide.OpenSlideError)


def test_truncated_ome_tiff_raises_slide_error_on_read(he_ome_path, tmp_path):
    path = tmp_path / "truncated.ome.tif"
    data = he_ome_path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.7)])
    with open_slide(path) as slide:
        assert slide.backend == "tifffile"
        with pytest.raises(SlideError) as info:
            slide.read_region(0, 1000, 1380, 484)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is not None


# ---------------------------------------------------------------------------
# QuPath's frame


def test_qupath_frame_uses_openslide_bounds():
    properties = {
        "openslide.bounds-x": "100",
        "openslide.bounds-y": "60",
        "openslide.bounds-width": "512",
        "openslide.bounds-height": "384",
    }
    assert qupath_frame(properties, (1000, 800)) == (100, 60, 512, 384)


def test_qupath_frame_without_bounds_is_full_image():
    assert qupath_frame({"openslide.bounds-x": "100"}, (1000, 800)) == (0, 0, 1000, 800)
    assert qupath_frame({}, (1000, 800)) == (0, 0, 1000, 800)


def test_qupath_frame_ignores_non_integer_bounds():
    properties = {
        "openslide.bounds-x": "1.5",
        "openslide.bounds-y": "60",
        "openslide.bounds-width": "512",
        "openslide.bounds-height": "384",
    }
    assert qupath_frame(properties, (1000, 800)) == (0, 0, 1000, 800)


def test_leica_bounds_shift_every_read(tmp_path):
    path = tmp_path / "bounds.scn"
    expected = write_leica_scn(path)
    with openslide.OpenSlide(str(path)) as handle:
        assert handle.properties["openslide.bounds-x"] == "100"
        assert handle.dimensions == expected["collection_px"]

    with open_slide(path) as slide:
        assert slide.backend == "openslide"
        assert (slide.width, slide.height) == (512, 384)
        assert slide.origin_px == (100, 60)
        assert slide.level_dimensions == ((512, 384), (256, 192))
        assert np.array_equal(slide.read_region(0, 0, 512, 384), expected["level0"])
        assert np.array_equal(slide.read_region(64, 32, 100, 50, level=1), expected["level1"][16:66, 32:132])
        corner = slide.read_region(-10, -10, 20, 20)
        at_half_mpp = slide.read_region_at_mpp(0, 0, 256, 192, 1.0)
    assert np.all(corner[:10, :] == 255)
    assert np.array_equal(corner[10:, 10:], expected["level0"][:10, :10])
    assert np.array_equal(at_half_mpp, expected["level1"])


# ---------------------------------------------------------------------------
# Reading regions


def test_read_region_matches_openslide(cmu1_path):
    with open_slide(cmu1_path) as slide:
        region = slide.read_region(700, 1200, 300, 200)
    assert region.shape == (200, 300, 3)
    assert np.array_equal(region, _openslide_rgb(cmu1_path, (700, 1200), 0, (300, 200)))


def test_read_region_outside_image_is_white(cmu1_path):
    with open_slide(cmu1_path) as slide:
        region = slide.read_region(2200, -30, 50, 60)
    inside = _openslide_rgb(cmu1_path, (2200, 0), 0, (20, 30))
    assert np.all(region[:30] == 255)
    assert np.all(region[:, 20:] == 255)
    assert np.array_equal(region[30:, :20], inside)


def test_read_region_wholly_outside_is_white(he_ome_path):
    with open_slide(he_ome_path) as slide:
        region = slide.read_region(5000, 5000, 40, 30)
    assert region.shape == (30, 40, 3)
    assert np.all(region == 255)


def test_read_region_rejects_bad_level(cmu1_path):
    with open_slide(cmu1_path) as slide:
        with pytest.raises(ValueError, match="level 3"):
            slide.read_region(0, 0, 10, 10, level=3)


def test_read_region_at_mpp_same_grid_is_exact(he_ome_path):
    with open_slide(he_ome_path) as slide:
        direct = slide.read_region(100, 200, 128, 96)
        resampled = slide.read_region_at_mpp(100, 200, 128, 96, slide.mpp)
    assert np.array_equal(direct, resampled)


def test_read_region_at_mpp_averages_when_shrinking(cmu1_path):
    with open_slide(cmu1_path) as slide:
        half = slide.read_region_at_mpp(800, 1000, 200, 150, 2 * slide.mpp)
        full = slide.read_region(800, 1000, 400, 300).astype(np.float64)
    block_mean = full.reshape(150, 2, 200, 2, 3).mean(axis=(1, 3))
    resampled_error = np.abs(half - block_mean).mean()
    sampled_error = np.abs(full[::2, ::2] - block_mean).mean()
    assert half.shape == (150, 200, 3)
    # Bilinear shrinking weighs a 4x4 footprint, so it sits near the 2x2 mean
    # and much nearer than taking every other pixel.
    assert resampled_error < 6.0
    assert resampled_error < 0.6 * sampled_error


def test_read_region_at_mpp_picks_pyramid_level(tcga_path):
    with open_slide(tcga_path, mpp=0.25) as slide:
        assert slide.best_level_for_downsample(2.0) == 1
        assert slide.best_level_for_downsample(1.9) == 0
        resampled = slide.read_region_at_mpp(2000, 1600, 256, 256, 0.5)
        level1 = slide.read_region(2000, 1600, 256, 256, level=1).astype(np.float64)
    # Level 1's downsample is 2.0005, so the two grids differ by a fraction of a pixel.
    assert np.abs(resampled - level1).mean() < 6.0


def test_read_region_at_mpp_pads_outside_with_white(cmu1_path):
    with open_slide(cmu1_path) as slide:
        region = slide.read_region_at_mpp(-200, -200, 100, 100, 1.0)
    assert region.shape == (100, 100, 3)
    assert np.all(region[:90, :90] == 255)


def test_ome_pyramid_levels_from_subifds(tmp_path):
    path = tmp_path / "pyramid.ome.tif"
    levels = write_ome_pyramid(path, mpp=0.25, byteorder=">")
    with open_slide(path) as slide:
        assert slide.backend == "tifffile"
        assert slide.mpp == pytest.approx(0.25)
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        assert np.array_equal(slide.read_region(10, 20, 300, 200), levels[0][20:220, 10:310])
        assert np.array_equal(slide.read_region(40, 80, 100, 50, level=2), levels[2][20:70, 10:110])
        assert np.array_equal(slide.read_region_at_mpp(0, 0, 200, 150, 1.0), levels[2])


def test_ome_planar_little_endian_pyramid(tmp_path):
    path = tmp_path / "planar.ome.tif"
    image = write_ome_pyramid(path, planar=True, byteorder="<")[0]
    with open_slide(path) as slide:
        # OpenSlide's generic TIFF driver could open this file but would miss the SubIFD levels.
        assert slide.backend == "tifffile"
        assert len(slide.level_downsamples) == 3
        assert np.array_equal(slide.read_region(333, 111, 64, 64), image[111:175, 333:397])


def test_thumbnail_keeps_aspect(cmu1_path):
    with open_slide(cmu1_path) as slide:
        thumbnail = slide.thumbnail(512)
    assert thumbnail.shape == (512, 383, 3)
    assert thumbnail.dtype == np.uint8
    # The slide is mostly tissue on a white background.
    assert 150 < thumbnail.mean() < 250


def test_closed_slide_context_manager(he_ome_path):
    slide = open_slide(he_ome_path)
    with slide as same:
        assert same is slide
    assert slide._reader.tif.filehandle.closed


def test_read_throughput_cmu1(cmu1_path):
    """Level-0 reads of 1024 px regions inside the image, as the engine makes them."""
    with open_slide(cmu1_path) as slide:
        slide.read_region(0, 0, 1024, 1024)
        start = time.perf_counter()
        pixels = 0
        for x, y in [(0, 0), (1024, 0), (0, 1024), (1024, 1024), (0, 1943), (1024, 1943)]:
            pixels += slide.read_region(x, y, 1024, 1024).shape[0] * 1024
        elapsed = time.perf_counter() - start
    mpx_per_s = pixels / 1e6 / elapsed
    print(f"\nCMU-1 level-0 read: {mpx_per_s:.1f} Mpx/s")
    # A loose floor so a shared test machine passes; typical is 20-40 Mpx/s.
    assert mpx_per_s > 2.0


def test_png_tile_needs_mpp_then_reads(tmp_path):
    path = tmp_path / "tile.png"
    pixels = gradient_rgb(30, 40)  # height 30, width 40
    Image.fromarray(pixels).save(path)
    with pytest.raises(MissingMppError, match="--mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.backend == "pillow"
        assert (slide.width, slide.height) == (40, 30)
        np.testing.assert_array_equal(slide.read_region(0, 0, 40, 30), pixels)
        outside = slide.read_region(-5, -5, 10, 10)
        assert (outside[:5, :5] == 255).all()


def test_crop_equals_same_pixels_of_larger_region(cmu1_path):
    # Both engine modes rely on a crop being an exact sub-grid of a region on the same grid.
    with open_slide(cmu1_path) as slide:
        for target_mpp in (0.5, 2.0):
            scale = target_mpp / slide.mpp
            region = slide.read_region_at_mpp(400 * scale, 600 * scale, 300, 300, target_mpp)
            crop = slide.read_region_at_mpp(470 * scale, 655 * scale, 64, 64, target_mpp)
            np.testing.assert_array_equal(crop, region[55:119, 70:134])

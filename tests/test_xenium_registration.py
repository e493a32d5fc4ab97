"""Registration of Xenium cells onto CMU-1, and the check against H&E nuclei."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from nuclass_qupath.cells.table import CellTable
from nuclass_qupath.errors import XeniumError
from nuclass_qupath.slides import open_slide
from nuclass_qupath.xenium.bundle import read_xenium
from nuclass_qupath.xenium.registration import (
    check_registration,
    read_alignment,
    register_to_slide,
    slide_px_to_xenium_um,
    xenium_um_to_slide_px,
)

# The fixtures module is also loaded as a plugin below; mark it before importing from it.
pytest.register_assert_rewrite("xenium_fixtures")
from xenium_fixtures import (  # noqa: E402
    CMU1_MPP,
    PIXEL_SIZE_UM,
    he_px_to_um,
    known_alignment,
    write_alignment,
)

logger = logging.getLogger(__name__)

# Session fixtures (bundles written once) shared by every Xenium test module.
pytest_plugins = ["xenium_fixtures"]


@pytest.fixture(scope="module")
def cmu1_slide(cmu1_path):
    with open_slide(cmu1_path) as slide:
        yield slide


def qupath_detector(nuclei):
    """Nucleus 'detector' that returns QuPath 0.6.0's recorded detections inside the region."""

    def detect(slide, *, region_px=None):
        x, y, w, h = region_px
        c = nuclei.centroids_px
        inside = np.flatnonzero((c[:, 0] >= x) & (c[:, 0] < x + w) & (c[:, 1] >= y) & (c[:, 1] < y + h))
        return CellTable(
            ids=[nuclei.ids[i] for i in inside],
            centroids_px=c[inside],
            geometries=[nuclei.polygons[i] for i in inside],
        )

    return detect


def shifted(alignment: np.ndarray, shift_um: float) -> np.ndarray:
    moved = alignment.copy()
    moved[0, 2] += shift_um / PIXEL_SIZE_UM
    return moved


# ---------------------------------------------------------------- alignment file and mapping


def test_read_alignment_round_trip(tmp_path):
    matrix = known_alignment()
    path = write_alignment(tmp_path / "sample_he_imagealignment.csv", matrix)
    assert np.array_equal(read_alignment(path), matrix)


def test_mapping_direction_matches_10x_convention(synthetic_run):
    # The matrix maps H&E px to morphology px; µm = morphology px × pixel size.
    he_px = synthetic_run.he_px[:50]
    um = he_px_to_um(he_px, synthetic_run.alignment)
    assert np.allclose(slide_px_to_xenium_um(he_px, synthetic_run.alignment, PIXEL_SIZE_UM), um)
    assert np.allclose(xenium_um_to_slide_px(um, synthetic_run.alignment, PIXEL_SIZE_UM), he_px, atol=1e-9)
    # H&E distances shrink by the ratio of pixel sizes on the way to morphology px.
    step_um = np.linalg.norm(um[1] - um[0])
    step_px = np.linalg.norm(he_px[1] - he_px[0])
    assert step_um == pytest.approx(step_px * CMU1_MPP, rel=1e-9)


def test_register_recovers_he_positions(bundle_dirs, synthetic_run, cmu1_slide):
    adata = read_xenium(bundle_dirs["xoa2_parquet_h5"])
    alignment = read_alignment(bundle_dirs["xoa2_parquet_h5"] / "cmu1_he_imagealignment.csv")
    xy = register_to_slide(adata, alignment, slide_width_px=cmu1_slide.width, slide_height_px=cmu1_slide.height)
    error_px = np.linalg.norm(xy - synthetic_run.he_px, axis=1)
    logger.info("registration error: max %.2g px", error_px.max())
    # Boundaries are float32 µm, as 10x writes them: about 1e-3 px of rounding.
    assert error_px.max() < 0.01
    assert np.array_equal(adata.obsm["slide_px"], xy)
    assert adata.obs["on_slide"].all()


def test_register_uses_cell_centroid_without_nucleus(bundle_dirs, synthetic_run, cmu1_slide):
    adata = read_xenium(bundle_dirs["xoa2_parquet_h5"])
    adata.obs["nucleus_centroid_x"] = np.nan
    xy = register_to_slide(
        adata, synthetic_run.alignment, slide_width_px=cmu1_slide.width, slide_height_px=cmu1_slide.height
    )
    expected = xenium_um_to_slide_px(synthetic_run.cell_um, synthetic_run.alignment, PIXEL_SIZE_UM)
    assert np.abs(xy - expected).max() < 1e-6


# ---------------------------------------------------------------- registration check


def test_check_registration_on_qupath_nuclei(synthetic_run, qupath_nuclei, cmu1_slide):
    xy = xenium_um_to_slide_px(synthetic_run.nucleus_um, synthetic_run.alignment, PIXEL_SIZE_UM)
    report = check_registration(cmu1_slide, xy, detector=qupath_detector(qupath_nuclei))
    logger.info("registration check, aligned: %s", report)
    assert report.n_checked > 2500
    assert report.n_detected > 2500
    assert report.share_on_nucleus > 0.75
    # The Xenium nuclei were jittered by N(0, 1 µm) per axis: median distance 1.18 µm.
    assert 0.9 < report.median_offset_um < 1.5
    assert report.region_px[2] <= 2048
    assert report.region_px[3] <= 2048


def test_check_registration_detects_shift(synthetic_run, qupath_nuclei, cmu1_slide):
    detector = qupath_detector(qupath_nuclei)
    aligned = check_registration(
        cmu1_slide,
        xenium_um_to_slide_px(synthetic_run.nucleus_um, synthetic_run.alignment, PIXEL_SIZE_UM),
        detector=detector,
    )
    off = check_registration(
        cmu1_slide,
        xenium_um_to_slide_px(synthetic_run.nucleus_um, shifted(synthetic_run.alignment, 8.0), PIXEL_SIZE_UM),
        detector=detector,
    )
    logger.info("registration check, 8 µm off: %s", off)
    assert off.share_on_nucleus < 0.3
    assert off.median_offset_um > 3.0
    assert off.share_on_nucleus < aligned.share_on_nucleus / 2


def test_check_registration_region_and_points(qupath_nuclei, cmu1_slide):
    points = qupath_nuclei.centroids_px
    report = check_registration(
        cmu1_slide, points, detector=qupath_detector(qupath_nuclei), region_px=(500, 500, 600, 600)
    )
    assert report.region_px == (500, 500, 600, 600)
    assert report.median_offset_um == pytest.approx(0.0, abs=1e-9)
    # A polygon centroid can lie outside a concave outline, so not quite every point is inside.
    assert report.share_on_nucleus > 0.97


def test_check_registration_with_builtin_detector(synthetic_run, cmu1_slide):
    detector_module = pytest.importorskip("nuclass_qupath.cells.detector")
    xy = xenium_um_to_slide_px(synthetic_run.nucleus_um, synthetic_run.alignment, PIXEL_SIZE_UM)
    region = (800, 800, 700, 700)
    aligned = check_registration(cmu1_slide, xy, detector=detector_module.detect_nuclei, region_px=region)
    off = check_registration(
        cmu1_slide,
        xenium_um_to_slide_px(synthetic_run.nucleus_um, shifted(synthetic_run.alignment, 8.0), PIXEL_SIZE_UM),
        detector=detector_module.detect_nuclei,
        region_px=region,
    )
    logger.info("built-in detector: aligned %s, 8 µm off %s", aligned, off)
    assert aligned.n_detected > 100
    assert aligned.share_on_nucleus > 0.5
    assert aligned.median_offset_um < 3.0
    assert off.share_on_nucleus < aligned.share_on_nucleus


def test_check_registration_without_cells_in_region_raises(qupath_nuclei, cmu1_slide):
    with pytest.raises(XeniumError, match="no registered Xenium nucleus"):
        check_registration(
            cmu1_slide,
            np.array([[10.0, 10.0]]),
            detector=qupath_detector(qupath_nuclei),
            region_px=(1000, 1000, 200, 200),
        )


# ---------------------------------------------------------------- bad input


def test_singular_alignment_raises(tmp_path):
    singular = np.array([[1.0, 2.0, 5.0], [2.0, 4.0, 7.0], [0.0, 0.0, 1.0]])
    path = write_alignment(tmp_path / "singular.csv", singular)
    with pytest.raises(XeniumError) as info:
        read_alignment(path)
    assert "not invertible" in str(info.value)
    assert "singular.csv" in str(info.value)


def test_alignment_with_header_raises(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("a,b,c\n1,0,0\n0,1,0\n0,0,1\n", encoding="utf-8")
    with pytest.raises(XeniumError, match="no header"):
        read_alignment(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("1,0,0\n0,1,0\n", r"\(2, 3\)"),
        ("1,0,0\n0,1,0\n0.1,0,1\n", "last row"),
        ("1,0,0\n0,1,0\n0,0,nan\n", "not finite"),
        ("", "empty"),
    ],
)
def test_malformed_alignment_raises(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(XeniumError, match=message):
        read_alignment(path)


def test_missing_alignment_file_raises(tmp_path):
    with pytest.raises(XeniumError, match="not found"):
        read_alignment(tmp_path / "absent.csv")


def test_cells_off_slide_raise_with_figures(bundle_dirs, synthetic_run, cmu1_slide):
    adata = read_xenium(bundle_dirs["xoa2_parquet_h5"])
    with pytest.raises(XeniumError) as info:
        register_to_slide(
            adata,
            shifted(synthetic_run.alignment, 500.0),
            slide_width_px=cmu1_slide.width,
            slide_height_px=cmu1_slide.height,
        )
    message = str(info.value)
    assert f"of {adata.n_obs} Xenium cells" in message
    assert "2220×2967" in message


def test_few_cells_off_slide_are_marked(bundle_dirs, synthetic_run, cmu1_slide, caplog):
    adata = read_xenium(bundle_dirs["xoa2_parquet_h5"])
    # Move the slide origin right so that the 21 leftmost cells fall off the slide.
    cut = np.sort(synthetic_run.he_px[:, 0])[20] + 0.5
    moved = synthetic_run.alignment @ np.array([[1.0, 0.0, cut], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    with caplog.at_level("WARNING"):
        xy = register_to_slide(
            adata, moved, slide_width_px=cmu1_slide.width, slide_height_px=cmu1_slide.height, max_off_image_share=0.05
        )
    assert np.abs(xy - (synthetic_run.he_px - [cut, 0.0])).max() < 0.01
    assert int((~adata.obs["on_slide"]).sum()) == 21
    assert "fall outside the slide" in caplog.text

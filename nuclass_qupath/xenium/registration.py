"""Map Xenium cells onto the H&E slide of the same section, and check the result.

10x's image-alignment file (``*_he_imagealignment.csv``, written by Xenium
Explorer) is a 3×3 affine matrix without a header. It maps a pixel ``(x, y)``
of the H&E image to a pixel of the Xenium morphology image. That pixel times
``pixel_size`` (µm/px, from ``experiment.xenium``) is the position in Xenium
µm. Source: 10x Genomics knowledge base, "How can I convert coordinates
between H&E image and Xenium data?". So a Xenium position goes to the slide
as::

    morphology_px = xenium_um / pixel_size
    slide_px      = inverse(alignment) @ morphology_px

The matrix must have been made against the same image that the slide reader
opens, at full resolution: its level 0 in QuPath's frame.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nuclass_qupath.errors import XeniumError

logger = logging.getLogger(__name__)

# A 2×2 linear part whose condition number exceeds this cannot be inverted
# without losing all precision in float64.
MAX_CONDITION = 1e12
# Radius within which a detected nucleus without an outline counts as hit.
POINT_NUCLEUS_RADIUS_UM = 4.0


def read_alignment(path: str | Path) -> np.ndarray:
    """Read a 10x image-alignment CSV: three rows of three numbers, no header.

    Returns
    -------
    numpy.ndarray
        ``(3, 3)`` float64 affine matrix from H&E image px to morphology px.

    Raises
    ------
    XeniumError
        If the file is missing, is not 3×3 numbers, or the matrix is not an
        invertible affine transform.
    """
    file = Path(path)
    if not file.is_file():
        raise XeniumError(f"image alignment file not found: {file}")
    rows = [line.strip() for line in file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not rows:
        raise XeniumError(f"image alignment file {file} is empty; expected three rows of three numbers")
    try:
        matrix = np.array([[float(v) for v in row.split(",")] for row in rows], dtype=np.float64)
    except ValueError as exc:
        raise XeniumError(
            f"image alignment file {file} must contain three rows of three comma-separated numbers "
            f"and no header; its first line is {rows[0]!r}"
        ) from exc
    if matrix.shape != (3, 3):
        raise XeniumError(f"image alignment file {file} contains a {matrix.shape} table; expected 3 rows of 3 numbers")
    return validate_alignment(matrix, source=str(file))


def validate_alignment(matrix: np.ndarray, *, source: str = "alignment matrix") -> np.ndarray:
    """Check that ``matrix`` is a finite, invertible 3×3 affine transform and return it as float64."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (3, 3):
        raise XeniumError(f"{source}: expected a 3×3 matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise XeniumError(f"{source}: matrix has entries that are not finite: {matrix.tolist()}")
    if not np.allclose(matrix[2], [0.0, 0.0, 1.0], atol=1e-9):
        raise XeniumError(
            f"{source}: last row is {matrix[2].tolist()}, expected [0, 0, 1]; only affine alignments are supported"
        )
    linear = matrix[:2, :2]
    determinant = float(np.linalg.det(linear))
    condition = float(np.linalg.cond(linear)) if determinant != 0.0 else float("inf")
    if determinant == 0.0 or not np.isfinite(condition) or condition > MAX_CONDITION:
        raise XeniumError(
            f"{source}: the alignment matrix is not invertible (determinant {determinant:.3g}, "
            f"condition number {condition:.3g}); export the alignment again from Xenium Explorer"
        )
    return matrix


def xenium_um_to_slide_px(xy_um: np.ndarray, alignment: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Map Xenium µm ``(N, 2)`` to level-0 slide pixels ``(N, 2)``, x then y, QuPath frame."""
    alignment = validate_alignment(alignment)
    xy_um = np.asarray(xy_um, dtype=np.float64).reshape(-1, 2)
    morphology_px = xy_um / float(pixel_size_um)
    inverse = np.linalg.inv(alignment)
    return morphology_px @ inverse[:2, :2].T + inverse[:2, 2]


def slide_px_to_xenium_um(xy_px: np.ndarray, alignment: np.ndarray, pixel_size_um: float) -> np.ndarray:
    """Map level-0 slide pixels ``(N, 2)`` to Xenium µm ``(N, 2)``; the inverse of :func:`xenium_um_to_slide_px`."""
    alignment = validate_alignment(alignment)
    xy_px = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    return (xy_px @ alignment[:2, :2].T + alignment[:2, 2]) * float(pixel_size_um)


def register_to_slide(
    adata,
    alignment: np.ndarray | str | Path,
    *,
    slide_width_px: int,
    slide_height_px: int,
    max_off_image_share: float = 0.01,
) -> np.ndarray:
    """Compute each cell's position on the slide and store it in the AnnData.

    The nucleus centroid is used where the bundle gives one, else the cell
    centroid. Results go to ``adata.obsm["slide_px"]`` (``(N, 2)`` level-0 px,
    x then y, QuPath frame) and ``adata.obs["on_slide"]``.

    Parameters
    ----------
    adata
        AnnData from :func:`nuclass_qupath.xenium.bundle.read_xenium`.
    alignment
        3×3 matrix or path to the image-alignment CSV.
    slide_width_px, slide_height_px
        Level-0 size of the H&E slide.
    max_off_image_share
        Largest share of cells allowed to fall outside the slide. Those cells
        are kept with ``on_slide`` False; above the share the alignment is
        taken to be wrong and an error is raised.

    Returns
    -------
    numpy.ndarray
        The ``(N, 2)`` slide positions.

    Raises
    ------
    XeniumError
        For an invalid alignment, or when too many cells land off the slide.
    """
    matrix = read_alignment(alignment) if isinstance(alignment, (str, Path)) else validate_alignment(alignment)
    pixel_size_um = float(adata.uns["xenium"]["pixel_size_um"])
    xy_um = adata.obsm["spatial"].astype(np.float64).copy()
    if {"nucleus_centroid_x", "nucleus_centroid_y"} <= set(adata.obs.columns):
        nucleus = adata.obs[["nucleus_centroid_x", "nucleus_centroid_y"]].to_numpy(dtype=np.float64)
        has_nucleus = np.isfinite(nucleus).all(axis=1)
        xy_um[has_nucleus] = nucleus[has_nucleus]
    xy_px = xenium_um_to_slide_px(xy_um, matrix, pixel_size_um)

    on_slide = (
        (xy_px[:, 0] >= 0) & (xy_px[:, 0] < slide_width_px) & (xy_px[:, 1] >= 0) & (xy_px[:, 1] < slide_height_px)
    )
    n_off = int((~on_slide).sum())
    if len(xy_px) and n_off / len(xy_px) > max_off_image_share:
        lo = np.nanmin(xy_px, axis=0)
        hi = np.nanmax(xy_px, axis=0)
        raise XeniumError(
            f"{n_off} of {len(xy_px)} Xenium cells ({100 * n_off / len(xy_px):.1f}%) fall outside the "
            f"{slide_width_px}×{slide_height_px} px H&E slide: cells span x {lo[0]:.0f} to {hi[0]:.0f} px, "
            f"y {lo[1]:.0f} to {hi[1]:.0f} px. Check that the alignment CSV belongs to this slide and "
            "maps H&E pixels to Xenium morphology pixels"
        )
    if n_off:
        logger.warning("%d of %d Xenium cells fall outside the slide and get no label", n_off, len(xy_px))
    adata.obsm["slide_px"] = xy_px
    adata.obs["on_slide"] = on_slide
    logger.info(
        "registered %d Xenium cells onto the %d×%d px slide (%d off the slide)",
        len(xy_px),
        slide_width_px,
        slide_height_px,
        n_off,
    )
    return xy_px


@dataclass(frozen=True)
class RegistrationReport:
    """Agreement between registered Xenium nuclei and the nuclei detected on the H&E.

    Attributes
    ----------
    share_on_nucleus
        Share of checked Xenium nuclei that lie inside a detected nucleus outline.
    median_offset_um
        Median distance from a checked Xenium nucleus to the nearest detected
        nucleus centroid, over those within ``max_distance_um``; NaN if none is.
    n_checked
        Xenium nuclei inside the checked region.
    n_detected
        Nuclei the detector found in the region.
    n_matched
        Checked nuclei with a detected nucleus within ``max_distance_um``.
    region_px
        ``(x, y, width, height)`` of the checked region, level-0 px.
    """

    share_on_nucleus: float
    median_offset_um: float
    n_checked: int
    n_detected: int = 0
    n_matched: int = 0
    region_px: tuple[int, int, int, int] | None = None

    def as_dict(self) -> dict:
        """Return the report as plain JSON types, for run summaries."""
        return {
            "share_on_nucleus": self.share_on_nucleus,
            "median_offset_um": self.median_offset_um,
            "n_checked": self.n_checked,
            "n_detected": self.n_detected,
            "n_matched": self.n_matched,
            "region_px": list(self.region_px) if self.region_px else None,
        }


def _default_detector() -> Callable:
    try:
        from nuclass_qupath.cells.detector import detect_nuclei
    except ImportError as exc:
        raise XeniumError(
            "the registration check needs the built-in nucleus detector (nuclass_qupath.cells.detector), "
            f"which failed to import: {exc}"
        ) from exc
    return detect_nuclei


def _check_region(slide, cells_he_px: np.ndarray, max_region_px: int) -> tuple[int, int, int, int]:
    """Pick a window of at most ``max_region_px`` a side, centred on the median cell, inside the slide."""
    inside = (
        (cells_he_px[:, 0] >= 0)
        & (cells_he_px[:, 0] < slide.width)
        & (cells_he_px[:, 1] >= 0)
        & (cells_he_px[:, 1] < slide.height)
    )
    if not inside.any():
        raise XeniumError("no registered Xenium cell lies on the slide, so the registration cannot be checked")
    points = cells_he_px[inside]
    lo = points.min(axis=0)
    hi = points.max(axis=0)
    size = np.minimum(hi - lo + 1, max_region_px)
    centre = np.median(points, axis=0)
    start = np.clip(np.round(centre - size / 2), 0, [slide.width - size[0], slide.height - size[1]])
    return int(start[0]), int(start[1]), int(size[0]), int(size[1])


def check_registration(
    slide,
    cells_he_px: np.ndarray,
    *,
    detector: Callable | None = None,
    max_distance_um: float = 10.0,
    region_px: tuple[int, int, int, int] | None = None,
    max_region_px: int = 2048,
) -> RegistrationReport:
    """Measure how well registered Xenium nuclei fall on nuclei detected in the H&E.

    Parameters
    ----------
    slide
        Open slide (``nuclass_qupath.slides.Slide``); its ``mpp`` converts px to µm.
    cells_he_px
        ``(N, 2)`` Xenium nucleus positions in level-0 slide px, x then y.
    detector
        ``detector(slide, region_px=(x, y, w, h)) -> CellTable`` with nucleus
        outlines; the built-in ``nuclass_qupath.cells.detector.detect_nuclei``
        when ``None``.
    max_distance_um
        Nearest detected nuclei further than this do not count as a match and
        are left out of the median offset. Cells closer than this to the region
        border are not checked, because their partner may lie outside.
    region_px
        ``(x, y, width, height)`` to check; by default a window of at most
        ``max_region_px`` a side, centred on the median cell position.
    max_region_px
        Side limit of the default window, in level-0 px.

    Returns
    -------
    RegistrationReport

    Raises
    ------
    XeniumError
        If no Xenium nucleus lies in the checked region.
    """
    import shapely
    from scipy.spatial import cKDTree

    cells_he_px = np.asarray(cells_he_px, dtype=np.float64).reshape(-1, 2)
    detector = detector or _default_detector()
    mpp = float(slide.mpp)
    if region_px is None:
        region_px = _check_region(slide, cells_he_px, max_region_px)
    x0, y0, width, height = (int(v) for v in region_px)

    # Cells far enough inside the region that their partner nucleus is in it too.
    margin_px = max_distance_um / mpp
    inner = (
        (cells_he_px[:, 0] >= x0 + margin_px)
        & (cells_he_px[:, 0] < x0 + width - margin_px)
        & (cells_he_px[:, 1] >= y0 + margin_px)
        & (cells_he_px[:, 1] < y0 + height - margin_px)
    )
    checked = cells_he_px[inner]
    if len(checked) == 0:
        raise XeniumError(
            f"no registered Xenium nucleus lies in the check region x={x0}, y={y0}, {width}×{height} px "
            f"(at least {max_distance_um} µm from its border)"
        )

    detected = detector(slide, region_px=(x0, y0, width, height))
    n_detected = len(detected)
    if n_detected == 0:
        logger.warning("the detector found no nuclei in x=%d, y=%d, %d×%d px", x0, y0, width, height)
        return RegistrationReport(0.0, float("nan"), len(checked), 0, 0, (x0, y0, width, height))

    # Offset to the nearest detected centroid.
    distances_px, _ = cKDTree(detected.centroids_px).query(checked, k=1)
    distances_um = distances_px * mpp
    matched = distances_um <= max_distance_um
    median_offset_um = float(np.median(distances_um[matched])) if matched.any() else float("nan")

    # Inside a detected outline; detections without one count within a nucleus radius.
    outlines = np.array([g for g in detected.geometries if g is not None], dtype=object)
    on_nucleus = np.zeros(len(checked), dtype=bool)
    if len(outlines):
        tree = shapely.STRtree(outlines)
        hit_points, _ = tree.query(shapely.points(checked), predicate="intersects")
        on_nucleus[np.unique(hit_points)] = True
    without_outline = np.array([g is None for g in detected.geometries])
    if without_outline.any():
        point_tree = cKDTree(detected.centroids_px[without_outline])
        near, _ = point_tree.query(checked, k=1)
        on_nucleus |= near * mpp <= POINT_NUCLEUS_RADIUS_UM

    report = RegistrationReport(
        share_on_nucleus=float(on_nucleus.mean()),
        median_offset_um=median_offset_um,
        n_checked=len(checked),
        n_detected=n_detected,
        n_matched=int(matched.sum()),
        region_px=(x0, y0, width, height),
    )
    logger.info(
        "registration check: %d of %d Xenium nuclei on an H&E nucleus (%.0f%%), median offset %.2f µm, "
        "%d nuclei detected in x=%d, y=%d, %d×%d px",
        int(on_nucleus.sum()),
        len(checked),
        100 * report.share_on_nucleus,
        median_offset_um,
        n_detected,
        x0,
        y0,
        width,
        height,
    )
    return report

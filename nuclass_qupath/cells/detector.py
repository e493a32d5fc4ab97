"""Nucleus detection on H&E slides, modelled on QuPath's watershed cell detection.

The steps follow QuPath's ``WatershedCellDetection`` plugin
(qupath-core-processing) with its H&E defaults:

1. Haematoxylin optical density (OD) by colour deconvolution with QuPath's
   default H&E stain vectors.
2. Background subtraction by morphological opening by reconstruction with the
   background radius. Nuclei on a background OD above 2 are dropped.
3. Gaussian smoothing and a 4-neighbour Laplacian. Pixels with a positive
   response form candidate blobs, kept when their mean background-subtracted
   OD exceeds the threshold.
4. Blobs are split at the necks between distance-transform peaks, the
   boundary is refined with a smaller filter, and nuclei outside the area
   limits or below the threshold are dropped.

Three differences from QuPath make it faster. The background is estimated at
a quarter of the detection resolution. Blobs are whole connected components
of the positive Laplacian, where QuPath first splits them by a Laplacian
watershed. The split assigns pixels to the peaks of a smoothed city-block
distance by power distance, where QuPath runs a watershed on ImageJ's
Euclidean distance map.

Large regions are processed tile by tile. A nucleus is kept only by the tile
whose core contains its centroid, so nuclei on tile seams appear once.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import shapely
from PIL import Image
from scipy import ndimage as ndi
from shapely.geometry import Polygon
from skimage import morphology, segmentation

from nuclass_qupath.cells.table import CellTable
from nuclass_qupath.errors import CellsError

logger = logging.getLogger(__name__)

__all__ = ["detect_nuclei", "hematoxylin_od"]

# QuPath's default H&E stain vectors (StainVector.java): haematoxylin from
# Ruifrok & Johnston (2001), eosin from the AMIDA13 challenge; the residual is
# their cross product. Rows are normalised to unit length.
STAIN_HEMATOXYLIN = (0.65, 0.70, 0.29)
STAIN_EOSIN = (0.2159, 0.8012, 0.5581)

# QuPath's "Max background intensity": nuclei on a background OD above this are dropped.
MAX_BACKGROUND_OD = 2.0

# Thumbnail pixel size for the tissue mask, and what counts as tissue there.
TISSUE_MASK_MPP = 8.0
TISSUE_MAX_GREY = 220
TISSUE_MIN_SATURATION = 0.08


def _hematoxylin_weights() -> np.ndarray:
    h = np.asarray(STAIN_HEMATOXYLIN) / np.linalg.norm(STAIN_HEMATOXYLIN)
    e = np.asarray(STAIN_EOSIN) / np.linalg.norm(STAIN_EOSIN)
    residual = np.cross(h, e)
    residual /= np.linalg.norm(residual)
    inverse = np.linalg.inv(np.stack([h, e, residual]))
    return inverse[:, 0]


# One lookup table per RGB channel: OD = max(0, -log10(max(v, 1) / 255)) as in
# QuPath's ColorDeconvolutionHelper, times that channel's haematoxylin weight.
_OD = np.maximum(0.0, -np.log10(np.maximum(np.arange(256), 1) / 255.0))
_H_LUTS = [(_OD * weight).astype(np.float32) for weight in _hematoxylin_weights()]


def hematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Return the haematoxylin optical density of a uint8 RGB image as float32 ``(h, w)``."""
    return _H_LUTS[0][rgb[..., 0]] + _H_LUTS[1][rgb[..., 1]] + _H_LUTS[2][rgb[..., 2]]


# ---------------------------------------------------------------------------
# One tile


@dataclass(frozen=True)
class _Params:
    background_radius_px: float
    sigma_px: float
    threshold_od: float | str
    min_area_px: float
    max_area_px: float


def _resize_float(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR))


def _background(od: np.ndarray, radius_px: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Estimate the background by opening by reconstruction, at reduced resolution.

    Returns the background (never above ``od``) and a mask of pixels near a
    background above :data:`MAX_BACKGROUND_OD`, or None where there are none.
    """
    factor = int(min(4, max(1, radius_px // 4)))
    height, width = od.shape
    padded = np.pad(od, ((0, -height % factor), (0, -width % factor)), mode="edge")
    low = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor).mean(axis=(1, 3))
    radius_low = max(1, round(radius_px / factor))
    seed = morphology.erosion(low, morphology.disk(radius_low, decomposition="sequence"))
    background_low = morphology.reconstruction(seed, low, method="dilation")

    high_mask = None
    if background_low.max() > MAX_BACKGROUND_OD:
        # QuPath widens the mask by twice the background radius.
        dilated = ndi.binary_dilation(background_low > MAX_BACKGROUND_OD, morphology.disk(2 * radius_low))
        high_mask = np.repeat(np.repeat(dilated, factor, axis=0), factor, axis=1)[:height, :width]

    background = _resize_float(background_low, padded.shape[1], padded.shape[0])[:height, :width]
    return np.minimum(background, od), high_mask


def _laplacian(image: np.ndarray) -> np.ndarray:
    """Return the negative 4-neighbour Laplacian (positive on blobs), replicating edges."""
    out = 4 * image
    out[1:] -= image[:-1]
    out[:-1] -= image[1:]
    out[:, 1:] -= image[:, :-1]
    out[:, :-1] -= image[:, 1:]
    out[0] -= image[0]
    out[-1] -= image[-1]
    out[:, 0] -= image[:, 0]
    out[:, -1] -= image[:, -1]
    return out


def _local_maxima(image: np.ndarray) -> np.ndarray:
    """Return True where a pixel equals the maximum of its 3x3 neighbourhood (edges replicated)."""
    padded = np.pad(image, 1, mode="edge")
    rows = np.maximum(np.maximum(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
    return np.maximum(np.maximum(rows[:-2], rows[1:-1]), rows[2:]) == image


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    background, count = ndi.label(~mask)
    edge = np.concatenate([background[0], background[-1], background[:, 0], background[:, -1]])
    is_hole = np.ones(count + 1, dtype=bool)
    is_hole[0] = False
    is_hole[np.unique(edge)] = False
    return mask | is_hole[background]


# Two distance peaks stay one nucleus unless the distance dips by more than
# this many pixels between them (ImageJ's EDM watershed uses 0.5 on the
# Euclidean map).
SPLIT_PROMINENCE_PX = 0.5


def _distance_peaks(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Find peaks of the smoothed city-block distance inside ``mask``.

    Returns the smoothed distance, and per peak (plateaus averaged) its row,
    column, value, and the 4-connected blob of ``mask`` it lies in, next to
    the blob label image.
    """
    distance = ndi.distance_transform_cdt(mask, metric="taxicab").astype(np.float32)
    smooth = ndi.gaussian_filter(distance, 1.0, truncate=3.0)
    peaks = _local_maxima(smooth) & (distance > 1)
    markers, count = ndi.label(peaks, structure=np.ones((3, 3)))
    rows, cols = np.nonzero(peaks)
    ids = markers[rows, cols] - 1
    sizes = np.maximum(np.bincount(ids, minlength=count), 1)
    peak_y = np.bincount(ids, weights=rows, minlength=count) / sizes
    peak_x = np.bincount(ids, weights=cols, minlength=count) / sizes
    peak_r = np.bincount(ids, weights=smooth[rows, cols], minlength=count) / sizes
    blobs, _ = ndi.label(mask)
    peak_blob = np.zeros(count, dtype=np.int64)
    peak_blob[ids] = blobs[rows, cols]
    return smooth, blobs, np.stack([peak_y, peak_x, peak_r]), peak_blob, ids


def _group_peaks(smooth: np.ndarray, peaks: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Join peak pairs linked by a ridge and return a group index per peak.

    A pair joins when the smoothed distance along the straight line between
    the two peaks never drops more than :data:`SPLIT_PROMINENCE_PX` below the
    lower one.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    count = peaks.shape[1]
    if first.size == 0:
        return np.arange(count)
    peak_y, peak_x, peak_r = peaks
    dy, dx = peak_y[second] - peak_y[first], peak_x[second] - peak_x[first]
    t = np.linspace(0.0, 1.0, int(np.hypot(dy, dx).max()) + 2)[None, :]
    ys = np.rint(peak_y[first, None] + t * dy[:, None]).astype(np.intp)
    xs = np.rint(peak_x[first, None] + t * dx[:, None]).astype(np.intp)
    joined = smooth[ys, xs].min(axis=1) >= np.minimum(peak_r[first], peak_r[second]) - SPLIT_PROMINENCE_PX
    graph = coo_matrix((np.ones(joined.sum()), (first[joined], second[joined])), shape=(count, count))
    return connected_components(graph, directed=False)[1]


# Blobs with up to this many peaks are assigned by comparing every peak; larger
# clusters use the nearest peaks from a k-d tree.
SMALL_CLUSTER_PEAKS = 8


def _peak_pairs(peaks: np.ndarray, peak_blob: np.ndarray, multi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return pairs of peaks in the same blob whose discs overlap or nearly touch."""
    from scipy.spatial import cKDTree

    in_multi = np.isin(peak_blob, multi)
    index = np.flatnonzero(in_multi)
    peak_y, peak_x, peak_r = peaks
    tree = cKDTree(np.column_stack([peak_y[index], peak_x[index]]))
    pairs = tree.query_pairs(r=4 * float(peak_r[index].max()) + 1, output_type="ndarray")
    first, second = index[pairs[:, 0]], index[pairs[:, 1]]
    length = np.hypot(peak_y[second] - peak_y[first], peak_x[second] - peak_x[first])
    keep = (peak_blob[first] == peak_blob[second]) & (length <= 2 * (peak_r[first] + peak_r[second]))
    return first[keep], second[keep]


def _nearest_by_power(rows: np.ndarray, cols: np.ndarray, candidates: np.ndarray, peaks: np.ndarray,
                      allowed: np.ndarray | None = None) -> np.ndarray:
    """Return, per pixel, the candidate peak with the smallest power distance."""
    peak_y, peak_x, peak_r = peaks
    power = (rows[:, None] - peak_y[candidates]) ** 2 + (cols[:, None] - peak_x[candidates]) ** 2
    power -= peak_r[candidates] ** 2
    if allowed is not None:
        power[~allowed] = np.inf
    return candidates[np.arange(rows.size), power.argmin(axis=1)]


def _assign_owners(blobs, peaks, group, peak_blob, multi, peaks_per_blob) -> np.ndarray:
    """Label each pixel of the multi-peak blobs with its peak group (from 1) and other pixels with minus their blob."""
    from scipy.spatial import cKDTree

    owner = -blobs
    peak_y, peak_x, _ = peaks
    order = np.argsort(peak_blob, kind="stable")
    blob_start = np.searchsorted(peak_blob[order], np.arange(peaks_per_blob.size))
    sizes = peaks_per_blob[multi]

    # Pixels of multi-peak blobs.
    in_multi = np.zeros(peaks_per_blob.size, dtype=bool)
    in_multi[multi] = True
    all_rows, all_cols = np.nonzero(in_multi[blobs])
    all_blobs = blobs[all_rows, all_cols]
    pixel_peaks = peaks_per_blob[all_blobs]

    # Small clusters: compare every peak of the blob.
    for k in np.unique(sizes[sizes <= SMALL_CLUSTER_PEAKS]):
        pick = pixel_peaks == k
        rows, cols = all_rows[pick], all_cols[pick]
        candidates = order[blob_start[all_blobs[pick]][:, None] + np.arange(k)]
        owner[rows, cols] = group[_nearest_by_power(rows, cols, candidates, peaks)] + 1

    # Large clusters: the nearest peaks of the same blob, by power distance.
    large = multi[sizes > SMALL_CLUSTER_PEAKS]
    if large.size:
        index = np.flatnonzero(np.isin(peak_blob, large))
        tree = cKDTree(np.column_stack([peak_y[index], peak_x[index]]))
        pick = pixel_peaks > SMALL_CLUSTER_PEAKS
        rows, cols = all_rows[pick], all_cols[pick]
        _, nearest = tree.query(np.column_stack([rows, cols]), k=SMALL_CLUSTER_PEAKS)
        candidates = index[nearest]
        same_blob = peak_blob[candidates] == all_blobs[pick][:, None]
        found = same_blob.any(axis=1)
        nearest_peak = _nearest_by_power(rows[found], cols[found], candidates[found], peaks, same_blob[found])
        owner[rows[found], cols[found]] = group[nearest_peak] + 1
    return owner


def _split_touching(mask: np.ndarray) -> np.ndarray:
    """Cut blobs that hold more than one distance-transform peak.

    Each peak is a disc with the peak's distance as radius. Pixels go to the
    disc with the smallest power distance ``|p - c|^2 - r^2``, whose cell
    boundary for two overlapping discs is the line through their
    intersections, that is the neck a distance-map watershed would cut. Peaks
    joined by a ridge count as one. Pixels next to a pixel of another group
    are cleared, so the pieces are separate 4-connected components.
    """
    smooth, blobs, peaks, peak_blob, _ = _distance_peaks(mask)
    peaks_per_blob = np.bincount(peak_blob, minlength=blobs.max() + 1)
    peaks_per_blob[0] = 0
    multi = np.flatnonzero(peaks_per_blob >= 2)
    if multi.size == 0:
        return mask

    first, second = _peak_pairs(peaks, peak_blob, multi)
    group = _group_peaks(smooth, peaks, first, second)
    owner = _assign_owners(blobs, peaks, group, peak_blob, multi, peaks_per_blob)

    # Clear pixels whose right or lower neighbour belongs to another group.
    cut = np.zeros_like(mask)
    cut[:, :-1] = mask[:, 1:] & (owner[:, :-1] != owner[:, 1:])
    cut[:-1, :] |= mask[1:, :] & (owner[:-1, :] != owner[1:, :])
    return mask & ~cut


def _detect_tile(rgb: np.ndarray, params: _Params) -> tuple[np.ndarray, np.ndarray]:
    """Segment nuclei in one RGB tile at detection resolution.

    Returns the label image (4-connected nuclei, 0 = none) and the ids of the
    labels that pass the area, intensity and background checks.
    """
    od = hematoxylin_od(rgb)
    if params.background_radius_px > 0:
        background, high_background = _background(od, params.background_radius_px)
        signal = od - background
    else:
        signal, high_background = od, None

    # Candidate blobs: positive Laplacian of the smoothed signal.
    response = _laplacian(ndi.gaussian_filter(signal, params.sigma_px, truncate=3.0))
    positive = response > 0
    threshold = params.threshold_od
    if threshold == "otsu":
        from skimage.filters import threshold_otsu

        values = signal[positive]
        threshold = float(threshold_otsu(values)) if values.size and np.ptp(values) > 0 else math.inf

    # Keep blobs whose mean signal exceeds the threshold.
    blobs, blob_count = ndi.label(positive)
    sums = np.bincount(blobs.ravel(), weights=signal.ravel(), minlength=blob_count + 1)
    sizes = np.bincount(blobs.ravel(), minlength=blob_count + 1)
    keep = sums > threshold * np.maximum(sizes, 1)
    keep[0] = False
    nuclei = _split_touching(_fill_holes(keep[blobs]))

    # Boundary refinement as in QuPath when sigma > 1.5 px: a sigma-1 filter
    # pulls back edges that the wider Gaussian moved outwards.
    if params.sigma_px > 1.5:
        fine = _laplacian(ndi.gaussian_filter(od, 1.0, truncate=3.0)) > 0
        nuclei = ndi.binary_erosion(nuclei, np.ones((3, 3), dtype=bool)) | (fine & nuclei)

    # Area, mean intensity and background checks per nucleus.
    labels, count = ndi.label(nuclei)
    flat = labels.ravel()
    areas = np.bincount(flat, minlength=count + 1)
    means = np.bincount(flat, weights=signal.ravel(), minlength=count + 1) / np.maximum(areas, 1)
    good = (areas >= params.min_area_px) & (areas <= params.max_area_px) & (means >= threshold)
    if high_background is not None:
        good &= np.bincount(flat, weights=high_background.ravel(), minlength=count + 1) == 0
    good[0] = False
    return labels, np.flatnonzero(good)


# ---------------------------------------------------------------------------
# Outlines


def _boundary_edges(labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """List the unit pixel edges between each label and everything else.

    Pixel ``(row, col)`` spans corners ``(x, y) = (col, row)`` to
    ``(col + 1, row + 1)``. Edges are directed so the label is on their left as
    the image is displayed (y down), which makes outer boundaries turn left.
    Returns start x, start y, end x, end y, label and direction (0 = -x,
    1 = +y, 2 = +x, 3 = -y) per edge.
    """
    padded = np.pad(labels, 1)
    centre = padded[1:-1, 1:-1]
    neighbours = (padded[:-2, 1:-1], padded[1:-1, :-2], padded[2:, 1:-1], padded[1:-1, 2:])
    # Per side (top, left, bottom, right): start and end corner offsets from (col, row).
    sides = (((1, 0), (0, 0)), ((0, 0), (0, 1)), ((0, 1), (1, 1)), ((1, 1), (1, 0)))
    parts = []
    for direction, (neighbour, (start, end)) in enumerate(zip(neighbours, sides)):
        rows, cols = np.nonzero((centre != 0) & (neighbour != centre))
        parts.append((cols + start[0], rows + start[1], cols + end[0], rows + end[1], centre[rows, cols],
                      np.full(rows.size, direction)))
    return tuple(np.concatenate(column) for column in zip(*parts))


def _order_rings(following: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split the permutation ``following`` into cycles by pointer jumping.

    Returns the edge indices sorted ring by ring, each ring in traversal order
    from its lowest index, and the ring id (its lowest edge index) of each
    sorted edge.
    """
    n = following.size
    rounds = max(1, int(math.ceil(math.log2(n))) + 1)

    # Ring id: the lowest index on the cycle.
    ring = np.arange(n)
    jump = following.copy()
    for _ in range(rounds):
        ring = np.minimum(ring, ring[jump])
        jump = jump[jump]

    # Steps from each edge forward to its ring's root.
    is_root = ring == np.arange(n)
    steps = np.where(is_root, 0, 1)
    jump = np.where(is_root, np.arange(n), following)
    for _ in range(rounds):
        steps = steps + steps[jump]
        jump = jump[jump]
    length = np.bincount(ring, minlength=n)[ring]
    position = (length - steps) % length
    order = np.lexsort((position, ring))
    return order, ring[order]


def _trace_outlines(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trace the outer boundary of every nonzero label.

    Returns the traced labels, and for all of them together the ``(x, y)``
    vertices in pixel corner coordinates with the start offset of each label's
    ring (plus the total at the end). Vertices are the midpoints of the
    boundary pixel edges, which cut each pixel corner as marching squares
    does, with collinear points dropped. Where a label touches itself only at
    a corner the tracer turns left, so diagonal neighbours count as separate
    (4-connectivity). Only the largest ring of a label, its outer boundary, is
    returned.
    """
    sx, sy, ex, ey, label, direction = _boundary_edges(labels)
    if label.size == 0:
        return np.empty(0, dtype=np.int64), np.empty((0, 2)), np.zeros(1, dtype=np.int64)
    stride_x = labels.shape[1] + 2
    stride_y = labels.shape[0] + 2
    start_key = (label.astype(np.int64) * stride_y + sy) * stride_x + sx
    end_key = (label.astype(np.int64) * stride_y + ey) * stride_x + ex

    # Next edge: the one starting where this one ends; at a pinch corner, the left turn.
    by_start = np.argsort(start_key, kind="stable")
    sorted_keys = start_key[by_start]
    pos = np.searchsorted(sorted_keys, end_key)
    second_pos = np.minimum(pos + 1, len(by_start) - 1)
    is_pinch = (pos + 1 < len(by_start)) & (sorted_keys[second_pos] == end_key)
    second = by_start[second_pos]
    use_second = is_pinch & (direction[second] == (direction + 1) % 4)
    following = np.where(use_second, second, by_start[pos])

    # Vertices ring by ring, without collinear points.
    order, ring = _order_rings(following)
    x = (sx[order] + ex[order]) / 2
    y = (sy[order] + ey[order]) / 2
    starts = np.flatnonzero(np.r_[True, ring[1:] != ring[:-1]])
    lengths = np.diff(np.r_[starts, ring.size])
    ring_index = np.repeat(np.arange(starts.size), lengths)
    offset = np.arange(ring.size) - starts[ring_index]
    previous = starts[ring_index] + (offset - 1) % lengths[ring_index]
    following_vertex = starts[ring_index] + (offset + 1) % lengths[ring_index]
    cross = (x - x[previous]) * (y[following_vertex] - y) - (y - y[previous]) * (x[following_vertex] - x)

    # Outer ring per label: largest area. With y down, left-turning rings have negative shoelace sums.
    area = -0.5 * np.bincount(ring_index, weights=x * y[following_vertex] - x[following_vertex] * y)
    ring_label = label[order][starts]
    best = np.lexsort((-area, ring_label))
    first_of_label = np.r_[True, ring_label[best][1:] != ring_label[best][:-1]]
    outer = best[first_of_label & (area[best] > 0)]

    keep = np.isin(ring_index, outer) & (np.abs(cross) > 1e-9)
    kept_ring = ring_index[keep]
    ring_starts = np.flatnonzero(np.r_[True, kept_ring[1:] != kept_ring[:-1]])
    offsets = np.r_[ring_starts, kept_ring.size].astype(np.int64)
    return ring_label[kept_ring[ring_starts]], np.column_stack([x[keep], y[keep]]), offsets


def _polygons(xy: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Build valid shapely polygons from rings given as vertices and start offsets, with None for unusable rings."""
    # Close each ring by repeating its first vertex.
    lengths = np.diff(offsets)
    closed_offsets = np.r_[0, np.cumsum(lengths + 1)].astype(np.int64)
    insert_at = offsets[1:]
    closed = np.insert(xy, insert_at, xy[offsets[:-1]], axis=0)
    polygons = shapely.from_ragged_array(
        shapely.GeometryType.POLYGON, closed, (closed_offsets, np.arange(lengths.size + 1, dtype=np.int64))
    )
    polygons[lengths < 3] = None
    invalid = np.flatnonzero(~shapely.is_valid(polygons) & (lengths >= 3))
    for i in invalid:
        polygons[i] = _largest_polygon(shapely.make_valid(polygons[i]))
    return polygons


def _largest_polygon(geometry) -> Polygon | None:
    """Return the polygon of largest area in a valid geometry, or None when it has no polygon of non-zero area."""
    parts = [geometry] if geometry.geom_type == "Polygon" else [
        g for g in getattr(geometry, "geoms", []) if g.geom_type == "Polygon"
    ]
    parts = [g for g in parts if g.area > 0]
    return max(parts, key=lambda g: g.area) if parts else None


def _clip_to_image(polygons: np.ndarray, width_px: float, height_px: float) -> np.ndarray:
    """Clip outlines to the image rectangle ``[0, width_px] x [0, height_px]`` in level-0 pixels.

    Outlines of nuclei cut by the image edge can reach about one detection
    pixel past it (up to 1.4 level-0 px on the bottom edge of CMU-1). Each
    clipped outline stays one valid Polygon, the largest part if clipping
    splits it, or None if nothing is left.
    """
    bounds = shapely.bounds(polygons)  # NaN rows for None, which compare False
    outside = (bounds[:, 0] < 0) | (bounds[:, 1] < 0) | (bounds[:, 2] > width_px) | (bounds[:, 3] > height_px)
    if outside.any():
        clipped = shapely.intersection(polygons[outside], shapely.box(0.0, 0.0, width_px, height_px))
        for row, geometry in zip(np.flatnonzero(outside), clipped):
            polygons[row] = _largest_polygon(geometry)
    return polygons


# ---------------------------------------------------------------------------
# Slide


def _tissue_pixels(rgb: np.ndarray) -> np.ndarray:
    """Return True where an RGB pixel looks like tissue: not near-white, or coloured."""
    rgb = rgb.astype(np.float32)
    top = rgb.max(axis=2)
    saturation = (top - rgb.min(axis=2)) / np.maximum(top, 1)
    return (rgb.mean(axis=2) < TISSUE_MAX_GREY) | (saturation > TISSUE_MIN_SATURATION)


def _tile_has_tissue(rgb: np.ndarray) -> bool:
    # Every fourth pixel is enough to find tissue.
    step = 4
    return bool(_tissue_pixels(rgb[::step, ::step]).any())


def _tissue_mask(slide, x0: float, y0: float, width: float, height: float) -> tuple[np.ndarray, float]:
    """Return a boolean tissue mask of a region at about 8 µm/px and its downsample from level 0.

    Mask pixel ``(row, col)`` covers level-0 ``x0 + col * downsample`` onwards.
    The region is read in blocks, so a large region never sits in memory at
    full resolution.
    """
    mask_mpp = max(TISSUE_MASK_MPP, slide.mpp)
    downsample = mask_mpp / slide.mpp
    mask_w, mask_h = max(1, math.ceil(width / downsample)), max(1, math.ceil(height / downsample))
    mask = np.zeros((mask_h, mask_w), dtype=bool)
    block = 1024
    for top in range(0, mask_h, block):
        for left in range(0, mask_w, block):
            rgb = slide.read_region_at_mpp(x0 + left * downsample, y0 + top * downsample,
                                           min(block, mask_w - left), min(block, mask_h - top), mask_mpp)
            mask[top : top + rgb.shape[0], left : left + rgb.shape[1]] = _tissue_pixels(rgb)
    # Remove isolated specks, then grow by one pixel so tissue edges stay in.
    mask = ndi.binary_opening(mask, np.ones((2, 2), dtype=bool))
    mask = ndi.binary_dilation(mask, np.ones((3, 3), dtype=bool))
    return mask, downsample


def _validate(region_px, slide, detection_mpp, background_radius_um, sigma_um, threshold_od, min_area_um2,
              max_area_um2, tile_px, overlap_um) -> tuple[float, float, float, float]:
    checks = {
        "detection_mpp": detection_mpp,
        "sigma_um": sigma_um,
        "max_area_um2": max_area_um2,
        "tile_px": tile_px,
    }
    for name, value in checks.items():
        if not (math.isfinite(value) and value > 0):
            raise CellsError(f"{name} must be a positive number, got {value!r}")
    for name, value in {"background_radius_um": background_radius_um, "min_area_um2": min_area_um2,
                        "overlap_um": overlap_um}.items():
        if not (math.isfinite(value) and value >= 0):
            raise CellsError(f"{name} must be zero or a positive number, got {value!r}")
    if min_area_um2 > max_area_um2:
        raise CellsError(f"min_area_um2 {min_area_um2} is larger than max_area_um2 {max_area_um2}")
    if threshold_od != "otsu" and not (isinstance(threshold_od, (int, float)) and math.isfinite(threshold_od)):
        raise CellsError(f"threshold_od must be a number or 'otsu', got {threshold_od!r}")
    if region_px is None:
        return 0.0, 0.0, float(slide.width), float(slide.height)
    if len(region_px) != 4:
        raise CellsError(f"region_px must be (x, y, width, height) in level-0 pixels, got {region_px!r}")
    x, y, w, h = (float(v) for v in region_px)
    if w < 0 or h < 0:
        raise CellsError(f"region_px {tuple(region_px)} has a negative width or height")
    # Clip to the image.
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(slide.width)), min(y + h, float(slide.height))
    return x0, y0, max(0.0, x1 - x0), max(0.0, y1 - y0)


def detect_nuclei(
    slide,
    *,
    region_px: tuple[float, float, float, float] | None = None,
    detection_mpp: float = 0.5,
    background_radius_um: float = 8.0,
    sigma_um: float = 1.5,
    threshold_od: float | str = 0.1,
    min_area_um2: float = 10.0,
    max_area_um2: float = 400.0,
    tile_px: int = 2048,
    overlap_um: float = 30.0,
    tissue_mask: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> CellTable:
    """Detect nuclei in a slide, or in one region of it.

    Parameters
    ----------
    slide
        An open :class:`nuclass_qupath.slides.Slide`.
    region_px
        ``(x, y, width, height)`` in level-0 pixels of QuPath's frame, or
        None for the whole image. Parts outside the image are ignored.
    detection_mpp
        Pixel size in µm/px at which the slide is read for detection.
    background_radius_um
        Radius of the background opening. 0 turns background subtraction off.
        It should exceed the largest nucleus radius.
    sigma_um
        Gaussian smoothing before the Laplacian.
    threshold_od
        Minimum mean background-subtracted haematoxylin OD of a nucleus, or
        ``"otsu"`` for Otsu's threshold computed per tile over the candidate
        blob pixels.
    min_area_um2, max_area_um2
        Nucleus area limits in µm².
    tile_px
        Tile core size in detection pixels.
    overlap_um
        Margin read around each tile core. It should exceed the largest
        nucleus diameter.
    tissue_mask
        Skip tiles without tissue (pixels that are not near-white, or are
        coloured): judged on an 8 µm/px mask of the region when a pyramid
        level serves it, else on each tile after reading it.
    progress
        Called after each tile with ``(tiles done, tiles total)``.

    Returns
    -------
    CellTable
        One row per nucleus: a new UUID, the centroid of its pixels and its
        outline polygon (clipped to the image), both in level-0 pixels of
        QuPath's frame. Empty when
        the region contains no nuclei.
    """
    x0, y0, width, height = _validate(region_px, slide, detection_mpp, background_radius_um, sigma_um, threshold_od,
                                      min_area_um2, max_area_um2, tile_px, overlap_um)
    start = time.perf_counter()
    downsample = detection_mpp / slide.mpp
    params = _Params(
        background_radius_px=background_radius_um / detection_mpp,
        sigma_px=sigma_um / detection_mpp,
        threshold_od=threshold_od,
        min_area_px=min_area_um2 / detection_mpp**2,
        max_area_px=max_area_um2 / detection_mpp**2,
    )
    overlap_px = int(math.ceil(overlap_um / detection_mpp))
    region_w_px = int(math.ceil(width / downsample))
    region_h_px = int(math.ceil(height / downsample))
    tiles = [
        (left, top, min(tile_px, region_w_px - left), min(tile_px, region_h_px - top))
        for top in range(0, region_h_px, tile_px)
        for left in range(0, region_w_px, tile_px)
    ]
    # A thumbnail mask pays off only when a pyramid level serves it; on a
    # single-level slide each tile is checked after it is read instead.
    use_thumbnail = tissue_mask and tiles and slide.best_level_for_downsample(TISSUE_MASK_MPP / slide.mpp) > 0
    mask, mask_downsample = _tissue_mask(slide, x0, y0, width, height) if use_thumbnail else (None, 1.0)

    ids: list[str] = []
    centroids: list[tuple[float, float]] = []
    outlines: list[Polygon] = []
    processed = 0
    for done, (left, top, core_w, core_h) in enumerate(tiles, start=1):
        core_x = x0 + left * downsample
        core_y = y0 + top * downsample
        read_x = core_x - overlap_px * downsample
        read_y = core_y - overlap_px * downsample

        # Read the core plus its margin unless the mask shows no tissue there.
        rgb = None
        if mask is None or _has_tissue(mask, mask_downsample, core_x - x0, core_y - y0,
                                       core_w * downsample, core_h * downsample):
            rgb = slide.read_region_at_mpp(read_x, read_y, core_w + 2 * overlap_px, core_h + 2 * overlap_px,
                                           detection_mpp)
            if tissue_mask and mask is None and not _tile_has_tissue(rgb):
                rgb = None

        # Segment, and keep the nuclei this tile owns.
        if rgb is not None:
            processed += 1
            labels, good = _detect_tile(rgb, params)
            _collect(labels, good, overlap_px, core_w, core_h, (read_x, read_y), downsample,
                     (x0, y0, width, height), (slide.width, slide.height), ids, centroids, outlines)
        if progress is not None:
            progress(done, len(tiles))

    elapsed = time.perf_counter() - start
    logger.info(
        "detected %d nuclei in region x=%.0f y=%.0f w=%.0f h=%.0f px (%.2f mm², %d of %d tiles with tissue) "
        "at %.3g µm/px in %.1f s",
        len(ids), x0, y0, width, height, width * height * slide.mpp**2 / 1e6, processed, len(tiles),
        detection_mpp, elapsed,
    )
    xy = np.array(centroids, dtype=np.float64).reshape(-1, 2)
    return CellTable(ids=ids, centroids_px=xy, geometries=list(outlines))


def _has_tissue(mask: np.ndarray, mask_downsample: float, x: float, y: float, w: float, h: float) -> bool:
    """Return whether the mask has tissue in a rectangle given in level-0 pixels from the mask origin."""
    c0, r0 = int(x // mask_downsample), int(y // mask_downsample)
    c1, r1 = int(math.ceil((x + w) / mask_downsample)), int(math.ceil((y + h) / mask_downsample))
    return bool(mask[max(r0, 0) : max(r1, 0), max(c0, 0) : max(c1, 0)].any())


def _collect(labels, good, overlap_px, core_w, core_h, read_xy, downsample, region, image_size, ids, centroids,
             polygons):
    """Append the nuclei whose centroid lies in the tile core (and the region) to the output lists.

    Outlines are clipped to the image of size ``image_size`` (level-0 width,
    height), not to the region: a nucleus that the region owns keeps the part
    of its outline outside the region.
    """
    if good.size == 0:
        return
    rows, cols = np.nonzero(labels)
    flat = labels[rows, cols]
    count = np.bincount(flat, minlength=labels.max() + 1)
    row_mean = np.bincount(flat, weights=rows, minlength=count.size) / np.maximum(count, 1)
    col_mean = np.bincount(flat, weights=cols, minlength=count.size) / np.maximum(count, 1)

    # The core owns a nucleus when it contains the centroid.
    cy, cx = row_mean[good], col_mean[good]
    in_core = (cx >= overlap_px) & (cx < overlap_px + core_w) & (cy >= overlap_px) & (cy < overlap_px + core_h)
    x_px = read_xy[0] + (cx + 0.5) * downsample
    y_px = read_xy[1] + (cy + 0.5) * downsample
    rx, ry, rw, rh = region
    in_region = (x_px >= rx) & (x_px < rx + rw) & (y_px >= ry) & (y_px < ry + rh)

    owned = good[in_core & in_region]
    if owned.size == 0:
        return
    selected = np.zeros(count.size, dtype=bool)
    selected[owned] = True
    traced, xy, offsets = _trace_outlines(np.where(selected[labels], labels, 0))
    xy = xy * downsample + np.asarray(read_xy)
    centre_by_label = {int(label): (x, y) for label, x, y in zip(good, x_px, y_px)}
    outlines = _clip_to_image(_polygons(xy, offsets), *image_size)
    for label, polygon in zip(traced.tolist(), outlines):
        if polygon is None or polygon.is_empty:
            continue
        ids.append(str(uuid.uuid4()))
        centroids.append(centre_by_label[label])
        polygons.append(polygon)

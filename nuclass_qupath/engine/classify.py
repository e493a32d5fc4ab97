"""Classify the cells of one slide with a NuClass model.

Two modes compute the same function (see :mod:`nuclass_qupath.model.nuclass`):

- ``fast``: cells are grouped into square cores of ``region_px`` model pixels.
  For each core one image region is read at the model's µm/px, covering the
  core's cells with their pooling windows and a margin, and the local encoder
  runs once on it. The context encoder runs once per group of cores (about
  ``context_region_px`` context pixels a side) in the same way. Every cell
  pools its features from the shared maps at its position.
- ``exact``: every cell gets its own crop and context. It is the reference the
  fast mode is checked against, and much slower.

Both modes place every image on one pixel grid per resolution, anchored at the
slide origin, and start every image on a multiple of the encoder's stride
(16 px for EfficientNet-Lite stage 3) with a size that is a multiple of it. The
encoder's feature grid then falls on the same image pixels whether it is
computed on a cell's crop or on a region, and so does TensorFlow-style "same"
padding, which pads stride-2 convolutions by an amount that depends on the
input size. Without this, a crop and a region see the cell at different
offsets from the feature grid: on CMU-1 with a trained checkpoint, moving a
crop by 1 px changed the predicted class of 4 % of cells. What still differs
between the modes is the zero padding at a crop's border, which the crop
margins keep away from the pooling windows.

Coordinates coming in are QuPath level-0 pixels; the slide reader maps them to
pixels of whichever pyramid level it reads.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
import torch

from nuclass_qupath.cells.table import CellTable
from nuclass_qupath.engine.encoders import BF16_TOLERANCE, bf16_difference, optimize_encoder, stage_timer
from nuclass_qupath.engine.predictions import Predictions
from nuclass_qupath.errors import CellsError
from nuclass_qupath.model.nuclass import NuClass, NuClassOutput, centred_boxes

logger = logging.getLogger(__name__)

# Least image read around the pooling windows of a fast-mode region, in pixels
# of that region; the model's own margins apply where they are larger.
REGION_EXTRA_PX = 32


@dataclass
class EngineOptions:
    """How the engine runs; none of these change what the model computes, beyond float rounding.

    Attributes
    ----------
    mode
        ``fast`` (shared region features) or ``exact`` (one crop per cell).
    region_px
        Side of a fast-mode core, in pixels at the model's µm/px. The local
        encoder's input is the core plus about 300 px, so larger cores waste
        less on overlap but need more memory (about 1.3 GB peak at 1536).
    context_region_px
        Side of a fast-mode group of cores for the context encoder, in pixels
        at the context µm/px; rounded to a whole number of cores.
    batch_size
        Cells per forward pass in exact mode, and for cells of sparse cores.
    precision
        ``fp32`` (the model's reference numbers), ``bf16`` autocast, or
        ``auto``: bf16 only where the CPU has native bf16 instructions
        (AVX512-BF16 or AMX). Emulated bf16 is many times slower. bf16 is
        checked against fp32 when the classifier is built, and replaced by
        fp32 if it moves a class probability by more than
        :data:`~nuclass_qupath.engine.encoders.BF16_TOLERANCE` on the check
        input. On an AMD EPYC with AVX512-BF16, bf16 ran the bundled model
        1.4 to 2 times as fast as fp32, but gave another class than fp32 for
        88 of the 3896 cells of CMU-1 (2.3%), so it is not the default.
    channels_last
        Run convolutions on NHWC tensors.
    optimize
        Freeze the encoders into TorchScript graphs (batch norm folded into
        the convolutions, oneDNN kernels). It is checked against the eager
        encoder when the classifier is built and skipped if they differ.
    prefetch
        Read the next region in a thread while the current one is computed.
    threads
        torch intra-op threads; None keeps torch's setting (all cores).
    sparse_crops
        Classify the cells of a core from their own crops when that reads
        fewer pixels than the core's region, as for a few cells at a tissue
        edge.
    """

    mode: Literal["fast", "exact"] = "fast"
    region_px: int = 1536
    context_region_px: int = 1024
    batch_size: int = 32
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    channels_last: bool = True
    optimize: bool = True
    prefetch: bool = True
    threads: int | None = None
    sparse_crops: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("fast", "exact"):
            raise ValueError(f"mode must be 'fast' or 'exact', got {self.mode!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        for name in ("region_px", "context_region_px", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be a positive whole number or None, got {self.threads!r}")


def cpu_supports_fast_bf16() -> bool:
    """Return whether the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX512" not in capability:
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _autocast(precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _resolve_precision(precision: str) -> str:
    # EngineOptions has already rejected any other value.
    if precision == "auto":
        return "bf16" if cpu_supports_fast_bf16() else "fp32"
    return precision


def _to_tensor(image: np.ndarray, channels_last: bool) -> torch.Tensor:
    """Turn uint8 (H, W, 3) or (B, H, W, 3) into a uint8 (B, 3, H, W) tensor.

    The permuted view of a contiguous NHWC array is already channels-last, so
    that layout costs no copy.
    """
    array = image if image.flags.writeable else image.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.ndim == 3:
        tensor = tensor[None]
    tensor = tensor.permute(0, 3, 1, 2)
    if channels_last:
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor.contiguous()


# ---------------------------------------------------------------------------
# Pixel grid


def round_up(value: float, step: int) -> int:
    """Return the smallest multiple of ``step`` that is at least ``value``."""
    return int(step * math.ceil(value / step))


def cell_crop_size(window_px: int, margin_px: int, align_px: int) -> int:
    """Side of a cell's stride-aligned crop: the window, ``margin_px`` on each side, and one stride of play."""
    return round_up(window_px + 2 * margin_px, align_px) + align_px


def read_cell_crop(
    slide, centre_px: np.ndarray, scale: float, target_mpp: float, window_px: int, margin_px: int, align_px: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read one cell's crop on the stride grid; return it and the cell centre in its pixels.

    Parameters
    ----------
    slide
        An open :class:`nuclass_qupath.slides.Slide`.
    centre_px
        Cell centre ``(x, y)`` in QuPath level-0 pixels.
    scale
        Level-0 pixels per output pixel.
    target_mpp
        Output µm/px.
    window_px, margin_px
        Pooling window side and the least margin kept around it, output px.
    align_px
        Encoder stride. The crop starts on a multiple of it in the output
        grid anchored at the slide origin, and its side is a multiple of it.
        The cell is therefore up to one stride off the crop centre, and the
        margin around its window is between ``margin_px`` and
        ``margin_px + align_px``.
    """
    size = cell_crop_size(window_px, margin_px, align_px)
    centre = np.asarray(centre_px, dtype=np.float64) / scale
    origin = align_px * np.floor((centre - window_px / 2.0 - margin_px) / align_px)
    image = slide.read_region_at_mpp(origin[0] * scale, origin[1] * scale, size, size, target_mpp)
    return image, centre - origin


def covering_box(centres: np.ndarray, reach_px: float, align_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(origin, size)`` of the stride-aligned box that contains every centre with ``reach_px`` around it.

    ``centres`` are (N, 2) in output pixels of one resolution; origin and size
    are whole multiples of ``align_px`` in the same pixels.
    """
    origin = align_px * np.floor((centres.min(axis=0) - reach_px) / align_px)
    size = align_px * np.ceil((centres.max(axis=0) + reach_px - origin) / align_px)
    return origin.astype(np.int64), size.astype(np.int64)


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc (macOS, Windows, musl)


_MALLOC_TRIM = _glibc_malloc_trim()


def release_free_memory() -> None:
    """Return freed heap memory to the operating system, where the C library is glibc; else do nothing."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# ---------------------------------------------------------------------------
# Grouping


def group_cells_by_core(centres_model_px: np.ndarray, region_px: int) -> list[np.ndarray]:
    """Return the indices of cells per core of a square grid anchored at the origin, in row-major core order."""
    if len(centres_model_px) == 0:
        return []
    cores = np.floor(centres_model_px / region_px).astype(np.int64)
    order = np.lexsort((cores[:, 0], cores[:, 1]))
    keys = cores[order]
    breaks = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
    return np.split(order, breaks)


def plan_regions(
    centres_model_px: np.ndarray, region_px: int, cores_per_group: int
) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Group cells by core, and cores into square groups of ``cores_per_group`` a side.

    Returns one ``(cells of the group, [cells of each core])`` per group, in
    row-major group order and row-major core order inside a group. Every index
    array is sorted, and the cores of a group partition its cells.
    """
    plan: list[tuple[np.ndarray, list[np.ndarray]]] = []
    groups = group_cells_by_core(centres_model_px, region_px * cores_per_group)
    for group in groups:
        group = np.sort(group)
        cores = [group[np.sort(core)] for core in group_cells_by_core(centres_model_px[group], region_px)]
        plan.append((group, cores))
    return plan


# ---------------------------------------------------------------------------
# Reading


_T = TypeVar("_T")


@dataclass
class _Images:
    """Images that the features of some cells are pooled from: one shared region, or one crop per cell."""

    index: np.ndarray  # cells, as positions in the cell table
    images: np.ndarray  # uint8 (H, W, 3) region or (N, H, W, 3) crops
    centres_px: np.ndarray  # (N, 2) cell centres in pixels of their image
    shared: bool  # True when all cells pool from one region
    read_s: float


def _prefetched(jobs: list[Callable[[], _T]], enabled: bool) -> Iterator[tuple[_T, float]]:
    """Run the read jobs in order; yield each result and the seconds spent waiting for it.

    With ``enabled`` the next job runs in a thread while the caller works on
    the current result. OpenSlide, tifffile and Pillow release the GIL while
    they decode and resample, so reading overlaps the encoders.
    """
    if not enabled:
        for job in jobs:
            started = time.perf_counter()
            result = job()
            yield result, time.perf_counter() - started
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nuclass-read") as executor:
        pending = executor.submit(jobs[0]) if jobs else None
        for i in range(len(jobs)):
            started = time.perf_counter()
            result = pending.result()
            waited = time.perf_counter() - started
            pending = executor.submit(jobs[i + 1]) if i + 1 < len(jobs) else None
            try:
                yield result, waited
            except GeneratorExit:
                if pending is not None:
                    pending.cancel()
                raise


class _Path:
    """Geometry of one path (local or context) on one slide: resolution, window, margins and stride."""

    def __init__(self, slide, target_mpp: float, window_px: int, margin_px: int, align_px: int) -> None:
        self.slide = slide
        self.target_mpp = target_mpp
        self.scale = target_mpp / slide.mpp  # level-0 px per output px
        self.window_px = window_px
        self.margin_px = margin_px
        self.align_px = align_px
        self.crop_px = cell_crop_size(window_px, margin_px, align_px)
        self.region_reach_px = window_px / 2 + max(margin_px, REGION_EXTRA_PX)

    def region_box(self, centres_level0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return covering_box(centres_level0 / self.scale, self.region_reach_px, self.align_px)

    def read_region(self, index: np.ndarray, centres_level0: np.ndarray) -> _Images:
        """Read the smallest stride-aligned region that contains the windows and margins of the cells."""
        started = time.perf_counter()
        centres = centres_level0 / self.scale
        origin, size = self.region_box(centres_level0)
        image = self.slide.read_region_at_mpp(
            origin[0] * self.scale, origin[1] * self.scale, int(size[0]), int(size[1]), self.target_mpp
        )
        return _Images(index, image, centres - origin, True, time.perf_counter() - started)

    def read_crops(self, index: np.ndarray, centres_level0: np.ndarray) -> _Images:
        """Read one stride-aligned crop per cell, as training crops are cut."""
        started = time.perf_counter()
        crops = np.empty((len(index), self.crop_px, self.crop_px, 3), dtype=np.uint8)
        positions = np.empty((len(index), 2), dtype=np.float64)
        for i, centre in enumerate(centres_level0):
            crops[i], positions[i] = read_cell_crop(
                self.slide, centre, self.scale, self.target_mpp, self.window_px, self.margin_px, self.align_px
            )
        return _Images(index, crops, positions, False, time.perf_counter() - started)

    def read_cheaper(self, index: np.ndarray, centres_level0: np.ndarray, allow_crops: bool) -> _Images:
        """Read one region for the cells, or their own crops when those contain fewer pixels."""
        if allow_crops:
            _, size = self.region_box(centres_level0)
            if len(index) * self.crop_px**2 < float(np.prod(size)):
                return self.read_crops(index, centres_level0)
        return self.read_region(index, centres_level0)


# ---------------------------------------------------------------------------
# Classifier


class SlideClassifier:
    """Run a model over the cells of a slide; the model is loaded once and reused across slides."""

    def __init__(self, model: NuClass, options: EngineOptions | None = None) -> None:
        self.model = model.eval()
        self.options = options or EngineOptions()
        self.config = model.config
        self.precision = _resolve_precision(self.options.precision)
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        _warn_if_overloaded()
        if self.options.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.precision == "bf16":
            self.precision = self._checked_bf16()
        sample_px = cell_crop_size(self.config.local_crop_px, self.config.local_margin_px, model.local_encoder.stride)
        use_graph = self.options.optimize and self.precision == "fp32"
        self.local_encoder = optimize_encoder(model.local_encoder, sample_px, self.options.channels_last, use_graph)
        self.global_encoder = optimize_encoder(model.global_encoder, sample_px, self.options.channels_last, use_graph)

    def _checked_bf16(self) -> str:
        """Return ``bf16`` when autocast keeps the model's probabilities within tolerance of fp32, else ``fp32``."""
        cfg = self.config
        local_px = cell_crop_size(cfg.local_crop_px, cfg.local_margin_px, self.model.local_encoder.stride)
        context_px = cell_crop_size(cfg.context_encoder_px, cfg.context_margin_px, self.model.global_encoder.stride)
        difference = bf16_difference(self.model, local_px, context_px, self.options.channels_last)
        if difference > BF16_TOLERANCE:
            logger.warning(
                "bf16 autocast moves class probabilities by up to %.3f against fp32 (tolerance %.2f), so the "
                "engine runs in fp32", difference, BF16_TOLERANCE,
            )
            return "fp32"
        logger.info("bf16 autocast checked against fp32: largest probability difference %.4f", difference)
        return "bf16"

    # Public API -------------------------------------------------------------

    def classify(
        self,
        slide,
        cells: CellTable,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> Predictions:
        """Classify every cell of ``cells`` on ``slide`` and return predictions in table order.

        Raises
        ------
        CellsError
            If a centroid is not finite or lies outside the slide.
        """
        predictions = Predictions.allocate(self.config.class_names, len(cells))
        timings = dict.fromkeys(STAGES, 0.0)
        started = time.perf_counter()
        for index, output, stage_s in self.iter_batches(slide, cells):
            predictions.probs[index] = output.probs.float().numpy()
            predictions.local_probs[index] = output.probs_local.float().numpy()
            predictions.global_probs[index] = output.probs_global.float().numpy()
            predictions.gate[index] = output.gate.float().numpy()
            for key, value in stage_s.items():
                timings[key] += value
            if progress:
                progress(len(index))
        timings["total"] = time.perf_counter() - started
        predictions.timings_s = timings
        if len(cells):
            logger.info(
                "classified %d cells in %.1f s (%.0f cells/s, mode %s, %s, read %.1f s of which %.1f s not overlapped)",
                len(cells),
                timings["total"],
                len(cells) / max(timings["total"], 1e-9),
                self.options.mode,
                self.precision,
                timings["read"],
                timings["read_wait"],
            )
        return predictions

    def iter_batches(self, slide, cells: CellTable) -> Iterator[tuple[np.ndarray, NuClassOutput, dict[str, float]]]:
        """Yield ``(cell indices, outputs, seconds per stage)`` batch by batch, for streaming writers.

        In fast mode a batch is the cells of one core; in exact mode it is
        ``batch_size`` cells. Stage keys are those of :data:`STAGES`, without
        ``total``. Raises CellsError, before anything is yielded, when a
        centroid is not finite or lies outside the slide.
        """
        if len(cells) == 0:
            return
        check_centroids(cells, slide)
        if self.options.mode == "exact":
            yield from self._iter_exact(slide, cells)
        else:
            yield from self._iter_fast(slide, cells)

    # Shared steps -----------------------------------------------------------

    def _paths(self, slide) -> tuple[_Path, _Path]:
        cfg = self.config
        local = _Path(slide, cfg.mpp, cfg.local_crop_px, cfg.local_margin_px, self.model.local_encoder.stride)
        context = _Path(
            slide, cfg.context_mpp, cfg.context_encoder_px, cfg.context_margin_px, self.model.global_encoder.stride
        )
        return local, context

    @torch.inference_mode()
    def _path_features(self, which: str, images: _Images, stage_s: dict[str, float]) -> torch.Tensor:
        """Encode the images of one path and pool a (N, embed_dim) feature per cell."""
        model = self.model
        if which == "local":
            encoder, pool, proj = self.local_encoder, model.local_pool, model.local_proj
            stride, window = model.local_encoder.stride, self.config.local_crop_px
        else:
            encoder, pool, proj = self.global_encoder, model.global_pool, model.global_proj
            stride, window = model.global_encoder.stride, self.config.context_encoder_px
        n = len(images.index)
        batch_index = torch.zeros(n) if images.shared else torch.arange(n, dtype=torch.float32)
        boxes = centred_boxes(batch_index, torch.from_numpy(images.centres_px).float(), window)
        with _autocast(self.precision):
            with stage_timer(stage_s, "preprocess"):
                pixels = model.normalize(_to_tensor(images.images, self.options.channels_last))
            with stage_timer(stage_s, which):
                if images.shared or n <= self.options.batch_size:
                    feature_map = encoder(pixels)
                else:
                    step = self.options.batch_size
                    feature_map = torch.cat([encoder(pixels[i : i + step]) for i in range(0, n, step)])
                # The same pooling as NuClass.local_features and global_features.
                features = proj(pool(feature_map, boxes, stride))
        return features.float()

    @torch.inference_mode()
    def _combine(self, local_feats: torch.Tensor, global_feats: torch.Tensor, stage_s: dict[str, float]):
        with stage_timer(stage_s, "gate"):
            return self.model.combine(local_feats, global_feats)

    # Fast mode --------------------------------------------------------------

    def _iter_fast(self, slide, cells: CellTable):
        opts = self.options
        local, context = self._paths(slide)
        centroids = cells.centroids_px
        cores_per_group = max(1, int(opts.context_region_px * context.scale // (opts.region_px * local.scale)))
        plan = plan_regions(centroids / local.scale, opts.region_px, cores_per_group)

        # One read job per group context, then one per core of the group.
        jobs: list[Callable[[], tuple[str, _Images]]] = []
        for group, cores in plan:
            jobs.append(lambda g=group: ("global", context.read_cheaper(g, centroids[g], opts.sparse_crops)))
            for core in cores:
                jobs.append(lambda c=core: ("local", local.read_cheaper(c, centroids[c], opts.sparse_crops)))
        logger.info(
            "fast mode: %d cells in %d cores of %d px and %d context groups",
            len(cells), len(jobs) - len(plan), opts.region_px, len(plan),
        )

        group_index = np.empty(0, dtype=np.int64)
        group_feats = torch.empty(0)
        stage_s = dict.fromkeys(STAGES[:-1], 0.0)
        for (which, images), waited in _prefetched(jobs, opts.prefetch):
            stage_s["read"] += images.read_s
            stage_s["read_wait"] += waited
            if which == "global":
                # Kept until the group's last core has been classified.
                group_index = images.index
                group_feats = self._path_features("global", images, stage_s)
                continue
            local_feats = self._path_features("local", images, stage_s)
            rows = torch.from_numpy(np.searchsorted(group_index, images.index))
            output = self._combine(local_feats, group_feats[rows], stage_s)
            # Regions differ in size, and glibc keeps the freed activations
            # of each size as heap fragments. Without this, an encoder run on
            # 30 region sizes grew from 1.0 to 2.0 GB resident, and with it
            # stayed at 0.9 GB.
            release_free_memory()
            yield images.index, output, stage_s
            stage_s = dict.fromkeys(STAGES[:-1], 0.0)

    # Exact mode -------------------------------------------------------------

    def _iter_exact(self, slide, cells: CellTable):
        local, context = self._paths(slide)
        centroids = cells.centroids_px
        step = max(1, self.options.batch_size)
        batches = [np.arange(start, min(start + step, len(cells))) for start in range(0, len(cells), step)]

        def read_batch(index: np.ndarray) -> tuple[_Images, _Images]:
            return local.read_crops(index, centroids[index]), context.read_crops(index, centroids[index])

        jobs = [lambda i=index: read_batch(i) for index in batches]
        for (local_images, context_images), waited in _prefetched(jobs, self.options.prefetch):
            stage_s = dict.fromkeys(STAGES[:-1], 0.0)
            stage_s["read"] = local_images.read_s + context_images.read_s
            stage_s["read_wait"] = waited
            local_feats = self._path_features("local", local_images, stage_s)
            global_feats = self._path_features("global", context_images, stage_s)
            yield local_images.index, self._combine(local_feats, global_feats, stage_s), stage_s


#: Keys of the per-stage seconds the engine reports. ``read`` is time spent
#: reading in the reading thread, ``read_wait`` the part of it that computation
#: waited for; the other stages run one after another.
STAGES = ("read", "read_wait", "preprocess", "local", "global", "gate", "total")


def check_centroids(cells: CellTable, slide) -> None:
    """Raise CellsError when cells lie outside the slide, which means another coordinate frame."""
    xy = cells.centroids_px
    if not np.all(np.isfinite(xy)):
        bad = int((~np.isfinite(xy)).any(axis=1).sum())
        raise CellsError(f"{bad} cells have non-finite centroids; check the cell input")
    outside = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= slide.width) | (xy[:, 1] >= slide.height)
    if outside.any():
        x_min, y_min = xy.min(axis=0)
        x_max, y_max = xy.max(axis=0)
        raise CellsError(
            f"{int(outside.sum())} of {len(xy)} cells lie outside the slide ({slide.width} x {slide.height} px): "
            f"cell centroids span x {x_min:.0f}..{x_max:.0f}, y {y_min:.0f}..{y_max:.0f}. The cells are probably "
            "in another coordinate frame (another image, a cropped export, or µm instead of level-0 pixels); "
            "export them from this slide in QuPath."
        )


def _warn_if_overloaded() -> None:
    """Log when other processes already keep every core busy, where several torch threads wait on each other."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    cores = default_threads()
    if torch.get_num_threads() > 1 and load >= cores:
        logger.warning(
            "load average %.1f on %d cores: %d torch threads will contend with other processes; "
            "--threads 1 may be faster", load, cores, torch.get_num_threads(),
        )


def classify_slide(
    slide,
    cells: CellTable,
    model: NuClass,
    *,
    options: EngineOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> Predictions:
    """Classify ``cells`` (QuPath level-0 px) on ``slide`` with ``model``; see :class:`SlideClassifier`."""
    return SlideClassifier(model, options).classify(slide, cells, progress=progress)


def default_threads() -> int:
    """Return the number of cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)

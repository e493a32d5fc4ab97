"""Classify the cells of one slide with a NuClass model.

Two modes compute the same function (see :mod:`nuclass_qupath.model.nuclass`):

- ``fast``: the slide is cut into square cores of ``region_px`` model pixels.
  For each core that holds cells, one image region is read at the model's
  µm/px (the core plus half a crop around it) and one at the context µm/px
  (the core plus half a context). Each encoder runs once per region, and every
  cell of the core pools its features from the shared maps at its position.
- ``exact``: every cell gets its own crop and context, as in training. It is
  the reference the fast mode is checked against, and much slower.

Coordinates coming in are QuPath level-0 pixels; the slide reader maps them to
pixels of whichever pyramid level it reads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from nuclass_qupath.cells.table import CellTable
from nuclass_qupath.engine.predictions import Predictions
from nuclass_qupath.errors import CellsError
from nuclass_qupath.model.nuclass import NuClass, NuClassOutput, centred_boxes

logger = logging.getLogger(__name__)

# Least extra pixels read around the windows of a fast-mode region; the
# model's own margins apply where they are larger.
REGION_EXTRA_PX = 32


@dataclass
class EngineOptions:
    """How the engine runs; none of these change what the model computes, beyond float rounding."""

    mode: Literal["fast", "exact"] = "fast"
    region_px: int = 1024  # side of a fast-mode core, px at the model's µm/px
    batch_size: int = 32  # cells per forward pass in exact mode
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    prefetch: bool = True  # read the next region while the current one is computed
    threads: int | None = None  # torch intra-op threads; None = all cores


def cpu_supports_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
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
    if precision == "auto":
        return "bf16" if cpu_supports_fast_bf16() else "fp32"
    return precision


def _to_tensor(image: np.ndarray, channels_last: bool) -> torch.Tensor:
    """uint8 (H, W, 3) or (B, H, W, 3) array to a uint8 (B, 3, H, W) tensor."""
    tensor = torch.from_numpy(np.ascontiguousarray(image))
    if tensor.ndim == 3:
        tensor = tensor[None]
    tensor = tensor.permute(0, 3, 1, 2)
    if channels_last:
        return tensor.contiguous(memory_format=torch.channels_last)
    return tensor.contiguous()


@dataclass
class _Region:
    """Cells of one fast-mode core and the two images their features come from."""

    index: np.ndarray
    local_image: np.ndarray
    local_centres_px: np.ndarray  # cell centres in local_image pixels
    context_image: np.ndarray
    context_centres_px: np.ndarray  # cell centres in context_image pixels
    read_s: float


def group_cells_by_core(centres_model_px: np.ndarray, region_px: int) -> list[np.ndarray]:
    """Indices of cells per core of a square grid, in row-major core order."""
    if len(centres_model_px) == 0:
        return []
    cores = np.floor(centres_model_px / region_px).astype(np.int64)
    order = np.lexsort((cores[:, 0], cores[:, 1]))
    keys = cores[order]
    breaks = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
    return np.split(order, breaks)


class SlideClassifier:
    """Run a model over the cells of a slide; the model is loaded once and reused across slides."""

    def __init__(self, model: NuClass, options: EngineOptions | None = None) -> None:
        self.model = model.eval()
        self.options = options or EngineOptions()
        self.config = model.config
        self.precision = _resolve_precision(self.options.precision)
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        if self.options.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    # Public API -------------------------------------------------------------

    def classify(
        self,
        slide,
        cells: CellTable,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> Predictions:
        """Classify every cell of ``cells`` on ``slide`` and return predictions in table order."""
        predictions = Predictions.allocate(self.config.class_names, len(cells))
        if len(cells) == 0:
            return predictions
        check_centroids(cells, slide)
        timings = {"read": 0.0, "local": 0.0, "global": 0.0, "gate": 0.0}
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
        logger.info(
            "classified %d cells in %.1f s (%.0f cells/s, mode %s, %s)",
            len(cells),
            timings["total"],
            len(cells) / max(timings["total"], 1e-9),
            self.options.mode,
            self.precision,
        )
        return predictions

    def iter_batches(self, slide, cells: CellTable) -> Iterator[tuple[np.ndarray, NuClassOutput, dict[str, float]]]:
        """Yield ``(cell indices, outputs, seconds per stage)`` batch by batch, for streaming writers."""
        if self.options.mode == "exact":
            yield from self._iter_exact(slide, cells)
        elif self.options.mode == "fast":
            yield from self._iter_fast(slide, cells)
        else:
            raise ValueError(f"mode must be 'fast' or 'exact', got {self.options.mode!r}")

    # Fast mode --------------------------------------------------------------

    def _read_region(self, slide, index: np.ndarray, centroids_px: np.ndarray) -> _Region:
        """Read the local and context images that cover the cells ``index`` of one core."""
        started = time.perf_counter()
        cfg = self.config
        local_scale = cfg.mpp / slide.mpp  # level-0 px per model px
        context_scale = cfg.context_mpp / slide.mpp  # level-0 px per context px
        centres = centroids_px[index]

        local_image, local_centres = _read_covering(
            slide, centres, local_scale, cfg.mpp, cfg.local_crop_px / 2 + max(cfg.local_margin_px, REGION_EXTRA_PX)
        )
        context_image, context_centres = _read_covering(
            slide, centres, context_scale, cfg.context_mpp,
            cfg.context_encoder_px / 2 + max(cfg.context_margin_px, REGION_EXTRA_PX),
        )
        return _Region(index, local_image, local_centres, context_image, context_centres, time.perf_counter() - started)

    def _iter_fast(self, slide, cells: CellTable):
        cfg = self.config
        centroids = cells.centroids_px
        groups = group_cells_by_core(centroids * (slide.mpp / cfg.mpp), self.options.region_px)
        executor = ThreadPoolExecutor(max_workers=1) if self.options.prefetch else None
        try:
            pending = None
            for i, index in enumerate(groups):
                if executor is None:
                    region = self._read_region(slide, index, centroids)
                else:
                    if pending is None:
                        pending = executor.submit(self._read_region, slide, index, centroids)
                    region = pending.result()
                    pending = (
                        executor.submit(self._read_region, slide, groups[i + 1], centroids)
                        if i + 1 < len(groups)
                        else None
                    )
                output, stage_s = self._forward_region(region)
                stage_s["read"] = region.read_s
                yield region.index, output, stage_s
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)

    @torch.inference_mode()
    def _forward_region(self, region: _Region) -> tuple[NuClassOutput, dict[str, float]]:
        cfg = self.config
        model = self.model
        channels_last = self.options.channels_last
        n = len(region.index)
        zeros = torch.zeros(n, dtype=torch.float32)
        with _autocast(self.precision):
            t0 = time.perf_counter()
            local_input = model.normalize(_to_tensor(region.local_image, channels_last))
            local_boxes = centred_boxes(zeros, torch.from_numpy(region.local_centres_px).float(), cfg.local_crop_px)
            local_feats = model.local_features(local_input, local_boxes)
            t1 = time.perf_counter()
            context_input = model.normalize(_to_tensor(region.context_image, channels_last))
            context_boxes = centred_boxes(
                zeros, torch.from_numpy(region.context_centres_px).float(), cfg.context_encoder_px
            )
            global_feats = model.global_features(context_input, context_boxes)
            t2 = time.perf_counter()
            output = model.combine(local_feats.float(), global_feats.float())
            t3 = time.perf_counter()
        return output, {"local": t1 - t0, "global": t2 - t1, "gate": t3 - t2}

    # Exact mode -------------------------------------------------------------

    def _iter_exact(self, slide, cells: CellTable):
        cfg = self.config
        batch = max(1, self.options.batch_size)
        local_scale = cfg.mpp / slide.mpp
        context_scale = cfg.context_mpp / slide.mpp
        for start in range(0, len(cells), batch):
            index = np.arange(start, min(start + batch, len(cells)))
            t0 = time.perf_counter()
            local_crops, local_centres, context_crops, context_centres = [], [], [], []
            for c in cells.centroids_px[index]:
                image, centre = read_centred(slide, c, local_scale, cfg.mpp, cfg.local_crop_px + 2 * cfg.local_margin_px)
                local_crops.append(image)
                local_centres.append(centre)
                image, centre = read_centred(
                    slide, c, context_scale, cfg.context_mpp, cfg.context_encoder_px + 2 * cfg.context_margin_px
                )
                context_crops.append(image)
                context_centres.append(centre)
            read_s = time.perf_counter() - t0
            output, stage_s = self._forward_crops(
                np.stack(local_crops), np.array(local_centres), np.stack(context_crops), np.array(context_centres)
            )
            stage_s["read"] = read_s
            yield index, output, stage_s

    @torch.inference_mode()
    def _forward_crops(self, local_crops, local_centres, context_crops, context_centres):
        cfg = self.config
        model = self.model
        channels_last = self.options.channels_last
        batch_index = torch.arange(len(local_crops), dtype=torch.float32)
        with _autocast(self.precision):
            t0 = time.perf_counter()
            local_boxes = centred_boxes(batch_index, torch.from_numpy(local_centres).float(), cfg.local_crop_px)
            local_feats = model.local_features(model.normalize(_to_tensor(local_crops, channels_last)), local_boxes)
            t1 = time.perf_counter()
            context_boxes = centred_boxes(
                batch_index, torch.from_numpy(context_centres).float(), cfg.context_encoder_px
            )
            global_feats = model.global_features(
                model.normalize(_to_tensor(context_crops, channels_last)), context_boxes
            )
            t2 = time.perf_counter()
            output = model.combine(local_feats.float(), global_feats.float())
            t3 = time.perf_counter()
        return output, {"local": t1 - t0, "global": t2 - t1, "gate": t3 - t2}


def _read_covering(slide, centres_px: np.ndarray, scale: float, target_mpp: float, margin_px: float):
    """Read the smallest region at ``target_mpp`` that holds every centre with ``margin_px`` around it.

    ``scale`` is level-0 px per output px. Returns the image and the centres in
    its pixels. Regions and crops start on whole pixels of one grid anchored at
    the slide's origin, so a crop is an exact sub-grid of any region around it
    and both modes see identical pixels.
    """
    centres = centres_px / scale
    lo = np.floor(centres.min(axis=0) - margin_px).astype(np.int64)
    hi = np.ceil(centres.max(axis=0) + margin_px).astype(np.int64)
    width, height = (hi - lo).tolist()
    image = slide.read_region_at_mpp(lo[0] * scale, lo[1] * scale, width, height, target_mpp)
    return image, centres - lo


def read_centred(slide, centre_px: np.ndarray, scale: float, target_mpp: float, size_px: int):
    """Read a ``size_px`` square at ``target_mpp`` around one centre; return it and the centre in its pixels.

    The square starts on the same pixel grid as :func:`_read_covering`.
    """
    centre = np.asarray(centre_px, dtype=np.float64) / scale
    origin = np.floor(centre - size_px / 2.0)
    image = slide.read_region_at_mpp(origin[0] * scale, origin[1] * scale, size_px, size_px, target_mpp)
    return image, centre - origin


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
    return max(1, os.cpu_count() or 1)

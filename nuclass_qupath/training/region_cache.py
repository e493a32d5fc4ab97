"""A slide whose pixels are read once per tile and kept in memory while cells are cut.

Cutting one cell's crop and context reads about a megapixel of level-0 image
on a single-level slide, and neighbouring cells read mostly the same pixels.
:func:`cached_slide` wraps an open :class:`~nuclass_qupath.slides.Slide` in a
second ``Slide`` whose reader serves level pixels from a least-recently-used
cache of square tiles, each read once through the wrapped slide's public
``read_region``. A level read returns the same pixels whichever rectangle
contains them, so crops cut through the cache equal crops cut directly. The
store tests check this on CMU-1.

Cells should be visited in spatial order (:func:`spatial_order`) so that the
tiles in use fit in the cache.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import numpy as np

from nuclass_qupath.slides import Slide

logger = logging.getLogger(__name__)

DEFAULT_TILE_PX = 1024
DEFAULT_CACHE_BYTES = 256 * 2**20


class _TileCacheReader:
    """Level pixels of ``slide`` in ``tile_px`` squares, kept in an LRU cache of at most ``max_bytes``."""

    name = "tile-cache"

    def __init__(self, slide: Slide, tile_px: int, max_bytes: int) -> None:
        self._slide = slide
        self.tile_px = int(tile_px)
        self.max_bytes = int(max_bytes)
        self.level_dimensions = tuple(slide.level_dimensions)
        self.level_downsamples = tuple(slide.level_downsamples)
        self.origin_px = getattr(slide, "origin_px", (0, 0))
        self._tiles: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self.tiles_read = 0
        # Several threads may cut crops at once; tile reads and evictions take turns.
        self._lock = threading.Lock()

    def _tile(self, level: int, tx: int, ty: int) -> np.ndarray:
        with self._lock:
            return self._tile_locked(level, tx, ty)

    def _tile_locked(self, level: int, tx: int, ty: int) -> np.ndarray:
        key = (level, tx, ty)
        tile = self._tiles.get(key)
        if tile is not None:
            self._tiles.move_to_end(key)
            return tile

        # Tiles are clipped to the level, so every read lies inside the image.
        level_w, level_h = self.level_dimensions[level]
        x0, y0 = tx * self.tile_px, ty * self.tile_px
        w, h = min(self.tile_px, level_w - x0), min(self.tile_px, level_h - y0)
        ds = self.level_downsamples[level]
        tile = self._slide.read_region(x0 * ds, y0 * ds, w, h, level=level)
        self.tiles_read += 1

        self._tiles[key] = tile
        self._bytes += tile.nbytes
        while self._bytes > self.max_bytes and len(self._tiles) > 1:
            _, evicted = self._tiles.popitem(last=False)
            self._bytes -= evicted.nbytes
        return tile

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        # Slide._read_level clips requests to the level before calling a reader.
        out = np.empty((h, w, 3), dtype=np.uint8)
        size = self.tile_px
        for ty in range(y // size, (y + h - 1) // size + 1):
            for tx in range(x // size, (x + w - 1) // size + 1):
                tile = self._tile(level, tx, ty)
                # Overlap of the request with this tile, in level pixels.
                left, top = max(x, tx * size), max(y, ty * size)
                right = min(x + w, tx * size + tile.shape[1])
                bottom = min(y + h, ty * size + tile.shape[0])
                out[top - y : bottom - y, left - x : right - x] = tile[
                    top - ty * size : bottom - ty * size, left - tx * size : right - tx * size
                ]
        return out

    def close(self) -> None:
        with self._lock:
            self._tiles.clear()
            self._bytes = 0


def cached_slide(slide: Slide, *, tile_px: int = DEFAULT_TILE_PX, max_bytes: int = DEFAULT_CACHE_BYTES) -> Slide:
    """Return a ``Slide`` that reads ``slide``'s pixels through a tile cache.

    The returned slide has the same size, pyramid and µm/px, and returns the
    same pixels for every request. It may be read from several threads at
    once. Closing it frees the cache, not ``slide``.
    """
    if tile_px < 64:
        raise ValueError(f"tile_px must be at least 64, got {tile_px}")
    reader = _TileCacheReader(slide, tile_px, max_bytes)
    return Slide(slide.path, reader, slide.mpp, slide.mpp_source)


def spatial_order(centroids_px: np.ndarray, band_px: float) -> np.ndarray:
    """Return an order that visits points band by band, left to right then right to left.

    ``centroids_px`` are (N, 2) level-0 (x, y); bands are ``band_px`` high.
    Alternating the direction keeps consecutive cells close at band ends.
    """
    xy = np.asarray(centroids_px, dtype=np.float64).reshape(-1, 2)
    if len(xy) == 0:
        return np.zeros(0, dtype=np.int64)
    band = np.floor(xy[:, 1] / max(float(band_px), 1.0)).astype(np.int64)
    band -= band.min()
    x_key = np.where(band % 2 == 0, xy[:, 0], -xy[:, 0])
    return np.lexsort((x_key, band))

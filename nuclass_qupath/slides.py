"""Whole-slide images behind one reading interface, in QuPath's coordinate frame.

:func:`open_slide` tries OpenSlide first (Aperio, Hamamatsu, Leica, MIRAX,
Philips, Sakura, Ventana, DICOM, generic tiled TIFF) and falls back to tifffile
for TIFF files OpenSlide does not read. OME-TIFF always goes to tifffile,
because OpenSlide's generic TIFF driver ignores pyramid levels stored in
SubIFDs and the OME pixel size. Every coordinate that
enters or leaves a :class:`Slide` is a level-0 pixel of the image as QuPath
shows it: for OpenSlide slides with a bounding box (MIRAX and others) QuPath's
origin is OpenSlide's ``(bounds-x, bounds-y)``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from nuclass_qupath.errors import MissingMppError, SlideError, SlideNotFoundError, UnsupportedSlideError

logger = logging.getLogger(__name__)

__all__ = ["Slide", "open_slide", "qupath_frame"]

SUPPORTED_FORMATS = (
    "OpenSlide formats (Aperio .svs, Hamamatsu .ndpi/.vms, Leica .scn, MIRAX .mrxs, Philips .tiff, "
    "Sakura .svslide, Ventana .bif, DICOM, generic tiled TIFF) and, through tifffile, OME-TIFF "
    "and other tiled or striped RGB/greyscale TIFF"
)

# A pyramid level counts as "at or below" a requested downsample when it is at
# most this much larger, so OpenSlide's rounded downsamples such as 2.0005 still
# serve a request for 2.
LEVEL_TOLERANCE = 0.01

# Resolution tags from scanners fall in this range. Desktop defaults such as
# 72 or 96 dpi (about 350 or 265 µm/px) are not pixel sizes and are ignored.
PLAUSIBLE_TAG_MPP = (0.01, 50.0)

# Largest source block, in level pixels per side, that thumbnail() reads at once.
THUMBNAIL_BLOCK_PX = 4096

_UNIT_TO_UM = {
    "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
    "\\u00b5m": 1.0, "nm": 1e-3, "pm": 1e-6, "å": 1e-4, "mm": 1e3, "cm": 1e4, "m": 1e6,
    "inch": 25400.0, "in": 25400.0,
}


# ---------------------------------------------------------------------------
# Frame and pixel size


def qupath_frame(properties: Mapping[str, str], level0_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Return QuPath's view of an OpenSlide image as ``(origin_x, origin_y, width, height)``.

    QuPath's ``OpenslideImageServer`` crops to ``openslide.bounds-*`` when all
    four properties are present and parse as integers. QuPath's (0, 0) is then
    OpenSlide's ``(bounds-x, bounds-y)`` and the image size is the bounds
    size. Otherwise the frame is OpenSlide's full level 0. Source read:
    qupath-extension-openslide, both the JNA-based server that QuPath 0.5 and
    0.6 ship with OpenSlide 4.0 and the older OpenSlide Java one.
    """
    keys = ("openslide.bounds-x", "openslide.bounds-y", "openslide.bounds-width", "openslide.bounds-height")
    width, height = int(level0_size[0]), int(level0_size[1])
    if not all(key in properties for key in keys):
        return 0, 0, width, height
    try:
        x, y, w, h = (int(properties[key]) for key in keys)
    except ValueError:
        # QuPath falls back to the uncropped image when a bound is not an integer.
        return 0, 0, width, height
    return x, y, w, h


def _check_mpp(mpp: float, path: Path) -> float:
    mpp = float(mpp)
    if not math.isfinite(mpp) or mpp <= 0:
        raise SlideError(f"invalid pixel size {mpp!r} µm/px for {path}: pass a positive number such as --mpp 0.25")
    return mpp


def _mpp_from_openslide(properties: Mapping[str, str]) -> float | None:
    try:
        mpp_x = float(properties["openslide.mpp-x"])
        mpp_y = float(properties.get("openslide.mpp-y", mpp_x))
    except (KeyError, ValueError):
        return None
    if not (math.isfinite(mpp_x) and math.isfinite(mpp_y) and mpp_x > 0 and mpp_y > 0):
        return None
    if abs(mpp_x - mpp_y) > 0.01 * mpp_x:
        logger.warning("pixels are not square (%.5g x %.5g µm), so the mean is used", mpp_x, mpp_y)
    return (mpp_x + mpp_y) / 2


def _mpp_from_ome(ome_xml: str) -> float | None:
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:
        logger.warning("OME-XML metadata could not be parsed, so other pixel size tags are tried")
        return None
    for element in root.iter():
        if not element.tag.endswith("Pixels"):
            continue
        size = element.get("PhysicalSizeX")
        if size is None:
            return None
        unit = element.get("PhysicalSizeXUnit", "µm").lower()
        factor = _UNIT_TO_UM.get(unit)
        if factor is None:
            logger.warning("OME-XML PhysicalSizeXUnit %r is not a length unit and is ignored", unit)
            return None
        return float(size) * factor
    return None


def _mpp_from_tiff(tif) -> float | None:
    """Read µm/px from OME-XML, an Aperio description, ImageJ metadata or resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        mpp = _mpp_from_ome(tif.ome_metadata)
        if mpp:
            return mpp

    page = tif.pages.first
    description = page.description or ""
    if description.startswith("Aperio"):
        match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
        if match:
            return float(match.group(1))

    xres = page.tags.get("XResolution")
    if xres is None:
        return None
    numerator, denominator = xres.value
    if numerator == 0:
        return None
    per_unit = denominator / numerator

    imagej = tif.imagej_metadata or {}
    if "unit" in imagej:
        factor = _UNIT_TO_UM.get(str(imagej["unit"]).lower())
        return per_unit * factor if factor else None

    unit_tag = page.tags.get("ResolutionUnit")
    factor = {2: 25400.0, 3: 10000.0}.get(int(unit_tag.value) if unit_tag else 2)
    if factor is None:
        return None
    mpp = per_unit * factor
    if not PLAUSIBLE_TAG_MPP[0] <= mpp <= PLAUSIBLE_TAG_MPP[1]:
        logger.info("ignoring TIFF resolution tags (%.4g µm/px): not a microscope pixel size", mpp)
        return None
    return mpp


# ---------------------------------------------------------------------------
# Backends


class _Reader(Protocol):
    name: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray: ...

    def close(self) -> None: ...


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)[..., None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class _OpenSlideReader:
    """OpenSlide image cropped to QuPath's frame. ``read`` takes level pixels inside that frame."""

    name = "openslide"

    def __init__(self, handle, path: Path) -> None:
        self._handle = handle
        self._path = path
        self.properties = dict(handle.properties)
        x0, y0, width, height = qupath_frame(self.properties, handle.dimensions)
        self.origin_px = (x0, y0)
        self.level_downsamples = tuple(float(d) for d in handle.level_downsamples)
        if (x0, y0, width, height) == (0, 0, *handle.dimensions):
            self.level_dimensions = tuple((int(w), int(h)) for w, h in handle.level_dimensions)
        else:
            self.level_dimensions = tuple(
                (max(1, int(width / ds)), max(1, int(height / ds))) for ds in self.level_downsamples
            )

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        import openslide

        ds = self.level_downsamples[level]
        location = (self.origin_px[0] + round(x * ds), self.origin_px[1] + round(y * ds))
        try:
            image = self._handle.read_region(location, level, (w, h))
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"failed to read region x={x}, y={y}, w={w}, h={h} at level {level} of {self._path}: {exc}. "
                "The file may be truncated or corrupt."
            ) from exc
        return _composite_on_white(np.asarray(image))

    def close(self) -> None:
        self._handle.close()


class _TiffReader:
    """Pyramid levels of the largest TIFF series, read tile by tile through zarr."""

    name = "tifffile"

    def __init__(self, tif, path: Path) -> None:
        import zarr

        self.tif = tif
        self._path = path
        images = [series for series in tif.series if "Y" in series.axes and "X" in series.axes]
        series = max(images, key=lambda s: s.sizes["width"] * s.sizes["height"])
        self._index, self._positions, self._channel_axis = self._plane_index(series, path)
        dtype = np.dtype(series.dtype)
        if dtype not in (np.uint8, np.uint16):
            raise UnsupportedSlideError(f"{path} has {dtype} pixels, but only 8- and 16-bit RGB or greyscale is supported")
        self._stores = []
        self._arrays = []
        dims = []
        for level_index, level in enumerate(series.levels):
            store = series.aszarr(level=level_index)
            self._stores.append(store)
            self._arrays.append(zarr.open(store, mode="r"))
            dims.append((int(level.sizes["width"]), int(level.sizes["height"])))
        self.level_dimensions = tuple(dims)
        w0, h0 = dims[0]
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in dims)

    @staticmethod
    def _plane_index(series, path: Path) -> tuple[list, dict[str, int], int | None]:
        """Build the zarr index that selects one RGB plane.

        Returns the index template, which takes the first plane of any extra
        axis such as Z or T. Next come the positions of Y and X in it. Last is
        the position of the colour axis (S, or C of size 3 or 4) among the
        axes that remain, or None for greyscale.
        """
        index: list = []
        positions: dict[str, int] = {}
        kept = 0
        channel_axis = None
        for axis, size in zip(series.axes, series.shape):
            if axis in "YX":
                positions[axis] = len(index)
                index.append(slice(None))
                kept += 1
            elif axis in "SC" and size > 1 and channel_axis is None:
                if size not in (3, 4):
                    raise UnsupportedSlideError(
                        f"{path} has {size} channels, but only RGB, RGBA and greyscale images are supported"
                    )
                channel_axis = kept
                index.append(slice(None))
                kept += 1
            else:
                if size > 1:
                    logger.warning("%s: axis %s has %d planes, of which only the first is read", path.name, axis, size)
                index.append(0)
        return index, positions, channel_axis

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        index = list(self._index)
        index[self._positions["Y"]] = slice(y, y + h)
        index[self._positions["X"]] = slice(x, x + w)
        try:
            plane = np.asarray(self._arrays[level][tuple(index)])
        except (OSError, ValueError, RuntimeError, KeyError, IndexError) as exc:
            raise SlideError(
                f"failed to read region x={x}, y={y}, w={w}, h={h} at level {level} of {self._path}: {exc}. "
                "The file may be truncated or corrupt."
            ) from exc
        return self._to_rgb(plane)

    def _to_rgb(self, plane: np.ndarray) -> np.ndarray:
        if self._channel_axis is None:
            plane = plane[..., None]
        elif self._channel_axis != 2:
            plane = np.moveaxis(plane, self._channel_axis, -1)
        if plane.dtype == np.uint16:
            plane = (plane >> 8).astype(np.uint8)
        if plane.shape[-1] == 1:
            return np.repeat(plane, 3, axis=-1)
        if plane.shape[-1] == 4:
            return _composite_on_white(plane)
        return np.ascontiguousarray(plane)

    def close(self) -> None:
        for store in self._stores:
            store.close()
        self.tif.close()


# ---------------------------------------------------------------------------
# Slide


class Slide:
    """An open whole-slide image in QuPath's frame.

    Attributes
    ----------
    path
        The slide file.
    width, height
        Level-0 size in pixels as QuPath shows the image.
    mpp
        Level-0 pixel size in µm/px.
    mpp_source
        ``"metadata"`` when ``mpp`` comes from the file, ``"user"`` when given.
    level_downsamples, level_dimensions
        Per pyramid level: downsample from level 0, and ``(width, height)``
        in pixels of that level.
    backend
        ``"openslide"`` or ``"tifffile"``.
    origin_px
        The OpenSlide level-0 pixel at QuPath's (0, 0): the bounding box corner
        for OpenSlide slides with bounds, else ``(0, 0)``.
    """

    def __init__(self, path: Path, reader: _Reader, mpp: float, mpp_source: str) -> None:
        self.path = path
        self._reader = reader
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.level_dimensions = reader.level_dimensions
        self.level_downsamples = reader.level_downsamples
        self.width, self.height = reader.level_dimensions[0]
        self.backend = reader.name
        self.origin_px = getattr(reader, "origin_px", (0, 0))

    def __repr__(self) -> str:
        return (
            f"Slide({self.path.name!r}, {self.width}x{self.height} px, {self.mpp:.5g} µm/px ({self.mpp_source}), "
            f"{len(self.level_downsamples)} levels, backend={self.backend!r})"
        )

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Release the file handle."""
        self._reader.close()

    def best_level_for_downsample(self, downsample: float) -> int:
        """Return the level with the largest downsample not above ``downsample`` (1 % tolerance)."""
        best = 0
        for level, level_ds in enumerate(self.level_downsamples):
            if level_ds <= downsample * (1 + LEVEL_TOLERANCE) and level_ds > self.level_downsamples[best]:
                best = level
        return best

    def read_region(self, x: float, y: float, w: int, h: int, level: int = 0) -> np.ndarray:
        """Read pixels of one pyramid level.

        Parameters
        ----------
        x, y
            Top-left corner in level-0 pixels of QuPath's frame.
        w, h
            Size in pixels of ``level``.
        level
            Pyramid level index.

        Returns
        -------
        numpy.ndarray
            ``(h, w, 3)`` uint8 RGB, white outside the image.
        """
        if not 0 <= level < len(self.level_downsamples):
            raise ValueError(f"level {level} is out of range because the slide has {len(self.level_downsamples)} levels")
        ds = self.level_downsamples[level]
        return self._read_level(level, round(x / ds), round(y / ds), int(w), int(h))

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        if w < 0 or h < 0:
            raise ValueError(f"region size must not be negative, got w={w}, h={h}")
        level_w, level_h = self.level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, level_w), min(y + h, level_h)
        if x0 == x and y0 == y and x1 == x + w and y1 == y + h and w and h:
            return self._reader.read(level, x, y, w, h)
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._reader.read(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def read_region_at_mpp(self, x: float, y: float, w_out: int, h_out: int, target_mpp: float) -> np.ndarray:
        """Read a region resampled to ``target_mpp`` µm/px.

        Output pixel ``(i, j)`` covers level-0 ``[x + i*d, x + (i+1)*d)`` by
        ``[y + j*d, y + (j+1)*d)`` with ``d = target_mpp / mpp``, so its centre
        is at ``x + (i + 0.5) * d``. Pixels come from the level with the largest
        downsample not above ``d`` and are resized with Pillow's bilinear
        filter, which averages over the source footprint when shrinking.

        Parameters
        ----------
        x, y
            Top-left corner in level-0 pixels of QuPath's frame.
        w_out, h_out
            Output size in pixels.
        target_mpp
            Output pixel size in µm/px.

        Returns
        -------
        numpy.ndarray
            ``(h_out, w_out, 3)`` uint8 RGB, white outside the image.
        """
        if not math.isfinite(target_mpp) or target_mpp <= 0:
            raise ValueError(f"target_mpp must be a positive number, got {target_mpp!r}")
        return self._read_scaled(x, y, int(w_out), int(h_out), target_mpp / self.mpp)

    def _read_scaled(self, x: float, y: float, w_out: int, h_out: int, downsample: float) -> np.ndarray:
        level = self.best_level_for_downsample(downsample)
        level_ds = self.level_downsamples[level]
        scale = downsample / level_ds
        sx0, sy0 = x / level_ds, y / level_ds

        # Exact pixel grid: no resampling needed.
        if abs(scale - 1) < 1e-6 and float(sx0).is_integer() and float(sy0).is_integer():
            return self._read_level(level, int(sx0), int(sy0), w_out, h_out)

        # Source block with a margin for the filter footprint.
        sx1, sy1 = sx0 + w_out * scale, sy0 + h_out * scale
        margin = int(math.ceil(scale)) + 1
        ix0, iy0 = math.floor(sx0) - margin, math.floor(sy0) - margin
        ix1, iy1 = math.ceil(sx1) + margin, math.ceil(sy1) + margin
        block = self._read_level(level, ix0, iy0, ix1 - ix0, iy1 - iy0)

        # Resample the exact source box onto the output grid.
        box = (sx0 - ix0, sy0 - iy0, sx1 - ix0, sy1 - iy0)
        # No reducing_gap: its block-averaging shortcut depends on where the box
        # starts, so a crop would differ from the same pixels cut from a larger
        # region. Without it every output pixel depends only on its footprint.
        image = Image.fromarray(block).resize((w_out, h_out), Image.Resampling.BILINEAR, box=box)
        return np.asarray(image)

    def thumbnail(self, max_px: int) -> np.ndarray:
        """Return the whole image with its longer side at most ``max_px`` pixels, as uint8 RGB.

        The image is read block by block, so single-level slides are never
        loaded whole.
        """
        if max_px < 1:
            raise ValueError(f"max_px must be at least 1, got {max_px}")
        downsample = max(1.0, max(self.width, self.height) / max_px)
        out_w = max(1, round(self.width / downsample))
        out_h = max(1, round(self.height / downsample))
        level = self.best_level_for_downsample(downsample)
        scale = downsample / self.level_downsamples[level]
        block_out = max(64, int(THUMBNAIL_BLOCK_PX / scale))
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        for top in range(0, out_h, block_out):
            for left in range(0, out_w, block_out):
                bw, bh = min(block_out, out_w - left), min(block_out, out_h - top)
                out[top : top + bh, left : left + bw] = self._read_scaled(
                    left * downsample, top * downsample, bw, bh, downsample
                )
        return out


class _PillowReader:
    """Small single-level images (PNG, JPEG) that Pillow decodes whole into memory.

    Meant for labelled tiles such as training patches; such files carry no
    trustworthy pixel size, so ``--mpp`` is required for them.
    """

    name = "pillow"
    MAX_PIXELS = 20000 * 20000

    def __init__(self, path: Path) -> None:
        with Image.open(path) as image:
            if image.width * image.height > self.MAX_PIXELS:
                raise UnsupportedSlideError(
                    f"{path} is {image.width} x {image.height} px, too large to decode whole; "
                    "convert it to a tiled pyramidal TIFF"
                )
            self._pixels = np.asarray(image.convert("RGB"))
        self.level_dimensions = ((self._pixels.shape[1], self._pixels.shape[0]),)
        self.level_downsamples = (1.0,)

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        height, width = self._pixels.shape[:2]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, width), min(y + h, height)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._pixels[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._pixels = np.zeros((0, 0, 3), np.uint8)


PILLOW_SUFFIXES = (".png", ".jpg", ".jpeg")


# ---------------------------------------------------------------------------
# Opening


def _is_ome_tiff(path: Path) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return tif.is_ome
    except (tifffile.TiffFileError, OSError, ValueError):
        return False


def _open_reader(path: Path) -> _Reader:
    """Open ``path`` with OpenSlide, or with tifffile when OpenSlide does not read it."""
    import openslide
    import tifffile

    if path.suffix.lower() in PILLOW_SUFFIXES:
        try:
            return _PillowReader(path)
        except (OSError, ValueError) as exc:
            raise SlideError(f"failed to read image {path}: {exc}; the file may be truncated or corrupt") from exc

    # OpenSlide first: it handles vendor formats and QuPath uses it for them.
    openslide_error: Exception | None = None
    try:
        handle = openslide.OpenSlide(str(path))
        if not (handle.properties.get("openslide.vendor") == "generic-tiff" and _is_ome_tiff(path)):
            return _OpenSlideReader(handle, path)
        # OpenSlide's generic TIFF driver misses SubIFD pyramids and OME pixel sizes.
        handle.close()
    except openslide.OpenSlideUnsupportedFormatError:
        pass
    except openslide.OpenSlideError as exc:
        # OpenSlide recognised the format but failed, so tifffile gets a try.
        openslide_error = exc

    # tifffile next: OME-TIFF and other TIFF layouts.
    try:
        tif = tifffile.TiffFile(path)
    except tifffile.TiffFileError as exc:
        if openslide_error is not None:
            raise SlideError(
                f"failed to open {path}: OpenSlide reports '{openslide_error}' and tifffile reports '{exc}'. "
                "The file may be truncated or corrupt."
            ) from openslide_error
        raise UnsupportedSlideError(
            f"cannot read {path}: neither OpenSlide nor tifffile recognises it. Supported: {SUPPORTED_FORMATS}"
        ) from exc
    except (OSError, ValueError, struct.error) as exc:
        raise SlideError(f"failed to open {path} as TIFF: {exc}. The file may be truncated or corrupt.") from exc

    reader = None
    try:
        if any("Y" in series.axes and "X" in series.axes for series in tif.series):
            reader = _TiffReader(tif, path)
    except (tifffile.TiffFileError, OSError, ValueError, KeyError, IndexError, struct.error) as exc:
        raise SlideError(f"failed to read the TIFF structure of {path}: {exc}. The file may be truncated or corrupt.") from exc
    finally:
        if reader is None:
            tif.close()
    if reader is None:
        reason = f"OpenSlide reports '{openslide_error}', and " if openslide_error else ""
        raise SlideError(
            f"failed to open {path}: {reason}tifffile finds no image in it. The file may be truncated or corrupt."
        ) from openslide_error
    if openslide_error is not None:
        logger.warning("OpenSlide failed to open %s (%s), so tifffile reads it instead", path.name, openslide_error)
    return reader


def _metadata_mpp(reader: _Reader, path: Path) -> float | None:
    """Return the pixel size the file records, or None when it records no usable one."""
    mpp = _recorded_mpp(reader, path)
    if mpp is None or not math.isfinite(mpp) or mpp <= 0:
        return None
    return mpp


def _recorded_mpp(reader: _Reader, path: Path) -> float | None:
    if isinstance(reader, _PillowReader):
        return None
    if isinstance(reader, _OpenSlideReader):
        mpp = _mpp_from_openslide(reader.properties)
        if mpp is not None:
            return mpp
        # OpenSlide skips ImageJ and OME calibrations that some TIFFs carry.
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                return _mpp_from_tiff(tif)
        except (tifffile.TiffFileError, OSError, ValueError):
            return None
    return _mpp_from_tiff(reader.tif)


def open_slide(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open a whole-slide image.

    Parameters
    ----------
    path
        Slide file: any format OpenSlide reads, or an OME-TIFF or other TIFF.
    mpp
        Level-0 pixel size in µm/px. It overrides the file's metadata and is
        required when the file has none.

    Returns
    -------
    Slide
        The open slide. Close it, or use it as a context manager.

    Raises
    ------
    SlideNotFoundError
        ``path`` does not exist.
    UnsupportedSlideError
        Neither OpenSlide nor tifffile reads the file.
    MissingMppError
        The file has no pixel size and ``mpp`` is None.
    SlideError
        The file is truncated or corrupt, or ``mpp`` is not a positive number.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideNotFoundError(f"slide not found: {path}")
    if mpp is not None:
        mpp = _check_mpp(mpp, path)

    reader = _open_reader(path)
    keep_open = False
    try:
        metadata_mpp = _metadata_mpp(reader, path)
        if mpp is None and metadata_mpp is None:
            raise MissingMppError(
                f"slide {path} has no pixel size in its metadata. Pass --mpp MICRONS_PER_PIXEL "
                "(e.g. --mpp 0.25 for a 40x scan, --mpp 0.5 for 20x)"
            )
        keep_open = True
    finally:
        if not keep_open:
            reader.close()

    if mpp is None:
        slide = Slide(path, reader, metadata_mpp, "metadata")
    else:
        if metadata_mpp is not None and not math.isclose(mpp, metadata_mpp, rel_tol=1e-3):
            logger.info("%s: using the given %.5g µm/px instead of %.5g µm/px from the metadata", path.name, mpp, metadata_mpp)
        slide = Slide(path, reader, mpp, "user")
    logger.info(
        "opened %s with %s: %dx%d px, %.5g µm/px (%s), %d levels",
        path.name, slide.backend, slide.width, slide.height, slide.mpp, slide.mpp_source, len(slide.level_downsamples),
    )
    return slide

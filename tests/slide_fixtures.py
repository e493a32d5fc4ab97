"""Small slide files written with tifffile for the slide and detector tests.

Each writer returns what a reader should find in the file, so tests compare
against known pixels rather than against the reader itself.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import tifffile

LEICA_XMLNS = "http://www.leica-microsystems.com/scn/2010/10/01"


def gradient_rgb(height: int, width: int) -> np.ndarray:
    """Return an RGB test image whose pixels encode their own position."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([cols % 251, rows % 241, (rows + cols) % 239], axis=-1).astype(np.uint8)


def _leica_image_xml(name: str, dims: list[tuple[int, int, int]], view: tuple[int, int, int, int], objective: str) -> str:
    dimensions = "".join(f'<dimension sizeX="{w}" sizeY="{h}" r="{r}" ifd="{ifd}"/>' for r, (w, h, ifd) in enumerate(dims))
    width_nm, height_nm, offset_x_nm, offset_y_nm = view
    return (
        f'<image name="{name}"><creationDate>2020-01-01T00:00:00Z</creationDate>'
        '<device model="Leica SCN400" version="1.5"/>'
        f'<pixels sizeX="{dims[0][0]}" sizeY="{dims[0][1]}">{dimensions}</pixels>'
        f'<view sizeX="{width_nm}" sizeY="{height_nm}" offsetX="{offset_x_nm}" offsetY="{offset_y_nm}" spacingZ="0"/>'
        f"<scanSettings><objectiveSettings><objective>{objective}</objective></objectiveSettings>"
        "<illuminationSettings><numericalAperture>0.4</numericalAperture>"
        "<illuminationSource>brightfield</illuminationSource></illuminationSettings></scanSettings></image>"
    )


def nuclei_rgb(height: int, width: int, centres_xy: list[tuple[float, float]], radius_px: float) -> np.ndarray:
    """Draw dark purple discs ("nuclei") on a pink background, softened by a one-pixel blur."""
    from scipy import ndimage as ndi

    rows, cols = np.mgrid[0:height, 0:width]
    stain = np.zeros((height, width), dtype=np.float64)
    for x, y in centres_xy:
        # Pixel (row, col) has its centre at (col + 0.5, row + 0.5).
        stain[(cols + 0.5 - x) ** 2 + (rows + 0.5 - y) ** 2 <= radius_px**2] = 1.0
    stain = ndi.gaussian_filter(stain, 1.0)
    background = np.array([235.0, 190.0, 220.0])
    nucleus = np.array([80.0, 50.0, 130.0])
    return (background + stain[..., None] * (nucleus - background)).round().astype(np.uint8)


def write_leica_scn(path: Path, *, mpp: float = 0.5, main: np.ndarray | None = None) -> dict:
    """Write a Leica SCN slide whose main image sits inside a larger collection.

    OpenSlide reports the main image's place in the collection as
    ``openslide.bounds-*``, which is the case QuPath crops to. Returns the
    main image (level 0; ``main`` or a position gradient), its half-size level, the bounds ``(x, y, w, h)`` in
    OpenSlide level-0 pixels and the collection size.
    """
    main = gradient_rgb(384, 512) if main is None else main
    if main.shape != (384, 512, 3):
        raise ValueError(f"the main image must be 384x512 RGB, got {main.shape}")
    half = main[::2, ::2].copy()
    macro = np.full((80, 100, 3), 235, dtype=np.uint8)
    nm_per_px = round(mpp * 1000)
    collection_px = (1000, 800)
    bounds = (100, 60, main.shape[1], main.shape[0])

    collection_nm = (collection_px[0] * nm_per_px, collection_px[1] * nm_per_px)
    macro_xml = _leica_image_xml("macro", [(100, 80, 0)], (*collection_nm, 0, 0), "0.625")
    main_view = (bounds[2] * nm_per_px, bounds[3] * nm_per_px, bounds[0] * nm_per_px, bounds[1] * nm_per_px)
    main_xml = _leica_image_xml("main", [(512, 384, 1), (256, 192, 2)], main_view, "20")
    barcode = base64.b64encode(b"TEST-0001").decode()
    xml = (
        f'<?xml version="1.0" encoding="utf-8"?><scn xmlns="{LEICA_XMLNS}">'
        f'<collection name="test" sizeX="{collection_nm[0]}" sizeY="{collection_nm[1]}">'
        f"<barcode>{barcode}</barcode>{macro_xml}{main_xml}</collection></scn>"
    )
    resolution = (1e4 / mpp, 1e4 / mpp)
    with tifffile.TiffWriter(path, bigtiff=True) as tiff:
        tiff.write(macro, tile=(16, 16), photometric="rgb", description=xml, metadata=None, compression="zlib")
        tiff.write(main, tile=(128, 128), photometric="rgb", metadata=None, compression="zlib",
                   resolution=resolution, resolutionunit="CENTIMETER")
        tiff.write(half, tile=(128, 128), photometric="rgb", metadata=None, compression="zlib",
                   resolution=(resolution[0] / 2, resolution[1] / 2), resolutionunit="CENTIMETER")
    return {"level0": main, "level1": half, "bounds": bounds, "collection_px": collection_px}


def write_ome_pyramid(path: Path, *, mpp: float = 0.25, planar: bool = False, byteorder: str = ">",
                      image: np.ndarray | None = None) -> list[np.ndarray]:
    """Write a 3-level OME-TIFF pyramid (levels in SubIFDs) and return the RGB pixels of each level.

    Level 0 is ``image`` or a position gradient, with sides that are
    multiples of 4. The smaller levels are 2x2 and 4x4 block means, as
    scanners make them.

    ``planar`` stores the colour planes separately; ``byteorder`` ``">"`` makes
    the file big-endian.
    """
    image = gradient_rgb(600, 800) if image is None else image
    levels = [image] + [_block_mean(image, factor) for factor in (2, 4)]
    metadata = {"axes": "SYX" if planar else "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}
    options = {"tile": (128, 128), "photometric": "rgb", "compression": "zlib"}
    if planar:
        options["planarconfig"] = "separate"
    with tifffile.TiffWriter(path, ome=True, byteorder=byteorder) as tiff:
        data = np.moveaxis(levels[0], -1, 0) if planar else levels[0]
        tiff.write(data, subifds=len(levels) - 1, metadata=metadata, **options)
        for level in levels[1:]:
            data = np.moveaxis(level, -1, 0) if planar else level
            tiff.write(data, subfiletype=1, metadata=None, **options)
    return levels


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    height, width = image.shape[0] // factor, image.shape[1] // factor
    blocks = image[: height * factor, : width * factor].reshape(height, factor, width, factor, 3)
    return blocks.mean(axis=(1, 3)).round().astype(np.uint8)


def write_plain_tiff(path: Path, image: np.ndarray, **kwargs) -> None:
    """Write a single-level striped RGB TIFF (OpenSlide reads only tiled ones)."""
    tifffile.imwrite(path, image, photometric="rgb", metadata=None, **kwargs)

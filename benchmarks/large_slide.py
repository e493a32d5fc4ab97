"""Build a large pyramidal OME-TIFF from a small real slide by tiling it.

Tiles alternate between the slide and its mirror image, so that tissue runs
on across the seams instead of jumping. Level 0 is JPEG-compressed in 512 px
tiles with sub-resolution levels at downsamples 4, 16 and 64, as scanners
write them, and the OME-XML records the source slide's µm/px.

Usage::

    python benchmarks/large_slide.py SOURCE OUT.ome.tif [--tiles-x 6 --tiles-y 5]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

TILE_PX = 512
JPEG_QUALITY = 90
PYRAMID_FACTORS = (4, 16, 64)


def mirrored_mosaic(image: np.ndarray, tiles_x: int, tiles_y: int) -> np.ndarray:
    """Return ``image`` repeated ``tiles_y`` x ``tiles_x`` times, every other copy mirrored."""
    flipped_x = image[:, ::-1]
    row_even = np.concatenate([image if i % 2 == 0 else flipped_x for i in range(tiles_x)], axis=1)
    row_odd = row_even[::-1]
    return np.concatenate([row_even if j % 2 == 0 else row_odd for j in range(tiles_y)], axis=0)


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks; edges that do not fill a block are dropped."""
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).astype(np.float32)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


def build_large_slide(source: Path, out: Path, tiles_x: int = 6, tiles_y: int = 5) -> dict:
    """Write the mosaic of ``source`` to ``out`` (OME-TIFF); return its size and µm/px.

    The file is written under a temporary name and renamed when complete, so
    an interrupted build never leaves a truncated slide behind.
    """
    import tifffile

    from nuclass_qupath.slides import open_slide

    started = time.perf_counter()
    with open_slide(source) as slide:
        mpp = slide.mpp
        image = slide.read_region(0, 0, slide.width, slide.height)
    mosaic = mirrored_mosaic(image, tiles_x, tiles_y)
    height, width = mosaic.shape[:2]
    tmp = out.with_name(out.name + ".part")
    metadata = {"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"}
    options = dict(tile=(TILE_PX, TILE_PX), photometric="rgb", compression="jpeg",
                   compressionargs={"level": JPEG_QUALITY})
    with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
        tif.write(mosaic, subifds=len(PYRAMID_FACTORS), metadata=metadata, **options)
        for factor in PYRAMID_FACTORS:
            tif.write(downsample(mosaic, factor), subfiletype=1, **options)
    os.replace(tmp, out)
    return {"path": str(out), "width_px": width, "height_px": height, "mpp": mpp,
            "tiles": tiles_x * tiles_y, "build_s": round(time.perf_counter() - started, 1),
            "size_mb": round(out.stat().st_size / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="small slide to tile")
    parser.add_argument("out", type=Path, help="output .ome.tif")
    parser.add_argument("--tiles-x", type=int, default=6)
    parser.add_argument("--tiles-y", type=int, default=5)
    args = parser.parse_args()
    print(build_large_slide(args.source, args.out, args.tiles_x, args.tiles_y))


if __name__ == "__main__":
    main()

"""A picture of the slide with each cell drawn in its class colour, to check that cells sit on nuclei."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

MAX_PREVIEW_PX = 4096


def write_preview(slide, cells, predictions, config, path: Path, *, max_px: int = MAX_PREVIEW_PX) -> None:
    """Draw nucleus outlines (or dots for point cells) coloured by predicted class onto a slide thumbnail.

    The image is written as PNG to ``path`` as it is: callers wanting atomic
    output pass a temporary path.
    """
    thumbnail = slide.thumbnail(max_px)
    scale = thumbnail.shape[1] / slide.width  # preview px per level-0 px
    image = Image.fromarray(thumbnail).convert("RGB")
    draw = ImageDraw.Draw(image)
    colors = {c.name: tuple(c.color) for c in config.classes}
    radius = max(2.0, 3.0 / slide.mpp * scale)  # 3 µm dots where no outline is known
    for i, class_index in enumerate(predictions.predicted):
        color = colors[predictions.class_names[int(class_index)]]
        geometry = cells.geometries[i]
        if geometry is not None and geometry.geom_type in ("Polygon", "MultiPolygon") and scale >= 0.25:
            polygons = geometry.geoms if geometry.geom_type == "MultiPolygon" else [geometry]
            for polygon in polygons:
                xy = (np.asarray(polygon.exterior.coords) * scale).ravel().tolist()
                if len(xy) >= 6:
                    draw.line(xy + xy[:2], fill=color, width=2 if scale >= 0.5 else 1)
        else:
            x, y = cells.centroids_px[i] * scale
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=color, width=2)
    _draw_legend(draw, config, predictions)
    image.save(path, format="PNG")


def _draw_legend(draw: ImageDraw.ImageDraw, config, predictions) -> None:
    counts = np.bincount(predictions.predicted, minlength=len(predictions.class_names))
    y = 8
    for spec, count in zip(config.classes, counts):
        draw.rectangle([8, y, 24, y + 16], fill=tuple(spec.color), outline=(0, 0, 0))
        draw.text((30, y + 2), f"{spec.name}: {int(count)}", fill=(0, 0, 0))
        y += 22

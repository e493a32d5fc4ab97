"""Grad-CAM of both NuClass paths for chosen cells, and a PNG panel per cell.

For each cell the local path's heatmap is computed on its crop and the global
path's on its context. A forward hook captures the feature map that each
encoder returns, which is the map the cell features are pooled from. The
Grad-CAM weights are the mean gradient of the class score over that map: the
local logit for the local path, the global logit for the global path. The
weighted sum of the map's channels goes through a ReLU, is upsampled to the
input image and scaled to [0, 1]. A timm ViT backbone built
with ``features_only`` also returns a (B, C, H, W) map (its tokens reshaped),
so the same code serves CNN and ViT encoders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nuclass_qupath._atomic import atomic_open
from nuclass_qupath.errors import CellsError
from nuclass_qupath.model.nuclass import NuClass

logger = logging.getLogger(__name__)

# Panel size in inches at PANEL_DPI; the PNG is 1600 x 480 px.
PANEL_SIZE_IN = (16.0, 4.8)
PANEL_DPI = 100
CAM_COLORMAP = "jet"
CAM_MAX_ALPHA = 0.6


@dataclass
class Explanation:
    """Grad-CAM heatmaps and predictions of one cell.

    Images are RGB uint8 as the model saw them, margins included; heatmaps
    are float32 of the same height and width with values in [0, 1]. Windows
    are ``(x0, y0, x1, y1)`` in pixels of their image.
    """

    cell_id: str
    centroid_px: tuple[float, float]  # QuPath level-0 pixels (x, y)
    class_names: list[str]
    target_class: int  # class whose score the heatmaps explain
    predicted_class: int  # argmax of the gated probabilities
    probs: np.ndarray  # (C,) gated, calibrated when the model is
    probs_local: np.ndarray
    probs_global: np.ndarray
    gate: float  # 0 = local path only, 1 = global path only
    local_image: np.ndarray
    local_cam: np.ndarray
    local_window_px: tuple[float, float, float, float]  # window the local features are pooled over
    local_mpp: float
    context_image: np.ndarray
    context_cam: np.ndarray
    context_window_px: tuple[float, float, float, float]  # window the global features are pooled over
    cell_window_px: tuple[float, float, float, float]  # the local window, in context pixels
    context_mpp: float

    @property
    def predicted_name(self) -> str:
        return self.class_names[self.predicted_class]

    @property
    def target_name(self) -> str:
        return self.class_names[self.target_class]

    def as_dict(self) -> dict:
        """Return the numbers of the explanation, without images, as a JSON-ready dict."""

        def rounded(values: np.ndarray) -> dict[str, float]:
            return {name: round(float(v), 4) for name, v in zip(self.class_names, values)}

        return {
            "id": self.cell_id,
            "centroid_px": [round(self.centroid_px[0], 2), round(self.centroid_px[1], 2)],
            "predicted_class": self.predicted_name,
            "explained_class": self.target_name,
            "gate": round(self.gate, 4),
            "probabilities": {
                "gated": rounded(self.probs),
                "local": rounded(self.probs_local),
                "global": rounded(self.probs_global),
            },
        }


def grad_cam(feature_map: torch.Tensor, gradient: torch.Tensor, image_hw: tuple[int, int], stride: int) -> np.ndarray:
    """Grad-CAM heatmaps (B, H, W) in [0, 1] from a feature map and the gradient of a score on it.

    ``feature_map`` and ``gradient`` are (B, C, h, w). Pixel ``(i, j)`` of the
    map covers input pixels ``[i * stride, (i + 1) * stride)``, so the map is
    upsampled by ``stride``, then cut or edge-padded to ``image_hw``. A
    heatmap whose ReLU output is zero everywhere stays zero.
    """
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * feature_map).sum(dim=1, keepdim=True))
    h, w = cam.shape[-2:]
    cam = F.interpolate(cam, size=(h * stride, w * stride), mode="bilinear", align_corners=False)
    height, width = image_hw
    pad_bottom, pad_right = max(0, height - h * stride), max(0, width - w * stride)
    if pad_bottom or pad_right:
        cam = F.pad(cam, (0, pad_right, 0, pad_bottom), mode="replicate")
    cam = cam[:, 0, :height, :width]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
    return cam.clamp_(0.0, 1.0).float().numpy()


def _class_index(model: NuClass, target_class: int | str | None) -> int | None:
    if target_class is None:
        return None
    names = model.config.class_names
    if isinstance(target_class, str):
        if target_class not in names:
            raise CellsError(f"class {target_class!r} is not one of the model's classes {names}")
        return names.index(target_class)
    if not 0 <= target_class < len(names):
        raise CellsError(f"class index {target_class} is out of range for the {len(names)} classes {names}")
    return int(target_class)


def _read_cell_images(
    slide, centroids_px: np.ndarray, config, model: NuClass
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Crops, contexts and the cell centres in their pixels, cut on the stride grid like exact mode.

    The same crops give the same probabilities as ``classify --mode exact``.
    """
    from nuclass_qupath.engine.classify import read_cell_crop

    local_scale = config.mpp / slide.mpp
    context_scale = config.context_mpp / slide.mpp
    local_stride = model.local_encoder.stride
    context_stride = model.global_encoder.stride
    locals_, local_centres, contexts, context_centres = [], [], [], []
    for centre in centroids_px:
        image, position = read_cell_crop(
            slide, centre, local_scale, config.mpp, config.local_crop_px, config.local_margin_px, local_stride
        )
        locals_.append(image)
        local_centres.append(position)
        image, position = read_cell_crop(
            slide, centre, context_scale, config.context_mpp, config.context_encoder_px, config.context_margin_px,
            context_stride,
        )
        contexts.append(image)
        context_centres.append(position)
    return np.stack(locals_), np.array(local_centres), np.stack(contexts), np.array(context_centres)


def _window(centre: np.ndarray, side_px: float) -> tuple[float, float, float, float]:
    half = side_px / 2.0
    return (float(centre[0] - half), float(centre[1] - half), float(centre[0] + half), float(centre[1] + half))


def explain_cells(
    model: NuClass,
    slide,
    centroids_px: np.ndarray,
    *,
    cell_ids: list[str] | None = None,
    target_class: int | str | None = None,
    batch_size: int = 8,
) -> list[Explanation]:
    """Compute Grad-CAM heatmaps of both paths for each cell.

    Parameters
    ----------
    model
        The model to explain; it is put in evaluation mode and not changed.
    slide
        An open :class:`~nuclass_qupath.slides.Slide`.
    centroids_px
        (N, 2) nucleus centroids ``(x, y)`` in QuPath level-0 pixels.
    cell_ids
        One id per cell for titles and file names; by default ``"x<X>_y<Y>"``.
    target_class
        Class (name or index) whose score the heatmaps explain; by default
        each cell's predicted (gated) class.
    batch_size
        Cells per forward and backward pass.

    Returns
    -------
    list[Explanation]
        One per cell, in input order.

    Raises
    ------
    CellsError
        If a centroid lies outside the slide, the ids do not match the
        centroids, or ``target_class`` is not a class of the model.
    """
    from nuclass_qupath.cells.table import CellTable
    from nuclass_qupath.engine.classify import check_centroids

    centroids_px = np.asarray(centroids_px, dtype=np.float64).reshape(-1, 2)
    if cell_ids is None:
        cell_ids = [f"x{x:.0f}_y{y:.0f}" for x, y in centroids_px]
    if len(cell_ids) != len(centroids_px):
        raise CellsError(f"got {len(cell_ids)} cell ids for {len(centroids_px)} centroids; pass one id per cell")
    check_centroids(CellTable.from_points(centroids_px, ids=list(cell_ids)), slide)
    target_index = _class_index(model, target_class)
    model.eval()

    explanations: list[Explanation] = []
    for start in range(0, len(centroids_px), max(1, batch_size)):
        stop = min(start + max(1, batch_size), len(centroids_px))
        explanations += _explain_batch(model, slide, centroids_px[start:stop], cell_ids[start:stop], target_index)
    logger.info("computed Grad-CAM of %d cells (local and global paths)", len(explanations))
    return explanations


def _explain_batch(model: NuClass, slide, centroids_px: np.ndarray, cell_ids: list[str], target_index: int | None) -> list[Explanation]:
    cfg = model.config
    local_images, local_centres, context_images, context_centres = _read_cell_images(slide, centroids_px, cfg, model)

    # Each hook replaces the encoder's output with a detached leaf that
    # requires grad, so the backward pass stops at the feature map.
    feature_maps: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(module, inputs, output):
            leaf = output.detach().requires_grad_(True)
            feature_maps[name] = leaf
            return leaf

        return hook

    handles = [
        model.local_encoder.register_forward_hook(capture("local")),
        model.global_encoder.register_forward_hook(capture("global")),
    ]
    try:
        with torch.enable_grad():
            output = model(
                torch.from_numpy(local_images).permute(0, 3, 1, 2),
                torch.from_numpy(context_images).permute(0, 3, 1, 2),
                torch.from_numpy(local_centres).float(),
                torch.from_numpy(context_centres).float(),
            )
            predicted = output.probs.argmax(dim=1)
            target = predicted if target_index is None else torch.full_like(predicted, target_index)
            # Cells of a batch do not interact in eval mode, so the gradient of
            # the summed scores is each cell's own gradient.
            local_score = output.logits_local.gather(1, target[:, None]).sum()
            global_score = output.logits_global.gather(1, target[:, None]).sum()
            (local_grad,) = torch.autograd.grad(local_score, feature_maps["local"], retain_graph=True)
            (global_grad,) = torch.autograd.grad(global_score, feature_maps["global"])
    finally:
        for handle in handles:
            handle.remove()
    local_cams = grad_cam(feature_maps["local"].detach(), local_grad, local_images.shape[1:3], model.local_encoder.stride)
    context_cams = grad_cam(
        feature_maps["global"].detach(), global_grad, context_images.shape[1:3], model.global_encoder.stride
    )

    cell_side_in_context = cfg.local_crop_px * cfg.mpp / cfg.context_mpp
    results = []
    for i, cell_id in enumerate(cell_ids):
        results.append(
            Explanation(
                cell_id=str(cell_id),
                centroid_px=(float(centroids_px[i, 0]), float(centroids_px[i, 1])),
                class_names=list(cfg.class_names),
                target_class=int(target[i]),
                predicted_class=int(predicted[i]),
                probs=output.probs[i].detach().float().numpy(),
                probs_local=output.probs_local[i].detach().float().numpy(),
                probs_global=output.probs_global[i].detach().float().numpy(),
                gate=float(output.gate[i].detach()),
                local_image=local_images[i],
                local_cam=local_cams[i],
                local_window_px=_window(local_centres[i], cfg.local_crop_px),
                local_mpp=cfg.mpp,
                context_image=context_images[i],
                context_cam=context_cams[i],
                context_window_px=_window(context_centres[i], cfg.context_encoder_px),
                cell_window_px=_window(context_centres[i], cell_side_in_context),
                context_mpp=cfg.context_mpp,
            )
        )
    return results


# Panels --------------------------------------------------------------------------------


def _draw_window(ax, window: tuple[float, float, float, float], color: str, style: str, label: str) -> None:
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    x0, y0, x1, y1 = window
    # Pixel (i, j) of an image is drawn centred on (j, i), so pixel edges lie at -0.5.
    rectangle = Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor=color,
                          linestyle=style, linewidth=1.6, label=label)
    # A dark outline keeps the line visible on white glass.
    rectangle.set_path_effects([patheffects.withStroke(linewidth=3.0, foreground="black", alpha=0.6)])
    ax.add_patch(rectangle)


def _overlay(ax, image: np.ndarray, cam: np.ndarray, title: str) -> None:
    ax.imshow(image)
    # Opacity grows with the heatmap, so tissue stays visible where it is low.
    ax.imshow(cam, cmap=CAM_COLORMAP, alpha=CAM_MAX_ALPHA * np.sqrt(cam), vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def explanation_figure(explanation: Explanation, class_colors: list[tuple[int, int, int]] | None = None):
    """Draw one panel: crop and context with their Grad-CAM overlays, and the class probabilities."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    e = explanation
    figure = Figure(figsize=PANEL_SIZE_IN, dpi=PANEL_DPI, layout="constrained")
    grid = figure.add_gridspec(1, 4, width_ratios=(1, 1, 0.05, 1.35))

    ax_local = figure.add_subplot(grid[0, 0])
    _overlay(ax_local, e.local_image, e.local_cam, f"Local path: crop at {e.local_mpp:.2f} µm/px")
    _draw_window(ax_local, e.local_window_px, "white", "--", "pooled window")
    cx = (e.local_window_px[0] + e.local_window_px[2]) / 2
    cy = (e.local_window_px[1] + e.local_window_px[3]) / 2
    ax_local.plot([cx], [cy], marker="+", color="white", markersize=12, markeredgewidth=1.5)
    ax_local.legend(loc="lower left", fontsize=7, framealpha=0.7)

    ax_context = figure.add_subplot(grid[0, 1])
    _overlay(ax_context, e.context_image, e.context_cam, f"Global path: context at {e.context_mpp:.2f} µm/px")
    _draw_window(ax_context, e.context_window_px, "white", "--", "pooled window")
    _draw_window(ax_context, e.cell_window_px, "cyan", "-", "local crop")
    ax_context.legend(loc="lower left", fontsize=7, framealpha=0.7)

    scale = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=CAM_COLORMAP)
    colorbar = figure.colorbar(scale, cax=figure.add_subplot(grid[0, 2]))
    colorbar.set_label(f"Grad-CAM of '{e.target_name}' (relative)", fontsize=9)

    ax_bars = figure.add_subplot(grid[0, 3])
    n = len(e.class_names)
    positions = np.arange(n)
    height = 0.26
    series = (("local", e.probs_local, "#8fb3d9"), ("global", e.probs_global, "#d9b38f"), ("gated", e.probs, "#444444"))
    for k, (label, values, color) in enumerate(series):
        ax_bars.barh(positions + (k - 1) * height, values, height=height, color=color, label=label)
    ax_bars.set_yticks(positions, e.class_names, fontsize=9)
    if class_colors:
        for tick, color in zip(ax_bars.get_yticklabels(), class_colors):
            tick.set_color(tuple(c / 255 * 0.8 for c in color))
    ax_bars.invert_yaxis()
    ax_bars.set_xlim(0, 1)
    ax_bars.set_xlabel("probability")
    ax_bars.set_title(f"Class probabilities; gate {e.gate:.2f} (0 = local only, 1 = global only)", fontsize=10)
    ax_bars.legend(loc="lower right", fontsize=8)

    title = f"Cell {e.cell_id}: predicted {e.predicted_name} (p = {e.probs[e.predicted_class]:.2f})"
    if e.target_class != e.predicted_class:
        title += f"; heatmaps explain '{e.target_name}'"
    figure.suptitle(title, fontsize=12)
    return figure


def panel_file_name(cell_id: str) -> str:
    """File name of a cell's panel: ``cell_<id>.png`` with characters other than letters, digits, ``.-_`` replaced."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in cell_id)
    return f"cell_{safe}.png"


def write_explanation_panel(
    explanation: Explanation, path: str | Path, class_colors: list[tuple[int, int, int]] | None = None
) -> Path:
    """Write the panel of ``explanation`` as a PNG of 1600 x 480 pixels, atomically."""
    figure = explanation_figure(explanation, class_colors)
    path = Path(path)
    with atomic_open(path, "wb") as f:
        figure.savefig(f, format="png", dpi=PANEL_DPI)
    return path


def panel_size_px() -> tuple[int, int]:
    """(width, height) of a panel PNG in pixels."""
    return (round(PANEL_SIZE_IN[0] * PANEL_DPI), round(PANEL_SIZE_IN[1] * PANEL_DPI))


__all__ = [
    "Explanation",
    "explain_cells",
    "explanation_figure",
    "grad_cam",
    "panel_file_name",
    "panel_size_px",
    "write_explanation_panel",
]

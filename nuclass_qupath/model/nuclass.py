"""The NuClass dual-path module.

Both paths share one design: an encoder turns an image into a feature map, and
each cell's feature is pooled from that map over a window centred on the cell.
The local path pools a ``local_crop_px`` window of the image at ``mpp``; the
global path pools a ``context_px`` window of the image at ``context_mpp``, with
a Gaussian centred on the cell so that it knows which cell it is asked about.

Because pooling works on any feature map, the same function classifies one cell
from its own crop (the exact mode, and how training sees cells) or many cells
from one shared map of a slide region (the fast mode). Only the zero padding of
the convolutions at the crop border differs between the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from nuclass_qupath.model.backbones import FeatureEncoder
from nuclass_qupath.model.config import ModelConfig

EPS = 1e-7


class CellPool(nn.Module):
    """Pool a (K, 2C) feature per cell from a feature map.

    ``boxes`` are (K, 5) rows ``(batch_index, x1, y1, x2, y2)`` in pixels of
    the encoder's input image. A ``grid`` × ``grid`` lattice of bilinear samples
    covers each box; the result is the Gaussian-weighted mean (centred on the
    box centre, ``sigma_px`` in input pixels) concatenated with the plain mean.
    """

    def __init__(self, grid: int, window_px: float, sigma_px: float) -> None:
        super().__init__()
        self.grid = grid
        offsets = ((torch.arange(grid, dtype=torch.float32) + 0.5) / grid - 0.5) * window_px
        dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
        weights = torch.exp(-(dx**2 + dy**2) / (2 * sigma_px**2))
        self.register_buffer("weights", (weights / weights.sum()).reshape(1, 1, grid, grid), persistent=False)

    def forward(self, feature_map: torch.Tensor, boxes: torch.Tensor, stride: int) -> torch.Tensor:
        samples = roi_align(
            feature_map,
            boxes.to(feature_map.dtype),
            output_size=self.grid,
            spatial_scale=1.0 / stride,
            sampling_ratio=2,
            aligned=True,
        )
        centred = (samples * self.weights.to(samples.dtype)).sum(dim=(2, 3))
        uniform = samples.mean(dim=(2, 3))
        return torch.cat([centred, uniform], dim=1)


def uncertainty_features(probs: torch.Tensor) -> torch.Tensor:
    """Return (N, 3): max probability, entropy normalised to [0, 1], and top-2 margin."""
    n_classes = probs.shape[1]
    top2 = probs.topk(2, dim=1).values
    entropy = -(probs * (probs + EPS).log()).sum(dim=1) / torch.log(torch.tensor(float(n_classes)))
    return torch.stack([top2[:, 0], entropy, top2[:, 0] - top2[:, 1]], dim=1)


@dataclass
class NuClassOutput:
    """Per-cell outputs. Probabilities are calibrated when the model was asked to be."""

    logits_local: torch.Tensor
    logits_global: torch.Tensor
    gate: torch.Tensor
    probs_local: torch.Tensor
    probs_global: torch.Tensor
    probs: torch.Tensor  # the gated mixture


class NuClass(nn.Module):
    """Local (morphology) and global (context) paths mixed by a learnable per-cell gate."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        n_classes = len(config.classes)
        context_scale = config.context_px / config.context_encoder_px

        self.local_encoder = FeatureEncoder(config.local_backbone, config.local_feature_index)
        self.global_encoder = FeatureEncoder(config.global_backbone, config.global_feature_index)
        self.local_pool = CellPool(config.pool_grid, config.local_crop_px, config.local_sigma_px)
        self.global_pool = CellPool(
            config.pool_grid, config.context_encoder_px, config.global_sigma_px / context_scale
        )

        self.local_proj = nn.Sequential(nn.Linear(2 * self.local_encoder.channels, config.embed_dim), nn.GELU())
        self.global_proj = nn.Sequential(nn.Linear(2 * self.global_encoder.channels, config.embed_dim), nn.GELU())
        self.local_head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.embed_dim, n_classes))
        self.global_head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(config.embed_dim, n_classes))
        # Gate input: both paths' features and their uncertainty (3 numbers each).
        self.gate = nn.Sequential(
            nn.Linear(2 * config.embed_dim + 6, config.gate_hidden),
            nn.GELU(),
            nn.Linear(config.gate_hidden, 1),
        )

        mean = torch.tensor(config.normalization.mean).reshape(1, 3, 1, 1)
        std = torch.tensor(config.normalization.std).reshape(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.calibrated = True

    # Preprocessing ---------------------------------------------------------

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Turn (B, 3, H, W) uint8 RGB into the encoder's normalised float input."""
        images = images_uint8.float().div_(255.0)
        return (images - self.pixel_mean) / self.pixel_std

    # The two paths -----------------------------------------------------------

    def local_features(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Features (K, embed_dim) of cells in normalised images at ``mpp``; boxes are crop windows."""
        feature_map = self.local_encoder(images)
        return self.local_proj(self.local_pool(feature_map, boxes, self.local_encoder.stride))

    def global_features(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Features (K, embed_dim) of cells in normalised images at ``context_mpp``; boxes are context windows."""
        feature_map = self.global_encoder(images)
        return self.global_proj(self.global_pool(feature_map, boxes, self.global_encoder.stride))

    def combine(self, local_feats: torch.Tensor, global_feats: torch.Tensor) -> NuClassOutput:
        """Classify cells from their two path features and mix the paths with the gate."""
        logits_local = self.local_head(local_feats)
        logits_global = self.global_head(global_feats)
        probs_local = logits_local.softmax(dim=1)
        probs_global = logits_global.softmax(dim=1)
        # The gate is trained on uncalibrated probabilities, so it keeps seeing them.
        gate_input = torch.cat(
            [
                local_feats,
                global_feats,
                uncertainty_features(probs_local.detach()),
                uncertainty_features(probs_global.detach()),
            ],
            dim=1,
        )
        gate = torch.sigmoid(self.gate(gate_input)).squeeze(1)
        mixture = (1 - gate[:, None]) * probs_local + gate[:, None] * probs_global

        if self.calibrated and not self.training:
            t = self.config.temperatures
            probs_local = (logits_local / t.local).softmax(dim=1)
            probs_global = (logits_global / t.global_).softmax(dim=1)
            # Temperature on the mixture's log-probabilities keeps its argmax.
            mixture = ((mixture + EPS).log() / t.mixture).softmax(dim=1)
        return NuClassOutput(logits_local, logits_global, gate, probs_local, probs_global, mixture)

    def forward(
        self,
        local_images: torch.Tensor,
        context_images: torch.Tensor,
        local_centres_px: torch.Tensor | None = None,
        context_centres_px: torch.Tensor | None = None,
    ) -> NuClassOutput:
        """Classify one cell per image pair: uint8 (B, 3, H, W) images that hold the cells' windows.

        ``local_images`` are ``local_crop_px`` squares at ``mpp`` plus
        ``local_margin_px`` on each side; ``context_images`` are
        ``context_encoder_px`` squares at ``context_mpp`` plus
        ``context_margin_px``. Each cell's windows are centred on
        ``*_centres_px`` (B, 2), by default the image centres; training and
        the engine pass the cell's position in a crop that starts on the
        encoder's stride grid.
        """
        cfg = self.config
        n = local_images.shape[0]
        batch_index = torch.arange(n, dtype=torch.float32, device=local_images.device)
        if local_centres_px is None:
            local_centres_px = image_centres(n, local_images.shape[-1], local_images.device)
        if context_centres_px is None:
            context_centres_px = image_centres(n, context_images.shape[-1], context_images.device)
        local_boxes = centred_boxes(batch_index, local_centres_px, cfg.local_crop_px)
        context_boxes = centred_boxes(batch_index, context_centres_px, cfg.context_encoder_px)
        local_feats = self.local_features(self.normalize(local_images), local_boxes)
        global_feats = self.global_features(self.normalize(context_images), context_boxes)
        return self.combine(local_feats, global_feats)


def image_centres(n: int, size_px: int, device: torch.device | None = None) -> torch.Tensor:
    """Centres (n, 2) of ``size_px`` square images, in their pixel coordinates."""
    return torch.full((n, 2), size_px / 2.0, device=device)


def full_image_boxes(n: int, size_px: int, device: torch.device | None = None) -> torch.Tensor:
    """Boxes (n, 5) covering each whole ``size_px`` square image of a batch."""
    boxes = torch.zeros(n, 5, device=device)
    boxes[:, 0] = torch.arange(n, device=device, dtype=torch.float32)
    boxes[:, 3] = size_px
    boxes[:, 4] = size_px
    return boxes


def centred_boxes(batch_index: torch.Tensor, centres_px: torch.Tensor, size_px: float) -> torch.Tensor:
    """Boxes (K, 5) of side ``size_px`` centred on ``centres_px`` (K, 2) in one image's pixels."""
    half = size_px / 2.0
    return torch.cat(
        [batch_index.float()[:, None], centres_px - half, centres_px + half], dim=1
    )


def nuclass_loss(
    output: NuClassOutput,
    targets: torch.Tensor,
    *,
    gamma: float,
    sample_weight: torch.Tensor | None = None,
    terms: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Uncertainty-guided NuClass loss.

    ``terms`` weights (mixture, local, global). The global path's per-cell
    cross-entropy is multiplied by ``(1 - p_local(true class)) ** gamma``
    (without gradient), so it learns where the local path is unsure.
    ``sample_weight`` (N,) scales every cell, e.g. by label confidence.
    """
    if sample_weight is None:
        sample_weight = torch.ones_like(targets, dtype=torch.float32)
    norm = sample_weight.sum().clamp_min(EPS)

    ce_mix = F.nll_loss((output.probs + EPS).log(), targets, reduction="none")
    ce_local = F.cross_entropy(output.logits_local, targets, reduction="none")
    ce_global = F.cross_entropy(output.logits_global, targets, reduction="none")
    p_true_local = output.logits_local.detach().softmax(dim=1).gather(1, targets[:, None]).squeeze(1)
    global_weight = (1.0 - p_true_local).clamp_min(0.0) ** gamma

    mix = (ce_mix * sample_weight).sum() / norm
    local = (ce_local * sample_weight).sum() / norm
    glob = (ce_global * global_weight * sample_weight).sum() / norm
    total = terms[0] * mix + terms[1] * local + terms[2] * glob
    parts = {
        "mixture": float(mix.detach()),
        "local": float(local.detach()),
        "global": float(glob.detach()),
        "global_weight": float(global_weight.mean()),
    }
    return total, parts

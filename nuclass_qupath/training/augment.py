"""Augmentation for H&E crops, applied to whole batches of uint8 tensors.

A cell's crop and context each come with the cell's centre in their pixels.
Right-angle rotations and flips move the centre with the pixels. Both crops
start on the encoder's stride grid and their sides are multiples of the
stride, so a rotated or flipped crop is again a crop on that grid, one the
engine could read. Stain variation between
labs is modelled in optical density space with the Ruifrok-Johnston H&E
vectors (scikit-image's ``rgb2hed`` matrix): each image's haematoxylin,
eosin and residual channels are scaled and shifted slightly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rows: haematoxylin, eosin, DAB/residual optical-density vectors (Ruifrok & Johnston 2001).
_HED_FROM_RGB_INV = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)


def _stain_matrices() -> tuple[torch.Tensor, torch.Tensor]:
    rgb_from_hed = _HED_FROM_RGB_INV / _HED_FROM_RGB_INV.norm(dim=1, keepdim=True)
    return rgb_from_hed, torch.linalg.inv(rgb_from_hed)


def hed_jitter(images: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Perturb stains of uint8 (B, 3, H, W) images: OD_hed * alpha + beta, per image and channel."""
    rgb_from_hed, hed_from_rgb = _stain_matrices()
    x = images.float().clamp_min(1.0) / 255.0
    od = -torch.log(x)  # (B, 3, H, W)
    hed = torch.einsum("bchw,cd->bdhw", od, hed_from_rgb)
    hed = hed * alpha[:, :, None, None] + beta[:, :, None, None]
    od = torch.einsum("bdhw,dc->bchw", hed, rgb_from_hed)
    return (torch.exp(-od) * 255.0).clamp(0, 255).round().to(torch.uint8)


def rotate_flip_centres(centres_px: torch.Tensor, size_px: int, flip: bool, quarter_turns: int) -> torch.Tensor:
    """Move (2,) ``(x, y)`` centres of a ``size_px`` square image as :func:`rotate_flip` moves its pixels.

    Pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``, so a horizontal flip
    maps ``x`` to ``size_px - x``, and one quarter turn of ``torch.rot90``
    (counter-clockwise on screen) maps ``(x, y)`` to ``(y, size_px - x)``.
    """
    x, y = centres_px[..., 0], centres_px[..., 1]
    if flip:
        x = size_px - x
    for _ in range(quarter_turns % 4):
        x, y = y, size_px - x
    return torch.stack([x, y], dim=-1)


def rotate_flip(image: torch.Tensor, flip: bool, quarter_turns: int) -> torch.Tensor:
    """Flip a (..., H, W) image horizontally if ``flip``, then rotate it by ``quarter_turns`` with ``torch.rot90``."""
    if flip:
        image = image.flip(-1)
    return torch.rot90(image, quarter_turns, dims=(-2, -1))


@dataclass
class AugmentedPair:
    """A batch of augmented uint8 (B, 3, H, W) crops and contexts with their float32 (B, 2) cell centres."""

    local: torch.Tensor
    context: torch.Tensor
    local_centres_px: torch.Tensor
    context_centres_px: torch.Tensor


def augment_pair(
    local: torch.Tensor,
    context: torch.Tensor,
    local_centres_px: torch.Tensor,
    context_centres_px: torch.Tensor,
    generator: torch.Generator,
    *,
    stain_sigma: float = 0.05,
    brightness: float = 0.08,
) -> AugmentedPair:
    """Randomly rotate, flip and stain-jitter a batch of (crop, context) pairs the same way.

    ``local`` and ``context`` are uint8 (B, 3, H, W) squares; the cell centres
    (B, 2) ``(x, y)`` in their pixels move with the rotations and flips.
    """
    n = local.shape[0]
    rotations = torch.randint(0, 4, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out_local = local.clone()
    out_context = context.clone()
    out_local_centres = local_centres_px.clone().float()
    out_context_centres = context_centres_px.clone().float()
    for i in range(n):
        k, flip = int(rotations[i]), bool(flips[i])
        out_local[i] = rotate_flip(local[i], flip, k)
        out_context[i] = rotate_flip(context[i], flip, k)
        out_local_centres[i] = rotate_flip_centres(out_local_centres[i], local.shape[-1], flip, k)
        out_context_centres[i] = rotate_flip_centres(out_context_centres[i], context.shape[-1], flip, k)

    alpha = 1.0 + stain_sigma * torch.randn(n, 3, generator=generator)
    beta = stain_sigma * torch.randn(n, 3, generator=generator) * 0.2
    out_local = hed_jitter(out_local, alpha, beta)
    out_context = hed_jitter(out_context, alpha, beta)

    gain = 1.0 + brightness * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
    out_local = (out_local.float() * gain).clamp(0, 255).to(torch.uint8)
    out_context = (out_context.float() * gain).clamp(0, 255).to(torch.uint8)
    return AugmentedPair(out_local, out_context, out_local_centres, out_context_centres)

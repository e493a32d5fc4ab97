"""Augmentation for H&E crops, applied to whole batches of uint8 tensors.

A cell's crop and context are centred on the cell, so the same right-angle
rotation and flip keep both centred and consistent. Stain variation between
labs is modelled in optical density space with the Ruifrok-Johnston H&E
vectors (scikit-image's ``rgb2hed`` matrix): each image's haematoxylin,
eosin and residual channels are scaled and shifted slightly.
"""

from __future__ import annotations

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


def augment_pair(
    local: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator,
    *,
    stain_sigma: float = 0.05,
    brightness: float = 0.08,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly rotate, flip and stain-jitter a batch of (crop, context) pairs the same way."""
    n = local.shape[0]
    rotations = torch.randint(0, 4, (n,), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out_local = local.clone()
    out_context = context.clone()
    for i in range(n):
        k = int(rotations[i])
        a, b = local[i], context[i]
        if flips[i]:
            a, b = a.flip(-1), b.flip(-1)
        out_local[i] = torch.rot90(a, k, dims=(-2, -1))
        out_context[i] = torch.rot90(b, k, dims=(-2, -1))

    alpha = 1.0 + stain_sigma * torch.randn(n, 3, generator=generator)
    beta = stain_sigma * torch.randn(n, 3, generator=generator) * 0.2
    out_local = hed_jitter(out_local, alpha, beta)
    out_context = hed_jitter(out_context, alpha, beta)

    gain = 1.0 + brightness * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
    out_local = (out_local.float() * gain).clamp(0, 255).to(torch.uint8)
    out_context = (out_context.float() * gain).clamp(0, 255).to(torch.uint8)
    return out_local, out_context

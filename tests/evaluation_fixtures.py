"""NuCLS tiles as TIFF slides and a tiny model trained on them, for calibration and report tests.

The NuCLS PNG tiles carry no pixel size, and the slide reader opens TIFF, not
PNG, so each tile is rewritten as a striped TIFF with 0.5 µm/px in its
resolution tags. The tiny model keeps ImageNet encoders and trains only the
layers after them, which takes a few seconds on a CPU.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image

from nuclass_qupath.model import ClassSpec, ModelConfig, NuClass, nuclass_loss
from nuclass_qupath.model.backbones import load_imagenet_weights
from nuclass_qupath.model.nuclass import centred_boxes

NUCLS_MPP = 0.5
# Tiles of the NuCLS training split (sorted by name): the tiny model learns
# from "fit" (160 cells) and is calibrated and scored on "holdout" (70 cells).
# Few tiles keep the tests fast.
NUCLS_SETS = {"fit": slice(0, 4), "holdout": slice(4, 6)}
NUCLS_COLORS = [(200, 0, 0), (150, 200, 150), (160, 90, 160), (90, 90, 200)]


def nucls_class_names(nucls_dir: Path) -> list[str]:
    """Class names of the NuCLS labels in label-index order."""
    label_map = yaml.safe_load((nucls_dir / "label_map.yaml").read_text(encoding="utf-8"))
    return [label_map[key] for key in sorted(label_map)]


def write_nucls_tiles(nucls_dir: Path, split: str, tiles: slice, out_dir: Path) -> tuple[Path, Path]:
    """Write the ``tiles`` of a NuCLS ``split`` (sorted by name) as TIFF, with CSV labels that name the classes.

    Returns the image and label folders under ``out_dir``.
    """
    names = nucls_class_names(nucls_dir)
    images_dir = out_dir / "images"
    labels_dir = out_dir / "labels"
    images_dir.mkdir(parents=True)
    labels_dir.mkdir(parents=True)
    resolution = (1e4 / NUCLS_MPP, 1e4 / NUCLS_MPP)
    for png in sorted((nucls_dir / split / "images").glob("*.png"))[tiles]:
        pixels = np.asarray(Image.open(png).convert("RGB"))
        tifffile.imwrite(
            images_dir / f"{png.stem}.tif", pixels, photometric="rgb", metadata=None,
            resolution=resolution, resolutionunit="CENTIMETER",
        )
        rows = (nucls_dir / split / "labels" / f"{png.stem}.csv").read_text(encoding="utf-8").split()
        lines = ["x,y,class"]
        for row in rows:
            x, y, label = row.split(",")
            lines.append(f"{x},{y},{names[int(label)]}")
        (labels_dir / f"{png.stem}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return images_dir, labels_dir


def tiny_config(class_names: list[str], **overrides) -> ModelConfig:
    values = dict(
        model_id="tiny-nucls",
        classes=[ClassSpec(name=name, color=color) for name, color in zip(class_names, NUCLS_COLORS)],
        mpp=NUCLS_MPP,
        local_crop_px=64,
        context_px=256,
        context_encoder_px=64,
        local_feature_index=2,
        global_feature_index=2,
        embed_dim=16,
        gate_hidden=8,
        local_sigma_px=8.0,
        global_sigma_px=32.0,
        # Narrower margins than the defaults make every forward pass cheaper.
        local_margin_px=16,
        context_margin_px=8,
    )
    values.update(overrides)
    return ModelConfig(**values)


def train_tiny_model(config: ModelConfig, crops, *, steps: int = 80, seed: int = 0) -> NuClass:
    """Build ``config`` with ImageNet encoders and train its projections, heads and gate on ``crops``.

    The encoders stay frozen, so each cell's pooled encoder features are
    computed once and the small layers after them train on those for
    ``steps`` full-batch Adam steps with the NuClass loss.
    """
    torch.manual_seed(seed)
    model = NuClass(config).eval()
    load_imagenet_weights(model.local_encoder)
    load_imagenet_weights(model.global_encoder)
    local = torch.from_numpy(crops.local).permute(0, 3, 1, 2)
    context = torch.from_numpy(crops.context).permute(0, 3, 1, 2)
    index = torch.arange(len(crops), dtype=torch.float32)
    # Pool at each cell's position in its stride-aligned crop, as training does.
    local_boxes = centred_boxes(index, torch.from_numpy(crops.local_centres_px).float(), config.local_crop_px)
    context_boxes = centred_boxes(
        index, torch.from_numpy(crops.context_centres_px).float(), config.context_encoder_px
    )
    with torch.no_grad():
        pooled_local = model.local_pool(
            model.local_encoder(model.normalize(local)), local_boxes, model.local_encoder.stride
        )
        pooled_global = model.global_pool(
            model.global_encoder(model.normalize(context)), context_boxes, model.global_encoder.stride
        )

    trainable = [
        p for name, p in model.named_parameters() if not name.startswith(("local_encoder", "global_encoder"))
    ]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    targets = torch.from_numpy(crops.labels)
    model.train()
    for _ in range(steps):
        output = model.combine(model.local_proj(pooled_local), model.global_proj(pooled_global))
        loss, _ = nuclass_loss(output, targets, gamma=config.gamma)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@functools.cache
def _nucls_set_cached(nucls_dir: str, name: str, work_dir: str):
    from nuclass_qupath.training.dataset import build_crop_set, pair_images_and_labels

    tiles = NUCLS_SETS[name]
    images_dir, labels_dir = write_nucls_tiles(Path(nucls_dir), "train", tiles, Path(work_dir) / name)
    config = tiny_config(nucls_class_names(Path(nucls_dir)))
    crops = build_crop_set(pair_images_and_labels(images_dir, labels_dir), config)
    return images_dir, labels_dir, crops


def nucls_set(nucls_dir: Path, name: str, work_dir: Path):
    """Return ``(images_dir, labels_dir, CropSet)`` of the ``"fit"`` or ``"holdout"`` NuCLS tiles.

    The crops are cut with :func:`tiny_config`. Results are cached per
    process, so test modules that pass the same ``work_dir`` share them.
    """
    return _nucls_set_cached(str(nucls_dir), name, str(work_dir))


@functools.cache
def _trained_state_cached(nucls_dir: str, work_dir: str):
    _, _, crops = _nucls_set_cached(nucls_dir, "fit", work_dir)
    model = train_tiny_model(tiny_config(nucls_class_names(Path(nucls_dir))), crops)
    return {k: v.clone() for k, v in model.state_dict().items()}


def trained_tiny_model(nucls_dir: Path, work_dir: Path) -> NuClass:
    """A fresh copy of the tiny model trained on the ``"fit"`` tiles (trained once per process)."""
    state = _trained_state_cached(str(nucls_dir), str(work_dir))
    model = NuClass(tiny_config(nucls_class_names(nucls_dir)))
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="session")
def nucls_dir(shared_data: Path) -> Path:
    return shared_data / "nucls"


@pytest.fixture(scope="session")
def nucls_work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per test session for the converted tiles, so every test module hits the same cache."""
    return tmp_path_factory.getbasetemp() / "nucls-tiles"

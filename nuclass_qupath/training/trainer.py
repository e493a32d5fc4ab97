"""Training loop: class-balanced sampling, H&E augmentation, staged or joint schedules.

The staged schedule follows the method: the local path first (cross-entropy
on its own head), then the global path with the uncertainty-weighted loss while
the local path is frozen, then the gate alone on the mixture. The joint
schedule trains everything at once on the full loss.

Examples come from any :class:`~nuclass_qupath.training.dataset.CropSource`:
crops in memory or a zarr store read batch by batch, the next batch being read
in a background thread while the model trains on the current one. Every batch
carries each cell's centre in its crops, and the model pools the cell's
features around those centres, as the engine's exact mode does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from nuclass_qupath.evaluation.metrics import ClassificationReport, classification_report
from nuclass_qupath.model.config import ModelConfig
from nuclass_qupath.model.io import save_model
from nuclass_qupath.model.nuclass import NuClass, nuclass_loss
from nuclass_qupath.training.augment import augment_pair
from nuclass_qupath.training.crops import CropBatch
from nuclass_qupath.training.dataset import CropSource

logger = logging.getLogger(__name__)

# Loss terms (mixture, local, global) and trainable parts per stage. Parts not
# listed are frozen: no gradient, and in eval mode so that their batch-norm
# statistics and dropout do not change either.
STAGES = {
    "local": ((0.0, 1.0, 0.0), ("local_encoder", "local_proj", "local_head")),
    "global": ((0.0, 0.0, 1.0), ("global_encoder", "global_proj", "global_head")),
    "gate": ((1.0, 0.0, 0.0), ("gate",)),
    "joint": ((1.0, 1.0, 1.0), None),
}


@dataclass
class TrainOptions:
    """Settings of one training run."""

    schedule: Literal["joint", "staged"] = "joint"
    epochs: int = 10  # joint: all epochs; staged: split 40/40/20 between local, global and gate
    # Staged only: epochs of the local, global and gate stages, instead of splitting ``epochs``.
    stage_epochs: tuple[int, int, int] | None = None
    batch_size: int = 32
    lr: float = 1e-3
    encoder_lr_scale: float = 0.3  # encoders learn slower than the new heads
    weight_decay: float = 1e-4
    init: Literal["imagenet", "random"] = "imagenet"
    frozen_blocks: int = 2  # early encoder blocks kept at their ImageNet weights; saves time on a CPU
    use_label_confidence: bool = False
    seed: int = 0
    threads: int | None = None


@dataclass
class TrainResult:
    model: NuClass
    history: list[dict] = field(default_factory=list)
    validation: dict[str, ClassificationReport] = field(default_factory=dict)
    best_epoch: int = -1
    model_path: Path | None = None


def _freeze_early_blocks(model: NuClass, n_blocks: int) -> None:
    for encoder in (model.local_encoder, model.global_encoder):
        body = encoder.body
        for name, module in body.named_children():
            if name in ("conv_stem", "bn1"):
                module.requires_grad_(False)
        blocks = getattr(body, "blocks", None)
        if blocks is not None:
            for block in list(blocks)[:n_blocks]:
                block.requires_grad_(False)


def _stage_plan(options: TrainOptions) -> list[str]:
    if options.schedule == "joint":
        return ["joint"] * options.epochs
    if options.stage_epochs is not None:
        n_local, n_global, n_gate = options.stage_epochs
        if min(n_local, n_global) < 0 or n_gate < 1:
            raise ValueError(
                f"stage epochs must be >= 0 for the local and global stages and >= 1 for the gate, "
                f"got {tuple(options.stage_epochs)}"
            )
        return ["local"] * n_local + ["global"] * n_global + ["gate"] * n_gate
    n_local = max(1, round(options.epochs * 0.4))
    n_global = max(1, round(options.epochs * 0.4))
    n_gate = max(1, options.epochs - n_local - n_global)
    return ["local"] * n_local + ["global"] * n_global + ["gate"] * n_gate


def _make_optimizer(model: NuClass, stage: str, options: TrainOptions) -> torch.optim.Optimizer:
    _, trainable = STAGES[stage]
    for name, child in model.named_children():
        child.requires_grad_(trainable is None or name in trainable)
    _freeze_early_blocks(model, options.frozen_blocks)
    # Gradients left from the previous stage would count in this stage's gradient clipping.
    model.zero_grad(set_to_none=True)
    encoder_params, head_params = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (encoder_params if "encoder" in name else head_params).append(param)
    groups = [{"params": head_params, "lr": options.lr}]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": options.lr * options.encoder_lr_scale})
    return torch.optim.AdamW(groups, weight_decay=options.weight_decay)


def _set_train_mode(model: NuClass, stage: str) -> None:
    """Put the stage's trainable parts in train mode and its frozen parts in eval mode."""
    _, trainable = STAGES[stage]
    model.train()
    for name, child in model.named_children():
        if trainable is not None and name not in trainable:
            child.eval()


def balanced_epoch_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one epoch of indices with every class equally likely, as many as there are cells."""
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    return rng.choice(len(labels), size=len(labels), replace=True, p=weights / weights.sum())


def _prefetched(source: CropSource, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, CropBatch]]:
    """Yield ``(index, source.get_batch(index))`` for each batch, reading the next one in a background thread."""
    if not batches:
        return
    with ThreadPoolExecutor(1) as reader:
        future = reader.submit(source.get_batch, batches[0])
        for i, index in enumerate(batches):
            batch = future.result()
            if i + 1 < len(batches):
                future = reader.submit(source.get_batch, batches[i + 1])
            yield index, batch


def batch_tensors(batch: CropBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return a batch as the model's inputs: uint8 (B, 3, H, W) crops and contexts, float32 (B, 2) centres."""
    return (
        torch.from_numpy(np.ascontiguousarray(batch.local)).permute(0, 3, 1, 2),
        torch.from_numpy(np.ascontiguousarray(batch.context)).permute(0, 3, 1, 2),
        torch.from_numpy(np.ascontiguousarray(batch.local_centres_px, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(batch.context_centres_px, dtype=np.float32)),
    )


def predict_crop_set(model: NuClass, crops: CropSource, batch_size: int = 64, calibrated: bool = True) -> dict[str, np.ndarray]:
    """Run the model on every crop; return probabilities of the mixture and both paths, gates and logits.

    Each cell's features are pooled around its centre in its crops, so the
    outputs equal those of the engine's exact mode on the same cells, up to
    float rounding.
    """
    model.eval()
    previous = model.calibrated
    model.calibrated = calibrated
    keys = ("probs", "probs_local", "probs_global", "gate", "logits_local", "logits_global")
    out: dict[str, list] = {k: [] for k in keys}
    try:
        with torch.inference_mode():
            batches = [np.arange(start, min(start + batch_size, len(crops))) for start in range(0, len(crops), batch_size)]
            for _, batch in _prefetched(crops, batches):
                result = model(*batch_tensors(batch))
                for k in keys:
                    out[k].append(getattr(result, k).float().numpy())
    finally:
        model.calibrated = previous
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}


def evaluate_paths(model: NuClass, crops: CropSource) -> dict[str, ClassificationReport]:
    """Scores of the gated mixture and of each path alone."""
    outputs = predict_crop_set(model, crops)
    names = crops.class_names
    return {
        "gated": classification_report(crops.labels, outputs["probs"], names),
        "local": classification_report(crops.labels, outputs["probs_local"], names),
        "global": classification_report(crops.labels, outputs["probs_global"], names),
    }


def train_model(
    config: ModelConfig,
    train_set: CropSource,
    val_set: CropSource | None,
    out_dir: Path,
    options: TrainOptions | None = None,
    *,
    progress: Callable[[Iterable, str, int], Iterable] | None = None,
    initial_model: NuClass | None = None,
) -> TrainResult:
    """Train a model on ``train_set``; save a checkpoint per epoch and the best one as ``model``.

    ``train_set`` and ``val_set`` are in-memory crops
    (:class:`~nuclass_qupath.training.dataset.CropSet`) or a
    store's cells (:class:`~nuclass_qupath.training.store.StoreCrops`); both
    must have been cut for ``config``'s geometry, else ModelError is raised.
    The best epoch is the one with the highest validation macro-F1 of the gated
    prediction (the last epoch when there is no validation set). ``progress``
    wraps the batch iterator (``progress(iterable, description, total)``).
    """
    options = options or TrainOptions()
    for source in (train_set, val_set):
        if source is not None:
            source.check_geometry(config)
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    out_dir = Path(out_dir)
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)

    model = initial_model or NuClass(config)
    if initial_model is None and options.init == "imagenet":
        from nuclass_qupath.model.backbones import load_imagenet_weights

        load_imagenet_weights(model.local_encoder)
        load_imagenet_weights(model.global_encoder)

    result = TrainResult(model=model)
    plan = _stage_plan(options)
    best_score = -1.0
    optimizer = None
    current_stage = None
    n_batches = max(1, len(train_set) // options.batch_size)
    for epoch, stage in enumerate(plan, start=1):
        if stage != current_stage:
            optimizer = _make_optimizer(model, stage, options)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=plan.count(stage) * n_batches, eta_min=options.lr * 0.05
            )
            current_stage = stage
        terms, _ = STAGES[stage]
        _set_train_mode(model, stage)
        trainable = [p for p in model.parameters() if p.requires_grad]

        order = balanced_epoch_order(train_set.labels, rng)
        batches = [order[i : i + options.batch_size] for i in range(0, n_batches * options.batch_size, options.batch_size)]
        iterator = _prefetched(train_set, batches)
        if progress:
            iterator = progress(iterator, f"epoch {epoch}/{len(plan)} ({stage})", len(batches))
        started = time.perf_counter()
        losses = []
        for index, batch in iterator:
            augmented = augment_pair(*batch_tensors(batch), generator)
            targets = torch.from_numpy(train_set.labels[index])
            weight = torch.from_numpy(train_set.weights[index]) if options.use_label_confidence else None
            output = model(
                augmented.local, augmented.context, augmented.local_centres_px, augmented.context_centres_px
            )
            loss, parts = nuclass_loss(output, targets, gamma=config.gamma, sample_weight=weight, terms=terms)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(trainable, 5.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))

        record = {"epoch": epoch, "stage": stage, "loss": float(np.mean(losses)), "seconds": time.perf_counter() - started}
        if val_set is not None and len(val_set):
            reports = evaluate_paths(model, val_set)
            record.update({f"val_{k}_macro_f1": r.macro_f1 for k, r in reports.items()})
            score = reports["gated"].macro_f1
        else:
            reports = {}
            score = float(epoch)
        result.history.append(record)
        logger.info(
            "epoch %d (%s): loss %.3f, %s, %.0f s",
            epoch,
            stage,
            record["loss"],
            ", ".join(f"{k} {v:.3f}" for k, v in record.items() if k.startswith("val_")) or "no validation set",
            record["seconds"],
        )
        save_model(model, out_dir / "checkpoints" / f"epoch_{epoch:03d}")
        # A staged run is only complete after its gate stage, so earlier stages cannot be "best".
        eligible = options.schedule == "joint" or stage == "gate"
        if eligible and score >= best_score:
            best_score = score
            result.best_epoch = epoch
            result.validation = reports
            result.model_path = save_model(model, out_dir / "model")[0]
    # Return the best model, not the last.
    if result.model_path is not None:
        from nuclass_qupath.model.io import load_model

        result.model = load_model(result.model_path)
    return result

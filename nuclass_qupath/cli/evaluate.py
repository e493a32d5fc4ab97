"""``nuclass-qupath evaluate``: score a model on labelled cells and write an HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path


def _bin_count(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def add_data_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """Add the options that choose labelled cells: --images with --labels, or --store with --groups."""
    source = parser.add_argument_group(f"{what} cells (--images with --labels, or --store)")
    source.add_argument("--images", type=Path, help="folder of images or slides")
    source.add_argument("--labels", type=Path, help="folder of label files named after the images")
    source.add_argument("--label-map", type=Path, help="YAML mapping raw labels to class names, e.g. '0: Tumor'")
    source.add_argument("--mpp", type=float, help="µm/px of images without a pixel size in their metadata (PNG tiles)")
    source.add_argument("--store", type=Path, help="training-set store (.zarr) written by build-store")
    source.add_argument("--groups", nargs="+", metavar="NAME", help="slides (or cohorts, see --group-by) of --store to use; default all")
    source.add_argument(
        "--group-by", choices=["slide", "cohort"], default="slide", help="what --groups names (default slide)"
    )


def check_data_arguments(args: argparse.Namespace, what: str) -> None:
    """Raise CellsError unless the arguments choose cells one way: image folders or a store."""
    from nuclass_qupath.errors import CellsError

    if args.store is not None:
        if args.images or args.labels or args.label_map or args.mpp:
            raise CellsError(
                "--images, --labels, --label-map and --mpp choose cells from image folders; "
                "with --store the cells, labels and pixel sizes come from the store"
            )
    elif not (args.images and args.labels):
        raise CellsError(f"choose the {what} cells with --images and --labels, or with --store")
    if args.groups and args.store is None:
        raise CellsError("--groups chooses slides or cohorts of --store; give --store too")


def labelled_crops(args: argparse.Namespace, model, what: str):
    """Return ``(crops, description, record)`` of the labelled cells the arguments choose.

    ``crops`` is a CropSource labelled with the model's classes,
    ``description`` one line for reports, and ``record`` the inputs as a
    JSON-ready dict.
    """
    import numpy as np

    from nuclass_qupath.cli._progress import progress_iter
    from nuclass_qupath.errors import CellsError

    check_data_arguments(args, what)
    if args.store is not None:
        from nuclass_qupath.training.store import open_store

        store = open_store(args.store)
        store.check_geometry(model.config)
        crops = store.crops(group_by=args.group_by, class_names=model.config.class_names)
        if args.groups:
            present = sorted({str(g) for g in crops.groups})
            missing = [name for name in args.groups if name not in present]
            if missing:
                raise CellsError(
                    f"{args.group_by}s {missing} not found in store {args.store}; its {args.group_by}s are {present}"
                )
            crops = crops.subset(np.isin(crops.groups.astype(str), args.groups))
        chosen = ", ".join(args.groups) if args.groups else f"all {args.group_by}s"
        description = f"store {args.store}, {chosen}"
        record = {"store": str(args.store), "group_by": args.group_by, "groups": args.groups}
        return crops, description, record

    from nuclass_qupath.training.dataset import build_crop_set, pair_images_and_labels
    from nuclass_qupath.training.setup import read_label_map

    label_map = read_label_map(args.label_map) if args.label_map else None
    images = pair_images_and_labels(args.images, args.labels)
    crops = build_crop_set(
        images, model.config, mpp=args.mpp, label_map=label_map,
        progress=lambda it: progress_iter(it, "cutting crops", len(images)),
    )
    description = f"images from {args.images}, labels from {args.labels}"
    record = {
        "images": [str(item.image_path) for item in images],
        "labels": [str(item.labels_path) for item in images],
        "mpp": args.mpp,
    }
    return crops, description, record


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a model on labelled cells and write an HTML report with figures",
        description=(
            "Classify the labelled cells in --labels (QuPath GeoJSON or x,y,class CSV named after the images in "
            "--images), or the cells of a training-set store, and score the local path, the global path and the "
            "gated prediction side by side. Writes REPORT_DIR/report.html (self-contained: the figures are "
            "embedded), report.json with the same numbers, and the figures as PNG: reliability.png and "
            "confusion_{local,global,gated}.png."
        ),
    )
    parser.add_argument("--model", type=Path, help="model .safetensors file (default: the bundled demonstration model)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="REPORT_DIR", help="report folder")
    add_data_arguments(parser, "evaluation")
    parser.add_argument("--bins", type=_bin_count, default=15, help="confidence bins of the ECE and reliability diagrams (default 15)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from nuclass_qupath.evaluation.report import PATH_TITLES, evaluate_model, write_report
    from nuclass_qupath.model.io import load_model

    check_data_arguments(args, "evaluation")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    crops, description, record = labelled_crops(args, model, "evaluation")
    print(f"evaluation cells per class: {crops.class_counts()}")

    evaluation = evaluate_model(model, crops, n_bins=args.bins)
    files = write_report(
        evaluation,
        args.output,
        data_description=description,
        extra={"command": "evaluate", "model": str(args.model) if args.model else "bundled", **record},
    )
    for path, title in PATH_TITLES.items():
        report = evaluation.reports[path]
        print(f"{title}: accuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f}, ECE {report.ece:.3f}")
    print(f"report written to {files.html}")
    return 0

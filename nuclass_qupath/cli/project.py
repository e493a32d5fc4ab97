"""``nuclass-qupath project``: classify the cells of every image of a QuPath project."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nuclass_qupath.cli._args import check_input_file, check_output_dir, heatmap_um_type, mpp_type


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "project",
        help="classify the cells of every image of a QuPath project",
        description=(
            "Classify the cells and detections of each image of a QuPath project, one image at a time, and "
            "return classes, 'NuClass: ' measurements and heatmap tiles to QuPath. With QuPath installed "
            "(found by paquo, see PAQUO_QUPATH_DIR) the results are written into the project. Without it, "
            "one <image name>.nuclass.geojson per image is written to the output folder, for "
            "groovy/import_batch_results.groovy to import in QuPath. Exit status: 0 when every image "
            "succeeded, 1 when any failed, 2 for invalid arguments."
        ),
    )

    # What to classify
    parser.add_argument("project", type=Path, help="QuPath project folder or its project.qpproj")
    parser.add_argument("--images", nargs="+", metavar="NAME", help="classify only these images (QuPath image names)")
    parser.add_argument(
        "--annotation-class", metavar="CLASS",
        help="classify only cells inside annotations of this class (as QuPath shows it, e.g. 'Tumor: Positive')",
    )
    parser.add_argument(
        "--detect", action="store_true",
        help="detect nuclei with the built-in detector in images that have no cells or detections",
    )

    # How to classify
    parser.add_argument(
        "--heatmap-um", type=heatmap_um_type(), metavar="UM",
        help="also write heatmap tiles of this side in µm (1 to 10000)",
    )
    parser.add_argument("--model", type=Path, help="model .safetensors file (default: the bundled demonstration model)")
    parser.add_argument(
        "--resume", action="store_true", help="skip images that already have results of the same model id"
    )

    # Where images and results are
    parser.add_argument(
        "--image-root", action="append", default=[], metavar="OLD=NEW",
        help="replace the image folder prefix OLD by NEW for images moved after the project was saved (repeatable)",
    )
    parser.add_argument(
        "--mpp", type=mpp_type(),
        help="pixel size in µm/px for images whose slide and project have none (never overrides a stored one)",
    )
    parser.add_argument(
        "--output-dir", type=Path, metavar="DIR",
        help="folder for results files and run metadata (default: PROJECT/nuclass_results)",
    )
    parser.add_argument(
        "--backend", choices=["auto", "paquo", "files"], default="auto",
        help="paquo: write into the project through QuPath; files: write results files for the import script; "
        "auto (default): paquo, or files when no QuPath is installed",
    )
    parser.add_argument(
        "--mode", choices=["fast", "exact"], default="fast",
        help="fast: shared region features (default); exact: one crop per cell, the slow reference",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nuclass_qupath.qupath.batch import parse_image_root
    from nuclass_qupath.qupath.results import default_results_dir

    remap = {}
    for value in args.image_root:
        try:
            old, new = parse_image_root(value)
        except ValueError as exc:
            print(f"nuclass-qupath project: error: --image-root: {exc}", file=sys.stderr)
            return 2
        remap[old] = new
    check_input_file(args.project, "PROJECT")
    if args.model is not None:
        check_input_file(args.model, "--model")
    if args.output_dir is not None:
        check_output_dir(args.output_dir, "--output-dir")
    else:
        check_output_dir(default_results_dir(args.project), "results folder (choose another with --output-dir)")

    from nuclass_qupath.cli._progress import progress_callback
    from nuclass_qupath.qupath.batch import ImageRunResult, ProjectBatch, ProjectRunRequest, UnknownImageError

    request = ProjectRunRequest(
        project_path=args.project,
        output_dir=args.output_dir,
        image_names=args.images,
        annotation_class=args.annotation_class,
        detect=args.detect,
        heatmap_tile_um=args.heatmap_um,
        model_path=args.model,
        resume=args.resume,
        image_root_remap=remap,
        mpp=args.mpp,
        backend=args.backend,
        mode=args.mode,
        arguments={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
    )
    try:
        # The fallback reason is printed below, so the batch does not log it as well.
        batch = ProjectBatch(request, log_fallback=False)
    except UnknownImageError as exc:
        print(f"nuclass-qupath project: error: {exc}", file=sys.stderr)
        return 2

    def print_result(index: int, total: int, result: ImageRunResult) -> None:
        print(f"[{index}/{total}] {format_result(result)}", flush=True)

    with batch:
        if batch.fallback_reason:
            print(f"nuclass-qupath project: {batch.fallback_reason}", flush=True)
        report = batch.run(progress_factory=progress_callback, on_result=print_result)

    classified = sum(r.status == "classified" for r in report.results)
    skipped = sum(r.status == "skipped" for r in report.results)
    summary = f"{len(report.results)} images: {classified} classified, {skipped} skipped, {report.n_failed} failed"
    if classified == 0:
        summary += "; no new results written"
    elif report.backend == "files":
        summary += f"; results in {report.output_dir}"
    else:
        summary += "; results saved in the project"
    print(summary)
    return 1 if report.n_failed else 0


def format_result(result) -> str:
    """Return the one-line summary of an image: cells, counts per class and seconds, or the failure."""
    if result.status == "failed":
        return f"{result.image_name}: FAILED: {result.message}"
    if result.status == "skipped":
        return f"{result.image_name}: skipped, {result.message} ({result.seconds:.1f} s)"
    counts = ", ".join(f"{name} {count}" for name, count in result.class_counts.items())
    return f"{result.image_name}: {result.n_cells} cells ({counts}), {result.seconds:.1f} s"

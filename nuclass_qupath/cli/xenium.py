"""``nuclass-qupath xenium-labels`` and ``xenium-info``: Xenium runs as training labels."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from nuclass_qupath.cli._args import check_distinct_outputs, check_input_file, check_output_file, float_range, int_range, mpp_type

logger = logging.getLogger(__name__)


# Every output file is written through nuclass_qupath._atomic.
ATOMIC_OUTPUT = True


def register(subparsers) -> None:
    labels = subparsers.add_parser(
        "xenium-labels",
        help="type the cells of a Xenium run by marker genes and place them on the H&E",
        description=(
            "Read the Xenium output folder BUNDLE, map its cells onto the H&E slide of the same section with "
            "10x's image-alignment CSV, type each cell by the marker genes of --panel, and write a label table "
            "(cell_id, x_px, y_px in level-0 slide pixels, class, confidence, reason) and a summary JSON."
        ),
    )
    labels.add_argument("bundle", type=Path, help="Xenium output folder (contains experiment.xenium)")
    labels.add_argument("--he", type=Path, required=True, help="H&E slide of the same section")
    labels.add_argument(
        "--alignment",
        type=Path,
        required=True,
        help="10x image-alignment CSV (*_he_imagealignment.csv): H&E px to Xenium morphology px",
    )
    labels.add_argument("--panel", type=Path, help="marker panel YAML (default: the bundled panel)")
    labels.add_argument("-o", "--output", type=Path, required=True, help="label table to write (.csv)")
    labels.add_argument("--summary", type=Path, help="summary JSON (default: OUTPUT with .summary.json)")
    labels.add_argument("--mpp", type=mpp_type(), help="slide pixel size in µm/px; overrides the slide's metadata")
    labels.add_argument(
        "--min-transcripts", type=int_range(0), default=10, help="gene transcripts a cell needs to be typed (default 10)"
    )
    labels.add_argument(
        "--min-confidence", type=float_range(0.0, 1.0), default=0.5, help="confidence (0-1) a label needs (default 0.5)"
    )
    labels.add_argument("--qv-min", type=float_range(0.0), default=20.0, help="transcript quality cut when counting (default 20)")
    labels.add_argument("--n-neighbors", type=int_range(1), default=15, help="expression neighbours per cell (default 15)")
    labels.add_argument("--organ", action="append", dest="organs", help="use only the classes of this organ; repeatable")
    labels.add_argument("--leiden", action="store_true", help="type Leiden clusters instead of single cells")
    labels.add_argument("--leiden-resolution", type=float_range(0.0, min_inclusive=False), default=1.0, help="Leiden resolution (default 1.0)")
    labels.add_argument(
        "--max-off-slide",
        type=float_range(0.0, 1.0),
        default=0.01,
        help="largest share of cells allowed to map outside the slide before the alignment is rejected (default 0.01)",
    )
    labels.add_argument(
        "--skip-registration-check",
        action="store_true",
        help="do not detect H&E nuclei to measure how well the Xenium nuclei land on them",
    )
    labels.set_defaults(func=run_labels)

    info = subparsers.add_parser(
        "xenium-info",
        help="list what a Xenium output folder contains and how it will be read",
        description="Read the Xenium output folder BUNDLE and print its files, cells, genes and controls as JSON.",
    )
    info.add_argument("bundle", type=Path, help="Xenium output folder (contains experiment.xenium)")
    info.add_argument("--qv-min", type=float_range(0.0), default=20.0, help="transcript quality cut when counting (default 20)")
    info.set_defaults(func=run_info)


def summary_path(args: argparse.Namespace) -> Path:
    """Return ``--summary``, or by default OUTPUT with ``.summary.json`` in place of its suffix."""
    return args.summary or args.output.with_name(args.output.stem + ".summary.json")


def run_labels(args: argparse.Namespace) -> int:
    check_input_file(args.bundle, "BUNDLE")
    check_input_file(args.he, "--he")
    check_input_file(args.alignment, "--alignment")
    if args.panel is not None:
        check_input_file(args.panel, "--panel")
    check_output_file(args.output, "--output", (".csv",))
    check_output_file(summary_path(args), "--summary", (".json",))
    check_distinct_outputs({"--output": args.output, "--summary": summary_path(args)})

    from nuclass_qupath.slides import open_slide
    from nuclass_qupath.xenium import (
        check_registration,
        load_panel,
        read_alignment,
        read_xenium,
        register_to_slide,
        type_cells,
    )

    panel = load_panel(args.panel)
    alignment = read_alignment(args.alignment)
    adata = read_xenium(args.bundle, qv_min=args.qv_min)
    registration = None
    with open_slide(args.he, mpp=args.mpp) as slide:
        xy_px = register_to_slide(
            adata,
            alignment,
            slide_width_px=slide.width,
            slide_height_px=slide.height,
            max_off_image_share=args.max_off_slide,
        )
        if not args.skip_registration_check:
            has_nucleus = adata.obs["nucleus_centroid_x"].notna().to_numpy()
            points = xy_px[has_nucleus] if has_nucleus.any() else xy_px
            registration = check_registration(slide, points)
            if registration.share_on_nucleus < 0.5:
                logger.warning(
                    "only %.0f%% of Xenium nuclei land on an H&E nucleus (median offset %.1f µm): "
                    "check the alignment",
                    100 * registration.share_on_nucleus,
                    registration.median_offset_um,
                )
        slide_mpp = slide.mpp

    result = type_cells(
        adata,
        panel,
        min_transcripts=args.min_transcripts,
        min_confidence=args.min_confidence,
        n_neighbors=args.n_neighbors,
        leiden=args.leiden,
        leiden_resolution=args.leiden_resolution,
        organs=args.organs,
    )
    result.write_csv(args.output)
    extra = {
        "bundle": str(args.bundle),
        "slide": str(args.he),
        "slide_mpp": slide_mpp,
        "alignment": str(args.alignment),
        "alignment_matrix": alignment.tolist(),
        "xenium": {
            "files": adata.uns["xenium"]["files"],
            "counts_source": adata.uns["xenium"]["counts_source"],
            "pixel_size_um": adata.uns["xenium"]["pixel_size_um"],
            "n_genes": int(adata.n_vars),
            "n_off_slide": int((~adata.obs["on_slide"]).sum()),
        },
        "registration": registration.as_dict() if registration else None,
        "labels": str(args.output),
    }
    summary = result.write_summary(summary_path(args), extra)
    counts = ", ".join(f"{name} {n}" for name, n in summary["cells_per_class"].items())
    print(f"{summary['n_labelled']} of {summary['n_cells']} cells labelled ({counts}) -> {args.output}")
    if summary["empty_classes"]:
        print(f"warning: no cell labelled as {', '.join(summary['empty_classes'])}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    check_input_file(args.bundle, "BUNDLE")

    from nuclass_qupath.xenium import read_xenium

    adata = read_xenium(args.bundle, qv_min=args.qv_min)
    meta = adata.uns["xenium"]
    experiment = meta["experiment"]
    report = {
        "bundle": str(args.bundle),
        "files": meta["files"],
        "counts_source": meta["counts_source"],
        "pixel_size_um": meta["pixel_size_um"],
        "panel_name": experiment.get("panel_name"),
        "analysis_sw_version": experiment.get("analysis_sw_version"),
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_control_features": len(meta["control_features"]),
        "median_transcripts_per_cell": float(adata.obs["transcript_counts"].median()),
        "cells_with_nucleus": int(adata.obs["nucleus_centroid_x"].notna().sum()),
    }
    print(json.dumps(report, indent=2))
    return 0


# The command contract names the entry point ``run``; ``xenium-labels`` is the main command.
run = run_labels

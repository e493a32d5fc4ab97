"""``nuclass-qupath classify``: classify the nuclei of one slide into QuPath GeoJSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from nuclass_qupath.cli._args import (
    GEOJSON_SUFFIXES,
    REGION_PX_MAX,
    REGION_PX_MIN,
    OutputPathError,
    check_distinct_outputs,
    check_input_file,
    check_output_file,
    heatmap_um_type,
    int_range,
    mpp_type,
    threads_type,
)


# Every output file is written through nuclass_qupath._atomic.
ATOMIC_OUTPUT = True


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "classify",
        help="classify every nucleus of a slide and write QuPath GeoJSON",
        description=(
            "Classify the nuclei of SLIDE. Cells come from --cells (QuPath GeoJSON export of detections or "
            "cells) or, without it, from the built-in nucleus detector. Writes a GeoJSON FeatureCollection that "
            "QuPath imports (File > Import objects, or drag and drop), and a run metadata JSON beside it."
        ),
    )
    parser.add_argument("slide", type=Path, help="slide file (any format OpenSlide reads, OME-TIFF, TIFF)")
    parser.add_argument(
        "-o", "--output", type=Path, required=True,
        help=f"output GeoJSON file: {', '.join(GEOJSON_SUFFIXES)} (.gz is gzip-compressed)",
    )
    parser.add_argument("--cells", type=Path, help="QuPath GeoJSON of the cells to classify (default: detect nuclei)")
    parser.add_argument("--model", type=Path, help="model .safetensors file (default: the bundled demonstration model)")
    parser.add_argument(
        "--mpp", type=mpp_type(),
        help="level-0 pixel size in µm/px (0.01 to 10); overrides the slide's metadata, required when it has none",
    )
    parser.add_argument("--preview", type=Path, help="also write a .png of the slide with cells coloured by class")
    parser.add_argument("--metadata", type=Path, help="run metadata JSON (default: OUTPUT with .run.json)")
    parser.add_argument(
        "--mode", choices=["fast", "exact"], default="fast",
        help="fast: shared region features (default); exact: one crop per cell, the slow reference",
    )
    parser.add_argument(
        "--region-px", type=int_range(REGION_PX_MIN, REGION_PX_MAX, unit="px"), default=1536,
        help=(
            f"fast-mode core side in model pixels, {REGION_PX_MIN} to {REGION_PX_MAX} (default 1536); "
            "larger wastes less on overlap but needs more memory"
        ),
    )
    parser.add_argument("--threads", type=threads_type(), help="CPU threads for torch (default: all cores)")
    parser.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], default="fp32",
        help=(
            "fp32 (default) gives the model's reference results. bf16 autocast runs up to twice as fast on CPUs "
            "with native bf16 instructions (AVX512-BF16 or AMX), but with the bundled model it changed the class "
            "of 88 of 3896 CMU-1 cells (2.3%%) and probabilities by up to 0.29. auto uses bf16 only on such CPUs"
        ),
    )
    parser.add_argument(
        "--heatmap-um", type=heatmap_um_type(), help="also write heatmap tiles of this side in µm (1 to 10000)"
    )
    parser.add_argument(
        "--low-memory", action="store_true",
        help=(
            "stream: detect nuclei block by block and write each batch of predictions as it is made, so memory "
            "does not grow with the number of cells (cells are written in block order; a --preview then shows "
            "cells as points)"
        ),
    )
    parser.set_defaults(func=run)


def check_paths(args: argparse.Namespace, metadata_path: Path) -> None:
    """Check the input files and output destinations of ``args`` before any slide or model is read.

    Raises
    ------
    InputPathError
        If the slide, ``--cells`` or ``--model`` file does not exist.
    OutputPathError
        If an output has the wrong suffix, is a folder, lies in a folder that
        cannot be written, two outputs name the same file, or an output
        names an input file.
    """
    check_input_file(args.slide, "SLIDE")
    if args.cells is not None:
        check_input_file(args.cells, "--cells")
    if args.model is not None:
        check_input_file(args.model, "--model")
    check_output_file(args.output, "--output", GEOJSON_SUFFIXES)
    check_output_file(metadata_path, "--metadata", (".json",))
    if args.preview is not None:
        check_output_file(args.preview, "--preview", (".png",))
    outputs = {"--output": args.output, "--metadata": metadata_path, "--preview": args.preview}
    check_distinct_outputs(outputs)
    inputs = {"SLIDE": args.slide, "--cells": args.cells, "--model": args.model}
    for input_name, input_path in inputs.items():
        if input_path is None:
            continue
        for output_name, output_path in outputs.items():
            if output_path is not None and output_path.resolve() == input_path.resolve():
                raise OutputPathError(
                    f"{output_name} would overwrite the {input_name} file {input_path}; write to another file name"
                )


def run(args: argparse.Namespace) -> int:
    # The pipeline module imports only numpy at the top; torch and OpenSlide load in classify_file.
    from nuclass_qupath.pipeline import ClassifyRequest, classify_file

    request = ClassifyRequest(
        slide_path=args.slide,
        output_path=args.output,
        cells_path=args.cells,
        model_path=args.model,
        mpp=args.mpp,
        preview_path=args.preview,
        metadata_path=args.metadata,
        mode=args.mode,
        region_px=args.region_px,
        threads=args.threads,
        precision=args.precision,
        heatmap_tile_um=args.heatmap_um,
        low_memory=args.low_memory,
        arguments={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"},
    )
    check_paths(args, request.resolved_metadata_path())

    from nuclass_qupath.cli._progress import progress_callback

    result = classify_file(request, progress_factory=progress_callback)
    counts = ", ".join(f"{name} {count}" for name, count in result.class_counts.items())
    print(f"{result.n_cells} cells classified ({counts}) -> {args.output}")
    return 0

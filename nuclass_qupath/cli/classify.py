"""``nuclass-qupath classify``: classify the nuclei of one slide into QuPath GeoJSON."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    parser.add_argument("-o", "--output", type=Path, required=True, help="output .geojson or .geojson.gz")
    parser.add_argument("--cells", type=Path, help="QuPath GeoJSON of the cells to classify (default: detect nuclei)")
    parser.add_argument("--model", type=Path, help="model .safetensors file (default: the bundled demonstration model)")
    parser.add_argument(
        "--mpp", type=float, help="level-0 pixel size in µm/px; overrides the slide's metadata, required when it has none"
    )
    parser.add_argument("--preview", type=Path, help="also write a PNG of the slide with cells coloured by class")
    parser.add_argument("--metadata", type=Path, help="run metadata JSON (default: OUTPUT with .run.json)")
    parser.add_argument(
        "--mode", choices=["fast", "exact"], default="fast",
        help="fast: shared region features (default); exact: one crop per cell, the slow reference",
    )
    parser.add_argument(
        "--region-px", type=int, default=1536,
        help="fast-mode core side in model pixels (default 1536); larger wastes less on overlap but needs more memory",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: all cores)")
    parser.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], default="auto",
        help="bf16 autocast where the CPU has native bf16 instructions (auto), or force one",
    )
    parser.add_argument("--heatmap-um", type=float, help="also write heatmap tiles of this side in µm")
    parser.add_argument(
        "--low-memory", action="store_true",
        help=(
            "stream: detect nuclei block by block and write each batch of predictions as it is made, so memory "
            "does not grow with the number of cells (cells are written in block order; a --preview then shows "
            "cells as points)"
        ),
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nuclass_qupath.cli._progress import progress_callback
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
    result = classify_file(request, progress_factory=progress_callback)
    counts = ", ".join(f"{name} {count}" for name, count in result.class_counts.items())
    print(f"{result.n_cells} cells classified ({counts}) -> {args.output}")
    return 0

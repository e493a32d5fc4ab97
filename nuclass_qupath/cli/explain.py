"""``nuclass-qupath explain``: Grad-CAM panels showing what each path of the model looked at, per cell."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from nuclass_qupath.cli._args import check_input_file, check_output_dir, mpp_type


# Every output file is written through nuclass_qupath._atomic.
ATOMIC_OUTPUT = True


def _xy(text: str) -> tuple[float, float]:
    try:
        x, y = (float(part) for part in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected X,Y in level-0 pixels such as 1200,845, got {text!r}") from exc
    if not (math.isfinite(x) and math.isfinite(y)):
        raise argparse.ArgumentTypeError(f"X and Y must be finite level-0 pixel coordinates, got {text!r}")
    return x, y


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="draw Grad-CAM heatmaps of both model paths for chosen cells",
        description=(
            "For each chosen cell of SLIDE, compute Grad-CAM of the predicted class (or --class) for the local "
            "path on the nucleus crop and for the global path on the context, and write one PNG panel per cell: "
            "both images with their heatmaps, the windows the model pools over, the gate value and the class "
            "probabilities of each path. Also writes explanations.json with the numbers."
        ),
    )
    parser.add_argument("slide", type=Path, help="slide file (any format OpenSlide reads, OME-TIFF, TIFF)")
    parser.add_argument("--model", type=Path, help="model .safetensors file (default: the bundled demonstration model)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cells", type=Path, help="QuPath GeoJSON export of the cells; choose cells with --ids")
    source.add_argument(
        "--xy", type=_xy, nargs="+", metavar="X,Y", help="nucleus centres in QuPath level-0 pixels, e.g. 1200,845"
    )
    parser.add_argument("--ids", nargs="+", metavar="ID", help="object ids of the cells in --cells to explain")
    parser.add_argument("--class", dest="target_class", metavar="NAME", help="explain this class instead of the predicted one")
    parser.add_argument(
        "--mpp", type=mpp_type(), help="level-0 pixel size in µm/px; overrides the slide's metadata, required when it has none"
    )
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="folder for the panels")
    parser.set_defaults(func=run)


def select_cells(cells_path: Path, ids: list[str]):
    """Return the cells of ``cells_path`` with the given ids, in the order of ``ids``."""
    from nuclass_qupath.cells.geojson import read_cells_geojson
    from nuclass_qupath.errors import CellsError

    cells = read_cells_geojson(cells_path, keep_features=False)
    row = {cell_id: i for i, cell_id in enumerate(cells.ids)}
    missing = [cell_id for cell_id in ids if cell_id not in row]
    if missing:
        examples = ", ".join(cells.ids[:3])
        raise CellsError(
            f"{len(missing)} ids not found among the {len(cells)} cells of {cells_path}: {', '.join(missing[:5])}. "
            f"Ids are the GeoJSON feature ids QuPath exports, such as {examples}"
        )
    return cells.subset([row[cell_id] for cell_id in ids])


def run(args: argparse.Namespace) -> int:
    from nuclass_qupath.errors import CellsError

    if args.cells is not None and not args.ids:
        raise CellsError(f"choose the cells of {args.cells} to explain with --ids ID [ID ...]")
    if args.xy is not None and args.ids:
        raise CellsError("--ids selects cells of --cells; with --xy the cells are named after their coordinates")
    check_input_file(args.slide, "SLIDE")
    if args.cells is not None:
        check_input_file(args.cells, "--cells")
    if args.model is not None:
        check_input_file(args.model, "--model")
    check_output_dir(args.output, "--output")

    import json

    import numpy as np

    from nuclass_qupath._atomic import atomic_open
    from nuclass_qupath.model.gradcam import explain_cells, panel_file_name, write_explanation_panel
    from nuclass_qupath.model.io import load_model
    from nuclass_qupath.slides import open_slide

    # Unknown ids are reported before the model loads.
    if args.cells is not None:
        cells = select_cells(args.cells, args.ids)
        centroids_px, cell_ids = cells.centroids_px, list(cells.ids)
    else:
        centroids_px = np.array(args.xy, dtype=np.float64)
        cell_ids = None
    model = load_model(args.model)

    with open_slide(args.slide, mpp=args.mpp) as slide:
        explanations = explain_cells(model, slide, centroids_px, cell_ids=cell_ids, target_class=args.target_class)

    colors = [spec.color for spec in model.config.classes]
    records = []
    used_names: set[str] = set()
    for explanation in explanations:
        name = panel_file_name(explanation.cell_id)
        # Ids that differ only in characters a file name cannot hold get a counter.
        stem, counter = name[: -len(".png")], 2
        while name in used_names:
            name, counter = f"{stem}_{counter}.png", counter + 1
        used_names.add(name)
        path = write_explanation_panel(explanation, args.output / name, colors)
        record = explanation.as_dict()
        record["panel"] = path.name
        records.append(record)
        print(f"{explanation.cell_id}: {explanation.predicted_name} (gate {explanation.gate:.2f}) -> {path}")
    summary = {
        "slide": str(args.slide),
        "model_id": model.config.model_id,
        "classes": model.config.class_names,
        "cells": records,
    }
    with atomic_open(args.output / "explanations.json", "w") as f:
        json.dump(summary, f, indent=2)
    return 0

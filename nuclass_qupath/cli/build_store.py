"""``nuclass-qupath build-store``: cut every labelled cell's crops into a chunked zarr training-set store."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

GEOMETRY_OPTIONS = (
    ("local_crop_px", "local crop side, px at the model's µm/px"),
    ("local_margin_px", "image kept around the local crop on each side, px"),
    ("context_px", "context side, px at the model's µm/px, before resizing"),
    ("context_encoder_px", "context side after resizing, px, as the global encoder sees it"),
    ("context_margin_px", "image kept around the resized context on each side, px"),
    (
        "local_align_px",
        "stride of the local encoder, px: crops start on multiples of it (default: the stride of the default "
        "backbone, 16 for EfficientNet-Lite stage 3)",
    ),
    ("context_align_px", "stride of the global encoder, px: contexts start on multiples of it (default as above)"),
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "build-store",
        help="cut the crops of labelled cells on many slides into a training-set store (.zarr)",
        description=(
            "Read each slide of MANIFEST (CSV with a header: slide,labels[,organ,cohort,mpp,name]; paths relative "
            "to the manifest) or the one --slide with its --labels, and write every labelled cell's local crop and "
            "context, label, confidence, slide, organ, cohort, cell id and centroid to the zarr store OUTPUT. "
            "Labels files: xenium-labels tables (cell_id,x_px,y_px,class,confidence,reason; unlabelled rows are "
            "skipped), x,y,class CSV, or QuPath GeoJSON with classes. Run the same command again to resume an "
            "interrupted build. Train from the store with `nuclass-qupath train --store OUTPUT`."
        ),
    )
    parser.add_argument("manifest", nargs="?", type=Path, help="manifest CSV: slide,labels[,organ,cohort,mpp,name]")
    parser.add_argument("--slide", type=Path, help="one slide, instead of a manifest (with --labels)")
    parser.add_argument("--labels", type=Path, help="labels file of --slide")
    parser.add_argument("-o", "--output", type=Path, required=True, help="store to write (a folder, e.g. cells.zarr)")
    parser.add_argument("--organ", default="", help="organ of slides whose manifest row has none")
    parser.add_argument("--cohort", default="", help="cohort of slides whose manifest row has none")
    parser.add_argument("--mpp", type=float, help="µm/px of slides whose manifest row and metadata have none (PNG tiles)")
    parser.add_argument(
        "--classes", nargs="+", metavar="NAME[=R,G,B]",
        help="class names, in label order, with QuPath colours (default: every label found, sorted)",
    )
    parser.add_argument("--label-map", type=Path, help="YAML mapping raw labels to class names, e.g. '0: Tumor'")
    parser.add_argument("--min-confidence", type=float, default=0.0, help="leave out cells whose label confidence is lower (0-1, default 0)")
    parser.add_argument("--skip-other-classes", action="store_true", help="leave out cells of classes not in --classes instead of failing")

    geometry = parser.add_argument_group("crop geometry (default: that of a new model, or of --geometry-from)")
    geometry.add_argument("--geometry-from", type=Path, metavar="MODEL", help="take the geometry of this model (.json, .safetensors)")
    geometry.add_argument("--model-mpp", type=float, help="µm/px the crops are cut at (default 0.5)")
    for name, text in GEOMETRY_OPTIONS:
        geometry.add_argument("--" + name.replace("_", "-"), type=int, help=text)

    parser.add_argument("--cells-per-chunk", type=int, default=64, help="cells per shard file of the image arrays (default 64)")
    parser.add_argument("--workers", type=int, help="threads that cut crops (default: CPU count, at most 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace a store at OUTPUT that was built from other inputs")
    parser.set_defaults(func=run)


def _geometry(args: argparse.Namespace):
    from nuclass_qupath.model.config import ModelConfig
    from nuclass_qupath.training.store import StoreGeometry

    if args.geometry_from is not None:
        from nuclass_qupath.model.io import resolve_model_paths

        _, config_path = resolve_model_paths(args.geometry_from)
        base = StoreGeometry.from_config(ModelConfig.from_json_file(config_path))
    else:
        from nuclass_qupath.training.crops import CONFIG_FIELDS, encoder_stride

        defaults = {name: field.default for name, field in ModelConfig.model_fields.items()}
        base = StoreGeometry(
            **{name: defaults[name] for name in CONFIG_FIELDS},
            local_align_px=encoder_stride(defaults["local_backbone"], defaults["local_feature_index"]),
            context_align_px=encoder_stride(defaults["global_backbone"], defaults["global_feature_index"]),
        )
    values = base.to_dict()
    values.pop("context_mpp")
    if args.model_mpp is not None:
        values["mpp"] = args.model_mpp
    for name, _ in GEOMETRY_OPTIONS:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return StoreGeometry(**values)


def run(args: argparse.Namespace) -> int:
    from nuclass_qupath.errors import CellsError
    from nuclass_qupath.training.label_sources import LabelSource, read_manifest, slide_name
    from nuclass_qupath.training.setup import parse_class_specs, read_label_map
    from nuclass_qupath.training.store_build import BuildSettings, build_store

    if (args.manifest is None) == (args.slide is None):
        raise CellsError("give either a MANIFEST or --slide with --labels")
    if args.manifest is not None:
        sources = read_manifest(args.manifest, organ=args.organ, cohort=args.cohort, mpp=args.mpp)
    else:
        if args.labels is None:
            raise CellsError("--slide needs --labels, the file of labelled cells on it")
        for what, path in (("slide", args.slide), ("labels file", args.labels)):
            if not path.is_file():
                raise CellsError(f"{what} not found: {path}")
        sources = [
            LabelSource(
                args.slide.resolve(), args.labels.resolve(), slide_name(args.slide), args.organ, args.cohort, args.mpp
            )
        ]
    settings = BuildSettings(
        min_confidence=args.min_confidence,
        label_map=read_label_map(args.label_map) if args.label_map else None,
        skip_other_classes=args.skip_other_classes,
        cells_per_chunk=args.cells_per_chunk,
    )
    classes = parse_class_specs(args.classes) if args.classes else None

    bar = None

    def progress(n: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="cutting crops", unit="cell", disable=not sys.stderr.isatty(), leave=False)
        bar.update(n)

    try:
        store = build_store(
            sources, args.output, _geometry(args), classes=classes, settings=settings,
            overwrite=args.overwrite, workers=args.workers, progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    counts = dict(zip(store.class_names, (int(c) for c in _class_counts(store))))
    print(f"store {args.output}: {len(store)} cells from {len(store.slides)} slides; cells per class: {counts}")
    return 0


def _class_counts(store):
    import numpy as np

    return np.bincount(store.labels, minlength=len(store.class_names))

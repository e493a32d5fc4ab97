"""``nuclass-qupath export-geojson``: export the objects of a QuPath project as GeoJSON, without QuPath."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nuclass_qupath.cli._args import check_input_file, check_output_dir

OBJECT_TYPES = ("annotation", "detection", "cell", "tile", "tmaCore")


# Every output file is written through nuclass_qupath._atomic.
ATOMIC_OUTPUT = True


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export-geojson",
        help="export the objects of each image of a QuPath project as GeoJSON (no QuPath needed)",
        description=(
            "Write one GeoJSON FeatureCollection per image of a QuPath project, in the dialect QuPath 0.4 and "
            "later writes and imports (ids, object types, classes, measurements, nucleus outlines). The objects "
            "are read from the project's data files without QuPath. Files are named <image name>.geojson; "
            "characters that are not allowed in file names (\\ / : \" * ? < > | and control characters) "
            "become '_'. Exit status: 0 when every image was exported, 1 when any failed, 2 for invalid arguments."
        ),
    )
    parser.add_argument("project", type=Path, help="QuPath project folder or its project.qpproj")
    parser.add_argument("-o", "--output-dir", type=Path, required=True, metavar="DIR", help="folder for the GeoJSON files")
    parser.add_argument("--images", nargs="+", metavar="NAME", help="export only these images (QuPath image names)")
    parser.add_argument(
        "--gzip", action="store_true",
        help="write .geojson.gz files (QuPath does not import these directly: decompress them first)",
    )
    parser.add_argument(
        "--object-types", nargs="+", choices=OBJECT_TYPES, metavar="TYPE",
        help=f"export only these object types: {', '.join(OBJECT_TYPES)} (default: all)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_input_file(args.project, "PROJECT")
    check_output_dir(args.output_dir, "--output-dir")

    from nuclass_qupath.qupath.batch import UnknownImageError
    from nuclass_qupath.qupath.export import ExportedImage, export_project_geojson

    def print_image(result: ExportedImage) -> None:
        if result.error is not None:
            print(f"{result.image_name}: FAILED: {result.error}", flush=True)
            return
        counts = ", ".join(f"{kind} {count}" for kind, count in result.object_counts.items()) or "no objects"
        print(f"{result.image_name}: {counts} -> {result.path} ({result.seconds:.1f} s)", flush=True)

    try:
        results = export_project_geojson(
            args.project,
            args.output_dir,
            image_names=args.images,
            compress=args.gzip,
            object_types=args.object_types,
            on_image=print_image,
        )
    except UnknownImageError as exc:
        print(f"nuclass-qupath export-geojson: error: {exc}", file=sys.stderr)
        return 2
    failed = sum(result.error is not None for result in results)
    print(f"{len(results)} images: {len(results) - failed} exported, {failed} failed")
    return 1 if failed else 0

"""Time the streaming GeoJSON writer on a whole slide's worth of classified cells.

Inputs: nucleus polygons detected by :func:`nuclass_qupath.cells.detector.detect_nuclei`
on CMU-1-Small-Region.svs of the shared test data (``--source qupath`` takes the
nuclei of QuPath 0.6.0's own cell detection export instead). Set
NUCLASS_SHARED_DATA to that data folder; the default is ``../shared/data``
beside the repository. The nuclei are tiled over a large virtual slide until
there are ``--cells`` of them, and each gets the measurements the engine
writes (confidence, gate, one probability per class of the bundled model) and
a classification with its colour. The features are generated chunk by chunk,
so the input never exists as one list.

Each measurement runs in a fresh subprocess, so its peak RSS
(``ru_maxrss``) is that of the imports, the input generator and the writer
alone. The parent process imports only the standard library, because Linux
carries a parent's peak RSS into a child across fork and exec. The runs are:

- ``build only``: import and generate every feature without writing (baseline);
- ``geojson``: write a plain ``.geojson``;
- ``geojson.gz``: write a gzip-compressed ``.geojson.gz`` at the default level,
  and with ``--levels`` at other gzip levels too.

Output: a table of cells, format, wall and CPU seconds, features per second,
µs per feature, peak RSS (MB) and file size (MB), with the write time net of the
baseline. Before the table, one subprocess checks that the generated features
equal those of the engine's :func:`nuclass_qupath.engine.output.batch_features`
for the first chunk, and after it the first and last feature of each file are
read back and parsed.

Usage::

    .venv/bin/python benchmarks/bench_geojson.py [--cells 1000000] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SLIDE = "slides/CMU-1-Small-Region.svs"
QUPATH_EXPORT = "qupath/cmu1_cells/export/CMU-1-Small-Region.svs.geojson"
# Cells generated together, as the engine converts them (engine.output.FEATURE_CHUNK).
CHUNK = 4096
# Free space (px) between copies of the template region on the virtual slide.
TILE_GAP_PX = 100.0
SEED = 20261204


def shared_data() -> Path:
    return Path(os.environ.get("NUCLASS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


# Templates: nucleus polygons of one real region, as flat arrays.


def prepare_templates(source: str, path: Path) -> None:
    """Save the template nuclei to ``path`` (.npz): exterior ring vertices and ring offsets, level-0 px."""
    import numpy as np
    import shapely

    if source == "detector":
        from nuclass_qupath.cells.detector import detect_nuclei
        from nuclass_qupath.slides import open_slide

        with open_slide(shared_data() / SLIDE) as slide:
            polygons = detect_nuclei(slide).geometries
    else:
        from nuclass_qupath.cells.geojson import read_cells_geojson

        polygons = read_cells_geojson(shared_data() / QUPATH_EXPORT).geometries

    array = np.asarray([shapely.Polygon(p.exterior) for p in polygons if p is not None], dtype=object)
    array = array[shapely.is_valid(array)]
    _, coordinates, (ring_offsets, _) = shapely.to_ragged_array(array)
    np.savez(path, coordinates=coordinates, ring_offsets=ring_offsets)


def load_model_classes() -> list[tuple[str, tuple[int, int, int]]]:
    """Return (name, colour) of the bundled model's classes, read from its JSON without importing torch."""
    config = json.loads((REPO_ROOT / "nuclass_qupath" / "models" / "nuclass-nucls-demo.json").read_text())
    return [(spec["name"], tuple(spec["color"])) for spec in config["classes"]]


# The lazy input: features as the engine yields them.


def iter_cell_chunks(templates: Path, n_cells: int, n_classes: int) -> Iterator[tuple]:
    """Yield (ids, polygons, probs, gate) for chunks of CHUNK cells tiled over a virtual slide.

    Cell ``i`` is template nucleus ``i % M`` shifted by the region size times its
    tile's column and row. Probabilities are float32 Dirichlet draws and the
    gate a uniform draw, as float32 like the engine's arrays.
    """
    import uuid

    import numpy as np
    import shapely

    data = np.load(templates)
    coordinates, ring_offsets = data["coordinates"], data["ring_offsets"]
    n_templates = len(ring_offsets) - 1
    tile_w, tile_h = coordinates.max(axis=0) + TILE_GAP_PX
    n_tiles = -(-n_cells // n_templates)
    columns = max(1, int(np.ceil(np.sqrt(n_tiles * tile_h / tile_w))))
    counts = np.diff(ring_offsets)
    rng = np.random.default_rng(SEED)

    for start in range(0, n_cells, CHUNK):
        index = np.arange(start, min(start + CHUNK, n_cells))
        template = index % n_templates
        tile = index // n_templates
        shift = np.column_stack([(tile % columns) * tile_w, (tile // columns) * tile_h])

        # Gather the vertices of the chosen templates and shift each ring by its tile.
        lengths = counts[template]
        chunk_offsets = np.concatenate([[0], np.cumsum(lengths)])
        vertex = np.repeat(ring_offsets[template] - chunk_offsets[:-1], lengths) + np.arange(chunk_offsets[-1])
        xy = coordinates[vertex] + np.repeat(shift, lengths, axis=0)
        polygons = shapely.from_ragged_array(
            shapely.GeometryType.POLYGON, xy, (chunk_offsets, np.arange(len(index) + 1))
        )

        probs = rng.dirichlet(np.full(n_classes, 0.5), size=len(index)).astype(np.float32)
        gate = rng.uniform(size=len(index)).astype(np.float32)
        ids = [str(uuid.UUID(bytes=raw, version=4)) for raw in _id_bytes(rng, len(index))]
        yield ids, polygons, probs, gate


def _id_bytes(rng, n: int) -> list[bytes]:
    raw = rng.bytes(16 * n)
    return [raw[16 * k : 16 * (k + 1)] for k in range(n)]


def iter_features(templates: Path, n_cells: int) -> Iterator[dict]:
    """Yield the engine's features for ``n_cells`` detected cells: detection polygon, class, measurements.

    Mirrors the path of :func:`nuclass_qupath.engine.output.batch_features` for
    detected cells, built here because importing the engine imports torch
    (about 700 MB RSS), which would swamp the writer's memory.
    """
    import numpy as np

    from nuclass_qupath.cells.geojson_write import classification_json, polygons_to_geojson

    classes = load_model_classes()
    class_names = [name for name, _ in classes]
    classifications = {name: classification_json(name, color) for name, color in classes}
    names = ["NuClass: confidence", "NuClass: gate", *(f"NuClass: p({name})" for name in class_names)]

    for ids, polygons, probs, gate in iter_cell_chunks(templates, n_cells, len(classes)):
        probs64 = probs.astype(np.float64)
        rows = np.round(np.column_stack([probs64.max(axis=1), gate.astype(np.float64), probs64]), 5).tolist()
        predicted = probs64.argmax(axis=1).tolist()
        geometries = polygons_to_geojson(list(polygons))
        for k, cell_id in enumerate(ids):
            classification = classifications[class_names[predicted[k]]]
            yield {
                "type": "Feature",
                "id": cell_id,
                "geometry": geometries[k],
                "properties": {
                    "objectType": "detection",
                    "classification": {key: list(v) if isinstance(v, list) else v for key, v in classification.items()},
                    "measurements": dict(zip(names, rows[k])),
                },
            }


# Child processes: one measurement each.


def run_child(args: argparse.Namespace) -> None:
    """Run one measurement in this process and print its figures as one JSON line."""
    wall, cpu = time.perf_counter(), time.process_time()
    count = 0
    if args.child == "templates":
        prepare_templates(args.source, Path(args.path))
    elif args.child == "build":
        for _ in iter_features(Path(args.templates), args.cells):
            count += 1
    elif args.child == "write":
        from nuclass_qupath.cells.geojson_write import GeoJSONWriter

        options = {} if args.compresslevel is None else {"compresslevel": args.compresslevel}  # else GZIP_LEVEL
        with GeoJSONWriter(args.path, **options) as writer:
            for feature in iter_features(Path(args.templates), args.cells):
                writer.write(feature)
        count = writer.count
    elif args.child == "engine-check":
        count = check_against_engine(Path(args.templates))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    with open("/proc/self/status", encoding="ascii") as status:
        hwm_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"count": count, "wall_s": wall, "cpu_s": cpu, "maxrss_kb": usage.ru_maxrss, "hwm_kb": hwm_kb}))


def check_against_engine(templates: Path) -> int:
    """Compare the first chunk of generated features with the engine's own; return the number compared."""
    import numpy as np
    import shapely

    from nuclass_qupath.cells.table import CellTable
    from nuclass_qupath.engine.output import batch_features
    from nuclass_qupath.model.config import ModelConfig

    config = ModelConfig.from_json_file(REPO_ROOT / "nuclass_qupath" / "models" / "nuclass-nucls-demo.json")
    ids, polygons, probs, gate = next(iter_cell_chunks(templates, CHUNK, len(config.classes)))
    cells = CellTable(ids, shapely.get_coordinates(shapely.centroid(polygons)), list(polygons), [None] * len(ids), [None] * len(ids))
    engine = list(batch_features(cells, np.arange(len(ids)), probs, gate, config.class_names, config))
    ours = [f for _, f in zip(range(len(ids)), iter_features(templates, CHUNK))]
    if json.dumps(engine) != json.dumps(ours):
        raise SystemExit("generated features differ from engine.output.batch_features; update iter_features")
    return len(ours)


def spawn(args: list[str]) -> dict[str, Any]:
    """Run this script as a child with ``args`` and return its JSON figures."""
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"child {' '.join(args)} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# Reading back.


def first_and_last_feature(path: Path) -> tuple[dict, dict]:
    """Parse the first and last feature lines of a writer output, streaming through the file."""
    opener = gzip.open if path.suffix == ".gz" else open
    first = last = None
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            # The writer puts one feature per line, each but the last followed by a comma.
            if line.startswith('{"type":"Feature"'):
                last = line
                if first is None:
                    first = line
    if first is None or last is None:
        raise SystemExit(f"{path}: no feature lines found")
    return json.loads(first.rstrip().rstrip(",")), json.loads(last.rstrip().rstrip(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=1_000_000, help="number of cells to write")
    parser.add_argument("--out", type=Path, help="folder for the temporary outputs, removed at the end (default: the system's temporary folder)")
    parser.add_argument("--source", choices=("detector", "qupath"), default="detector", help="template nuclei")
    parser.add_argument("--levels", type=int, nargs="*", default=[], help="extra gzip levels (1-9) to time")
    parser.add_argument("--keep", action="store_true", help="move the written files to --out (default: the current folder)")
    parser.add_argument("--child", choices=("templates", "build", "write", "engine-check"), help=argparse.SUPPRESS)
    parser.add_argument("--templates", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--compresslevel", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        out = Path(tmp)
        load_start = os.getloadavg()
        templates = out / "templates.npz"
        spawn(["--child", "templates", "--source", args.source, "--path", str(templates)])
        checked = spawn(["--child", "engine-check", "--templates", str(templates)])
        print(f"template nuclei from {args.source}; first {checked['count']} features equal the engine's batch_features")

        common = ["--templates", str(templates), "--cells", str(args.cells)]
        rows = [("build only", None, spawn(["--child", "build", *common]))]
        runs = [("geojson", out / "cells.geojson", None), ("geojson.gz", out / "cells.geojson.gz", None)]
        runs += [(f"geojson.gz -{level}", out / f"cells_{level}.geojson.gz", level) for level in args.levels]
        for label, path, level in runs:
            extra = [] if level is None else ["--compresslevel", str(level)]
            figures = spawn(["--child", "write", "--path", str(path), *common, *extra])
            if figures["count"] != args.cells:
                raise SystemExit(f"{path}: wrote {figures['count']} features, expected {args.cells}")
            rows.append((label, path, figures))

        print_table(args.cells, rows)
        print("load average (1, 5, 15 min) at the start: {:.2f} {:.2f} {:.2f}, at the end: {:.2f} {:.2f} {:.2f}".format(
            *load_start, *os.getloadavg()))
        for label, path, _ in rows[1:]:
            first, last = first_and_last_feature(path)
            print(f"{label}: first id {first['id']}, last id {last['id']}, "
                  f"last class {last['properties']['classification']['name']}: parsed")
        if args.keep:
            kept = args.out or Path.cwd()
            for _, path, _ in rows[1:]:
                path.replace(kept / path.name)
            print(f"files kept in {kept}")


def print_table(n_cells: int, rows: list) -> None:
    """Print one row per run; the write columns subtract the baseline's time to build the features."""
    baseline = rows[0][2]
    header = (f"{'cells':>9} {'format':<16} {'wall s':>7} {'CPU s':>7} {'feat/s':>9} {'µs/feat':>8} "
              f"{'write wall µs/feat':>18} {'write CPU µs/feat':>17} {'peak RSS MB':>11} {'size MB':>8}")
    print(header)
    print("-" * len(header))
    for label, path, figures in rows:
        per_feature_us = figures["wall_s"] / n_cells * 1e6
        write_wall = write_cpu = size = ""
        if path is not None:
            write_wall = f"{(figures['wall_s'] - baseline['wall_s']) / n_cells * 1e6:.1f}"
            write_cpu = f"{(figures['cpu_s'] - baseline['cpu_s']) / n_cells * 1e6:.1f}"
            size = f"{path.stat().st_size / 1e6:.1f}"
        print(f"{n_cells:>9} {label:<16} {figures['wall_s']:>7.1f} {figures['cpu_s']:>7.1f} "
              f"{n_cells / figures['wall_s']:>9.0f} {per_feature_us:>8.1f} {write_wall:>18} {write_cpu:>17} "
              f"{figures['maxrss_kb'] / 1024:>11.0f} {size:>8}")


if __name__ == "__main__":
    main()

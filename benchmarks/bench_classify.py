"""Benchmark whole-slide classification: the engine against the naive per-cell pipeline.

Each slide gets two jobs, each in a fresh subprocess so that peak memory is
that job's own:

1. ``engine``: the ``classify`` job as users run it (open, detect nuclei,
   classify in fast mode, write GeoJSON), with seconds per stage.
2. ``naive``: the per-cell pipeline on a random sample of the same cells. Each
   cell gets its own crop and context, and both encoders run on every cell,
   eagerly, in NCHW, in fp32, without read-ahead. It is the engine's
   ``exact`` mode with every optimisation off, so its probabilities are also
   the reference that the engine's are compared with.

The slides are those given on the command line, by default the three in
``slides/`` of ``NUCLASS_SHARED_DATA`` (default ``../shared/data``). The
benchmark adds the densest 0.25 mm² of CMU-1 (cells from its engine run) and
a large pyramidal OME-TIFF that it builds by tiling CMU-1 (more than 100k
nuclei). The large slide is also run with
``--low-memory``. The engine runs at ``--precision`` (default fp32). With
fp32 on a CPU with native bf16 instructions, each slide is run once more in
bf16, on the cells of the fp32 run.

Two tables are printed. The first gives seconds per stage, cells/s of the
classification stages, job time and peak RSS of every job. The second gives,
for every engine run, its speed-up over the naive pipeline, the share of
sampled cells that get the naive pipeline's class, and the largest
difference in a class probability.

Usage::

    python benchmarks/bench_classify.py [--naive-cells 400] [--no-large] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED_DATA = Path(os.environ.get("NUCLASS_SHARED_DATA", ROOT.parent / "shared/data"))
DEFAULT_SLIDES = [
    (SHARED_DATA / "slides/CMU-1-Small-Region.svs", None),
    (SHARED_DATA / "slides/HE_example_ome.tif", None),
    # No µm/px in its metadata; 0.5 is assumed for the benchmark.
    (SHARED_DATA / "slides/TCGA-CR-7395-01A-01-TS1.svs", 0.5),
]
# The bundled sample slide, tiled into the large slide.
CMU1 = ROOT / "sample_projects/CMU-1-Small-Region.svs"
DENSE_WINDOW_UM = 500.0
CMU1_MPP = 0.499  # µm/px in CMU-1-Small-Region.svs
CLASSIFY_STAGES = ("read_wait", "preprocess", "local", "global", "gate")


# ---------------------------------------------------------------------------
# Jobs, run in child processes


def job_engine(spec: dict) -> dict:
    """Run the classify job on one slide; return its timings."""
    from nuclass_qupath.pipeline import ClassifyRequest, classify_file

    request = ClassifyRequest(
        slide_path=Path(spec["slide"]),
        output_path=Path(spec["output"]),
        cells_path=Path(spec["cells"]) if spec.get("cells") else None,
        mpp=spec.get("mpp"),
        low_memory=spec.get("low_memory", False),
        threads=spec.get("threads"),
        precision=spec.get("precision") or "fp32",
    )
    result = classify_file(request)
    return {
        "n_cells": result.n_cells,
        "timings_s": result.timings_s,
        "precision": result.metadata["engine"]["precision"],
    }


def job_naive(spec: dict) -> dict:
    """Classify the sampled cells one crop at a time, in fp32; save their probabilities."""
    import torch

    from nuclass_qupath.cells.table import CellTable
    from nuclass_qupath.engine import EngineOptions, SlideClassifier
    from nuclass_qupath.model import load_model
    from nuclass_qupath.slides import open_slide

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    sample = np.load(spec["sample"])
    options = EngineOptions(
        mode="exact", optimize=False, channels_last=False, prefetch=False, precision="fp32", sparse_crops=False
    )
    started = time.perf_counter()
    with open_slide(spec["slide"], mpp=spec.get("mpp")) as slide:
        model = load_model()
        classifier = SlideClassifier(model, options)
        setup_s = time.perf_counter() - started
        predictions = classifier.classify(slide, CellTable.from_points(sample["centroids_px"]))
    np.savez(spec["probs_out"], probs=predictions.probs)
    return {
        "n_cells": len(predictions.predicted),
        "timings_s": {"setup": setup_s, **{f"classify_{k}": v for k, v in predictions.timings_s.items()}},
        "precision": classifier.precision,
    }


def job_info(spec: dict) -> dict:
    """Describe the machine and torch, and return the bundled model's class names."""
    import torch

    from nuclass_qupath.engine.classify import cpu_supports_fast_bf16
    from nuclass_qupath.model import load_model

    return {
        "header": f"{cpu_model_name()}, {os.cpu_count()} cores, native bf16 "
        f"{'yes' if cpu_supports_fast_bf16() else 'no'}; torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads",
        "native_bf16": cpu_supports_fast_bf16(),
        "class_names": load_model().config.class_names,
    }


def job_build(spec: dict) -> dict:
    """Build the large tiled slide."""
    sys.path.insert(0, str(HERE))
    from large_slide import build_large_slide

    return build_large_slide(Path(spec["source"]), Path(spec["out"]), *spec["tiles"])


def job_sample(spec: dict) -> dict:
    """Save the centroids of a random sample of the cells of an engine output."""
    cells = engine_cells(Path(spec["output"]))
    rng = np.random.default_rng(0)
    index = np.sort(rng.choice(len(cells), min(spec["n"], len(cells)), replace=False))
    np.savez(spec["sample"], centroids_px=cells.centroids_px[index])
    return {"n": len(index)}


def job_dense(spec: dict) -> dict:
    """Write the cells of the densest square window of an engine output as GeoJSON."""
    from nuclass_qupath.cells.geojson import GeoJSONWriter

    cells = engine_cells(Path(spec["output"]))
    inside = densest_window(cells, spec["side_px"])
    with GeoJSONWriter(Path(spec["cells_out"])) as writer:
        for i in inside:
            writer.write(cells.features[i])
    return {"n": len(inside)}


def job_compare(spec: dict) -> dict:
    """Compare an engine output with the naive probabilities on the sampled cells.

    Cells are matched by centroid, to 0.01 px, because the engine may write
    them in another order than the sample lists them.
    """
    cells = engine_cells(Path(spec["output"]))
    key_of = {tuple(np.round(xy, 2)): i for i, xy in enumerate(cells.centroids_px)}
    index = [key_of[tuple(np.round(xy, 2))] for xy in np.load(spec["sample"])["centroids_px"]]
    measurements = [cells.features[i]["properties"]["measurements"] for i in index]
    engine_probs = np.array([[m[f"NuClass: p({c})"] for c in spec["class_names"]] for m in measurements])
    reference = np.load(spec["naive_probs"])["probs"]
    same = engine_probs.argmax(axis=1) == reference.argmax(axis=1)
    return {
        "sample": len(index),
        "agreement": float(same.mean()),
        "n_disagree": int((~same).sum()),
        "max_prob_diff": float(np.abs(engine_probs - reference).max()),
    }


JOBS = {
    "engine": job_engine, "naive": job_naive, "info": job_info, "build": job_build,
    "sample": job_sample, "dense": job_dense, "compare": job_compare,
}


def run_child(kind: str, spec: dict) -> dict:
    """Run one job in a fresh interpreter; add its wall time and peak RSS (MiB).

    Linux starts a child's peak RSS at its parent's RSS (the peak is carried
    across fork and exec), so the parent imports neither torch nor the
    package and never keeps cells or images in memory.
    """
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, __file__, "--job", kind, json.dumps(spec)], stdout=subprocess.PIPE, text=True
    )
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{kind} job failed with exit code {process.returncode}: {spec}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux reports KiB
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    return result


# ---------------------------------------------------------------------------
# Helpers of the jobs


def engine_cells(output: Path):
    from nuclass_qupath.cells.geojson import read_cells_geojson

    return read_cells_geojson(output)


def densest_window(cells, side_px: float) -> np.ndarray:
    """Return the indices of the cells in the square window of side ``side_px`` that contains the most of them.

    Window corners are tried on a 64 px grid.
    """
    xy = cells.centroids_px
    best, best_index = -1, np.arange(0)
    for x0 in np.arange(xy[:, 0].min(), xy[:, 0].max() - side_px / 2, 64.0):
        in_x = (xy[:, 0] >= x0) & (xy[:, 0] < x0 + side_px)
        for y0 in np.arange(xy[:, 1].min(), xy[:, 1].max() - side_px / 2, 64.0):
            inside = np.flatnonzero(in_x & (xy[:, 1] >= y0) & (xy[:, 1] < y0 + side_px))
            if len(inside) > best:
                best, best_index = len(inside), inside
    return best_index


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------
# Parent: the standard library and numpy only


def classify_seconds(timings: dict) -> float:
    return sum(timings.get(f"classify_{k}", 0.0) for k in CLASSIFY_STAGES)


def row(name: str, pipeline: str, result: dict) -> dict:
    t = result["timings_s"]
    n = result["n_cells"]
    classify_s = classify_seconds(t)
    return {
        "slide": name, "pipeline": pipeline, "precision": result.get("precision", ""), "cells": n,
        # Detecting the nuclei, or reading them from GeoJSON for runs given cells.
        "cells_s": t.get("cells", 0.0), "read_s": t.get("classify_read", 0.0),
        "read_wait_s": t.get("classify_read_wait", 0.0), "preprocess_s": t.get("classify_preprocess", 0.0),
        "local_s": t.get("classify_local", 0.0), "global_s": t.get("classify_global", 0.0),
        "gate_s": t.get("classify_gate", 0.0), "write_s": t.get("write", 0.0),
        "classify_cells_per_s": n / classify_s if classify_s else float("nan"),
        "job_s": result["wall_s"], "cpu_s": result["cpu_s"], "peak_rss_mib": result["peak_rss_mib"],
    }


def print_table(rows: list[dict]) -> None:
    columns = [
        ("slide", "{}"), ("pipeline", "{}"), ("precision", "{}"), ("cells", "{:d}"), ("cells_s", "{:.1f}"),
        ("read_s", "{:.1f}"), ("read_wait_s", "{:.1f}"), ("preprocess_s", "{:.1f}"), ("local_s", "{:.1f}"),
        ("global_s", "{:.1f}"), ("gate_s", "{:.2f}"), ("write_s", "{:.1f}"), ("classify_cells_per_s", "{:.1f}"),
        ("job_s", "{:.1f}"), ("peak_rss_mib", "{:.0f}"),
    ]
    print("| " + " | ".join(name for name, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(fmt.format(r[name]) for name, fmt in columns) + " |")


def print_comparison(pairs: list[tuple[dict, dict]]) -> None:
    print("| slide | engine | engine cells/s | naive cells/s | speed-up | cells compared | same class | largest \\|Δp\\| |")
    print("|---|---|---|---|---|---|---|---|")
    for engine, naive in pairs:
        ratio = engine["classify_cells_per_s"] / naive["classify_cells_per_s"]
        agreement = engine["agreement"]
        print(
            f"| {engine['slide']} | {engine['precision']} | {engine['classify_cells_per_s']:.1f} | "
            f"{naive['classify_cells_per_s']:.2f} | {ratio:.1f}x | {agreement['sample']} | "
            f"{100 * agreement['agreement']:.1f}% ({agreement['n_disagree']} differ) | "
            f"{agreement['max_prob_diff']:.4f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    parser.add_argument("--slides", type=Path, nargs="*", help="slides to run (default: the three in slides/ of NUCLASS_SHARED_DATA, "
                             "by default ../shared/data)")
    parser.add_argument("--mpp", type=float, help="µm/px for slides given with --slides that have none")
    parser.add_argument("--naive-cells", type=int, default=400, help="cells per slide for the naive pipeline (default 400)")
    parser.add_argument("--no-large", action="store_true", help="skip the large tiled slide")
    parser.add_argument("--tiles", type=int, nargs=2, default=(6, 5), metavar=("X", "Y"),
                        help="copies of CMU-1 across and down in the large slide (default 6 5)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                        help="engine precision (default fp32, as the classify command). With fp32 on a CPU with "
                             "native bf16, the real slides are also run in bf16. The naive pipeline always runs "
                             "in fp32")
    parser.add_argument("--workdir", type=Path, default=Path("benchmark-output"), help="where outputs go")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()

    if args.job:
        kind, spec = args.job
        print(json.dumps(JOBS[kind](json.loads(spec))))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    info = run_child("info", {})
    class_names = info["class_names"]
    slides = [(p, args.mpp) for p in args.slides] if args.slides is not None else list(DEFAULT_SLIDES)
    print(f"# {info['header']}; load average before {os.getloadavg()[0]:.2f}", flush=True)

    jobs: list[tuple[str, Path, float | None, dict]] = [(path.name, path, mpp, {}) for path, mpp in slides]
    if not args.no_large:
        large = args.workdir / f"CMU-1-mosaic-{args.tiles[0]}x{args.tiles[1]}.ome.tif"
        if not large.is_file():
            built = run_child("build", {"source": str(CMU1), "out": str(large), "tiles": list(args.tiles)})
            print(f"# built {large.name}: {built['width_px']} x {built['height_px']} px, {built['size_mb']} MB "
                  f"in {built['build_s']} s", flush=True)
        jobs.append((large.name, large, None, {}))
        jobs.append((large.name, large, None, {"low_memory": True}))
    # bf16 only pays where the CPU has native bf16, so it is compared there alone.
    compare_bf16 = args.precision == "fp32" and info["native_bf16"]

    rows: list[dict] = []
    pairs: list[tuple[dict, dict]] = []

    def run_engine(name: str, tag: str, spec: dict) -> dict:
        engine = row(name, tag, run_child("engine", spec))
        rows.append(engine)
        print(f"# {name} {tag} ({engine['precision']}): {engine['cells']} cells, "
              f"{engine['classify_cells_per_s']:.0f} cells/s, job {engine['job_s']:.0f} s, "
              f"peak {engine['peak_rss_mib']:.0f} MiB", flush=True)
        return engine

    def run_naive_and_compare(name: str, path: Path, mpp: float | None, engine: dict, output: Path) -> None:
        """Run the naive pipeline on a sample of the engine's cells; compare it with fp32 and bf16 engine runs."""
        stem = str(args.workdir / name.replace(" ", "_").replace("²", "2"))
        sample, naive_probs = Path(f"{stem}.sample.npz"), Path(f"{stem}.naive.npz")
        run_child("sample", {"output": str(output), "n": args.naive_cells, "sample": str(sample)})
        naive = row(name, "naive", run_child("naive", {"slide": str(path), "mpp": mpp, "sample": str(sample),
                                                         "probs_out": str(naive_probs), "threads": args.threads}))
        rows.append(naive)
        compare = {"sample": str(sample), "naive_probs": str(naive_probs), "class_names": class_names}
        engine["agreement"] = run_child("compare", {"output": str(output), **compare})
        pairs.append((engine, naive))
        print(f"# {name} naive: {naive['cells']} cells, {naive['classify_cells_per_s']:.2f} cells/s, "
              f"same class {100 * engine['agreement']['agreement']:.1f}%", flush=True)
        if compare_bf16:
            # The engine's own cells as input, so that the same cells are compared.
            bf16_output = Path(f"{stem}.bf16.geojson.gz")
            bf16 = run_engine(name, "engine", {"slide": str(path), "output": str(bf16_output), "mpp": mpp,
                                               "cells": str(output), "threads": args.threads, "precision": "bf16"})
            bf16["agreement"] = run_child("compare", {"output": str(bf16_output), **compare})
            pairs.append((bf16, naive))

    for name, path, mpp, extra in jobs:
        tag = "engine, low memory" if extra.get("low_memory") else "engine"
        output = args.workdir / f"{path.name}.{'lowmem.' if extra else ''}geojson.gz"
        spec = {"slide": str(path), "output": str(output), "mpp": mpp, "threads": args.threads,
                "precision": args.precision, **extra}
        engine = run_engine(name, tag, spec)
        if extra:
            continue
        run_naive_and_compare(name, path, mpp, engine, output)

        if path.name.startswith("CMU-1-Small"):
            dense_cells = args.workdir / "CMU-1-dense.geojson"
            run_child("dense", {"output": str(output), "side_px": DENSE_WINDOW_UM / CMU1_MPP,
                                "cells_out": str(dense_cells)})
            dense_name = "CMU-1 densest 0.25 mm²"
            dense_output = args.workdir / "CMU-1-dense.out.geojson.gz"
            dense = run_engine(dense_name, "engine", {"slide": str(path), "output": str(dense_output),
                                                      "cells": str(dense_cells), "threads": args.threads,
                                                      "precision": args.precision})
            run_naive_and_compare(dense_name, path, None, dense, dense_output)

    print()
    print_table(rows)
    print()
    print_comparison(pairs)
    print(f"\n# load average after {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

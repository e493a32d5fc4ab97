"""Time the Java-free QuPath data file reader, and paquo where QuPath is installed.

Inputs: the sample project ``qupath/cmu1_cells`` of the shared test data (set
NUCLASS_SHARED_DATA to its folder, default ``../shared/data`` beside the
repository), and a synthetic data file of ``--synthetic`` cells written with
the test helpers in ``tests/qupath_fixtures.py``.  Output: objects per second
(wall clock and CPU time) for both orders of :meth:`ImageData.iter_objects`,
and peak memory.  With PAQUO_QUPATH_DIR set, paquo reads the same image through
QuPath for comparison; otherwise that step is reported as skipped.

Usage::

    .venv/bin/python benchmarks/read_qpdata.py [--synthetic 20000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from nuclass_qupath.qupath.project_files import QuPathProjectFiles  # noqa: E402
from nuclass_qupath.qupath.qpdata import read_image_data  # noqa: E402


def time_reader(path: Path, order: str, repeat: int) -> tuple[int, float, float]:
    """Return (objects, best wall seconds, best CPU seconds) over ``repeat`` full reads."""
    best_wall = best_cpu = float("inf")
    count = 0
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        data = read_image_data(path)
        count = sum(1 for _ in data.iter_objects(order=order))
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return count, best_wall, best_cpu


def report(label: str, path: Path, repeat: int) -> None:
    size_mb = path.stat().st_size / 1e6
    for order in ("hierarchy", "stream"):
        count, wall, cpu = time_reader(path, order, repeat)
        print(
            f"{label:<28} {order:<9} {count:>8} objects  {size_mb:7.1f} MB  "
            f"{wall:7.2f} s wall ({count / wall:7.0f} objects/s)  "
            f"{cpu:7.2f} s CPU ({count / cpu:7.0f} objects/s)"
        )


def time_paquo(project_dir: Path, image_name: str) -> None:
    if not os.environ.get("PAQUO_QUPATH_DIR"):
        print("paquo: skipped, PAQUO_QUPATH_DIR is not set (needs a QuPath installation)")
        return
    from paquo.projects import QuPathProject

    start = time.perf_counter()
    with QuPathProject(project_dir, mode="r") as project:
        opened = time.perf_counter()
        image = next(entry for entry in project.images if entry.image_name == image_name)
        hierarchy = image.hierarchy
        count = len(hierarchy.annotations) + len(hierarchy.detections)
        done = time.perf_counter()
    print(
        f"paquo {project_dir.name:<22} {count:>8} objects  {done - opened:7.2f} s reading "
        f"({count / (done - opened):7.0f} objects/s), {opened - start:.2f} s to start QuPath and open the project"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--synthetic", type=int, default=20000, help="cells in the synthetic file (0 to skip)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed reads per file; the best is reported")
    args = parser.parse_args()

    shared = Path(os.environ.get("NUCLASS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    project_dir = shared / "qupath" / "cmu1_cells"
    if project_dir.is_dir():
        image = QuPathProjectFiles(project_dir).image("CMU-1-Small-Region.svs")
        report("cmu1_cells (3802 cells)", image.qpdata_path, args.repeat)
        time_paquo(project_dir, image.image_name)
    else:
        print(f"cmu1_cells: skipped, {project_dir} not found (set NUCLASS_SHARED_DATA)")

    if args.synthetic > 0:
        from qupath_fixtures import QpdataWriter, synthetic_cells

        with tempfile.TemporaryDirectory() as folder:
            path = QpdataWriter().write(Path(folder) / "synthetic.qpdata", synthetic_cells(args.synthetic))
            report(f"synthetic ({args.synthetic} cells)", path, args.repeat)

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process: {peak_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

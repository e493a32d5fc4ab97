"""Synthetic Xenium runs written in 10x's native file layouts, co-registered with CMU-1.

The nuclei are real: QuPath 0.6.0's cell detection on CMU-1-Small-Region.svs
(its GeoJSON export in the shared test data). Each nucleus is moved by a small
random jitter, as Xenium's DAPI segmentation would differ from QuPath's, and
placed in Xenium µm through a known affine (rotation, scale, shift) that plays
the part of 10x's image-alignment matrix. Expression follows a known class per
cell: Poisson counts with the class's positive markers raised, immune classes
also expressing PTPRC, and some noise cells with only a few transcripts.
Transcripts get quality values, and some fall below Q20, so that counting them
must reproduce the Q20 cell-feature matrix exactly.

Writers produce each file as Xenium Onboard Analysis does: parquet and
csv.gz tables, the 10x HDF5 matrix, the MEX folder, ``cells.zarr.zip`` (zarr
v2 zip store), boundaries and the alignment CSV.
"""

from __future__ import annotations

import gzip
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

PIXEL_SIZE_UM = 0.2125
# Test files need not be small; level 1 keeps writing them fast.
FAST_GZIP = {"method": "gzip", "compresslevel": 1}
CMU1_MPP = 0.499
TRUE_CLASSES = (
    "Epithelial",
    "Fibroblast",
    "Smooth muscle",
    "Endothelial",
    "T cell",
    "B cell",
    "Plasma cell",
    "Macrophage",
    "Mast cell",
)
IMMUNE_CLASSES = ("T cell", "B cell", "Plasma cell", "Macrophage", "Mast cell")
# Real genes outside the default panel, measured as background.
FILLER_GENES = (
    "MKI67", "TOP2A", "ESR1", "PGR", "ERBB2", "FOXA1", "GATA3", "AR", "CCND1", "MYC",
    "BCL2", "CD274", "PDCD1", "LAG3", "FOXP3", "GZMB", "NKG7", "IL7R", "CCR7", "SELL",
    "LYVE1", "PROX1", "RGS5", "PDGFRB", "MMP2", "POSTN", "SFRP4", "CXCL12", "VIM", "SPARC",
    "ANKRD30A", "SCD", "FASN", "KRT14", "KRT17", "TFF1", "AGR3", "MUC1", "CEACAM6", "S100A4",
)  # fmt: skip
CONTROLS = (
    ("NegControlProbe_00002", "Negative Control Probe"),
    ("NegControlProbe_00041", "Negative Control Probe"),
    ("NegControlCodeword_0500", "Negative Control Codeword"),
    ("NegControlCodeword_0517", "Negative Control Codeword"),
    ("BLANK_0006", "Blank Codeword"),
    ("UnassignedCodeword_0003", "Unassigned Codeword"),
)


@dataclass
class QuPathNuclei:
    """QuPath's nuclei on CMU-1: centroids (level-0 px) and outlines."""

    ids: list[str]
    centroids_px: np.ndarray
    polygons: list


def load_qupath_nuclei(geojson_path: Path) -> QuPathNuclei:
    """Read the nucleus outlines of QuPath's cells from its GeoJSON export."""
    import shapely.geometry

    features = json.loads(Path(geojson_path).read_text(encoding="utf-8"))["features"]
    ids, polygons = [], []
    for feature in features:
        if feature["properties"].get("objectType") != "cell":
            continue
        ids.append(feature["id"])
        polygons.append(shapely.geometry.shape(feature["nucleusGeometry"]))
    centroids = np.array([[p.centroid.x, p.centroid.y] for p in polygons])
    return QuPathNuclei(ids=ids, centroids_px=centroids, polygons=polygons)


def known_alignment(angle_deg: float = 30.0, shift_px: tuple[float, float] = (9000.0, 2500.0)) -> np.ndarray:
    """H&E px -> morphology px: rotation, the scale between the two pixel sizes, a shift."""
    scale = CMU1_MPP / PIXEL_SIZE_UM
    angle = math.radians(angle_deg)
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    return np.array([[cos, -sin, shift_px[0]], [sin, cos, shift_px[1]], [0.0, 0.0, 1.0]])


def he_px_to_um(xy_px: np.ndarray, alignment: np.ndarray) -> np.ndarray:
    """Apply the alignment and the morphology pixel size, written out independently of the package."""
    xy_px = np.asarray(xy_px, dtype=np.float64).reshape(-1, 2)
    homogeneous = np.c_[xy_px, np.ones(len(xy_px))]
    return (homogeneous @ alignment.T)[:, :2] * PIXEL_SIZE_UM


def xenium_id_string(prefix: int, suffix: int) -> str:
    """10x's cell id string: the prefix as 8 hex digits shifted into letters a-p, then '-suffix'."""
    hex_digits = f"{prefix:08x}"
    return "".join(chr(ord("a") + int(d, 16)) for d in hex_digits) + f"-{suffix}"


@dataclass
class SyntheticRun:
    """A simulated Xenium run over real nuclei, with the truth needed to check the readers."""

    cell_ids: np.ndarray
    int_ids: np.ndarray
    id_prefix: np.ndarray
    true_class: np.ndarray
    noise: np.ndarray
    mixed: np.ndarray
    he_px: np.ndarray
    nucleus_um: np.ndarray
    cell_um: np.ndarray
    nucleus_polygons_um: list
    features: pd.DataFrame
    counts: sp.csr_matrix
    transcripts: pd.DataFrame
    alignment: np.ndarray

    @property
    def gene_mask(self) -> np.ndarray:
        return (self.features["feature_type"] == "Gene Expression").to_numpy()


def simulate_run(
    nuclei: QuPathNuclei,
    panel,
    *,
    n_cells: int | None = None,
    seed: int = 0,
    jitter_um: float = 1.0,
    noise_share: float = 0.08,
    mixed_share: float = 0.05,
    marker_rate: float = 3.0,
    marker_dropout: float = 0.3,
    background_rate: float = 0.3,
    low_qv_share: float = 0.15,
    n_unassigned: int = 2000,
) -> SyntheticRun:
    """Simulate a Xenium run whose nuclei are QuPath's, jittered, with a known class per cell."""
    import shapely.affinity

    rng = np.random.default_rng(seed)
    order = np.arange(len(nuclei.ids)) if n_cells is None else rng.choice(len(nuclei.ids), n_cells, replace=False)
    order = np.sort(order)
    n = len(order)
    alignment = known_alignment()

    # Positions: jitter each QuPath nucleus, then map to µm.
    jitter_px = rng.normal(0.0, jitter_um / CMU1_MPP, size=(n, 2))
    polygons_px = [
        shapely.affinity.translate(nuclei.polygons[i], xoff=dx, yoff=dy) for i, (dx, dy) in zip(order, jitter_px)
    ]
    he_px = np.array([[p.centroid.x, p.centroid.y] for p in polygons_px])
    a, b, c, d, xoff, yoff = (
        alignment[0, 0], alignment[0, 1], alignment[1, 0], alignment[1, 1], alignment[0, 2], alignment[1, 2]
    )  # fmt: skip
    polygons_um = [
        shapely.affinity.scale(
            shapely.affinity.affine_transform(p, [a, b, c, d, xoff, yoff]), PIXEL_SIZE_UM, PIXEL_SIZE_UM, origin=(0, 0)
        )
        for p in polygons_px
    ]
    nucleus_um = np.array([[p.centroid.x, p.centroid.y] for p in polygons_um])
    cell_um = nucleus_um + rng.normal(0.0, 0.5, size=(n, 2))

    # Features: panel markers of the true classes, PTPRC, fillers, controls.
    genes: list[str] = []
    for name in TRUE_CLASSES:
        for gene in panel.get(name).positive:
            if gene not in genes:
                genes.append(gene)
    genes += ["PTPRC", *FILLER_GENES]
    names = genes + [c[0] for c in CONTROLS]
    feature_types = ["Gene Expression"] * len(genes) + [c[1] for c in CONTROLS]
    features = pd.DataFrame(
        {"id": [f"ENSG{i:011d}" for i in range(len(names))], "name": names, "feature_type": feature_types}
    )
    gene_index = {g: i for i, g in enumerate(names)}

    # Rates: background everywhere, raised for the true class's markers, each
    # marker silent in some cells. Mixed cells carry the markers of a second
    # class as well, as doublets or segmentation errors do.
    true_class = rng.choice(np.array(TRUE_CLASSES, dtype=object), size=n)
    second_class = rng.choice(np.array(TRUE_CLASSES, dtype=object), size=n)
    draw = rng.random(n)
    noise = draw < noise_share
    mixed = (draw >= noise_share) & (draw < noise_share + mixed_share) & (second_class != true_class)
    rates = np.full((n, len(names)), background_rate)
    rates[:, len(genes):] = 0.05
    for name in TRUE_CLASSES:
        columns = [gene_index[g] for g in panel.get(name).positive]
        for rows in (true_class == name, mixed & (second_class == name)):
            rates[np.ix_(rows, columns)] = marker_rate
            if name in IMMUNE_CLASSES:
                rates[rows, gene_index["PTPRC"]] = marker_rate
    marker_columns = np.zeros(len(names), dtype=bool)
    marker_columns[[gene_index[g] for name in TRUE_CLASSES for g in panel.get(name).positive]] = True
    silent = (rng.random((n, len(names))) < marker_dropout) & marker_columns
    rates[silent] = background_rate
    rates *= rng.lognormal(0.0, 0.3, size=(n, 1))
    rates[noise] = 0.01
    all_counts = rng.poisson(rates)
    true_class[noise] = ""

    # Transcripts: one row per molecule, some below Q20, plus unassigned ones.
    cell_rows, feature_cols = np.nonzero(all_counts)
    repeats = all_counts[cell_rows, feature_cols]
    tx_cell = np.repeat(cell_rows, repeats)
    tx_feature = np.repeat(feature_cols, repeats)
    low = rng.random(len(tx_cell)) < low_qv_share
    qv = np.where(low, rng.uniform(5.0, 19.9, len(tx_cell)), rng.uniform(20.0, 40.0, len(tx_cell)))
    xy = nucleus_um[tx_cell] + rng.normal(0.0, 2.0, size=(len(tx_cell), 2))
    lo, hi = nucleus_um.min(axis=0), nucleus_um.max(axis=0)
    un_xy = rng.uniform(lo, hi, size=(n_unassigned, 2))
    un_feature = rng.integers(0, len(names), n_unassigned)
    prefix = (np.arange(n, dtype=np.int64) * 7919 + 1432 * 65536 + 17).astype(np.uint32)
    string_ids = np.array([xenium_id_string(int(p), 1) for p in prefix], dtype=object)
    int_ids = np.arange(1, n + 1)
    transcripts = pd.DataFrame(
        {
            "transcript_id": np.arange(len(tx_cell) + n_unassigned, dtype=np.uint64) + 281474976710656,
            "cell_row": np.r_[tx_cell, np.full(n_unassigned, -1)],
            "overlaps_nucleus": np.r_[np.ones(len(tx_cell), dtype=np.uint8), np.zeros(n_unassigned, np.uint8)],
            "feature_name": np.array(names, dtype=object)[np.r_[tx_feature, un_feature]],
            "x_location": np.r_[xy[:, 0], un_xy[:, 0]].astype(np.float32),
            "y_location": np.r_[xy[:, 1], un_xy[:, 1]].astype(np.float32),
            "z_location": rng.uniform(10.0, 20.0, len(tx_cell) + n_unassigned).astype(np.float32),
            "qv": np.r_[qv, rng.uniform(20.0, 40.0, n_unassigned)].astype(np.float32),
        }
    )
    passed = transcripts["qv"].to_numpy() >= 20.0
    assigned = transcripts["cell_row"].to_numpy() >= 0
    keep = passed & assigned
    counts = sp.coo_matrix(
        (
            np.ones(int(keep.sum()), dtype=np.int32),
            (transcripts["cell_row"].to_numpy()[keep], pd.Index(names).get_indexer(transcripts["feature_name"][keep])),
        ),
        shape=(n, len(names)),
    ).tocsr()
    counts.sum_duplicates()
    return SyntheticRun(
        cell_ids=string_ids,
        int_ids=int_ids,
        id_prefix=prefix,
        true_class=true_class,
        noise=noise,
        mixed=mixed,
        he_px=he_px,
        nucleus_um=nucleus_um,
        cell_um=cell_um,
        nucleus_polygons_um=polygons_um,
        features=features,
        counts=counts,
        transcripts=transcripts,
        alignment=alignment,
    )


# ---------------------------------------------------------------- writers


def _ids(run: SyntheticRun, id_style: str) -> np.ndarray:
    return run.cell_ids if id_style == "string" else run.int_ids


def write_experiment(root: Path, *, version: str = "xenium-2.0.0.10") -> None:
    root.mkdir(parents=True, exist_ok=True)
    experiment = {
        "major_version": 5,
        "minor_version": 0,
        "run_name": "synthetic_cmu1",
        "region_name": "cmu1",
        "panel_name": "synthetic",
        "panel_organism": "Human",
        "pixel_size": PIXEL_SIZE_UM,
        "analysis_sw_version": version,
        "images": {"morphology_focus_filepath": "morphology_focus/morphology_focus_0000.ome.tif"},
    }
    (root / "experiment.xenium").write_text(json.dumps(experiment, indent=4), encoding="utf-8")


def cells_frame(run: SyntheticRun, id_style: str) -> pd.DataFrame:
    """The columns of 10x's cells table, with counts from the Q20 matrix."""
    types = run.features["feature_type"].to_numpy()

    def per_type(label: str) -> np.ndarray:
        return np.asarray(run.counts[:, types == label].sum(axis=1)).ravel()

    return pd.DataFrame(
        {
            "cell_id": _ids(run, id_style),
            "x_centroid": run.cell_um[:, 0],
            "y_centroid": run.cell_um[:, 1],
            "transcript_counts": per_type("Gene Expression"),
            "control_probe_counts": per_type("Negative Control Probe"),
            "control_codeword_counts": per_type("Negative Control Codeword"),
            "unassigned_codeword_counts": per_type("Unassigned Codeword"),
            "deprecated_codeword_counts": np.zeros(len(run.cell_ids), dtype=np.int64),
            "total_counts": np.asarray(run.counts.sum(axis=1)).ravel(),
            "cell_area": np.array([p.area for p in run.nucleus_polygons_um]) * 2.5,
            "nucleus_area": np.array([p.area for p in run.nucleus_polygons_um]),
        }
    )


def write_cells(root: Path, run: SyntheticRun, fmt: str, *, id_style: str = "string") -> Path:
    frame = cells_frame(run, id_style)
    if fmt == "parquet":
        path = root / "cells.parquet"
        frame.to_parquet(path, index=False)
    elif fmt == "csv.gz":
        path = root / "cells.csv.gz"
        frame.to_csv(path, index=False, compression=FAST_GZIP)
    elif fmt == "zarr":
        path = root / "cells.zarr.zip"
        write_cells_zarr(path, run)
    else:
        raise ValueError(fmt)
    return path


def write_cells_zarr(path: Path, run: SyntheticRun) -> None:
    """Write ``cells.zarr.zip`` as XOA 2.x does: uint32 (prefix, suffix) ids and a cell_summary array."""
    import zarr

    summary_columns = [
        "cell_centroid_x", "cell_centroid_y", "cell_area",
        "nucleus_centroid_x", "nucleus_centroid_y", "nucleus_area", "z_level", "nucleus_count",
    ]  # fmt: skip
    areas = np.array([p.area for p in run.nucleus_polygons_um])
    summary = np.c_[
        run.cell_um, areas * 2.5, run.nucleus_um, areas, np.zeros(len(areas)), np.ones(len(areas))
    ].astype(np.float64)
    ids = np.c_[run.id_prefix, np.ones(len(run.id_prefix))].astype(np.uint32)
    store = zarr.storage.ZipStore(path, mode="w")
    try:
        # Attributes go in at creation: a zip member cannot be rewritten.
        root = zarr.create_group(
            store, zarr_format=2, attributes={"major_version": 5, "minor_version": 0, "number_cells": len(ids)}
        )
        root.create_array("cell_id", data=ids, chunks=(min(len(ids), 1000), 2))
        root.create_array(
            "cell_summary",
            data=summary,
            chunks=(min(len(ids), 1000), 8),
            attributes={"column_names": summary_columns},
        )
    finally:
        store.close()


def write_matrix_h5(root: Path, run: SyntheticRun, *, id_style: str = "string") -> Path:
    """Write ``cell_feature_matrix.h5`` in the 10x HDF5 layout (features × barcodes, CSC)."""
    import h5py

    path = root / "cell_feature_matrix.h5"
    csr = run.counts.tocsr()
    barcodes = np.array([str(i) for i in _ids(run, id_style)], dtype="S")
    with h5py.File(path, "w") as handle:
        matrix = handle.create_group("matrix")
        matrix.create_dataset("data", data=csr.data.astype(np.uint32))
        matrix.create_dataset("indices", data=csr.indices.astype(np.int64))
        matrix.create_dataset("indptr", data=csr.indptr.astype(np.int64))
        matrix.create_dataset("shape", data=np.array([csr.shape[1], csr.shape[0]], dtype=np.int32))
        matrix.create_dataset("barcodes", data=barcodes)
        features = matrix.create_group("features")
        features.create_dataset("id", data=run.features["id"].to_numpy().astype("S"))
        features.create_dataset("name", data=run.features["name"].to_numpy().astype("S"))
        features.create_dataset("feature_type", data=run.features["feature_type"].to_numpy().astype("S"))
        features.create_dataset("genome", data=np.array(["Unknown"] * len(run.features), dtype="S"))
        features.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
    return path


def write_matrix_mex(root: Path, run: SyntheticRun, *, id_style: str = "string") -> Path:
    """Write the ``cell_feature_matrix/`` MEX folder: gzipped matrix.mtx, barcodes.tsv, features.tsv."""
    import scipy.io

    folder = root / "cell_feature_matrix"
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    scipy.io.mmwrite(buffer, run.counts.T.tocoo().astype(np.int64))
    (folder / "matrix.mtx.gz").write_bytes(gzip.compress(buffer.getvalue()))
    barcodes = "\n".join(str(i) for i in _ids(run, id_style)) + "\n"
    (folder / "barcodes.tsv.gz").write_bytes(gzip.compress(barcodes.encode()))
    features = run.features[["id", "name", "feature_type"]].to_csv(sep="\t", header=False, index=False)
    (folder / "features.tsv.gz").write_bytes(gzip.compress(features.encode()))
    return folder


def transcripts_frame(run: SyntheticRun, id_style: str) -> pd.DataFrame:
    frame = run.transcripts.copy()
    rows = frame.pop("cell_row").to_numpy()
    if id_style == "string":
        ids = np.where(rows >= 0, run.cell_ids[np.maximum(rows, 0)], "UNASSIGNED")
    else:
        ids = np.where(rows >= 0, run.int_ids[np.maximum(rows, 0)], -1)
    frame.insert(1, "cell_id", ids)
    return frame


def write_transcripts(root: Path, run: SyntheticRun, fmt: str, *, id_style: str = "string") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = transcripts_frame(run, id_style)
    if fmt == "parquet":
        path = root / "transcripts.parquet"
        table = pa.Table.from_pandas(frame, preserve_index=False)
        # Xenium Onboard Analysis 1.x wrote feature_name as binary; keep that quirk.
        names = pa.array([s.encode() for s in frame["feature_name"]], type=pa.binary())
        table = table.set_column(table.schema.get_field_index("feature_name"), "feature_name", names)
        pq.write_table(table, path)
    elif fmt == "csv.gz":
        path = root / "transcripts.csv.gz"
        frame.to_csv(path, index=False, compression=FAST_GZIP)
    else:
        raise ValueError(fmt)
    return path


def boundaries_frame(run: SyntheticRun, id_style: str, *, with_label_id: bool) -> pd.DataFrame:
    ids = _ids(run, id_style)
    rings = [np.asarray(polygon.exterior.coords) for polygon in run.nucleus_polygons_um]
    lengths = np.array([len(r) for r in rings])
    coords = np.concatenate(rings).astype(np.float32)
    frame = pd.DataFrame({"cell_id": np.repeat(ids, lengths), "vertex_x": coords[:, 0], "vertex_y": coords[:, 1]})
    if with_label_id:
        frame["label_id"] = np.repeat(np.arange(1, len(rings) + 1), lengths)
    return frame


def write_boundaries(root: Path, run: SyntheticRun, fmt: str, *, id_style: str = "string") -> Path:
    frame = boundaries_frame(run, id_style, with_label_id=id_style == "string")
    if fmt == "parquet":
        path = root / "nucleus_boundaries.parquet"
        frame.to_parquet(path, index=False)
    elif fmt == "csv.gz":
        path = root / "nucleus_boundaries.csv.gz"
        frame.to_csv(path, index=False, compression=FAST_GZIP)
    else:
        raise ValueError(fmt)
    return path


def write_alignment(path: Path, matrix: np.ndarray) -> Path:
    """Write a 3×3 matrix as 10x's image-alignment CSV: no header, comma-separated."""
    lines = [",".join(repr(float(v)) for v in row) for row in np.asarray(matrix)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# Layouts of the bundles the tests read: name -> (cells, matrix, transcripts, boundaries, id style).
LAYOUTS = {
    "xoa2_parquet_h5": ("parquet", "h5", "parquet", "parquet", "string"),
    "xoa1_csv_mex": ("csv.gz", "mex", None, "csv.gz", "integer"),
    "zarr_cells_transcripts": ("zarr", None, "parquet", None, "string"),
    "transcripts_and_boundaries": (None, None, "csv.gz", "csv.gz", "integer"),
}


def write_bundle(root: Path, run: SyntheticRun, layout: str) -> Path:
    """Write ``run`` in one of :data:`LAYOUTS` under ``root``; return the folder."""
    cells, matrix, transcripts, boundaries, id_style = LAYOUTS[layout]
    write_experiment(root, version="xenium-1.0.2" if id_style == "integer" else "xenium-2.0.0.10")
    if cells:
        write_cells(root, run, cells, id_style=id_style)
    if matrix == "h5":
        write_matrix_h5(root, run, id_style=id_style)
    elif matrix == "mex":
        write_matrix_mex(root, run, id_style=id_style)
    if transcripts:
        write_transcripts(root, run, transcripts, id_style=id_style)
    if boundaries:
        write_boundaries(root, run, boundaries, id_style=id_style)
    write_alignment(root / "cmu1_he_imagealignment.csv", run.alignment)
    return root


# ---------------------------------------------------------------- pytest fixtures

@pytest.fixture(scope="session")
def qupath_nuclei(shared_data: Path) -> QuPathNuclei:
    """QuPath 0.6.0's 3802 nuclei on CMU-1-Small-Region.svs."""
    return load_qupath_nuclei(shared_data / "qupath" / "cmu1_cells" / "export" / "CMU-1-Small-Region.svs.geojson")


@pytest.fixture(scope="session")
def default_panel():
    from nuclass_qupath.xenium.panel import load_panel

    return load_panel()


@pytest.fixture(scope="session")
def synthetic_run(qupath_nuclei: QuPathNuclei, default_panel) -> SyntheticRun:
    return simulate_run(qupath_nuclei, default_panel, seed=0)


@pytest.fixture(scope="session")
def bundle_dirs(tmp_path_factory: pytest.TempPathFactory, synthetic_run: SyntheticRun) -> dict[str, Path]:
    """The synthetic run written once in every layout of :data:`LAYOUTS`."""
    base = tmp_path_factory.mktemp("xenium_bundles")
    return {layout: write_bundle(base / layout, synthetic_run, layout) for layout in LAYOUTS}

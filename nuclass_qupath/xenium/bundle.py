"""Read a 10x Xenium output bundle into an AnnData of cells × genes.

Every file layout that Xenium Onboard Analysis has written is accepted:

* cells: ``cells.parquet``, ``cells.csv.gz`` (or uncompressed ``cells.csv``)
  or ``cells.zarr.zip``; without any of these, the cells and their centroids
  come from the nucleus or cell boundary files.
* counts: ``cell_feature_matrix.h5`` (10x HDF5), the ``cell_feature_matrix/``
  MEX folder. When neither exists, the counts are made from
  ``transcripts.parquet``, ``transcripts.csv.gz`` or ``transcripts.csv`` with
  the cut ``qv >= qv_min``. 10x's output documentation states that its own
  matrices count only transcripts of Q20 and above.
* boundaries: ``nucleus_boundaries`` and ``cell_boundaries`` as parquet or
  CSV vertex lists (``cell_id, vertex_x, vertex_y`` in µm).

Tables re-written by R (a leading unnamed row-index column, uncompressed CSV)
load as well. Coordinates stay in Xenium µm here; see
:mod:`nuclass_qupath.xenium.registration` for the mapping onto the H&E.
"""

from __future__ import annotations

import gzip
import json
import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import shapely

from nuclass_qupath.errors import XeniumError

logger = logging.getLogger(__name__)

GENE_EXPRESSION = "Gene Expression"
# Probes and codewords that measure background, not genes. 10x marks them with
# a feature_type other than "Gene Expression" in the matrix. Transcript tables
# have no feature type, so there the name prefix identifies them.
CONTROL_PREFIXES = (
    "NegControlProbe_",
    "NegControlCodeword_",
    "BLANK_",
    "UnassignedCodeword_",
    "DeprecatedCodeword_",
    "antisense_",
    "Intergenic_",
)
UNASSIGNED_CELL_IDS = frozenset({"UNASSIGNED", "-1", ""})

CELLS_FILES = ("cells.parquet", "cells.csv.gz", "cells.csv", "cells.zarr.zip")
MATRIX_FILES = ("cell_feature_matrix.h5", "cell_feature_matrix")
TRANSCRIPTS_FILES = ("transcripts.parquet", "transcripts.csv.gz", "transcripts.csv")
NUCLEUS_BOUNDARY_FILES = ("nucleus_boundaries.parquet", "nucleus_boundaries.csv.gz", "nucleus_boundaries.csv")
CELL_BOUNDARY_FILES = ("cell_boundaries.parquet", "cell_boundaries.csv.gz", "cell_boundaries.csv")
# Column order of cells.zarr.zip's cell_summary, used only when the array has
# no "column_names" attribute.
CELL_SUMMARY_COLUMNS = (
    "cell_centroid_x",
    "cell_centroid_y",
    "cell_area",
    "nucleus_centroid_x",
    "nucleus_centroid_y",
    "nucleus_area",
    "z_level",
    "nucleus_count",
)


@dataclass(frozen=True)
class BundleFiles:
    """The files of one Xenium bundle that the reader uses; ``None`` where absent."""

    root: Path
    experiment: Path | None
    cells: Path | None
    matrix: Path | None
    transcripts: Path | None
    nucleus_boundaries: Path | None
    cell_boundaries: Path | None

    def describe(self) -> dict[str, str | None]:
        """Return the file name used for each part, for logs and run summaries."""
        return {
            "experiment": _name(self.experiment),
            "cells": _name(self.cells),
            "matrix": _name(self.matrix),
            "transcripts": _name(self.transcripts),
            "nucleus_boundaries": _name(self.nucleus_boundaries),
            "cell_boundaries": _name(self.cell_boundaries),
        }


def _name(path: Path | None) -> str | None:
    return path.name if path is not None else None


def _first_existing(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        candidate = root / name
        if name == "cell_feature_matrix":
            if candidate.is_dir():
                return candidate
        elif candidate.is_file():
            return candidate
    return None


def find_bundle_files(path: str | Path) -> BundleFiles:
    """Locate the files of a Xenium output folder.

    Raises
    ------
    XeniumError
        If ``path`` is not a folder, has no cell table (cells file or
        boundaries), or has neither a cell-feature matrix nor transcripts.
    """
    root = Path(path)
    if not root.is_dir():
        raise XeniumError(f"Xenium bundle folder not found: {root}")
    files = BundleFiles(
        root=root,
        experiment=_first_existing(root, ("experiment.xenium",)),
        cells=_first_existing(root, CELLS_FILES),
        matrix=_first_existing(root, MATRIX_FILES),
        transcripts=_first_existing(root, TRANSCRIPTS_FILES),
        nucleus_boundaries=_first_existing(root, NUCLEUS_BOUNDARY_FILES),
        cell_boundaries=_first_existing(root, CELL_BOUNDARY_FILES),
    )
    if files.cells is None and files.nucleus_boundaries is None and files.cell_boundaries is None:
        looked_for = CELLS_FILES + NUCLEUS_BOUNDARY_FILES + CELL_BOUNDARY_FILES
        raise XeniumError(
            f"Xenium bundle {root} has no cell table: looked for {', '.join(looked_for)}. "
            "Point to the Xenium output folder ('outs') of the run."
        )
    if files.matrix is None and files.transcripts is None:
        looked_for = ("cell_feature_matrix.h5", "cell_feature_matrix/") + TRANSCRIPTS_FILES
        raise XeniumError(
            f"Xenium bundle {root} has no counts: looked for {', '.join(looked_for)}. "
            "Point to the Xenium output folder ('outs') of the run."
        )
    return files


def is_control_feature(name: str, feature_type: str = GENE_EXPRESSION) -> bool:
    """Return True for negative-control probes, codewords and other non-gene features."""
    return feature_type != GENE_EXPRESSION or name.startswith(CONTROL_PREFIXES)


def cell_id_strings(prefix: np.ndarray, suffix: np.ndarray) -> np.ndarray:
    """Convert ``cells.zarr.zip`` cell ids, uint32 (prefix, dataset suffix) pairs, to strings.

    10x writes each prefix as 8 hexadecimal digits shifted into letters
    (0 -> 'a' ... 15 -> 'p'), joined to the suffix with '-': prefix 1 with
    suffix 1 is ``"aaaaaaab-1"``.
    """
    prefix = np.asarray(prefix, dtype=np.uint32)
    shifts = np.array([28, 24, 20, 16, 12, 8, 4, 0], dtype=np.uint32)
    nibbles = (prefix[:, None] >> shifts) & 0xF
    letters = (nibbles + ord("a")).astype(np.uint8)
    heads = letters.view("S8").ravel().astype("U8")
    tails = np.char.add("-", np.asarray(suffix).astype(np.int64).astype("U"))
    return np.char.add(heads, tails)


def _id_strings(values: pd.Series) -> np.ndarray:
    """Normalise a cell-id column (bytes, integers or strings) to strings."""
    if values.empty:
        return np.array([], dtype=object)
    if pd.api.types.is_float_dtype(values):
        return values.fillna(-1).astype(np.int64).astype(str).to_numpy(dtype=object)
    if pd.api.types.is_integer_dtype(values):
        return values.astype(np.int64).astype(str).to_numpy(dtype=object)
    first = values.dropna().iloc[0] if values.notna().any() else ""
    if isinstance(first, bytes):
        return values.str.decode("utf-8").fillna("").to_numpy(dtype=object)
    return values.astype(str).to_numpy(dtype=object)


def _text_strings(values: pd.Series) -> np.ndarray:
    first = values.dropna().iloc[0] if values.notna().any() else ""
    if isinstance(first, bytes):
        return values.str.decode("utf-8").to_numpy(dtype=object)
    return values.astype(str).to_numpy(dtype=object)


def _read_table(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a parquet or CSV table, dropping the unnamed row-index column that R writes."""
    wanted = set(columns) if columns else None
    try:
        if path.name.endswith(".parquet"):
            if wanted is None:
                frame = pd.read_parquet(path)
            else:
                import pyarrow.parquet as pq

                present = [c for c in pq.read_schema(path).names if c in wanted]
                frame = pd.read_parquet(path, columns=present)
        else:
            usecols = (lambda c: c in wanted) if wanted is not None else None
            frame = pd.read_csv(path, usecols=usecols)
    except (OSError, ValueError) as exc:
        raise XeniumError(f"cannot read Xenium table {path}: {exc}") from exc
    unnamed = [c for c in frame.columns if str(c) == "" or str(c).startswith("Unnamed: ")]
    if unnamed:
        frame = frame.drop(columns=unnamed)
    if columns:
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise XeniumError(f"Xenium table {path} is missing columns {missing}; it has {list(frame.columns)}")
    return frame


def _read_experiment(files: BundleFiles, pixel_size_um: float | None) -> dict:
    experiment: dict = {}
    if files.experiment is not None:
        try:
            experiment = json.loads(files.experiment.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise XeniumError(f"cannot read {files.experiment} as JSON: {exc}") from exc
    if pixel_size_um is None:
        pixel_size_um = experiment.get("pixel_size")
    if pixel_size_um is None:
        where = files.experiment or files.root / "experiment.xenium"
        raise XeniumError(
            f"no pixel size for Xenium bundle {files.root}: {where} is missing or has no 'pixel_size'. "
            "Pass pixel_size_um (µm per morphology-image pixel, 0.2125 on current instruments)."
        )
    if not np.isfinite(pixel_size_um) or pixel_size_um <= 0:
        raise XeniumError(f"invalid pixel_size {pixel_size_um!r} in {files.experiment}; expected µm/px > 0")
    experiment["pixel_size"] = float(pixel_size_um)
    return experiment


# ---------------------------------------------------------------- cells


def _cells_from_table(path: Path) -> pd.DataFrame:
    frame = _read_table(path)
    for column in ("cell_id", "x_centroid", "y_centroid"):
        if column not in frame.columns:
            raise XeniumError(f"Xenium cells table {path} is missing column {column!r}; it has {list(frame.columns)}")
    frame["cell_id"] = _id_strings(frame["cell_id"])
    return frame


def _cells_from_zarr(path: Path) -> pd.DataFrame:
    import zarr

    try:
        store = zarr.storage.ZipStore(path, mode="r")
        root = zarr.open_group(store, mode="r")
        raw_ids = np.asarray(root["cell_id"][...])
        summary = root["cell_summary"]
        values = np.asarray(summary[...], dtype=np.float64)
        names = summary.attrs.get("column_names")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise XeniumError(
            f"cannot read {path} as a Xenium cells.zarr.zip (needs arrays 'cell_id' and 'cell_summary'): {exc}"
        ) from exc
    if raw_ids.ndim == 2 and raw_ids.shape[1] == 2:
        ids = cell_id_strings(raw_ids[:, 0], raw_ids[:, 1])
    elif raw_ids.ndim == 1:
        # Xenium Onboard Analysis before 1.3 numbered cells with plain integers.
        ids = raw_ids.astype(np.int64).astype(str)
    else:
        raise XeniumError(f"{path}: 'cell_id' has shape {raw_ids.shape}; expected (N,) or (N, 2)")
    if names is None:
        # NOTE: the column order of files without the attribute is assumed from
        # 10x's documentation of the array; no such file was available to check.
        names = list(CELL_SUMMARY_COLUMNS[: values.shape[1]])
    names = [str(n) for n in names]
    if values.ndim != 2 or values.shape != (len(ids), len(names)):
        raise XeniumError(
            f"{path}: 'cell_summary' has shape {values.shape}, expected ({len(ids)}, {len(names)}) "
            f"for columns {names}"
        )
    frame = pd.DataFrame(values, columns=names)
    for needed in ("cell_centroid_x", "cell_centroid_y"):
        if needed not in frame.columns:
            raise XeniumError(f"{path}: 'cell_summary' is missing column {needed!r}; it has {names}")
    frame = frame.rename(columns={"cell_centroid_x": "x_centroid", "cell_centroid_y": "y_centroid"})
    frame.insert(0, "cell_id", ids.astype(object))
    return frame


def _cells_from_boundaries(files: BundleFiles) -> pd.DataFrame:
    """Build a cells table from boundary polygons: cell centroid first, nucleus where no cell outline."""
    frames = []
    for kind, path in (("cell", files.cell_boundaries), ("nucleus", files.nucleus_boundaries)):
        if path is None:
            continue
        shapes = read_boundaries(files.root, kind=kind)
        centroids = _centroids(shapes.to_numpy())
        frames.append(
            pd.DataFrame(
                {"cell_id": shapes.index.to_numpy(dtype=object), "x": centroids[:, 0], "y": centroids[:, 1]}
            )
        )
    merged = pd.concat(frames).drop_duplicates("cell_id", keep="first").reset_index(drop=True)
    return merged.rename(columns={"x": "x_centroid", "y": "y_centroid"})


# ---------------------------------------------------------------- counts


def _read_matrix_h5(path: Path) -> tuple[sp.csr_matrix, np.ndarray, pd.DataFrame]:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            group = handle["matrix"]
            shape = tuple(int(n) for n in group["shape"][...])
            matrix = sp.csc_matrix(
                (group["data"][...], group["indices"][...], group["indptr"][...]), shape=shape
            )
            barcodes = group["barcodes"][...].astype(str)
            features = group["features"]
            var = pd.DataFrame(
                {
                    "gene_ids": features["id"][...].astype(str),
                    "feature_types": features["feature_type"][...].astype(str),
                },
                index=pd.Index(features["name"][...].astype(str), name=None),
            )
    except (OSError, KeyError, ValueError) as exc:
        raise XeniumError(
            f"cannot read {path} as a 10x HDF5 matrix (group 'matrix' with data, indices, indptr, shape, "
            f"barcodes and features/id, name, feature_type): {exc}"
        ) from exc
    return matrix.T.tocsr(), barcodes.astype(object), var


def _open_maybe_gz(folder: Path, name: str):
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return gzip.open(candidate, "rb") if candidate.suffix == ".gz" else open(candidate, "rb")
    raise XeniumError(f"MEX folder {folder} is missing {name}.gz (or {name})")


def _read_matrix_mex(folder: Path) -> tuple[sp.csr_matrix, np.ndarray, pd.DataFrame]:
    import scipy.io

    try:
        with _open_maybe_gz(folder, "matrix.mtx") as handle:
            matrix = sp.csr_matrix(scipy.io.mmread(handle)).T.tocsr()
        with _open_maybe_gz(folder, "barcodes.tsv") as handle:
            barcodes = pd.read_csv(handle, sep="\t", header=None, dtype=str)[0].to_numpy(dtype=object)
        with _open_maybe_gz(folder, "features.tsv") as handle:
            features = pd.read_csv(handle, sep="\t", header=None, dtype=str)
    except (OSError, ValueError) as exc:
        raise XeniumError(f"cannot read MEX matrix in {folder}: {exc}") from exc
    if features.shape[1] < 2:
        raise XeniumError(f"{folder}/features.tsv needs at least id and name columns, got {features.shape[1]}")
    types = features[2] if features.shape[1] > 2 else pd.Series([GENE_EXPRESSION] * len(features))
    var = pd.DataFrame(
        {"gene_ids": features[0].to_numpy(), "feature_types": types.to_numpy()},
        index=pd.Index(features[1].to_numpy(), name=None),
    )
    if matrix.shape != (len(barcodes), len(var)):
        raise XeniumError(
            f"MEX matrix in {folder} is {matrix.shape[1]} features × {matrix.shape[0]} cells, but the folder "
            f"lists {len(var)} features and {len(barcodes)} barcodes"
        )
    return matrix, barcodes, var


def _count_transcripts(
    path: Path, cell_ids: np.ndarray, qv_min: float
) -> tuple[sp.csr_matrix, np.ndarray, pd.DataFrame]:
    """Count transcripts per cell and feature, keeping ``qv >= qv_min`` and assigned transcripts only."""
    table = _read_table(path, ["cell_id", "feature_name", "qv"])
    features = _text_strings(table["feature_name"])
    feature_names, feature_codes = np.unique(features.astype(str), return_inverse=True)
    tx_cells = _id_strings(table["cell_id"])
    quality = table["qv"].to_numpy(dtype=np.float64)

    assigned = ~np.isin(tx_cells, list(UNASSIGNED_CELL_IDS))
    passed = quality >= qv_min
    cell_index = pd.Index(cell_ids)
    rows = cell_index.get_indexer(tx_cells)
    known = rows >= 0
    keep = assigned & passed & known
    logger.info(
        "counted %d of %d transcripts from %s (qv >= %g: %d, assigned to a cell: %d, of a cell in the "
        "cells table: %d)",
        int(keep.sum()),
        len(table),
        path.name,
        qv_min,
        int(passed.sum()),
        int(assigned.sum()),
        int((assigned & known).sum()),
    )
    counts = sp.coo_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (rows[keep], feature_codes[keep])),
        shape=(len(cell_ids), len(feature_names)),
    ).tocsr()
    counts.sum_duplicates()
    types = [GENE_EXPRESSION if not is_control_feature(n) else "Control" for n in feature_names]
    var = pd.DataFrame({"gene_ids": feature_names, "feature_types": types}, index=pd.Index(feature_names))
    return counts, cell_ids, var


# ---------------------------------------------------------------- boundaries


def polygons_from_vertices(
    ids: np.ndarray, xy: np.ndarray, *, parts: np.ndarray | None = None, source: str = "boundaries"
) -> pd.Series:
    """Build one shapely geometry per id from a vertex list (rows of one polygon need not be contiguous).

    Rings are closed where the last vertex does not repeat the first. Polygons
    of fewer than three distinct vertices are dropped with a warning. Ids with
    several parts (``parts`` differs within an id) become MultiPolygons.
    """
    ids = np.asarray(ids, dtype=object)
    id_codes, _ = pd.factorize(ids, sort=False)
    if parts is None:
        # Without part labels, each contiguous run of rows of one id is one outline.
        part_codes = np.cumsum(np.r_[True, id_codes[1:] != id_codes[:-1]]) if len(ids) else id_codes
    else:
        part_codes, _ = pd.factorize(np.asarray(parts), sort=False)
    codes, _ = pd.factorize(id_codes.astype(np.int64) * (int(part_codes.max(initial=0)) + 1) + part_codes, sort=False)
    order = np.argsort(codes, kind="stable")
    codes = codes[order]
    xy = np.asarray(xy, dtype=np.float64)[order]
    ids = ids[order]
    if not np.isfinite(xy).all():
        raise XeniumError(f"{source} has vertices that are not finite numbers")

    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    ends = np.r_[starts[1:], len(codes)]
    closed = np.all(xy[starts] == xy[ends - 1], axis=1)
    distinct = (ends - starts) - closed.astype(int)
    valid_group = distinct >= 3
    if not valid_group.all():
        logger.warning(
            "%s: dropped %d outlines with fewer than 3 vertices", source, int((~valid_group).sum())
        )
    group_of_row = np.repeat(np.arange(len(starts)), ends - starts)
    keep_rows = valid_group[group_of_row]
    # Drop the repeated closing vertex; shapely closes every ring again.
    last_row = np.zeros(len(codes), dtype=bool)
    last_row[ends[closed] - 1] = True
    keep_rows &= ~last_row
    ring_index = (np.cumsum(valid_group) - 1)[group_of_row]
    rings = shapely.linearrings(xy[keep_rows], indices=ring_index[keep_rows])
    polygons = shapely.polygons(rings)
    group_ids = ids[starts[valid_group]]

    index_name = "cell_id"
    if not pd.Index(group_ids).duplicated().any():
        return pd.Series(polygons, index=pd.Index(group_ids.astype(str), name=index_name), dtype=object)
    # Several outlines of one cell (nuclei of a multinucleate cell) become a MultiPolygon.
    id_codes, unique_ids = pd.factorize(group_ids, sort=False)
    by_id = np.argsort(id_codes, kind="stable")
    merged = shapely.multipolygons(polygons[by_id], indices=id_codes[by_id])
    counts = np.bincount(id_codes)
    first_polygon = polygons[by_id][np.r_[0, np.cumsum(counts)[:-1]]]
    geometries = np.where(counts == 1, first_polygon, merged)
    return pd.Series(geometries, index=pd.Index(np.asarray(unique_ids).astype(str), name=index_name), dtype=object)



def read_boundaries(path: str | Path, *, kind: str = "nucleus") -> pd.Series:
    """Read nucleus or cell boundaries of a bundle as shapely polygons in Xenium µm.

    Parameters
    ----------
    path
        Bundle folder.
    kind
        ``"nucleus"`` or ``"cell"``.

    Returns
    -------
    pandas.Series
        One shapely geometry per cell, indexed by cell id (string): a Polygon,
        or a MultiPolygon for a cell with several nuclei.

    Raises
    ------
    XeniumError
        If the bundle has no boundaries of that kind or the table is malformed.
    """
    names = {"nucleus": NUCLEUS_BOUNDARY_FILES, "cell": CELL_BOUNDARY_FILES}.get(kind)
    if names is None:
        raise XeniumError(f"boundary kind must be 'nucleus' or 'cell', got {kind!r}")
    root = Path(path)
    file = _first_existing(root, names)
    if file is None:
        raise XeniumError(f"Xenium bundle {root} has no {kind} boundaries: looked for {', '.join(names)}")
    table = _read_table(file)
    for column in ("cell_id", "vertex_x", "vertex_y"):
        if column not in table.columns:
            raise XeniumError(f"boundary table {file} is missing column {column!r}; it has {list(table.columns)}")
    ids = _id_strings(table["cell_id"])
    # label_id (Xenium Onboard Analysis 2.0 and later) distinguishes the nuclei of one cell.
    parts = table["label_id"].to_numpy() if "label_id" in table.columns else None
    xy = table[["vertex_x", "vertex_y"]].to_numpy(dtype=np.float64)
    return polygons_from_vertices(ids, xy, parts=parts, source=str(file))


# ---------------------------------------------------------------- assembly


def read_xenium(
    path: str | Path,
    *,
    qv_min: float = 20.0,
    pixel_size_um: float | None = None,
) -> ad.AnnData:
    """Read a Xenium output bundle into an AnnData of gene counts per cell.

    Parameters
    ----------
    path
        The Xenium output folder (the one holding ``experiment.xenium``).
    qv_min
        Minimum transcript quality (Phred-scaled) counted when the counts are
        made from the transcripts table. 10x's own matrices use 20.
    pixel_size_um
        µm per pixel of the morphology image; read from ``experiment.xenium``
        when ``None``.

    Returns
    -------
    anndata.AnnData
        ``X``: sparse float32 counts of gene features only. ``obs_names``: Xenium
        cell ids. ``obs``: ``x_centroid``, ``y_centroid`` (cell centroid, µm),
        ``nucleus_centroid_x``/``_y`` (µm, NaN where unknown),
        ``transcript_counts`` (gene transcripts), ``control_counts`` (control
        probes and codewords), ``nucleus_area`` (µm², NaN where unknown).
        ``obsm["spatial"]``: cell centroids in µm. ``var``: ``gene_ids``,
        ``feature_types``. ``uns["xenium"]``: pixel size, run metadata,
        the files read and the control features left out of ``X``.

    Raises
    ------
    XeniumError
        If the bundle lacks cells or counts, or a file is malformed.
    """
    started = time.perf_counter()
    files = find_bundle_files(path)
    experiment = _read_experiment(files, pixel_size_um)

    # Cells
    if files.cells is None:
        cells = _cells_from_boundaries(files)
    elif files.cells.name.endswith(".zarr.zip"):
        cells = _cells_from_zarr(files.cells)
    else:
        cells = _cells_from_table(files.cells)
    if cells["cell_id"].duplicated().any():
        repeated = cells.loc[cells["cell_id"].duplicated(), "cell_id"].head(5).tolist()
        raise XeniumError(f"cell ids repeat in the cells of {files.root}, for example {repeated}")
    cell_ids = cells["cell_id"].to_numpy(dtype=object)

    # Counts
    if files.matrix is not None:
        if files.matrix.is_dir():
            counts, barcodes, var = _read_matrix_mex(files.matrix)
        else:
            counts, barcodes, var = _read_matrix_h5(files.matrix)
        counts = _align_rows(counts, barcodes, cell_ids, files.matrix)
        counts_source = files.matrix.name
    else:
        counts, _, var = _count_transcripts(files.transcripts, cell_ids, qv_min)
        counts_source = f"{files.transcripts.name} (qv >= {qv_min:g})"
    counts = sp.csr_matrix(counts, dtype=np.float32)

    # Controls out of X
    control = np.array(
        [is_control_feature(name, ftype) for name, ftype in zip(var.index, var["feature_types"])], dtype=bool
    )
    gene_counts = counts[:, ~control]
    control_counts = np.asarray(counts[:, control].sum(axis=1)).ravel()
    genes = var.loc[~control].copy()
    genes.index = genes.index.astype(str)
    if genes.index.duplicated().any():
        genes.index = pd.Index(_unique_names(genes.index.tolist()))

    obs = pd.DataFrame(index=pd.Index(cell_ids.astype(str), name="cell_id"))
    obs["x_centroid"] = cells["x_centroid"].to_numpy(dtype=np.float64)
    obs["y_centroid"] = cells["y_centroid"].to_numpy(dtype=np.float64)
    nucleus_xy, nucleus_area = _nucleus_geometry(files, cells, obs.index)
    obs["nucleus_centroid_x"] = nucleus_xy[:, 0]
    obs["nucleus_centroid_y"] = nucleus_xy[:, 1]
    obs["transcript_counts"] = np.asarray(gene_counts.sum(axis=1)).ravel().astype(np.int64)
    obs["control_counts"] = control_counts.astype(np.int64)
    obs["nucleus_area"] = nucleus_area
    if "cell_area" in cells.columns:
        obs["cell_area"] = cells["cell_area"].to_numpy(dtype=np.float64)

    adata = ad.AnnData(X=gene_counts, obs=obs, var=genes)
    adata.obsm["spatial"] = obs[["x_centroid", "y_centroid"]].to_numpy(dtype=np.float64)
    adata.uns["xenium"] = {
        "path": str(files.root),
        "pixel_size_um": experiment["pixel_size"],
        "files": {k: v for k, v in files.describe().items() if v is not None},
        "counts_source": counts_source,
        "qv_min": float(qv_min),
        "control_features": var.index[control].astype(str).tolist(),
        "experiment": _plain(experiment),
    }
    elapsed = time.perf_counter() - started
    logger.info(
        "read Xenium bundle %s: %d cells, %d genes, %d control features, counts from %s, in %.2f s",
        files.root,
        adata.n_obs,
        adata.n_vars,
        int(control.sum()),
        counts_source,
        elapsed,
    )
    return adata


def _align_rows(counts: sp.csr_matrix, barcodes: np.ndarray, cell_ids: np.ndarray, source: Path) -> sp.csr_matrix:
    """Reorder matrix rows to the cells table; cells absent from the matrix get zero counts."""
    barcodes = np.asarray([str(b) for b in barcodes], dtype=object)
    if len(barcodes) == len(cell_ids) and np.array_equal(barcodes, cell_ids.astype(str)):
        return counts
    rows = pd.Index(barcodes).get_indexer(cell_ids.astype(str))
    found = rows >= 0
    if not found.any():
        raise XeniumError(
            f"no cell id of the cells table appears in {source}: cells {list(cell_ids[:3])}, "
            f"matrix barcodes {list(barcodes[:3])}"
        )
    if not found.all():
        logger.warning(
            "%d of %d cells of the cells table are missing from %s; their counts are set to zero",
            int((~found).sum()),
            len(cell_ids),
            source.name,
        )
    selector = sp.csr_matrix(
        (np.ones(int(found.sum()), dtype=np.float32), (np.flatnonzero(found), rows[found])),
        shape=(len(cell_ids), counts.shape[0]),
    )
    return (selector @ counts).tocsr()


def _nucleus_geometry(files: BundleFiles, cells: pd.DataFrame, index: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    """Return nucleus centroids (µm) and areas (µm²): from the cells table, else from nucleus boundaries."""
    xy = np.full((len(index), 2), np.nan)
    area = np.full(len(index), np.nan)
    if {"nucleus_centroid_x", "nucleus_centroid_y"} <= set(cells.columns):
        xy[:, 0] = cells["nucleus_centroid_x"].to_numpy(dtype=np.float64)
        xy[:, 1] = cells["nucleus_centroid_y"].to_numpy(dtype=np.float64)
    if "nucleus_area" in cells.columns:
        area = cells["nucleus_area"].to_numpy(dtype=np.float64)
    if np.isfinite(xy).all() and np.isfinite(area).all():
        return xy, area
    if files.nucleus_boundaries is None:
        return xy, area
    shapes = read_boundaries(files.root, kind="nucleus")
    positions = index.get_indexer(shapes.index)
    found = positions >= 0
    geometries = shapes.to_numpy()[found]
    rows = positions[found]
    fill_xy = ~np.isfinite(xy[rows]).all(axis=1)
    centroids = _centroids(geometries)
    xy[rows[fill_xy]] = centroids[fill_xy]
    fill_area = ~np.isfinite(area[rows])
    area[rows[fill_area]] = shapely.area(geometries)[fill_area]
    return xy, area


def _centroids(geometries: np.ndarray) -> np.ndarray:
    """Return the ``(N, 2)`` centroids of an array of shapely geometries."""
    return shapely.get_coordinates(shapely.centroid(geometries)).reshape(-1, 2)


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        out.append(name if count == 0 else f"{name}-{count}")
        seen[name] = count + 1
    return out


def _plain(value):
    """Convert JSON values into types AnnData can store in ``uns`` (no None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value if v is not None]
    return value

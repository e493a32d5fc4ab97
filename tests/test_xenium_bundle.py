"""Reading Xenium bundles: every 10x layout, the real mouse-brain patches, and broken bundles."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import shapely

from nuclass_qupath.errors import NuclassError, XeniumError
from nuclass_qupath.xenium.bundle import (
    CONTROL_PREFIXES,
    cell_id_strings,
    find_bundle_files,
    is_control_feature,
    read_boundaries,
    read_xenium,
)

# The fixtures module is also loaded as a plugin below; mark it before importing from it.
pytest.register_assert_rewrite("xenium_fixtures")
from xenium_fixtures import (  # noqa: E402
    CONTROLS,
    LAYOUTS,
    PIXEL_SIZE_UM,
    write_alignment,
    write_cells,
    write_experiment,
    write_transcripts,
    xenium_id_string,
)

# Session fixtures (bundles written once) shared by every Xenium test module.
pytest_plugins = ["xenium_fixtures"]


def _expected_ids(run, layout):
    id_style = LAYOUTS[layout][4]
    return run.cell_ids.astype(str) if id_style == "string" else run.int_ids.astype(str)


def _gene_counts(run) -> pd.DataFrame:
    genes = run.features.loc[run.gene_mask, "name"].to_numpy()
    return pd.DataFrame(run.counts[:, run.gene_mask].toarray(), columns=genes)


# ---------------------------------------------------------------- cell ids


def test_cell_id_strings_match_10x_examples():
    # Examples of 10x's cell id encoding, as used by spatialdata-io's tests.
    prefix = np.array([1, 1437536272, 1437536273], dtype=np.uint32)
    suffix = np.array([1, 1, 2])
    assert cell_id_strings(prefix, suffix).tolist() == ["aaaaaaab-1", "ffkpbaba-1", "ffkpbabb-2"]


def test_cell_id_strings_cover_uint32_range():
    rng = np.random.default_rng(1)
    prefix = np.r_[0, 2**32 - 1, rng.integers(0, 2**32, 200)].astype(np.uint32)
    suffix = rng.integers(1, 5, len(prefix))
    expected = [xenium_id_string(int(p), int(s)) for p, s in zip(prefix, suffix)]
    assert cell_id_strings(prefix, suffix).tolist() == expected
    assert expected[0] == "aaaaaaaa-" + str(suffix[0])
    assert expected[1].startswith("pppppppp-")


def test_control_features_recognised():
    for prefix in CONTROL_PREFIXES:
        assert is_control_feature(prefix + "0001")
    assert is_control_feature("CD3E", "Negative Control Probe")
    assert not is_control_feature("CD3E")
    assert not is_control_feature("BLANKET1")


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_read_layout_reproduces_simulated_run(layout, bundle_dirs, synthetic_run):
    run = synthetic_run
    adata = read_xenium(bundle_dirs[layout])

    assert adata.n_obs == len(run.cell_ids)
    assert adata.obs_names.tolist() == _expected_ids(run, layout).tolist()
    expected = _gene_counts(run)
    assert sorted(adata.var_names) == sorted(expected.columns)
    observed = pd.DataFrame(adata.X.toarray(), columns=adata.var_names)[expected.columns]
    assert np.array_equal(observed.to_numpy(), expected.to_numpy())
    assert np.array_equal(adata.obs["transcript_counts"].to_numpy(), expected.sum(axis=1).to_numpy())

    controls = np.asarray(run.counts[:, ~run.gene_mask].sum(axis=1)).ravel()
    assert np.array_equal(adata.obs["control_counts"].to_numpy(), controls)
    assert sorted(adata.uns["xenium"]["control_features"]) == sorted(name for name, _ in CONTROLS)
    assert not any(name.startswith(CONTROL_PREFIXES) for name in adata.var_names)

    nucleus = adata.obs[["nucleus_centroid_x", "nucleus_centroid_y"]].to_numpy()
    assert np.abs(nucleus - run.nucleus_um).max() < 1e-3
    assert adata.obsm["spatial"].shape == (adata.n_obs, 2)
    true_area = np.array([p.area for p in run.nucleus_polygons_um])
    assert np.allclose(adata.obs["nucleus_area"].to_numpy(), true_area, rtol=1e-3)
    assert adata.uns["xenium"]["pixel_size_um"] == PIXEL_SIZE_UM


def test_read_cell_centroids_from_cells_table(bundle_dirs, synthetic_run):
    adata = read_xenium(bundle_dirs["xoa2_parquet_h5"])
    assert np.abs(adata.obsm["spatial"] - synthetic_run.cell_um).max() < 1e-9
    assert adata.uns["xenium"]["files"]["cells"] == "cells.parquet"
    assert adata.uns["xenium"]["counts_source"] == "cell_feature_matrix.h5"


def test_read_transcripts_applies_quality_cut(bundle_dirs, synthetic_run):
    transcripts = synthetic_run.transcripts
    assigned = transcripts["cell_row"].to_numpy() >= 0
    is_gene = ~transcripts["feature_name"].str.startswith(CONTROL_PREFIXES).to_numpy()
    for qv_min in (0.0, 20.0, 30.0):
        adata = read_xenium(bundle_dirs["zarr_cells_transcripts"], qv_min=qv_min)
        passed = transcripts["qv"].to_numpy() >= qv_min
        assert adata.obs["transcript_counts"].sum() == int((assigned & passed & is_gene).sum())
        assert adata.uns["xenium"]["qv_min"] == qv_min


def test_read_boundaries_gives_polygons_per_cell(bundle_dirs, synthetic_run):
    for layout in ("xoa2_parquet_h5", "xoa1_csv_mex"):
        shapes = read_boundaries(bundle_dirs[layout], kind="nucleus")
        assert shapes.index.tolist() == _expected_ids(synthetic_run, layout).tolist()
        assert all(g.geom_type == "Polygon" and g.is_valid for g in shapes)
        areas = np.array([g.area for g in shapes])
        true_area = np.array([p.area for p in synthetic_run.nucleus_polygons_um])
        assert np.allclose(areas, true_area, rtol=1e-3)


def test_read_boundaries_multinucleate_cell_is_multipolygon(tmp_path):
    square = [(0, 0), (4, 0), (4, 4), (0, 4), (0, 0)]
    frame = pd.DataFrame(
        {
            "cell_id": ["aaaaaaab-1"] * 10 + ["aaaaaaac-1"] * 5,
            "vertex_x": [x for x, _ in square] + [x + 10 for x, _ in square] + [x + 20 for x, _ in square],
            "vertex_y": [y for _, y in square] * 3,
            "label_id": [1] * 5 + [2] * 5 + [3] * 5,
        }
    )
    frame.to_parquet(tmp_path / "nucleus_boundaries.parquet", index=False)
    shapes = read_boundaries(tmp_path, kind="nucleus")
    assert shapes.index.tolist() == ["aaaaaaab-1", "aaaaaaac-1"]
    assert shapes["aaaaaaab-1"].geom_type == "MultiPolygon"
    assert len(shapes["aaaaaaab-1"].geoms) == 2
    assert shapes["aaaaaaab-1"].area == pytest.approx(32.0)
    assert shapes["aaaaaaac-1"].geom_type == "Polygon"


def test_find_bundle_files_reports_layout(bundle_dirs):
    files = find_bundle_files(bundle_dirs["xoa1_csv_mex"]).describe()
    assert files["cells"] == "cells.csv.gz"
    assert files["matrix"] == "cell_feature_matrix"
    assert files["transcripts"] is None
    assert files["nucleus_boundaries"] == "nucleus_boundaries.csv.gz"


# ---------------------------------------------------------------- real data


@pytest.mark.parametrize("sample", ["sample1", "sample2"])
def test_read_mouse_brain_mini(sample, shared_data):
    folder = shared_data / "xenium" / "mouse_brain_mini" / sample
    adata = read_xenium(folder)

    # Expected values, computed here from the raw R-written CSVs.
    transcripts = pd.read_csv(folder / "transcripts.csv")
    nuclei = pd.read_csv(folder / "nucleus_boundaries.csv")
    cells = pd.read_csv(folder / "cell_boundaries.csv")
    cell_ids = list(dict.fromkeys(cells["cell_id"].astype(str).tolist() + nuclei["cell_id"].astype(str).tolist()))
    is_control = transcripts["feature_name"].str.startswith(CONTROL_PREFIXES)
    counted = transcripts[(transcripts["qv"] >= 20) & transcripts["cell_id"].astype(str).isin(cell_ids)].copy()
    counted["cell"] = counted["cell_id"].astype(str)
    counted_control = counted["feature_name"].str.startswith(CONTROL_PREFIXES)
    per_cell = counted[~counted_control].groupby("cell").size()
    controls = counted[counted_control].groupby("cell").size()

    assert sorted(adata.obs_names) == sorted(cell_ids)
    assert set(adata.var_names) == set(transcripts.loc[~is_control, "feature_name"])
    expected_counts = per_cell.reindex(adata.obs_names, fill_value=0).to_numpy()
    assert np.array_equal(adata.obs["transcript_counts"].to_numpy(), expected_counts)
    assert np.array_equal(np.asarray(adata.X.sum(axis=1)).ravel(), expected_counts)
    expected_controls = controls.reindex(adata.obs_names, fill_value=0).to_numpy()
    assert np.array_equal(adata.obs["control_counts"].to_numpy(), expected_controls)

    # Centroids lie inside the outlines they come from; nucleus data only where there is a nucleus.
    outlines = cells.groupby(cells["cell_id"].astype(str))
    for cell_id, rows in outlines:
        polygon = shapely.Polygon(rows[["vertex_x", "vertex_y"]].to_numpy())
        point = shapely.Point(adata.obs.loc[cell_id, ["x_centroid", "y_centroid"]].to_numpy())
        assert polygon.contains(point)
    with_nucleus = adata.obs_names.isin(nuclei["cell_id"].astype(str).unique())
    assert (adata.obs.loc[with_nucleus, "nucleus_area"] > 0).all()
    assert adata.obs.loc[~with_nucleus, "nucleus_area"].isna().all()
    assert adata.uns["xenium"]["pixel_size_um"] == pytest.approx(0.2125)
    assert adata.uns["xenium"]["experiment"]["panel_name"] == "Xenium Mouse Brain GEX"


# ---------------------------------------------------------------- bad input


def test_bundle_without_cells_raises(tmp_path, synthetic_run):
    write_experiment(tmp_path)
    write_transcripts(tmp_path, synthetic_run, "parquet")
    with pytest.raises(XeniumError) as info:
        read_xenium(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "cells.parquet" in message
    assert "nucleus_boundaries.parquet" in message


def test_bundle_without_counts_raises(tmp_path, synthetic_run):
    write_experiment(tmp_path)
    write_cells(tmp_path, synthetic_run, "parquet")
    with pytest.raises(XeniumError) as info:
        read_xenium(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "cell_feature_matrix.h5" in message
    assert "transcripts.parquet" in message


def test_missing_bundle_folder_raises(tmp_path):
    with pytest.raises(XeniumError, match="not found"):
        read_xenium(tmp_path / "absent")


def test_bundle_without_pixel_size_raises(tmp_path, bundle_dirs):
    folder = tmp_path / "bundle"
    shutil.copytree(bundle_dirs["zarr_cells_transcripts"], folder)
    (folder / "experiment.xenium").unlink()
    with pytest.raises(XeniumError, match="pixel_size"):
        read_xenium(folder)
    adata = read_xenium(folder, pixel_size_um=0.2125)
    assert adata.uns["xenium"]["pixel_size_um"] == 0.2125


def test_h5_without_features_raises(tmp_path, bundle_dirs):
    folder = tmp_path / "bundle"
    shutil.copytree(bundle_dirs["xoa2_parquet_h5"], folder)
    with h5py.File(folder / "cell_feature_matrix.h5", "a") as handle:
        del handle["matrix/features"]
    with pytest.raises(XeniumError) as info:
        read_xenium(folder)
    assert "cell_feature_matrix.h5" in str(info.value)
    assert isinstance(info.value, NuclassError)


def test_cells_table_without_centroids_raises(tmp_path, bundle_dirs):
    folder = tmp_path / "bundle"
    shutil.copytree(bundle_dirs["xoa2_parquet_h5"], folder)
    frame = pd.read_parquet(folder / "cells.parquet").drop(columns=["x_centroid"])
    frame.to_parquet(folder / "cells.parquet", index=False)
    with pytest.raises(XeniumError, match="x_centroid"):
        read_xenium(folder)


def test_matrix_missing_cells_get_zero_counts(tmp_path, bundle_dirs, synthetic_run, caplog):
    folder = tmp_path / "bundle"
    shutil.copytree(bundle_dirs["xoa2_parquet_h5"], folder)
    frame = pd.read_parquet(folder / "cells.parquet")
    extra = frame.iloc[:1].assign(cell_id="zzzzzzzz-9")
    pd.concat([frame, extra]).to_parquet(folder / "cells.parquet", index=False)
    with caplog.at_level("WARNING"):
        adata = read_xenium(folder)
    assert adata.n_obs == len(synthetic_run.cell_ids) + 1
    assert adata.obs.loc["zzzzzzzz-9", "transcript_counts"] == 0
    assert "missing from cell_feature_matrix.h5" in caplog.text


def test_experiment_metadata_kept(bundle_dirs):
    adata = read_xenium(bundle_dirs["xoa2_parquet_h5"])
    experiment = json.loads((bundle_dirs["xoa2_parquet_h5"] / "experiment.xenium").read_text())
    assert adata.uns["xenium"]["experiment"]["analysis_sw_version"] == experiment["analysis_sw_version"]
    assert adata.uns["xenium"]["path"] == str(bundle_dirs["xoa2_parquet_h5"])


def test_alignment_file_is_not_mistaken_for_a_table(bundle_dirs, tmp_path):
    # A bundle folder often contains the H&E alignment CSV, which must not be read as cells.
    folder = tmp_path / "bundle"
    shutil.copytree(bundle_dirs["transcripts_and_boundaries"], folder)
    write_alignment(folder / "extra_imagealignment.csv", np.eye(3))
    files = find_bundle_files(folder)
    assert files.cells is None
    assert files.transcripts.name == "transcripts.csv.gz"


def test_cells_zarr_with_integer_ids(tmp_path, synthetic_run):
    # Xenium Onboard Analysis before 1.3 stored cell_id as one uint32 per cell.
    import zarr

    run = synthetic_run
    write_experiment(tmp_path, version="xenium-1.0.2")
    write_transcripts(tmp_path, run, "parquet", id_style="integer")
    summary = np.c_[run.cell_um, np.ones(len(run.int_ids)), run.nucleus_um, np.full(len(run.int_ids), 30.0)]
    store = zarr.storage.ZipStore(tmp_path / "cells.zarr.zip", mode="w")
    try:
        root = zarr.create_group(store, zarr_format=2)
        root.create_array("cell_id", data=run.int_ids.astype(np.uint32))
        root.create_array("cell_summary", data=summary)
    finally:
        store.close()
    adata = read_xenium(tmp_path)
    assert adata.obs_names.tolist() == run.int_ids.astype(str).tolist()
    assert np.abs(adata.obsm["spatial"] - run.cell_um).max() < 1e-9
    assert (adata.obs["nucleus_area"] == 30.0).all()
    gene_totals = np.asarray(run.counts[:, run.gene_mask].sum(axis=1)).ravel()
    assert np.array_equal(adata.obs["transcript_counts"].to_numpy(), gene_totals)


def test_corrupt_cells_zarr_raises(tmp_path, synthetic_run):
    write_experiment(tmp_path)
    write_transcripts(tmp_path, synthetic_run, "parquet")
    (tmp_path / "cells.zarr.zip").write_bytes(b"not a zip file")
    with pytest.raises(XeniumError, match="cells.zarr.zip"):
        read_xenium(tmp_path)

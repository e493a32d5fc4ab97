"""The training-set store: building, resuming, reading, and training from it.

Stores are built from real crops: CMU-1 cells exported by QuPath, labelled by
the tertile of QuPath's own ``Nucleus: Area`` measurement, and the NuCLS tiles
with their real class labels. Geometries are tiny so that each build takes a
second or two.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nuclass_qupath.cli import main
from nuclass_qupath.engine.classify import read_cell_crop
from nuclass_qupath.errors import CellsError, ModelError
from nuclass_qupath.model import ClassSpec, ModelConfig, load_model
from nuclass_qupath.slides import open_slide
from nuclass_qupath.training.dataset import CropSet, extract_crops
from nuclass_qupath.training.label_sources import LabelSource, read_labelled_cells, read_manifest
from nuclass_qupath.training.splits import split_groups
from nuclass_qupath.training.store import StoreGeometry, open_store, row_runs
from nuclass_qupath.training.store_build import STATE_FILE, BuildSettings, build_store
from nuclass_qupath.training.trainer import TrainOptions, _stage_plan, predict_crop_set, train_model

# Strides 8: EfficientNet-Lite stage 2, the feature stage of tiny_config.
TINY = StoreGeometry(
    mpp=0.5, local_crop_px=64, local_margin_px=8, context_px=256, context_encoder_px=64, context_margin_px=4,
    local_align_px=8, context_align_px=8,
)
# Crop sides: window + 2 margins rounded up to the stride, plus one stride.
LOCAL_PX, CONTEXT_PX = 88, 80
AREA_CLASSES = ["Nucleus: Area tertile 1", "Nucleus: Area tertile 2", "Nucleus: Area tertile 3"]
CHUNK = 16


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run the tiny models on one thread: on two shared cores a second thread only adds contention."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(class_names: list[str], geometry: StoreGeometry = TINY, **overrides) -> ModelConfig:
    values = dict(
        model_id="tiny",
        classes=[ClassSpec(name=name, color=(40 * i, 100, 200)) for i, name in enumerate(class_names)],
        local_feature_index=2,
        global_feature_index=2,
        embed_dim=16,
        gate_hidden=8,
        local_sigma_px=8.0,
        global_sigma_px=32.0,
        **geometry.config_values(),
    )
    values.update(overrides)
    return ModelConfig(**values)


# ---------------------------------------------------------------------------
# Fixtures: real labels on real slides


@pytest.fixture(scope="session")
def cmu1_area_table(shared_data: Path, tmp_path_factory) -> Path:
    """A xenium-labels style table of 120 CMU-1 cells labelled by their ``Nucleus: Area`` tertile.

    Every fifth row is left unlabelled (empty class, a reason) and must be
    skipped; confidences are the cell's circularity, a real measurement in 0-1.
    """
    from nuclass_qupath.cells.geojson import read_cells_geojson

    cells = read_cells_geojson(shared_data / "qupath" / "cmu1_cells" / "export" / "CMU-1-Small-Region.svs.geojson")
    measurements = [f["properties"]["measurements"] for f in cells.features]
    area = np.array([m["Nucleus: Area"] for m in measurements])
    circularity = np.array([m["Nucleus: Circularity"] for m in measurements])
    low, high = np.quantile(area, [1 / 3, 2 / 3])
    tertile = np.digitize(area, [low, high])
    path = tmp_path_factory.mktemp("cmu1") / "cmu1_area.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["cell_id", "x_px", "y_px", "class", "confidence", "reason"])
        for n, i in enumerate(range(0, len(cells), len(cells) // 150)):
            x, y = cells.centroids_px[i]
            if n % 5 == 4:
                writer.writerow([cells.ids[i], f"{x:.4f}", f"{y:.4f}", "", "", "low_confidence"])
            else:
                writer.writerow([cells.ids[i], f"{x:.4f}", f"{y:.4f}", AREA_CLASSES[tertile[i]], f"{circularity[i]:.4f}", ""])
    return path


@pytest.fixture(scope="session")
def cmu1_sources(cmu1_path: Path, cmu1_area_table: Path) -> list[LabelSource]:
    # Two "slides" of the same image and labels, so that chunks span a slide boundary.
    return [
        LabelSource(cmu1_path, cmu1_area_table, "cmu1-a", organ="skin", cohort="site-1"),
        LabelSource(cmu1_path, cmu1_area_table, "cmu1-b", organ="skin", cohort="site-2"),
    ]


@pytest.fixture(scope="session")
def cmu1_store(cmu1_sources, tmp_path_factory):
    path = tmp_path_factory.mktemp("stores") / "cmu1.zarr"
    return build_store(cmu1_sources, path, TINY, settings=BuildSettings(cells_per_chunk=CHUNK), workers=2)


@pytest.fixture(scope="session")
def nucls_manifest(shared_data: Path, tmp_path_factory) -> Path:
    """Manifest of the 15 NuCLS PNG tiles at 0.5 µm/px; the cohort is the tile's fold-0 split."""
    nucls = shared_data / "nucls"
    folder = tmp_path_factory.mktemp("nucls")
    path = folder / "manifest.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide", "labels", "organ", "cohort", "mpp"])
        for split in ("train", "test"):
            for png in sorted((nucls / split / "images").glob("*.png")):
                cohort = f"{split}-{int(png.stem.split('_')[1]) % 3}"
                writer.writerow([png, nucls / split / "labels" / f"{png.stem}.csv", "breast", cohort, "0.5"])
    return path


NUCLS_CLASSES = ["tumor_any", "nonTIL_stromal", "sTIL", "other_nucleus"]


@pytest.fixture(scope="session")
def nucls_store(shared_data: Path, nucls_manifest: Path, tmp_path_factory):
    """All 15 NuCLS tiles, built through the command line."""
    out = tmp_path_factory.mktemp("stores") / "nucls.zarr"
    args = [
        "build-store", str(nucls_manifest), "-o", str(out),
        "--label-map", str(shared_data / "nucls" / "label_map.yaml"),
        "--classes", "tumor_any=200,0,0", *NUCLS_CLASSES[1:],
        "--local-crop-px", "64", "--local-margin-px", "8", "--context-px", "256",
        "--context-encoder-px", "64", "--context-margin-px", "4", "--local-align-px", "8", "--context-align-px", "8",
        "--workers", "2",
    ]
    assert main(args) == 0
    return open_store(out)


@pytest.fixture(scope="session")
def small_nucls_store(shared_data: Path, tmp_path_factory):
    """Four NuCLS tiles in three cohorts: enough to train one epoch in seconds."""
    from nuclass_qupath.training.setup import read_label_map

    nucls = shared_data / "nucls"
    tiles = [("train", "train_1", "A"), ("train", "train_2", "A"), ("train", "train_3", "B"), ("test", "test_1", "C")]
    sources = [
        LabelSource(nucls / split / "images" / f"{name}.png", nucls / split / "labels" / f"{name}.csv", name, "breast", cohort, 0.5)
        for split, name, cohort in tiles
    ]
    settings = BuildSettings(label_map=read_label_map(nucls / "label_map.yaml"), cells_per_chunk=CHUNK)
    path = tmp_path_factory.mktemp("stores") / "small.zarr"
    return build_store(sources, path, TINY, classes=[ClassSpec(name=n, color=(9, 9, 9)) for n in NUCLS_CLASSES], settings=settings)


# ---------------------------------------------------------------------------
# Label sources


def test_xenium_table_skips_unlabelled_rows(cmu1_area_table):
    cells = read_labelled_cells(cmu1_area_table)
    with open(cmu1_area_table, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    kept = [row for row in rows if row["class"] and not row["reason"]]
    assert len(cells) == len(kept)
    assert cells.ids == [row["cell_id"] for row in kept]
    assert cells.confidence.tolist() == pytest.approx([float(row["confidence"]) for row in kept])
    assert set(cells.labels) == set(AREA_CLASSES)


def test_manifest_rejects_duplicate_slide_names(tmp_path, cmu1_path, cmu1_area_table):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"slide,labels\n{cmu1_path},{cmu1_area_table}\n{cmu1_path},{cmu1_area_table}\n", encoding="utf-8")
    with pytest.raises(CellsError, match="name"):
        read_manifest(manifest)


def test_manifest_rejects_missing_labels_file(tmp_path, cmu1_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"slide,labels,cohort\n{cmu1_path},nowhere.csv,A\n", encoding="utf-8")
    with pytest.raises(CellsError, match="nowhere.csv"):
        read_manifest(manifest)


# ---------------------------------------------------------------------------
# Building and reading


def test_store_crops_equal_extract_crops(cmu1_store, cmu1_path):
    centroids = cmu1_store.centroids_px
    with open_slide(cmu1_path) as slide:
        crops = extract_crops(slide, centroids, TINY)
    stored = cmu1_store.read_batch(np.arange(len(cmu1_store)))
    assert stored.local.shape == (len(cmu1_store), LOCAL_PX, LOCAL_PX, 3)
    assert stored.context.shape == (len(cmu1_store), CONTEXT_PX, CONTEXT_PX, 3)
    assert np.array_equal(stored.local, crops.local)
    assert np.array_equal(stored.context, crops.context)
    assert np.array_equal(stored.local_centres_px, crops.local_centres_px)
    assert np.array_equal(stored.context_centres_px, crops.context_centres_px)


def test_store_crops_equal_engine_exact_crops(cmu1_store, cmu1_path):
    # The engine's exact mode reads each cell with read_cell_crop and pools at the returned centre.
    stored = cmu1_store.read_batch(np.arange(len(cmu1_store)))
    with open_slide(cmu1_path) as slide:
        local_scale, context_scale = TINY.mpp / slide.mpp, TINY.context_mpp / slide.mpp
        for row in range(0, len(cmu1_store), 7):
            centre = cmu1_store.centroids_px[row]
            local, local_centre = read_cell_crop(slide, centre, local_scale, TINY.mpp, 64, 8, 8)
            context, context_centre = read_cell_crop(slide, centre, context_scale, TINY.context_mpp, 64, 4, 8)
            assert np.array_equal(stored.local[row], local), row
            assert np.array_equal(stored.context[row], context), row
            assert np.array_equal(stored.local_centres_px[row], local_centre.astype(np.float32)), row
            assert np.array_equal(stored.context_centres_px[row], context_centre.astype(np.float32)), row


def test_store_centres_within_one_stride(cmu1_store):
    local = cmu1_store.cell_array("local_centre_px")
    context = cmu1_store.cell_array("context_centre_px")
    # The crop starts on the stride grid at or before window/2 + margin left of the cell.
    assert local.dtype == np.float32
    assert local.shape == (len(cmu1_store), 2)
    assert np.all(local >= 64 / 2 + 8)
    assert np.all(local < 64 / 2 + 8 + 8)
    assert np.all(context >= 64 / 2 + 4)
    assert np.all(context < 64 / 2 + 4 + 8)


def test_store_cells_match_labels_file(cmu1_store, cmu1_area_table):
    cells = read_labelled_cells(cmu1_area_table)
    assert len(cmu1_store) == 2 * len(cells)
    first = cmu1_store.slides[0]
    assert first["rows"] == [0, len(cells)]
    rows = slice(*first["rows"])
    by_id = {cell_id: i for i, cell_id in enumerate(cells.ids)}
    source_index = np.array([by_id[c] for c in cmu1_store.cell_array("cell_id")[rows]])
    assert sorted(source_index.tolist()) == list(range(len(cells)))
    assert np.array_equal(cmu1_store.centroids_px[rows], cells.centroids_px[source_index])
    assert cmu1_store.class_names == AREA_CLASSES
    expected_labels = [AREA_CLASSES.index(cells.labels[i]) for i in source_index]
    assert cmu1_store.labels[rows].tolist() == expected_labels
    assert np.allclose(cmu1_store.confidence[rows], cells.confidence[source_index])
    assert set(cmu1_store.cell_array("cohort")[rows]) == {"site-1"}
    assert set(cmu1_store.cell_array("slide")[len(cells):]) == {"cmu1-b"}


def test_store_layout_and_attributes(cmu1_store, cmu1_path):
    import zarr

    group = zarr.open_group(str(cmu1_store.path), mode="r")
    local = group["local"]
    assert local.metadata.zarr_format == 3
    assert local.shards == (CHUNK, LOCAL_PX, LOCAL_PX, 3)
    assert local.chunks == (1, LOCAL_PX, LOCAL_PX, 3)
    codec = local.metadata.codecs[0].codecs[-1]
    assert (type(codec).__name__, codec.cname.value) == ("BloscCodec", "zstd")
    attrs = group.attrs["nuclass_store"]
    assert attrs["complete"] is True
    assert attrs["geometry"]["context_mpp"] == pytest.approx(2.0)
    assert attrs["geometry"]["local_crop_px"] == 64
    assert attrs["geometry"]["local_align_px"] == 8
    assert attrs["format_version"] == 2
    assert [c["name"] for c in attrs["classes"]] == AREA_CLASSES
    assert attrs["slides"][0]["slide"] == str(cmu1_path)
    assert attrs["slides"][0]["slide_mpp"] == pytest.approx(0.499)
    assert attrs["tool_version"]
    assert attrs["finished"] >= attrs["created"]


def test_store_reads_rows_in_any_order(cmu1_store):
    everything = cmu1_store.read_images(np.arange(len(cmu1_store)))
    rows = np.array([70, 3, 3, 150, 0, 71, len(cmu1_store) - 1])
    local, context = cmu1_store.read_images(rows)
    assert np.array_equal(local, everything[0][rows])
    assert np.array_equal(context, everything[1][rows])


def test_row_runs_groups_nearby_rows():
    assert row_runs(np.array([0, 1, 2, 5, 6, 20])) == [(0, 7), (20, 21)]
    assert row_runs(np.array([], dtype=np.int64)) == []


def test_build_rejects_store_of_other_inputs(cmu1_store, cmu1_sources):
    with pytest.raises(CellsError, match="--overwrite"):
        build_store(cmu1_sources, cmu1_store.path, TINY, settings=BuildSettings(cells_per_chunk=CHUNK, min_confidence=0.5))


def test_build_min_confidence_drops_cells(cmu1_sources, tmp_path, cmu1_store):
    settings = BuildSettings(cells_per_chunk=CHUNK, min_confidence=0.8)
    store = build_store(cmu1_sources[:1], tmp_path / "confident.zarr", TINY, settings=settings, workers=1)
    confidences = cmu1_store.confidence[slice(*cmu1_store.slides[0]["rows"])]
    assert len(store) == int((confidences >= 0.8).sum())
    assert store.confidence.min() >= 0.8


def test_build_resumes_after_interruption(cmu1_sources, cmu1_store, tmp_path):
    path = tmp_path / "resumed.zarr"
    settings = BuildSettings(cells_per_chunk=CHUNK)
    calls = []

    def stop_after_three_chunks(n: int, total: int) -> None:
        calls.append(n)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_store(cmu1_sources, path, TINY, settings=settings, workers=1, progress=stop_after_three_chunks)
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    assert state["chunks_done"] == [[0, 3]]
    with pytest.raises(CellsError, match="incomplete"):
        open_store(path).crops()

    # A half-written shard of the next chunk must be rewritten, the finished ones kept.
    shard = path / "context" / "c" / "3" / "0" / "0" / "0"
    shard.parent.mkdir(parents=True, exist_ok=True)
    shard.write_bytes(b"half a shard")
    kept = path / "local" / "c" / "1" / "0" / "0" / "0"
    kept_mtime = kept.stat().st_mtime_ns
    resumed_calls = []
    store = build_store(cmu1_sources, path, TINY, settings=settings, workers=1, progress=lambda n, t: resumed_calls.append(n))
    assert kept.stat().st_mtime_ns == kept_mtime
    assert sum(resumed_calls) == len(cmu1_store) - 3 * CHUNK

    resumed = store.read_images(np.arange(len(store)))
    reference = cmu1_store.read_images(np.arange(len(cmu1_store)))
    assert np.array_equal(resumed[0], reference[0])
    assert np.array_equal(resumed[1], reference[1])
    for name in ("label", "confidence", "cell_id", "slide", "cohort", "x_px", "y_px", "local_centre_px", "context_centre_px"):
        assert np.array_equal(store.cell_array(name), cmu1_store.cell_array(name)), name
    assert store.complete


@pytest.mark.slow
def test_build_resumes_after_kill(cmu1_sources, cmu1_store, tmp_path):
    path = tmp_path / "killed.zarr"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from nuclass_qupath.training.label_sources import LabelSource\n"
        "from nuclass_qupath.training.store import StoreGeometry\n"
        "from nuclass_qupath.training.store_build import BuildSettings, build_store\n"
        f"sources = [LabelSource(Path(s), Path(l), n, organ=o, cohort=c) for s, l, n, o, c in {[(str(s.slide_path), str(s.labels_path), s.name, s.organ, s.cohort) for s in cmu1_sources]!r}]\n"
        f"geometry = StoreGeometry(**{ {k: v for k, v in TINY.to_dict().items() if k != 'context_mpp'}!r})\n"
        f"build_store(sources, Path({str(path)!r}), geometry, settings=BuildSettings(cells_per_chunk={CHUNK}), workers=1,\n"
        "            progress=lambda n, t: time.sleep(0.5))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            state_path = path / STATE_FILE
            if state_path.is_file():
                done = json.loads(state_path.read_text(encoding="utf-8")).get("chunks_done") or []
                if sum(b - a for a, b in done) >= 2:
                    break
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not json.loads((path / STATE_FILE).read_text(encoding="utf-8")).get("complete")

    store = build_store(cmu1_sources, path, TINY, settings=BuildSettings(cells_per_chunk=CHUNK), workers=1)
    resumed = store.read_images(np.arange(len(store)))
    reference = cmu1_store.read_images(np.arange(len(cmu1_store)))
    assert np.array_equal(resumed[0], reference[0])
    assert np.array_equal(resumed[1], reference[1])
    assert not list(path.rglob("*.partial"))


def test_cli_built_store_holds_nucls_labels(nucls_store):
    assert len(nucls_store) == 584
    assert len(nucls_store.slides) == 15
    assert nucls_store.class_names == NUCLS_CLASSES
    assert nucls_store.classes[0].color == (200, 0, 0)
    assert dict(zip(nucls_store.class_names, np.bincount(nucls_store.labels).tolist())) == {
        "tumor_any": 89, "nonTIL_stromal": 95, "sTIL": 323, "other_nucleus": 77,
    }
    assert nucls_store.geometry == TINY


# ---------------------------------------------------------------------------
# Geometry


def test_model_rejects_store_of_other_geometry(cmu1_store, tmp_path):
    config = tiny_config(AREA_CLASSES, local_crop_px=96)
    with pytest.raises(ModelError, match="local_crop_px 64 vs 96"):
        cmu1_store.check_geometry(config)
    # Stage 3 of EfficientNet-Lite has stride 16, the store's crops are on a stride-8 grid.
    with pytest.raises(ModelError, match="local_align_px 8 vs 16"):
        cmu1_store.check_geometry(tiny_config(AREA_CLASSES, local_feature_index=3))
    crops = cmu1_store.crops()
    with pytest.raises(ModelError, match="geometry"):
        train_model(config, crops, None, tmp_path, TrainOptions(epochs=1, init="random"))


def test_crop_set_rejects_other_geometry():
    centres = np.full((2, 2), 40.0, np.float32)
    crops = CropSet(
        np.zeros((2, LOCAL_PX, LOCAL_PX, 3), np.uint8), np.zeros((2, CONTEXT_PX, CONTEXT_PX, 3), np.uint8),
        centres, centres, np.array([0, 1]), np.ones(2, np.float32), np.array(["a", "a"], dtype=object), AREA_CLASSES,
    )
    crops.check_geometry(tiny_config(AREA_CLASSES))
    with pytest.raises(ModelError, match="needs 88 and 88 px"):
        crops.check_geometry(tiny_config(AREA_CLASSES, context_margin_px=8))


def test_crop_set_rejects_other_stride():
    # A crop set that carries its geometry names the differing stride.
    centres = np.full((1, 2), 40.0, np.float32)
    crops = CropSet(
        np.zeros((1, LOCAL_PX, LOCAL_PX, 3), np.uint8), np.zeros((1, CONTEXT_PX, CONTEXT_PX, 3), np.uint8),
        centres, centres, np.array([0]), np.ones(1, np.float32), np.array(["a"], dtype=object), AREA_CLASSES, TINY,
    )
    with pytest.raises(ModelError, match="context_align_px 8 vs 16"):
        crops.check_geometry(tiny_config(AREA_CLASSES, global_feature_index=3))


def test_old_store_format_asks_for_rebuild(cmu1_store, tmp_path):
    import shutil

    import zarr

    path = tmp_path / "old.zarr"
    shutil.copytree(cmu1_store.path, path)
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs["nuclass_store"])
    attrs["format_version"] = 1
    group.attrs["nuclass_store"] = attrs
    with pytest.raises(CellsError, match="format version 1.*rebuild it with `nuclass-qupath build-store`"):
        open_store(path)


# ---------------------------------------------------------------------------
# Splits


def test_split_by_slide_keeps_slides_whole(nucls_store):
    crops = nucls_store.crops(group_by="slide")
    split = split_groups(crops.groups, test_groups=["test_1", "test_2"], val_fraction=0.25, seed=3)
    train, val, test = split.masks(crops.groups)
    assert not (train & val).any()
    assert not (train & test).any()
    assert not (val & test).any()
    assert (train | val | test).all()
    assert set(crops.groups[test]) == {"test_1", "test_2"}
    assert not set(crops.groups[train]) & set(crops.groups[val])
    assert len(split.val) == 3


def test_split_by_cohort_holds_cohort_out(nucls_store):
    crops = nucls_store.crops(group_by="cohort")
    split = split_groups(crops.groups, val_groups=["train-1"], test_groups=["test-0"], what="cohort")
    train, val, test = split.masks(crops.groups)
    cohorts = nucls_store.cell_array("cohort")[crops.rows]
    slides = nucls_store.cell_array("slide")[crops.rows]
    assert set(cohorts[test]) == {"test-0"}
    assert "test-0" not in set(cohorts[train]) | set(cohorts[val])
    parts = [set(slides[mask]) for mask in (train, val, test)]
    assert not parts[0] & parts[1]
    assert not parts[0] & parts[2]
    assert not parts[1] & parts[2]


def test_split_rejects_unknown_and_doubly_held_out_groups(nucls_store):
    groups = nucls_store.crops().groups
    with pytest.raises(CellsError, match="nowhere"):
        split_groups(groups, test_groups=["nowhere"])
    with pytest.raises(CellsError, match="both"):
        split_groups(groups, val_groups=["train_1"], test_groups=["train_1"])


# ---------------------------------------------------------------------------
# Training


def test_store_predictions_equal_crop_set_predictions(cmu1_store):
    from nuclass_qupath.model import NuClass

    torch.manual_seed(0)
    model = NuClass(tiny_config(AREA_CLASSES))
    crops = cmu1_store.crops().subset(np.arange(0, len(cmu1_store), 6))
    batch = cmu1_store.read_batch(crops.rows)
    in_memory = CropSet(
        batch.local, batch.context, batch.local_centres_px, batch.context_centres_px,
        crops.labels, crops.weights, crops.groups, crops.class_names, TINY,
    )
    from_store = predict_crop_set(model, crops, batch_size=16)
    from_memory = predict_crop_set(model, in_memory, batch_size=16)
    assert np.allclose(from_store["probs"], from_memory["probs"], atol=1e-6)


def test_stage_epochs_plan():
    plan = _stage_plan(TrainOptions(schedule="staged", stage_epochs=(2, 0, 1)))
    assert plan == ["local", "local", "gate"]
    with pytest.raises(ValueError, match="gate"):
        _stage_plan(TrainOptions(schedule="staged", stage_epochs=(1, 1, 0)))


def _tensors(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith(prefixes)}


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
def test_staged_schedule_freezes_finished_parts(cmu1_store, tmp_path):
    from nuclass_qupath.model import NuClass

    crops = cmu1_store.crops()
    config = tiny_config(AREA_CLASSES)
    options = TrainOptions(schedule="staged", stage_epochs=(1, 1, 1), batch_size=16, init="random", frozen_blocks=0, threads=1)
    train_model(config, crops.subset(np.arange(len(crops)) < 48), None, tmp_path, options)
    checkpoints = tmp_path / "checkpoints"
    local_path = ("local_encoder.", "local_proj.", "local_head.")
    global_path = ("global_encoder.", "global_proj.", "global_head.")
    after_local, after_global, after_gate = (checkpoints / f"epoch_{i:03d}.safetensors" for i in (1, 2, 3))

    # Local stage: the global path keeps its initial weights and batch-norm statistics.
    torch.manual_seed(options.seed)
    initial = {k: v for k, v in NuClass(config).state_dict().items() if k.startswith(global_path)}
    assert _changed(initial, _tensors(after_local, global_path)) == []

    # Global stage: the local path (weights and batch-norm statistics) stays as it was.
    assert _changed(_tensors(after_local, local_path), _tensors(after_global, local_path)) == []
    assert _changed(_tensors(after_local, global_path), _tensors(after_global, global_path))
    # Gate stage: both paths stay; only the gate learns.
    for prefixes in (local_path, global_path):
        assert _changed(_tensors(after_global, prefixes), _tensors(after_gate, prefixes)) == []
    assert _changed(_tensors(after_global, ("gate.",)), _tensors(after_gate, ("gate.",)))


@pytest.mark.slow
def test_cli_train_from_store_one_epoch(small_nucls_store, tmp_path, capsys):
    out = tmp_path / "model-from-store"
    args = [
        "train", "--store", str(small_nucls_store.path), "-o", str(out), "--epochs", "1", "--init", "random",
        "--local-feature-index", "2", "--global-feature-index", "2", "--embed-dim", "16",
        "--split-by", "cohort", "--val-groups", "B", "--test-groups", "C",
        "--batch-size", "16", "--threads", "1", "--weight-by-confidence",
    ]
    assert main(args) == 0
    model = load_model(out / "model.safetensors")
    assert model.config.local_crop_px == 64
    assert model.config.context_encoder_px == 64
    assert model.config.class_names == NUCLS_CLASSES
    summary = json.loads((out / "training_summary.json").read_text(encoding="utf-8"))
    assert summary["split"] == {"train": ["A"], "val": ["B"], "test": ["C"]}
    assert "test" in summary
    assert model.config.training["split_by"] == "cohort"
    assert "model written" in capsys.readouterr().out


def test_cli_train_rejects_store_with_other_mpp(small_nucls_store, tmp_path):
    args = ["train", "--store", str(small_nucls_store.path), "-o", str(tmp_path / "m"), "--model-mpp", "0.25"]
    assert main(args) == 1

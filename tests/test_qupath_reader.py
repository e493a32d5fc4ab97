"""Tests for the Java-free QuPath project and data file reader.

The sample projects under ``shared_data/qupath`` were written by QuPath 0.6.0,
and each image's ``export/<image>.geojson`` is QuPath's own export of the same
objects: the reader's GeoJSON must match it object for object.  Layouts that
the samples do not contain are built with the writer in ``qupath_fixtures``.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import shapely
from qupath_fixtures import (
    SC_SERIALIZABLE,
    SC_WRITE_METHOD,
    Desc,
    QpdataWriter,
    StreamWriter,
    SyntheticObject,
)

from nuclass_qupath.errors import ProjectError, QpdataError
from nuclass_qupath.qupath import javaser, layouts
from nuclass_qupath.qupath.objects import QuPathObject
from nuclass_qupath.qupath.project_files import QuPathProjectFiles, uri_to_path
from nuclass_qupath.qupath.qpdata import read_image_data

SAMPLE_IMAGES = [
    # 3803 objects: about 2 s on one CPU core, more on a loaded machine.
    pytest.param("cmu1_cells", "CMU-1-Small-Region.svs", marks=pytest.mark.slow),
    ("mixed_objects", "CMU-1-Small-Region.svs"),
    ("mixed_objects", "cmu1_crop_rgb.tif"),
    ("tcga_no_mpp", "TCGA-CR-7395-01A-01-TS1.svs"),
    ("missing_image", "CMU-1-Small-Region.svs"),
    ("missing_image", "deleted_after_save.tif"),
]


@pytest.fixture(scope="session")
def qupath_dir(shared_data: Path) -> Path:
    return shared_data / "qupath"


@pytest.fixture(scope="session")
def mixed_objects(qupath_dir: Path) -> list[QuPathObject]:
    project = QuPathProjectFiles(qupath_dir / "mixed_objects")
    return project.image("CMU-1-Small-Region.svs").read_image_data().objects()


def _export(qupath_dir: Path, project: str, image: str) -> list[dict]:
    with open(qupath_dir / project / "export" / f"{image}.geojson", encoding="utf-8") as handle:
        return json.load(handle)["features"]


def _by_name(objects: list[QuPathObject], name: str) -> QuPathObject:
    matches = [obj for obj in objects if obj.name == name]
    assert len(matches) == 1, f"{len(matches)} objects named {name!r}"
    return matches[0]


# -- project files ------------------------------------------------------------------


def test_project_relocates_moved_slides(qupath_dir: Path, shared_data: Path) -> None:
    project = QuPathProjectFiles(qupath_dir / "cmu1_cells" / "project.qpproj")
    assert project.version == "0.6.0"
    assert project.previous_uri == "file:/srv/nuclass-data/qupath/cmu1_cells/project.qpproj"
    (image,) = project.images
    assert image.entry_id == 1
    assert image.uris == ("file:///srv/nuclass-data/slides/CMU-1-Small-Region.svs",)
    assert image.image_path == (shared_data / "slides" / "CMU-1-Small-Region.svs").resolve()
    assert image.exists is True
    assert image.relocated is True
    assert (image.width_px, image.height_px) == (2220, 2967)
    assert image.calibration.unit == "µm"
    assert image.calibration.mpp == pytest.approx(0.499)
    assert image.qpdata_path.is_file()
    assert image.summary["hierarchy"]["objectTypeCounts"]["Cells"] == 3802


def test_project_entry_metadata_and_tiff(qupath_dir: Path) -> None:
    project = QuPathProjectFiles(qupath_dir / "mixed_objects")
    assert [image.image_name for image in project.images] == ["CMU-1-Small-Region.svs", "cmu1_crop_rgb.tif"]
    first, second = project.images
    assert first.description == "CMU-1 small region with one object of every kind"
    assert first.metadata == {"Patient ID": "CMU-1", "Stain": "H&E", "Scanner": "Aperio"}
    assert second.image_path == (qupath_dir / "images" / "cmu1_crop_rgb.tif").resolve()
    assert second.exists is True
    assert second.calibration.pixel_width == 0.49900000000000005
    assert project.image(2) is second
    with pytest.raises(KeyError, match="no image 'nope'"):
        project.image("nope")


def test_project_pixel_size_in_px(qupath_dir: Path) -> None:
    (image,) = QuPathProjectFiles(qupath_dir / "tcga_no_mpp").images
    assert image.calibration.unit == "px"
    assert image.calibration.pixel_width == 1.0
    assert image.calibration.mpp is None
    assert image.server.magnification is None
    assert (image.width_px, image.height_px) == (4443, 3567)


def test_project_reports_missing_image(qupath_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        project = QuPathProjectFiles(qupath_dir / "missing_image")
    present, deleted = project.images
    assert present.exists is True
    assert deleted.exists is False
    assert deleted.image_path == Path("/srv/nuclass-data/qupath/images/deleted_after_save.tif")
    assert project.missing_images == [deleted]
    assert "deleted_after_save.tif" in caplog.text
    assert (deleted.width_px, deleted.height_px) == (256, 256)
    objects = deleted.read_image_data().objects()
    assert [obj.kind for obj in objects] == ["annotation", "detection"]
    assert objects[1].measurements == {"Nucleus: Area µm^2": 12.5}


def test_project_without_images(qupath_dir: Path) -> None:
    project = QuPathProjectFiles(qupath_dir / "empty")
    assert project.images == []
    assert project.last_id == 0
    assert "Tumor" in project.path_classes()


def test_project_path_classes(qupath_dir: Path) -> None:
    classes = QuPathProjectFiles(qupath_dir / "mixed_objects").path_classes()
    assert classes["Stroma"] == (0, 128, 255)
    assert classes["Tumor: Positive"] == (200, 50, 50)
    assert classes["Lymphocyte"] == (196, 65, 127)


def _copy_project(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("export", "thumbnail.jpg"))
    for path in target.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


def test_project_relative_relocation(qupath_dir: Path, tmp_path: Path) -> None:
    # Old layout /srv/nuclass-data/{qupath/cmu1_cells, slides}; new layout
    # tmp/{qupath/cmu1_cells, slides}: ../../slides/<file> from the project folder.
    project_dir = _copy_project(qupath_dir / "cmu1_cells", tmp_path / "qupath" / "cmu1_cells")
    slide = tmp_path / "slides" / "CMU-1-Small-Region.svs"
    slide.parent.mkdir()
    slide.write_bytes(b"stand-in")
    (image,) = QuPathProjectFiles(project_dir).images
    assert image.image_path == slide
    assert image.exists is True


def test_project_relocation_by_remap_and_search(qupath_dir: Path, shared_data: Path, tmp_path: Path) -> None:
    project_dir = _copy_project(qupath_dir / "cmu1_cells", tmp_path / "elsewhere" / "proj")
    (image,) = QuPathProjectFiles(project_dir).images
    assert image.exists is False

    remap = {"/srv/nuclass-data/slides": str(shared_data / "slides")}
    (image,) = QuPathProjectFiles(project_dir, image_root_remap=remap).images
    assert image.image_path == shared_data / "slides" / "CMU-1-Small-Region.svs"
    assert image.exists is True

    # QuPath also searches the project folder for a file with the same name.
    copy = project_dir / "images" / "scans" / "CMU-1-Small-Region.svs"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"stand-in")
    (image,) = QuPathProjectFiles(project_dir).images
    assert image.image_path == copy


def test_project_missing_raises(tmp_path: Path) -> None:
    with pytest.raises(ProjectError, match=str(tmp_path / "nothing")):
        QuPathProjectFiles(tmp_path / "nothing")


def test_project_invalid_json_raises(tmp_path: Path) -> None:
    (tmp_path / "project.qpproj").write_text('{\n  "version": "0.6.0",\n  "images": [,]\n}\n')
    with pytest.raises(ProjectError, match=r"not valid JSON: .* line 3, column 14"):
        QuPathProjectFiles(tmp_path)


def test_project_entry_without_data_raises(qupath_dir: Path, tmp_path: Path) -> None:
    project_dir = _copy_project(qupath_dir / "mixed_objects", tmp_path / "proj")
    shutil.rmtree(project_dir / "data" / "2")
    with pytest.raises(ProjectError, match=r"image entry 2 \('cmu1_crop_rgb.tif'\) has no data folder"):
        QuPathProjectFiles(project_dir)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"images": {"a": 1}}', "'images' is a JSON dict, expected a list"),
        ('{"images": [3]}', "image entry 0 is a JSON int, expected an object"),
        ("[1, 2]", "it contains a JSON list, expected an object"),
    ],
)
def test_project_bad_structure_raises(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "project.qpproj").write_text(text)
    with pytest.raises(ProjectError, match=message):
        QuPathProjectFiles(tmp_path)


def test_uri_to_path_decodes_escapes() -> None:
    assert uri_to_path("file:///data/my%20slides/a.svs") == Path("/data/my slides/a.svs")
    assert uri_to_path("file:/data/a.svs") == Path("/data/a.svs")
    assert uri_to_path("https://example.org/a.svs") is None


# -- data files against QuPath's own GeoJSON export -----------------------------------


_NESTING = {
    "Point": 0,
    "LineString": 1,
    "MultiPoint": 1,
    "Polygon": 2,
    "MultiLineString": 2,
    "MultiPolygon": 3,
}


def _coordinate_arrays(coordinates: list, nesting: int) -> list[np.ndarray]:
    """Return one ``(n, 2)`` array per ring or line of GeoJSON coordinates."""
    if nesting <= 1:
        return [np.asarray(coordinates, dtype=np.float64).reshape(-1, 2)]
    return [array for part in coordinates for array in _coordinate_arrays(part, nesting - 1)]


@pytest.mark.parametrize(("project_name", "image_name"), SAMPLE_IMAGES)
def test_reader_matches_qupath_export(qupath_dir: Path, project_name: str, image_name: str) -> None:
    project = QuPathProjectFiles(qupath_dir / project_name)
    class_colors = project.path_classes()
    objects = project.image(image_name).read_image_data().objects()
    expected = _export(qupath_dir, project_name, image_name)

    assert len(objects) == len(expected)
    assert [obj.id for obj in objects] == [feature["id"] for feature in expected]
    ours, theirs = [], []
    for obj, feature in zip(objects, expected):
        mine = obj.to_geojson_feature(class_colors=class_colors)
        assert mine["properties"] == feature["properties"], obj.id
        assert mine.keys() == feature.keys(), obj.id
        for key in ("geometry", "nucleusGeometry"):
            if key not in feature:
                continue
            assert mine[key]["type"] == feature[key]["type"], (obj.id, key)
            assert mine[key].get("isEllipse") == feature[key].get("isEllipse"), (obj.id, key)
            # Same rings, vertices and vertex order, within one step of QuPath's 0.01 px grid.
            nesting = _NESTING[feature[key]["type"]]
            mine_arrays = _coordinate_arrays(mine[key]["coordinates"], nesting)
            their_arrays = _coordinate_arrays(feature[key]["coordinates"], nesting)
            assert [a.shape for a in mine_arrays] == [a.shape for a in their_arrays], (obj.id, key)
            for mine_array, their_array in zip(mine_arrays, their_arrays):
                np.testing.assert_allclose(mine_array, their_array, rtol=0, atol=0.0100001, err_msg=obj.id)
            ours.append(obj.geometry if key == "geometry" else obj.nucleus_geometry)
            theirs.append(json.dumps(feature[key]))
    their_geometries = shapely.from_geojson(theirs)
    assert shapely.hausdorff_distance(np.array(ours, dtype=object), their_geometries).max() <= 0.0100001
    np.testing.assert_allclose(
        shapely.area(np.array(ours, dtype=object)), shapely.area(their_geometries), rtol=1e-6, atol=1e-6
    )


def test_mixed_objects_kinds_and_rois(mixed_objects: list[QuPathObject]) -> None:
    kinds = Counter(obj.kind for obj in mixed_objects)
    assert kinds == {"annotation": 15, "detection": 6, "cell": 158, "tile": 12}
    annotations = [obj for obj in mixed_objects if obj.kind == "annotation"]
    assert Counter(obj.roi_type for obj in annotations) == {
        "Rectangle": 5,
        "Polygon": 2,
        "Geometry": 2,
        "Ellipse": 2,
        "Points": 2,
        "Polyline": 1,
        "Line": 1,
    }
    assert sum(obj.name is not None for obj in mixed_objects) == 27
    assert sum(obj.is_locked for obj in mixed_objects) == 2
    assert sum(bool(obj.metadata) for obj in mixed_objects) == 2


def test_mixed_objects_geometry_kinds(mixed_objects: list[QuPathObject]) -> None:
    holed = next(obj for obj in mixed_objects if obj.roi_type == "Geometry" and obj.name is None)
    assert holed.geometry.geom_type == "Polygon"
    assert len(holed.geometry.interiors) == 1
    multi = _by_name(mixed_objects, "Multipolygon")
    assert multi.geometry.geom_type == "MultiPolygon"
    assert len(multi.geometry.geoms) == 2
    single_point = next(obj for obj in mixed_objects if obj.roi_type == "Points" and obj.name is None)
    assert single_point.geometry.geom_type == "Point"
    assert _by_name(mixed_objects, "Points (5)").geometry.geom_type == "MultiPoint"
    assert len(_by_name(mixed_objects, "Points (5)").geometry.geoms) == 5
    assert _by_name(mixed_objects, "Line").geometry.geom_type == "LineString"
    assert len(_by_name(mixed_objects, "Polyline").geometry.coords) == 4
    ellipse = _by_name(mixed_objects, "Positive focus (ellipse)")
    # JTS GeometricShapeFactory: 100 points plus the closing point.
    assert len(ellipse.geometry.exterior.coords) == 101


def test_self_intersecting_polygon_is_repaired(mixed_objects: list[QuPathObject]) -> None:
    # data.qpdata stores a 4-vertex PolygonROI (a bow tie); QuPath's
    # ROI.getGeometry() and its export make two triangles of it, and so do we.
    bow_tie = _by_name(mixed_objects, "Self-intersecting polygon")
    assert bow_tie.roi_type == "Polygon"
    assert bow_tie.geometry.geom_type == "MultiPolygon"
    assert [len(part.exterior.coords) for part in bow_tie.geometry.geoms] == [4, 4]
    assert bow_tie.geometry.is_valid


def test_mixed_objects_classes_names_and_values(mixed_objects: list[QuPathObject]) -> None:
    named = _by_name(mixed_objects, "Detection with a name")
    assert named.path_class == ("Tumor", "Positive")
    assert named.class_name == "Tumor: Positive"
    assert named.class_color == (200, 50, 50)
    assert named.metadata == {"source": "manual detection with metadata"}
    assert list(named.measurements) == [
        "Nucleus: Area µm^2",
        "Nucleus: Hematoxylin OD mean",
        "Größe: Fläche",
        "Score (0–1)",
        "plain",
    ]
    assert named.measurements["Nucleus: Hematoxylin OD mean"] == float(np.float32(0.3))
    region = _by_name(mixed_objects, "Tumor region 1")
    assert region.metadata == {"ANNOTATION_DESCRIPTION": "Drawn as a polygon; parent of the objects below"}
    assert region.measurements == {"Tumor score: α/β ratio": 0.73, "Area µm^2 (manual)": 123456.5}
    pen = _by_name(mixed_objects, "Artefact – pen mark")
    assert pen.color == (255, 0, 255)
    assert pen.path_class == ("Ignore*",)
    no_nucleus = _by_name(mixed_objects, "Cell without nucleus")
    assert no_nucleus.nucleus_geometry is None
    assert no_nucleus.to_geojson_feature().keys() == {"type", "id", "geometry", "properties"}


def test_mixed_objects_parents(mixed_objects: list[QuPathObject]) -> None:
    by_id = {obj.id: obj for obj in mixed_objects}
    region = _by_name(mixed_objects, "Cell detection region")
    children = [obj for obj in mixed_objects if obj.parent_id == region.id]
    assert len(children) == 156
    assert all(obj.kind == "cell" for obj in children)
    tiles = [obj for obj in mixed_objects if obj.kind == "tile"]
    assert {by_id[tile.parent_id].name for tile in tiles} == {"Locked stroma rectangle"}
    inner = _by_name(mixed_objects, "Nested: inner (unclassified)")
    assert by_id[inner.parent_id].name == "Nested: middle"
    # Hierarchy order lists every parent before its children.
    position = {obj.id: index for index, obj in enumerate(mixed_objects)}
    assert all(
        position[obj.parent_id] < position[obj.id] for obj in mixed_objects if obj.parent_id in position
    )


def test_data_file_keeps_older_class_colour(qupath_dir: Path, mixed_objects: list[QuPathObject]) -> None:
    # data/1 stores Stroma as (150, 200, 150); QuPath's session (and export)
    # uses the project's (0, 128, 255), which class_colors reproduces.
    stroma = _by_name(mixed_objects, "Locked stroma rectangle")
    assert stroma.class_color == (150, 200, 150)
    assert stroma.to_geojson_feature()["properties"]["classification"]["color"] == [150, 200, 150]
    colors = QuPathProjectFiles(qupath_dir / "mixed_objects").path_classes()
    assert stroma.to_geojson_feature(class_colors=colors)["properties"]["classification"]["color"] == [
        0,
        128,
        255,
    ]


def test_tma_cores(qupath_dir: Path) -> None:
    data = QuPathProjectFiles(qupath_dir / "mixed_objects").image(2).read_image_data()
    cores = [obj for obj in data.objects() if obj.kind == "tmaCore"]
    assert [core.name for core in cores] == ["A-1", "A-2", "B-1", "B-2"]
    assert [core.is_missing for core in cores] == [False, False, False, True]
    assert cores[3].to_geojson_feature()["properties"]["isMissing"] is True


def test_header_fields(qupath_dir: Path) -> None:
    data = read_image_data(qupath_dir / "cmu1_cells" / "data" / "1" / "data.qpdata")
    assert data.data_file_version == 3
    assert data.layout.server_as_json is True
    assert data.qupath_version == "0.6.0"
    assert data.image_type == "BRIGHTFIELD_H_E"
    assert data.locale == "en"
    assert data.mpp == pytest.approx(0.499)
    assert (data.width_px, data.height_px) == (2220, 2967)
    assert data.server.uris == ("file:///srv/nuclass-data/slides/CMU-1-Small-Region.svs",)
    assert [stain["name"] for stain in data.stains["stains"]] == ["Hematoxylin", "Eosin"]
    assert data.stains["stains"][0]["vector"] == pytest.approx(
        (0.6511078257574492, 0.7011930431234068, 0.29049426072255424)
    )
    assert data.properties is None


def test_cells_measurements_and_stream_order(qupath_dir: Path) -> None:
    data = read_image_data(qupath_dir / "tcga_no_mpp" / "data" / "1" / "data.qpdata")
    hierarchy = data.objects(include_root=True)
    stream = data.objects(order="stream", include_root=True)
    assert hierarchy[0].kind == "root"
    assert stream[-1].kind == "root"
    assert sorted(obj.id for obj in hierarchy) == sorted(obj.id for obj in stream)
    position = {obj.id: index for index, obj in enumerate(stream)}
    assert all(position[obj.id] < position[obj.parent_id] for obj in stream if obj.parent_id)
    cells = [obj for obj in hierarchy if obj.kind == "cell"]
    assert len(cells) == 103
    assert all(len(cell.measurements) == 41 for cell in cells)
    assert list(cells[0].measurements)[:2] == ["Nucleus: Area", "Nucleus: Perimeter"]
    assert all(
        cell.nucleus_geometry is not None and cell.geometry.contains(cell.nucleus_geometry.centroid)
        for cell in cells
    )
    assert data.properties == {"PROJECT_ENTRY_ID": "/srv/nuclass-data/qupath/tcga_no_mpp/project.qpproj::1"}


# -- damaged and foreign files ------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0005, 0.004, 0.01, 0.3, 0.75, 0.999])
def test_truncated_file_names_offset(qupath_dir: Path, tmp_path: Path, fraction: float) -> None:
    source = (qupath_dir / "mixed_objects" / "data" / "1" / "data.qpdata").read_bytes()
    cut = max(1, int(len(source) * fraction))
    path = tmp_path / "data.qpdata"
    path.write_bytes(source[:cut])
    with pytest.raises(QpdataError, match=r"data\.qpdata.*byte offset \d+") as info:
        read_image_data(path).objects()
    assert str(path) in str(info.value)
    offset = int(str(info.value).rsplit("byte offset ", 1)[1].split()[0])
    assert offset <= cut


def test_random_bytes_raise(tmp_path: Path) -> None:
    path = tmp_path / "random.qpdata"
    path.write_bytes(bytes(random.Random(1).randrange(256) for _ in range(4096)))
    with pytest.raises(QpdataError, match="not a QuPath data file"):
        read_image_data(path)


def test_corrupted_bytes_raise_qpdata_errors(qupath_dir: Path, tmp_path: Path) -> None:
    source = (qupath_dir / "mixed_objects" / "data" / "2" / "data.qpdata").read_bytes()
    rng = random.Random(3)
    outcomes = Counter()
    for trial in range(60):
        damaged = bytearray(source)
        for _ in range(rng.randint(1, 20)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        path = tmp_path / f"damaged{trial}.qpdata"
        path.write_bytes(bytes(damaged))
        try:
            read_image_data(path).objects()
            outcomes["read"] += 1
        except QpdataError:
            outcomes["QpdataError"] += 1
    assert outcomes["QpdataError"] > 0
    assert set(outcomes) <= {"read", "QpdataError"}


@pytest.mark.parametrize(
    "roi", [("polygon", [(0, 0), (float("nan"), 0), (5, 5)]), ("ellipse", (0, 0, float("inf"), 4))]
)
def test_non_finite_roi_raises(tmp_path: Path, roi: tuple) -> None:
    path = QpdataWriter().write(tmp_path / "nan.qpdata", [SyntheticObject("annotation", roi=roi)])
    with pytest.raises(QpdataError, match=r"not finite at byte offset \d+"):
        read_image_data(path).objects()


def test_json_file_is_not_qpdata(qupath_dir: Path) -> None:
    with pytest.raises(QpdataError, match=r"server\.json is not a QuPath data file: .*magic number 0x7B0A"):
        read_image_data(qupath_dir / "cmu1_cells" / "data" / "1" / "server.json")


def test_other_java_stream_is_not_qpdata(tmp_path: Path) -> None:
    writer = StreamWriter()
    writer.utf("Some other program")
    path = tmp_path / "other.qpdata"
    path.write_bytes(writer.bytes())
    with pytest.raises(QpdataError, match="not a QuPath data file: it starts with 'Some other program'"):
        read_image_data(path)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(QpdataError, match="not found"):
        read_image_data(tmp_path / "none.qpdata")


def test_unknown_data_file_version_raises(tmp_path: Path) -> None:
    writer = StreamWriter()
    writer.utf("Data file version 9")
    path = tmp_path / "v9.qpdata"
    path.write_bytes(writer.bytes())
    with pytest.raises(QpdataError, match="data file version 9 is not understood"):
        read_image_data(path)


def test_layout_mismatch_names_version(tmp_path: Path) -> None:
    # A version 4 header over objects laid out as version 3 writes them.
    body = QpdataWriter(data_file_version=3).build(
        [SyntheticObject("annotation", roi=("rectangle", (0, 0, 5, 5)))]
    )
    path = tmp_path / "mismatch.qpdata"
    path.write_bytes(body.replace(b"Data file version 3", b"Data file version 4", 1))
    with pytest.raises(
        QpdataError, match="data file version 4 layout not understood: .*UUID, but contains .*MetadataMap"
    ):
        read_image_data(path).objects()


# -- layouts the samples do not contain -------------------------------------------------


def _layout_objects() -> list[SyntheticObject]:
    return [
        SyntheticObject(
            "annotation",
            name="parent",
            path_class=(("Tumor", -3670016), ("Positive", -3657166)),
            roi=("polygon", [(0, 0), (10, 0), (10, 10), (0, 10)]),
            measurements={"a": 1.5},
            metadata={"key": "value"},
            children=[
                SyntheticObject(
                    "detection",
                    roi=("ellipse", (1, 1, 5, 5)),
                    measurements={"x": 0.1},
                    measurement_list="double",
                ),
                SyntheticObject(
                    "detection",
                    roi=("rectangle", (1, 1, 5, 5)),
                    measurements={"y": 3.0},
                    measurement_list="default",
                    locked=None,
                ),
                SyntheticObject(
                    "cell",
                    roi=("polygon", [(2, 2), (4, 2), (4, 4)]),
                    nucleus=("ellipse", (2.5, 2.5, 3.5, 3.5)),
                    measurements={"n": 2.5, "m": 1.0},
                    measurement_list="float open",
                ),
            ],
        ),
        SyntheticObject(
            "annotation",
            roi=(
                "area",
                [[(0, 0), (100, 0), (100, 100), (0, 100)], [(10, 10), (20, 10), (20, 20), (10, 20)]],
            ),
        ),
        SyntheticObject("tmaCore", name="A-1", roi=("ellipse", (0, 0, 10, 10)), is_missing=True),
    ]


@pytest.mark.parametrize("version", [3, 4])
@pytest.mark.parametrize("block_size", [1024, 3])
def test_synthetic_layouts_round_trip(tmp_path: Path, version: int, block_size: int) -> None:
    # block_size=3 splits every int and double across block-data records.
    source = _layout_objects()
    path = QpdataWriter(data_file_version=version, block_size=block_size).write(
        tmp_path / "synthetic.qpdata", source, properties={"key": "value"}
    )
    data = read_image_data(path)
    objects = data.objects()
    parent, ellipse, rectangle, cell, area, core = objects
    assert [obj.id for obj in objects] == [
        str(obj.id) for obj in (source[0], *source[0].children, *source[1:])
    ]
    assert data.data_file_version == version
    assert parent.path_class == ("Tumor", "Positive")
    assert parent.metadata == {"key": "value"}
    assert ellipse.parent_id == parent.id
    assert ellipse.measurements == {"x": 0.1}
    assert rectangle.measurements == {"y": 3.0}
    assert rectangle.is_locked is False
    assert cell.measurements == {"n": 2.5, "m": 1.0}
    assert cell.nucleus_roi_type == "Ellipse"
    assert area.roi_type == "Area"
    assert area.geometry.area == pytest.approx(100 * 100 - 10 * 10)
    assert core.is_missing is True
    assert data.properties == {"key": "value"}


def test_unknown_classes_are_skipped_with_warnings(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    objects = [
        SyntheticObject(
            "annotation",
            name="subclass",
            roi=("rectangle", (0, 0, 4, 4)),
            java_class="org.example.SpecialAnnotation",
        ),
        SyntheticObject("annotation", name="odd roi", roi=("unknown", "org.example.SplineROI")),
    ]
    path = QpdataWriter().write(tmp_path / "unknown.qpdata", objects)
    with caplog.at_level(logging.WARNING):
        subclass, odd = read_image_data(path).objects()
    assert subclass.kind == "annotation"
    assert subclass.java_class == "org.example.SpecialAnnotation"
    assert subclass.geometry.area == 16
    assert odd.geometry is None
    assert "org.example.SpecialAnnotation" in caplog.text
    assert "org.example.SplineROI" in caplog.text


def _peak_memory(run) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_stream_order_memory_stays_flat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qupath_fixtures import synthetic_cells

    # A small read-ahead chunk keeps the input buffer out of the comparison.
    monkeypatch.setattr(javaser, "_CHUNK_BYTES", 1 << 14)
    small = read_image_data(
        QpdataWriter().write(tmp_path / "small.qpdata", synthetic_cells(500, measurements=5))
    )
    large = read_image_data(
        QpdataWriter().write(tmp_path / "large.qpdata", synthetic_cells(1500, measurements=5))
    )

    streamed = [
        _peak_memory(lambda data=data: sum(1 for _ in data.iter_objects(order="stream")))
        for data in (small, large)
    ]
    kept = [_peak_memory(lambda data=data: data.objects(order="stream")) for data in (small, large)]
    # 1000 more cells cost memory when kept, and almost none when each is dropped after use.
    assert kept[1] - kept[0] > 500_000
    assert streamed[1] - streamed[0] < (kept[1] - kept[0]) / 10


# -- Java serialization records -----------------------------------------------------------


def _reader(data: bytes, tmp_path: Path) -> javaser.ObjectStreamReader:
    path = tmp_path / "stream.bin"
    path.write_bytes(data)
    reader = javaser.ObjectStreamReader(open(path, "rb"), str(path), converters=layouts.JAVA_CONVERTERS)
    reader.read_header()
    return reader


def test_javaser_strings_and_records(tmp_path: Path) -> None:
    writer = StreamWriter()
    writer.string("nul\x00 and 😀 and µ")
    writer.string("x" * 70000)
    writer.string("nul\x00 and 😀 and µ")  # a reference to the first string
    writer.enum("java.util.concurrent.TimeUnit", "SECONDS")
    writer.array("[I", [1, -2, 3])
    writer.array("[D", [0.5])
    writer.array("[B", [1, 2, 255 - 256])
    writer.uuid(uuid.UUID("5f750c14-80e0-48e8-a3f6-1211596c9ae1"))
    writer.hash_map({"a": "b"})
    writer.reset()
    writer.string("after reset")
    reader = _reader(writer.bytes(), tmp_path)
    assert reader.read_object() == "nul\x00 and 😀 and µ"
    assert reader.read_object() == "x" * 70000
    assert reader.read_object() == "nul\x00 and 😀 and µ"
    assert reader.read_object() == javaser.JavaEnum("java.util.concurrent.TimeUnit", "SECONDS")
    assert reader.read_object().tolist() == [1, -2, 3]
    assert reader.read_object().tolist() == [0.5]
    assert reader.read_object() == b"\x01\x02\xff"
    assert reader.read_object() == uuid.UUID("5f750c14-80e0-48e8-a3f6-1211596c9ae1")
    assert reader.read_object() == {"a": "b"}
    assert reader.read_object() == "after reset"
    assert reader.at_end()


def test_javaser_block_data_spanning_records(tmp_path: Path) -> None:
    writer = StreamWriter(block_size=3)
    writer.prim("iqd", 7, -(2**40), 2.5)
    writer.utf("modified ☃")
    writer.prim("i", 9)
    writer.flush()
    writer.block_size = 2000  # one TC_BLOCKDATALONG record
    writer.prim("1500s", b"z" * 1500)
    reader = _reader(writer.bytes(), tmp_path)
    assert reader.read_int() == 7
    assert reader.read_long() == -(2**40)
    assert reader.read_double() == 2.5
    assert reader.read_utf() == "modified ☃"
    assert reader.read_int() == 9
    assert reader.read_bytes(1500) == b"z" * 1500


def test_javaser_proxy_and_custom_data(tmp_path: Path) -> None:
    writer = StreamWriter()
    writer.proxy_class_desc(["java.lang.Runnable"])
    desc = Desc("org.example.Custom", SC_SERIALIZABLE | SC_WRITE_METHOD, [("I", "count", None)])
    writer.serializable(
        desc,
        lambda: writer.raw_fields("i", 2),
        annotation=lambda: (writer.prim("i", 42), writer.string("extra")),
    )
    reader = _reader(writer.bytes(), tmp_path)
    proxy = reader.read_object()
    assert proxy.proxy_interfaces == ("java.lang.Runnable",)
    custom = reader.read_object()
    assert custom.class_name == "org.example.Custom"
    assert custom.get("count") == 2
    assert custom.annotations["org.example.Custom"] == [b"\x00\x00\x00\x2a", "extra"]


def test_javaser_bad_reference_raises(tmp_path: Path) -> None:
    writer = StreamWriter()
    writer.reference(5)
    reader = _reader(writer.bytes(), tmp_path)
    with pytest.raises(QpdataError, match=r"reference to unknown handle 0x7E0005 .*byte offset 4"):
        reader.read_object()


def test_javaser_decodes_modified_utf8() -> None:
    assert javaser.decode_modified_utf8(b"a\xc0\x80b") == "a\x00b"
    assert javaser.decode_modified_utf8("😀".encode("utf-16-le").decode("utf-16-le").encode("utf-8")) == "😀"
    assert javaser.decode_modified_utf8(b"\xed\xa0\xbd\xed\xb8\x80") == "😀"

"""QuPath-dialect GeoJSON in and out, and point CSVs in.

Reading lives in :mod:`nuclass_qupath.cells.geojson_read` (with the streaming
JSON parser in :mod:`nuclass_qupath.cells.geojson_stream`), writing in
:mod:`nuclass_qupath.cells.geojson_write` and point CSVs in
:mod:`nuclass_qupath.cells.points_csv`; this module gathers their public names.
All coordinates are level-0 pixels of the image, in QuPath's frame.
"""

from nuclass_qupath.cells.geojson_read import (
    CELL_OBJECT_TYPES,
    assign_unique_ids,
    check_cells_in_image,
    read_cells_geojson,
)
from nuclass_qupath.cells.geojson_stream import iter_geojson_features
from nuclass_qupath.cells.geojson_write import (
    COORDINATE_DECIMALS,
    GZIP_LEVEL,
    GeoJSONWriter,
    geometry_to_geojson,
    polygons_to_geojson,
    prediction_feature,
    write_features,
)
from nuclass_qupath.cells.points_csv import read_label_map, read_points_csv

__all__ = [
    "CELL_OBJECT_TYPES",
    "COORDINATE_DECIMALS",
    "GZIP_LEVEL",
    "GeoJSONWriter",
    "assign_unique_ids",
    "check_cells_in_image",
    "geometry_to_geojson",
    "polygons_to_geojson",
    "iter_geojson_features",
    "prediction_feature",
    "read_cells_geojson",
    "read_label_map",
    "read_points_csv",
    "write_features",
]

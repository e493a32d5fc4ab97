"""10x Xenium runs as training labels: read a bundle, register it to the H&E, type the cells.

The stages, each in its own module:

* :mod:`~nuclass_qupath.xenium.bundle` reads a Xenium output folder into an
  AnnData (cells × genes, positions in µm).
* :mod:`~nuclass_qupath.xenium.registration` maps Xenium µm onto level-0
  pixels of the H&E slide through 10x's image-alignment matrix, and checks the
  result against nuclei detected on the H&E.
* :mod:`~nuclass_qupath.xenium.panel` reads the marker panel (YAML).
* :mod:`~nuclass_qupath.xenium.celltyping` scores the markers with scanpy
  and labels each cell, or leaves it unlabelled with the reason.
"""

from __future__ import annotations

from nuclass_qupath.xenium.bundle import BundleFiles, find_bundle_files, read_boundaries, read_xenium
from nuclass_qupath.xenium.celltyping import LabelResult, type_cells
from nuclass_qupath.xenium.panel import MarkerClass, MarkerPanel, load_panel
from nuclass_qupath.xenium.registration import (
    RegistrationReport,
    check_registration,
    read_alignment,
    register_to_slide,
    xenium_um_to_slide_px,
)

__all__ = [
    "BundleFiles",
    "LabelResult",
    "MarkerClass",
    "MarkerPanel",
    "RegistrationReport",
    "check_registration",
    "find_bundle_files",
    "load_panel",
    "read_alignment",
    "read_boundaries",
    "read_xenium",
    "register_to_slide",
    "type_cells",
    "xenium_um_to_slide_px",
]

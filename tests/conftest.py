"""Shared fixtures: paths to the real data next to the repository, and marker handling."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real slides, NuCLS tiles, Xenium and QuPath projects live beside the repository.
SHARED_DATA = Path(os.environ.get("NUCLASS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
SAMPLE_SLIDE = REPO_ROOT / "sample_projects" / "CMU-1-Small-Region.svs"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PAQUO_QUPATH_DIR"):
        return
    skip = pytest.mark.skip(reason="needs QuPath: set PAQUO_QUPATH_DIR to a QuPath installation")
    for item in items:
        if "qupath" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}; set NUCLASS_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture(scope="session")
def slides_dir(shared_data: Path) -> Path:
    return shared_data / "slides"


@pytest.fixture(scope="session")
def cmu1_path() -> Path:
    """CMU-1-Small-Region.svs, bundled with the repository."""
    return SAMPLE_SLIDE

"""Argument types and path checks shared by the command-line commands.

Everything here uses only the standard library, so the commands can check
their arguments before they import torch, timm or OpenSlide. The numeric types
are argparse ``type=`` functions: a value out of range stops the parser with
exit status 2 and a message that gives the bound. The path checks raise
:class:`OutputPathError` or :class:`InputPathError`, which the CLI prints as one
line with exit status 1.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from nuclass_qupath.errors import NuclassError

#: Suffixes the GeoJSON writer is used with; ``.gz`` names are gzip-compressed.
GEOJSON_SUFFIXES = (".geojson", ".geojson.gz", ".json", ".json.gz")

# Level-0 pixel sizes (µm/px) accepted by --mpp. Scanners write 0.1 to 2 µm/px
# (0.25 at 40x, 0.5 at 20x); above 10 µm/px a nucleus is about one pixel wide.
MPP_MIN = 0.01
MPP_MAX = 10.0
MPP_HINT = "give the level-0 pixel size in µm per pixel, e.g. 0.25 for a 40x scan or 0.5 for 20x"

# Heatmap tile sides (µm): below 1 µm a tile covers a few pixels of a 20x scan
# (0.5 µm/px), and 10 mm is larger than the tissue of a slide.
HEATMAP_UM_MIN = 1.0
HEATMAP_UM_MAX = 10_000.0

# Fast-mode core sides (model pixels). Each core is read with about 300 px of
# margin, so below 64 px most of every read is margin. The engine needs about
# 1.3 GB at 1536 px, and its memory grows with the square of the side.
REGION_PX_MIN = 64
REGION_PX_MAX = 8192


class OutputPathError(NuclassError, OSError):
    """An output path cannot be written: its folder is read-only, it is a folder, or its suffix is wrong."""


class InputPathError(NuclassError, FileNotFoundError):
    """An input file given on the command line does not exist."""


def _describe_bounds(minimum: float | None, maximum: float | None, min_inclusive: bool) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'at least' if min_inclusive else 'greater than'} {minimum:g}")
    if maximum is not None:
        parts.append(f"at most {maximum:g}")
    return " and ".join(parts)


def float_range(
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    min_inclusive: bool = True,
    unit: str = "",
    hint: str = "",
) -> Callable[[str], float]:
    """Return an argparse ``type=`` function for a finite float within ``[minimum, maximum]``.

    With ``min_inclusive=False`` the lower bound is exclusive (``> minimum``).
    ``unit`` follows the number in the message and ``hint`` ends it.
    """
    bounds = _describe_bounds(minimum, maximum, min_inclusive)
    suffix = f" {unit}" if unit else ""
    unit_note = f" of {unit}" if unit else ""
    tail = f"; {hint}" if hint else ""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a number{unit_note}, got {text!r}{tail}") from exc
        too_low = minimum is not None and (value < minimum if min_inclusive else value <= minimum)
        too_high = maximum is not None and value > maximum
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {bounds}{suffix}, got {text}{tail}")
        return value

    return parse


def int_range(minimum: int, maximum: int | None = None, *, unit: str = "", hint: str = "") -> Callable[[str], int]:
    """Return an argparse ``type=`` function for an integer within ``[minimum, maximum]``."""
    bounds = _describe_bounds(minimum, maximum, True)
    suffix = f" {unit}" if unit else ""
    unit_note = f" of {unit}" if unit else ""
    tail = f"; {hint}" if hint else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a whole number{unit_note}, got {text!r}{tail}") from exc
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {bounds}{suffix}, got {value}{tail}")
        return value

    return parse


def mpp_type() -> Callable[[str], float]:
    """Return the argparse type of ``--mpp``: a level-0 pixel size in µm/px."""
    return float_range(MPP_MIN, MPP_MAX, unit="µm/px", hint=MPP_HINT)


def heatmap_um_type() -> Callable[[str], float]:
    """Return the argparse type of ``--heatmap-um``: a heatmap tile side in µm."""
    return float_range(HEATMAP_UM_MIN, HEATMAP_UM_MAX, unit="µm")


def threads_type() -> Callable[[str], int]:
    """Return the argparse type of ``--threads``: 1 up to the number of CPU cores of this machine."""
    cores = os.cpu_count() or 1
    return int_range(1, cores, unit="threads", hint=f"this machine has {cores} CPU cores")


def check_input_file(path: Path, option: str) -> None:
    """Raise :class:`InputPathError` unless ``path`` exists.

    ``option`` names the argument in the message (``SLIDE``, ``--cells``).
    A folder passes, because some slide formats are folders.
    """
    if not path.exists():
        raise InputPathError(f"{option}: {path} not found; check the path")


def _nearest_existing(path: Path) -> Path:
    """Return ``path`` or the closest of its parents that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _check_writable(existing: Path, folder: Path, option: str) -> None:
    """Raise :class:`OutputPathError` unless files can be created in ``existing``, the closest existing ``folder``."""
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder.absolute() else f" (the closest existing folder of {folder})"
        raise OutputPathError(
            f"{option}: folder {existing}{where} is not writable; choose a folder you can write to, "
            "or change its permissions"
        )


def check_output_dir(path: Path, option: str) -> None:
    """Raise :class:`OutputPathError` unless files can be written into the folder ``path``.

    A folder that does not exist yet passes when the closest existing parent
    is a writable folder, because the writers create missing folders.
    """
    existing = _nearest_existing(path.absolute())
    if existing == path.absolute() and not existing.is_dir():
        raise OutputPathError(f"{option}: {path} is a file, not a folder; choose a folder")
    if not existing.is_dir():
        raise OutputPathError(f"{option}: cannot create folder {path} because {existing} is a file; choose another folder")
    _check_writable(existing, path, option)


def check_output_file(path: Path, option: str, suffixes: Sequence[str] | None = None) -> None:
    """Raise :class:`OutputPathError` unless ``path`` can be written as a file with one of ``suffixes``.

    The suffix check ignores case. Missing parent folders are allowed, as in
    :func:`check_output_dir`.
    """
    if path.is_dir():
        example = path / ("output" + (suffixes[0] if suffixes else ""))
        raise OutputPathError(f"{option}: {path} is a folder; give a file name such as {example}")
    if suffixes is not None and not path.name.lower().endswith(tuple(suffixes)):
        raise OutputPathError(
            f"{option}: {path} must end in {', '.join(suffixes)}; e.g. {path.parent / (_stem(path) + suffixes[0])}"
        )
    existing = _nearest_existing(path.parent.absolute())
    if not existing.is_dir():
        raise OutputPathError(
            f"{option}: cannot write {path} because {existing} is a file, not a folder; choose another path"
        )
    _check_writable(existing, path.parent, option)


def check_distinct_outputs(paths: dict[str, Path | None]) -> None:
    """Raise :class:`OutputPathError` if two options name the same output file."""
    seen: dict[Path, str] = {}
    for option, path in paths.items():
        if path is None:
            continue
        key = path.absolute()
        if key in seen:
            raise OutputPathError(f"{seen[key]} and {option} both write {path}; give them different file names")
        seen[key] = option


def _stem(path: Path) -> str:
    """Return the file name up to its first dot."""
    return path.name.split(".", 1)[0] or "output"

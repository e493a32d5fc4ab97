"""Exception hierarchy.

Every error the package raises on bad input derives from :class:`NuclassError`
and also from the matching built-in exception, so callers can catch either.
Messages name the offending value and say what to do about it.
"""

from __future__ import annotations


class NuclassError(Exception):
    """Base class for errors raised by nuclass_qupath on bad input or state."""


class SlideError(NuclassError, OSError):
    """A slide could not be opened or read."""


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The slide file does not exist."""


class UnsupportedSlideError(SlideError):
    """Neither OpenSlide nor tifffile can read the file."""


class MissingMppError(SlideError, ValueError):
    """The slide has no pixel size in its metadata and none was given."""


class CellsError(NuclassError, ValueError):
    """Cell input (GeoJSON, CSV) is invalid or does not fit the slide."""


class ModelError(NuclassError, ValueError):
    """A model file is missing, malformed or does not match its configuration."""


class ProjectError(NuclassError, OSError):
    """A QuPath project could not be read or written."""


class QpdataError(ProjectError, ValueError):
    """A QuPath ``data.qpdata`` stream is truncated, corrupt or not understood."""


class XeniumError(NuclassError, ValueError):
    """A Xenium output bundle, alignment or marker panel is invalid."""

"""Marker panels: which genes mark which cell type, read from YAML.

A panel file lists classes, each with a QuPath class name, a display colour,
positive marker genes and optionally negative markers, an organ and a parent
class::

    name: my-panel
    classes:
      - name: T cell
        color: [30, 120, 220]
        positive: [CD3E, CD3D, CD2]
        negative: [EPCAM]
      - name: Acinar
        color: [230, 160, 60]
        positive: [PRSS1, CPA1]
        organ: pancreas
        parent: Epithelial

Classes without an organ are broad types that every run is expected to
measure. Classes with an organ are used only where the run measures at least
one of their markers (see :func:`nuclass_qupath.xenium.celltyping.type_cells`).
A ``parent`` names the broad class that an organ class refines, so that the
two are not counted as competitors when the typing measures its margin.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nuclass_qupath.errors import XeniumError

logger = logging.getLogger(__name__)

DEFAULT_PANEL = "default.yaml"


class MarkerClass(BaseModel):
    """One cell type of a panel: QuPath class name, colour and marker genes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="QuPath class name")
    color: tuple[int, int, int] = Field(description="QuPath display colour (r, g, b), each 0-255")
    positive: tuple[str, ...] = Field(min_length=1, description="genes expressed by this type")
    negative: tuple[str, ...] = Field(default=(), description="genes this type does not express")
    organ: str | None = Field(default=None, description="organ the type belongs to; None for broad types")
    parent: str | None = Field(default=None, description="broad class this class refines")

    @field_validator("color")
    @classmethod
    def _check_color(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError(f"colour components must be in 0-255, got {list(value)}")
        return value

    @field_validator("positive", "negative")
    @classmethod
    def _check_genes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        genes = tuple(g.strip() for g in value)
        if any(not g for g in genes):
            raise ValueError("gene names must not be empty")
        repeated = sorted({g for g in genes if genes.count(g) > 1})
        if repeated:
            raise ValueError(f"genes listed twice: {repeated}")
        return genes

    @model_validator(mode="after")
    def _check_overlap(self) -> "MarkerClass":
        both = sorted(set(self.positive) & set(self.negative))
        if both:
            raise ValueError(f"genes {both} are both positive and negative markers of {self.name!r}")
        return self


class MarkerPanel(BaseModel):
    """A named list of marker classes with unique class names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="panel", min_length=1)
    description: str = ""
    classes: tuple[MarkerClass, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_classes(self) -> "MarkerPanel":
        names = [c.name for c in self.classes]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"class names must be unique, repeated: {repeated}")
        for marker_class in self.classes:
            if marker_class.parent is None:
                continue
            if marker_class.parent not in names:
                raise ValueError(
                    f"class {marker_class.name!r} names parent {marker_class.parent!r}, "
                    f"which is not a class of the panel ({names})"
                )
            if marker_class.parent == marker_class.name:
                raise ValueError(f"class {marker_class.name!r} names itself as parent")
        return self

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def genes(self) -> list[str]:
        """All marker genes of the panel, positive and negative, in first-seen order."""
        seen: dict[str, None] = {}
        for marker_class in self.classes:
            for gene in (*marker_class.positive, *marker_class.negative):
                seen.setdefault(gene, None)
        return list(seen)

    def get(self, name: str) -> MarkerClass:
        """Return the class called ``name``; raise XeniumError if the panel has none."""
        for marker_class in self.classes:
            if marker_class.name == name:
                return marker_class
        raise XeniumError(f"marker panel {self.name!r} has no class {name!r}; classes: {self.class_names}")

    def lineage(self, name: str) -> set[str]:
        """Return ``name``, its parent and its children: classes that do not compete with it."""
        marker_class = self.get(name)
        related = {name}
        if marker_class.parent:
            related.add(marker_class.parent)
        related.update(c.name for c in self.classes if c.parent == name)
        return related

    def subset(self, names: list[str]) -> "MarkerPanel":
        """Return a panel with only the classes in ``names``, in panel order."""
        keep = tuple(c for c in self.classes if c.name in set(names))
        kept_names = {c.name for c in keep}
        # A parent that was dropped no longer exists in the subset.
        keep = tuple(
            c if c.parent is None or c.parent in kept_names else c.model_copy(update={"parent": None})
            for c in keep
        )
        return MarkerPanel(name=self.name, description=self.description, classes=keep)

    def class_specs(self) -> list[tuple[str, tuple[int, int, int]]]:
        """Return ``(name, (r, g, b))`` per class, the form a model's class list takes."""
        return [(c.name, c.color) for c in self.classes]


def load_panel(path: str | Path | None = None) -> MarkerPanel:
    """Read and validate a marker panel YAML file.

    Parameters
    ----------
    path
        Panel file; ``None`` reads the panel bundled with the package
        (``nuclass_qupath/xenium/panels/default.yaml``).

    Returns
    -------
    MarkerPanel

    Raises
    ------
    XeniumError
        If the file is missing, is not YAML, or does not describe a valid panel.
    """
    if path is None:
        source = resources.files("nuclass_qupath.xenium").joinpath("panels").joinpath(DEFAULT_PANEL)
        label = f"bundled panel {DEFAULT_PANEL}"
        text = source.read_text(encoding="utf-8")
    else:
        file = Path(path)
        label = str(file)
        if not file.is_file():
            raise XeniumError(f"marker panel file not found: {file}")
        text = file.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise XeniumError(f"marker panel {label} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise XeniumError(
            f"marker panel {label} must be a YAML mapping with a 'classes' list, got {type(data).__name__}"
        )
    try:
        panel = MarkerPanel.model_validate(data)
    except ValidationError as exc:
        raise XeniumError(f"marker panel {label} is invalid:\n{exc}") from exc
    logger.debug("read marker panel %r from %s: %d classes", panel.name, label, len(panel.classes))
    return panel

"""Where a training cell's crops lie: their geometry, the encoders' strides, and batches of crops.

Training cuts every cell's local crop and context exactly as the engine's exact
mode does, with :func:`nuclass_qupath.engine.classify.read_cell_crop`. Each
crop starts on a multiple of its encoder's stride in a pixel grid anchored at
the slide origin, and its side is a multiple of the stride. The cell therefore
sits up to one stride off the crop centre, at its own offset from the
encoder's feature grid, just as it does in a fast-mode region. Each crop comes
with the cell centre in its pixels, and the model pools the cell's features
around that centre.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from nuclass_qupath.engine.classify import cell_crop_size, read_cell_crop
from nuclass_qupath.errors import CellsError
from nuclass_qupath.model.config import ModelConfig

# Geometry fields that are also ModelConfig fields. The align fields are not,
# because they come from the model's encoders.
CONFIG_FIELDS = ("mpp", "local_crop_px", "local_margin_px", "context_px", "context_encoder_px", "context_margin_px")


@functools.lru_cache(maxsize=32)
def encoder_stride(backbone: str, feature_index: int) -> int:
    """Return the stride, in input pixels, of timm ``backbone``'s feature stage ``feature_index``.

    The encoder is built once per (backbone, stage) without weights, as
    :class:`~nuclass_qupath.model.backbones.FeatureEncoder` builds it.
    """
    from nuclass_qupath.model.backbones import FeatureEncoder

    return FeatureEncoder(backbone, feature_index).stride


def config_strides(config: ModelConfig) -> tuple[int, int]:
    """Return the strides of the local and global encoders that ``config`` describes."""
    return (
        encoder_stride(config.local_backbone, config.local_feature_index),
        encoder_stride(config.global_backbone, config.global_feature_index),
    )


@dataclass(frozen=True)
class CropGeometry:
    """Pixel sizes and placement of a set of training crops; a model trained on them must share them.

    Sizes are pixels at ``mpp`` (local crop, context before resizing) or at
    ``context_mpp`` (the encoder's context input and its margin).
    ``local_align_px`` and ``context_align_px`` are the strides of the local
    and global encoders: crops start on multiples of them and their sides are
    multiples of them.
    """

    mpp: float
    local_crop_px: int
    local_margin_px: int
    context_px: int
    context_encoder_px: int
    context_margin_px: int
    local_align_px: int
    context_align_px: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mpp) and self.mpp > 0):
            raise CellsError(f"the crops' µm/px must be a positive number, got {self.mpp}")
        for name in ("local_crop_px", "context_px", "context_encoder_px", "local_align_px", "context_align_px"):
            if getattr(self, name) < 1:
                raise CellsError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("local_margin_px", "context_margin_px"):
            if getattr(self, name) < 0:
                raise CellsError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.context_px < self.local_crop_px:
            raise CellsError(f"context_px ({self.context_px}) must be at least local_crop_px ({self.local_crop_px})")

    @classmethod
    def from_config(cls, config: ModelConfig) -> "CropGeometry":
        """Return the geometry of ``config``, with the strides of the encoders it describes."""
        local_align, context_align = config_strides(config)
        return cls(
            **{name: getattr(config, name) for name in CONFIG_FIELDS},
            local_align_px=local_align,
            context_align_px=context_align,
        )

    @classmethod
    def from_dict(cls, data: dict) -> "CropGeometry":
        try:
            return cls(
                mpp=float(data["mpp"]),
                **{f.name: int(data[f.name]) for f in fields(cls) if f.name != "mpp"},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CellsError(f"the crop geometry {data} is incomplete or invalid: {exc}") from exc

    def to_dict(self) -> dict:
        data = asdict(self)
        data["context_mpp"] = self.context_mpp
        return data

    def config_values(self) -> dict:
        """Return the fields a :class:`ModelConfig` takes (all but the strides, which come from its encoders)."""
        return {name: getattr(self, name) for name in CONFIG_FIELDS}

    @property
    def context_mpp(self) -> float:
        """µm per pixel of the stored context, the global encoder's input."""
        return self.mpp * self.context_px / self.context_encoder_px

    @property
    def local_size_px(self) -> int:
        """Side of a local crop: the window, margins and one stride of play, rounded to the stride."""
        return cell_crop_size(self.local_crop_px, self.local_margin_px, self.local_align_px)

    @property
    def context_size_px(self) -> int:
        """Side of a context crop at ``context_mpp``, rounded like :attr:`local_size_px`."""
        return cell_crop_size(self.context_encoder_px, self.context_margin_px, self.context_align_px)

    def differences(self, other: "CropGeometry") -> list[str]:
        """Return ``name: self vs other`` for each field that differs."""
        out = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            same = math.isclose(mine, theirs, rel_tol=1e-6) if f.name == "mpp" else mine == theirs
            if not same:
                out.append(f"{f.name} {mine} vs {theirs}")
        return out


def as_geometry(geometry: CropGeometry | ModelConfig) -> CropGeometry:
    """Return ``geometry`` itself, or the crop geometry of a model configuration."""
    if isinstance(geometry, CropGeometry):
        return geometry
    return CropGeometry.from_config(geometry)


@dataclass
class CropBatch:
    """Crops of a batch of cells and each cell's centre in them.

    ``local`` is uint8 (B, L, L, 3) at ``mpp`` and ``context`` uint8
    (B, C, C, 3) at ``context_mpp``. ``local_centres_px`` and
    ``context_centres_px`` are float32 (B, 2) cell centres ``(x, y)`` in pixels
    of the crop, where pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``.
    """

    local: np.ndarray
    context: np.ndarray
    local_centres_px: np.ndarray
    context_centres_px: np.ndarray

    def __len__(self) -> int:
        return len(self.local)


def cell_crop_centres(
    centroids_px: np.ndarray, scale: float, window_px: int, margin_px: int, align_px: int
) -> np.ndarray:
    """Return float32 (N, 2) cell centres in their stride-aligned crops, without reading pixels.

    ``centroids_px`` are (N, 2) level-0 ``(x, y)``; ``scale`` is level-0
    pixels per crop pixel. The arithmetic is that of
    :func:`~nuclass_qupath.engine.classify.read_cell_crop`, so the result
    equals the centres it returns, rounded to float32.
    """
    centre = np.asarray(centroids_px, dtype=np.float64).reshape(-1, 2) / scale
    origin = align_px * np.floor((centre - window_px / 2.0 - margin_px) / align_px)
    return (centre - origin).astype(np.float32)


def read_cell_crops(slide, centre_px: np.ndarray, geometry: CropGeometry) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read one cell's local crop and context as the engine's exact mode does.

    ``centre_px`` is the cell centre ``(x, y)`` in QuPath level-0 pixels.
    Returns ``(local, local_centre_px, context, context_centre_px)``: the
    uint8 crops and the cell centre in each crop's pixels (float64).
    """
    local, local_centre = read_cell_crop(
        slide, centre_px, geometry.mpp / slide.mpp, geometry.mpp,
        geometry.local_crop_px, geometry.local_margin_px, geometry.local_align_px,
    )
    context, context_centre = read_cell_crop(
        slide, centre_px, geometry.context_mpp / slide.mpp, geometry.context_mpp,
        geometry.context_encoder_px, geometry.context_margin_px, geometry.context_align_px,
    )
    return local, local_centre, context, context_centre


def extract_crops(slide, centroids_px: np.ndarray, geometry: CropGeometry | ModelConfig) -> CropBatch:
    """Cut each cell's local crop and context from ``slide``, as the engine's exact mode does.

    ``centroids_px`` are (N, 2) level-0 (x, y) in QuPath's frame.
    ``geometry`` is a :class:`CropGeometry` or a model configuration, whose
    encoders' strides are then looked up.
    """
    geometry = as_geometry(geometry)
    n = len(centroids_px)
    batch = CropBatch(
        local=np.empty((n, geometry.local_size_px, geometry.local_size_px, 3), dtype=np.uint8),
        context=np.empty((n, geometry.context_size_px, geometry.context_size_px, 3), dtype=np.uint8),
        local_centres_px=np.empty((n, 2), dtype=np.float32),
        context_centres_px=np.empty((n, 2), dtype=np.float32),
    )
    for i, centre in enumerate(centroids_px):
        batch.local[i], batch.local_centres_px[i], batch.context[i], batch.context_centres_px[i] = read_cell_crops(
            slide, centre, geometry
        )
    return batch

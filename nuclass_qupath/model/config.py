"""Model configuration: everything needed to rebuild a model and feed it pixels.

The configuration is saved as JSON beside the safetensors weights, so a model
file carries its class list, QuPath colours, pixel size and preprocessing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nuclass_qupath.errors import ModelError

CONFIG_FORMAT_VERSION = 1


class ClassSpec(BaseModel):
    """One output class: its QuPath class name and display colour."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    color: tuple[int, int, int] = Field(description="QuPath display colour as (r, g, b), 0-255")

    @field_validator("color")
    @classmethod
    def _check_color(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError(f"colour components must be in 0-255, got {value}")
        return value


class Normalization(BaseModel):
    """Per-channel RGB normalisation applied after scaling pixels to [0, 1]."""

    model_config = ConfigDict(extra="forbid")

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


class Temperatures(BaseModel):
    """Calibration temperatures; 1.0 means uncalibrated."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    local: float = Field(1.0, gt=0)
    global_: float = Field(1.0, gt=0, alias="global")
    mixture: float = Field(1.0, gt=0)
    fitted_on: str | None = Field(None, description="what the temperatures were fitted on")


class ModelConfig(BaseModel):
    """Architecture, preprocessing and provenance of a NuClass model.

    Geometry is in pixels at ``mpp`` (µm/px): the local path sees a
    ``local_crop_px`` square centred on the nucleus, the global path a
    ``context_px`` square resized to ``context_encoder_px`` for its encoder.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: Literal[1] = CONFIG_FORMAT_VERSION
    model_id: str = Field(min_length=1)
    description: str = ""
    classes: list[ClassSpec] = Field(min_length=2)

    mpp: float = Field(0.5, gt=0, description="µm per pixel the model works at")
    local_crop_px: int = Field(224, ge=32)
    context_px: int = Field(1024, ge=64)
    context_encoder_px: int = Field(256, ge=32)
    # Pixels of real image read around each crop (local, at mpp) and each
    # context (at context_mpp), so that the features pooled over the window
    # see image content, not zero padding, near its border. Training and the
    # exact mode read them; the fast mode's regions hold at least as much.
    # The encoders see beyond the margin, so the fast and exact modes differ
    # a little near a crop's border. On 400 cells of a TCGA slide, a local
    # margin of 32 px gave the same class in both modes for 98.8% of cells,
    # and 64 px for 99.5%.
    local_margin_px: int = Field(64, ge=0)
    context_margin_px: int = Field(16, ge=0)

    local_backbone: str = "tf_efficientnet_lite0"
    local_feature_index: int = Field(3, ge=0, description="timm features_only stage of the local encoder")
    global_backbone: str = "tf_efficientnet_lite0"
    global_feature_index: int = Field(3, ge=0, description="timm features_only stage of the global encoder")

    # Cell pooling: a grid of bilinear samples over each window, averaged twice,
    # once with a Gaussian centred on the nucleus and once uniformly.
    pool_grid: int = Field(7, ge=2)
    local_sigma_px: float = Field(24.0, gt=0, description="Gaussian sigma of local pooling, px at mpp")
    global_sigma_px: float = Field(64.0, gt=0, description="Gaussian sigma of global pooling, px at mpp")

    embed_dim: int = Field(128, ge=8)
    gate_hidden: int = Field(64, ge=4)
    dropout: float = Field(0.2, ge=0, lt=1)
    gamma: float = Field(2.0, ge=0, description="exponent of the uncertainty weight of the global loss")

    normalization: Normalization = Normalization()
    temperatures: Temperatures = Temperatures()
    # White is what lies outside a slide: glass in H&E.
    pad_value: int = Field(255, ge=0, le=255)

    training: dict[str, Any] = Field(default_factory=dict, description="provenance and test metrics")

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        names = [c.name for c in self.classes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"class names must be unique, repeated: {duplicates}")
        if self.context_px < self.local_crop_px:
            raise ValueError(
                f"context_px ({self.context_px}) must be at least local_crop_px ({self.local_crop_px})"
            )
        if not math.isfinite(self.mpp):
            raise ValueError(f"mpp must be finite, got {self.mpp}")
        return self

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def context_mpp(self) -> float:
        """µm per pixel of the global encoder's input image."""
        return self.mpp * self.context_px / self.context_encoder_px

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, by_alias=True)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ModelError(f"model configuration not found: {path}") from exc
        except json.JSONDecodeError as exc:
            raise ModelError(
                f"model configuration {path} is not valid JSON (line {exc.lineno}, column {exc.colno})"
            ) from exc
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ModelError(f"model configuration {path} is invalid:\n{exc}") from exc

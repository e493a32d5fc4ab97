"""Model files: a safetensors file of weights with its JSON configuration beside it.

``name.safetensors`` holds the tensors and, in its header metadata, the class
names and architecture fields they were saved with; ``name.json`` holds the
:class:`ModelConfig`. Loading checks that the two agree, so a weights file
paired with the wrong configuration is rejected instead of giving nonsense.
Weights are never unpickled.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from nuclass_qupath._atomic import atomic_open, atomic_path
from nuclass_qupath.errors import ModelError
from nuclass_qupath.model.config import ModelConfig
from nuclass_qupath.model.nuclass import NuClass

logger = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "nuclass-nucls-demo"
# Config fields that change the tensors; recorded in the weights file.
ARCHITECTURE_FIELDS = (
    "local_backbone",
    "local_feature_index",
    "global_backbone",
    "global_feature_index",
    "embed_dim",
    "gate_hidden",
)


def bundled_model_path() -> Path:
    """Path of the demonstration model shipped inside the package."""
    return Path(str(resources.files("nuclass_qupath") / "models" / f"{BUNDLED_MODEL_NAME}.safetensors"))


def resolve_model_paths(path: str | Path | None) -> tuple[Path, Path]:
    """Return ``(weights, config)`` paths for a ``.safetensors``, ``.json`` or extensionless name."""
    if path is None:
        path = bundled_model_path()
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise ModelError(
                f"model folder {path} must contain exactly one .safetensors file, found {len(candidates)}"
            )
        path = candidates[0]
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def _architecture_metadata(config: ModelConfig) -> dict[str, str]:
    meta = {name: str(getattr(config, name)) for name in ARCHITECTURE_FIELDS}
    meta["class_names"] = json.dumps(config.class_names)
    meta["format"] = "nuclass"
    meta["model_id"] = config.model_id
    return meta


def save_model(model: NuClass, path: str | Path) -> tuple[Path, Path]:
    """Write ``model`` as ``<path>.safetensors`` and ``<path>.json``, each atomically."""
    weights_path, config_path = resolve_model_paths(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(weights_path) as tmp:
        save_file(state, str(tmp), metadata=_architecture_metadata(model.config))
    with atomic_open(config_path, "w") as f:
        f.write(model.config.to_json() + "\n")
    return weights_path, config_path


def load_model(path: str | Path | None = None, *, device: str | torch.device = "cpu") -> NuClass:
    """Load a model file, or the bundled demonstration model when ``path`` is None.

    Raises ModelError naming the file when either part is missing, unreadable,
    or the weights do not match the configuration.
    """
    weights_path, config_path = resolve_model_paths(path)
    if not weights_path.is_file():
        hint = (
            "the bundled model is missing from the installation; reinstall nuclass-qupath"
            if path is None
            else "pass --model with a .safetensors file written by `nuclass-qupath train`"
        )
        raise ModelError(f"model weights not found: {weights_path} ({hint})")
    config = ModelConfig.from_json_file(config_path)
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"model weights {weights_path} are not a readable safetensors file: {exc}") from exc

    expected = _architecture_metadata(config)
    mismatched = [
        f"{key}: weights have {metadata.get(key)!r}, config has {expected[key]!r}"
        for key in list(ARCHITECTURE_FIELDS) + ["class_names"]
        if metadata.get(key) != expected[key]
    ]
    if metadata.get("format") != "nuclass":
        raise ModelError(f"{weights_path} is not a NuClass model file (no 'format: nuclass' in its metadata)")
    if mismatched:
        raise ModelError(
            f"model weights {weights_path} do not match their configuration {config_path}: "
            + "; ".join(mismatched)
            + ". Use the .json written together with these weights."
        )

    model = NuClass(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"model weights {weights_path} do not fit the architecture in {config_path}: {exc}") from exc
    model.to(device).eval()
    logger.info(
        "loaded model %s (%d classes: %s) from %s",
        config.model_id,
        len(config.classes),
        ", ".join(config.class_names),
        weights_path,
    )
    return model

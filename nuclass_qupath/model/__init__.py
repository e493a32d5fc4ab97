"""The NuClass model: configuration, module, losses, model files, calibration, Grad-CAM."""

from nuclass_qupath.model.config import ClassSpec, ModelConfig
from nuclass_qupath.model.io import bundled_model_path, load_model, save_model
from nuclass_qupath.model.nuclass import NuClass, NuClassOutput, nuclass_loss

__all__ = [
    "ClassSpec",
    "ModelConfig",
    "NuClass",
    "NuClassOutput",
    "bundled_model_path",
    "load_model",
    "nuclass_loss",
    "save_model",
]

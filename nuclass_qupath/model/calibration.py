"""Temperature scaling of the model's three outputs, fitted on labelled validation cells.

Each output gets one temperature ``T``: the local and global paths divide their
logits by it, and the gated mixture divides its log-probabilities by it (see
:meth:`NuClass.combine <nuclass_qupath.model.nuclass.NuClass.combine>`).
Dividing by a positive number keeps the argmax, so calibration changes the
confidence of a prediction and never the predicted class. ``T`` is chosen to
minimise the negative log-likelihood (NLL) of the true labels, by a bounded
Brent search over ``log T``. The NLL is convex in ``1 / T``, so it has a single
minimum on that search interval and the search is deterministic.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from nuclass_qupath.errors import CellsError
from nuclass_qupath.evaluation.metrics import expected_calibration_error
from nuclass_qupath.model.config import Temperatures
from nuclass_qupath.model.nuclass import EPS, NuClass

logger = logging.getLogger(__name__)

# Search interval of T. Temperatures outside it mean that the model or the
# labels are broken rather than miscalibrated, so the search stops at the edge.
TEMPERATURE_BOUNDS = (0.02, 100.0)
PATHS = ("local", "global", "mixture")


@dataclass
class CalibrationResult:
    """Fitted temperatures and the calibration of each output before and after.

    The dictionaries are keyed by output: ``"local"``, ``"global"`` and
    ``"mixture"`` (the gated prediction). "Before" is the model as it was,
    with its own temperatures ``temperatures_before`` (all 1.0 for a model
    never calibrated); "after" uses the fitted ``temperatures``. ECE is the
    expected calibration error of the top-class confidence in 15 equal-width
    bins; NLL is the mean negative log-likelihood of the true class, in nats
    per cell.
    """

    temperatures: Temperatures
    temperatures_before: Temperatures = field(default_factory=Temperatures)
    ece_before: dict[str, float] = field(default_factory=dict)
    ece_after: dict[str, float] = field(default_factory=dict)
    nll_before: dict[str, float] = field(default_factory=dict)
    nll_after: dict[str, float] = field(default_factory=dict)
    n_cells: int = 0

    def temperature(self, path: str) -> float:
        """Fitted temperature of ``path`` (``local``, ``global`` or ``mixture``)."""
        return path_temperature(self.temperatures, path)

    def temperature_before(self, path: str) -> float:
        """Temperature of ``path`` that the model had before the fit."""
        return path_temperature(self.temperatures_before, path)

    def as_dict(self) -> dict:
        return {
            "n_cells": self.n_cells,
            "fitted_on": self.temperatures.fitted_on,
            "paths": {
                path: {
                    "temperature_before": round(self.temperature_before(path), 4),
                    "temperature": round(self.temperature(path), 4),
                    "ece_before": round(self.ece_before[path], 4),
                    "ece_after": round(self.ece_after[path], 4),
                    "nll_before": round(self.nll_before[path], 4),
                    "nll_after": round(self.nll_after[path], 4),
                }
                for path in PATHS
            },
        }

    def format_table(self) -> str:
        """Return a text table of each output's temperatures, ECE and NLL before and after the fit."""
        lines = [
            "before: the model's temperatures until now; after: the fitted temperatures",
            "output   T before  T after  ECE before  ECE after  NLL before  NLL after",
        ]
        for path in PATHS:
            lines.append(
                f"{path:<8} {self.temperature_before(path):8.3f}  {self.temperature(path):7.3f}  "
                f"{self.ece_before[path]:10.4f}  {self.ece_after[path]:9.4f}  "
                f"{self.nll_before[path]:10.4f}  {self.nll_after[path]:9.4f}"
            )
        return "\n".join(lines)


def path_temperature(temperatures: Temperatures, path: str) -> float:
    """Return the temperature of output ``path`` (``local``, ``global`` or ``mixture``)."""
    return temperatures.global_ if path == "global" else getattr(temperatures, path)


def scaled_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    log_probs = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def scaled_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities ``softmax(logits / temperature)`` in float64."""
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Return the temperature that minimises the NLL of ``labels`` (N,) under ``logits`` (N, C).

    ``logits`` may be any log-probabilities up to a per-row constant, such as
    the log of a mixture's probabilities. The result lies in
    :data:`TEMPERATURE_BOUNDS`; a warning is logged when it reaches an edge.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"logits must be (N, C) with N = len(labels) = {len(labels)}, got shape {logits.shape}")
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on zero cells")
    if not np.all(np.isfinite(logits)):
        raise ValueError(f"{int((~np.isfinite(logits)).any(axis=1).sum())} rows of logits are not finite")

    low, high = (math.log(t) for t in TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_t: scaled_nll(logits, labels, math.exp(log_t)),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-6},
    )
    # The bounded search never evaluates the edges themselves, so compare them
    # too. On a tie (outputs that T cannot change) the T nearest 1 wins.
    candidates = (math.exp(float(result.x)), *TEMPERATURE_BOUNDS, 1.0)
    temperature = min(candidates, key=lambda t: (round(scaled_nll(logits, labels, t), 12), abs(math.log(t))))
    if min(abs(math.log(temperature) - low), abs(math.log(temperature) - high)) < 1e-3:
        logger.warning(
            "temperature %.3g is at the edge of the search interval %s: the outputs are far from calibrated, "
            "or the labels do not match the model's classes",
            temperature,
            TEMPERATURE_BOUNDS,
        )
    return temperature


def uncalibrated_outputs(model: NuClass, crops) -> dict[str, np.ndarray]:
    """Logits of each output of ``model`` on ``crops`` without temperatures.

    Returns ``{"local", "global", "mixture"}`` arrays (N, C): the two paths'
    logits and the log of the gated mixture's probabilities, which is what
    :meth:`NuClass.combine` divides by the mixture temperature.
    """
    from nuclass_qupath.training.trainer import predict_crop_set

    outputs = predict_crop_set(model, crops, calibrated=False)
    return {
        "local": outputs["logits_local"].astype(np.float64),
        "global": outputs["logits_global"].astype(np.float64),
        "mixture": np.log(outputs["probs"].astype(np.float64) + EPS),
    }


def describe_crop_set(crops) -> str:
    """Describe the cells and images of ``crops`` in one line, for ``Temperatures.fitted_on``."""
    groups = sorted({str(g) for g in crops.groups})
    listed = ", ".join(groups[:8]) + (f" and {len(groups) - 8} more" if len(groups) > 8 else "")
    counts = ", ".join(f"{name} {count}" for name, count in crops.class_counts().items())
    return f"{len(crops)} cells ({counts}) from {len(groups)} images: {listed}"


def fit_output_temperatures(
    logits: Mapping[str, np.ndarray],
    labels: np.ndarray,
    *,
    fitted_on: str | None = None,
    n_bins: int = 15,
    before: Temperatures | None = None,
) -> CalibrationResult:
    """Fit one temperature per output from uncalibrated logits; see :func:`fit_temperatures`.

    ``logits`` maps ``"local"``, ``"global"`` and ``"mixture"`` to (N, C)
    arrays as :func:`uncalibrated_outputs` returns them; ``labels`` (N,) are
    class indices. The "before" scores use the temperatures ``before``
    (default all 1.0, the uncalibrated outputs).
    """
    before = before or Temperatures()
    labels = np.asarray(labels, dtype=np.int64)
    missing = [path for path in PATHS if path not in logits]
    if missing:
        raise ValueError(f"logits lack the outputs {missing}; expected keys {list(PATHS)}")
    fitted: dict[str, float] = {}
    result = CalibrationResult(temperatures=Temperatures(), temperatures_before=before, n_cells=len(labels))
    for path in PATHS:
        temperature = fit_temperature(logits[path], labels)
        fitted[path] = temperature
        previous = path_temperature(before, path)
        result.nll_before[path] = scaled_nll(logits[path], labels, previous)
        result.nll_after[path] = scaled_nll(logits[path], labels, temperature)
        result.ece_before[path] = expected_calibration_error(scaled_probs(logits[path], previous), labels, n_bins)
        result.ece_after[path] = expected_calibration_error(scaled_probs(logits[path], temperature), labels, n_bins)
    result.temperatures = Temperatures(
        local=fitted["local"], global_=fitted["global"], mixture=fitted["mixture"], fitted_on=fitted_on
    )
    return result


def fit_temperatures(model: NuClass, crops, *, fitted_on: str | None = None, n_bins: int = 15) -> CalibrationResult:
    """Fit one temperature per output of ``model`` on the labelled cells ``crops``.

    Parameters
    ----------
    model
        The model to calibrate. Its ``config.temperatures`` is replaced by the
        fitted values, so :func:`~nuclass_qupath.model.io.save_model` stores
        them and every later prediction with ``model.calibrated`` set uses them.
    crops
        A :class:`~nuclass_qupath.training.dataset.CropSource` (in-memory
        crops or a store's cells) of validation cells, never the cells the
        model was trained on.
    fitted_on
        Description stored with the temperatures; by default the cell counts
        and image names of ``crops``.
    n_bins
        Number of equal-width confidence bins of the expected calibration error.

    Returns
    -------
    CalibrationResult
        The temperatures, and ECE and NLL of each output before (with the
        model's temperatures until now) and after.

    Raises
    ------
    CellsError
        If ``crops`` is empty or its classes are not the model's.
    """
    if len(crops) == 0:
        raise CellsError("no labelled cells to fit temperatures on; check the images and label files")
    if list(crops.class_names) != list(model.config.class_names):
        raise CellsError(
            f"the cells are labelled with classes {list(crops.class_names)} but the model predicts "
            f"{model.config.class_names}; cut the crops with this model's configuration"
        )
    logits = uncalibrated_outputs(model, crops)
    result = fit_output_temperatures(
        logits,
        crops.labels,
        fitted_on=fitted_on or describe_crop_set(crops),
        n_bins=n_bins,
        before=model.config.temperatures.model_copy(),
    )
    model.config.temperatures = result.temperatures
    logger.info(
        "fitted temperatures on %d cells: %s",
        result.n_cells,
        ", ".join(
            f"{path} T {result.temperature_before(path):.3f} -> {result.temperature(path):.3f} "
            f"(ECE {result.ece_before[path]:.3f} -> {result.ece_after[path]:.3f})"
            for path in PATHS
        ),
    )
    return result

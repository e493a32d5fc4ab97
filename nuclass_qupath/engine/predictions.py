"""Per-cell predictions of a model on one slide."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Predictions:
    """Class probabilities per cell, in the order of the cell table.

    ``probs`` is the gated mixture; ``local_probs`` and ``global_probs`` are the
    two paths alone. All are calibrated when the model carries temperatures.
    """

    class_names: list[str]
    probs: np.ndarray
    gate: np.ndarray
    local_probs: np.ndarray
    global_probs: np.ndarray
    timings_s: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.probs)

    @property
    def predicted(self) -> np.ndarray:
        """Index of the most probable class per cell."""
        return self.probs.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        """Probability of the predicted class per cell."""
        return self.probs.max(axis=1)

    @property
    def predicted_names(self) -> list[str]:
        return [self.class_names[i] for i in self.predicted]

    @classmethod
    def empty(cls, class_names: list[str]) -> "Predictions":
        n = len(class_names)
        zeros = np.zeros((0, n), dtype=np.float32)
        return cls(class_names, zeros, np.zeros(0, np.float32), zeros.copy(), zeros.copy())

    @classmethod
    def allocate(cls, class_names: list[str], n_cells: int) -> "Predictions":
        """Predictions filled with NaN, to be written region by region."""
        shape = (n_cells, len(class_names))
        full = lambda s: np.full(s, np.nan, dtype=np.float32)  # noqa: E731
        return cls(class_names, full(shape), full(n_cells), full(shape), full(shape))

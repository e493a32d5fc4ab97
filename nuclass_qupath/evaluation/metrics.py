"""Classification metrics: per-class precision, recall and F1, confusion matrix, calibration error."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ClassificationReport:
    """Scores of predictions against true labels over a fixed class list."""

    class_names: list[str]
    confusion: np.ndarray  # rows: true class, columns: predicted class
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    accuracy: float
    macro_f1: float  # mean over classes with support > 0
    ece: float | None = None

    def as_dict(self) -> dict:
        per_class = {
            name: {
                "precision": round(float(self.precision[i]), 4),
                "recall": round(float(self.recall[i]), 4),
                "f1": round(float(self.f1[i]), 4),
                "support": int(self.support[i]),
            }
            for i, name in enumerate(self.class_names)
        }
        result = {
            "accuracy": round(self.accuracy, 4),
            "macro_f1": round(self.macro_f1, 4),
            "per_class": per_class,
            "confusion": self.confusion.tolist(),
        }
        if self.ece is not None:
            result["ece"] = round(self.ece, 4)
        return result

    def format_table(self) -> str:
        width = max(12, *(len(n) for n in self.class_names))
        lines = [f"{'class':<{width}}  precision  recall     f1  support"]
        for i, name in enumerate(self.class_names):
            lines.append(
                f"{name:<{width}}  {self.precision[i]:9.3f}  {self.recall[i]:6.3f}  {self.f1[i]:5.3f}  {self.support[i]:7d}"
            )
        lines.append(f"{'macro F1':<{width}}  {self.macro_f1:.3f}   accuracy {self.accuracy:.3f}")
        if self.ece is not None:
            lines[-1] += f"   ECE {self.ece:.3f}"
        return "\n".join(lines)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence, with equal-width bins."""
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0:
        return float("nan")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin mean confidence, accuracy and count, for a reliability diagram."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(bins, weights=correct.astype(float), minlength=n_bins) / count
    edges = np.linspace(0, 1, n_bins + 1)
    return {"edges": edges, "confidence": mean_conf, "accuracy": accuracy, "count": count}


def classification_report(
    y_true: np.ndarray, probs: np.ndarray, class_names: list[str], *, n_bins: int = 15
) -> ClassificationReport:
    """Score ``probs`` (N, C) against integer labels ``y_true`` (N,)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    n_classes = len(class_names)
    y_pred = np.asarray(probs).argmax(axis=1) if len(y_true) else np.zeros(0, np.int64)
    matrix = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    macro = float(f1[present].mean()) if present.any() else float("nan")
    accuracy = float(tp.sum() / max(len(y_true), 1))
    ece = expected_calibration_error(probs, y_true, n_bins) if len(y_true) else None
    return ClassificationReport(class_names, matrix, precision, recall, f1, support, accuracy, macro, ece)

"""Evaluation report of a model on labelled cells: HTML page, PNG figures and JSON.

The report scores the three predictions a NuClass model makes for each cell
side by side: the local path (the nucleus crop), the global path (its
context) and the gated mixture that becomes the QuPath classification. It
contains per-class precision, recall and F1, accuracy, macro-F1, expected
calibration error (ECE), confusion matrices, reliability diagrams and the mean
gate value per class. Probabilities are the calibrated ones when the model
carries fitted temperatures, as in the ``NuClass: confidence`` measurement.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nuclass_qupath import __version__
from nuclass_qupath._atomic import atomic_open
from nuclass_qupath.errors import CellsError
from nuclass_qupath.evaluation.metrics import (
    ClassificationReport,
    classification_report,
    expected_calibration_error,
    reliability_bins,
)
from nuclass_qupath.model.config import Temperatures

logger = logging.getLogger(__name__)

# Report keys of the three predictions, in display order, and their titles.
PATH_TITLES = {"local": "Local path (nucleus crop)", "global": "Global path (context)", "gated": "Gated (final)"}
FIGURE_DPI = 110


@dataclass
class Evaluation:
    """Predictions of a model on labelled cells and their scores, ready to report.

    ``probs`` and ``probs_uncalibrated`` map ``"local"``, ``"global"`` and
    ``"gated"`` to (N, C) probabilities. ``labels`` (N,) are true class
    indices, ``gate`` (N,) is the weight of the global path in the gated
    prediction, and ``groups`` (N,) names the image of each cell.
    """

    model_id: str
    class_names: list[str]
    labels: np.ndarray
    probs: dict[str, np.ndarray]
    probs_uncalibrated: dict[str, np.ndarray]
    gate: np.ndarray
    groups: np.ndarray
    temperatures: Temperatures = field(default_factory=Temperatures)
    n_bins: int = 15
    reports: dict[str, ClassificationReport] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if not self.reports:
            self.reports = {
                path: classification_report(self.labels, self.probs[path], self.class_names, n_bins=self.n_bins)
                for path in PATH_TITLES
            }

    @property
    def n_cells(self) -> int:
        return len(self.labels)

    @property
    def is_calibrated(self) -> bool:
        t = self.temperatures
        return (t.local, t.global_, t.mixture) != (1.0, 1.0, 1.0)

    def ece_uncalibrated(self, path: str) -> float:
        """ECE of ``path`` without temperatures."""
        return expected_calibration_error(self.probs_uncalibrated[path], self.labels, self.n_bins)

    def cells_per_image(self) -> dict[str, list[int]]:
        """Cell counts per class for each image, in class order."""
        counts = {}
        for group in sorted({str(g) for g in self.groups}):
            in_group = np.array([str(g) == group for g in self.groups], dtype=bool)
            counts[group] = np.bincount(self.labels[in_group], minlength=len(self.class_names)).tolist()
        return counts

    def mean_gate(self, by: str) -> list[float | None]:
        """Mean gate value per class, grouping cells by their ``"true"`` or ``"predicted"`` (gated) class."""
        classes = self.labels if by == "true" else self.probs["gated"].argmax(axis=1)
        means = []
        for c in range(len(self.class_names)):
            selected = self.gate[classes == c]
            means.append(float(selected.mean()) if len(selected) else None)
        return means

    def as_dict(self) -> dict:
        """Collect every number of the report, as written to ``report.json``."""
        paths = {}
        for path, report in self.reports.items():
            entry = report.as_dict()
            entry["ece_uncalibrated"] = round(self.ece_uncalibrated(path), 4)
            bins = reliability_bins(self.probs[path], self.labels, self.n_bins)
            entry["reliability"] = {
                "edges": [round(float(e), 4) for e in bins["edges"]],
                "confidence": [None if np.isnan(v) else round(float(v), 4) for v in bins["confidence"]],
                "accuracy": [None if np.isnan(v) else round(float(v), 4) for v in bins["accuracy"]],
                "count": [int(v) for v in bins["count"]],
            }
            paths[path] = entry

        def rounded(values):
            return [None if v is None else round(v, 4) for v in values]

        return {
            "model_id": self.model_id,
            "classes": self.class_names,
            "temperatures": self.temperatures.model_dump(by_alias=True),
            "n_cells": self.n_cells,
            "cells_per_class": dict(zip(self.class_names, np.bincount(self.labels, minlength=len(self.class_names)).tolist())),
            "cells_per_image": {name: dict(zip(self.class_names, counts)) for name, counts in self.cells_per_image().items()},
            "paths": paths,
            "mean_gate": {
                "by_true_class": dict(zip(self.class_names, rounded(self.mean_gate("true")))),
                "by_predicted_class": dict(zip(self.class_names, rounded(self.mean_gate("predicted")))),
                "all_cells": round(float(self.gate.mean()), 4) if self.n_cells else None,
            },
            "n_bins": self.n_bins,
        }


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def evaluation_from_outputs(
    outputs: dict[str, np.ndarray],
    labels: np.ndarray,
    groups: np.ndarray,
    *,
    class_names: list[str],
    model_id: str,
    temperatures: Temperatures,
    n_bins: int = 15,
) -> Evaluation:
    """Build an :class:`Evaluation` from the arrays :func:`~nuclass_qupath.training.trainer.predict_crop_set` returns.

    ``outputs`` must be the calibrated outputs; the uncalibrated probabilities
    are rebuilt from the raw logits and the gate, as the model mixes them.
    """
    local = _softmax(outputs["logits_local"])
    glob = _softmax(outputs["logits_global"])
    gate = np.asarray(outputs["gate"], dtype=np.float64)
    uncalibrated = {"local": local, "global": glob, "gated": (1 - gate[:, None]) * local + gate[:, None] * glob}
    calibrated = {"local": outputs["probs_local"], "global": outputs["probs_global"], "gated": outputs["probs"]}
    return Evaluation(
        model_id=model_id,
        class_names=list(class_names),
        labels=labels,
        probs={k: np.asarray(v, dtype=np.float64) for k, v in calibrated.items()},
        probs_uncalibrated=uncalibrated,
        gate=gate,
        groups=np.asarray(groups),
        temperatures=temperatures,
        n_bins=n_bins,
    )


def evaluate_model(model, crops, *, batch_size: int = 64, n_bins: int = 15) -> Evaluation:
    """Run ``model`` on the labelled cells ``crops`` (a CropSet) and score its three predictions.

    Raises CellsError when ``crops`` is empty or labelled with other classes.
    """
    from nuclass_qupath.training.trainer import predict_crop_set

    if len(crops) == 0:
        raise CellsError("no labelled cells to evaluate; check the images and label files")
    if list(crops.class_names) != list(model.config.class_names):
        raise CellsError(
            f"the cells are labelled with classes {list(crops.class_names)} but the model predicts "
            f"{model.config.class_names}; cut the crops with this model's configuration"
        )
    outputs = predict_crop_set(model, crops, batch_size=batch_size, calibrated=True)
    evaluation = evaluation_from_outputs(
        outputs,
        crops.labels,
        crops.groups,
        class_names=model.config.class_names,
        model_id=model.config.model_id,
        temperatures=model.config.temperatures,
        n_bins=n_bins,
    )
    logger.info(
        "evaluated %d cells: macro-F1 local %.3f, global %.3f, gated %.3f",
        evaluation.n_cells,
        evaluation.reports["local"].macro_f1,
        evaluation.reports["global"].macro_f1,
        evaluation.reports["gated"].macro_f1,
    )
    return evaluation


# Figures ------------------------------------------------------------------------


def confusion_figure(report: ClassificationReport, title: str):
    """Draw the confusion matrix of ``report`` as counts and as row-normalised fractions."""
    from matplotlib.figure import Figure

    names = report.class_names
    n = len(names)
    counts = report.confusion
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = np.where(counts.sum(axis=1, keepdims=True) > 0, counts / counts.sum(axis=1, keepdims=True), 0.0)
    side = max(4.0, 0.55 * n + 2.5)
    figure = Figure(figsize=(2 * side + 1.5, side), dpi=FIGURE_DPI, layout="constrained")
    axes = figure.subplots(1, 2)
    font = max(6, min(11, 90 // max(n, 1)))
    panels = ((counts, "Counts", "d", "Blues", None), (fractions, "Row-normalised (recall on the diagonal)", ".2f", "Greens", (0, 1)))
    for ax, (matrix, label, fmt, cmap, limits) in zip(axes, panels):
        image = ax.imshow(matrix, cmap=cmap, vmin=limits[0] if limits else 0, vmax=limits[1] if limits else max(1, matrix.max()))
        figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="cells" if fmt == "d" else "fraction of true class")
        threshold = (limits[1] if limits else max(1, matrix.max())) * 0.6
        for i in range(n):
            for j in range(n):
                value = matrix[i, j]
                ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=font,
                        color="white" if value > threshold else "black")
        ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=font)
        ax.set_yticks(range(n), names, fontsize=font)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(label, fontsize=11)
    figure.suptitle(title, fontsize=13)
    return figure


def reliability_figure(evaluation: Evaluation):
    """Draw one reliability diagram per prediction, each above its histogram of confidences."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13.5, 5.8), dpi=FIGURE_DPI, layout="constrained")
    grid = figure.add_gridspec(2, 3, height_ratios=(3, 1))
    for column, (path, title) in enumerate(PATH_TITLES.items()):
        bins = reliability_bins(evaluation.probs[path], evaluation.labels, evaluation.n_bins)
        edges = bins["edges"]
        centres = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        filled = bins["count"] > 0
        ax = figure.add_subplot(grid[0, column])
        ax.bar(centres[filled], bins["accuracy"][filled], width=width * 0.95, color="#4c72b0", edgecolor="black",
               linewidth=0.5, label="accuracy in bin")
        # Hatched from accuracy up (or down) to the bin's mean confidence.
        ax.bar(centres[filled], bins["confidence"][filled] - bins["accuracy"][filled],
               bottom=bins["accuracy"][filled], width=width * 0.95, facecolor="none", hatch="///",
               edgecolor="#c44e52", linewidth=0.8, label="gap to mean confidence")
        ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ece = evaluation.reports[path].ece
        ax.set_title(f"{title}\nECE {ece:.3f}" if ece is not None else title, fontsize=11)
        if column == 0:
            ax.legend(loc="upper left", fontsize=8)
        hist = figure.add_subplot(grid[1, column], sharex=ax)
        hist.bar(centres, bins["count"], width=width * 0.95, color="grey")
        hist.set_xlabel("confidence (probability of the predicted class)")
        hist.set_ylabel("cells")
    suffix = "calibrated probabilities" if evaluation.is_calibrated else "no calibration temperatures fitted"
    figure.suptitle(f"Reliability diagrams ({evaluation.n_bins} equal-width bins, {suffix})", fontsize=13)
    return figure


def figure_png(figure) -> bytes:
    """Render a matplotlib Figure to PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
    return buffer.getvalue()


# HTML ----------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def _table(table_id: str, header: list[str], rows: list[list[str]], *, header_rows: str = "") -> str:
    head = header_rows + "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead>{head}</thead><tbody>{body}</tbody></table>'


def _summary_table(evaluation: Evaluation) -> str:
    rows = []
    for path, title in PATH_TITLES.items():
        report = evaluation.reports[path]
        rows.append([
            html.escape(title), _fmt(report.accuracy), _fmt(report.macro_f1), _fmt(report.ece),
            _fmt(evaluation.ece_uncalibrated(path)),
        ])
    return _table("summary", ["prediction", "accuracy", "macro-F1", "ECE", "ECE without temperatures"], rows)


def _per_class_table(evaluation: Evaluation) -> str:
    group_row = "<tr><th></th><th></th>" + "".join(
        f'<th colspan="3">{html.escape(title)}</th>' for title in PATH_TITLES.values()
    ) + "</tr>"
    header = ["class", "cells"] + ["precision", "recall", "F1"] * len(PATH_TITLES)
    rows = []
    for i, name in enumerate(evaluation.class_names):
        row = [html.escape(name), str(int(evaluation.reports["gated"].support[i]))]
        for path in PATH_TITLES:
            report = evaluation.reports[path]
            row += [_fmt(report.precision[i]), _fmt(report.recall[i]), _fmt(report.f1[i])]
        rows.append(row)
    return _table("per-class", header, rows, header_rows=group_row)


def _data_table(evaluation: Evaluation) -> str:
    per_image = evaluation.cells_per_image()
    rows = [[html.escape(name)] + [str(c) for c in counts] + [str(sum(counts))] for name, counts in per_image.items()]
    totals = np.bincount(evaluation.labels, minlength=len(evaluation.class_names)).tolist()
    rows.append(["<b>all images</b>"] + [f"<b>{c}</b>" for c in totals] + [f"<b>{sum(totals)}</b>"])
    return _table("cells", ["image"] + evaluation.class_names + ["all classes"], rows)


def _gate_table(evaluation: Evaluation) -> str:
    by_true, by_predicted = evaluation.mean_gate("true"), evaluation.mean_gate("predicted")
    rows = [[html.escape(name), _fmt(t), _fmt(p)] for name, t, p in zip(evaluation.class_names, by_true, by_predicted)]
    return _table("gate", ["class", "mean gate, cells of this true class", "mean gate, cells predicted as this class"], rows)


def _image_tag(name: str, png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"><figcaption>{html.escape(name)}</figcaption></figure>'


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1500px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eef; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #ddd; }
.note { background: #f7f7f0; border-left: 4px solid #cc9; padding: 0.5em 1em; }
code { background: #f0f0f0; padding: 0 0.2em; }
"""

READING_NOTE = """
<div class="note">
<p><b>How to read this report.</b> Each cell gets three predictions. The <i>local path</i> classifies the
nucleus crop alone, the <i>global path</i> the tissue context around it, and the <i>gated</i> prediction
mixes the two with a per-cell gate: gate 0 uses the local path alone, gate 1 the global path alone.
The gated prediction is the class written to QuPath, and its probability is the <code>NuClass: confidence</code>
measurement.</p>
<p><i>Precision</i> is the fraction of cells predicted as a class that truly belong to it; <i>recall</i> is the
fraction of a class's cells that were found; <i>F1</i> is their harmonic mean. <i>Macro-F1</i> averages F1 over
the classes present, so rare classes count as much as common ones; <i>accuracy</i> counts every cell once.
<i>ECE</i> (expected calibration error) is the cell-weighted mean gap between confidence and accuracy over
equal-width confidence bins: 0 means that a confidence of 0.8 is right 80% of the time.
In a reliability diagram, bars under the diagonal mean over-confidence and bars above it under-confidence.
The confusion matrix has true classes in rows and predicted classes in columns; the row-normalised matrix
shows recall on its diagonal.</p>
</div>
"""


def render_html(evaluation: Evaluation, figures: dict[str, bytes], *, data_description: str = "") -> str:
    """Return the report as one self-contained HTML page, with the PNG ``figures`` embedded as base64."""
    t = evaluation.temperatures
    temperatures = (
        f"local {t.local:.3f}, global {t.global_:.3f}, gated {t.mixture:.3f}"
        + (f" (fitted on {html.escape(t.fitted_on)})" if t.fitted_on else "")
        if evaluation.is_calibrated
        else "none fitted, so the probabilities are uncalibrated"
    )
    classes = ", ".join(html.escape(name) for name in evaluation.class_names)
    created = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>NuClass evaluation: {html.escape(evaluation.model_id)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>NuClass evaluation: {html.escape(evaluation.model_id)}</h1>",
        f'<p id="model">Model <b>{html.escape(evaluation.model_id)}</b>, {len(evaluation.class_names)} classes: '
        f"{classes}. Calibration temperatures: {temperatures}.</p>",
        f"<p>{evaluation.n_cells} labelled cells in {len(evaluation.cells_per_image())} images"
        + (f" ({html.escape(data_description)})" if data_description else "")
        + f". Written {created} by nuclass-qupath {html.escape(__version__)}.</p>",
        READING_NOTE,
        "<h2>Summary</h2>",
        _summary_table(evaluation),
        "<h2>Per class</h2>",
        _per_class_table(evaluation),
        "<h2>Data evaluated (cells per image and class)</h2>",
        _data_table(evaluation),
        "<h2>Gate</h2>",
        "<p>Mean gate value: 0 = local path only, 1 = global path only.</p>",
        _gate_table(evaluation),
        "<h2>Reliability</h2>",
        _image_tag("reliability.png", figures["reliability.png"], "reliability diagrams"),
        "<h2>Confusion matrices</h2>",
    ]
    for path, title in PATH_TITLES.items():
        name = f"confusion_{path}.png"
        parts.append(_image_tag(name, figures[name], f"confusion matrix, {title}"))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


@dataclass
class ReportFiles:
    """Paths of the files :func:`write_report` wrote."""

    html: Path
    json: Path
    figures: dict[str, Path]


def write_report(evaluation: Evaluation, out_dir: str | Path, *, data_description: str = "", extra: dict | None = None) -> ReportFiles:
    """Write ``report.html``, ``report.json`` and the PNG figures into ``out_dir``, each file atomically.

    The HTML embeds the figures, so it can be moved or mailed alone; the PNG
    files beside it are the same images. ``extra`` is stored under
    ``"run"`` in the JSON (for example the command's arguments).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"reliability.png": figure_png(reliability_figure(evaluation))}
    for path, title in PATH_TITLES.items():
        figures[f"confusion_{path}.png"] = figure_png(
            confusion_figure(evaluation.reports[path], f"Confusion matrix: {title}")
        )
    figure_paths = {}
    for name, png in figures.items():
        with atomic_open(out_dir / name, "wb") as f:
            f.write(png)
        figure_paths[name] = out_dir / name

    data = evaluation.as_dict()
    data["data_description"] = data_description
    data["run"] = extra or {}
    with atomic_open(out_dir / "report.json", "w") as f:
        json.dump(data, f, indent=2)
    # The page goes last, so a complete report.html means a complete folder.
    with atomic_open(out_dir / "report.html", "w") as f:
        f.write(render_html(evaluation, figures, data_description=data_description))
    logger.info("wrote evaluation report of %d cells to %s", evaluation.n_cells, out_dir / "report.html")
    return ReportFiles(out_dir / "report.html", out_dir / "report.json", figure_paths)

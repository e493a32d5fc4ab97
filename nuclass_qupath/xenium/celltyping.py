"""Type Xenium cells by marker genes with scanpy, and write the labels.

Per cell, with the counts normalised to the median total and log1p
transformed (``sc.pp.normalize_total``, ``sc.pp.log1p``):

1. Each class gets a score from ``sc.tl.score_genes`` on its positive markers
   (mean expression minus that of reference genes of similar expression).
   Negative markers subtract their own score where it is above zero.
2. The best class is the highest score; a best score of zero or below means no
   marker signal.
3. The margin is ``(best - runner-up) / best`` clipped to [0, 1]. The runner-up
   excludes the best class's parent and children, which share its markers.
4. The agreement is the share of the cell's expression neighbours
   (``sc.pp.neighbors`` on PCA) whose best class is the same.
5. The confidence is the geometric mean of margin and agreement. A cell is
   labelled when it has at least ``min_transcripts`` gene transcripts and a
   confidence of at least ``min_confidence``. Other cells stay unlabelled,
   and the table records why.

With ``leiden=True`` cells are clustered first (``sc.tl.leiden``) and each
cluster takes the class of its highest mean score. A cell's confidence is then
the geometric mean of the cluster's margin, the cluster's purity (share of its
cells whose own best class is the cluster's) and the cell's own support (its
score for the cluster's class over its own best score).

A class that ends with no labelled cell only causes a warning here;
:meth:`LabelResult.to_cell_table` raises for it, because a classifier cannot be
trained on a class without examples.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from nuclass_qupath._atomic import atomic_open
from nuclass_qupath.errors import XeniumError
from nuclass_qupath.xenium.panel import MarkerPanel

logger = logging.getLogger(__name__)

LABEL_COLUMNS = ["cell_id", "x_px", "y_px", "class", "confidence", "reason"]
REASON_OFF_SLIDE = "off_slide"
REASON_FEW_TRANSCRIPTS = "few_transcripts"
REASON_NO_MARKER_SIGNAL = "no_marker_signal"
REASON_LOW_CONFIDENCE = "low_confidence"


@dataclass
class LabelResult:
    """Labels of one Xenium run.

    Attributes
    ----------
    table
        One row per cell of the run, in AnnData order. Columns: ``cell_id``,
        ``x_px`` and ``y_px`` (level-0 slide px in QuPath's frame, NaN before
        registration), ``class`` (empty when unlabelled), ``confidence`` (NaN
        where not computed) and ``reason`` (empty when labelled). Then come
        ``best_class``, ``margin``, ``agreement``, ``transcript_counts`` and,
        with Leiden, ``cluster``.
    scores
        Marker score per cell and class (NaN for cells that were not scored).
    panel
        The classes used, after dropping organ classes the run does not measure.
    missing_genes
        Marker genes absent from the run, per class.
    skipped_classes
        Organ classes left out because the run measures none of their markers.
    parameters
        The typing parameters, for the run summary.
    """

    table: pd.DataFrame
    scores: pd.DataFrame
    panel: MarkerPanel
    missing_genes: dict[str, list[str]] = field(default_factory=dict)
    skipped_classes: list[str] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)

    @property
    def labelled(self) -> np.ndarray:
        """Boolean mask of labelled cells."""
        return (self.table["class"] != "").to_numpy()

    def cells_per_class(self) -> dict[str, int]:
        """Labelled cells per class of the panel, zero included."""
        counts = self.table.loc[self.labelled, "class"].value_counts()
        return {name: int(counts.get(name, 0)) for name in self.panel.class_names}

    def dropped(self) -> dict[str, int]:
        """Unlabelled cells per reason."""
        counts = self.table.loc[~self.labelled, "reason"].value_counts()
        return {str(reason): int(n) for reason, n in counts.items()}

    def empty_classes(self) -> list[str]:
        """Classes of the panel without any labelled cell."""
        return [name for name, n in self.cells_per_class().items() if n == 0]

    def summary(self) -> dict:
        """Return the run summary: cells per class, dropped cells and why, parameters."""
        return {
            "n_cells": int(len(self.table)),
            "n_labelled": int(self.labelled.sum()),
            "cells_per_class": self.cells_per_class(),
            "dropped": self.dropped(),
            "empty_classes": self.empty_classes(),
            "skipped_classes": list(self.skipped_classes),
            "missing_genes": {k: list(v) for k, v in self.missing_genes.items() if v},
            "classes": [{"name": c.name, "color": list(c.color)} for c in self.panel.classes],
            "panel": self.panel.name,
            "parameters": dict(self.parameters),
        }

    def write_csv(self, path) -> None:
        """Write the label table (``cell_id, x_px, y_px, class, confidence, reason``) atomically.

        Raises
        ------
        XeniumError
            If the cells have no slide positions (register them first).
        """
        if self.table["x_px"].isna().all() and len(self.table):
            raise XeniumError(
                "the cells have no slide positions: call register_to_slide(adata, ...) before type_cells"
            )
        with atomic_open(path, "w") as handle:
            self.table[LABEL_COLUMNS].to_csv(handle, index=False, float_format="%.4f")
        logger.info("wrote %d labels (%d labelled) to %s", len(self.table), int(self.labelled.sum()), path)

    def write_summary(self, path, extra: dict | None = None) -> dict:
        """Write :meth:`summary`, merged with ``extra``, as JSON atomically; return what was written."""
        summary = self.summary()
        if extra:
            summary.update(extra)
        with atomic_open(path, "w") as handle:
            json.dump(summary, handle, indent=2, default=_json_default)
            handle.write("\n")
        return summary

    def to_cell_table(self, *, require_all_classes: bool = True):
        """Return the labelled cells as a :class:`~nuclass_qupath.cells.table.CellTable` for training.

        Raises
        ------
        XeniumError
            If the cells are not registered, or ``require_all_classes`` is set
            and a panel class has no labelled cell.
        """
        from nuclass_qupath.cells.table import CellTable

        empty = self.empty_classes()
        if require_all_classes and empty:
            raise XeniumError(
                f"classes {empty} have no labelled Xenium cell, so a classifier cannot learn them: remove them "
                "from the panel (MarkerPanel.subset) or lower min_confidence"
            )
        rows = self.table.loc[self.labelled]
        xy = rows[["x_px", "y_px"]].to_numpy(dtype=np.float64)
        if not np.isfinite(xy).all():
            raise XeniumError("labelled cells have no slide positions: register the AnnData before typing")
        return CellTable(ids=rows["cell_id"].astype(str).tolist(), centroids_px=xy, labels=rows["class"].tolist())


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _select_classes(
    panel: MarkerPanel, genes: set[str], organs: list[str] | None
) -> tuple[MarkerPanel, dict[str, list[str]], list[str]]:
    """Keep the classes the run can score; return them, missing genes per class and skipped classes."""
    keep: list[str] = []
    skipped: list[str] = []
    missing: dict[str, list[str]] = {}
    for marker_class in panel.classes:
        present = [g for g in marker_class.positive if g in genes]
        absent = [g for g in (*marker_class.positive, *marker_class.negative) if g not in genes]
        requested = marker_class.organ is None or (organs is not None and marker_class.organ in organs)
        if marker_class.organ is not None and organs is not None and marker_class.organ not in organs:
            continue
        # Markers shared with the parent cannot tell an organ class from it.
        parent_markers = set(panel.get(marker_class.parent).positive) if marker_class.parent else set()
        specific = [g for g in present if g not in parent_markers]
        if not requested and not specific:
            skipped.append(marker_class.name)
            continue
        if not present:
            if requested:
                raise XeniumError(
                    f"none of the positive markers of class {marker_class.name!r} "
                    f"({', '.join(marker_class.positive)}) is measured in this Xenium run; "
                    "add markers the run measures to the panel, or remove the class"
                )
            skipped.append(marker_class.name)
            continue
        keep.append(marker_class.name)
        if absent:
            missing[marker_class.name] = absent
    if skipped:
        logger.warning(
            "organ classes %s are left out: the run measures none of their markers that their parent lacks",
            skipped,
        )
    for name, absent in missing.items():
        logger.warning("class %r: markers %s are not measured in this run", name, absent)
    if not keep:
        raise XeniumError(f"no class of panel {panel.name!r} has a marker measured in this run")
    return panel.subset(keep), missing, skipped


def _score_classes(work, panel: MarkerPanel, random_state: int):
    """Return the ``(n_cells, n_classes)`` marker scores of ``work`` (log-normalised AnnData)."""
    import scanpy as sc

    genes = set(work.var_names)
    n_vars = work.n_vars
    scores = np.zeros((work.n_obs, len(panel.classes)))

    def score(gene_list: list[str]) -> np.ndarray:
        # Few remaining genes leave nothing to draw reference genes from: plain mean.
        if n_vars - len(gene_list) < 5:
            return np.asarray(work[:, gene_list].X.mean(axis=1)).ravel()
        sc.tl.score_genes(
            work,
            gene_list,
            ctrl_size=min(50, n_vars - len(gene_list)),
            n_bins=min(25, max(1, n_vars // 4)),
            score_name="_nuclass_score",
            random_state=random_state,
            use_raw=False,
        )
        values = work.obs.pop("_nuclass_score").to_numpy(dtype=np.float64)
        return values

    for j, marker_class in enumerate(panel.classes):
        positive = [g for g in marker_class.positive if g in genes]
        scores[:, j] = score(positive)
        negative = [g for g in marker_class.negative if g in genes]
        if negative:
            scores[:, j] -= np.clip(score(negative), 0.0, None)
    return scores


def _margins(scores: np.ndarray, best: np.ndarray, panel: MarkerPanel) -> np.ndarray:
    """Relative margin of the best class over the strongest competitor outside its lineage."""
    names = panel.class_names
    competitors = np.ones((len(names), len(names)), dtype=bool)
    for j, name in enumerate(names):
        for related in panel.lineage(name):
            competitors[j, names.index(related)] = False
    masked = np.where(competitors[best], scores, -np.inf)
    runner_up = masked.max(axis=1)
    top = scores[np.arange(len(best)), best]
    with np.errstate(divide="ignore", invalid="ignore"):
        margin = np.where(np.isfinite(runner_up), (top - runner_up) / top, 1.0)
    return np.clip(np.nan_to_num(margin, nan=0.0), 0.0, 1.0)


def _neighbour_agreement(work, best: np.ndarray, n_neighbors: int, random_state: int) -> np.ndarray:
    """Share of each cell's expression neighbours with the same best class."""
    import scanpy as sc

    n_cells = work.n_obs
    if n_cells < 3:
        logger.warning("only %d cells to type: neighbour agreement is not computed", n_cells)
        return np.ones(n_cells)
    n_comps = int(min(30, work.n_vars - 1, n_cells - 1))
    sc.pp.pca(work, n_comps=n_comps, random_state=random_state)
    k = int(min(n_neighbors, n_cells - 1))
    sc.pp.neighbors(work, n_neighbors=k, use_rep="X_pca", method="gauss", random_state=random_state)
    distances = work.obsp["distances"].tocsr()
    counts = np.diff(distances.indptr)
    same = (best[distances.indices] == np.repeat(best, counts)) & (np.repeat(best, counts) >= 0)
    agreeing = sp.csr_matrix((same.astype(np.float64), distances.indices, distances.indptr), shape=distances.shape)
    sums = np.asarray(agreeing.sum(axis=1)).ravel()
    return np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)


def _require_leiden() -> None:
    missing = [name for name in ("leidenalg", "igraph") if importlib.util.find_spec(name) is None]
    if missing:
        raise XeniumError(
            f"Leiden clustering needs {' and '.join(missing)}, which is not installed: "
            "pip install nuclass-qupath[leiden]"
        )


def _leiden_types(work, scores: np.ndarray, best: np.ndarray, panel: MarkerPanel, resolution: float, seed: int):
    """Cluster with Leiden and type each cluster by its mean marker scores."""
    import scanpy as sc

    sc.tl.leiden(
        work, resolution=resolution, flavor="igraph", n_iterations=2, directed=False, random_state=seed
    )
    clusters = work.obs["leiden"].astype(int).to_numpy()
    n_clusters = int(clusters.max()) + 1
    means = np.vstack([scores[clusters == c].mean(axis=0) for c in range(n_clusters)])
    cluster_best = means.argmax(axis=1)
    cluster_margin = _margins(means, cluster_best, panel)
    has_signal = means[np.arange(n_clusters), cluster_best] > 0
    purity = np.array([np.mean(best[clusters == c] == cluster_best[c]) for c in range(n_clusters)])
    # A cell's own support for its cluster's class: its score for that class
    # relative to its own best score, so cells whose markers disagree lose confidence.
    rows = np.arange(len(best))
    own_best = scores[rows, best]
    with np.errstate(divide="ignore", invalid="ignore"):
        support = np.clip(np.nan_to_num(scores[rows, cluster_best[clusters]] / own_best, nan=0.0), 0.0, 1.0)
    support = np.where(best == cluster_best[clusters], 1.0, support)
    confidence = np.cbrt(cluster_margin[clusters] * purity[clusters] * support)
    logger.info("Leiden found %d clusters at resolution %g", n_clusters, resolution)
    return clusters, cluster_best[clusters], confidence, cluster_margin[clusters], purity[clusters], has_signal[clusters]


def type_cells(
    adata,
    panel: MarkerPanel,
    *,
    min_transcripts: int = 10,
    min_confidence: float = 0.5,
    n_neighbors: int = 15,
    leiden: bool = False,
    leiden_resolution: float = 1.0,
    organs: list[str] | None = None,
    random_state: int = 0,
) -> LabelResult:
    """Type each Xenium cell by its marker genes.

    Parameters
    ----------
    adata
        AnnData from :func:`~nuclass_qupath.xenium.bundle.read_xenium`, raw
        counts in ``X``; registered with
        :func:`~nuclass_qupath.xenium.registration.register_to_slide` when the
        labels need slide positions. It is not modified.
    panel
        Marker panel.
    min_transcripts
        Cells with fewer gene transcripts stay unlabelled (``few_transcripts``).
    min_confidence
        Cells below this confidence (0-1) stay unlabelled (``low_confidence``).
    n_neighbors
        Expression neighbours per cell for the agreement.
    leiden
        Type Leiden clusters instead of single cells; needs ``leidenalg`` and
        ``igraph`` (``pip install nuclass-qupath[leiden]``).
    leiden_resolution
        Leiden resolution; higher gives more clusters.
    organs
        Organs whose classes to use. ``None`` uses every organ class that has
        a marker in the run which its parent class lacks. A list uses only the
        classes of those organs, and raises when one of them has no marker in
        the run.
    random_state
        Seed for reference-gene sampling, PCA, neighbours and Leiden.

    Returns
    -------
    LabelResult

    Raises
    ------
    XeniumError
        If a class has no marker in the run, the run has no cells, or Leiden is
        requested without its packages.
    """
    import anndata as ad
    import scanpy as sc

    if not 0.0 <= min_confidence <= 1.0:
        raise XeniumError(f"min_confidence must be within 0-1, got {min_confidence}")
    if adata.n_obs == 0:
        raise XeniumError("the Xenium run has no cells to type")
    if leiden:
        _require_leiden()
    started = time.perf_counter()
    used_panel, missing, skipped = _select_classes(panel, set(map(str, adata.var_names)), organs)
    names = used_panel.class_names

    n_cells = adata.n_obs
    totals = np.asarray(adata.X.sum(axis=1)).ravel()
    on_slide = adata.obs["on_slide"].to_numpy(dtype=bool) if "on_slide" in adata.obs else np.ones(n_cells, bool)
    reason = np.full(n_cells, "", dtype=object)
    reason[totals < min_transcripts] = REASON_FEW_TRANSCRIPTS
    reason[~on_slide] = REASON_OFF_SLIDE
    scored = reason == ""

    # Normalise and score the cells that have enough transcripts.
    scores_all = np.full((n_cells, len(names)), np.nan)
    best_all = np.full(n_cells, -1)
    margin_all = np.full(n_cells, np.nan)
    agreement_all = np.full(n_cells, np.nan)
    confidence_all = np.full(n_cells, np.nan)
    cluster_all = np.full(n_cells, -1)
    class_all = np.full(n_cells, "", dtype=object)
    if scored.any():
        work = ad.AnnData(X=adata.X[scored].astype(np.float32), var=pd.DataFrame(index=adata.var_names.astype(str)))
        sc.pp.normalize_total(work)
        sc.pp.log1p(work)
        scores = _score_classes(work, used_panel, random_state)
        best = scores.argmax(axis=1)
        signal = scores[np.arange(len(best)), best] > 0
        best_or_none = np.where(signal, best, -1)
        agreement = _neighbour_agreement(work, best_or_none, n_neighbors, random_state)
        if leiden:
            clusters, best, confidence, margin, agreement, signal = _leiden_types(
                work, scores, best, used_panel, leiden_resolution, random_state
            )
            cluster_all[scored] = clusters
        else:
            margin = _margins(scores, best, used_panel)
            confidence = np.sqrt(margin * agreement)
        confidence = np.where(signal, confidence, 0.0)

        scores_all[scored] = scores
        best_all[scored] = np.where(signal, best, -1)
        margin_all[scored] = margin
        agreement_all[scored] = agreement
        confidence_all[scored] = confidence
        scored_reason = np.where(
            ~signal, REASON_NO_MARKER_SIGNAL, np.where(confidence < min_confidence, REASON_LOW_CONFIDENCE, "")
        )
        reason[scored] = scored_reason
        labelled = scored.copy()
        labelled[scored] = scored_reason == ""
        class_all[labelled] = np.array(names, dtype=object)[best_all[labelled]]

    xy = adata.obsm["slide_px"] if "slide_px" in adata.obsm else np.full((n_cells, 2), np.nan)
    table = pd.DataFrame(
        {
            "cell_id": adata.obs_names.astype(str),
            "x_px": xy[:, 0],
            "y_px": xy[:, 1],
            "class": class_all,
            "confidence": confidence_all,
            "reason": reason,
            "best_class": np.where(best_all >= 0, np.array(names + [""], dtype=object)[best_all], ""),
            "margin": margin_all,
            "agreement": agreement_all,
            "transcript_counts": totals.astype(np.int64),
        }
    )
    if leiden:
        table["cluster"] = cluster_all
    result = LabelResult(
        table=table,
        scores=pd.DataFrame(scores_all, index=adata.obs_names.astype(str), columns=names),
        panel=used_panel,
        missing_genes=missing,
        skipped_classes=skipped,
        parameters={
            "min_transcripts": min_transcripts,
            "min_confidence": min_confidence,
            "n_neighbors": n_neighbors,
            "leiden": leiden,
            "leiden_resolution": leiden_resolution if leiden else None,
            "organs": organs,
            "random_state": random_state,
        },
    )
    empty = result.empty_classes()
    if empty:
        logger.warning("classes %s got no labelled cell; training on these labels will fail for them", empty)
    logger.info(
        "typed %d cells into %d classes in %.2f s: %d labelled, dropped %s",
        n_cells,
        len(names),
        time.perf_counter() - started,
        int(result.labelled.sum()),
        result.dropped(),
    )
    return result

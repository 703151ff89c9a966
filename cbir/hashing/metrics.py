"""The hashing metrics of the deep hashing survey, with label relevance (an item is relevant
to a query when they share at least one label) or any relevance matrix.

Rankings are by Hamming distance, ties by map order (row index): every number here is exact
and the same on every machine. Conventions, stated once:

* ``map`` (mAP over all): AP = the mean of the precisions at the ranks of the relevant items,
  over all of them (the survey's mAP); queries with no relevant item are left out;
* ``map@k``: the same over the first ``k`` items, divided by the relevant items found there
  (the convention of the DPSH/HashNet evaluation code; 0 when none is found);
* ``precision@k``: relevant items among the first ``k``, averaged over queries; ``recall@k``:
  the share of a query's relevant items among its first ``k``, averaged (the hashing
  convention, not the localization papers' "at least one");
* ``precision_radius``: the share of relevant items among those within Hamming radius ``r``
  (default 2), 0 for a query with none there (the survey's "precision within Hamming radius
  2"); ``map_radius``: AP over the items within radius ``r`` (0 with none);
* ``pr_curve``: precision and recall at each radius 0..B (precision averaged over the queries
  that retrieve something at that radius).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CbirError


def label_relevance(query_labels: np.ndarray, map_labels: np.ndarray) -> np.ndarray:
    """Q x N booleans: the items sharing at least one label."""
    q, m = np.asarray(query_labels, np.float32), np.asarray(map_labels, np.float32)
    if q.shape[1] != m.shape[1]:
        raise CbirError(f"query labels over {q.shape[1]} classes, map labels over {m.shape[1]}")
    return q @ m.T > 0


def rank(distances: np.ndarray) -> np.ndarray:
    """Each row's map indices by increasing distance, ties by index (a stable sort)."""
    return np.argsort(distances, axis=1, kind="stable")


def _ap(rel: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Per row, sum of precision at each relevant rank / ``denominator`` (0 where it is 0)."""
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    total = (rel * hits / ranks).sum(1)
    return np.divide(total, denominator, out=np.zeros(len(rel)), where=denominator > 0)


def hashing_metrics(distances: np.ndarray, relevance: np.ndarray, bits: int, ks: tuple[int, ...] = (100,),
                    radius: int = 2) -> dict[str, Any]:
    """Every metric above for ``distances`` (Q x N Hamming) and ``relevance`` (Q x N bool)."""
    distances = np.asarray(distances)
    relevance = np.asarray(relevance, dtype=bool)
    if distances.shape != relevance.shape:
        raise CbirError(f"distances {distances.shape} and relevance {relevance.shape} do not match")
    order = rank(distances)
    rel = np.take_along_axis(relevance, order, axis=1).astype(np.float64)
    dist = np.take_along_axis(distances, order, axis=1)
    total = rel.sum(1)
    has = total > 0
    if not has.any():
        raise CbirError("no query has a relevant item: the labels of the query and the map have nothing in common")
    out: dict[str, Any] = {"queries": int(len(rel)), "queries_with_relevant": int(has.sum()),
                           "map": float(_ap(rel, total)[has].mean())}
    for k in ks:
        top = rel[:, :k]
        out[f"map@{k}"] = float(_ap(top, top.sum(1))[has].mean())
        out[f"precision@{k}"] = float((top.sum(1) / min(k, rel.shape[1]))[has].mean())
        out[f"recall@{k}"] = float((top.sum(1) / np.maximum(total, 1))[has].mean())
    within = dist <= radius
    found = within.sum(1)
    rel_within = rel * within
    out[f"precision_radius{radius}"] = float(np.divide(rel_within.sum(1), found, out=np.zeros(len(rel)),
                                                       where=found > 0)[has].mean())
    out[f"map_radius{radius}"] = float(_ap(rel_within, rel_within.sum(1))[has].mean())
    out[f"empty_radius{radius}"] = float((found == 0)[has].mean())
    precision, recall = [], []
    for r in range(bits + 1):
        w = dist <= r
        n = w.sum(1)
        hits = (rel * w).sum(1)
        some = has & (n > 0)
        precision.append(float((hits[some] / n[some]).mean()) if some.any() else 1.0)
        recall.append(float((hits / np.maximum(total, 1))[has].mean()))
    out["pr_curve"] = {"radius": list(range(bits + 1)), "precision": precision, "recall": recall}
    return out


def pr_curve_html(curves: dict[str, dict[str, Any]], title: str) -> str:
    """A self-contained HTML page (plotly's offline bundle inlined: no network when viewed)
    plotting the precision-recall curves ``curves`` (label -> a ``pr_curve`` of
    :func:`hashing_metrics`), one point per Hamming radius."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for label, curve in curves.items():
        figure.add_trace(go.Scatter(x=curve["recall"], y=curve["precision"], mode="lines+markers", name=label,
                                    customdata=curve["radius"],
                                    hovertemplate="radius %{customdata}<br>recall %{x:.3f}<br>precision %{y:.3f}"))
    figure.update_layout(title=title, xaxis_title="recall", yaxis_title="precision",
                         xaxis_range=[0, 1.02], yaxis_range=[0, 1.02], template="plotly_white")
    return str(figure.to_html(include_plotlyjs=True, full_html=True))


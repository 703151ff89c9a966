"""Localization metrics: the share of queries within (translation, rotation) thresholds of
their ground truth, median errors, and cumulative error curves.

Rotation error = angle of R_est^T R_gt (degrees); translation error = distance between
the camera centres (the dataset's unit). A query without an estimated pose counts as not
localized: it is within no threshold and is left out of the medians.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import CbirError
from ..geometry.poses import Pose, rotation_error_deg
from ..io.textfile import read_utf8

DEFAULT_THRESHOLDS: tuple[tuple[float, float], ...] = ((0.25, 2.0), (0.5, 5.0), (5.0, 10.0))


def pose_errors(estimated: dict[str, Pose], ground_truth: dict[str, Pose]) -> dict[str, tuple[float, float]]:
    """(translation, rotation) error of every ground-truth query; NaN when not localized."""
    out = {}
    for name, gt in ground_truth.items():
        est = estimated.get(name)
        if est is None:
            out[name] = (float("nan"), float("nan"))
        else:
            dt = float(np.linalg.norm(est.center - gt.center))
            dr = float(rotation_error_deg(est.rotation_matrix, gt.rotation_matrix))
            out[name] = (dt, dr)
    return out


def conditions_from(patterns: dict[str, str], names: list[str]) -> dict[str, list[str]]:
    """Query subsets by regular expression on the image name."""
    out = {}
    for label, pattern in patterns.items():
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise CbirError(f"bad pattern for condition {label!r}: {e}") from None
        out[label] = [n for n in names if rx.search(n)]
    return out


def read_condition_list(path: str | Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in read_utf8(path, "condition list").splitlines())
    return [line for line in lines if line]


def summarize(errors: dict[str, tuple[float, float]], thresholds=DEFAULT_THRESHOLDS,
              names: list[str] | None = None) -> dict:
    names = list(errors) if names is None else [n for n in names if n in errors]
    e = np.array([errors[n] for n in names], np.float64).reshape(-1, 2)
    ok = np.isfinite(e[:, 0])
    within = [float(np.mean(ok & (e[:, 0] <= t) & (e[:, 1] <= r))) if len(e) else float("nan")
              for t, r in thresholds]
    return {
        "queries": len(names),
        "localized": int(ok.sum()),
        "not_localized": int((~ok).sum()),
        "thresholds": [list(t) for t in thresholds],
        "within": within,
        "median_translation": float(np.median(e[ok, 0])) if ok.any() else float("nan"),
        "median_rotation_deg": float(np.median(e[ok, 1])) if ok.any() else float("nan"),
    }


def plot_cumulative(errors: dict[str, tuple[float, float]], path: str | Path, title: str = "") -> None:
    """Cumulative distributions of translation and rotation errors, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CbirError("--plot needs matplotlib: pip install matplotlib") from None
    e = np.array(list(errors.values()), np.float64).reshape(-1, 2)
    n = len(e)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, col, label in ((axes[0], 0, "translation error"), (axes[1], 1, "rotation error (deg)")):
        v = np.sort(e[np.isfinite(e[:, col]), col])
        ax.step(np.r_[0, v], np.arange(len(v) + 1) / max(n, 1) * 100, where="post")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel(label)
        ax.set_ylabel("% of queries")
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title or f"{n} queries")
    fig.tight_layout()
    from ..io.atomic import atomic_output

    with atomic_output(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

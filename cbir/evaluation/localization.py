"""Localization metrics: the share of queries within (translation, rotation) thresholds of
their ground truth, median errors, and cumulative error curves.

Rotation error = angle of R_est^T R_gt (degrees); translation error = distance between
the camera centres (the dataset's unit). A query without an estimated pose counts as not
localized: it is within no threshold and is left out of the medians.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CbirError
from ..geometry.poses import Pose, rotation_error_deg
from ..io.textfile import read_utf8, split_lines

DEFAULT_THRESHOLDS: tuple[tuple[float, float], ...] = ((0.25, 2.0), (0.5, 5.0), (5.0, 10.0))


def check_thresholds(thresholds: Any) -> tuple[tuple[float, float], ...]:
    """(meters, degrees) pairs, each positive and finite, degrees at most 180; at least one."""
    try:
        out = tuple((float(t), float(r)) for t, r in thresholds)
    except (TypeError, ValueError):
        raise CbirError(f"thresholds must be (meters, degrees) pairs, got {thresholds!r}") from None
    if not out:
        raise CbirError("no threshold")
    for t, r in out:
        if not (0 < t < float("inf")) or not (0 < r <= 180):
            raise CbirError(f"threshold ({t:g} m, {r:g} deg): meters must be positive and finite, "
                            "degrees in (0, 180]")
    return out


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
    lines = (line.split("#", 1)[0].strip() for line in split_lines(read_utf8(path, "condition list")))
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


def plot_cumulative(errors: dict[str, tuple[float, float]], path: str | Path, title: str = "",
                    thresholds: tuple[tuple[float, float], ...] = DEFAULT_THRESHOLDS,
                    queries: int | None = None) -> None:
    """Cumulative distributions of the translation (m) and rotation (degrees) errors as a PNG:
    the share of the ``queries`` (default: those in ``errors``; failed ones never count)
    within each error, on log axes with plain-number ticks, the thresholds of the
    evaluation marked with the share within each."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator
    except ImportError:
        raise CbirError("--plot needs matplotlib: pip install matplotlib") from None
    e = np.array(list(errors.values()), np.float64).reshape(-1, 2)
    n = max(queries if queries is not None else len(e), 1)
    failed = n - int(np.isfinite(e[:, 0]).sum())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    axes_spec = ((axes[0], 0, "translation error (m)", "m"), (axes[1], 1, "rotation error (°)", "°"))
    for ax, col, label, unit in axes_spec:
        v = np.sort(e[np.isfinite(e[:, col]), col])
        marks = sorted({t[col] for t in thresholds})
        lo = min([m / 10 for m in marks] + ([float(v[v > 0].min())] if (v > 0).any() else []))
        hi = max(marks + ([float(v.max())] if len(v) else [])) * 2
        x = np.clip(v, lo, None)  # an error of 0 sits at the left edge of the log axis
        ax.step(np.r_[lo, x, hi], np.r_[0, np.arange(1, len(v) + 1), len(v)] / n * 100, where="post",
                color="tab:blue", linewidth=2)
        for m in marks:
            share = 100 * float(np.sum(v <= m)) / n
            ax.axvline(m, color="tab:red", linestyle="--", linewidth=1)
            ax.text(m, 2, f"{share:.0f}% ≤ {m:g} {unit} ", rotation=90, ha="right", va="bottom", fontsize=8,
                    color="tab:red")
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.xaxis.set_major_locator(LogLocator(base=10))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda t, _: f"{t:g}"))
        ax.set_xlabel(label)
        ax.set_ylabel("queries within the error (%)")
        ax.set_ylim(0, 100)
        ax.set_yticks(range(0, 101, 20))
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle((title + ": " if title else "") + f"{n} queries" + (f", {failed} not localized" if failed else ""))
    fig.tight_layout()
    from ..io.atomic import atomic_output

    with atomic_output(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

"""``cbir evaluate``: localization accuracy, or retrieval metrics (``--retrieval``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import CbirError
from ..evaluation.localization import check_thresholds
from ..evaluation.retrieval import (
    REVISITED_PROTOCOLS,
    evaluate_rankings,
    ground_truth_from_labels,
    ground_truth_from_poses,
    read_ground_truth,
    revisited_ground_truth,
)
from ..io.pairs import read_pairs
from ._common import console_err, console_out, open_dataset, print_json, table, warn

if TYPE_CHECKING:
    from rich.table import Table


@click.command()
@click.option("--retrieval", is_flag=True, help="Evaluate a pairs file as retrieval results.")
@click.option("--query", type=click.Path(file_okay=False, path_type=Path),
              help="Query dataset whose localization results are evaluated.")
@click.option("--results", "results_name", help="Localization result name (default: the only one).")
@click.option("--poses", type=click.Path(dir_okay=False, path_type=Path),
              help="Estimated poses as a kapture trajectories.txt or a visuallocalization.net file instead.")
@click.option("--thresholds", default="0.25,2 0.5,5 5,10", show_default=True,
              help="(translation, rotation deg) pairs, space-separated.")
@click.option("--condition", "conditions", multiple=True, metavar="LABEL=REGEX",
              help="A query subset by a pattern on image names (repeatable).")
@click.option("--condition-list", "condition_lists", multiple=True, metavar="LABEL=FILE",
              help="A query subset from a list file (repeatable).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Cumulative error curves (PNG).")
@click.option("--pairs", "pairs_file", help="Retrieval: pairs file (ranked per query), or -.")
@click.option("--gt", "gt_path", type=click.Path(exists=True, path_type=Path),
              help="Localization: the dataset with the queries' ground-truth poses. Retrieval: a file of "
                   "'query_image, map_image[, positive|junk]' lines.")
@click.option("--revisited", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Revisited Oxford/Paris gnd_*.pkl (with --protocol).")
@click.option("--protocol", type=click.Choice(sorted(REVISITED_PROTOCOLS)), default="medium", show_default=True)
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Retrieval: a labels file ('image, label[, label ...]'): relevant = sharing a label (with --map).")
@click.option("--map", "map_", type=click.Path(file_okay=False, path_type=Path),
              help="Map dataset (pose-based or label ground truth, or names for --revisited).")
@click.option("--query-gt", type=click.Path(file_okay=False, path_type=Path),
              help="Dataset with the queries' ground-truth poses (pose-based ground truth).")
@click.option("--max-distance", type=click.FloatRange(0), default=10.0, show_default=True,
              help="Pose-based: largest camera-centre distance of a relevant map image.")
@click.option("--max-angle", type=click.FloatRange(0, 180), default=45.0, show_default=True,
              help="Pose-based: largest angle (degrees) between optical axes.")
@click.option("--ks", default="1,5,10,20", show_default=True, help="The k of recall@k and precision@k.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def evaluate(retrieval: bool, query: Path | None, results_name: str | None, poses: Path | None,
             thresholds: str, conditions: tuple[str, ...], condition_lists: tuple[str, ...],
             plot: Path | None, pairs_file: str | None, gt_path: Path | None, revisited: Path | None, protocol: str,
             labels_path: Path | None, map_: Path | None, query_gt: Path | None, max_distance: float,
             max_angle: float, ks: str, as_json: bool) -> None:
    """Localization accuracy: the share of queries within each (translation, rotation)
    threshold of their ground truth, per condition, with median errors.

    With --retrieval: mAP, recall@k (a relevant image among the first k) and precision@k of
    a pairs file, against a ground-truth file, the revisited Oxford/Paris protocol, poses, or
    labels (the hashing metrics over every map image: cbir hash evaluate).
    """
    if not retrieval:
        if gt_path is not None and not gt_path.is_dir():
            raise click.UsageError("--gt must be a dataset directory with ground-truth poses (or use --retrieval)")
        _evaluate_poses(query, results_name, poses, gt_path, thresholds, conditions, condition_lists, plot, as_json)
        return
    if not pairs_file:
        raise click.UsageError("--retrieval needs --pairs")
    if gt_path is not None and gt_path.is_dir():
        raise click.UsageError("with --retrieval, --gt is a ground-truth file (use --query-gt for poses)")
    gt_file = gt_path
    try:
        k_values = tuple(sorted({int(k) for k in ks.split(",") if k.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {ks!r}", param_hint="--ks") from None
    pairs = read_pairs(pairs_file)
    gt, source = _retrieval_ground_truth(pairs, gt_file, revisited, protocol, labels_path, map_, query_gt,
                                         max_distance, max_angle)
    result = evaluate_rankings(pairs, gt, k_values)
    result["ground_truth"] = source
    # a k beyond the longest ranked list measures the list's length, not the retrieval: left out
    longest = result["ranked_per_query_max"]
    shown = tuple(k for k in k_values if k <= longest)
    if not shown:  # every k asked is beyond the lists: measure at their length
        shown = (longest,)
        result = {**evaluate_rankings(pairs, gt, shown), "ground_truth": source}
    if shown != k_values:
        for metric in ("recall@k", "precision@k"):
            result[metric] = {k: v for k, v in result[metric].items() if k in shown}
        result["ks_left_out"] = [k for k in k_values if k not in shown]
    if as_json:
        print_json(result)
        return
    t = table(f"retrieval: {result['queries']} queries, ground truth {source}",
              [("mAP", "right"), *((f"R@{k}", "right") for k in shown), *((f"P@{k}", "right") for k in shown)])
    t.add_row(f"{100 * result['mAP']:.1f}%", *(f"{100 * result['recall@k'][k]:.1f}%" for k in shown),
              *(f"{100 * result['precision@k'][k]:.1f}%" for k in shown))
    out = console_out()
    out.print(t)
    for line in retrieval_notes(result):
        out.print(line, highlight=False)


def _retrieval_ground_truth(pairs: list, gt_file: Path | None, revisited: Path | None, protocol: str,
                            labels_path: Path | None, map_: Path | None, query_gt: Path | None, max_distance: float,
                            max_angle: float) -> tuple[Any, str]:
    """The ground truth of ``cbir evaluate --retrieval`` from the one source given, and how to name it."""
    sources = [s for s in (gt_file, revisited, labels_path, query_gt) if s is not None]
    if len(sources) != 1:
        raise click.UsageError("give exactly one ground truth: --gt FILE, --revisited PKL, --labels FILE or "
                               "--query-gt DATASET (with --map)")
    if gt_file:
        return read_ground_truth(gt_file), str(gt_file)
    if not map_:
        what = "--revisited" if revisited else "label ground truth" if labels_path else "pose-based ground truth"
        raise click.UsageError(f"{what} needs --map" + (" (its image names)" if revisited else ""))
    if labels_path:
        from ..hashing.labels import read_labels

        names = open_dataset(map_).sensors.image_names()
        try:
            gt = ground_truth_from_labels(read_labels(labels_path), sorted({p.query for p in pairs}), names)
        except CbirError as e:
            raise CbirError(e.message, labels_path) from None
        return gt, f"{labels_path} (sharing a label)"
    if revisited:
        names = open_dataset(map_).sensors.image_names()
        return (revisited_ground_truth(revisited, protocol, sorted({p.query for p in pairs}), names),
                f"{revisited} ({protocol})")
    assert query_gt is not None
    return (ground_truth_from_poses(open_dataset(query_gt).sensors.image_poses(),
                                    open_dataset(map_).sensors.image_poses(),
                                    max_distance=max_distance, max_angle_deg=max_angle),
            f"poses (<= {max_distance:g} m, <= {max_angle:g} deg)")


def retrieval_notes(result: dict) -> list[str]:
    """What each metric counts, and what bounds it here (said under the table)."""
    longest, relevant = result["ranked_per_query_max"], result["relevant_per_query_mean"]
    notes = [f"R@k: the share of queries with a relevant map image among their first k. P@k: the share of "
             f"relevant images among the first k. mAP: the mean average precision over every relevant map image "
             f"of a query ({relevant:.1f} on average here); the pairs file ranks at most {longest} per query"
             + (", so mAP stays below 100% even when every ranked image is relevant." if relevant > longest else
                ".")]
    if result.get("ks_left_out"):
        notes.append(f"not shown: k = {', '.join(map(str, result['ks_left_out']))} (beyond the {longest} map images "
                     "ranked per query; retrieve with a larger --topk to measure them)")
    if result["queries_without_pairs"]:
        notes.append(f"[yellow]{len(result['queries_without_pairs'])} ground-truth queries have no pair "
                     "(not evaluated)[/]")
    if result["queries_without_ground_truth"]:
        notes.append(f"[yellow]{len(result['queries_without_ground_truth'])} queries of the pairs have no ground "
                     "truth (not evaluated)[/]")
    return notes


def _parse_thresholds(text: str) -> tuple[tuple[float, float], ...]:
    try:
        pairs = [t.split(",") for t in text.split()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError
        return check_thresholds(pairs)
    except (ValueError, CbirError) as e:
        raise click.BadParameter(getattr(e, "message", f"expected 't,r t,r ...', got {text!r}"),
                                 param_hint="--thresholds") from None


def _evaluate_poses(query: Path | None, results_name: str | None, poses: Path | None, gt_dataset: Path | None,
                    thresholds: str, conditions: tuple[str, ...], condition_lists: tuple[str, ...],
                    plot: Path | None, as_json: bool) -> None:
    from ..evaluation.localization import conditions_from, plot_cumulative, pose_errors, read_condition_list, summarize
    from ..io.kapture_text import read_trajectories
    from ..io.vlnet import read_vlnet

    if gt_dataset is None:
        raise click.UsageError("give --gt DATASET (ground-truth poses), or --retrieval")
    gt = open_dataset(gt_dataset).sensors.image_poses()
    if not gt:
        raise click.UsageError(f"{gt_dataset} has no poses to compare with")
    queries: list[str] | None = None  # the queries evaluated (None: the ground truth's images)
    if poses is not None:
        if poses.suffix == ".txt" and poses.name == "trajectories.txt" and query is not None:
            records = open_dataset(query).sensors.records
            traj = read_trajectories(poses)
            estimated = {r.name: traj[(r.timestamp, r.camera_id)] for r in records
                         if (r.timestamp, r.camera_id) in traj}
        else:
            estimated = read_vlnet(poses)
        if query is not None:
            queries = open_dataset(query).sensors.image_names()
    else:
        if query is None:
            raise click.UsageError("give --query DATASET (its localization results) or --poses FILE")
        from ..localize import read_results

        directory = open_dataset(query).localization_result(results_name)
        results_name = directory.name
        results = read_results(directory)
        estimated = {r.name: r.pose for r in results if r.success and r.pose is not None}
        queries = [r.name for r in results]
    th = _parse_thresholds(thresholds)
    what = f"the results {results_name}" if results_name else str(poses)
    evaluated = [q for q in (gt if queries is None else queries) if q in gt]
    if not evaluated or (queries is None and not set(estimated) & set(gt)):
        raise CbirError(f"none of the {len(queries) if queries is not None else len(estimated)} queries of {what} "
                        f"has a ground-truth pose in {gt_dataset} (first: "
                        f"{(queries or list(estimated) or ['-'])[0]}): check --gt", gt_dataset)
    if queries is not None and len(evaluated) < len(queries):
        warn(f"{len(queries) - len(evaluated)} of {len(queries)} queries of {what} have no ground-truth pose in "
             f"{gt_dataset}: not evaluated")
    errors = pose_errors(estimated, {q: gt[q] for q in evaluated})
    groups = {"all": list(errors)}
    groups.update(conditions_from(dict(c.split("=", 1) for c in conditions if "=" in c), list(errors)))
    for item in condition_lists:
        label, _, path = item.partition("=")
        groups[label] = read_condition_list(path)
    result = {label: summarize(errors, th, names) for label, names in groups.items()}
    if plot:
        plot_cumulative(errors, plot, str(results_name or poses), th)
        console_err().print(f"wrote {plot} (cumulative errors)", highlight=False)
    if as_json:
        print_json({"conditions": result, "errors": {n: list(e) for n, e in errors.items()}})
        return
    console_out().print(pose_table(f"localization: {results_name or poses}", result, th))


def pose_table(title: str, result: dict[str, dict], thresholds: tuple[tuple[float, float], ...]) -> Table:
    """The threshold table of the paper, one row per condition: the percentage of queries
    within each (meters, degrees) threshold, the median errors, the queries not localized."""
    t = table(title, [("condition", "left"), ("queries", "right"),
                      *((f"≤{m:g} m\n≤{r:g}°", "right") for m, r in thresholds),
                      ("median\nt (m)", "right"), ("median\nR (°)", "right"), ("failed", "right")])
    for label, s in result.items():
        t.add_row(label, str(s["queries"]), *(f"{100 * v:.1f}%" for v in s["within"]),
                  _rounded(s["median_translation"]), _rounded(s["median_rotation_deg"]), str(s["not_localized"]))
    return t


def _rounded(value: float) -> str:
    """Three significant digits, at most 3 decimals: 0.0234 -> 0.023, 12.345 -> 12.3."""
    if value != value:
        return "-"
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"

"""``cbir evaluate``: retrieval metrics (``--retrieval``)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..evaluation.retrieval import (REVISITED_PROTOCOLS, evaluate_rankings, ground_truth_from_poses,
                                    read_ground_truth, revisited_ground_truth)
from ..io.pairs import read_pairs
from ._common import console_out, open_dataset, print_json


@click.command()
@click.option("--retrieval", is_flag=True, required=True,
              help="Evaluate a pairs file as retrieval results (pose evaluation comes with `cbir localize`).")
@click.option("--pairs", "pairs_file", required=True, help="Pairs file (ranked per query), or -.")
@click.option("--gt", "gt_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Ground truth: 'query_image, map_image[, positive|junk]' a line.")
@click.option("--revisited", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Revisited Oxford/Paris gnd_*.pkl (with --protocol).")
@click.option("--protocol", type=click.Choice(sorted(REVISITED_PROTOCOLS)), default="medium", show_default=True)
@click.option("--map", "map_", type=click.Path(file_okay=False, path_type=Path),
              help="Map dataset (pose-based ground truth, or names for --revisited).")
@click.option("--query-gt", type=click.Path(file_okay=False, path_type=Path),
              help="Dataset with the queries' ground-truth poses (pose-based ground truth).")
@click.option("--max-distance", type=click.FloatRange(0), default=10.0, show_default=True,
              help="Pose-based: largest camera-centre distance of a relevant map image.")
@click.option("--max-angle", type=click.FloatRange(0, 180), default=45.0, show_default=True,
              help="Pose-based: largest angle (degrees) between optical axes.")
@click.option("--ks", default="1,5,10,20", show_default=True, help="The k of recall@k and precision@k.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def evaluate(retrieval: bool, pairs_file: str, gt_file: Path | None, revisited: Path | None, protocol: str,
             map_: Path | None, query_gt: Path | None, max_distance: float, max_angle: float, ks: str,
             as_json: bool) -> None:
    """Retrieval metrics of a pairs file: mAP, recall@k (a relevant image among the first k),
    precision@k, against a ground-truth file, the revisited Oxford/Paris protocol, or poses."""
    try:
        k_values = tuple(sorted({int(k) for k in ks.split(",") if k.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {ks!r}", param_hint="--ks") from None
    pairs = read_pairs(pairs_file)
    sources = [s for s in (gt_file, revisited, query_gt) if s is not None]
    if len(sources) != 1:
        raise click.UsageError("give exactly one ground truth: --gt FILE, --revisited PKL, or --query-gt DATASET "
                               "(with --map)")
    if gt_file:
        gt, source = read_ground_truth(gt_file), str(gt_file)
    elif revisited:
        if not map_:
            raise click.UsageError("--revisited needs --map (its image names)")
        names = open_dataset(map_).sensors.image_names()
        gt = revisited_ground_truth(revisited, protocol, sorted({p.query for p in pairs}), names)
        source = f"{revisited} ({protocol})"
    else:
        if not map_:
            raise click.UsageError("pose-based ground truth needs --map")
        gt = ground_truth_from_poses(open_dataset(query_gt).sensors.image_poses(),
                                     open_dataset(map_).sensors.image_poses(),
                                     max_distance=max_distance, max_angle_deg=max_angle)
        source = f"poses (<= {max_distance:g} m, <= {max_angle:g} deg)"
    result = evaluate_rankings(pairs, gt, k_values)
    result["ground_truth"] = source
    if as_json:
        print_json(result)
        return
    table = Table(title=f"retrieval: {result['queries']} queries, ground truth {source}", title_justify="left")
    table.add_column("mAP", justify="right")
    for k in k_values:
        table.add_column(f"R@{k}", justify="right")
    for k in k_values:
        table.add_column(f"P@{k}", justify="right")
    table.add_row(f"{100 * result['mAP']:.1f}", *(f"{100 * result['recall@k'][k]:.1f}" for k in k_values),
                  *(f"{100 * result['precision@k'][k]:.1f}" for k in k_values))
    out = console_out()
    out.print(table)
    if result["queries_without_pairs"]:
        out.print(f"[yellow]{len(result['queries_without_pairs'])} ground-truth queries have no pair[/]")

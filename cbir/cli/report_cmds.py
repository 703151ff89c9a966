"""``cbir report``: a self-contained HTML page of a localization or retrieval run."""

from __future__ import annotations

from pathlib import Path

import click

from ..io.pairs import read_pairs
from ._common import console_err, is_quiet, open_dataset, report_written
from .evaluate_cmds import _parse_thresholds
from .features_cmds import progress_bar


@click.command("report")
@click.option("--query", required=True, type=click.Path(file_okay=False, path_type=Path), help="Query dataset.")
@click.option("--map", "map_", required=True, type=click.Path(file_okay=False, path_type=Path), help="Map dataset.")
@click.option("--results", "results_name",
              help="Localization result name (QUERY/cbir/localization/NAME; default: the only one).")
@click.option("--pairs", "pairs_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Pairs file (default: the one the localization used); alone: a retrieval report.")
@click.option("--gt", "gt_dataset", type=click.Path(file_okay=False, path_type=Path),
              help="Dataset with the queries' ground-truth poses (errors, correct retrieved images).")
@click.option("--thresholds", default="0.25,2 0.5,5 5,10", show_default=True, help="(meters,degrees) pairs.")
@click.option("--condition", "conditions", multiple=True, metavar="LABEL=REGEX",
              help="A summary row for the queries whose name matches REGEX (e.g. night=night/).")
@click.option("--max-points", type=click.IntRange(0), default=100_000, show_default=True,
              help="3D points shown at most (a uniform sample of the map's).")
@click.option("--thumb-size", type=click.IntRange(16, 2048), default=160, show_default=True,
              help="Longest edge of the thumbnails (px).")
@click.option("--topk", type=click.IntRange(0), default=5, show_default=True, help="Retrieved images per query card.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="HTML file (default: report.html in the result's directory, or beside the pairs file).")
@click.pass_context
def report_cmd(ctx: click.Context, query: Path, map_: Path, results_name: str | None, pairs_file: Path | None,
               gt_dataset: Path | None, thresholds: str, conditions: tuple[str, ...], max_points: int,
               thumb_size: int, topk: int, output: Path | None) -> None:
    """Write one HTML file that opens without a network: the summary, cumulative errors, a 3D
    view of the map and the queries, and one card per query (retrieved images, matches)."""
    from .. import report as report_mod

    q, m = open_dataset(query), open_dataset(map_)
    results = None
    if pairs_file is None or results_name is not None:
        results = q.localization_result(results_name)
    if any("=" not in c for c in conditions):
        raise click.BadParameter("expected LABEL=REGEX", param_hint="--condition")
    conf = report_mod.ReportConf(max_points=max_points, thumb_size=thumb_size, topk=topk,
                                 thresholds=_parse_thresholds(thresholds),
                                 conditions=tuple((c.partition("=")[0], c.partition("=")[2]) for c in conditions))
    quiet = is_quiet(ctx)
    with progress_bar("report", quiet) as update:
        data = report_mod.collect(q, m, results=results, pairs=read_pairs(pairs_file) if pairs_file else None,
                                  ground_truth=open_dataset(gt_dataset) if gt_dataset else None, conf=conf,
                                  progress=update)
    if output is None:
        output = results / "report.html" if results is not None else Path(str(pairs_file)).with_suffix(".html")
    out = output
    report_mod.write(data, out)
    if not quiet:
        console_err().print(f"{len(data['cards'])} query cards, {len(data['scene']['points'])} 3D points",
                            highlight=False)
    report_written([out], quiet)

"""``cbir map``, ``cbir localize``, ``cbir rig estimate``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from ..cores import LOCALIZE_WORKERS, MAX_WORKERS, default_workers
from ..geometry.colmap_options import PAPER_CONFIGS
from ..io.atomic import atomic_write_text
from ..io.kapture_text import format_rigs
from ..io.pairs import read_pairs
from ..io.vlnet import write_vlnet
from ._common import (
    STATUS_NOTES,
    console_err,
    console_out,
    is_quiet,
    open_dataset,
    print_json,
    report_written,
    table,
    warn,
)
from .features_cmds import cli_executor, executor_options, parse_conf, progress_bar


@click.command("map")
@click.argument("dataset", type=click.Path(file_okay=False, path_type=Path))
@click.option("--local", "local", required=True, help="Local-feature store of the map images.")
@click.option("--matches", required=True, help="Verified map x map matches store (cbir match --verify).")
@click.option("--name", help="Map name (default: LOCAL).")
@click.option("--conf", "conf_items", multiple=True, metavar="KEY=VALUE",
              help="config1 options (min_num_matches, filter_max_reproj_error, ...) or pycolmap "
                   "IncrementalPipelineOptions by dotted path (triangulation.min_angle=2).")
@click.option("--colmap", "colmap_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Also write the map as a COLMAP model (binary) here.")
@click.option("--overwrite", is_flag=True,
              help="Recompute, replacing a map of the same NAME (also one of another configuration).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def map_cmd(ctx: click.Context, dataset: Path, local: str, matches: str, name: str | None,
            conf_items: tuple[str, ...], colmap_dir: Path | None, overwrite: bool, as_json: bool) -> None:
    """Triangulate the 3D points of DATASET's map from its known poses (COLMAP point triangulator)."""
    from .. import mapping

    report = mapping.main(open_dataset(dataset), local, matches, name=name, overrides=parse_conf(conf_items),
                          overwrite=overwrite, colmap_dir=colmap_dir, verbose=bool(ctx.obj.get("debug")))
    if report.status != "new" and not (is_quiet(ctx) or as_json):
        console_err().print(STATUS_NOTES[report.status].format(what="map"), highlight=False)
    summary = {"map": str(report.path), "status": report.status, "points": report.points,
               "mean_track_length": report.mean_track_length,
               "mean_reprojection_error": report.mean_reprojection_error, "images": report.images,
               "images_with_points": report.images_with_points, "pairs_used": report.pairs_used,
               "skipped": report.skipped, "colmap": str(report.colmap_dir) if report.colmap_dir else None}
    for s in report.skipped:
        console_err().print(f"[yellow]skipped[/] {escape(s)}", highlight=False)
    if as_json:
        print_json(summary)
    elif not is_quiet(ctx):
        console_err().print(f"{report.points} points, mean track length {report.mean_track_length:.2f}, "
                            f"mean reprojection error {report.mean_reprojection_error:.2f} px, "
                            f"{report.images_with_points}/{report.images} images with points", highlight=False)
    report_written(([report.path] if report.status != "reused" else []) +
                   ([report.colmap_dir] if report.colmap_dir else []), is_quiet(ctx) or as_json)


@click.command("localize")
@click.option("--query", required=True, type=click.Path(file_okay=False, path_type=Path), help="Query dataset.")
@click.option("--map", "map_", required=True, type=click.Path(file_okay=False, path_type=Path), help="Map dataset.")
@click.option("--pairs", "pairs_file", required=True, help="Query x map pairs (retrieval), or -.")
@click.option("--local", "local", required=True, help="Local-feature store (in both datasets).")
@click.option("--matches", required=True, help="Query x map matches store in the query dataset.")
@click.option("--map-name", help="Map store name (default: LOCAL).")
@click.option("--config", type=click.Choice(sorted(PAPER_CONFIGS)), default="config2", show_default=True,
              help="The paper's COLMAP settings.")
@click.option("--conf", "conf_items", multiple=True, metavar="KEY=VALUE",
              help="Override a config option (abs_pose_max_error=16), or pycolmap's estimation.X / refinement.X.")
@click.option("--name", help="Result name (default: LOCAL-CONFIG): QUERY/cbir/localization/NAME/.")
@click.option("--use-unverified", is_flag=True, help="Use all matches, not only the verified inliers.")
@click.option("--rig", is_flag=True, help="Give failed queries the pose of a localized camera of their rig.")
@click.option("--rig-max-gap", type=click.IntRange(0), default=0, show_default=True,
              help="Largest timestamp difference to a rig partner (unsynchronized rigs).")
@click.option("--sequence", is_flag=True, help="Interpolate failed queries within their sequence.")
@click.option("--sequence-max-gap", type=click.IntRange(0), default=1, show_default=True,
              help="A larger timestamp gap starts a new sequence.")
@click.option("--vlnet", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the poses in the visuallocalization.net submission format.")
@click.option("--num-workers", type=click.IntRange(1, MAX_WORKERS), default=None,
              help="Processes estimating poses in parallel [default: the usable cores, at most 4].")
@click.option("--overwrite", is_flag=True,
              help="Recompute, replacing a result of the same NAME (also one of another configuration).")
@executor_options(100, "queries")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def localize_cmd(ctx: click.Context, query: Path, map_: Path, pairs_file: str, local: str, matches: str,
                 map_name: str | None, config: str, conf_items: tuple[str, ...], name: str | None,
                 use_unverified: bool, rig: bool, rig_max_gap: int, sequence: bool, sequence_max_gap: int,
                 vlnet: Path | None, num_workers: int | None, overwrite: bool, executor: str, ray_address: str | None,
                 shard_size: int, as_json: bool) -> None:
    """Estimate the pose of every query of a pairs file against a triangulated map.

    The result records its configuration and inputs (run.json): re-running with the same
    ones reuses it, with changed inputs (pairs, matches, map) redoes it, and a result of
    another configuration is replaced only with --overwrite.
    """
    from .. import localize as localize_mod

    q, m = open_dataset(query), open_dataset(map_)
    quiet = is_quiet(ctx)
    post = localize_mod.PostprocessConf(rig=rig, rig_max_gap=rig_max_gap, sequence=sequence,
                                        sequence_max_gap=sequence_max_gap)
    estimate = cli_executor(executor, ray_address, shard_size, "queries").pose_estimator()
    with progress_bar("localize", quiet or as_json) as update:
        report = localize_mod.main(q, m, read_pairs(pairs_file), local, matches, map_name=map_name, config=config,
                                   overrides=parse_conf(conf_items), name=name,
                                   num_workers=num_workers or default_workers(LOCALIZE_WORKERS),
                                   use_unverified=use_unverified, post=post,
                                   pairs_source=localize_mod.pairs_source(pairs_file, q), overwrite=overwrite,
                                   progress=update, estimate=estimate)
    results = report.results
    for message in report.warnings:
        warn(message)
    if report.status != "new" and not (quiet or as_json):
        console_err().print(STATUS_NOTES[report.status].format(what="result"), highlight=False)
    written = [report.directory / "trajectories.txt", report.directory / "report.json",
               report.directory / localize_mod.RECORD_FILE] if report.status != "reused" else []
    if vlnet:
        poses = {r.name: r.pose for r in results if r.success and r.pose is not None}
        write_vlnet(vlnet, poses)
        written.append(vlnet)
    if as_json:
        print_json({"directory": str(report.directory), "status": report.status, "queries": len(results),
                    "localized": sum(r.success for r in results),
                    "by_method": {k: sum(r.method == k for r in results) for k in ("pnp", "rig", "sequence")},
                    "skipped_pairs": report.skipped_pairs, "warnings": report.warnings,
                    "failed": [{"image": r.name, "reason": r.reason} for r in results if not r.success]})
    elif not quiet:
        t = table(f"localization ({config})", [("query", "left"), ("result", "left"), ("map\nimages", "right"),
                                               ("2D-3D", "right"), ("inliers", "right"), ("note", "left")])
        for r in results:
            t.add_row(escape(r.name), r.method if r.success else "[red]failed[/]", str(r.num_map_images),
                      str(r.num_2d3d), str(r.num_inliers), escape(r.reason))
        console_err().print(t)
        console_err().print(f"{sum(r.success for r in results)}/{len(results)} queries localized")
    report_written(written, quiet or as_json)


@click.group("rig")
def rig_group() -> None:
    """Rigs of cameras (rigs.txt)."""


@rig_group.command("estimate")
@click.argument("dataset", type=click.Path(file_okay=False, path_type=Path))
@click.option("--cameras", required=True, help="Comma-separated camera ids of the rig (the first is its frame).")
@click.option("--rig-id", default="rig", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="rigs.txt to write (default: print it).")
def rig_estimate(dataset: Path, cameras: str, rig_id: str, output: Path | None) -> None:
    """Estimate a rig from the poses of DATASET's images taken at the same timestamps."""
    from ..geometry.postprocess import estimate_rig

    cams = [c.strip() for c in cameras.split(",") if c.strip()]
    rig = estimate_rig(open_dataset(dataset).sensors, cams)
    text = format_rigs({rig_id: rig})
    if output:
        atomic_write_text(output, text)
        report_written([output])
    else:
        console_out().print(text, end="", highlight=False, markup=False)

"""``cbir import`` and ``cbir export``: kapture, COLMAP, hloc, visuallocalization.net."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import (
    console_err,
    dataset_argument,
    follow_symlinks_option,
    is_quiet,
    open_dataset,
    print_json,
    print_skipped,
    report_written,
)

image_mode_option = click.option(
    "--images", "image_mode", type=click.Choice(["copy", "link", "skip"]), default="copy", show_default=True,
    help="Copy the images, link their directory, or leave them out.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace existing outputs.")


def _interchange():
    """cbir.io.interchange, imported when a command runs (it loads pycolmap; --help does not)."""
    from ..io import interchange

    return interchange


@click.group("import")
def import_group() -> None:
    """Make cbir datasets and stores from other tools' files."""


@import_group.command("images")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dataset", type=click.Path(file_okay=False, path_type=Path))
@image_mode_option
@overwrite_option
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.pass_context
def import_images(ctx: click.Context, src: Path, dataset: Path, image_mode: str, overwrite: bool,
                  as_json: bool) -> None:
    """A folder of images SRC (subfolders too) as the dataset DATASET, with cameras from EXIF.

    Images whose EXIF gives a focal length (FocalLengthIn35mmFilm) share a SIMPLE_RADIAL
    camera per make, model, focal length and size; the others get an UNKNOWN_CAMERA each
    (cbir localize estimates its focal length). Files that are not images are skipped and
    reported. A map needs poses besides (sensors/trajectories.txt: import a COLMAP model or a
    kapture dataset for one); a query dataset needs none.
    """
    report = _interchange().import_images(src, dataset, images=image_mode, overwrite=overwrite)
    quiet = is_quiet(ctx)
    print_skipped("skipped", report.skipped, report.images + len(report.skipped), "files")
    if as_json:
        print_json({"dataset": str(dataset), "images": report.images, "exif_cameras": report.exif_cameras,
                    "exif_images": report.exif_images, "unknown_camera_images": report.unknown_images,
                    "skipped": [{"file": f, "reason": r} for f, r in report.skipped]})
    elif not quiet:
        console_err().print(f"{report.images} images: {report.exif_images} with an EXIF focal length "
                            f"({report.exif_cameras} cameras), {report.unknown_images} without (UNKNOWN_CAMERA)",
                            highlight=False)
    report_written(report.written, quiet or as_json)


@import_group.command("kapture")
@click.argument("src", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", required=False, type=click.Path(file_okay=False, path_type=Path))
@image_mode_option
@overwrite_option
@click.option("--follow-symlinks", is_flag=True,
              help="Import files of sensors/ and reconstruction/ that are symbolic links out of SRC.")
@click.pass_context
def import_kapture(ctx: click.Context, src: Path, dst: Path | None, image_mode: str, overwrite: bool,
                   follow_symlinks: bool) -> None:
    """A kapture dataset SRC (with its reconstruction/ features, matches, points) into DST.

    Without DST the stores are added to SRC itself (under SRC/cbir/).
    """
    written = _interchange().import_kapture(src, dst, images=image_mode, overwrite=overwrite,
                                            follow_symlinks=follow_symlinks)
    report_written(written, is_quiet(ctx))


@import_group.command("colmap")
@click.argument("model", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option("--image-dir", type=click.Path(exists=True, file_okay=False), help="The model's images.")
@image_mode_option
@click.option("--name", default="colmap", show_default=True, help="Name of the keypoint and map stores.")
@overwrite_option
@click.pass_context
def import_colmap(ctx: click.Context, model: Path, dst: Path, image_dir: str | None, image_mode: str, name: str,
                  overwrite: bool) -> None:
    """A COLMAP sparse model (text or binary) into a dataset DST: cameras, poses, points."""
    written = _interchange().import_colmap(model, dst, images_dir=image_dir, images=image_mode,
                                        name=name, overwrite=overwrite)
    report_written(written, is_quiet(ctx))


@import_group.command("hloc")
@dataset_argument()
@click.option("--features", type=click.Path(exists=True, dir_okay=False), help="hloc features .h5")
@click.option("--matches", type=click.Path(exists=True, dir_okay=False), help="hloc matches .h5")
@click.option("--name", default="hloc", show_default=True, help="Name of the cbir stores.")
@overwrite_option
@click.pass_context
def import_hloc(ctx: click.Context, dataset: Path, features: str | None, matches: str | None, name: str,
                overwrite: bool) -> None:
    """hloc feature and match files into DATASET's stores."""
    if not features and not matches:
        raise click.UsageError("give --features and/or --matches")
    written = _interchange().import_hloc(open_dataset(dataset), features=features, matches=matches, name=name,
                                      overwrite=overwrite)
    report_written(written, is_quiet(ctx))


@import_group.command("vlnet")
@click.argument("submission", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@dataset_argument()
@click.pass_context
def import_vlnet(ctx: click.Context, submission: Path, dataset: Path) -> None:
    """Poses of a visuallocalization.net SUBMISSION into DATASET's trajectories."""
    report_written(_interchange().import_vlnet(submission, open_dataset(dataset)), is_quiet(ctx))


@click.group("export")
def export_group() -> None:
    """Write cbir datasets and stores in other tools' formats."""


@export_group.command("kapture")
@dataset_argument()
@click.argument("dst", type=click.Path(file_okay=False, path_type=Path))
@click.option("--local", multiple=True, help="Local-feature store(s) to export.")
@click.option("--global", "global_", multiple=True, help="Global-feature store(s) to export.")
@click.option("--matches", multiple=True, help="Match store(s) to export.")
@click.option("--map", "map_", help="Map store to export as points3d + observations.")
@click.option("--all", "all_", is_flag=True, help="Export every store of the dataset.")
@click.option("--inliers-only", is_flag=True, help="Export only verified matches.")
@image_mode_option
@follow_symlinks_option
@click.pass_context
def export_kapture(ctx: click.Context, dataset: Path, dst: Path, local: tuple[str, ...],
                   global_: tuple[str, ...], matches: tuple[str, ...], map_: str | None, all_: bool,
                   inliers_only: bool, image_mode: str, follow_symlinks: bool) -> None:
    """DATASET as a kapture dataset DST, with the chosen stores under reconstruction/."""
    ds = open_dataset(dataset, follow_symlinks)
    maps = [map_] if map_ else []
    if all_:
        stores = ds.list_stores()
        local, global_, matches = (tuple(p.stem for p in stores[k]) for k in ("local", "global", "matches"))
        maps = [p.stem for p in stores["map"]][:1]
    written = _interchange().export_kapture(ds, dst, local=list(local), global_=list(global_), matches=list(matches),
                                         maps=maps, images=image_mode, inliers_only=inliers_only)
    report_written(written, is_quiet(ctx))


@export_group.command("colmap")
@dataset_argument()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--binary", is_flag=True, help="Write .bin files instead of .txt.")
@click.option("--map", "map_", help="Map store whose points to export.")
@click.option("--local", help="Local-feature store the map's tracks refer to.")
@click.pass_context
def export_colmap(ctx: click.Context, dataset: Path, out: Path, binary: bool, map_: str | None,
                  local: str | None) -> None:
    """DATASET's posed images (and a map) as a COLMAP sparse model in OUT."""
    ds = open_dataset(dataset)
    if map_ and not local:
        local = _map_local(ds, map_)
    report_written(_interchange().export_colmap(ds, out, binary=binary, map_name=map_, local=local), is_quiet(ctx))


def _map_local(ds, map_name: str) -> str:
    from ..io.map_store import read_map
    return read_map(ds.store_path("map", map_name)).local_features


@export_group.command("hloc")
@dataset_argument()
@click.option("--local", required=True, help="Local-feature store.")
@click.option("--features-out", type=click.Path(dir_okay=False), help="hloc features .h5 to write.")
@click.option("--matches", help="Match store.")
@click.option("--matches-out", type=click.Path(dir_okay=False), help="hloc matches .h5 to write.")
@click.pass_context
def export_hloc(ctx: click.Context, dataset: Path, local: str, features_out: str | None, matches: str | None,
                matches_out: str | None) -> None:
    """DATASET's stores as hloc feature and match files."""
    if bool(matches) != bool(matches_out):
        raise click.UsageError("--matches and --matches-out go together")
    written = _interchange().export_hloc(open_dataset(dataset), local, features_out=features_out, matches=matches,
                                      matches_out=matches_out)
    report_written(written, is_quiet(ctx))


@export_group.command("vlnet")
@dataset_argument()
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--basename", is_flag=True, help="Write image base names (as the benchmarks expect).")
@click.option("--results", "results_name",
              help="Export this localization result of DATASET (cbir/localization/NAME/), not its trajectories.")
@click.pass_context
def export_vlnet(ctx: click.Context, dataset: Path, output: Path, basename: bool, results_name: str | None) -> None:
    """DATASET's image poses (or a localization result's) in the visuallocalization.net format."""
    report_written(_interchange().export_vlnet(open_dataset(dataset), output, basename=basename, results=results_name),
                   is_quiet(ctx))

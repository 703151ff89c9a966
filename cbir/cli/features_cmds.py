"""``cbir extract``, ``cbir pairs``, ``cbir match`` and ``cbir show``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..cores import MAX_WORKERS
from ..errors import CbirError
from ..executor import EXECUTORS, Executor, ShardSizes, make_executor
from ..io.pairs import exhaustive_pairs, read_pairs, write_pairs
from ..matching import DEFAULT_MATCHER, VERIFY_METHODS
from ..validate import unknown_names
from ._common import (
    PluginName,
    PluginOption,
    console_err,
    dataset_argument,
    follow_symlinks_option,
    is_quiet,
    open_dataset,
    print_json,
    print_skipped,
    report_written,
)

device_option = click.option("--device", default="auto", show_default=True,
                             help="cpu, cuda, cuda:N, or auto (cuda when present).")
workers_option = click.option("--num-workers", type=click.IntRange(0, MAX_WORKERS), default=None,
                              help="Threads for image decoding, feature reading and verification "
                                   "[default: the usable cores, at most 16].")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace an output of another configuration.")


def executor_options(shard_size: int, unit: str) -> Callable:
    """``--executor``, ``--ray-address`` and ``--shard-size`` (``shard_size`` ``unit`` a task)."""
    options = [
        click.option("--executor", type=click.Choice(EXECUTORS), default="local", show_default=True,
                     help=f"Where to run: this process, or a Ray cluster (shards of --shard-size {unit} as tasks; "
                          "the datasets on a file system every node sees at the same path). Needs cbir[ray]."),
        click.option("--ray-address", help="Ray cluster to join [default: $RAY_ADDRESS, else a local instance]."),
        click.option("--shard-size", type=click.IntRange(1), default=shard_size, show_default=True,
                     help=f"--executor ray: {unit} a task."),
    ]

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def cli_executor(kind: str, address: str | None, shard_size: int, step: str, sharded: bool = False) -> Executor:
    """The executor of ``--executor`` (``--ray-address``), with ``--shard-size`` as the shard
    size of ``step`` (a field of :class:`ShardSizes`: images, pairs, queries, map_images) and
    ``--sharded``."""
    return make_executor(kind, address, replace(ShardSizes(), **{step: shard_size}), sharded=sharded or None)


#: ``--sharded`` of the commands that write stores
sharded_option = click.option(
    "--sharded", is_flag=True,
    help="Write what this run adds as a new part of a sharded store (formats/SPEC.md 5b; a single file becomes "
         "its first part, by a rename). --executor ray always does.")


@contextmanager
def progress_bar(description: str, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """Progress of one phase, ``update(advance, total)``: see :func:`progress_bars`."""
    with progress_bars(quiet, description) as (update,):
        yield update


#: the phase of a model learned on the map before extraction (DenseVLAD's)
LEARNING_LABEL = "learn the vocabulary and PCA on the map"

#: piped into a log, a phase that runs longer than this says so (then every LOG_EVERY_S), and
#: says when it ends: short phases stay silent, long ones are never silent for long
LOG_AFTER_S = 5.0
LOG_EVERY_S = 30.0


@contextmanager
def progress_bars(quiet: bool, *descriptions: str) -> Iterator[tuple[Callable[[int, int], None], ...]]:
    """One ``update(advance, total)`` per phase: the first phase shown at once, each other from
    its first update (a later phase). On a terminal, rich bars with the elapsed and remaining
    time; in a log, one line for a phase that runs longer than :data:`LOG_AFTER_S` (count,
    total, elapsed), then one every :data:`LOG_EVERY_S`, and one when it ends."""
    console = console_err()
    if quiet:
        yield tuple((lambda advance, total: None) for _ in descriptions)
        return
    if not console.is_terminal:
        logs = [_PhaseLog(d) for d in descriptions]
        try:
            yield tuple(log.update for log in logs)
        finally:
            for log in logs:
                log.close()
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), console=console) as progress:
        tasks = {0: progress.add_task(descriptions[0], total=None)}

        def updater(i: int) -> Callable[[int, int], None]:
            def update(advance: int, total: int) -> None:
                if i not in tasks:
                    tasks[i] = progress.add_task(descriptions[i], total=total)
                progress.update(tasks[i], advance=advance, total=total)
            return update

        yield tuple(updater(i) for i in range(len(descriptions)))
        for task in tasks.values():  # a phase that ended between refreshes shows its end
            progress.update(task, refresh=True)


class _PhaseLog:
    """A phase's progress as log lines (see :func:`progress_bars`)."""

    def __init__(self, label: str) -> None:
        self.label, self.done, self.total = label, 0, 0
        self.start = time.monotonic()
        self.last: float | None = None  # when the last line was printed (None: none yet)

    def update(self, advance: int, total: int) -> None:
        self.done, self.total = self.done + advance, total
        now = time.monotonic()
        if (self.last is None and now - self.start >= LOG_AFTER_S) or \
                (self.last is not None and now - self.last >= LOG_EVERY_S):
            self.last = now
            self._print(f"{self.done}/{self.total}, {now - self.start:.0f} s")

    def close(self) -> None:
        if self.last is not None:
            self._print(f"{self.done}/{self.total} done in {time.monotonic() - self.start:.1f} s")

    def _print(self, state: str) -> None:
        console_err().print(f"{escape(self.label)}: {state}", highlight=False)


def parse_conf(items: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` options; values are JSON when they parse as JSON, strings otherwise."""
    conf: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected key=value, got {item!r}", param_hint="--conf")
        try:
            conf[key] = json.loads(value)
        except json.JSONDecodeError:
            conf[key] = value
    return conf


@click.command()
@dataset_argument()
@click.option("--local", "local", type=PluginName("local"),
              help="Local feature extractor (an installed one, or module:Class; `cbir weights list` says what "
                   "weights each loads).")
@click.option("--global", "global_", type=PluginName("global", several=True), cls=PluginOption, plugin_kind="global",
              help="Global extractors, comma-separated ({names}).")
@click.option("--weights", type=click.Path(exists=True, path_type=Path),
              help="Weight file, or a directory holding it (also searched: $CBIR_WEIGHTS, ~/.cache/cbir/weights).")
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Extractors that learn a model on the map (DenseVLAD): the map's .model.h5 (vocabulary and PCA) "
                   "to extract queries with.")
@click.option("--learn", is_flag=True,
              help="Extractors that learn a model on the map (DenseVLAD): learn it on DATASET (the map); queries "
                   "take the map's --model.")
@click.option("--name", help="Store name (one extractor only; default: the extractor, or its weight file's name).")
@click.option("--max-keypoints", type=click.IntRange(0), help="Keep the N best keypoints (0: all).")
@click.option("--max-size", type=click.IntRange(1), help="Longest image edge processed.")
@click.option("--conf", "conf_items", multiple=True, metavar="KEY=VALUE", help="Any other extractor option.")
@click.option("--images", "image_list", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Only the images named in this file (one per line).")
@device_option
@workers_option
@overwrite_option
@follow_symlinks_option
@click.option("--apply-exif", is_flag=True,
              help="Rotate images by their EXIF orientation first (default: stored pixels, as kapture, COLMAP "
                   "and hloc; intrinsics describe the stored pixels). Recorded in the store's configuration.")
@click.option("--max-image-pixels", type=click.IntRange(1), default=None,
              help="Refuse (skip and report) larger images before decoding [default: $CBIR_MAX_IMAGE_PIXELS "
                   "or 268435456].")
@executor_options(64, "images")
@sharded_option
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.pass_context
def extract(ctx: click.Context, dataset: Path, local: str | None, global_: str | None, weights: Path | None,
            model: Path | None, learn: bool, name: str | None, max_keypoints: int | None, max_size: int | None,
            conf_items: tuple[str, ...], image_list: Path | None, device: str, num_workers: int, overwrite: bool,
            follow_symlinks: bool, apply_exif: bool, max_image_pixels: int | None, executor: str,
            ray_address: str | None, shard_size: int, sharded: bool, as_json: bool) -> None:
    """Extract local features (DATASET/cbir/local/) and global descriptors (DATASET/cbir/global/).

    Resumes where an interrupted run stopped; unreadable images are skipped and reported.
    """
    from .. import extract as extract_mod
    jobs: list[tuple[str, str]] = ([("local", local)] if local else []) + \
        [("global", g.strip()) for g in (global_ or "").split(",") if g.strip()]
    if not jobs:
        raise click.UsageError("give --local NAME and/or --global NAME[,NAME...]")
    if name and len(jobs) > 1:
        raise click.UsageError("--name needs a single extractor")
    common = parse_conf(conf_items)
    if learn and model:
        raise click.UsageError("--learn learns a model on DATASET; --model uses the map's: give one of them")
    for key, value in (("max_keypoints", max_keypoints), ("max_size", max_size), ("model", model),
                       ("learn", learn or None)):
        if value is not None:
            common[key] = str(value) if isinstance(value, Path) else value
    classes = [extract_mod.extractor_class(n, kind) for kind, n in jobs]
    known = set().union(*(c.default_conf for c in classes))
    if set(common) - known:
        raise CbirError(f"unknown option(s) {unknown_names(set(common) - known, known)} for "
                        f"{', '.join(n for _, n in jobs)}")
    if weights is not None and not any("weights" in c.default_conf for c in classes):
        raise CbirError(f"{', '.join(n for _, n in jobs)} use(s) no weights: drop --weights")
    specs = [(kind, n, extract_mod.extractor_conf(kind, n, common, weights, device)) for kind, n in jobs]
    ds = open_dataset(dataset, follow_symlinks)
    images = extract_mod.read_image_list(image_list, ds.sensors.image_names()) if image_list else None
    quiet = is_quiet(ctx)
    label = ", ".join(f"{kind} {n}" for kind, n in jobs)
    image_options = extract_mod.ImageOptions(apply_exif, max_image_pixels)
    run = cli_executor(executor, ray_address, shard_size, "images", sharded)
    where = "" if run.in_place else f" ({run.name})"
    with progress_bars(quiet or as_json, f"extract {label}{where}", LEARNING_LABEL,
                       "collect the parts") as (update, learning, merging):
        reports = run.extract(specs, ds, store_names=[name] * len(specs), images=images, overwrite=overwrite,
                              num_workers=num_workers, image_options=image_options, progress=update,
                              learning=learning, merging=merging)
    summaries = [_extraction_summary(extractor_name, report, quiet or as_json)
                 for (_, extractor_name, _), report in zip(specs, reports, strict=True)]
    if as_json:
        print_json(summaries[0] if len(summaries) == 1 else summaries)
    for report in reports:  # a store with no image is no result: say so with exit code 1
        if report.failed and not report.extracted and not report.already_present:
            raise CbirError(f"no image could be extracted ({len(report.failed)} skipped, first: "
                            f"{report.failed[0][0]}: {report.failed[0][1]})", report.path)


def _extraction_summary(extractor_name: str, report: Any, quiet: bool) -> dict[str, Any]:
    """Say what one extractor's run did (skipped images always; the rest unless ``quiet``),
    and return it for ``--json``."""
    for image, reason in report.failed:
        console_err().print(f"[yellow]skipped[/] {escape(image)}: {escape(reason)}", highlight=False)
    for image in report.empty:
        console_err().print(f"[yellow]no keypoint[/] in {escape(image)}", highlight=False)
    summary = {"store": str(report.path), "extracted": report.extracted, "already_present": report.already_present,
               "keypoints": report.keypoints, "failed": [{"image": i, "reason": r} for i, r in report.failed],
               "empty": report.empty, "seconds": {k: round(v, 3) for k, v in report.seconds.items()},
               "bound_by": report.bound_by}
    if report.weights_note:
        summary["weights_source"] = report.weights_note
        if not quiet:
            console_err().print(f"{extractor_name} weights: {report.weights_note}", highlight=False)
    if not quiet:
        detail = f" ({report.keypoints / report.extracted:.0f} keypoints on average)" \
            if report.extracted and report.keypoints else ""
        console_err().print(f"{extractor_name}: {report.extracted} images extracted{detail}, "
                            f"{report.already_present} already present, {len(report.failed)} skipped")
    report_written([report.path], quiet)
    return summary


@click.group("pairs")
def pairs_group() -> None:
    """Make image pair lists (retrieval makes them too: ``cbir retrieve``)."""


@pairs_group.command("exhaustive")
@click.option("--map", "map_", required=True, type=click.Path(file_okay=False, path_type=Path), help="Map dataset.")
@click.option("--query", type=click.Path(file_okay=False, path_type=Path),
              help="Query dataset (default: map x map, each unordered pair once).")
@click.option("-o", "--output", required=True, help="Pairs file, or - for stdout.")
@click.pass_context
def pairs_exhaustive(ctx: click.Context, map_: Path, query: Path | None, output: str) -> None:
    """Every query x map pair (or every map x map pair)."""
    m = open_dataset(map_).sensors.image_names()
    pairs = exhaustive_pairs(open_dataset(query).sensors.image_names(), m) if query else exhaustive_pairs(m)
    write_pairs(output, pairs)
    if output != "-":
        report_written([Path(output)], is_quiet(ctx))


@click.command()
@click.option("--query", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Query dataset (the matches store is written there).")
@click.option("--map", "map_", type=click.Path(file_okay=False, path_type=Path),
              help="Map dataset (default: the query dataset, for map x map pairs).")
@click.option("--pairs", "pairs_file", required=True, help="Pairs file (query_image, map_image[, score]), or -.")
@click.option("--local", "local", required=True, help="Name of the local-feature store in both datasets.")
@click.option("--name", help="Matches store name (default: LOCAL, or LOCAL-PAIRSNAME for a pairs file).")
@click.option("--matcher", "matcher_name", type=PluginName("matcher"), default=DEFAULT_MATCHER, show_default=True,
              help="Matcher (an installed one, or module:Class).")
@click.option("--mutual/--no-mutual", default=True, show_default=True,
              help="nn matcher: keep mutual nearest neighbours only.")
@click.option("--ratio", type=click.FloatRange(0, 1, min_open=True), help="nn matcher: Lowe's ratio test threshold.")
@click.option("--max-distance", type=click.FloatRange(0, 2),
              help="nn matcher: largest L2 distance of unit descriptors.")
@click.option("--conf", "conf_items", multiple=True, metavar="KEY=VALUE", help="Any other matcher option.")
@click.option("--verify", type=click.Choice(VERIFY_METHODS), is_flag=False, flag_value="ransac", default=None,
              help="Geometric verification: ransac (--verify alone; pycolmap's two-view geometry) or poses (the "
                   "known epipolar geometry of posed images, map x map; RANSAC for pairs without poses).")
@click.option("--max-error", type=click.FloatRange(0, min_open=True), default=4.0, show_default=True,
              help="Error bound (px): RANSAC's, or the Sampson error under the known poses.")
@click.option("--confidence", type=click.FloatRange(0, 1), default=0.999, show_default=True)
@click.option("--min-inliers", type=click.IntRange(0), default=15, show_default=True,
              help="A pair with fewer inliers keeps none.")
@device_option
@workers_option
@overwrite_option
@executor_options(1000, "pairs")
@sharded_option
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.pass_context
def match(ctx: click.Context, query: Path, map_: Path | None, pairs_file: str, local: str, name: str | None,
          matcher_name: str, mutual: bool, ratio: float | None, max_distance: float | None,
          conf_items: tuple[str, ...], verify: str | None, max_error: float,
          confidence: float, min_inliers: int, device: str, num_workers: int, overwrite: bool, executor: str,
          ray_address: str | None, shard_size: int, sharded: bool, as_json: bool) -> None:
    """Match the local features of the image pairs of a pairs file."""
    from ..matching.base import load_matcher
    from ..matching.verify import VerifyConf

    q = open_dataset(query)
    m = open_dataset(map_) if map_ else q
    pairs = read_pairs(pairs_file)
    if name is None:
        name = local if pairs_file == "-" else f"{local}-{Path(pairs_file).stem}"
    options = parse_conf(conf_items)
    for key, value in (("mutual", mutual), ("ratio", ratio), ("max_distance", max_distance)):
        if ctx.get_parameter_source(key) is not click.core.ParameterSource.DEFAULT:
            options[key] = value  # the nn matcher's own options: another matcher refuses them by name
    matcher = load_matcher(matcher_name, options)
    verify_conf = VerifyConf(method=verify, max_error=max_error, confidence=confidence,
                             min_inliers=min_inliers) if verify else None
    quiet = is_quiet(ctx)
    run = cli_executor(executor, ray_address, shard_size, "pairs", sharded)
    with progress_bars(quiet or as_json, "match" + ("" if run.in_place else f" ({run.name})"),
                       "collect the parts") as (update, merging):
        report = run.match(q, m, pairs, local, name=name, matcher=matcher, verify=verify_conf, device=device,
                           overwrite=overwrite, num_workers=num_workers, progress=update, merging=merging,
                           pairs_file="<stdin>" if pairs_file == "-" else pairs_file)
    print_skipped("skipped pair", report.missing_features, report.pairs, "pairs")
    if as_json:
        print_json({"store": str(report.path), "pairs": report.pairs, "skipped_count": len(report.missing_features),
                    "matched": report.matched, "already_present": report.already_present,
                    "matches": report.matches, "inliers": report.inliers, "duplicates": report.duplicates,
                    "verified_with_poses": report.verified_with_poses,
                    "ransac_fallbacks": [{"pair": p, "reason": r} for p, r in report.ransac_fallbacks],
                    "skipped": [{"pair": p, "reason": r} for p, r in report.missing_features],
                    "device": report.device, "seconds": {k: round(v, 3) for k, v in report.seconds.items()},
                    "bound_by": report.bound_by})
    elif not quiet:
        per = report.matches / report.matched if report.matched else 0
        msg = f"{report.matched} pairs matched ({per:.0f} matches on average"
        if verify:
            msg += f", {report.inliers / report.matched if report.matched else 0:.0f} verified"
        console_err().print(msg + f"), {report.already_present} already present, "
                            f"{len(report.missing_features)} skipped, {report.duplicates} duplicates")
        if verify == "poses":
            reasons = sorted({r for _, r in report.ransac_fallbacks})
            console_err().print(f"{report.verified_with_poses} pairs verified with their known poses, "
                                f"{len(report.ransac_fallbacks)} by RANSAC" +
                                (f" ({'; '.join(reasons)})" if reasons else ""), highlight=False)
        if report.matched:
            phases = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
            console_err().print(f"on {report.device}: {phases} (bound by {report.bound_by})", highlight=False)
    report_written([report.path], quiet or as_json)


@click.group("show")
def show_group() -> None:
    """Pictures for a person to check the data."""


@show_group.command("matches")
@dataset_argument()
@click.option("--pair", nargs=2, required=True, metavar="IMAGE0 IMAGE1", help="The pair to draw.")
@click.option("--matches", "matches_name", help="Matches store (default: the only one in DATASET).")
@click.option("--map", "map_", type=click.Path(file_okay=False, path_type=Path),
              help="Map dataset of IMAGE1 (query x map matches).")
@click.option("--inliers-only", is_flag=True, help="Draw verified matches only.")
@click.option("--max-lines", type=click.IntRange(0), default=500, show_default=True,
              help="Draw at most N matches, a uniform sample (0: all), so that the images stay visible.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG file.")
@click.pass_context
def show_matches(ctx: click.Context, dataset: Path, pair: tuple[str, str], matches_name: str | None,
                 map_: Path | None, inliers_only: bool, max_lines: int, output: Path) -> None:
    """Draw the matches of one pair of DATASET: inliers green, outliers red (unverified: blue)."""
    from ..matching.draw import draw_pair_matches

    q = open_dataset(dataset)
    stats = draw_pair_matches(q, open_dataset(map_) if map_ else q, pair, output, matches_name=matches_name,
                              inliers_only=inliers_only, max_lines=max_lines)
    if not is_quiet(ctx):
        sample = f" ({stats['drawn']} drawn)" if stats["drawn"] < stats["matches"] else ""
        console_err().print(f"{stats['matches']} matches, {stats['inliers']} inliers{sample}", highlight=False)
    report_written([output], is_quiet(ctx))

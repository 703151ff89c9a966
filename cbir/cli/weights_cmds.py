"""``cbir weights``: the weights each extractor loads, and converters of official files."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import click

from .. import plugins
from ..errors import CbirError
from ._common import PluginName, console_err, console_out, is_quiet, print_json, report_written, table


@click.group("weights")
def weights_group() -> None:
    """The weights of the extractors, and converters of official weight files (TensorFlow is needed
    for DELG's, at conversion only)."""


@weights_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable list on stdout.")
def list_cmd(as_json: bool) -> None:
    """Every installed extractor and matcher: its package, the weight files it loads, where each
    is published and its licence. Nothing is ever downloaded: put the files in a directory
    given by --weights or $CBIR_WEIGHTS, or in ~/.cache/cbir/weights."""
    rows = [_describe(plugin) for kind in ("local", "global", "matcher") for plugin in plugins.installed(kind).values()]
    if as_json:
        print_json(rows)
        return
    t = table("Extractors and matchers", [("kind", "left"), ("name", "left"), ("package", "left"),
                                          ("weights", "left")])
    for row in rows:
        if "error" in row:
            weights = f"[red]cannot be loaded[/]: {row['error']}"
        elif row["weights"]:
            weights = "\n".join(f"{w['file']}: {w['published']} ({w['licence']})" for w in row["weights"])
        else:
            weights = "none" + (" (learns its model on the map)" if row.get("learns_on_map") else "")
        t.add_row(row["kind"], row["name"], row["package"], weights)
    console_out().print(t)


def _describe(plugin: plugins.Plugin) -> dict[str, Any]:
    """What ``cbir weights list`` says of a plugin (a plugin that cannot be imported says why)."""
    row: dict[str, Any] = {"kind": plugin.kind, "name": plugin.name, "package": plugin.package}
    try:
        cls = plugins.load(plugin.kind, plugin.name)
    except CbirError as e:
        return {**row, "error": e.message}
    files = getattr(cls, "weight_files", ())
    row["weights"] = [{"file": w.name, "published": w.published, "licence": w.licence} for w in files]
    if plugin.kind != "matcher":
        row["learns_on_map"] = bool(getattr(cls, "learns_on_map", False))
    return row


@weights_group.command("convert")
@click.argument("model", type=PluginName("converter"))
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--gem-power", type=click.FloatRange(0, min_open=True), default=3.0, show_default=True,
              help="GeM power of the global head (not stored in the official files; the export's default).")
@click.option("--block3-strides/--no-block3-strides", default=True, show_default=True,
              help="Subsample block 3 before block 4 (not stored in the official files; the export's default).")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.pass_context
def convert(ctx: click.Context, model: str, src: Path, dst: Path, gem_power: float, block3_strides: bool,
            overwrite: bool, as_json: bool) -> None:
    """Convert the official MODEL weights SRC (a SavedModel or checkpoint directory, a
    checkpoint prefix, or an .npz of the variables by official name) into DST (.pt).

    \b
    Example (DELG, tensorflow/models research/delf):
      tar xzf r50delg_gld_20200814.tar.gz
      cbir weights convert delg r50delg_gld_20200814 r50delg_gld_20200814.pt
    """
    if dst.exists() and not overwrite:
        raise CbirError("exists (pass --overwrite to replace it)", dst)
    converter = plugins.load("converter", model)
    accepted = inspect.signature(converter).parameters
    options = {key: value for key, value in (("gem_power", gem_power), ("block3_strides", block3_strides))
               if ctx.get_parameter_source(key) is not click.core.ParameterSource.DEFAULT}
    for key in options:
        if key not in accepted:
            raise CbirError(f"--{key.replace('_', '-')} is not an option of the {model} converter")
    summary = converter(src, dst, **options)
    if as_json:
        print_json(summary)
    elif not is_quiet(ctx):
        console_err().print(f"{model}: {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
                            f"config {summary['config']}", highlight=False)
    report_written([dst], is_quiet(ctx) or as_json)

"""``cbir weights``: convert official weight files into the ones cbir loads."""

from __future__ import annotations

from pathlib import Path

import click

from .. import weights as weights_mod
from ..errors import CbirError
from ._common import console_err, is_quiet, print_json, report_written


@click.group("weights")
def weights_group() -> None:
    """Convert official weight files (TensorFlow is needed for DELG's, at conversion only)."""


@weights_group.command("convert")
@click.argument("model", type=click.Choice(sorted(weights_mod.CONVERTERS)))
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
    summary = weights_mod.CONVERTERS[model](src, dst, gem_power=gem_power, block3_strides=block3_strides)
    if as_json:
        print_json(summary)
    elif not is_quiet(ctx):
        console_err().print(f"{model}: {summary['tensors']} tensors, {summary['parameters']:,} parameters, "
                            f"config {summary['config']}", highlight=False)
    report_written([dst], is_quiet(ctx) or as_json)

"""``cbir store``: stores made of parts (sharded), and their merge into one file."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import console_err, is_quiet, print_json


@click.group("store")
def store_group() -> None:
    """Stores made of parts (what `--executor ray` writes), read as one everywhere."""


@store_group.command("merge")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def store_merge(ctx: click.Context, path: Path, as_json: bool) -> None:
    """Copy the parts of the sharded store PATH into one file at PATH, atomically (its keys,
    values and checksums unchanged), then remove the parts. A store that is one file already
    is left as it is."""
    from ..io.store.sharded import merge_sharded

    merged = merge_sharded(path)
    if as_json:
        print_json({"path": str(path), "parts_merged": merged})
    elif not is_quiet(ctx):
        console_err().print(f"{path}: {f'{merged} parts merged into one file' if merged else 'one file already'}",
                            highlight=False)

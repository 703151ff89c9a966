"""Console and option helpers shared by the commands."""

from __future__ import annotations

import json
import os
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape

from ..io.dataset import Dataset

if TYPE_CHECKING:
    from rich.table import Table


#: the width of output that is not a terminal (a pipe, a log): wide enough that no line is
#: wrapped and no table is cut (``$COLUMNS`` sets another)
PIPED_WIDTH = 1000


def _console(stderr: bool) -> Console:
    # soft_wrap: a message is one line, never broken by rich (a terminal folds it on screen)
    console = Console(stderr=stderr, soft_wrap=True)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(stderr=stderr, soft_wrap=True, width=PIPED_WIDTH)
    return console


@cache
def console_err() -> Console:
    """Messages and progress go to stderr, so stdout stays clean for data (pairs, JSON)."""
    return _console(stderr=True)


@cache
def console_out() -> Console:
    return _console(stderr=False)


def table(title: str, columns: list[tuple[str, str]]) -> Table:
    """A table whose headers are never cut: columns fold (wrap) their text instead of
    ending it with an ellipsis when the terminal is narrow. ``columns``: (header, justify)."""
    from rich import box
    from rich.table import Table

    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
              collapse_padding=True)
    for header, justify in columns:
        t.add_column(header, justify=justify, overflow="fold")  # type: ignore[arg-type]
    return t


class PluginName(click.ParamType):
    """The name of an installed plugin of ``kind`` (:mod:`cbir.plugins`), or ``module:Class``;
    ``several``: a comma-separated list. ``--help`` lists the installed names from the
    packages' metadata, importing none; an unknown name is one line listing them."""

    name = "plugin"

    def __init__(self, kind: str, several: bool = False) -> None:
        self.kind, self.several = kind, several

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        from .. import plugins

        return "NAME[,NAME...]" if self.several else f"[{'|'.join(plugins.names(self.kind))}]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from .. import plugins

        for name in [v.strip() for v in str(value).split(",") if v.strip()] if self.several else [str(value)]:
            plugins.find(self.kind, name)
        return value


class PluginOption(click.Option):
    """An option whose help names the installed plugins of ``plugin_kind`` where it says
    ``{names}``, read when the help is shown (not when the command is imported)."""

    def __init__(self, *args: Any, plugin_kind: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plugin_kind = plugin_kind

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        from .. import plugins

        record = super().get_help_record(ctx)
        if record is None:
            return None
        return record[0], record[1].replace("{names}", ", ".join(plugins.names(self.plugin_kind)))


def dataset_argument(name: str = "dataset"):
    return click.argument(name, type=click.Path(file_okay=False, path_type=Path))


follow_symlinks_option = click.option(
    "--follow-symlinks", is_flag=True,
    help="Accept images that are symbolic links out of records_data/ (kapture's importers make them).")


def open_dataset(path: Path, follow_symlinks: bool = False) -> Dataset:
    return Dataset(path, follow_symlinks=follow_symlinks)


#: what a step did with an output it found (the ``status`` of its report)
STATUS_NOTES = {
    "reused": "kept the {what} of the same configuration and inputs (--overwrite recomputes it)",
    "redone": "recomputed the {what}: its inputs changed since it was made",
    "replaced": "replaced the {what} (--overwrite)",
}


def report_written(paths: list[Path], quiet: bool = False) -> None:
    if quiet:
        return
    for p in paths:
        console_err().print(f"wrote {p}", highlight=False)


#: skipped items printed one per line at most; the rest are counted (``--json`` lists them all)
SKIPPED_LINES = 10


def warn(message: str) -> None:
    """One warning line on stderr (printed even with ``-q``: a result the user must know is partial)."""
    console_err().print(f"[yellow]warning:[/] {escape(message)}", highlight=False)


def print_skipped(label: str, items: list[tuple[str, str]], total: int, what: str) -> None:
    """The first skipped items (``label item: reason``), then one warning with their count out of
    ``total`` ``what`` (pairs, images, queries) and the most common reasons."""
    for item, reason in items[:SKIPPED_LINES]:
        console_err().print(f"[yellow]{label}[/] {escape(item)}: {escape(reason)}", highlight=False)
    if not items:
        return
    more = f" ({len(items) - SKIPPED_LINES} more not shown; --json lists all)" if len(items) > SKIPPED_LINES else ""
    warn(f"{len(items)} of {total} {what} skipped{more}: the result holds the other {max(total - len(items), 0)}")


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def is_quiet(ctx: click.Context) -> bool:
    return bool(ctx.obj and ctx.obj.get("quiet"))

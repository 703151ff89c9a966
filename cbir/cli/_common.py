"""Console and option helpers shared by the commands."""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from ..io.dataset import Dataset


@lru_cache(maxsize=None)
def console_err() -> Console:
    """Messages and progress go to stderr, so stdout stays clean for data (pairs, JSON)."""
    return Console(stderr=True)


@lru_cache(maxsize=None)
def console_out() -> Console:
    return Console()


def dataset_argument(name: str = "dataset"):
    return click.argument(name, type=click.Path(file_okay=False, path_type=Path))


follow_symlinks_option = click.option(
    "--follow-symlinks", is_flag=True,
    help="Accept images that are symbolic links out of records_data/ (kapture's importers make them).")


def open_dataset(path: Path, follow_symlinks: bool = False) -> Dataset:
    return Dataset(path, follow_symlinks=follow_symlinks)


def report_written(paths: list[Path], quiet: bool = False) -> None:
    if quiet:
        return
    for p in paths:
        console_err().print(f"wrote {p}", highlight=False)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def is_quiet(ctx: click.Context) -> bool:
    return bool(ctx.obj and ctx.obj.get("quiet"))

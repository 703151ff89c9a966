"""``cbir info`` and ``cbir check``."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.markup import escape

from ..io.check import check_dataset, dataset_info, problems_as_dicts
from ._common import (
    console_err,
    console_out,
    dataset_argument,
    follow_symlinks_option,
    is_quiet,
    open_dataset,
    print_json,
    table,
)


@click.command()
@dataset_argument()
@follow_symlinks_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(dataset: Path, follow_symlinks: bool, as_json: bool) -> None:
    """Cameras, images, rigs, trajectories and stores of DATASET."""
    summary = dataset_info(open_dataset(dataset, follow_symlinks))
    if as_json:
        print_json(summary)
        return
    out = console_out()
    out.print(f"[bold]{escape(str(summary['root']))}[/]: {summary['images']} images, "
              f"{summary['images_with_pose']} with a pose, "
              f"{len(summary['rigs'])} rigs, {summary['trajectories']} trajectory entries")
    cams = table("cameras", [("id", "left"), ("model", "left"), ("size", "left"), ("params", "left"),
                             ("images", "right")])
    for c in summary["cameras"]:
        cams.add_row(c["id"], c["model"], f"{c['width']}x{c['height']}",
                     ", ".join(f"{v:.6g}" for v in c["params"]), str(c["images"]))
    out.print(cams)
    for s in summary["other_sensors"]:
        out.print(f"sensor {s['id']}: {s['type']}")
    for r in summary["rigs"]:
        out.print(f"rig {r['id']}: {', '.join(r['sensors'])}")
    if summary["stores"]:
        stores = table("stores", [("kind", "left"), ("name", "left"), ("items", "right"), ("rows", "right"),
                                  ("dim", "right"), ("dtype", "left"), ("size", "right"), ("details", "left")])
        for s in summary["stores"]:
            details = s.get("error") or ", ".join(
                f"{k}={_short(s[k])}" for k in ("parts", "local_features", "verified", "images", "mean_track_length",
                                           "queries")
                if k in s and s[k] not in ("", None))
            stores.add_row(s["kind"], s["name"], str(s.get("items", "?")), str(s.get("rows", "")),
                           str(s.get("dim", "")), s.get("dtype", ""), _size(s["bytes"] + s.get("part_bytes", 0)),
                           details)
        out.print(stores)


def _short(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.command()
@dataset_argument()
@follow_symlinks_option
@click.option("--images", type=click.Choice(["decode", "exists", "skip"]), default="decode", show_default=True,
              help="How far to check the image files.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--strict", is_flag=True, help="Fail on warnings too.")
@click.option("--deep", is_flag=True,
              help="Also verify the checksum of every column of every store (reads all data once).")
@click.pass_context
def check(ctx: click.Context, dataset: Path, follow_symlinks: bool, images: str, as_json: bool,
          strict: bool, deep: bool) -> None:
    """Validate DATASET against the format specification (exit code 1 on errors)."""
    ds = open_dataset(dataset, follow_symlinks)
    quiet = is_quiet(ctx) or as_json
    with console_err().status("checking", spinner="dots") if not quiet else _null() as status:
        problems = check_dataset(ds, images=images, deep=deep,  # type: ignore[arg-type]
                                 progress=(lambda m: status.update(m)) if status else None)
    errors = [p for p in problems if p.level == "error"]
    warnings = [p for p in problems if p.level == "warning"]
    if as_json:
        print_json({"dataset": str(dataset), "ok": not errors, "problems": problems_as_dicts(problems)})
    else:
        out = console_out()  # findings and verdict on one stream: `cbir check D > report.txt` keeps both
        for p in problems:
            colour = "red" if p.level == "error" else "yellow"
            where = escape(f"{p.path}{'' if p.line is None else f':{p.line}'}")
            out.print(f"[{colour}]{p.level}[/]: {where}: {escape(p.message)}", highlight=False, soft_wrap=True)
        verdict = "[green]ok[/]" if not errors else "[red]invalid[/]"
        out.print(f"{escape(str(dataset))}: {verdict} ({_count(len(errors), 'error')}, "
                  f"{_count(len(warnings), 'warning')})", highlight=False)
    if errors or (strict and warnings):
        sys.exit(1)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False

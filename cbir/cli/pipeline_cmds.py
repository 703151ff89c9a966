"""``cbir pipeline``: the whole chain from one TOML configuration."""

from __future__ import annotations

from pathlib import Path

import click

from .. import pipeline
from ._common import console_err, console_out, is_quiet, print_json
from .evaluate_cmds import pose_table


@click.command("pipeline")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a configuration value (TOML syntax): --set localize.config='\"config1\"'.")
@click.option("--json", "as_json", is_flag=True, help="Print the evaluation as JSON.")
@click.pass_context
def pipeline_cmd(ctx: click.Context, config: Path, overrides: tuple[str, ...], as_json: bool) -> None:
    """Extract, retrieve, match, verify, map, localize, post-process and evaluate, as CONFIG says.

    Each step resumes from what is already on disk; each is also a command of its own.
    """
    conf = pipeline.load_config(config, list(overrides))
    quiet = is_quiet(ctx)
    result = pipeline.run(conf, log=(lambda s: None) if quiet or as_json else
                          (lambda s: console_err().print(f"[bold]>[/] {s}", highlight=False)))
    if as_json:
        print_json({"steps": result.steps, "evaluation": result.evaluation})
    elif result.evaluation is not None:
        th = tuple(tuple(t) for t in conf["evaluate"]["thresholds"])
        console_out().print(pose_table(f"localization of {Path(conf['datasets']['query']).name}",
                                       result.evaluation, th))
    elif not quiet:
        console_err().print("no datasets.query_gt: nothing to evaluate")

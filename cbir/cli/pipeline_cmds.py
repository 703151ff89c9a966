"""``cbir pipeline``: the whole chain from one TOML configuration."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from ..steps import STEPS
from ._common import console_err, console_out, is_quiet, print_json
from .evaluate_cmds import pose_table
from .features_cmds import progress_bar


@click.command("pipeline")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a configuration value (TOML syntax): --set localize.config='\"config1\"'.")
@click.option("--overwrite", is_flag=True,
              help="Redo the steps whose configuration changed, and the steps after them, replacing their outputs.")
@click.option("--from", "from_step", type=click.Choice(STEPS),
              help="Redo this step and the steps after it, replacing their outputs.")
@click.option("--check", "check_only", is_flag=True,
              help="Check the configuration and list the outputs it would replace; run nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the steps and the evaluation as JSON.")
@click.pass_context
def pipeline_cmd(ctx: click.Context, config: Path, overrides: tuple[str, ...], overwrite: bool,
                 from_step: str | None, check_only: bool, as_json: bool) -> None:
    """Extract, retrieve, match, verify, map, localize, post-process and evaluate, as CONFIG says.

    The whole configuration is checked before any step runs. Re-runs reuse what is done:
    interrupted stores resume, and outputs of the same configuration are kept. A step whose
    configuration changed is refused until --overwrite (it and the steps after it are redone,
    their outputs replaced under the same names) or --from STEP.
    """
    from .. import pipeline

    conf = pipeline.load_config(config, list(overrides))
    plan = pipeline.plan(conf, config)
    quiet = is_quiet(ctx)
    if check_only:
        changed = pipeline.changes(plan)
        if as_json:
            print_json({"changes": [{"step": c.step, "path": str(c.path), "differences": c.differences}
                                    for c in changed]})
        elif not quiet:
            for c in changed:
                console_err().print(f"changed {c}", highlight=False)
            console_err().print("configuration ok" + (f"; {len(changed)} output(s) made with another configuration"
                                                      " (--overwrite replaces them)" if changed else ""))
        return
    silent = quiet or as_json
    result = pipeline.run(plan, overwrite=overwrite, from_step=from_step,
                          log=(lambda s: None) if silent else
                          (lambda s: console_err().print(f"[bold]>[/] {escape(s)}", highlight=False)),
                          progress=lambda label: progress_bar(label, silent))
    if as_json:
        print_json({"steps": result.steps, "seconds": result.seconds, "evaluation": result.evaluation})
    elif result.evaluation is not None:
        console_out().print(pose_table(f"localization of {Path(conf['datasets']['query']).name}",
                                       result.evaluation, plan.thresholds))
    elif not quiet:
        console_err().print("no datasets.query_gt: nothing to evaluate")

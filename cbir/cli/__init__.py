"""The ``cbir`` command line: parse, call the library, report. Nothing else lives here."""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import CbirError
from ._common import console_err
from .dataset_cmds import check, info
from .features_cmds import extract, match, pairs_group, show_group
from .evaluate_cmds import evaluate
from .localization_cmds import localize_cmd, map_cmd, rig_group
from .pipeline_cmds import pipeline_cmd
from .retrieval_cmds import retrieve_cmd
from .interchange_cmds import export_group, import_group
from .weights_cmds import weights_group


class CbirGroup(click.Group):
    """Turns user errors into one line on stderr and exit code 1 (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CbirError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            console_err().print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except KeyboardInterrupt:
            console_err().print("[yellow]interrupted[/]: finished batches are kept; re-run to resume")
            sys.exit(130)


@click.group(cls=CbirGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cbir")
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Content-based image retrieval and retrieval-based visual localization.

    Datasets are kapture 1.1 directories; cbir adds its stores under DATASET/cbir/.
    """
    ctx.ensure_object(dict)
    ctx.obj.update(debug=debug, quiet=quiet)


main.add_command(extract)
main.add_command(retrieve_cmd, "retrieve")
main.add_command(map_cmd)
main.add_command(localize_cmd)
main.add_command(rig_group)
main.add_command(evaluate)
main.add_command(pipeline_cmd)
main.add_command(pairs_group)
main.add_command(match)
main.add_command(show_group)
main.add_command(weights_group)
main.add_command(info)
main.add_command(check)
main.add_command(import_group)
main.add_command(export_group)

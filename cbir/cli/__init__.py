"""The ``cbir`` command line: parse, call the library, report. Nothing else lives here."""

from __future__ import annotations

import os
import signal
import sys
import threading

import click

from .. import __version__
from ..errors import CbirError
from ..io.atomic import is_no_space
from ._common import console_err
from .dataset_cmds import check, info
from .features_cmds import extract, match, pairs_group, show_group
from .evaluate_cmds import evaluate
from .localization_cmds import localize_cmd, map_cmd, rig_group
from .pipeline_cmds import pipeline_cmd
from .retrieval_cmds import retrieve_cmd
from .interchange_cmds import export_group, import_group
from .weights_cmds import weights_group


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean-up runs."""


#: seconds the main thread gets to stop by itself after SIGTERM (it may be inside a long
#: pycolmap call that checks no signal) before the process exits anyway
TERMINATION_GRACE_S = 5.0


_termination_handled = False


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def handle_termination() -> None:
    """Replace the SIGTERM handler that pycolmap's glog installs (it prints a 40-line C stack
    dump) by one that stops like Ctrl-C; if the main thread is stuck in native code, a
    watcher thread woken by the signal prints one line and exits after a grace period."""
    global _termination_handled
    if _termination_handled or threading.current_thread() is not threading.main_thread():
        return
    _termination_handled = True
    signal.signal(signal.SIGTERM, _on_sigterm)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            data = os.read(read_fd, 64)
            if signal.SIGTERM in data:
                threading.Event().wait(TERMINATION_GRACE_S)
                sys.stderr.write("terminated: finished batches are kept; re-run to resume\n")
                sys.stderr.flush()
                os._exit(143)

    threading.Thread(target=watch, name="cbir-sigterm", daemon=True).start()
    os.register_at_fork(after_in_child=_forget_wakeup_fd)


def _forget_wakeup_fd() -> None:
    """A forked worker (localization's process pool) must not wake this process's watcher
    with its own signals: SIGTERM sent to a worker alone would end the whole command."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # not the main thread of the child: nothing was inherited to forget
        pass


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
        except Terminated:
            console_err().print("[yellow]terminated[/]: finished batches are kept; re-run to resume")
            sys.exit(143)
        except KeyboardInterrupt:
            console_err().print("[yellow]interrupted[/]: finished batches are kept; re-run to resume")
            sys.exit(130)
        except OSError as e:
            if is_no_space(e):
                if ctx.obj and ctx.obj.get("debug"):
                    raise
                where = f" on {e.filename}" if e.filename else ""
                console_err().print(f"[bold red]error:[/] no space left{where}: free some and re-run "
                                    "(finished batches are kept)", highlight=False, soft_wrap=True)
                sys.exit(1)
            raise


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
    handle_termination()


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

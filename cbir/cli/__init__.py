"""The ``cbir`` command line: parse, call the library, report. Nothing else lives here.

Commands are imported when they run, not before: ``cbir --help``, ``info`` and ``check``
never import torch, pycolmap or faiss (see ``COMMANDS``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import signal
import sys
import threading
import types

import click
from rich.markup import escape

from .. import __version__
from ..errors import CbirError
from ..io.atomic import is_no_space
from ..io.paths import TRUST_LINKS_ENV
from ._common import console_err

#: command name -> (module of cbir.cli, attribute, one-line help shown by ``cbir --help``)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "extract": ("features_cmds", "extract", "Extract local features and global descriptors of a dataset."),
    "retrieve": ("retrieval_cmds", "retrieve_cmd", "The most similar map images of each query, as a pairs file."),
    "match": ("features_cmds", "match", "Match local features of image pairs, and verify them."),
    "map": ("localization_cmds", "map_cmd", "Triangulate a map's 3D points from its known poses."),
    "localize": ("localization_cmds", "localize_cmd", "Estimate the pose of every query against a map."),
    "index": ("index_cmds", "index_group", "Faiss indexes of a map's global descriptors, built once and kept."),
    "evaluate": ("evaluate_cmds", "evaluate", "Localization accuracy, or retrieval metrics of a pairs file."),
    "report": ("report_cmds", "report_cmd", "A self-contained HTML page of a run: summary, curves, 3D view, queries."),
    "pipeline": ("pipeline_cmds", "pipeline_cmd", "The whole chain, extraction to evaluation, from one TOML file."),
    "pairs": ("features_cmds", "pairs_group", "Make image pair lists (retrieval makes them too)."),
    "show": ("features_cmds", "show_group", "Pictures for a person to check the data."),
    "rig": ("localization_cmds", "rig_group", "Rigs of cameras (rigs.txt)."),
    "weights": ("weights_cmds", "weights_group", "The weights each extractor loads; convert official files."),
    "info": ("dataset_cmds", "info", "Cameras, images, rigs, trajectories and stores of a dataset."),
    "check": ("dataset_cmds", "check", "Validate a dataset against the format specification."),
    "import": ("interchange_cmds", "import_group", "Make cbir datasets and stores from other tools' files."),
    "export": ("interchange_cmds", "export_group", "Write cbir datasets and stores in other tools' formats."),
    "store": ("store_cmds", "store_group", "Stores made of parts (sharded): merge them into one file."),
    "hash": ("hash_cmds", "hash_group", "Binary codes (learned hashing, Region-DH): learn, encode, search, evaluate."),
}


#: what an interrupted command says last (its stores resume from what was written)
RESUME_HINT = "finished batches are kept; re-run to resume"


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
                sys.stderr.write(f"terminated: {RESUME_HINT}\n")
                sys.stderr.flush()
                os._exit(143)

    threading.Thread(target=watch, name="cbir-sigterm", daemon=True).start()
    os.register_at_fork(after_in_child=_forget_wakeup_fd)
    if "pycolmap" not in sys.modules:  # commands import it where they use it: re-arm then
        sys.meta_path.insert(0, _RearmAfterPycolmap())


class _RearmAfterPycolmap(importlib.abc.MetaPathFinder):
    """Puts the SIGTERM handler back once pycolmap is imported: its glog installs its own (a
    stack dump) when it loads, and commands import pycolmap only where they use it, after
    :func:`handle_termination` ran."""

    def find_spec(self, name: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != "pycolmap":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader, load = spec.loader, spec.loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            load(module)
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, _on_sigterm)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _forget_wakeup_fd() -> None:
    """A forked worker (localization's process pool) must not wake this process's watcher
    with its own signals: SIGTERM sent to a worker alone would end the whole command."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # not the main thread of the child: nothing was inherited to forget
        pass


#: options of ``cbir`` itself that may also follow the subcommand
GLOBAL_FLAGS = frozenset({"-q", "--quiet", "--debug", "--trust-links"})


class CbirGroup(click.Group):
    """Turns user errors into one line on stderr and exit code 1 (a traceback only with --debug),
    and imports a command's module only when that command is used."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # the global flags are accepted anywhere, as users type them: `cbir match ... -q`
        if ctx.parent is None:
            end = args.index("--") if "--" in args else len(args)
            flags = [a for a in args[:end] if a in GLOBAL_FLAGS]
            args = flags + [a for a in args[:end] if a not in GLOBAL_FLAGS] + args[end:]
        return super().parse_args(ctx, args)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):  # from the table: listing imports nothing
            formatter.write_dl([(name, COMMANDS[name][2]) for name in self.list_commands(ctx)])

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CbirError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            console_err().print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            sys.exit(1)
        except Terminated:
            console_err().print(f"[yellow]terminated[/]: {RESUME_HINT}")
            sys.exit(143)
        except KeyboardInterrupt:
            console_err().print(f"[yellow]interrupted[/]: {RESUME_HINT}")
            sys.exit(130)
        except OSError as e:
            if is_no_space(e):
                if ctx.obj and ctx.obj.get("debug"):
                    raise
                where = f" on {escape(str(e.filename))}" if e.filename else ""
                console_err().print(f"[bold red]error:[/] no space left{where}: free some and re-run "
                                    "(finished batches are kept)", highlight=False, soft_wrap=True)
                sys.exit(1)
            raise


@click.group(cls=CbirGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cbir")
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--trust-links", is_flag=True,
              help="Follow symbolic links inside datasets' cbir/ folders and read HDF5 data held in other files "
                   "(refused by default: a dataset from someone else could reach any file).")
@click.pass_context
def main(ctx: click.Context, debug: bool, quiet: bool, trust_links: bool) -> None:
    """Content-based image retrieval and retrieval-based visual localization.

    Datasets are kapture 1.1 directories; cbir adds its stores under DATASET/cbir/.
    """
    ctx.ensure_object(dict)
    ctx.obj.update(debug=debug, quiet=quiet)
    if trust_links:  # in the environment: forked and Ray workers see it too
        os.environ[TRUST_LINKS_ENV] = "1"
    handle_termination()



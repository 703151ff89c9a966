"""The command line: help, version, exit codes, one-line errors, and each command end to end."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from cbir import __version__
from cbir.cli import main
from cbir.errors import CbirError


def run(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_help_and_version():
    assert run("--help").exit_code == 0 and "import" in run("--help").output
    assert run("--version").output.strip() == f"cbir, version {__version__}"


def test_usage_error_exit_code_2():
    assert run("info").exit_code == 2
    assert run("frobnicate").exit_code == 2


def test_user_error_is_one_line_with_exit_code_1(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cbir", "info", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {tmp_path / 'nope'}: dataset directory not found"
    assert "Traceback" not in proc.stderr
    debug = subprocess.run([sys.executable, "-m", "cbir", "--debug", "info", str(tmp_path / "nope")],
                           capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_info_and_check_on_samples(sample_dataset):
    r = run("info", sample_dataset)
    assert r.exit_code == 0 and "SIMPLE_RADIAL" in r.output and "matches" in r.output
    info = json.loads(run("info", "--json", sample_dataset).output)
    assert info["images"] == 3
    r = run("check", "--json", sample_dataset)
    assert r.exit_code == 0 and json.loads(r.output)["ok"] is True


def test_check_fails_on_errors(sample_dataset):
    (sample_dataset / "sensors/records_data/left/000.png").unlink()
    r = run("check", sample_dataset)
    assert r.exit_code == 1 and "image file is missing" in r.output


def test_check_prints_findings_and_verdict_on_one_stream(sample_dataset):
    (sample_dataset / "sensors/records_data/left/000.png").unlink()
    proc = subprocess.run([sys.executable, "-m", "cbir", "check", str(sample_dataset)], capture_output=True,
                          text=True)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1 and "image file is missing" in lines[0]
    assert lines[-1] == f"{sample_dataset}: invalid (1 error, 0 warnings)"


def test_tables_keep_whole_headers_in_80_columns_and_are_never_cut_when_piped(monkeypatch):
    import io

    from rich.console import Console

    from cbir.cli import _common
    from cbir.cli.evaluate_cmds import pose_table

    thresholds = ((0.1, 1.0), (0.25, 2.0), (0.5, 5.0), (5.0, 10.0))
    summary = {"queries": 1234, "within": [0.5, 0.61234, 0.9, 1.0], "median_translation": 0.123456,
               "median_rotation_deg": 12.3456, "not_localized": 7}
    out = io.StringIO()
    Console(file=out, width=80).print(pose_table("localization", {"all": summary, "night": summary}, thresholds))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in out.getvalue()
    header = " ".join(lines[1:3])
    for word in ("condition", "queries", "≤0.25 m", "≤10°", "median", "t (m)", "R (°)", "failed"):
        assert word in header
    assert "61.2%" in out.getvalue() and "0.123" in out.getvalue() and "12.3" in out.getvalue()
    assert "0.123456" not in out.getvalue() and "12.3456" not in out.getvalue()  # rounded
    monkeypatch.delenv("COLUMNS", raising=False)
    assert _common._console(stderr=False).width == _common.PIPED_WIDTH  # pytest's stdout is no terminal


def test_data_in_messages_is_not_read_as_markup(sample_dataset):
    (sample_dataset / "sensors/records_data/left/000.png").write_bytes(b"not a picture")
    r = CliRunner().invoke(main, ["extract", str(sample_dataset), "--local", "sift", "--name", "x"])
    assert "left/000.png" in r.output  # a skipped image is named as it is
    r = run("info", sample_dataset / "[red]x[/red]")
    assert r.exit_code == 1
    assert r.output.strip() == f"error: {sample_dataset / '[red]x[/red]'}: dataset directory not found"


def test_check_strict_fails_on_warnings(sample_dataset):
    import h5py
    with h5py.File(sample_dataset / "cbir/global/sample.h5", "a") as f:
        f["descriptors"][0] = [2.0, 0, 0, 0]
    assert run("check", sample_dataset).exit_code == 0
    assert run("check", "--strict", sample_dataset).exit_code == 1


@pytest.mark.slow
def test_import_info_check_export_kapture(maupertuis, tmp_path):
    assert run("import", "kapture", maupertuis, tmp_path / "ds").exit_code == 0
    r = run("info", tmp_path / "ds")
    assert r.exit_code == 0 and "SIFT" in r.output
    assert run("check", tmp_path / "ds").exit_code == 0
    assert run("export", "kapture", tmp_path / "ds", tmp_path / "out", "--all").exit_code == 0
    for p in (maupertuis / "reconstruction").rglob("*"):
        if p.is_file():
            assert p.read_bytes() == (tmp_path / "out" / p.relative_to(maupertuis)).read_bytes()


@pytest.mark.slow
def test_colmap_hloc_vlnet_commands(sceaux, tmp_path):
    mapping = sceaux / "mapping"
    assert run("export", "colmap", mapping, tmp_path / "model", "--binary").exit_code == 0
    assert run("import", "colmap", tmp_path / "model", tmp_path / "ds", "--image-dir",
               mapping / "sensors/records_data").exit_code == 0
    assert run("check", tmp_path / "ds").exit_code == 0
    assert run("export", "vlnet", tmp_path / "ds", "-o", tmp_path / "poses.txt").exit_code == 0
    assert len((tmp_path / "poses.txt").read_text().splitlines()) == 8
    r = run("import", "hloc", tmp_path / "ds")
    assert r.exit_code == 2  # neither --features nor --matches


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("cbir")
    if not exe.exists():
        pytest.skip("not installed as a console script in this environment")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, env=dict(os.environ))
    assert out.returncode == 0 and __version__ in out.stdout


def test_every_listed_command_resolves():
    from cbir.cli import COMMANDS

    ctx = click.Context(main)
    for name in COMMANDS:
        command = main.get_command(ctx, name)
        assert isinstance(command, click.Command) and command.name == name and command.help


def last_line_of_python(code: str) -> str:
    """The last line ``python -c code`` prints, in a fresh process (what it imported is its own)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("argv", [["--help"], ["info", "DATASET"], ["check", "DATASET", "--images", "skip"]])
def test_light_commands_import_no_heavy_library(argv):
    """`cbir --help`, `info` and `check` start in a fraction of a second: they import
    neither torch, pycolmap nor faiss (issue 12, item 14)."""
    from .conftest import SAMPLES

    args = [str(SAMPLES) if a == "DATASET" else a for a in argv]
    code = ("import sys\nfrom cbir.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch', 'pycolmap', 'faiss', 'scipy', 'tensorflow') if m in sys.modules))")
    heavy = last_line_of_python(code)
    assert heavy == "[]", heavy


def test_every_help_imports_no_heavy_library():
    """`--help` of every command and subcommand imports neither torch, pycolmap, faiss nor
    TensorFlow, so that it shows in a fraction of a second (issue 26)."""
    code = ("import contextlib, io, sys\nimport click\nfrom cbir.cli import COMMANDS, main\n"
            "def run(argv):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n            main(argv + ['--help'])\n"
            "        except SystemExit as e:\n            assert not e.code, (argv, e.code)\n"
            "for name in sorted(COMMANDS):\n    run([name])\n"
            "    command = main.get_command(None, name)\n"
            "    for sub in (command.commands if isinstance(command, click.Group) else ()):\n"
            "        run([name, sub])\n"
            "print(sorted(m for m in ('torch', 'pycolmap', 'faiss', 'tensorflow') if m in sys.modules))")
    assert last_line_of_python(code) == "[]"


def test_global_flags_after_the_subcommand(sample_dataset):
    """`-q` and `--debug` work after the subcommand as before it."""
    quiet = CliRunner().invoke(main, ["info", str(sample_dataset), "-q"])
    assert quiet.exit_code == 0, quiet.output
    r = CliRunner().invoke(main, ["match", "--query", str(sample_dataset), "--pairs", "-", "--local", "nope",
                                  "--debug"], input="left/000.png, left/001.png\n")
    assert r.exit_code == 1 and isinstance(r.exception, CbirError)  # --debug: raised, not printed


def test_local_extraction_does_not_import_ray(sample_dataset):
    """The local executor (the default) never imports Ray, installed or not (issue 14)."""
    code = ("import sys\nfrom cbir.cli import main\n"
            f"try:\n    main(['extract', {str(sample_dataset)!r}, '--local', 'sift'])\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('ray' in sys.modules)")
    assert last_line_of_python(code) == "False"


def test_progress_bars_show_a_later_phase_from_its_first_update(monkeypatch):
    """`progress_bars`: the first bar at once, a later phase's (merging a Ray run's shards)
    only once it starts, then advanced like the first."""
    from rich.console import Console
    from rich.progress import Progress

    from cbir.cli import features_cmds
    from cbir.cli.features_cmds import progress_bars

    monkeypatch.setattr(features_cmds, "console_err", lambda: Console(force_terminal=True, file=io.StringIO()))
    added: list[str] = []
    add_task = Progress.add_task
    monkeypatch.setattr(Progress, "add_task", lambda self, description, **kw: added.append(description) or
                        add_task(self, description, **kw))
    with progress_bars(False, "extract", "merge the shards") as (extract, merging):
        assert added == ["extract"]
        extract(4, 8)
        merging(1, 3)
        merging(1, 3)
        assert added == ["extract", "merge the shards"]


def test_progress_in_a_log_says_long_phases_and_their_end(monkeypatch):
    """Piped into a log (no terminal), a phase that runs past LOG_AFTER_S prints its count, its
    total and its time, then its end; a short phase prints nothing."""
    from rich.console import Console

    from cbir.cli import features_cmds

    out = io.StringIO()
    monkeypatch.setattr(features_cmds, "console_err", lambda: Console(file=out, width=200))
    clock = iter([0.0, 1.0, 2.0, 3.0])  # the short phase: start, two updates, the end
    monkeypatch.setattr(features_cmds.time, "monotonic", lambda: next(clock))
    with features_cmds.progress_bars(False, "short") as (update,):
        update(1, 2)
        update(1, 2)
    assert out.getvalue() == ""
    clock = iter([0.0, 6.0, 7.0, 40.0, 41.0])
    monkeypatch.setattr(features_cmds.time, "monotonic", lambda: next(clock))
    with features_cmds.progress_bars(False, "learn the vocabulary") as (update,):
        update(1, 3)  # 6 s: past LOG_AFTER_S
        update(1, 3)  # 7 s: within LOG_EVERY_S of the last line
        update(1, 3)  # 40 s: LOG_EVERY_S later
    assert out.getvalue().splitlines() == ["learn the vocabulary: 1/3, 6 s", "learn the vocabulary: 3/3, 40 s",
                                           "learn the vocabulary: 3/3 done in 41.0 s"]


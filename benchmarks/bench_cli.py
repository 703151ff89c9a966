"""How long `cbir COMMAND --help` takes, against the floor of starting Python and importing
click and rich (what any click + rich command line pays), in fresh processes.

    python benchmarks/bench_cli.py [--repeat 5]

Each command's median wall time over `--repeat` runs, and the modules of torch, pycolmap,
faiss and TensorFlow its help imported (none, by design: issue 26).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

FLOOR = "import click, rich.console"
HEAVY = ("torch", "pycolmap", "faiss", "tensorflow")


def commands() -> list[list[str]]:
    """Every command and subcommand of cbir, as argv lists."""
    import click

    from cbir.cli import COMMANDS, main

    out = []
    for name in sorted(COMMANDS):
        out.append([name])
        command = main.get_command(click.Context(main), name)
        if isinstance(command, click.Group):
            out += [[name, sub] for sub in sorted(command.commands)]
    return out


def timed(code: str, repeat: int) -> tuple[float, str]:
    """Median seconds of ``python -c code`` over ``repeat`` runs, and its last stdout line."""
    times, last = [], ""
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - t0)
        last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    return statistics.median(times), last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    floor, _ = timed(FLOOR, args.repeat)
    print(f"{'floor: python + click + rich':36s} {floor:6.3f} s")
    rows = []
    for argv in [[]] + commands():
        code = ("import contextlib, io, sys\nfrom cbir.cli import main\n"
                "with contextlib.redirect_stdout(io.StringIO()):\n"
                f"    try:\n        main({argv + ['--help']!r})\n    except SystemExit:\n        pass\n"
                f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))").replace("import contextlib",
                                                                                          "import contextlib, json")
        seconds, heavy = timed(code, args.repeat)
        rows.append({"command": " ".join(["cbir", *argv, "--help"]), "seconds": round(seconds, 3),
                     "over_floor": round(seconds - floor, 3), "heavy_imports": json.loads(heavy)})
        print(f"{rows[-1]['command']:36s} {seconds:6.3f} s  (+{seconds - floor:.3f})  {heavy}")
    slowest = max(rows, key=lambda r: r["seconds"])
    print(f"slowest: {slowest['command']} {slowest['seconds']:.3f} s; floor {floor:.3f} s")


if __name__ == "__main__":
    main()

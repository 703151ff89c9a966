"""``cbir retrieve``: global descriptors -> image pairs, with late fusion."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import click

from ..io.pairs import write_pairs
from ..io.store import open_store
from ..models.base import resolve_device
from ..retrieval import ALIASES, METHODS, DescriptorSet, FusionConf, RetrievalConf, retrieve
from ._common import console_err, is_quiet, open_dataset, print_json, report_written
from .features_cmds import progress_bar


def _floats(value: str | None) -> tuple[float, ...]:
    if not value:
        return ()
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}", param_hint="--weights") from None


@click.command()
@click.option("--map", "map_", required=True, type=click.Path(file_okay=False, path_type=Path), help="Map dataset.")
@click.option("--query", type=click.Path(file_okay=False, path_type=Path),
              help="Query dataset (default: map x map, an image never retrieving itself).")
@click.option("--global", "global_", required=True, metavar="NAME[,NAME...]",
              help="Global stores to use (their names in cbir/global/ of both datasets).")
@click.option("--fusion", default="gharm", show_default=True,
              type=click.Choice(sorted(METHODS) + sorted(ALIASES)), help="Late fusion of several descriptors.")
@click.option("--topk", type=click.IntRange(1), default=20, show_default=True, help="Pairs per query.")
@click.option("--weights", "weights", help="Per-descriptor weights, comma-separated (normalized; default equal).")
@click.option("--gamma", type=float, help="gharm, mean_and_power, mean_and_min (default 0.5).")
@click.option("--alpha", type=float, help="min_and_max, villena_roman (default 0.5).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto.")
@click.option("-o", "--output", help="Pairs file, or - for stdout (default: QUERY/cbir/pairs/<stores>_top<k>.txt).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary (on stderr with -o -).")
@click.pass_context
def retrieve_cmd(ctx: click.Context, map_: Path, query: Path | None, global_: str, fusion: str, topk: int,
                 weights: str | None, gamma: float | None, alpha: float | None, device: str, output: str | None,
                 as_json: bool) -> None:
    """The TOPK most similar map images of each query, as a pairs file."""
    names = [n.strip() for n in global_.split(",") if n.strip()]
    m = open_dataset(map_)
    q = open_dataset(query) if query else m
    same = q.root.resolve() == m.root.resolve()
    conf = RetrievalConf(topk=topk, fusion=FusionConf(fusion, _floats(weights), gamma=gamma, alpha=alpha),
                         exclude_self=same)
    conf.fusion.name  # unknown names fail before any work
    quiet = is_quiet(ctx)
    with ExitStack() as stack:
        qstores = [stack.enter_context(open_store(q.store_path("global", n), "global-features")) for n in names]
        mstores = qstores if same else \
            [stack.enter_context(open_store(m.store_path("global", n), "global-features")) for n in names]
        qset, mset = DescriptorSet.align(qstores), DescriptorSet.align(mstores)
        for label, dset in (("query", qset), ("map", mset)):
            if dset.dropped:
                console_err().print(f"[yellow]{len(dset.dropped)} {label} images lack some descriptor and are "
                                    f"left out[/]: {', '.join(dset.dropped[:5])}{' ...' if len(dset.dropped) > 5 else ''}",
                                    highlight=False)
        if topk > len(mset.names) - int(same):
            console_err().print(f"[yellow]top-k {topk} is more than the map has: every map image is returned[/]")
        with progress_bar("retrieve", quiet or output == "-") as update:
            pairs = retrieve(qset, mset, conf, device=resolve_device(device), progress=update)
    out = output or str(q.store_path("pairs", f"{'+'.join(names)}_top{topk}"))
    if out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_pairs(out, pairs)
    summary = {"pairs": out, "queries": len(qset.names), "map_images": len(mset.names), "pair_count": len(pairs),
               "fusion": conf.fusion.name, "dropped_queries": qset.dropped, "dropped_map_images": mset.dropped}
    if as_json:
        if out == "-":
            console_err().print_json(data=summary)
        else:
            print_json(summary)
    elif not quiet:
        console_err().print(f"{len(qset.names)} queries x {len(mset.names)} map images: {len(pairs)} pairs "
                            f"({conf.fusion.name} of {', '.join(names)})", highlight=False)
    if out != "-":
        report_written([Path(out)], quiet or as_json)

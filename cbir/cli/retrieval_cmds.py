"""``cbir retrieve``: global descriptors -> image pairs, with late fusion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.markup import escape

from ..executor import Executor
from ..io.pairs import write_pairs
from ..retrieval.names import ALIASES, FUSIONS, INDEX_KINDS, MAX_LSH_BITS, PRECISIONS
from ._common import console_err, is_quiet, open_dataset, print_json, report_written, warn
from .features_cmds import cli_executor, executor_options, progress_bar


def _say_left_out(qset: Any, mset: Any) -> None:
    """Images of the stores that retrieval leaves out, and why."""
    for label, dset in (("query", qset), ("map", mset)):
        if dset.foreign:
            console_err().print(f"{len(dset.foreign)} images of the {label} stores are not in its "
                                "records_camera.txt and are left out", highlight=False)
        if dset.dropped:
            console_err().print(f"[yellow]{len(dset.dropped)} {label} images lack some descriptor and are "
                                f"left out[/]: {escape(', '.join(dset.dropped[:5]))}"
                                f"{' ...' if len(dset.dropped) > 5 else ''}", highlight=False)


def _say_built(built: int, keep_hint: str, kind: str, executor: Executor, shard_size: int, per_shard: bool) -> None:
    """Indexes built for this call only, and the command that keeps them (one file for the
    map, or one a map shard, cut as this search cut it)."""
    if not per_shard:
        console_err().print(f"built the {kind} index for this call only: `{keep_hint}` keeps it", highlight=False)
    else:
        console_err().print(f"built the {kind} indexes of {built} map shards for this call only: "
                            f"`{keep_hint} --executor {executor.name} --shard-size {shard_size}` keeps them",
                            highlight=False)


def _floats(value: str | None) -> tuple[float, ...]:
    if not value:
        return ()
    try:
        return tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}", param_hint="--weights") from None


def _binary_codes(map_: Any, name: str) -> bool:
    """Whether the map's global store ``name`` holds binary codes (metric_type Hamming)."""
    from ..hashing.model import is_code_store
    from ..io.store import open_store

    with open_store(map_.store_path("global", name), "global-features") as store:
        return is_code_store(store)


def _retrieve_codes(ctx: click.Context, q: Any, m: Any, name: str, topk: int, exclude_same_name: bool,
                    output: str | None, as_json: bool, rerank: str | None, candidates: int, run: Executor) -> None:
    """`cbir retrieve` of a code store: exact Hamming search, ties by map order (then, with
    ``rerank``, the candidates ranked by float cosine)."""
    from ..hashing.retrieve import hamming_pairs

    pairs, record = hamming_pairs(q, m, name, topk, exclude_same_name=exclude_same_name, rerank=rerank,
                                  candidates=candidates, executor=run)
    out = output or str(q.store_path("pairs", f"{name}_top{topk}"))
    if out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_pairs(out, pairs, record)
    queries = len({p.query for p in pairs})
    summary = {"pairs": out, "queries": queries, "pair_count": len(pairs), "metric": "Hamming", "index": "exact",
               "rerank": rerank}
    if as_json:
        if out == "-":
            console_err().print_json(data=summary)
        else:
            print_json(summary)
    elif not is_quiet(ctx):
        console_err().print(f"{queries} queries: {len(pairs)} pairs (Hamming distance of {name}, exact search)",
                            highlight=False)
    if out != "-":
        report_written([Path(out)], is_quiet(ctx) or as_json)


@click.command()
@click.option("--map", "map_", required=True, type=click.Path(file_okay=False, path_type=Path), help="Map dataset.")
@click.option("--query", type=click.Path(file_okay=False, path_type=Path),
              help="Query dataset (default: map x map, an image never retrieving itself).")
@click.option("--global", "global_", required=True, metavar="NAME[,NAME...]",
              help="Global stores to use (their names in cbir/global/ of both datasets).")
@click.option("--fusion", default="gharm", show_default=True,
              type=click.Choice(sorted(FUSIONS) + sorted(ALIASES)), help="Late fusion of several descriptors.")
@click.option("--topk", type=click.IntRange(1), default=20, show_default=True, help="Pairs per query.")
@click.option("--weights", "weights", help="Per-descriptor weights, comma-separated (normalized; default equal).")
@click.option("--gamma", type=float, help="gharm, mean_and_power, mean_and_min (default 0.5).")
@click.option("--alpha", type=float, help="min_and_max, villena_roman (default 0.5).")
@click.option("--qe", type=click.IntRange(0), default=0, show_default=True,
              help="Query expansion with the N first results (0: off).")
@click.option("--qe-alpha", type=click.FloatRange(0), default=0.0, show_default=True,
              help="alpha-QE weight power (0: average QE).")
@click.option("--dba", type=click.IntRange(0), default=0, show_default=True,
              help="Database-side augmentation with N neighbours (0: off; holds the map in memory).")
@click.option("--dba-alpha", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option("--index", "index_kind", type=click.Choice(["exact", *INDEX_KINDS]), default="exact",
              show_default=True, help="exact search, or a faiss index whose candidates are rescored exactly.")
@click.option("--candidates", type=click.IntRange(1), default=100, show_default=True,
              help="Indexed search: candidates per descriptor and query.")
@click.option("--nlist", type=click.IntRange(1), help="ivf, ivfpq: inverted lists (default 4 sqrt(N)).")
@click.option("--nprobe", type=click.IntRange(1), default=16, show_default=True, help="ivf, ivfpq: lists visited.")
@click.option("--pq-m", type=click.IntRange(1), help="ivfpq: 4-bit sub-quantizers (default dim/8).")
@click.option("--lsh-bits", type=click.IntRange(1, MAX_LSH_BITS),
              help=f"lsh: bits per code (default 2 x dim, at most {MAX_LSH_BITS}).")
@click.option("--recall-sample", type=click.IntRange(0), default=0, show_default=True,
              help="Indexed search: measure recall@topk against exact search on N sampled queries.")
@click.option("--rerank", metavar="NAME", help="Binary codes: rank each query's --candidates nearest codes again by "
              "the cosine of the float global store NAME.")
@click.option("--exclude-same-name", is_flag=True,
              help="Drop a map image named as the query even in another dataset (kapture-localization's pairs).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, or auto.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Exact search: fp32 everywhere, or fp16/bf16 search with the candidates rescored in fp32 "
                   "(the same pairs, faster on GPUs; gharm, mean, min, max, mean_and_min, min_and_max).")
@executor_options(100_000, "map images (an indexed sharded map, with either executor: whole parts grouped up to "
                           "it, as `cbir index build` grouped them)")
@click.option("-o", "--output", help="Pairs file, or - for stdout (default: QUERY/cbir/pairs/<stores>_top<k>.txt).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary (on stderr with -o -).")
@click.pass_context
def retrieve_cmd(ctx: click.Context, map_: Path, query: Path | None, global_: str, fusion: str, topk: int,
                 weights: str | None, gamma: float | None, alpha: float | None, qe: int, qe_alpha: float, dba: int,
                 dba_alpha: float, index_kind: str, candidates: int, nlist: int | None, nprobe: int,
                 pq_m: int | None, lsh_bits: int | None, recall_sample: int, rerank: str | None,
                 exclude_same_name: bool, device: str,
                 precision: str, executor: str, ray_address: str | None, shard_size: int, output: str | None,
                 as_json: bool) -> None:
    """The TOPK most similar map images of each query, as a pairs file.

    Several descriptors (--global a,b,c) are fused per (query, map image) with --fusion;
    exact search by default, streamed over the map in bounded memory.
    """
    from ..models.base import resolve_device
    from ..retrieval.conf import RetrievalConf
    from ..retrieval.descriptors import open_descriptor_sets
    from ..retrieval.fusion import FusionConf
    from ..retrieval.index import IndexConf, recall_advice
    from ..retrieval.ranking import pairs_record

    if index_kind != "exact" and (qe or dba):
        raise click.UsageError("--qe and --dba run on exact search: drop --index")
    names = [n.strip() for n in global_.split(",") if n.strip()]
    m = open_dataset(map_)
    q = open_dataset(query) if query else m
    same = q.root.resolve() == m.root.resolve()
    float_only = [flag for flag, used in (("--qe", qe), ("--dba", dba), ("--index", index_kind != "exact"),
                                          ("--precision", precision != "fp32")) if used]
    if len(names) == 1 and _binary_codes(m, names[0]) and not float_only:
        # one code store: exact Hamming search (the same ranking as the float path's +-1 vectors, faster)
        _retrieve_codes(ctx, q, m, names[0], topk, exclude_same_name, output, as_json, rerank, candidates,
                        cli_executor(executor, ray_address, shard_size, "map_images"))
        return
    if rerank:
        raise click.UsageError("--rerank: for one code store searched by Hamming distance (not with "
                               f"{', '.join(float_only) or 'other stores'})")
    conf = RetrievalConf(topk=topk, fusion=FusionConf(fusion, _floats(weights), gamma=gamma, alpha=alpha),
                         exclude_self=same, exclude_same_name=exclude_same_name, precision=precision)
    quiet = is_quiet(ctx)
    with open_descriptor_sets(q, m, names) as (qset, mset):
        _say_left_out(qset, mset)
        if topk > len(mset.names) - int(same):
            console_err().print(f"[yellow]top-k {topk} is more than the map has: every map image is returned[/]")
        resolve_device(device)  # an unusable device is refused before any work
        iconf = None if index_kind == "exact" else \
            IndexConf(index_kind, candidates=candidates, nlist=nlist, nprobe=nprobe, pq_m=pq_m or 0,
                      lsh_bits=lsh_bits or 0)
        run = cli_executor(executor, ray_address, shard_size, "map_images")
        with progress_bar("retrieve", quiet or output == "-") as update:
            result = run.retrieve(q, m, qset, mset, names, conf, device=device, qe=qe, qe_alpha=qe_alpha, dba=dba,
                                  dba_alpha=dba_alpha, index=iconf, recall_sample=recall_sample, progress=update)
        pairs, recall = result.pairs, result.recall
        if result.indexes_built and not quiet:
            _say_built(result.indexes_built, f"cbir index build {m.root} --global {','.join(names)} "
                       f"--index {index_kind}", index_kind, run, shard_size, result.indexes_per_shard)
        for note in result.notes:
            warn(note)
        index_options = {"index": index_kind} if index_kind == "exact" else \
            {"index": index_kind, "candidates": candidates, "nlist": nlist, "nprobe": nprobe, "pq_m": pq_m,
             "lsh_bits": lsh_bits, **({"index_shard_size": shard_size} if result.indexes_per_shard else {})}
        record = pairs_record(conf, qset, mset, qe=qe, qe_alpha=qe_alpha, dba=dba, dba_alpha=dba_alpha,
                              **index_options)
    out = output or str(q.store_path("pairs", f"{'+'.join(names)}_top{topk}"))
    if out != "-":
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_pairs(out, pairs, record)
    nan_pairs = sum(1 for p in pairs if p.score != p.score)
    if nan_pairs and not quiet:
        console_err().print(f"[yellow]{nan_pairs} pairs have a NaN fused score[/] ({conf.fusion.name} of a negative "
                            "similarity): ranked after every number, as kapture-localization does", highlight=False)
    summary = {"pairs": out, "queries": len(qset.names), "map_images": len(mset.names), "pair_count": len(pairs),
               "nan_score_pairs": nan_pairs,
               "fusion": conf.fusion.name, "index": index_kind, "recall_vs_exact": recall,
               "recall_advice": recall_advice(recall, iconf) if recall is not None and iconf is not None else None,
               "dropped_queries": qset.dropped, "dropped_map_images": mset.dropped}
    if as_json:
        if out == "-":
            console_err().print_json(data=summary)
        else:
            print_json(summary)
    elif not quiet:
        console_err().print(f"{len(qset.names)} queries x {len(mset.names)} map images: {len(pairs)} pairs "
                            f"({conf.fusion.name} of {', '.join(names)}, {index_kind} search)", highlight=False)
        if recall is not None:
            console_err().print(f"recall@{topk} of the {index_kind} index against exact search: {100 * recall:.1f}% "
                                f"({min(recall_sample, len(qset.names))} sampled queries)", highlight=False)
            if summary["recall_advice"]:
                console_err().print(f"[yellow]{summary['recall_advice']}[/]", highlight=False)
    if out != "-":
        report_written([Path(out)], quiet or as_json)

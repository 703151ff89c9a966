"""``cbir index build``: faiss indexes of a map's global descriptors, built once and kept."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..io.index_file import index_path, kept_files
from ..retrieval.names import INDEX_KINDS, MAX_LSH_BITS
from ._common import console_err, dataset_argument, is_quiet, open_dataset, print_json, report_written, warn
from .features_cmds import cli_executor, executor_options, progress_bar


@click.group("index")
def index_group() -> None:
    """Faiss indexes of a map's global descriptors, built once (`cbir retrieve --index` uses them)."""


@index_group.command("build")
@dataset_argument("map_")
@click.option("--global", "global_", required=True, metavar="NAME[,NAME...]",
              help="Global stores of MAP, as `cbir retrieve --global` will name them (one index each).")
@click.option("--index", "kind", type=click.Choice(INDEX_KINDS), default="ivfpq", show_default=True)
@click.option("--nlist", type=click.IntRange(1), help="ivf, ivfpq: inverted lists (default 4 sqrt(N)).")
@click.option("--pq-m", type=click.IntRange(1), help="ivfpq: 4-bit sub-quantizers (default dim/8).")
@click.option("--lsh-bits", type=click.IntRange(1, MAX_LSH_BITS),
              help=f"lsh: bits per code (default 2 x dim, at most {MAX_LSH_BITS}).")
@click.option("--train-size", type=click.IntRange(1), default=100_000, show_default=True,
              help="Map images the quantizers are trained on (a seeded sample).")
@click.option("--overwrite", is_flag=True, help="Rebuild an index built from other stores or options.")
@executor_options(100_000, "map images (one index file a shard, for `cbir retrieve --executor ray` with the same "
                           "--shard-size; a sharded map, with either executor: whole parts grouped up to it)")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def index_build(ctx: click.Context, map_: Path, global_: str, kind: str, nlist: int | None, pq_m: int | None,
                lsh_bits: int | None, train_size: int, overwrite: bool, executor: str, ray_address: str | None,
                shard_size: int, as_json: bool) -> None:
    """Train and fill the indexes of MAP's global stores (streaming them), and keep them in
    MAP/cbir/index/ with a record of the stores and options (written atomically)."""
    from ..retrieval.descriptors import open_descriptor_sets
    from ..retrieval.index import IndexConf, sparse_training

    names = [n.strip() for n in global_.split(",") if n.strip()]
    m = open_dataset(map_)
    iconf = IndexConf(kind, nlist=nlist, pq_m=pq_m or 0, lsh_bits=lsh_bits or 0, train_size=train_size)
    run = cli_executor(executor, ray_address, shard_size, "map_images")
    t = time.perf_counter()
    with progress_bar("index", is_quiet(ctx) or as_json) as update:
        shards = run.build_indexes(m, names, iconf, overwrite=overwrite, progress=update)
    seconds = time.perf_counter() - t
    path = index_path(m, names, kind)
    if [p for p, _ in shards] != [path]:  # one file per map shard, for `cbir retrieve` with the same shard size
        written = [p for p, status in shards if status != "kept"]
        summary = {"index": str(shards[0][0].parent), "shards": len(shards), "built": len(written),
                   "kept": len(shards) - len(written), "stores": names, "kind": kind, "shard_size": shard_size,
                   "bytes": sum(f.stat().st_size for p, _ in shards for f in kept_files(p, len(names))),
                   "build_seconds": round(seconds, 3)}
        if as_json:
            print_json(summary)
        elif not is_quiet(ctx):
            console_err().print(f"{kind} indexes of {len(shards)} map shards ({', '.join(names)}): {len(written)} "
                                f"built, {len(shards) - len(written)} kept, in {seconds:.1f} s", highlight=False)
        report_written(written, is_quiet(ctx) or as_json)
        return
    status = shards[0][1]
    with open_descriptor_sets(m, m, names) as (_, mset):
        images = len(mset.names)
    files = kept_files(path, len(names))  # the record, then its faiss files
    size = sum(f.stat().st_size for f in files)
    summary = {"index": str(path), "files": [str(f) for f in files[1:]], "status": status,
               "images": images, "stores": names, "kind": kind, "bytes": size,
               "build_seconds": None if status == "kept" else round(seconds, 3)}
    if as_json:
        print_json(summary)
    elif not is_quiet(ctx):
        what = "already built from these stores and options" if status == "kept" else \
            f"built in {seconds:.1f} s"
        note = sparse_training(kind, images, iconf) if status != "kept" else None
        if note:
            warn(note)
        console_err().print(f"{kind} index of {images} images ({', '.join(names)}): {what}, "
                            f"{size / 2 ** 20:.1f} MB", highlight=False)
    if status != "kept":
        report_written(files, is_quiet(ctx) or as_json)

"""``cbir hash``: learn a hash function from a global store (or Region-DH from images and
boxes), write binary codes, search them by Hamming distance, and the hashing metrics (issue 29)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np

from ..errors import CbirError
from ._common import dataset_argument, is_quiet, open_dataset, print_json, report_written
from .features_cmds import cli_executor, device_option, executor_options, parse_conf


def model_output_options(f: Any) -> Any:
    """The options of a command that trains a model: --seed, --out, --overwrite, --json."""
    for option in reversed((
            click.option("--seed", type=int, default=0, show_default=True),
            click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
                         help="The model (.npz)."),
            click.option("--overwrite", is_flag=True, help="Replace an existing model file."),
            click.option("--json", "as_json", is_flag=True))):
        f = option(f)
    return f


def _descriptors(dataset: Path, name: str) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """Names, descriptors (N x D) and config of a dataset's global store ``name``."""
    from ..hashing.stores import float_descriptors

    return float_descriptors(open_dataset(dataset).store_path("global", name))


def _labels(path: Path | None, names: list[str]) -> np.ndarray | None:
    if path is None:
        return None
    from ..hashing.labels import label_matrix, read_labels

    return label_matrix(read_labels(path), names, path)[0]


def _relevant(query_gt: Path, map_: Path, qnames: list[str], mnames: list[str], max_distance: float,
              max_angle: float) -> np.ndarray:
    """Q x N: map images whose camera is within ``max_distance`` and ``max_angle`` of the
    query's (the pose ground truth of ``cbir evaluate --retrieval``)."""
    from ..evaluation.retrieval import ground_truth_from_poses

    qposes, mposes = open_dataset(query_gt).sensors.image_poses(), open_dataset(map_).sensors.image_poses()
    for label, names, known, where in (("query", qnames, qposes, query_gt), ("map", mnames, mposes, map_)):
        missing = [n for n in names if n not in known]
        if missing:
            raise CbirError(f"{len(missing)} {label} images have no pose, e.g. {missing[0]!r}", where)
    gt = ground_truth_from_poses({n: qposes[n] for n in qnames}, {n: mposes[n] for n in mnames},
                                 max_distance=max_distance, max_angle_deg=max_angle)
    column = {n: i for i, n in enumerate(mnames)}
    out = np.zeros((len(qnames), len(mnames)), bool)
    for i, q in enumerate(qnames):
        out[i, [column[n] for n in gt.relevant.get(q, ())]] = True
    return out


def _pose_pairs(dataset: Path, names: list[str], max_distance: float, max_angle: float) -> np.ndarray:
    """N x N similar pairs of the dataset's own images by their poses (an image is similar to itself)."""
    similar = _relevant(dataset, dataset, names, names, max_distance, max_angle)
    np.fill_diagonal(similar, True)
    return similar


def _covisible_pairs(dataset: Path, map_name: str | None, names: list[str], min_shared: int) -> np.ndarray:
    """N x N similar pairs of the dataset's images: sharing ``min_shared`` points of its map."""
    from ..hashing.labels import covisible_pairs
    from ..io.map_store import read_map

    ds = open_dataset(dataset)
    if map_name is None:
        maps = ds.list_stores().get("map", [])
        if len(maps) != 1:
            raise CbirError(f"{len(maps)} map stores: name one with --map-name" if maps else
                            "no map: make one with cbir map, or supervise with --poses or --labels", dataset)
        path = maps[0]
    else:
        path = ds.store_path("map", map_name)
    m = read_map(path)
    mapped = set(m.images)
    if not any(n in mapped for n in names):
        raise CbirError("none of the descriptors' images is in this map", path)
    return covisible_pairs(m.images, m.track_offsets, m.track_images, names, min_shared)


@click.group("hash")
def hash_group() -> None:
    """Binary codes: learn them from global descriptors (or, Region-DH, from images and boxes);
    encode, search, evaluate."""


@hash_group.command("train")
@dataset_argument()
@click.option("--global", "global_", required=True, metavar="NAME", help="The global store to learn from.")
@click.option("--method", required=True, metavar="NAME", help="lsh, itq, dpsh, hashnet, dsdh, or a plugin's.")
@click.option("--bits", type=click.IntRange(8, 1024), required=True, help="Code length.")
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Labels file (supervised methods): 'image, label[, label ...]' a line.")
@click.option("--poses", is_flag=True, help="Supervised methods: similar = cameras within --max-distance and "
              "--max-angle of each other (the dataset's trajectories), instead of labels.")
@click.option("--max-distance", type=click.FloatRange(0), default=10.0, show_default=True, help="With --poses (m).")
@click.option("--max-angle", type=click.FloatRange(0, 180), default=45.0, show_default=True,
              help="With --poses: between optical axes (degrees).")
@click.option("--covisible", type=click.IntRange(1), metavar="N", help="Supervised methods: similar = images "
              "observing at least N 3D points in common in the dataset's map (cbir map).")
@click.option("--map-name", metavar="LOCAL", help="With --covisible: the map store (default: the dataset's only one).")
@click.option("--conf", "conf_items", multiple=True, metavar="KEY=VALUE", help="The method's options.")
@model_output_options
@click.pass_context
def hash_train(ctx: click.Context, dataset: Path, global_: str, method: str, bits: int, labels_path: Path | None,
               poses: bool, max_distance: float, max_angle: float, covisible: int | None, map_name: str | None,
               conf_items: tuple[str, ...], seed: int, out: Path, overwrite: bool, as_json: bool) -> None:
    """Learn a hash function of BITS bits from DATASET's global store."""
    from .. import plugins
    from ..hashing.base import Hasher

    if out.exists() and not overwrite:
        raise CbirError("exists: pass --overwrite to replace it", out)
    cls = plugins.load("hasher", method)
    if not (isinstance(cls, type) and issubclass(cls, Hasher)):
        raise CbirError(f"the hashing method {method!r} is {cls!r}, not a subclass of cbir.hashing.base.Hasher")
    if sum((bool(labels_path), poses, covisible is not None)) > 1:
        raise click.UsageError("one supervision: --labels, --poses or --covisible")
    names, x, config = _descriptors(dataset, global_)
    similar = _pose_pairs(dataset, names, max_distance, max_angle) if poses else \
        _covisible_pairs(dataset, map_name, names, covisible) if covisible is not None else None
    model = cls(parse_conf(conf_items)).fit(x, bits, _labels(labels_path, names), seed, similar=similar)
    if poses:
        model.conf.update({"supervision": "poses", "max_distance": max_distance, "max_angle": max_angle})
    elif covisible is not None:
        model.conf.update({"supervision": "covisibility", "min_shared_points": covisible})
    model.extra["source"] = {"store": global_, "config": config, "images": len(names)}
    model.save(out)
    summary = {"model": str(out), "method": model.method, "bits": model.bits, "dim": model.dim,
               "trained_on": model.trained_on, "images": len(names),
               **{k: v for k, v in model.extra.items() if k != "source"}}
    if as_json:
        print_json(summary)
    else:
        report_written([out], is_quiet(ctx))


@hash_group.command("encode")
@dataset_argument()
@click.option("--global", "global_", metavar="NAME", help="The global store to encode (a linear hash model).")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", help="The code store's name (default: <global>-<method><bits>).")
@click.option("--overwrite", is_flag=True, help="Replace a code store written by another model.")
@device_option
@click.pass_context
def hash_encode(ctx: click.Context, dataset: Path, global_: str | None, model_path: Path, name: str | None,
                overwrite: bool, device: str) -> None:
    """Write the binary codes of DATASET's global store as a code store (cbir/global/NAME.h5);
    with a Region-DH model, of DATASET's images: their image codes (cbir/global/NAME.h5) and
    instance codes with their boxes (cbir/local/NAME.h5)."""
    from ..hashing.model import HashModel
    from ..hashing.region_dh import is_region_dh

    if is_region_dh(model_path):
        if global_:
            raise click.UsageError("a Region-DH model encodes images: no --global")
        from ..hashing.instances import write_region_stores
        from ..models.base import resolve_device

        report_written(list(write_region_stores(open_dataset(dataset), model_path, name, overwrite=overwrite,
                                                device=resolve_device(device))), is_quiet(ctx))
        return
    if not global_:
        raise click.UsageError("--global NAME is required with a linear hash model")
    from ..hashing.stores import write_code_store

    out = write_code_store(open_dataset(dataset), global_, HashModel.load(model_path), model_path, name,
                           overwrite=overwrite)
    report_written([out], is_quiet(ctx))


@hash_group.command("train-regions")
@dataset_argument()
@click.option("--boxes", "boxes_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Boxes file: 'image, label, x_min, y_min, x_max, y_max' a line, one per object instance.")
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Labels file instead of boxes, with --conf regions=false: the image-level branch alone "
              "(deep hashing trained end to end with the backbone).")
@click.option("--bits", type=click.IntRange(8, 1024), required=True, help="Code length (image and instance codes).")
@click.option("--pretrained", type=click.Path(dir_okay=False, path_type=Path),
              help="torchvision's ImageNet weights of the backbone (a local .pth; nothing is downloaded).")
@click.option("--max-size", type=click.IntRange(16), help="Resize images so that their longest side is at most this.")
@click.option("--conf", "conf_items", multiple=True, metavar="KEY=VALUE", help="Region-DH options (default_conf).")
@device_option
@model_output_options
@click.pass_context
def hash_train_regions(ctx: click.Context, dataset: Path, boxes_path: Path | None, labels_path: Path | None,
                       bits: int, pretrained: Path | None, max_size: int | None, conf_items: tuple[str, ...],
                       device: str, seed: int, out: Path, overwrite: bool, as_json: bool) -> None:
    """Train Region-DH (an image code and a code per object instance) on DATASET's images and
    their boxes."""
    from ..hashing import region_dh
    from ..validate import merged_conf

    if out.exists() and not overwrite:
        raise CbirError("exists: pass --overwrite to replace it", out)
    conf = merged_conf("Region-DH", region_dh.default_conf, parse_conf(conf_items))
    if (boxes_path is None) == (labels_path is None):
        raise click.UsageError("give --boxes FILE, or --labels FILE with --conf regions=false")
    if labels_path is not None and conf["regions"]:
        raise click.UsageError("the region branch learns from boxes: --boxes, or --conf regions=false to train the "
                               "image-level branch from --labels")
    conf.update({"bits": bits, "max_size": max_size})
    if pretrained is not None:
        conf["pretrained"] = str(pretrained)
    samples, classes, trained_on = region_dh.dataset_samples(open_dataset(dataset), boxes_path, labels_path, max_size)
    from ..models.base import resolve_device

    net, history = region_dh.train(samples, classes, conf, seed, device=resolve_device(device))
    region_dh.save(net, out, trained_on, {"images": len(samples), "first_loss": history[0], "final_loss": history[-1]})
    summary = {"model": str(out), "method": "region-dh", "bits": bits, "classes": classes, "images": len(samples),
               "trained_on": trained_on, "first_loss": history[0], "final_loss": history[-1]}
    if as_json:
        print_json(summary)
    else:
        report_written([out], is_quiet(ctx))


@hash_group.command("search")
@click.option("--map", "map_", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--query", type=click.Path(file_okay=False, path_type=Path), help="Default: the map against itself.")
@click.option("--global", "global_", required=True, metavar="NAME", help="The code store of both datasets.")
@click.option("--topk", type=click.IntRange(1), default=20, show_default=True)
@click.option("--index", "kind", type=click.Choice(["exact", "multihash", "ivf"]), default="exact", show_default=True,
              help="exact, or a faiss binary index for large maps (may miss neighbours).")
@click.option("--exclude-same-name", is_flag=True, help="Drop a map image named as the query.")
@click.option("--rerank", metavar="NAME", help="Rank each query's --candidates nearest codes again by the cosine of "
              "the float global store NAME.")
@click.option("--candidates", type=click.IntRange(1), default=100, show_default=True)
@click.option("--instances", is_flag=True, help="Region-DH: rank by the instance codes (cbir/local/NAME.h5): the "
              "mean over the query's instances of the distance to the nearest instance of the map image.")
@executor_options(100_000, "map images (each shard's nearest codes merged by distance, then map order)")
@click.option("--output", "-o", required=True, help="Pairs file to write ('-': standard output).")
def hash_search(map_: Path, query: Path | None, global_: str, topk: int, kind: str, exclude_same_name: bool,
                rerank: str | None, candidates: int, instances: bool, executor: str, ray_address: str | None,
                shard_size: int, output: str) -> None:
    """The TOPK nearest map codes of each query by Hamming distance, ties by map order, as a
    pairs file whose score is the number of equal bits (`cbir retrieve` does the same with
    exact search)."""
    from ..hashing.retrieve import hamming_pairs
    from ..io.pairs import write_pairs

    if instances:
        if kind != "exact" or rerank or executor != "local":
            raise click.UsageError("--instances ranks exactly, on this machine: no --index, --rerank or --executor")
        from ..hashing.instances import instance_pairs

        write_pairs(output, *instance_pairs(open_dataset(query or map_), open_dataset(map_), global_, topk,
                                            exclude_same_name))
        return
    m = open_dataset(map_)
    pairs, record = hamming_pairs(open_dataset(query) if query else m, m, global_, topk, kind=kind,
                                  exclude_same_name=exclude_same_name, rerank=rerank, candidates=candidates,
                                  executor=cli_executor(executor, ray_address, shard_size, "map_images"))
    write_pairs(output, pairs, record)


@hash_group.command("evaluate")
@click.option("--map", "map_", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--query", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--global", "global_", required=True, metavar="NAME", help="The code store of both datasets.")
@click.option("--labels", "labels_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Labels of the query and map images (relevant: sharing a label).")
@click.option("--query-gt", type=click.Path(file_okay=False, path_type=Path),
              help="Dataset with the queries' poses (relevant: cameras within --max-distance and --max-angle).")
@click.option("--max-distance", type=click.FloatRange(0), default=10.0, show_default=True)
@click.option("--max-angle", type=click.FloatRange(0, 180), default=45.0, show_default=True)
@click.option("--k", "ks", type=click.IntRange(1), multiple=True, default=(100,), show_default=True)
@click.option("--radius", type=click.IntRange(0), default=2, show_default=True)
@click.option("--instances", is_flag=True, help="Region-DH: rank by the instance codes (see cbir hash search).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the precision-recall curve (one point per Hamming radius) as an HTML page.")
def hash_evaluate(map_: Path, query: Path, global_: str, labels_path: Path | None, query_gt: Path | None,
                  max_distance: float, max_angle: float, ks: tuple[int, ...], radius: int, instances: bool,
                  plot: Path | None) -> None:
    """mAP, mAP@k, precision@k, recall@k, precision and mAP within a Hamming radius and the
    precision-recall curve of the query codes against the map codes (JSON). A query's own
    image, when the query and the map are one dataset, is neither ranked nor relevant."""
    from ..hashing.instances import region_distances
    from ..hashing.labels import label_matrix, read_labels
    from ..hashing.metrics import hashing_metrics, label_relevance
    from ..hashing.retrieve import code_distances

    if (labels_path is None) == (query_gt is None):
        raise click.UsageError("give one ground truth: --labels FILE or --query-gt DATASET")
    found = (region_distances if instances else code_distances)(open_dataset(query), open_dataset(map_), global_)
    qnames, mnames, distances, bits = found.query_names, found.map_names, found.distances, found.bits
    if labels_path is not None:
        labels = read_labels(labels_path)
        mlab, vocab = label_matrix(labels, mnames, labels_path)
        qlab, _ = label_matrix(labels, qnames, labels_path, vocab)
        relevance = label_relevance(qlab, mlab)
    else:
        assert query_gt is not None
        relevance = _relevant(query_gt, map_, qnames, mnames, max_distance, max_angle)
    if open_dataset(query).root.resolve() == open_dataset(map_).root.resolve():
        column = {n: i for i, n in enumerate(mnames)}
        for i, q in enumerate(qnames):  # the query itself: ranked last, not relevant
            if q in column:
                distances[i, column[q]], relevance[i, column[q]] = bits + 1, False
    metrics = hashing_metrics(distances, relevance, bits, ks, radius)
    source = str(labels_path) if labels_path else f"poses (<= {max_distance:g} m, <= {max_angle:g} deg)"
    if plot is not None:
        from ..hashing.metrics import pr_curve_html
        from ..io.atomic import atomic_write_text

        label = f"{global_} ({'instances' if instances else 'image codes'})"
        atomic_write_text(plot, pr_curve_html({label: metrics["pr_curve"]},
                                              f"{global_}: precision-recall by Hamming radius, {source}"))
    print_json({"bits": bits, "method": found.identity.get("method"), "level": "instances" if instances else
                "image", "ground_truth": source, **metrics})

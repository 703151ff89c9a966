"""The extraction step: shards of images, workers that load the networks once.

In place (the local executor) it is :func:`cbir.extract.extract_all` over the images, into
the final stores. Otherwise the driver builds each extractor here too (on the CPU: every
option, weight file and name is checked before the workers start), learns a model on the
map where one does (DenseVLAD's, once, before any shard), and cuts the images that some
store lacks into shards; each worker builds the extractors once and extracts shard after
shard into the shard's own stores, which become parts of the final (sharded) stores
(:mod:`cbir.steps.parts`); a shard written by an earlier run is kept if it is whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..executor import Work
from ..io.store import present_keys
from . import cut, opened, portable, wants_gpu
from .parts import collect_parts, count, intact, merge_counter, plan_directory, remove_plan

if TYPE_CHECKING:
    from ..executor import Executor, ExtractorJob, Progress
    from ..extract import ExtractReport, ImageOptions
    from ..io.dataset import Dataset
    from ..models.base import Extractor

#: (kind, registered name or module:Class, configuration) of one extractor, as workers build it
ExtractorSpec = tuple[str, str, dict[str, Any]]


def extract(executor: Executor, jobs: Sequence[ExtractorJob], dataset: Dataset, *,
            store_names: Sequence[str | None] | None = None, images: list[str] | None = None,
            overwrite: bool = False, num_workers: int | None = None, image_options: ImageOptions | None = None,
            progress: Progress | None = None, learning: Progress | None = None,
            merging: Progress | None = None) -> list[ExtractReport]:
    """:func:`cbir.extract.extract_all` by ``executor``; one report a store.
    ``progress(images, total)`` as images (shards) are done, ``learning`` that of a model
    learned on the map first, ``merging(parts, total)`` as shards' stores become the final stores' parts."""
    from .. import extract as extract_mod

    options = image_options or extract_mod.ImageOptions()
    names_given = list(store_names) if store_names is not None else [None] * len(jobs)
    if executor.in_place:
        built = [j if isinstance(j, extract_mod.Extractor) else build_extractors([j])[0] for j in jobs]
        work = Work(extract_shard, {0: (portable(dataset, executor), names_given, images, None, options, overwrite,
                                        learning, executor.sharded)},
                    ["every image"], [0], state=built, threads=num_workers, progress=progress)
        [(_, reports)] = executor.run(work)
        return reports
    specs = [as_spec(j) for j in jobs]
    # built here too (on the CPU): every option, weight file and name is checked before the cluster works
    local = [extract_mod.build_extractor(name, {**c, "device": "cpu"} if "device" in c else c, kind)
             for kind, name, c in specs]
    names = [n or e.default_store_name() for e, n in zip(local, names_given, strict=True)]
    kinds = [extract_mod.store_kind(e) for e in local]
    finals = [dataset.store_path(k, n) for k, n in zip(kinds, names, strict=True)]
    wanted = images if images is not None else sorted(dataset.sensors.image_names())
    specs = _with_learned_models(specs, local, finals, dataset, wanted, options, overwrite, learning)
    attrs = [extract_mod.store_attributes(e, n, options) for e, n in zip(local, names, strict=True)]
    present = [present_keys(final, f"{k}-features", a, overwrite)
               for k, final, a in zip(kinds, finals, attrs, strict=True)]
    todo = [n for n in wanted if any(n not in p for p in present)]
    shards = cut(todo, executor.sizes.images)
    plan = plan_directory(dataset.root, {"stores": [str(f) for f in finals], "config": attrs, "images": todo})
    shard_dirs = [plan / f"{i:06d}" for i in range(len(shards))]
    outputs = [[d / k / f"{n}.h5" for k, n in zip(kinds, names, strict=True)] for d in shard_dirs]
    reports = [extract_mod.ExtractReport(final, already_present=len([n for n in wanted if n in p]))
               for final, p in zip(finals, present, strict=True)]
    if progress:
        progress(len(wanted) - len(todo), len(wanted))
    work = Work(extract_shard, {i: (portable(dataset, executor), names, shards[i], str(shard_dirs[i]), options,
                                    False, None, None)
                                for i, outs in enumerate(outputs) if not all([intact(o) for o in outs])},
                [s[0] for s in shards], [len(s) for s in shards], len(wanted), setup=(build_extractors, (specs,)),
                progress=progress, on_gpu=any(wants_gpu(c.get("device", "cpu")) for _, _, c in specs),
                role="extraction")
    for _, shard_reports in executor.run(work):
        for report, part in zip(reports, shard_reports, strict=True):
            add_report(report, part)
    written = sum(o.exists() for outs in outputs for o in outs)
    collected = merge_counter(merging, written)
    for j, (final, a) in enumerate(zip(finals, attrs, strict=True)):
        collect_parts(final, [o[j] for o in outputs], f"{kinds[j]}-features", a, keep=not overwrite,
                      progress=collected)
    for final, report in zip(finals, reports, strict=True):  # images of an earlier run's shards count as extracted
        report.extracted = count(final) - report.already_present
    remove_plan(plan)
    return reports


def as_spec(job: ExtractorJob) -> ExtractorSpec:
    """An extractor as workers build it: from its class's path, so that plugins that are not
    installed by name run too."""
    from ..extract import store_kind

    if isinstance(job, tuple):
        return job
    return store_kind(job), f"{type(job).__module__}:{type(job).__qualname__}", dict(job.conf)


def _with_learned_models(specs: list[ExtractorSpec], local: list[Extractor], finals: list[Path], dataset: Dataset,
                         wanted: list[str], options: ImageOptions, overwrite: bool,
                         learning: Progress | None) -> list[ExtractorSpec]:
    """A model learned on the map (DenseVLAD's) learned here, once, and the workers' specs
    pointing at it."""
    from .. import extract as extract_mod
    from ..io.dataset import model_path

    out = list(specs)
    for j, (e, final) in enumerate(zip(local, finals, strict=True)):
        if isinstance(e, extract_mod.GlobalExtractor):
            final.parent.mkdir(parents=True, exist_ok=True)
            e.prepare(final, wanted, extract_mod.image_loader(dataset, e, options), overwrite=overwrite,
                      progress=learning)
            if e.learns_on_map and e.conf.get("learn"):  # the workers read the model learned here
                kind, name, c = out[j]
                out[j] = (kind, name, {**c, "learn": False, "model": str(model_path(final))})
    return out


def build_extractors(specs: list[ExtractorSpec]) -> list[Extractor]:
    """A worker's state: its extractors, weights loaded once for all its shards."""
    from ..extract import build_extractor

    return [build_extractor(name, conf, kind) for kind, name, conf in specs]


def extract_shard(extractors: list[Extractor], dataset: Dataset | str, store_names: list[str | None],
                  images: list[str] | None, shard_dir: str | None, image_options: ImageOptions, overwrite: bool,
                  learning: Progress | None, sharded: bool | None, *, threads: int | None = None,
                  progress: Progress | None = None) -> list[ExtractReport]:
    """One shard: :func:`cbir.extract.extract_all` of ``images`` into the stores under
    ``shard_dir`` (None: the final stores, ``sharded`` as the executor says)."""
    from ..extract import extract_all

    return extract_all(extractors, opened(dataset), store_names=store_names, images=images, overwrite=overwrite,
                       num_workers=threads, progress=progress, image_options=image_options,
                       store_dir=Path(shard_dir) if shard_dir else None, learning=learning, sharded=sharded)


def add_report(report: ExtractReport, shard: ExtractReport) -> None:
    """A shard's report added into the step's."""
    report.weights_note = report.weights_note or shard.weights_note
    report.keypoints += shard.keypoints
    report.failed += shard.failed
    report.empty += shard.empty
    for key, value in shard.seconds.items():
        report.seconds[key] = report.seconds.get(key, 0.0) + value

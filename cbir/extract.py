"""Run local and global extractors over a dataset into stores (``cbir extract``).

Images are decoded ahead by a thread pool (OpenCV and Pillow release the GIL) while the
extractor works on the current one, and a writer thread checks and stores each output
while the next image is extracted, so a GPU does not wait on decoding or writing.
Results are appended to the store in batches, so an interrupted run resumes where it
stopped and memory stays bounded by the prefetch window, the writer's queue and one
batch. Unreadable images are reported and skipped, never fatal.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import plugins
from .cores import MAX_WORKERS
from .devices import default_workers
from .errors import CbirError
from .io.dataset import Dataset
from .io.images import LoadedImage, read_image
from .io.store import StoreWriter
from .io.textfile import read_utf8, split_lines
from .models.base import Extractor, GlobalExtractor, ImageSkipped, LocalExtractor

WRITE_AHEAD = 8  # outputs waiting for the writer thread at most (bounds memory)


@dataclass
class ExtractReport:
    path: Path
    extracted: int = 0
    already_present: int = 0
    keypoints: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)
    empty: list[str] = field(default_factory=list)  # images with no keypoint
    #: where the weights came from, when the extractor says (a converted file's source)
    weights_note: str = ""
    #: wall-clock seconds of the main thread: waiting for decoded images, extracting, waiting
    #: for the writer thread (shared by the extractors of one pass, except extracting)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("decoding", "extraction",
                                                                            "writing"), 0.0))

    @property
    def bound_by(self) -> str:
        """The phase the run spent most of its time in (waiting for)."""
        return max(self.seconds, key=self.seconds.__getitem__)


def extractor_class(name: str, kind: str = "local") -> type[Extractor]:
    """The class of the installed extractor ``name`` of ``kind`` (local or global), or of a
    ``module:Class`` path (:mod:`cbir.plugins`)."""
    cls = plugins.load(kind, name)
    base = GlobalExtractor if kind == "global" else LocalExtractor
    if not (isinstance(cls, type) and issubclass(cls, base) and isinstance(getattr(cls, "name", None), str)):
        raise CbirError(f"the {plugins.LABELS[kind]} {name!r} is {cls!r}, not a subclass of "
                        f"cbir.models.base.{base.__name__} with a name")
    return cls


def build_extractor(name: str, conf: dict[str, Any] | None = None, kind: str = "local") -> Extractor:
    return extractor_class(name, kind)(conf)


def extractor_conf(kind: str, name: str, options: dict[str, Any], weights: str | Path | None,
                   device: str) -> dict[str, Any]:
    """The options of ``options`` that extractor ``name`` knows, plus the device and the weights
    (a file, or a directory to look the default file up in)."""
    cls = extractor_class(name, kind)
    conf = {k: v for k, v in options.items() if k in cls.default_conf}
    if "device" in cls.default_conf:
        conf["device"] = device
    if weights is not None and "weights" in cls.default_conf:
        conf["weights_dir" if Path(weights).is_dir() else "weights"] = str(weights)
    return conf


def read_image_list(path: str | Path, known: Iterable[str]) -> list[str]:
    """Image names, one a line (``#`` comments allowed); each must be in the dataset."""
    path = Path(path)
    lines = split_lines(read_utf8(path, "image list"))
    known = set(known)
    names = []
    for i, line in enumerate(lines, 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if name not in known:
            raise CbirError(f"image {name!r} is not in records_camera.txt", path, i)
        names.append(name)
    return names


def _prefetch(load: Callable[[str], LoadedImage], names: list[str],
              workers: int) -> Iterator[tuple[str, LoadedImage | CbirError]]:
    """Yield (name, image or the error reading it) in order, decoding ``2 * workers`` ahead."""
    def task(name: str) -> LoadedImage | CbirError:
        try:
            return load(name)
        except CbirError as e:
            return e

    if workers <= 0:
        for n in names:
            yield n, task(n)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="cbir-decode") as pool:
        window: deque[tuple[str, Future]] = deque()
        it = iter(names)
        for n in it:
            window.append((n, pool.submit(task, n)))
            if len(window) >= 2 * workers:
                break
        while window:
            n, fut = window.popleft()
            nxt = next(it, None)
            if nxt is not None:
                window.append((nxt, pool.submit(task, nxt)))
            yield n, fut.result()


@dataclass(frozen=True)
class ImageOptions:
    """How images are read: ``apply_exif`` rotates by the EXIF orientation first (recorded in
    the store's configuration, since it changes the features); ``max_pixels`` refuses larger
    images before decoding (None: $CBIR_MAX_IMAGE_PIXELS or 2^28)."""

    apply_exif: bool = False
    max_pixels: int | None = None


def main(extractor: Extractor, dataset: Dataset, *, store_name: str | None = None,
         images: list[str] | None = None, overwrite: bool = False, num_workers: int | None = None,
         progress: Callable[[int, int], None] | None = None,
         image_options: ImageOptions = ImageOptions()) -> ExtractReport:
    """Extract ``images`` (default: every image of records_camera.txt) of ``dataset`` into its
    local or global store (by the extractor's kind)."""
    return extract_all([extractor], dataset, store_names=[store_name], images=images, overwrite=overwrite,
                       num_workers=num_workers, progress=progress, image_options=image_options)[0]


def extract_all(extractors: Sequence[Extractor], dataset: Dataset, *,
                store_names: Sequence[str | None] | None = None, images: list[str] | None = None,
                overwrite: bool = False, num_workers: int | None = None,
                progress: Callable[[int, int], None] | None = None,
                image_options: ImageOptions = ImageOptions(), store_dir: Path | None = None,
                learning: Callable[[int, int], None] | None = None,
                sharded: bool | None = None) -> list[ExtractReport]:
    """Run several extractors over ``dataset``, one report each (in order).

    Extractors that read images the same way run in one pass: each image is decoded once,
    and extractors of one network (DELG local and global) compute it once
    (:meth:`Extractor.share_pass`). Each store resumes on its own: an image is processed
    for the extractors whose store lacks it. ``store_dir`` (default: the dataset's
    ``cbir/``) holds the stores as ``<store_dir>/<local|global>/<name>.h5`` (a cluster's
    shards, :mod:`cbir.distributed`). ``learning(advance, total)``: the progress of a model
    learned on the dataset first (DenseVLAD's vocabulary and PCA on the map), before any image
    is extracted. ``sharded``: the images extracted now become a new part of each (sharded)
    store (None: each store stays as it is; formats/SPEC.md 5b).
    """
    extractors = list(extractors)
    names_ = list(store_names) if store_names is not None else [None] * len(extractors)
    if len(names_) != len(extractors):
        raise ValueError("one store name (or None) per extractor")
    for i, a in enumerate(extractors):
        for b in extractors[i + 1:]:
            a.share_pass(b)
    names = images if images is not None else sorted(dataset.sensors.image_names())
    store_names_ = [n or e.default_store_name() for e, n in zip(extractors, names_, strict=True)]
    outs = []
    for extractor, store_name in zip(extractors, store_names_, strict=True):
        kind = store_kind(extractor)
        out = store_dir / kind / f"{store_name}.h5" if store_dir is not None else dataset.store_path(kind, store_name)
        out.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(extractor, GlobalExtractor):  # a model learned on the map (DenseVLAD's), before any pass
            extractor.prepare(out, names, image_loader(dataset, extractor, image_options), overwrite=overwrite,
                              progress=learning)
        outs.append(out)
    passes: dict[tuple[bool, int | None], list[int]] = {}
    for i, e in enumerate(extractors):
        passes.setdefault((e.grayscale, e.loader_max_size), []).append(i)
    reports: dict[int, ExtractReport] = {}
    n_passes = len(passes)
    step = (lambda advance, total: progress(advance, total * n_passes)) if progress else None
    for members in passes.values():
        done = _extract_pass([extractors[i] for i in members], [store_names_[i] for i in members],
                             [outs[i] for i in members], dataset, names, overwrite, num_workers, step, image_options,
                             sharded)
        reports.update(zip(members, done, strict=True))
    for i, extractor in enumerate(extractors):
        reports[i].weights_note = getattr(extractor, "weights_note", "")
    return [reports[i] for i in range(len(extractors))]


def image_loader(dataset: Dataset, extractor: Extractor, image_options: ImageOptions) -> Callable[[str], LoadedImage]:
    """``load(name)``: an image of ``dataset`` as ``extractor`` reads it (gray or colour, its
    loader's size limit) with ``image_options``."""
    def load(name: str) -> LoadedImage:
        return read_image(dataset.image_path(name), grayscale=extractor.grayscale, max_size=extractor.loader_max_size,
                          apply_exif=image_options.apply_exif, max_pixels=image_options.max_pixels)
    return load


def store_kind(extractor: Extractor) -> str:
    """``local`` or ``global``: the folder of the extractor's stores."""
    return "global" if isinstance(extractor, GlobalExtractor) else "local"


def store_attributes(extractor: Extractor, store_name: str, image_options: ImageOptions) -> dict[str, Any]:
    """The attributes (name, config, ...) of the store ``extractor`` writes."""
    out = extractor.store_attrs(store_name)
    if image_options.apply_exif:  # only then: stores of the default stay comparable across versions
        out["config"] = {**out["config"], "exif_orientation": "apply"}
    return out


def _extract_pass(extractors: list[Extractor], store_names: list[str], outs: list[Path], dataset: Dataset,
                  names: list[str], overwrite: bool, num_workers: int | None,
                  progress: Callable[[int, int], None] | None, image_options: ImageOptions,
                  sharded: bool | None = None) -> list[ExtractReport]:
    load = image_loader(dataset, extractors[0], image_options)

    def attrs(extractor: Extractor, store_name: str) -> dict[str, Any]:
        return store_attributes(extractor, store_name, image_options)

    reports = [ExtractReport(out) for out in outs]
    with ExitStack() as stack:
        writers = [stack.enter_context(StoreWriter(
            out, "global-features" if isinstance(e, GlobalExtractor) else "local-features",
            attrs(e, n), overwrite=overwrite, batch_size=64, sharded=sharded))
            for e, n, out in zip(extractors, store_names, outs, strict=True)]
        missing = [{n for n in names if n not in w} for w in writers]
        for report, absent in zip(reports, missing, strict=True):
            report.already_present = len(names) - len(absent)
        todo = [n for n in names if any(n in m for m in missing)]
        if progress:
            progress(len(names) - len(todo), len(names))
        workers = default_workers() if num_workers is None else min(num_workers, MAX_WORKERS)
        # the stores are written by one thread (in order) while the next image is extracted
        waits = {"decoding": 0.0, "writing": 0.0}
        with ThreadPoolExecutor(1, thread_name_prefix="cbir-write") as write_pool:
            writing: deque[Future] = deque()
            images = _prefetch(load, todo, workers)
            while True:
                t0 = time.perf_counter()
                item = next(images, None)
                waits["decoding"] += time.perf_counter() - t0
                if item is None:
                    break
                name, image = item
                wanted = [i for i, m in enumerate(missing) if name in m]
                if isinstance(image, CbirError):
                    for i in wanted:
                        reports[i].failed.append((name, image.message))
                else:
                    for i in wanted:
                        extractors[i].begin_image([extractors[j] for j in wanted])
                    for i in wanted:
                        t0 = time.perf_counter()
                        try:
                            out = extractors[i].extract(image)
                        except ImageSkipped as e:  # the image is not one this extractor can describe
                            reports[i].failed.append((name, e.message))
                            continue
                        finally:
                            reports[i].seconds["extraction"] += time.perf_counter() - t0
                        writing.append(write_pool.submit(_store_one, extractors[i], writers[i], reports[i], name,
                                                         out, image.original_size))
                t0 = time.perf_counter()
                while len(writing) > WRITE_AHEAD or (writing and writing[0].done()):
                    writing.popleft().result()  # an error in the writer stops the run here
                waits["writing"] += time.perf_counter() - t0
                if progress:
                    progress(1, len(names))
            t_end = time.perf_counter()
            while writing:
                writing.popleft().result()
    waits["writing"] += time.perf_counter() - t_end  # the last outputs and the stores' merge
    for report in reports:
        report.seconds.update(waits)
    return reports


def _store_one(extractor: Extractor, writer: StoreWriter, report: ExtractReport, name: str,
               out: np.ndarray | dict[str, np.ndarray], original_size: tuple[int, int]) -> None:
    """Check and write one image's output (in the writer thread)."""
    if isinstance(extractor, GlobalExtractor):
        assert isinstance(out, np.ndarray)
        _check_features({"descriptors": out}, name)
        if not np.any(out):  # nothing to aggregate (e.g. smaller than DenseVLAD's grid)
            report.failed.append((name, "no descriptor could be computed (image too small or blank?)"))
            return
        writer.add(name, descriptors=out)
        report.extracted += 1
        return
    assert isinstance(out, dict)
    _check_features(out, name)
    n = len(out["keypoints"])
    if n == 0:
        report.empty.append(name)
    writer.add(name, image_sizes=np.array(original_size, np.int32), **out)
    report.extracted += 1
    report.keypoints += n


def _check_features(feats: dict[str, np.ndarray], name: str) -> None:
    for key in ("keypoints", "descriptors"):
        if key in feats and not np.isfinite(feats[key]).all():
            raise CbirError(f"the extractor produced non-finite {key} for image {name!r}")

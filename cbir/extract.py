"""Run a local or global extractor over a dataset into a store (``cbir extract``).

Images are decoded ahead in a small thread pool (OpenCV releases the GIL) while the
extractor works on the current one; results are appended to the store in batches, so
an interrupted run resumes where it stopped and memory stays bounded by the prefetch
window and one batch. Unreadable images are reported and skipped, never fatal.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .errors import CbirError
from .io.dataset import Dataset
from .io.images import LoadedImage, read_image
from .io.store import StoreWriter
from .models import GLOBAL_EXTRACTORS, LOCAL_EXTRACTORS
from .models.base import Extractor, GlobalExtractor
from .io.textfile import read_utf8


@dataclass
class ExtractReport:
    path: Path
    extracted: int = 0
    already_present: int = 0
    keypoints: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)
    empty: list[str] = field(default_factory=list)  # images with no keypoint


def extractor_class(name: str, kind: str = "local") -> type[Extractor]:
    registry = GLOBAL_EXTRACTORS if kind == "global" else LOCAL_EXTRACTORS
    if name not in registry:
        raise CbirError(f"unknown {kind} extractor {name!r} (known: {', '.join(sorted(registry))})")
    return registry[name]


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
    lines = read_utf8(path, "image list").splitlines()
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


def main(extractor: Extractor, dataset: Dataset, *, store_name: str | None = None,
         images: list[str] | None = None, overwrite: bool = False, num_workers: int = 2,
         progress: Callable[[int, int], None] | None = None) -> ExtractReport:
    """Extract ``images`` (default: every image of records_camera.txt) of ``dataset`` into its
    local or global store (by the extractor's kind)."""
    is_global = isinstance(extractor, GlobalExtractor)
    store_name = store_name or extractor.default_store_name()
    out = dataset.store_path("global" if is_global else "local", store_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = images if images is not None else sorted(dataset.sensors.image_names())
    report = ExtractReport(out)

    def load(name: str) -> LoadedImage:
        return read_image(dataset.image_path(name), grayscale=extractor.grayscale,
                          max_size=extractor.loader_max_size)

    if is_global:  # e.g. DenseVLAD learns its vocabulary on the map, before the store is opened
        extractor.prepare(out, names, load)
    kind = "global-features" if is_global else "local-features"
    writer = StoreWriter(out, kind, extractor.store_attrs(store_name), overwrite=overwrite, batch_size=64)
    with writer:
        todo = [n for n in names if n not in writer]
        report.already_present = len(names) - len(todo)
        if progress:
            progress(report.already_present, len(names))
        for name, image in _prefetch(load, todo, num_workers):
            if isinstance(image, CbirError):
                report.failed.append((name, image.message))
            elif is_global:
                desc = extractor.extract(image)
                _check_features({"descriptors": desc}, name)
                if not np.any(desc):  # nothing to aggregate (e.g. smaller than DenseVLAD's grid)
                    report.failed.append((name, "no descriptor could be computed (image too small or blank?)"))
                else:
                    writer.add(name, descriptors=desc)
                    report.extracted += 1
            else:
                feats = extractor.extract(image)
                _check_features(feats, name)
                n = len(feats["keypoints"])
                if n == 0:
                    report.empty.append(name)
                writer.add(name, image_sizes=np.array(image.original_size, np.int32), **feats)
                report.extracted += 1
                report.keypoints += n
            if progress:
                progress(1, len(names))
    return report


def _check_features(feats: dict[str, np.ndarray], name: str) -> None:
    for key in ("keypoints", "descriptors"):
        if key in feats and not np.isfinite(feats[key]).all():
            raise CbirError(f"the extractor produced non-finite {key} for image {name!r}")

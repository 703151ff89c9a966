"""Global descriptors as retrieval reads them: several stores of one dataset aligned on the
images they all have (:class:`DescriptorSet`), read as unit-L2 float32 rows with the same
bits on every machine, or replaced by descriptors held in memory (expanded, augmented)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import exact
from ..errors import CbirError
from ..hashing.model import code_bits, is_code_store, signs
from ..io.dataset import Dataset, model_path
from ..io.provenance import differences
from ..io.store import Store, image_keys, open_store


@contextmanager
def open_descriptor_sets(query: Dataset, map_: Dataset,
                         names: list[str]) -> Iterator[tuple[DescriptorSet, DescriptorSet]]:
    """The global stores ``names`` of the query and the map, each aligned on the images its
    dataset records (one set of stores when both are one dataset); closed after."""
    same = query.root.resolve() == map_.root.resolve()
    with ExitStack() as stack:
        qstores = [stack.enter_context(open_store(query.store_path("global", n), "global-features")) for n in names]
        mstores = qstores if same else \
            [stack.enter_context(open_store(map_.store_path("global", n), "global-features")) for n in names]
        for store in (*qstores, *mstores):
            metric = store.config.get("metric_type") or "L2"
            if metric == "Hamming":
                code_bits(store)  # read as +-1 vectors (DescriptorSet.read_raw): a malformed header is refused
            elif metric != "L2":
                raise CbirError(f"descriptors compared by {metric} distance cannot be searched by cbir retrieve",
                                store.path)
        yield (DescriptorSet.align(qstores, query.sensors.image_names()),
               DescriptorSet.align(mstores, map_.sensors.image_names()))


def mismatch_message(query_store: Store, map_store: Store) -> str:
    """Why descriptors of two stores do not compare, and the command that fixes it."""
    diffs = differences(query_store.config, map_store.config)
    extractor = map_store.config.get("extractor", query_store.attrs.get("name"))
    if "model_digest" in map_store.config:  # a model learned on the map (DenseVLAD)
        model = model_path(map_store.path)
        fix = f"re-extract the queries with the map's model: cbir extract QUERY --global {extractor} --model {model} " \
              "--overwrite"
    else:
        fix = f"re-extract the queries (or the map) with the same options: cbir extract ... --global {extractor} " \
              "--conf KEY=VALUE --overwrite"
    return (f"extracted with another configuration than {map_store.path} ({'; '.join(diffs)}): descriptors of "
            f"different models cannot be compared; {fix}")


@dataclass
class DescriptorSet:
    """Several global stores of one dataset, aligned on the images they all have."""

    stores: list[Store]
    names: list[str]
    rows: list[np.ndarray]  # per store: the row of each name
    dropped: list[str] = field(default_factory=list)  # images missing from some store
    #: in-memory unit descriptors replacing the stores' (query expansion, database augmentation)
    arrays: list[np.ndarray] | None = None
    #: images in the stores but not in the dataset (a feature folder shared by several datasets)
    foreign: list[str] = field(default_factory=list)

    @classmethod
    def align(cls, stores: list[Store], images: Iterable[str] | None = None) -> DescriptorSet:
        """The images every store has; with ``images`` (the dataset's records), only those: a
        store may hold descriptors of images of another dataset, which must not be retrieved."""
        first = image_keys(stores[0].names)
        if all(s.names == first for s in stores[1:]):  # the same images in the same order: rows as stored
            if images is None:  # 0.04 s instead of 0.8 s for a million images
                return cls(stores, list(first), [np.arange(len(first)) for _ in stores], [])
            known = np.fromiter(map(set(images).__contains__, first), bool, len(first))
            keep = np.flatnonzero(known)
            return cls(stores, [first[i] for i in keep.tolist()], [keep.copy() for _ in stores], [],
                       foreign=sorted(first[i] for i in np.flatnonzero(~known).tolist()))
        common = set(image_keys(stores[0].names))
        for s in stores[1:]:
            common &= set(image_keys(s.names))
        everything: set[str] = set().union(*(set(image_keys(s.names)) for s in stores))
        foreign: set[str] = set()
        if images is not None:
            known_names = set(images)
            foreign = everything - known_names
            common &= known_names
            everything &= known_names
        names = [n for n in image_keys(stores[0].names) if n in common]
        dropped = sorted(everything - common)
        rows = [np.array([s.index(n) for n in names], dtype=np.int64) for s in stores]
        return cls(stores, names, rows, dropped, foreign=sorted(foreign))

    def with_arrays(self, arrays: list[np.ndarray]) -> DescriptorSet:
        return DescriptorSet(self.stores, self.names, self.rows, self.dropped, arrays, self.foreign)

    def subset(self, index: np.ndarray | Sequence[int]) -> DescriptorSet:
        """The images at ``index`` (a sample of queries, a shard of the map), in that order."""
        index = np.asarray(index, dtype=np.int64)
        return DescriptorSet(self.stores, [self.names[i] for i in index], [r[index] for r in self.rows], [],
                             [a[index] for a in self.arrays] if self.arrays is not None else None)

    @property
    def whole(self) -> bool:
        """Whether these are every image of each store, in stored order (the usual case)."""
        return all(len(r) == len(store.names) and np.array_equal(r, np.arange(len(r)))
                   for store, r in zip(self.stores, self.rows, strict=True))

    def fingerprints(self) -> list[str | list[str]]:
        """What identifies each store's descriptors of these images (its fingerprint, or where
        these are some images of a sharded store, those of the parts holding them): with the
        names, what an index built from them was built from."""
        return [store.fingerprint_of_rows(rows) for store, rows in zip(self.stores, self.rows, strict=True)]

    def part_bounds(self) -> list[int]:
        """Where, in these images' order, the part of any store changes (0 and the count included)."""
        bounds = {0, len(self.names)}
        for store, rows in zip(self.stores, self.rows, strict=True):
            part = np.searchsorted(store.part_starts(), rows, side="right") - 1
            bounds.update((np.flatnonzero(np.diff(part)) + 1).tolist())
        return sorted(bounds)

    @property
    def dims(self) -> list[int]:
        """Each store's descriptor dimension (a code store's: its bits)."""
        return [code_bits(s) if is_code_store(s) else s.dataset("descriptors").shape[1] for s in self.stores]

    def read(self, start: int, stop: int, device: torch.device) -> list[torch.Tensor]:
        """Unit-L2 float32 descriptors of images ``start:stop``, one tensor per store."""
        return self.take(np.arange(start, stop), device)

    def take(self, index: np.ndarray, device: torch.device) -> list[torch.Tensor]:
        """Unit-L2 float32 descriptors of the images at ``index``, one tensor per store."""
        return [t.to(device) for t in self.take_host(index)]

    def take_host(self, index: np.ndarray) -> list[torch.Tensor]:
        """:meth:`take` in host memory; a zero or non-finite descriptor is an error."""
        return self.units(self.read_raw(index), index)

    def units(self, raw: list[np.ndarray], index: np.ndarray) -> list[torch.Tensor]:
        """:meth:`read_raw`'s rows as :meth:`take_host` gives them: those held in memory as
        they are (unit rows already), stored ones :meth:`normalized`."""
        if self.arrays is not None:
            return [torch.as_tensor(r) for r in raw]
        return self.normalized(raw, index)

    def read_raw(self, index: np.ndarray) -> list[np.ndarray]:
        """The descriptors of the images at ``index`` as stored (unchecked), or as held in
        memory where they replace the stored ones (expanded, augmented)."""
        if self.arrays is not None:
            return [a[index] for a in self.arrays]
        return [_readable(store, store.read_rows("descriptors", rows[index]))
                for store, rows in zip(self.stores, self.rows, strict=True)]

    def normalized(self, raw: list[np.ndarray], index: np.ndarray) -> list[torch.Tensor]:
        """:meth:`read_raw`'s descriptors as unit-L2 float32 tensors, the same bits on every
        machine (:func:`cbir.exact.unit_rows`); a zero or non-finite descriptor is an error."""
        return [exact.unit_rows(as_float32(r), n) for r, n in zip(raw, self.norms(raw, index), strict=True)]

    def norms(self, raw: list[np.ndarray], index: np.ndarray) -> list[torch.Tensor]:
        """The L2 norms of :meth:`read_raw`'s descriptors (:func:`cbir.exact.norms`);
        a zero or non-finite descriptor is an error."""
        out = []
        for store, r in zip(self.stores, raw, strict=True):
            norms = exact.norms(as_float32(r))  # NaN and inf propagate into the norm
            finite = torch.isfinite(norms)
            bad = ~finite | (norms == 0)
            if bad.any():
                i = int(bad.nonzero()[0, 0])
                what = "non-finite descriptor" if not finite[i] else "zero descriptor"
                hint = ": it cannot be compared" if finite[i] else ""
                raise CbirError(f"{what} for image {self.names[int(index[i])]!r}{hint}", store.path)
            out.append(norms)
        return out


def _readable(store: Store, rows: np.ndarray) -> np.ndarray:
    """Stored rows as retrieval compares them: binary codes (metric_type Hamming) as +-1
    vectors, whose cosine ranks as their Hamming distance (formats/SPEC.md 7a); others as
    stored."""
    return signs(rows, code_bits(store)) if is_code_store(store) else rows


def as_float32(array: np.ndarray) -> torch.Tensor:
    """A host array as a float32 tensor, sharing its memory when it is float32 already."""
    return torch.from_numpy(array.astype(np.float32, copy=False))

"""Compact faiss indexes for large maps, and fused retrieval over their candidates.

Each descriptor gets its own index (``flat``: exact inner product; ``ivf``: inverted
lists; ``ivfpq``: inverted lists with product quantization; ``lsh``: binary codes from
the signs of a random rotation with trained thresholds, compared by Hamming distance).
Every query takes the top ``candidates`` of each index; the union is rescored exactly
(true cosine similarities of every descriptor, fused with the chosen operator), so only
images missing from every index's candidates are lost: :func:`recall_against_exact`
measures how many.

Indexes are built once and kept (``cbir index build``): ``MAP/cbir/index/<stores>.<kind>.h5``
holds the serialized faiss indexes and a record of what they were built from (the index
options, the stores by name and fingerprint, the digest of the aligned image names).
``cbir retrieve --index KIND`` uses the file when its record matches, refuses it when the
stores or options changed since (rebuild with ``--overwrite``), and builds the indexes in
memory for this call only when there is none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import exact
from ..errors import CbirError, FormatError
from ..io.atomic import WriteLock
from ..io.child import in_child
from ..io.hdf5 import timeout_s
from ..io.index_file import IndexBytes, index_bytes, read_index_attrs, read_index_record, write_index_file
from ..io.pairs import Pair
from ..io.provenance import differences, digest_names
from ..validate import check_integer
from .conf import RetrievalConf
from .descriptors import DescriptorSet
from .fusion import fuse, nan_last
from .names import INDEX_KINDS, MAX_LSH_BITS
from .ranking import pairs_from_topk, ranked
from .runtime import StepClock, intra_op_threads, read_ahead
from .search import bounded, error_bound, exact_scores, retrieve

if TYPE_CHECKING:
    import faiss

#: ivfpq: maps of this many images get 4-bit fast-scan codes (39 training points for each
#: of 16 centroids); smaller ones fewer-bit classic codes
FAST_SCAN_MIN_IMAGES = 16 * 39
#: faiss's default wish of training points per centroid (its ClusteringParameters)
FAISS_POINTS_PER_CENTROID = 39
READ_PIECE = 1 << 24  # bytes read at once when loading a kept index
#: memory a kept index may need beyond twice its file's size while faiss reads it (its
#: objects, the inverted lists' tables): more means the header claims what the file lacks
INDEX_READ_SLACK = 256 << 20
#: queries rescored together: each block multiplies its queries by the union of their
#: candidates, so the wasted products grow with the block (1M map, 1,000 queries of 2048-D,
#: 100 candidates: 0.115 s of products in blocks of 64, 0.074 s in blocks of 16)
RESCORE_BLOCK = 16


@dataclass(frozen=True)
class IndexConf:
    kind: str = "ivf"
    candidates: int = 100  # per descriptor and query, rescored exactly
    nlist: int | None = None  # ivf, ivfpq: default 4 * sqrt(map size)
    nprobe: int = 16
    pq_m: int = 0  # ivfpq: sub-quantizers of 4 bits (default: dim / 8, dividing dim)
    lsh_bits: int = 0  # lsh: code length (default: 2 * dim)
    train_size: int = 100_000
    chunk: int = 16384
    seed: int = 0
    search_block: int = 4096  # queries per faiss call (query time)

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise CbirError(f"unknown index {self.kind!r} (known: {', '.join(INDEX_KINDS)})")
        for name, low, high in (("candidates", 1, None), ("nprobe", 1, None), ("pq_m", 0, None),
                                ("lsh_bits", 0, MAX_LSH_BITS), ("train_size", 1, None), ("chunk", 1, None),
                                ("search_block", 1, None)):
            check_integer(name, getattr(self, name), low, high)
        if self.nlist is not None:
            check_integer("nlist", self.nlist, 1)


#: the record's ``names`` for an index of every image of its stores in stored order: the
#: stores' fingerprints (checksums of their keys) fix those names, so they are not digested
#: again on every retrieve (0.06 s at a million images)
WHOLE_STORES = "every image of the stores, in stored order"


def index_record(database: DescriptorSet, conf: IndexConf) -> dict[str, Any]:
    """What an index is built from: its options (not the query-time ones), the stores by
    name and fingerprint, and the image names it holds, in order (:data:`WHOLE_STORES`, or
    their digest where the map is some of its stores' images)."""
    return {"config": {"kind": conf.kind, "nlist": conf.nlist, "pq_m": conf.pq_m, "lsh_bits": conf.lsh_bits,
                       "train_size": conf.train_size, "seed": conf.seed,
                       "pq_layout": pq_layout(len(database.names)) if conf.kind == "ivfpq" else None},
            "stores": [s.attrs.get("name") for s in database.stores],
            "fingerprints": database.fingerprints(),
            "images": len(database.names),
            "names": WHOLE_STORES if database.whole else digest_names(database.names)}


def record_differences(found: dict[str, Any], wanted: dict[str, Any], database: DescriptorSet) -> list[str]:
    """How the kept record ``found`` differs from ``wanted``, the :func:`index_record` of
    ``database`` (an index kept with the digest of the names its stores fix is the same)."""
    if wanted["names"] == WHOLE_STORES and found.get("names") != WHOLE_STORES:
        wanted = {**wanted, "names": digest_names(database.names)}
    return differences(found, wanted)


def pq_layout(n: int) -> str:
    """The codes of an ``ivfpq`` index of ``n`` images (in its record: a file kept from an
    earlier layout is rebuilt, not reused)."""
    return "4-bit fast-scan" if n >= FAST_SCAN_MIN_IMAGES else f"{_small_map_bits(n)}-bit"


def _small_map_bits(n: int) -> int:
    return max(1, int(np.log2(max(n // 39, 2))))  # a small map trains fewer centroids


def save_indexes(path: Path, indexes: list[faiss.Index], record: dict[str, Any]) -> None:
    """``indexes`` and their record kept at ``path`` (each index in a faiss file of its own)."""
    import faiss  # imported where used: commands that never build an index start without it

    def writer(index: faiss.Index) -> Callable[[Path], None]:
        return lambda file: faiss.write_index(index, str(file))

    write_index_file(path, [writer(index) for index in indexes], record)


def load_indexes(path: Path, database: DescriptorSet, conf: IndexConf) -> list[faiss.Index]:
    """The kept indexes of ``path``, refused unless they were built from ``database`` with
    ``conf``'s options."""
    # imported before the record is read in a forked child: after a fork every page the
    # parent writes first faults (copy-on-write), and importing faiss writes many (1M-image
    # query: 0.15 s more when faiss was imported after the record was read)
    import faiss  # noqa: F401

    record = index_record(database, conf)
    attrs = read_index_attrs(path)
    try:
        return _load(path, attrs, record, database, conf)
    except FormatError:
        fresh = read_index_attrs(path)
        if fresh == attrs:
            raise
        # rebuilt since its record was read, which removed the files it named: the new build
        return _load(path, fresh, record, database, conf)


def _load(path: Path, attrs: dict[str, Any], record: dict[str, Any], database: DescriptorSet,
          conf: IndexConf) -> list[faiss.Index]:
    diffs = record_differences(read_index_record(path, attrs), record, database)
    if diffs:
        stores = ",".join(record["stores"])
        raise CbirError(f"built from other stores or options than asked ({'; '.join(diffs)}): rebuild it with "
                        f"cbir index build MAP --global {stores} --index {record['config']['kind']} --overwrite", path)
    located = index_bytes(path, len(record["stores"]), attrs)
    indexes = [_read_index(where) for where in located]
    for index, where, dim in zip(indexes, located, database.dims, strict=True):
        problem = structure_problem(index, conf.kind, dim, len(database.names), conf)
        if problem:
            raise FormatError(f"is not the index its record describes ({problem}): rebuild it with cbir index build "
                              "... --overwrite", where.file)
        if hasattr(index, "nprobe"):
            index.nprobe = conf.nprobe
    return indexes


def keep_indexes(path: Path, database: DescriptorSet, conf: IndexConf, overwrite: bool = False,
                 device: torch.device = torch.device("cpu")) -> str:
    """Build the indexes of ``database`` and write them to ``path`` (atomically), unless the
    file there was built from the same stores and options: ``new``, ``kept`` or ``rebuilt``.
    A file built from other stores or options is refused unless ``overwrite``."""
    record = index_record(database, conf)
    status = "new"
    with WriteLock(path):  # a second build of the same file waits for nothing: it is refused
        if path.exists():
            diffs = record_differences(read_index_record(path), record, database)
            if not diffs:
                return "kept"
            if not overwrite:
                raise CbirError(f"exists, built from other stores or options ({'; '.join(diffs)}): pass --overwrite "
                                "to rebuild it", path)
            status = "rebuilt"
        save_indexes(path, build_indexes(database, conf, device), record)
    return status


def kept_or_built(path: Path, database: DescriptorSet, conf: IndexConf,
                  device: torch.device = torch.device("cpu")) -> tuple[list[faiss.Index], bool]:
    """The indexes kept at ``path`` (refused unless built from ``database`` with ``conf``),
    else built for this call: ``(indexes, built_now)``."""
    if path.exists():
        return load_indexes(path, database, conf), False
    return build_indexes(database, conf, device), True


def _read_index(where: IndexBytes) -> faiss.Index:
    """The index serialized at ``where``, once a child process read it within a memory budget
    (twice its size, plus :data:`INDEX_READ_SLACK`): faiss allocates what a file's header
    claims (a 295 KB file can claim 2^25 inverted lists), so a crafted file fails there, not
    here. A faiss file of its own is mapped into memory, its inverted lists used in place
    (1M-image ivfpq: 0.08 s instead of 0.1-0.2 s reading and copying 170 MB); one inside a
    format-1.0 file is read through a buffered file, since faiss asks for each inverted list
    separately (16k small reads at 1M images)."""
    status, message = in_child(_readable, (where,), timeout_s(), memory=2 * where.size + INDEX_READ_SLACK)
    if status != "ok":
        why = "it claims more memory than its size allows" if status == "memory" else \
            "reading it did not finish" if status == "timeout" else str(message)[:200]
        raise FormatError(f"cannot read the index ({why}): the file is corrupt; rebuild it with cbir index build "
                          "... --overwrite", where.file)
    return _load_index_bytes(where)


def _readable(where: IndexBytes) -> None:
    """Runs in the child of :func:`_read_index`: faiss reads the index, or fails."""
    _load_index_bytes(where)


def _load_index_bytes(where: IndexBytes) -> faiss.Index:
    import faiss

    try:
        if where.offset == 0 and where.file.suffix == ".faiss":
            return faiss.read_index(str(where.file), faiss.IO_FLAG_MMAP_IFC)
        with open(where.file, "rb", buffering=READ_PIECE) as f:
            f.seek(where.offset)
            end = where.offset + where.size

            def read(n: int) -> bytes:  # never past the index's own bytes
                return f.read(min(n, end - f.tell()))

            return faiss.read_index(faiss.PyCallbackIOReader(read, READ_PIECE))  # type: ignore[attr-defined]  # not in faiss's stubs
    except RuntimeError as e:
        raise FormatError(f"cannot read the index ({str(e).splitlines()[0][:200]}): the file is corrupt",
                          where.file) from None


def structure_problem(index: faiss.Index, kind: str, dim: int, n: int, conf: IndexConf) -> str | None:
    """What differs between a kept index and the one :func:`build_indexes` makes of ``n``
    images of ``dim`` dimensions with ``conf`` (class, dimension, metric, images, inverted
    lists and their quantizer, code layout), or None. A file of another kind or metric than
    its record says would search wrongly without an error."""
    import faiss

    fresh = _factory(kind, dim, n, conf)
    if type(index) is not type(fresh):
        return f"a {type(index).__name__}, where a {kind} index is a {type(fresh).__name__}"
    for what, found, wanted in (("dimension", index.d, fresh.d), ("metric", index.metric_type, fresh.metric_type),
                                ("images", index.ntotal, n), ("inverted lists", getattr(index, "nlist", None),
                                                              getattr(fresh, "nlist", None)),
                                ("LSH bits", getattr(index, "nbits", None), getattr(fresh, "nbits", None))):
        if found != wanted:
            return f"{what} {found}, expected {wanted}"
    pq, fresh_pq = getattr(index, "pq", None), getattr(fresh, "pq", None)
    if pq is not None and (fresh_pq is None or (pq.M, pq.nbits) != (fresh_pq.M, fresh_pq.nbits)):
        wanted = f"{fresh_pq.M}x{fresh_pq.nbits} bits" if fresh_pq is not None else "none"
        return f"product quantizer {pq.M}x{pq.nbits} bits, expected {wanted}"
    if isinstance(index, faiss.IndexIVF):
        quantizer = faiss.downcast_index(index.quantizer)
        if not isinstance(quantizer, faiss.IndexFlat) or quantizer.d != dim or quantizer.ntotal != index.nlist:
            return "its coarse quantizer is not a flat index of one centroid per inverted list"
        centroids = faiss.rev_swig_ptr(quantizer.get_xb(), quantizer.ntotal * dim)
        if not np.isfinite(centroids).all():
            return "its coarse quantizer holds NaN or infinite centroids"
        if pq is not None and not np.isfinite(faiss.vector_to_array(pq.centroids)).all():
            return "its product quantizer holds NaN or infinite centroids"
    return None


def _nlist(n: int, conf: IndexConf) -> int:
    """Inverted lists of an ivf/ivfpq index of ``n`` images: ``conf.nlist``, else 4 sqrt(n)
    with at least 39 images a list (faiss's k-means wish)."""
    return conf.nlist or max(1, min(n // FAISS_POINTS_PER_CENTROID, int(4 * np.sqrt(n))))


def _factory(kind: str, dim: int, n: int, conf: IndexConf) -> faiss.Index:
    import faiss
    nlist = _nlist(n, conf)
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "ivf":
        return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    if kind == "ivfpq":
        m = conf.pq_m or next(d for d in (dim // 8, dim // 4, dim // 2, dim) if d and dim % d == 0)
        if dim % m:
            raise CbirError(f"--pq-m {m} does not divide the descriptor dimension {dim}")
        if n >= FAST_SCAN_MIN_IMAGES:
            # 4-bit codes scanned from SIMD registers: 3-4x faster to search and to fill than
            # 8-bit codes of the same size (dim/8 half-bytes = dim/16 bytes), same recall
            return faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(dim), dim, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
        return faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, _small_map_bits(n), faiss.METRIC_INNER_PRODUCT)
    if kind == "lsh":
        return faiss.IndexLSH(dim, conf.lsh_bits or min(2 * dim, MAX_LSH_BITS), True, True)
    raise CbirError(f"unknown index {kind!r} (known: {', '.join(INDEX_KINDS)})")


def _quiet_clustering(index: faiss.Index) -> None:
    """No faiss line per k-means ("please provide at least N training points": one for each of
    an ivfpq's sub-quantizers, a thousand on a small map); :func:`sparse_training` says it
    once. Only that warning depends on this threshold: the training is the same."""
    import faiss

    if isinstance(index, faiss.IndexIVF):
        index.cp.min_points_per_centroid = 1
    pq = getattr(index, "pq", None)
    if isinstance(pq, faiss.ProductQuantizer):
        pq.cp.min_points_per_centroid = 1


def sparse_training(kind: str, n: int, conf: IndexConf) -> str | None:
    """One line when the ``kind`` index of ``n`` images trains its quantizers on fewer points
    than faiss asks (39 a centroid), else None."""
    if kind not in ("ivf", "ivfpq"):
        return None
    trained = min(n, conf.train_size)
    pq_bits = (4 if n >= FAST_SCAN_MIN_IMAGES else _small_map_bits(n)) if kind == "ivfpq" else 0
    centroids = max(_nlist(n, conf), 2 ** pq_bits)
    wanted = centroids * FAISS_POINTS_PER_CENTROID
    if trained >= wanted:
        return None
    return (f"the {kind} quantizers ({centroids} centroids) are trained on {trained} images, where faiss asks "
            f"for {wanted}: on a map this small, --index flat (or exact search) is exact and as fast")


def build_indexes(database: DescriptorSet, conf: IndexConf, device: torch.device) -> list[faiss.Index]:
    """One trained and filled index per descriptor, streaming the map in chunks."""
    n = len(database.names)
    rng = np.random.default_rng(conf.seed)
    train_rows = np.sort(rng.choice(n, min(n, conf.train_size), replace=False))
    indexes = []
    for j, dim in enumerate(database.dims):
        index = _factory(conf.kind, dim, n, conf)
        _quiet_clustering(index)
        if not index.is_trained:
            index.train(database.take(train_rows, device)[j].cpu().numpy())
        for s in range(0, n, conf.chunk):
            index.add(database.read(s, min(n, s + conf.chunk), device)[j].cpu().numpy())
        if hasattr(index, "nprobe"):
            index.nprobe = conf.nprobe
        indexes.append(index)
    return indexes


def retrieve_indexed(query: DescriptorSet, database: DescriptorSet, rconf: RetrievalConf, iconf: IndexConf,
                     device: torch.device = torch.device("cpu"), indexes: list[faiss.Index] | None = None,
                     progress: Callable[[int, int], None] | None = None,
                     query_block: int = RESCORE_BLOCK, timings: dict[str, float] | None = None) -> list[Pair]:
    """Fused top-k over the union of each index's candidates, rescored exactly. ``timings``
    (optional) is filled with the seconds spent asking the indexes for candidates, reading
    the candidates' descriptors (on a GPU, while it scores), scoring them (products, norms,
    fusion, top-k) and making the pairs."""
    clock = StepClock(timings, device)
    pairs: list[Pair] = []
    for q0, q1, values, indices in indexed_topk(query, database, rconf, iconf, device, indexes,
                                                query_block=query_block, clock=clock):
        with clock("pairs"):  # block by block, while the next block's rows are read
            pairs += pairs_from_topk(query.names[q0:q1], database.names, values, indices, rconf)
        if progress:
            progress(q1 - q0, len(query.names))
    return pairs


def indexed_topk(query: DescriptorSet, database: DescriptorSet, rconf: RetrievalConf, iconf: IndexConf,
                 device: torch.device = torch.device("cpu"), indexes: list[faiss.Index] | None = None,
                 width: int | None = None, query_block: int = RESCORE_BLOCK, clock: StepClock | None = None
                 ) -> Iterator[tuple[int, int, list[np.ndarray], list[np.ndarray]]]:
    """:func:`~.search.search_topk` over the indexes' candidates: ``(q0, q1, values,
    indices)`` per block of queries, the candidates of every index rescored exactly; an
    index ``-1`` (value ``-inf``) where a query has fewer candidates than ``k``. ``k`` is
    ``rconf.topk`` (less the excluded image), or ``width`` for a shard of the map. On a CPU
    of several cores torch has one thread fewer until the last block is taken (a reading
    thread holds that core), the caller's work between blocks included."""
    indexes = indexes or build_indexes(database, iconf, device)
    clock = clock or StepClock(None, device)
    nm = len(database.names)
    k = min(rconf.topk, nm - (1 if rconf.excludes_names else 0)) if width is None else min(width, nm)
    if k <= 0:
        return
    kc = min(nm, max(iconf.candidates, k + 1))
    map_index = {n: i for i, n in enumerate(database.names)} if rconf.excludes_names else {}
    round_robin = rconf.fusion.name == "round_robin"
    lists = len(indexes) if round_robin else 1

    def candidate_rows(block: tuple[int, int, list[torch.Tensor], np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """The block's candidates (its own map image and faiss's -1 dropped) and their stored
        descriptors (the bound of the query: 100k scattered rows of 8 KB at 1M images)."""
        q0, q1, _, cands = block
        self_idx = np.array([map_index.get(n, -1) for n in query.names[q0:q1]])
        cands[(cands == self_idx[:, None]) | (cands < 0)] = -1
        unique = _sorted_unique(cands[cands >= 0])
        with clock("read"):
            return unique, database.read_raw(unique) if len(unique) else []

    threads = torch.get_num_threads()
    blocks = clock.timed(_candidates(query, indexes, kc, iconf.search_block, query_block, device, threads),
                         "candidates")
    # the next block's rows are read on a thread while this one is scored: on a GPU, and on
    # a CPU of several cores, one of them left to the reads (1M map, 1,000 queries, 2 cores:
    # 0.57-0.65 s against 0.78-1.02 s for reads and products in turn on both)
    overlap = device.type != "cpu" or threads > 1
    with intra_op_threads(threads - 1) if device.type == "cpu" and overlap else nullcontext():
        for (q0, q1, qd, cands), (unique, raw) in read_ahead(candidate_rows, blocks, thread=overlap):
            if len(unique) == 0:
                yield q0, q1, [np.full((q1 - q0, k), -np.inf, np.float32)] * lists, [np.full((q1 - q0, k), -1)] * lists
                continue
            with clock("score"):
                values, indices = _rescore(qd, raw, unique, cands, database, rconf, k, kc, device)
            yield q0, q1, values, indices


def _rescore(qd: list[torch.Tensor], raw: list[np.ndarray], unique: np.ndarray, cands: np.ndarray,
             database: DescriptorSet, rconf: RetrievalConf, k: int, kc: int,
             device: torch.device) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The top-k of a block of queries among their candidates ``cands`` (``-1``: none),
    scored with their stored descriptors ``raw`` (rows of ``unique``, the sorted candidates):
    exact scores (:mod:`cbir.exact`), the same bits as exact search's for the same pairs.
    A float32 product of the block's queries with every candidate row and its error bound
    leave the few candidates that may be in the top-k (monotone fusions), and only those
    are scored exactly (:func:`_settle`)."""
    pos = torch.from_numpy(np.searchsorted(unique, np.where(cands >= 0, cands, unique[0]))).to(device)
    units = [u.to(device) for u in database.units(raw, unique)]
    sliced = [exact.slice_rows(a) for a in qd]
    bounds = [error_bound("fp32", u.shape[1]) for u in units]
    upper = [torch.gather(a @ u.t(), 1, pos).add_(e) for a, u, e in zip(qd, units, bounds, strict=True)]
    invalid = torch.from_numpy(cands < 0).to(device)
    ids = torch.from_numpy(cands).to(device)
    lists: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None, bool]]
    if rconf.fusion.name == "round_robin":  # each index's own candidates, ranked by its own descriptor
        cols = [slice(j * kc, (j + 1) * kc) for j in range(len(upper))]
        lists = [(u.masked_fill(invalid, -torch.inf)[:, c], ids[:, c], pos[:, c], j, True)
                 for j, (u, c) in enumerate(zip(upper, cols, strict=True))]
    else:
        # a candidate found by several indexes appears several times: keep its first occurrence
        drop = invalid | ~torch.from_numpy(_first_occurrence(cands)).to(device)
        lists = [(nan_last(fuse(upper, rconf.fusion)).masked_fill(drop, -torch.inf), ids, pos, None, bounded(rconf))]
    values, indices = [], []
    for bound, ids_j, pos_j, descriptor, monotone in lists:
        order = torch.argsort(bound, dim=1, descending=True, stable=True)  # best bound first
        bound, ids_j, pos_j = bound.gather(1, order), ids_j.gather(1, order), pos_j.gather(1, order)

        def score(rows: torch.Tensor, n: int, pos_j: torch.Tensor = pos_j, descriptor: int | None = descriptor
                  ) -> torch.Tensor:
            return exact_scores(sliced, units, rows, pos_j[rows, :n], rconf, descriptor)

        top_v, top_i = _settle(bound, ids_j, score, k, None if monotone else bound.shape[1])
        v, ix = top_v.cpu().numpy(), top_i.cpu().numpy()
        ix[v == -np.inf] = -1
        values.append(v)
        indices.append(ix)
    return values, indices


def _settle(bounds: torch.Tensor, ids: torch.Tensor, score: Callable[[torch.Tensor, int], torch.Tensor], k: int,
            first: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-k among each query's candidates, ranked by an upper ``bound`` of their
    exact score (``(nq, c)``, best first; ``-inf``: none there), of map indices ``ids``.

    ``score(rows, width)`` gives the exact scores of the first ``width`` candidates of
    ``rows``. The first ``first`` (default ``k + max(4, k / 4)``) are scored; a row whose
    k-th exact score is above the next candidate's bound is settled (no other candidate can
    reach it, not even to tie), the others score every candidate. Equal scores rank by lower
    index (:func:`~.search.ranked`), so the result is a function of the exact scores alone."""
    nq, width = bounds.shape
    first = min(width, k + max(4, k // 4) if first is None else first)

    def best(rows: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.where(bounds[rows, :n] == -torch.inf, -torch.inf, score(rows, n))
        return ranked(scores, ids[rows, :n], k)

    values, indices = best(torch.arange(nq, device=bounds.device), first)
    if first < width:
        nxt = bounds[:, first]
        again = (~((values[:, -1] > nxt) | (nxt == -torch.inf))).nonzero()[:, 0]
        if len(again):
            values[again], indices[again] = best(again, width)
    return values, indices


def _candidates(query: DescriptorSet, indexes: list[faiss.Index], kc: int, search_block: int, query_block: int,
                device: torch.device, threads: int) -> Iterator[tuple[int, int, list[torch.Tensor], np.ndarray]]:
    """``(q0, q1, descriptors, candidates)`` per block of queries: each index's top ``kc`` map
    rows of every query, side by side, searched on ``threads`` threads. faiss is asked for many
    queries at once: per call it costs as much as 64 queries' scan (0.58 s for 1,000 queries in
    blocks of 64, 0.085 s in one call, 1M map images); searching the next queries while the
    first ones' rows are read was slower still (faiss and the reads share the cores)."""
    nq = len(query.names)
    for s0 in range(0, nq, search_block):
        s1 = min(nq, s0 + search_block)
        descriptors = query.read(s0, s1, device)
        with intra_op_threads(threads):
            cands = np.concatenate([_checked(index, index.search(d.cpu().numpy(), kc)[1], kc)
                                    for index, d in zip(indexes, descriptors, strict=True)], axis=1)
        for q0 in range(s0, s1, query_block):
            q1 = min(s1, q0 + query_block)
            yield q0, q1, [d[q0 - s0:q1 - s0] for d in descriptors], cands[q0 - s0:q1 - s0].copy()


def _checked(index: faiss.Index, ids: np.ndarray, k: int) -> np.ndarray:
    """The candidates ``index`` returned, refused when they cannot come from an index of its
    map: ids outside ``[-1, ntotal)`` (-1: no more candidates), or a query without any (NaN
    vectors or centroids in a kept file make every comparison fail). Either would be a
    silently wrong ranking."""
    if ids.size and (ids.min() < -1 or ids.max() >= index.ntotal):
        raise FormatError(f"the index returned image {int(ids.min() if ids.min() < -1 else ids.max())} of a map of "
                          f"{index.ntotal}: it is corrupt; rebuild it with cbir index build ... --overwrite")
    if index.ntotal and k and len(ids) and (ids[:, 0] < 0).any():
        raise FormatError("the index found no candidate for a query (NaN or infinite values in it?): it is corrupt; "
                          "rebuild it with cbir index build ... --overwrite")
    return ids


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique`` of a small array, without its per-call cost (0.8 ms for 1,600 values)."""
    s = np.sort(values)
    return s[np.concatenate(([True], s[1:] != s[:-1]))] if len(s) else s


def _first_occurrence(cands: np.ndarray) -> np.ndarray:
    order = np.argsort(cands, axis=1, kind="stable")
    s = np.take_along_axis(cands, order, axis=1)
    first_sorted = np.ones_like(s, bool)
    first_sorted[:, 1:] = s[:, 1:] != s[:, :-1]
    out = np.empty_like(first_sorted)
    np.put_along_axis(out, order, first_sorted, axis=1)
    return out


def recall_against_exact(query: DescriptorSet, database: DescriptorSet, rconf: RetrievalConf, iconf: IndexConf,
                         sample: int = 100, device: torch.device = torch.device("cpu"),
                         indexes: list[faiss.Index] | None = None) -> float:
    """Mean share of the exact top-k that the indexed search also returns, over a sample of queries."""
    sub = query.subset(recall_sample_rows(len(query.names), sample, iconf.seed))
    return recall(retrieve(sub, database, rconf, device=device),
                  retrieve_indexed(sub, database, rconf, iconf, device, indexes))


#: an indexed search whose measured recall is below this is told which options raise it
RECALL_ADVICE_BELOW = 0.95


def recall_advice(recall: float, conf: IndexConf) -> str | None:
    """The options that raise the recall of an indexed search with ``conf``, when ``recall``
    is below :data:`RECALL_ADVICE_BELOW` (on real 128-D RootSIFT at 1M images the defaults
    reach 0.44: benchmarks/README.md), else ``None``."""
    if recall >= RECALL_ADVICE_BELOW:
        return None
    ways = [f"rescore more candidates (--candidates {2 * conf.candidates})"]
    if conf.kind in ("ivf", "ivfpq"):
        ways.insert(0, f"visit more inverted lists (--nprobe {2 * conf.nprobe})")
    if conf.kind == "ivfpq":
        ways.append("use finer codes (--pq-m up to the dimension; the index is rebuilt)")
    if conf.kind == "lsh":
        ways.append("use longer codes (--lsh-bits; the index is rebuilt)")
    return f"recall below {100 * RECALL_ADVICE_BELOW:.0f}%: " + (", ".join(ways[:-1]) + " or " + ways[-1]
                                                              if len(ways) > 1 else ways[0])


def recall_sample_rows(n: int, sample: int, seed: int) -> np.ndarray:
    """The queries (rows, sorted) a recall is measured on: a seeded sample of ``sample`` of ``n``."""
    return np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))


def recall(exact: list[Pair], approx: list[Pair]) -> float:
    """Mean share of each query's exact pairs that ``approx`` also holds (1 without any)."""
    wanted: dict[str, set[str]] = {}
    found: dict[str, set[str]] = {}
    for p in exact:
        wanted.setdefault(p.query, set()).add(p.map)
    for p in approx:
        found.setdefault(p.query, set()).add(p.map)
    return float(np.mean([len(wanted[q] & found.get(q, set())) / len(wanted[q]) for q in wanted])) if wanted else 1.0

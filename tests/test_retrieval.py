"""Retrieval and late fusion: the fused top-k equals kapture-localization's on the same
descriptors, for every operator; streaming does not change it; bad inputs are refused."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cbir.errors import CbirError
from cbir.io.store import StoreWriter, open_store
from cbir.retrieval import DescriptorSet, FusionConf, RetrievalConf, retrieve
from cbir.retrieval.fusion import METHODS
from tests.conftest import assert_rankings_agree

peer_fusion = pytest.importorskip("kapture_localization.image_retrieval.fusion")
peer_pairing = pytest.importorskip("kapture_localization.image_retrieval.pairing")

DIMS = (16, 32, 64)
#: cbir against kapture-localization: its similarities are float32 BLAS products (last bits
#: of the CPU's kernel), cbir's exact ones (cbir.exact): equal rankings, scores within this,
#: images swapped only where their scores are closer than this
PEER_TOLERANCE = 1e-5


def write_global(path: Path, names: list[str], desc: np.ndarray) -> Path:
    attrs = {"name": path.stem, "config": {}, "descriptor_dim": desc.shape[1], "descriptor_dtype": "float32"}
    with StoreWriter(path, "global-features", attrs) as w:
        for n, d in zip(names, desc, strict=True):
            w.add(n, descriptors=d)
    return path


def unit_positive(rng, n, d):
    x = np.abs(rng.standard_normal((n, d))).astype(np.float32)  # similarities in [0, 1] as the peer assumes
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def stores(tmp_path):
    rng = np.random.default_rng(0)
    qnames = [f"q/{i:03d}.jpg" for i in range(37)]
    mnames = [f"m/{i:04d}.jpg" for i in range(301)]
    q, m = [], []
    for j, d in enumerate(DIMS):
        q.append(write_global(tmp_path / f"q{j}.h5", qnames, unit_positive(rng, len(qnames), d)))
        m.append(write_global(tmp_path / f"m{j}.h5", mnames, unit_positive(rng, len(mnames), d)))
    return q, m


def load(paths):
    return DescriptorSet.align([open_store(p, "global-features") for p in paths])


def peer_pairs(qset, mset, method, params, topk):
    """kapture-localization's own functions, as kapture_image_retrieval_late_fusion.py chains them."""
    qf = [peer_pairing.StackedGlobalFeatures(np.array(qset.names, dtype=object), s.read_all("descriptors"))
          for s in qset.stores]
    mf = [peer_pairing.StackedGlobalFeatures(np.array(mset.names, dtype=object), s.read_all("descriptors"))
          for s in mset.stores]
    sims = [peer_pairing.get_similarity_matrix(a, b) for a, b in zip(qf, mf, strict=True)]
    if method == "round_robin":
        dicts = [peer_pairing.get_similarity_dict_from_similarity_matrix(s, qf[0].index, mf[0].index) for s in sims]
        return [tuple(p) for p in peer_fusion.round_robin_from_similarity_dicts(dicts, topk)]
    fused = peer_fusion.fuse_similarities(sims, getattr(peer_fusion.LateFusionMethod, method), params)
    d = peer_pairing.get_similarity_dict_from_similarity_matrix(fused, qf[0].index, mf[0].index)
    return [tuple(p) for p in peer_pairing.get_image_pairs(d, topk)]


CASES = [
    ("gharm", "generalized_harmonic_mean", FusionConf("gharm"), {"weights": [], "gamma": 0.5}),
    ("gharm weighted", "generalized_harmonic_mean", FusionConf("gharm", (2.0, 1.0, 1.0), gamma=0.3),
     {"weights": [2.0, 1.0, 1.0], "gamma": 0.3}),
    ("harmonic_mean", "harmonic_mean", FusionConf("harmonic_mean"), {"weights": []}),
    ("mean", "mean", FusionConf("mean", (1.0, 2.0, 3.0)), {"weights": [1.0, 2.0, 3.0]}),
    ("power", "power", FusionConf("power"), {"weights": []}),
    ("mean_and_power", "mean_and_power", FusionConf("mean_and_power", gamma=0.7), {"weights": [], "gamma": 0.7}),
    ("mean_and_min", "mean_and_min", FusionConf("mean_and_min"), {"weights": [], "gamma": 0.5}),
    ("min_and_max", "min_and_max", FusionConf("min_and_max", alpha=0.2), {"min_weight": 0.2, "max_weight": 0.8}),
    ("villena_roman", "villena_roman", FusionConf("villena_roman", alpha=0.4), {"alpha": 0.4}),
    ("min", "minimum", FusionConf("min"), {}),
    ("max", "maximum", FusionConf("maximum"), {}),
    ("round_robin", "round_robin", FusionConf("round_robin"), {}),
]


def test_every_operator_is_covered():
    assert {c[2].name for c in CASES} == set(METHODS)


@pytest.mark.parametrize("label,peer_method,conf,params", CASES, ids=[c[0] for c in CASES])
def test_fused_topk_equals_the_peer(stores, label, peer_method, conf, params):
    q, m = stores
    qset, mset = load(q), load(m)
    ours = retrieve(qset, mset, RetrievalConf(topk=20, fusion=conf))
    theirs = peer_pairs(qset, mset, peer_method, params, 20)
    if label == "round_robin":  # rank scores: the same images in the same order, but for
        # images that some descriptor ranks closer than the peer's rounding (which swaps them)
        sims = [a.read_all("descriptors") @ b.read_all("descriptors").T
                for a, b in zip(qset.stores, mset.stores, strict=True)]
        row, col = {n: i for i, n in enumerate(qset.names)}, {n: i for i, n in enumerate(mset.names)}
        assert [p.query for p in ours] == [t[0] for t in theirs]
        for p, (_, other, _) in zip(ours, theirs, strict=True):
            r = row[p.query]
            assert p.map == other or any(abs(s[r, col[p.map]] - s[r, col[other]]) <= PEER_TOLERANCE for s in sims)
        return
    assert_rankings_agree(ours, theirs, PEER_TOLERANCE)


@pytest.mark.parametrize("method", ["gharm", "round_robin"])
def test_map_by_map_excludes_self_like_the_peer(stores, method):
    _, m = stores
    mset = load(m)
    ours = retrieve(mset, mset, RetrievalConf(topk=10, fusion=FusionConf(method), exclude_self=True))
    assert all(p.query != p.map for p in ours) and len(ours) == 10 * len(mset.names)
    if method == "gharm":  # the peer's get_image_pairs skips the query itself
        theirs = peer_pairs(mset, mset, "generalized_harmonic_mean", {"weights": [], "gamma": 0.5}, 10)
        assert_rankings_agree(ours, theirs, PEER_TOLERANCE)


def test_streaming_blocks_do_not_change_the_result(stores):
    q, m = stores
    qset, mset = load(q), load(m)
    whole = retrieve(qset, mset, RetrievalConf(topk=15))
    for block, chunk, cache in ((5, 7, 0), (1, 300, 1 << 30), (36, 1, 0)):
        small = retrieve(qset, mset, RetrievalConf(topk=15, query_block=block, map_chunk=chunk, cache_bytes=cache))
        assert small == whole  # bit for bit


def bits(pairs):
    """Pairs with their scores' bits (NaN equal to NaN)."""
    return [(p.query, p.map, np.float32(p.score).tobytes()) for p in pairs]


def path_variants(method: str, map_by_map: bool) -> list[dict]:
    """Options that change how a search runs, not its result: blocks, chunks, cache,
    candidates, the precision of the candidates' search (monotone fusions)."""
    from cbir.retrieval.search import MONOTONE

    variants = [dict(query_block=5, map_chunk=23, cache_bytes=0), dict(map_chunk=64), dict(map_chunk=7)]
    if not map_by_map:
        variants.append(dict(query_block=1, map_chunk=300))
    if method in MONOTONE:
        variants += [dict(precision=p, map_chunk=64, cache_bytes=c) for p in ("fp16", "bf16") for c in (0, 1 << 30)]
    return variants


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_path_gives_the_same_bits(stores, method):
    """Bit-identical pairs, scores included, whatever the query blocks, map chunks, cache,
    candidates and precision of the candidates' search, map x map or query x map: every
    score is cbir.exact's."""
    q, m = stores
    qset, mset = load(q), load(m)
    for query, exclude in ((qset, False), (mset, True)):
        base = RetrievalConf(topk=12, fusion=FusionConf(method), exclude_self=exclude)
        want = bits(retrieve(query, mset, base))
        for options in path_variants(method, exclude):
            assert bits(retrieve(query, mset, replace(base, **options))) == want, options


@pytest.mark.parametrize("method", ["gharm", "power", "round_robin"])
def test_paths_give_the_same_bits_at_any_thread_count(stores, method, threads):
    """The same at 1, 2 and 3 threads: their pairs are those of one thread, bit for bit."""
    q, m = stores
    qset, mset = load(q), load(m)
    base = RetrievalConf(topk=12, fusion=FusionConf(method))
    with torch_threads(1):
        want = bits(retrieve(qset, mset, base))
    for options in [{}] + path_variants(method, False):
        assert bits(retrieve(qset, mset, replace(base, **options))) == want, options


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("thread", [True, False])
def test_read_ahead_keeps_the_order_and_raises_the_readers_error(thread):
    """``read_ahead`` yields every item with its read in order, on a thread or inline, and a
    read that fails raises in the caller, after the items before it."""
    from cbir.retrieval.search import read_ahead

    assert list(read_ahead(lambda x: x * x, range(5), thread=thread)) == [(i, i * i) for i in range(5)]
    assert list(read_ahead(lambda x: x, [], thread=thread)) == []

    def fails_at_three(x: int) -> int:
        if x == 3:
            raise OSError("short read")
        return x

    got = []
    with pytest.raises(OSError, match="short read"):
        for item, _ in read_ahead(fails_at_three, range(5), thread=thread):
            got.append(item)
    assert got == [0, 1, 2]


def test_topk_larger_than_the_map_is_clamped(stores):
    q, m = stores
    pairs = retrieve(load(q[:1]), load(m[:1]), RetrievalConf(topk=10_000))
    assert len(pairs) == 37 * 301


def test_stores_with_other_images_are_fused_on_the_intersection(tmp_path, stores):
    q, m = stores
    rng = np.random.default_rng(1)
    with open_store(m[0]) as s:
        names = s.names[:-5] + ["m/extra.jpg"]
    other = write_global(tmp_path / "partial.h5", names, unit_positive(rng, len(names), DIMS[0]))
    mset = load([m[1], other])
    assert len(mset.names) == 301 - 5 and mset.dropped[-1] == "m/extra.jpg" and len(mset.dropped) == 6


def test_stores_of_the_same_images_align_on_their_rows(tmp_path):
    """Stores holding the same images in the same order (the common case) align without a
    lookup per image: every image, rows as stored; with the dataset's records, only those,
    the others reported as foreign, in the order and with the rows the general rule gives."""
    rng = np.random.default_rng(2)
    names = [f"img/{i:03d}.jpg" for i in range(50)]
    a = write_global(tmp_path / "a.h5", names, unit_positive(rng, 50, 8))
    b = write_global(tmp_path / "b.h5", names, unit_positive(rng, 50, 4))
    whole = load([a, b])
    assert whole.names == names and all(np.array_equal(r, np.arange(50)) for r in whole.rows)
    assert whole.dropped == [] and whole.foreign == []
    records = names[40:] + names[:30:3] + ["img/other.jpg"]
    some = DescriptorSet.align(whole.stores, images=records)
    wanted = [n for n in names if n in set(records)]
    assert some.names == wanted and some.dropped == []
    assert all(r.tolist() == [names.index(n) for n in wanted] for r in some.rows)
    assert some.foreign == sorted(set(names) - set(records))


def test_bad_descriptors_are_refused(tmp_path, stores):
    q, m = stores
    names = ["a.jpg", "b.jpg"]
    nan = write_global(tmp_path / "nan.h5", names, np.array([[1.0] * 16, [np.nan] * 16], np.float32))
    zero = write_global(tmp_path / "zero.h5", names, np.array([[1.0] * 16, [0.0] * 16], np.float32))
    with pytest.raises(CbirError, match="nan.h5: non-finite descriptor for image 'b.jpg'"):
        retrieve(load([nan]), load(m[:1]))
    with pytest.raises(CbirError, match="zero.h5: zero descriptor for image 'b.jpg'"):
        retrieve(load(q[:1]), load([zero]))
    with pytest.raises(CbirError, match="zero.h5: zero descriptor for image 'b.jpg'"):  # indexed search too
        retrieve_indexed(load(q[:1]), load([zero]), RetrievalConf(topk=1), IndexConf("flat", candidates=2))
    with pytest.raises(CbirError, match="dimension 16 differs from the map's 32"):
        retrieve(load(q[:1]), load(m[1:2]))
    empty = write_global(tmp_path / "empty.h5", [], np.zeros((0, 16), np.float32))
    with pytest.raises(CbirError, match="the map has no image"):
        retrieve(load(q[:1]), load([empty]))
    with pytest.raises(CbirError, match="unknown fusion 'nope'"):
        _ = FusionConf("nope").name
    with pytest.raises(CbirError, match="2 fusion weights given for 3 descriptors"):
        retrieve(load(q), load(m), RetrievalConf(fusion=FusionConf("mean", (1.0, 1.0))))


# ---------------------------------------------------------------- query expansion, DBA, indexes
from cbir.retrieval.index import IndexConf, recall_against_exact, retrieve_indexed  # noqa: E402
from cbir.retrieval.rerank import expand, retrieve_with_expansion  # noqa: E402


def test_average_and_alpha_query_expansion(stores):
    q, m = stores
    qset, mset = load(q), load(m)
    conf = RetrievalConf(topk=5)
    first = retrieve(qset, mset, conf)
    for alpha in (0.0, 3.0):
        expanded = expand(qset, mset, first, 2, alpha)
        # by hand: q' = normalize(q + sum_i w_i m_i) over the first 2 neighbours, per descriptor
        qd = [t.numpy() for t in qset.read(0, len(qset.names), torch.device("cpu"))]
        md = [t.numpy() for t in mset.read(0, len(mset.names), torch.device("cpu"))]
        idx = {n: i for i, n in enumerate(mset.names)}
        nb = [idx[p.map] for p in first if p.query == qset.names[0]][:2]
        for j in range(3):
            w = np.ones(2) if alpha == 0 else np.maximum(md[j][nb] @ qd[j][0], 0) ** alpha
            e = qd[j][0] + w @ md[j][nb]
            np.testing.assert_allclose(expanded.arrays[j][0], e / np.linalg.norm(e), atol=1e-5)
    pairs = retrieve_with_expansion(qset, mset, conf, qe=2, qe_alpha=0.0)
    assert pairs == retrieve(expand(qset, mset, first, 2, 0.0), mset, conf)


def test_database_augmentation_changes_the_map_not_the_names(stores):
    q, m = stores
    qset, mset = load(q), load(m)
    pairs = retrieve_with_expansion(qset, mset, RetrievalConf(topk=5), dba=3, dba_alpha=3.0)
    assert len(pairs) == 5 * len(qset.names) and {p.map for p in pairs} <= set(mset.names)


@pytest.mark.parametrize("fusion", ["gharm", "round_robin"])
def test_flat_and_full_probe_indexes_equal_exact_search(stores, fusion):
    q, m = stores
    qset, mset = load(q), load(m)
    conf = RetrievalConf(topk=10, fusion=FusionConf(fusion))
    exact = retrieve(qset, mset, conf)
    # every map image a candidate: the exact rescoring gives the exact result
    for iconf in (IndexConf("flat", candidates=301), IndexConf("ivf", candidates=301, nlist=4, nprobe=4)):
        ours = retrieve_indexed(qset, mset, conf, iconf)
        assert ours == exact, iconf.kind  # rescored with cbir.exact: the same bits
    assert recall_against_exact(qset, mset, conf, IndexConf("flat", candidates=301)) == 1.0
    # fewer candidates: a fused top-10 image may be in no descriptor's own top-10, and the recall says so
    r = recall_against_exact(qset, mset, conf, IndexConf("flat", candidates=10))
    assert (r == 1.0) if fusion == "round_robin" else (0.5 < r <= 1.0)


def test_indexed_search_is_the_same_whatever_its_blocks_calls_and_threads(stores):
    """Rescoring blocks, faiss calls, reading ahead on a thread and the threads left to the
    products change no bit of the pairs, and torch's thread count is restored after."""
    q, m = stores
    qset, mset = load(q), load(m)
    conf, iconf = RetrievalConf(topk=10), IndexConf("ivf", candidates=40, nlist=8, nprobe=2)
    threads = torch.get_num_threads()
    want = retrieve_indexed(qset, mset, conf, iconf, query_block=37)
    try:
        for block, search_block, n in ((1, 4096, 1), (5, 3, 2), (16, 7, 3)):
            torch.set_num_threads(n)
            got = retrieve_indexed(qset, mset, conf, replace(iconf, search_block=search_block), query_block=block)
            assert got == want, (block, search_block, n)
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(threads)


def test_indexed_search_reports_the_time_of_its_steps(stores):
    """`timings` receives the seconds of each step of an indexed search (the benchmark's
    breakdown): candidates from faiss, reading their rows, scoring them, making the pairs."""
    q, m = stores
    timings: dict = {}
    pairs = retrieve_indexed(load(q), load(m), RetrievalConf(topk=5), IndexConf("flat", candidates=20),
                             timings=timings)
    assert len(pairs) == 37 * 5
    assert set(timings) == {"candidates", "read", "score", "pairs"} and all(t > 0 for t in timings.values())


def test_indexed_search_scores_descriptors_held_in_memory(stores):
    """A map whose descriptors are held in memory (expanded, augmented) is rescored from those,
    not from its stores: every map image a candidate, the exact search's pairs over them."""
    q, m = stores
    qset, mset = load(q[:1]), load(m[:1])
    rng = np.random.default_rng(3)
    held = [a[rng.permutation(len(a))] for a in (t.numpy() for t in mset.take_host(np.arange(len(mset.names))))]
    moved = mset.with_arrays(held)
    conf = RetrievalConf(topk=10)
    exact = retrieve(qset, moved, conf)
    assert [(p.query, p.map) for p in exact] != [(p.query, p.map) for p in retrieve(qset, mset, conf)]
    ours = retrieve_indexed(qset, moved, conf, IndexConf("flat", candidates=301))
    assert ours == exact


def test_compressed_indexes_report_their_recall(tmp_path):
    rng = np.random.default_rng(4)
    mnames = [f"m{i}" for i in range(2000)]
    m = unit_positive(rng, 2000, 64)
    q = m[:50] + 0.05 * rng.standard_normal((50, 64)).astype(np.float32)  # near-duplicates of map images
    qset = load([write_global(tmp_path / "q.h5", [f"q{i}" for i in range(50)], q / np.linalg.norm(q, axis=1)[:, None])])
    mset = load([write_global(tmp_path / "m.h5", mnames, m)])
    conf = RetrievalConf(topk=5)
    for kind in ("ivfpq", "lsh"):
        iconf = IndexConf(kind, candidates=50, nlist=16, nprobe=4, pq_m=8)
        pairs = retrieve_indexed(qset, mset, conf, iconf)
        top1 = {p.query: p.map for p in pairs[::5]}
        assert sum(top1[f"q{i}"] == f"m{i}" for i in range(50)) >= 45, kind  # the duplicate is found
        r = recall_against_exact(qset, mset, conf, iconf, sample=50)
        assert 0.2 <= r <= 1.0


def test_a_low_recall_is_told_which_options_raise_it():
    """Below 95% recall the advice names the options of the index kind, doubled where they are
    numbers; at 95% and above there is none."""
    from cbir.retrieval.index import recall_advice

    assert recall_advice(0.95, IndexConf("ivfpq")) is None
    ivfpq = recall_advice(0.44, IndexConf("ivfpq", candidates=100, nprobe=16))
    assert ivfpq is not None and ivfpq.startswith("recall below 95%")
    assert "--nprobe 32" in ivfpq and "--candidates 200" in ivfpq and "--pq-m" in ivfpq
    assert recall_advice(0.5, IndexConf("flat", candidates=10)) == \
        "recall below 95%: rescore more candidates (--candidates 20)"
    lsh = recall_advice(0.5, IndexConf("lsh"))
    assert lsh is not None and "--lsh-bits" in lsh and "--nprobe" not in lsh


@pytest.mark.parametrize("method,params", [("power", {"weights": []}),
                                           ("mean_and_power", {"weights": [], "gamma": 0.5})])
def test_nan_fused_scores_rank_last_as_with_the_peer(tmp_path, method, params):
    """``power`` of a negative similarity is NaN: it never outranks a number (torch.topk would
    rank it first); the finite ranking equals kapture-localization's, NaN pairs come after."""
    rng = np.random.default_rng(1)
    qnames, mnames = [f"q/{i}.jpg" for i in range(6)], [f"m/{i}.jpg" for i in range(40)]
    q, m = [], []
    for j, d in enumerate((8, 16)):
        for names, out in ((qnames, q), (mnames, m)):
            x = rng.standard_normal((len(names), d)).astype(np.float32)  # signed: negative similarities
            out.append(write_global(tmp_path / f"{'q' if out is q else 'm'}{j}.h5", names,
                                    x / np.linalg.norm(x, axis=1, keepdims=True)))
    qset, mset = load(q), load(m)
    topk = len(mnames)
    ours = retrieve(qset, mset, RetrievalConf(topk=topk, fusion=FusionConf(method), map_chunk=16))
    theirs = peer_pairs(qset, mset, method, params, topk)
    nan_ours = [(p.query, p.map) for p in ours if np.isnan(p.score)]
    assert nan_ours, "the case must produce NaN fused scores"
    for qname in qnames:
        mine = [p for p in ours if p.query == qname]
        peer = [t for t in theirs if t[0] == qname]
        finite = [p for p in mine if not np.isnan(p.score)]
        assert all(not np.isnan(p.score) for p in mine[:len(finite)])  # numbers first, then NaN
        assert_rankings_agree(finite, [t for t in peer if not np.isnan(t[2])][:len(finite)], PEER_TOLERANCE)
        assert {p.map for p in mine[len(finite):]} == {b for _, b, s in peer if np.isnan(s)}


def test_same_names_in_two_datasets_are_kept_unless_asked(tmp_path):
    """kapture-localization drops a map image named as the query even when the query is in
    another dataset; cbir keeps it (another image), and --exclude-same-name gives the peer's
    pairs exactly."""
    rng = np.random.default_rng(2)
    mnames = [f"img/{i:03d}.jpg" for i in range(50)]
    qnames = mnames[:8]  # another dataset whose images happen to have the map's names
    q = [write_global(tmp_path / "q.h5", qnames, unit_positive(rng, len(qnames), 16))]
    m = [write_global(tmp_path / "m.h5", mnames, unit_positive(rng, len(mnames), 16))]
    qset, mset = load(q), load(m)
    kept = retrieve(qset, mset, RetrievalConf(topk=len(mnames), fusion=FusionConf("gharm")))
    assert all(any(p.query == p.map for p in kept if p.query == n) for n in qnames)
    dropped = retrieve(qset, mset, RetrievalConf(topk=10, fusion=FusionConf("gharm"), exclude_same_name=True))
    theirs = peer_pairs(qset, mset, "generalized_harmonic_mean", {"weights": [], "gamma": 0.5}, 10)
    assert_rankings_agree(dropped, theirs, PEER_TOLERANCE)
    assert not any(p.query == p.map for p in dropped)


# ---------------------------------------------------------------- half precision, resident maps

def names_of(pairs):
    return [(p.query, p.map) for p in pairs]


def ranked(pairs):
    """Each query's ranking as (score, images of that score): images of exactly equal
    scores come in any order, from exact search as from any other."""
    out: dict = {}
    for p in pairs:
        groups = out.setdefault(p.query, [])
        if groups and groups[-1][0] == p.score:
            groups[-1][1].add(p.map)
        else:
            groups.append((p.score, {p.map}))
    return out


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("method", ["gharm", "mean", "min", "max", "mean_and_min", "min_and_max"])
def test_half_precision_gives_the_exact_topk(stores, precision, method):
    """Half-precision search with float32 rescoring returns exact search's pairs, in order,
    map x map with self excluded too, streamed or kept whole."""
    q, m = stores
    qset, mset = load(q), load(m)
    for query, exclude, cache in ((qset, False, 512 << 20), (mset, True, 0)):
        exact = retrieve(query, mset, RetrievalConf(topk=20, fusion=FusionConf(method), exclude_self=exclude))
        timings: dict = {}
        half = retrieve(query, mset, RetrievalConf(topk=20, fusion=FusionConf(method), exclude_self=exclude,
                                                   precision=precision, cache_bytes=cache, map_chunk=64),
                        timings=timings)
        assert ranked(half) == ranked(exact)


def near_ties(tmp_path, gaps: float, tied: int, n_map: int = 500, dim: int = 256):
    """One query; ``tied`` map images at similarities 1 - 1e-3 - i * gaps (closer than half
    precision resolves), the rest far below."""
    rng = np.random.default_rng(7)
    qv = rng.standard_normal(dim)
    qv /= np.linalg.norm(qv)
    ortho = rng.standard_normal((n_map, dim))
    ortho -= np.outer(ortho @ qv, qv)
    ortho /= np.linalg.norm(ortho, axis=1, keepdims=True)
    sims = np.concatenate([1 - 1e-3 - gaps * rng.permutation(tied), rng.uniform(0.0, 0.5, n_map - tied)])
    mv = sims[:, None] * qv + np.sqrt(1 - sims ** 2)[:, None] * ortho
    qs = write_global(tmp_path / "q.h5", ["q.jpg"], qv[None].astype(np.float32))
    ms = write_global(tmp_path / "m.h5", [f"m{i:03d}.jpg" for i in range(n_map)], mv.astype(np.float32))
    return load([qs]), load([ms])


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_orders_near_ties_exactly(tmp_path, precision):
    """20 images 1e-5 apart (below fp16's 5e-4 and bf16's 4e-3 steps), then a wide gap: the
    candidates settle the top-k by the bound alone, in the exact order."""
    qset, mset = near_ties(tmp_path, 1e-5, 20)
    exact = retrieve(qset, mset, RetrievalConf(topk=10))
    timings: dict = {}
    half = retrieve(qset, mset, RetrievalConf(topk=10, precision=precision), timings=timings)
    assert names_of(half) == names_of(exact)
    assert timings["full_queries"] == 0 and timings["scored"] < 500  # the near-ties, not the map


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_falls_back_when_the_bound_cannot_decide(tmp_path, precision, monkeypatch):
    """120 images closer than the bound: every one that may reach the top-k is collected and
    scored, and the result is exact; with fewer allowed than that, the query is scored over
    the whole map, and the result is still exact."""
    import cbir.retrieval.search as search

    qset, mset = near_ties(tmp_path, 1e-6, 120)
    exact = retrieve(qset, mset, RetrievalConf(topk=10))
    for limit, full in ((search.COLLECT_LIMIT, 0), (50, 1)):
        monkeypatch.setattr(search, "COLLECT_LIMIT", limit)
        timings: dict = {}
        half = retrieve(qset, mset, RetrievalConf(topk=10, precision=precision), timings=timings)
        assert half == exact
        assert timings["full_queries"] == full and (full or timings["scored"] >= 120)


def test_half_precision_is_refused_for_fusions_it_cannot_bound():
    for method in ("round_robin", "power", "harmonic_mean", "villena_roman", "mean_and_power"):
        with pytest.raises(CbirError, match="precision fp16 needs a fusion"):
            RetrievalConf(fusion=FusionConf(method), precision="fp16")
    with pytest.raises(CbirError, match="unknown precision"):
        RetrievalConf(precision="fp8")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_error_bound_holds(precision):
    """The measured error of the candidates' similarities against the exact ones stays within
    the bound, for unit vectors with tiny components (fp16 subnormals) too."""
    from cbir import exact
    from cbir.retrieval.search import _search_product, error_bound

    rng = np.random.default_rng(3)
    for dim in (128, 2048, 4096):
        a = rng.standard_normal((64, dim)) * rng.uniform(0, 1, (64, dim)) ** 8  # many tiny components
        b = a[::-1] + 0.05 * rng.standard_normal((64, dim))
        a, b = (exact.unit_rows(torch.from_numpy(x).float()) for x in (a, b))
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        approx = _search_product(a.to(dtype), b.to(dtype)).double()
        err = (approx - exact.dot(exact.slice_rows(a), exact.slice_rows(b)).double()).abs().max().item()
        assert 0 < err <= error_bound(precision, dim)


@pytest.mark.parametrize("fusion", ["gharm", "round_robin"])
def test_queries_with_fewer_candidates_than_topk_get_only_real_pairs(tmp_path, fusion):
    """One inverted list probed of 16 holds about 125 of 2,000 images: asked for the top 300,
    each query gets its candidates only (no padding, no repeated image), scored exactly."""
    rng = np.random.default_rng(5)
    m = unit_positive(rng, 2000, 32)
    q = unit_positive(rng, 10, 32)
    mnames = [f"m{i}" for i in range(2000)]
    qset = load([write_global(tmp_path / "q.h5", [f"q{i}" for i in range(10)], q)])
    mset = load([write_global(tmp_path / "m.h5", mnames, m)])
    pairs = retrieve_indexed(qset, mset, RetrievalConf(topk=300, fusion=FusionConf(fusion)),
                             IndexConf("ivf", candidates=300, nlist=16, nprobe=1))
    for i in range(10):
        mine = [p for p in pairs if p.query == f"q{i}"]
        assert 0 < len(mine) < 300 and len({p.map for p in mine}) == len(mine)
        if fusion == "gharm":
            exact = np.array([q[i] @ m[int(p.map[1:])] for p in mine])
            np.testing.assert_allclose([p.score for p in mine], exact, rtol=1e-5)
            assert all(a.score >= b.score for a, b in zip(mine, mine[1:], strict=False))


# ---------------------------------------------------------------- equal scores

def exact_ties(tmp_path, n_map: int = 400, n_query: int = 12, dim: int = 16, stores: int = 1):
    """Descriptors of four components 0.5 (unit norm, so every product is exact whatever the
    order of its sums): scores are multiples of 0.25 (per descriptor), about 90 map images
    of each query at 0.5, so the top 20 cuts through a tie. ``(qset, mset, q, m)``."""
    rng = np.random.default_rng(3)

    def draw(n):
        x = np.zeros((n, dim), np.float32)
        for row in x:
            row[rng.choice(dim, 4, replace=False)] = 0.5
        return x

    q = [draw(n_query) for _ in range(stores)]
    m = [draw(n_map) for _ in range(stores)]
    qnames, mnames = [f"q/{i:02d}.jpg" for i in range(n_query)], [f"m/{i:03d}.jpg" for i in range(n_map)]
    qset = load([write_global(tmp_path / f"q{j}.h5", qnames, x) for j, x in enumerate(q)])
    mset = load([write_global(tmp_path / f"m{j}.h5", mnames, x) for j, x in enumerate(m)])
    return qset, mset, q, m


def tie_rule_reference(q, m, names, fusion: FusionConf, topk: int, exclude_self: bool = False):
    """Each query's top-k by fused score, equal scores by lower map index (numpy's lexsort)."""
    from cbir.retrieval.fusion import fuse, nan_last
    scores = nan_last(fuse([torch.from_numpy(a @ b.T) for a, b in zip(q, m, strict=True)], fusion)).numpy()
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
    columns = np.arange(scores.shape[1])
    return [[names[j] for j in np.lexsort((columns, -row))[:topk]] for row in scores]


@pytest.mark.parametrize("query_block,map_chunk", [(None, None), (5, 7), (3, 64)])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("stores", [1, 2])
def test_equal_scores_rank_by_lower_map_index(tmp_path, query_block, map_chunk, precision, stores):
    """Images of exactly equal score come by map index, whatever cuts the map (chunks, and so
    shards) or the precision of the first pass: a chunk's top-k that splits a tie is redone."""
    qset, mset, q, m = exact_ties(tmp_path, stores=stores)
    conf = RetrievalConf(topk=20, query_block=query_block, map_chunk=map_chunk, precision=precision, cache_bytes=0)
    pairs = retrieve(qset, mset, conf)
    wanted = tie_rule_reference(q, m, mset.names, conf.fusion, 20)
    assert [[p.map for p in pairs if p.query == name] for name in qset.names] == wanted
    scores = [p.score for p in pairs]
    assert len(set(scores)) < len(scores) / 4  # the case is made of ties


def test_equal_scores_rank_by_lower_map_index_map_by_map(tmp_path):
    """The same rule with each image's own row excluded (map x map), chunk by chunk: the
    bounds collect every image that may tie; and scored over the whole map (power: no
    bound), where chunks split ties."""
    _, mset, _, m = exact_ties(tmp_path, n_map=150)
    for fusion, count in (("gharm", "scored"), ("power", "tie_queries")):
        timings: dict = {}
        pairs = retrieve(mset, mset, RetrievalConf(topk=20, fusion=FusionConf(fusion), exclude_self=True,
                                                   query_block=4, map_chunk=100), timings=timings)
        assert timings[count] > (20 * 150 if count == "scored" else 0)  # ties collected / split by the chunks
        wanted = tie_rule_reference(m, m, mset.names, FusionConf(fusion), 20, exclude_self=True)
        assert [[p.map for p in pairs if p.query == name] for name in mset.names] == wanted


def test_round_robin_rankings_do_not_depend_on_the_chunks(tmp_path):
    """round_robin merges one ranking per descriptor: each follows the tie rule, so the
    merged pairs are the same in one chunk as in many."""
    qset, mset, _, _ = exact_ties(tmp_path, stores=2)
    whole = retrieve(qset, mset, RetrievalConf(topk=20, fusion=FusionConf("round_robin")))
    cut = retrieve(qset, mset, RetrievalConf(topk=20, fusion=FusionConf("round_robin"), query_block=5, map_chunk=7))
    assert names_of(cut) == names_of(whole)

"""Kept faiss indexes (`cbir index build`): built once, used by `cbir retrieve --index`,
refused once their stores or options change, flagged by `cbir check`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cbir.cli import main
from cbir.io.pairs import read_pairs
from cbir.io.store import StoreWriter, open_store


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def rewrite_store(path, seed: int) -> None:
    """The store re-extracted with other values (new checksums), as a changed model would."""
    with open_store(path) as s:
        names, attrs = list(s.keys), {k: s.attrs[k] for k in ("name", "descriptor_dim", "descriptor_dtype")}
        attrs["config"] = s.config
        dim = s.read_all("descriptors").shape[1]
    rng = np.random.default_rng(seed)
    with StoreWriter(path, "global-features", attrs, overwrite=True) as w:
        for n in names:
            d = rng.random(dim).astype(np.float32)
            w.add(n, descriptors=d / np.linalg.norm(d))


def test_built_once_then_used_with_the_results_of_an_index_built_for_the_call(sample_dataset, tmp_path):
    r = run("retrieve", "--map", sample_dataset, "--global", "sample", "--index", "flat", "--topk", "2",
            "-o", tmp_path / "in_memory.txt")
    assert r.exit_code == 0 and "for this call only" in r.output
    r = run("index", "build", sample_dataset, "--global", "sample", "--index", "flat", "--json")
    assert r.exit_code == 0, r.output
    built = json.loads(r.stdout)
    assert built["status"] == "new" and built["images"] == 3
    index_file = sample_dataset / "cbir" / "index" / "sample.flat.h5"
    assert index_file.is_file()
    (faiss_file,) = built["files"]  # the index itself, beside its record, counted in the size
    assert built["bytes"] == index_file.stat().st_size + Path(faiss_file).stat().st_size
    assert Path(faiss_file).parent == index_file.parent and Path(faiss_file).stat().st_size > 0
    again = json.loads(run("index", "build", sample_dataset, "--global", "sample", "--index", "flat", "--json").stdout)
    assert again["status"] == "kept" and index_file.stat().st_mtime_ns == index_file.stat().st_mtime_ns
    r = run("retrieve", "--map", sample_dataset, "--global", "sample", "--index", "flat", "--topk", "2",
            "-o", tmp_path / "indexed.txt")
    assert r.exit_code == 0 and "for this call only" not in r.output
    assert read_pairs(tmp_path / "indexed.txt") == read_pairs(tmp_path / "in_memory.txt")


def test_an_index_of_stores_that_changed_is_refused_and_flagged(sample_dataset, tmp_path):
    assert run("index", "build", sample_dataset, "--global", "sample", "--index", "flat").exit_code == 0
    rewrite_store(sample_dataset / "cbir" / "global" / "sample.h5", seed=1)
    r = run("retrieve", "--map", sample_dataset, "--global", "sample", "--index", "flat", "-o", tmp_path / "p.txt")
    assert r.exit_code == 1 and "built from other stores or options" in r.output and "cbir index build" in r.output
    assert not (tmp_path / "p.txt").exists()
    r = run("check", sample_dataset, "--images", "skip")
    assert "sample.flat.h5" in r.output and "rebuild it" in r.output
    r = run("index", "build", sample_dataset, "--global", "sample", "--index", "flat")
    assert r.exit_code == 1 and "--overwrite" in r.output
    r = run("index", "build", sample_dataset, "--global", "sample", "--index", "flat", "--overwrite", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "rebuilt"
    assert run("retrieve", "--map", sample_dataset, "--global", "sample", "--index", "flat", "-o",
               tmp_path / "p.txt").exit_code == 0


def test_other_options_and_corrupt_files_are_one_line_errors(sample_dataset, tmp_path):
    assert run("index", "build", sample_dataset, "--global", "sample", "--index", "ivf", "--nlist", "1").exit_code == 0
    r = run("retrieve", "--map", sample_dataset, "--global", "sample", "--index", "ivf", "-o", "-")
    assert r.exit_code == 1 and "config.nlist: 1 -> null" in r.output
    index_file = sample_dataset / "cbir" / "index" / "sample.ivf.h5"
    index_file.write_bytes(index_file.read_bytes()[:200])
    r = run("retrieve", "--map", sample_dataset, "--global", "sample", "--index", "ivf", "--nlist", "1", "--topk", "1",
            "-o", "-")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and "sample.ivf.h5" in r.output


def test_an_index_of_every_image_of_its_stores_is_known_by_their_fingerprints(tmp_path):
    """An index of every image of its stores, in stored order, records that instead of a
    digest of a million names (the fingerprints fix them). A file kept with the digest
    (written before) is the same index; one of some of the images is another index."""
    import h5py

    from cbir.errors import CbirError
    from cbir.io.index_file import read_index_record
    from cbir.io.provenance import digest_names
    from cbir.retrieval.index import WHOLE_STORES, IndexConf, keep_indexes, load_indexes
    from cbir.retrieval.search import DescriptorSet

    names = [f"m/{i:02d}.jpg" for i in range(30)]
    rng = np.random.default_rng(0)
    attrs = {"name": "g", "config": {}, "descriptor_dim": 8, "descriptor_dtype": "float32"}
    with StoreWriter(tmp_path / "g.h5", "global-features", attrs) as w:
        for n in names:
            w.add(n, descriptors=rng.random(8).astype(np.float32))
    conf, path = IndexConf("flat"), tmp_path / "g.flat.h5"
    with open_store(tmp_path / "g.h5") as store:
        whole, some = DescriptorSet.align([store], names), DescriptorSet.align([store], names[:20])
        assert whole.whole and not some.whole
        assert keep_indexes(path, whole, conf) == "new"
        assert read_index_record(path)["names"] == WHOLE_STORES
        with h5py.File(path, "r+") as f:  # as written before: the digest of the same names
            record = json.loads(f.attrs["record"])
            f.attrs["record"] = json.dumps({**record, "names": digest_names(names)}, sort_keys=True)
        assert keep_indexes(path, whole, conf) == "kept"
        assert load_indexes(path, whole, conf)[0].ntotal == 30
        with pytest.raises(CbirError, match="names"):
            load_indexes(path, some, conf)
        assert keep_indexes(path, some, conf, overwrite=True) == "rebuilt"
        assert read_index_record(path)["names"] == digest_names(names[:20])
        with pytest.raises(CbirError, match="names"):
            load_indexes(path, whole, conf)


def _faiss_files(dataset, stem):
    return sorted((dataset / "cbir" / "index").glob(f"{stem}.*.faiss"))


def test_indexes_live_in_faiss_files_the_record_names_and_checks(sample_dataset, tmp_path):
    """Each index is a faiss file of its own beside the record (mapped by faiss, not read),
    named after its build: a rebuild writes new files and removes the old ones. A missing
    or truncated file is a one-line error naming it; `cbir check` reports it, `--deep` also
    a corrupt one (its CRC-32), and a faiss file no record names."""
    assert run("index", "build", sample_dataset, "--global", "sample", "--index", "flat").exit_code == 0
    record = sample_dataset / "cbir" / "index" / "sample.flat.h5"
    (first,) = _faiss_files(sample_dataset, "sample.flat")
    assert run("index", "build", sample_dataset, "--global", "sample", "--index", "flat", "--nlist", "1",
               "--overwrite").exit_code == 0
    (second,) = _faiss_files(sample_dataset, "sample.flat")
    assert second != first and not first.exists()
    retrieve = ["retrieve", "--map", sample_dataset, "--global", "sample", "--index", "flat", "--nlist", "1",
                "--topk", "2", "-o", tmp_path / "p.txt"]
    assert run(*retrieve).exit_code == 0
    good = second.read_bytes()

    second.write_bytes(good[:-10])
    r = run(*retrieve)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1 and second.name in r.output, r.output
    assert "truncated" in r.output
    assert second.name in run("check", sample_dataset, "--images", "skip").output

    second.unlink()
    r = run(*retrieve)
    assert r.exit_code == 1 and "missing" in r.output and second.name in r.output and record.name in r.output

    corrupt = bytearray(good)
    corrupt[len(corrupt) // 2] ^= 0xFF  # same size: only the checksum tells
    second.write_bytes(bytes(corrupt))
    assert "CRC-32" not in run("check", sample_dataset, "--images", "skip").output
    r = run("check", sample_dataset, "--images", "skip", "--deep")
    assert r.exit_code == 1 and "CRC-32" in r.output and second.name in r.output

    second.write_bytes(good)
    stray = second.with_name("sample.flat.0123456789ab.0.faiss")
    stray.write_bytes(good)
    r = run("check", sample_dataset, "--images", "skip", "--deep")
    assert "no kept index" in r.output and stray.name in r.output and "CRC-32" not in r.output


@pytest.mark.parametrize("kind,size", [("flat", 300), ("ivf", 300), ("ivfpq", 300), ("ivfpq", 2000), ("lsh", 300)])
def test_every_index_kind_searches_the_same_once_kept(tmp_path, kind, size):
    """Kept and mapped back by faiss, each kind of index (ivfpq: classic codes on small maps,
    4-bit fast-scan from 624 images) finds what it found in memory."""
    from cbir.retrieval.index import IndexConf, build_indexes, index_record, load_indexes, save_indexes
    from cbir.retrieval.search import DescriptorSet

    rng = np.random.default_rng(1)
    x = rng.standard_normal((size, 32)).astype(np.float32)
    attrs = {"name": "g", "config": {}, "descriptor_dim": 32, "descriptor_dtype": "float32"}
    with StoreWriter(tmp_path / "g.h5", "global-features", attrs) as w:
        for i, d in enumerate(x / np.linalg.norm(x, axis=1, keepdims=True)):
            w.add(f"m{i}", descriptors=d)
    conf = IndexConf(kind, nlist=8, nprobe=4, pq_m=8)
    with open_store(tmp_path / "g.h5") as store:
        mset = DescriptorSet.align([store])
        built = build_indexes(mset, conf, torch.device("cpu"))
        save_indexes(tmp_path / "g.h5.index.h5", built, index_record(mset, conf))
        (kept,) = load_indexes(tmp_path / "g.h5.index.h5", mset, conf)
    queries = x[:20] / np.linalg.norm(x[:20], axis=1, keepdims=True)
    for a, b in zip(built[0].search(queries, 10), kept.search(queries, 10), strict=True):
        np.testing.assert_array_equal(a, b)


def test_index_files_of_format_1_0_are_still_read(sample_dataset, tmp_path):
    """Files kept before the faiss files of their own (the serialized index inside the record
    file, format 1.0) are read as they are, with the same results."""
    import faiss
    import h5py

    from cbir.io.index_file import read_index_record

    assert run("index", "build", sample_dataset, "--global", "sample", "--index", "flat").exit_code == 0
    record_file = sample_dataset / "cbir" / "index" / "sample.flat.h5"
    args = ["retrieve", "--map", sample_dataset, "--global", "sample", "--index", "flat", "--topk", "2", "-o"]
    assert run(*args, tmp_path / "new.txt").exit_code == 0
    (faiss_file,) = _faiss_files(sample_dataset, "sample.flat")
    blob = faiss.serialize_index(faiss.read_index(str(faiss_file)))
    record = read_index_record(record_file)
    faiss_file.unlink()
    with h5py.File(record_file, "w") as f:
        f.attrs.update({"cbir_format": "faiss-index", "format_version": "1.0",
                        "record": json.dumps(record, sort_keys=True)})
        f.create_dataset("index_0", data=blob)
    r = run(*args, tmp_path / "old.txt")
    assert r.exit_code == 0 and "for this call only" not in r.output, r.output
    assert read_pairs(tmp_path / "old.txt") == read_pairs(tmp_path / "new.txt")


def test_an_index_rebuilt_while_it_is_loaded_is_read_from_its_new_build(tmp_path, monkeypatch):
    """A retrieve that read the record just before a rebuild removed the files it names reads
    the record again and loads the new build, instead of failing on the missing file."""
    import cbir.retrieval.index as index_mod
    from cbir.io.index_file import read_index_attrs
    from cbir.retrieval.index import IndexConf, build_indexes, index_record, load_indexes, save_indexes
    from cbir.retrieval.search import DescriptorSet

    rng = np.random.default_rng(2)
    attrs = {"name": "g", "config": {}, "descriptor_dim": 8, "descriptor_dtype": "float32"}
    with StoreWriter(tmp_path / "g.h5", "global-features", attrs) as w:
        for i in range(40):
            w.add(f"m{i}", descriptors=rng.random(8).astype(np.float32))
    conf, path = IndexConf("flat"), tmp_path / "g.flat.h5"
    with open_store(tmp_path / "g.h5") as store:
        mset = DescriptorSet.align([store])
        built = build_indexes(mset, conf, torch.device("cpu"))
        save_indexes(path, built, index_record(mset, conf))
        stale = read_index_attrs(path)
        save_indexes(path, built, index_record(mset, conf))  # the rebuild: new files, old ones removed
        reads = iter([stale])
        monkeypatch.setattr(index_mod, "read_index_attrs", lambda p: next(reads, None) or read_index_attrs(p))
        (kept,) = load_indexes(path, mset, conf)
        assert kept.ntotal == 40


def test_sparse_training_is_one_warning_not_a_line_per_kmeans(sample_dataset, capfd):
    """An ivfpq of 3 images: faiss would print "please provide at least N training points"
    once per k-means (one per sub-quantizer); cbir says it once (issue 26)."""
    r = run("index", "build", sample_dataset, "--global", "sample", "--index", "ivfpq")
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "trained on 3 images, where faiss asks for 78" in warnings[0], r.stderr
    assert "please provide" not in capfd.readouterr().err

"""Sharded stores (formats/SPEC.md 5b): a record and its parts read as the one file a merge
makes (every column, every access path, the fingerprint and the checksums), h5py reads the
record's virtual datasets as the columns, appending writes a part and copies nothing, a
merge makes that one file, and a record that lies about its parts is refused in one line."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cbir.cli import main
from cbir.errors import CbirError, FormatError
from cbir.io.store import StoreWriter, open_store
from cbir.io.store.sharded import ShardedStore, merge_sharded, part_path, parts_directory, write_record
from cbir.steps.parts import collect_parts, intact

LOCAL = {"name": "toy", "config": {"k": 1}, "descriptor_dim": 8}
GLOBAL = {"name": "g", "config": {"k": 2}, "descriptor_dim": 16}
NAMES = [f"seq/{i:03d}.jpg" for i in range(60)]


def _local_item(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    k = int(rng.integers(0, 12))  # images without keypoints too: parts with empty runs of rows
    return {"keypoints": rng.random((k, 2), dtype=np.float32), "descriptors": rng.standard_normal((k, 8)).astype(
        np.float32), "scores": rng.random(k, dtype=np.float32), "image_sizes": np.array([640, 480])}


def _global_item(i: int) -> dict[str, np.ndarray]:
    return {"descriptors": np.random.default_rng(1000 + i).standard_normal(16).astype(np.float32)}


KINDS = {"local-features": (LOCAL, _local_item), "global-features": (GLOBAL, _global_item),
         "matches": ({"name": "m", "config": {"k": 3}, "local_features": "toy"},
                     lambda i: {"matches": np.random.default_rng(i).integers(0, 50, (i % 7, 2)).astype(np.int32)})}


def _key(kind: str, i: int) -> str | tuple[str, str]:
    return (NAMES[i], NAMES[(i + 1) % len(NAMES)]) if kind == "matches" else NAMES[i]


def _write(path: Path, kind: str, runs: list[range], sharded: bool | None) -> None:
    attrs, item = KINDS[kind]
    for run in runs:
        with StoreWriter(path, kind, attrs, sharded=sharded) as w:
            for i in run:
                w.add(_key(kind, i), **item(i))


RUNS = [range(0, 17), range(17, 18), range(18, 45), range(45, 60)]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_sharded_store_reads_as_the_one_file_a_merge_makes(tmp_path, kind):
    single, sharded = tmp_path / "single.h5", tmp_path / "sharded.h5"
    _write(single, kind, RUNS, sharded=None)
    _write(sharded, kind, RUNS, sharded=True)
    assert sorted(p.name for p in parts_directory(sharded).iterdir()) == [f"{i:06d}.h5" for i in range(4)]
    with open_store(single) as a, open_store(sharded) as b:
        assert isinstance(b, ShardedStore) and not isinstance(a, ShardedStore)
        assert a.keys == b.keys and a.columns == b.columns and a.config == b.config and len(a) == len(b)
        assert not a.schema.ragged or np.array_equal(a.offsets, b.offsets)
        assert a.fingerprint() == b.fingerprint()  # outputs made from either are not redone
        assert b.verify_checksums() == [] and b.virtual_sources_problems() == []
        for key in a.keys:
            for column, value in a.get(key).items():
                np.testing.assert_array_equal(b.get(key)[column], value, err_msg=f"{key} {column}")
        for batch_a, batch_b in zip(a.iter_batches(7, max_rows=20), b.iter_batches(7, max_rows=20), strict=True):
            assert batch_a[0] == batch_b[0] and np.array_equal(batch_a[2], batch_b[2])
            for column in batch_a[1]:
                np.testing.assert_array_equal(batch_b[1][column], batch_a[1][column])
        per_item = [c for c in a.columns if c not in a.schema.ragged]
        rows = np.array([59, 3, 17, 3, 0, 44, 45, 16, 18])
        for column in per_item:
            np.testing.assert_array_equal(b.read_rows(column, rows), a.read_rows(column, rows))
            run = np.arange(10, 30)  # contiguous, across parts
            np.testing.assert_array_equal(b.read_rows(column, run), a.read_rows(column, run))
        for column in a.columns:
            np.testing.assert_array_equal(b.read_all(column), a.read_all(column))
            assert b.dataset(column).shape == a.dataset(column).shape
            np.testing.assert_array_equal(b.dataset(column)[3:40], a.dataset(column)[3:40])
    with h5py.File(sharded) as f, open_store(single) as a:  # another HDF5 tool: one dataset per column
        for column in a.columns:
            np.testing.assert_array_equal(f[column][()], a.read_all(column))


def test_appending_is_a_new_part_and_copies_nothing(tmp_path):
    path = tmp_path / "local.h5"
    _write(path, "local-features", RUNS[:2], sharded=True)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts_directory(path).iterdir()}
    _write(path, "local-features", RUNS[2:3], sharded=None)  # the store stays sharded
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts_directory(path).iterdir()}
    assert set(after) == set(before) | {"000002.h5"} and all(after[n] == before[n] for n in before)
    with open_store(path) as s:
        assert len(s) == 45 and len(s.parts) == 3


def test_a_single_file_becomes_the_first_part_and_a_merge_makes_it_one_again(tmp_path):
    path = tmp_path / "local.h5"
    _write(path, "local-features", RUNS[:1], sharded=None)
    first_inode = path.stat().st_ino
    _write(path, "local-features", RUNS[1:], sharded=True)
    assert part_path(path, 0).stat().st_ino == first_inode  # renamed, not copied
    with open_store(path) as s:
        fingerprint, keys = s.fingerprint(), s.keys
    result = CliRunner().invoke(main, ["store", "merge", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert '"parts_merged": 4' in result.output and not parts_directory(path).exists()
    with open_store(path) as s:
        assert not isinstance(s, ShardedStore) and s.keys == keys and s.fingerprint() == fingerprint
        assert s.verify_checksums() == []
    assert merge_sharded(path) == 0  # one file already


def test_overwriting_a_sharded_store_replaces_its_parts(tmp_path):
    path = tmp_path / "local.h5"
    _write(path, "local-features", RUNS[:2], sharded=True)
    with StoreWriter(path, "local-features", {**LOCAL, "config": {"k": 9}}, overwrite=True) as w:
        w.add(NAMES[5], **_local_item(5))
    with open_store(path) as s:
        assert isinstance(s, ShardedStore) and s.keys == [NAMES[5]] and s.config == {"k": 9}
        assert [p.name for p in s.parts] == ["000002.h5"]
    assert sorted(p.name for p in parts_directory(path).iterdir()) == ["000002.h5"]


def test_shards_become_parts_after_what_the_store_held(tmp_path):
    final = tmp_path / "local.h5"
    _write(final, "local-features", RUNS[:1], sharded=None)
    shards = [tmp_path / "shards" / f"{i}" / "toy.h5" for i in range(3)]
    for shard, run in zip(shards, RUNS[1:], strict=True):
        shard.parent.mkdir(parents=True)
        _write(shard, "local-features", [run], sharded=None)
    counted = []
    collect_parts(final, shards, "local-features", LOCAL, keep=True, progress=counted.append)
    assert counted == [1, 1, 1] and not any(s.exists() for s in shards)
    with open_store(final) as s:
        assert s.keys == NAMES and len(s.parts) == 4 and s.verify_checksums() == []


def test_a_shard_whose_checksum_fails_is_redone(tmp_path):
    shard = tmp_path / "toy.h5"
    _write(shard, "global-features", [range(5)], sharded=None)
    assert intact(shard)
    with open_store(shard) as s:
        offset = s._infos["descriptors"].offset
    with open(shard, "r+b") as f:  # one flipped byte inside a descriptor
        f.seek(offset + 5)
        byte = f.read(1)
        f.seek(offset + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not intact(shard) and not shard.exists()
    assert not intact(tmp_path / "never-written.h5")


def test_keys_in_two_parts_or_parts_of_another_configuration_are_refused(tmp_path):
    path = tmp_path / "local.h5"
    for i, run in enumerate((range(0, 5), range(4, 8))):
        _write(part_path(path, i), "local-features", [run], sharded=None)
    with pytest.raises(CbirError, match=r"item 'seq/004.jpg' is in two parts \(000000.h5 and 000001.h5\)"):
        write_record(path, [part_path(path, 0), part_path(path, 1)], "local-features", LOCAL)
    with StoreWriter(part_path(path, 2), "local-features", {**LOCAL, "config": {"k": 2}}) as w:
        w.add(NAMES[9], **_local_item(9))
    with pytest.raises(CbirError, match="another name or configuration"):
        write_record(path, [part_path(path, 0), part_path(path, 2)], "local-features", LOCAL)
    assert not path.exists()


def _sharded(tmp_path: Path) -> Path:
    path = tmp_path / "local.h5"
    _write(path, "local-features", RUNS, sharded=True)
    return path


def test_a_missing_or_changed_part_is_an_error_naming_it(tmp_path):
    path = _sharded(tmp_path)
    part_path(path, 1).unlink()
    with open_store(path) as s:  # opening reads the record only
        s.get(NAMES[0])
        with pytest.raises(FormatError, match="part 000001.h5 is missing"):
            s.get(NAMES[17])
    with open(part_path(path, 2), "ab") as f:
        f.write(b"\0" * 10)
    with open_store(path) as s, pytest.raises(FormatError, match="part 000002.h5 has .* bytes, the record says"):
        s.get(NAMES[20])


@pytest.mark.parametrize("lie", ["a part outside its folder", "another folder", "items that do not add up",
                                 "a column past the part's end"])
def test_a_record_that_lies_about_its_parts_is_refused_on_open(tmp_path, lie):
    path = _sharded(tmp_path)
    with h5py.File(path, "r+") as f:
        if lie == "a part outside its folder":
            f["part_files"][0] = "../../x.h5"
        elif lie == "another folder":
            f.attrs["parts_directory"] = ".."
        elif lie == "items that do not add up":
            f["part_items"][0] += 1
        else:
            f["part_layout"][1, 0] = 1 << 40
    with pytest.raises(FormatError) as e:
        open_store(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_virtual_datasets_that_read_other_files_fail_the_check(tmp_path, sample_dataset):
    store = sample_dataset / "cbir/local/sample.h5"
    with open_store(store) as s:
        attrs = {k: v for k, v in s.attrs.items() if k in ("name", "descriptor_dim", "keypoint_params")}
        attrs["config"] = s.config
        kind = s.kind
    parts = parts_directory(store)
    parts.mkdir()
    os.replace(store, parts / "000000.h5")
    write_record(store, [parts / "000000.h5"], kind, attrs)
    assert CliRunner().invoke(main, ["check", str(sample_dataset), "--deep", "--images", "skip"]).exit_code == 0
    with h5py.File(store, "r+") as f:  # the virtual dataset now reads another file (what other tools see)
        layout = h5py.VirtualLayout(shape=f["descriptors"].shape, dtype=f["descriptors"].dtype)
        layout[:] = h5py.VirtualSource("elsewhere.h5", "descriptors", shape=f["descriptors"].shape)
        del f["descriptors"]
        f.create_virtual_dataset("descriptors", layout)
    result = CliRunner().invoke(main, ["check", str(sample_dataset), "--images", "skip"])
    assert result.exit_code == 1 and "reads other files than the parts listed" in result.output


def _shard_in_place(store: Path, runs: int = 3) -> None:
    """The single-file store at ``store`` rewritten as a sharded store of ``runs`` parts."""
    with open_store(store) as s:
        attrs = {**{k: v for k, v in s.attrs.items() if k in ("name", "descriptor_dim", "keypoint_params",
                                                              "local_features", "descriptor_dtype")},
                 "config": s.config}
        kind, keys = s.kind, s.keys
        items = [s.get(k) for k in keys]
    store.unlink()
    cuts = np.linspace(0, len(keys), runs + 1).astype(int)
    for j in range(runs):
        with StoreWriter(part_path(store, j), kind, attrs) as w:
            for k, item in zip(keys[cuts[j]:cuts[j + 1]], items[cuts[j]:cuts[j + 1]], strict=True):
                w.add(k, **item)
    write_record(store, [part_path(store, j) for j in range(runs)], kind, attrs)


def test_exports_of_a_sharded_store_are_those_of_the_one_file(tmp_path, sample_dataset):
    import shutil

    sharded = tmp_path / "sharded"
    shutil.copytree(sample_dataset, sharded)
    for kind in ("local", "global", "matches"):
        for store in sorted((sharded / "cbir" / kind).glob("*.h5")):
            _shard_in_place(store)
    outputs = {}
    for label, root in (("one", sample_dataset), ("sharded", sharded)):
        out = tmp_path / f"kapture-{label}"
        result = CliRunner().invoke(main, ["export", "kapture", str(root), str(out), "--all", "--images", "skip"])
        assert result.exit_code == 0, result.output
        outputs[label] = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert outputs["one"] == outputs["sharded"] and any(str(p).endswith(".desc") for p in outputs["one"])


def test_retrieval_over_a_sharded_map_gives_the_merged_maps_pairs(tmp_path, sample_dataset):
    from cbir.executor import LocalExecutor
    from cbir.io.dataset import Dataset
    from cbir.retrieval import FusionConf, RetrievalConf
    from cbir.retrieval.descriptors import DescriptorSet
    from cbir.retrieval.index import IndexConf

    single, sharded = tmp_path / "single.h5", tmp_path / "sharded.h5"
    _write(single, "global-features", RUNS, sharded=None)
    _write(sharded, "global-features", RUNS, sharded=True)
    conf = RetrievalConf(topk=7, fusion=FusionConf("gharm"), exclude_self=True)
    dataset = Dataset(sample_dataset)  # where indexes would be kept: the search reads the sets it is given
    found = {}
    for label, path in (("one", single), ("sharded", sharded)):
        with open_store(path) as s:
            mset = DescriptorSet.align([s])
            exact = LocalExecutor().retrieve(dataset, dataset, mset, mset, ["g"], conf)
            indexed = LocalExecutor().retrieve(dataset, dataset, mset, mset, ["g"], conf,
                                               index=IndexConf("flat", candidates=30), recall_sample=20)
            found[label] = (exact.pairs, indexed.pairs, indexed.recall)
    assert found["one"] == found["sharded"] and len(found["one"][0]) == 60 * 7



def test_a_part_replaced_by_a_symbolic_link_is_refused(tmp_path):
    path = _sharded(tmp_path)
    part = part_path(path, 3)
    os.replace(part, tmp_path / "moved.h5")
    part.symlink_to(tmp_path / "moved.h5")  # same bytes and size, but through a link
    with open_store(path) as s, pytest.raises(FormatError, match="part 000003.h5 cannot be read .*symbolic link"):
        s.get(NAMES[50])


def test_a_local_run_writes_sharded_output_when_asked(sample_dataset, tmp_path):
    from cbir.io.dataset import Dataset

    names = sorted(Dataset(sample_dataset).sensors.image_names())
    first = tmp_path / "first.txt"
    first.write_text(names[0] + "\n")
    runner = CliRunner()
    for extra in (["--images", str(first)], []):
        result = runner.invoke(main, ["extract", str(sample_dataset), "--local", "sift", "--max-keypoints", "200",
                                      "--sharded", *extra])
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["extract", str(sample_dataset), "--local", "sift", "--max-keypoints", "200",
                                  "--name", "plain"])
    assert result.exit_code == 0, result.output
    local = sample_dataset / "cbir" / "local"
    with open_store(local / "sift.h5") as s, open_store(local / "plain.h5") as p:
        assert isinstance(s, ShardedStore) and len(s.parts) == 2 and sorted(s.keys) == sorted(p.keys) == names
        for key in names:
            for column, value in p.get(key).items():
                np.testing.assert_array_equal(s.get(key)[column], value)


def _map_of(root: Path, names: list[str]) -> None:
    """A dataset at ``root`` whose camera ``left`` recorded ``names`` (retrieval reads no pixel)."""
    import shutil

    from tests.conftest import SAMPLES

    shutil.copytree(SAMPLES / "sensors", root / "sensors", ignore=shutil.ignore_patterns("records_data"))
    (root / "sensors" / "trajectories.txt").unlink()
    (root / "sensors" / "rigs.txt").unlink()
    rows = "".join(f"{t}, left, {n}\n" for t, n in enumerate(names))
    (root / "sensors" / "records_camera.txt").write_text("# kapture format: 1.1\n# timestamp, device_id, "
                                                         f"image_path\n{rows}")


def test_indexes_kept_per_group_of_parts_outlive_parts_added_after_them(tmp_path):
    """An indexed sharded map is cut at part boundaries (whole parts grouped up to
    --shard-size map images): adding a part rebuilds only the last group's index, the
    others are kept, and retrieval through the kept indexes finds what exact search finds."""
    import json

    from cbir.io.pairs import read_pairs

    root = tmp_path / "map"
    _map_of(root, NAMES)
    store = root / "cbir" / "global" / "g.h5"
    store.parent.mkdir(parents=True)
    _write(store, "global-features", [range(0, 10), range(10, 20), range(20, 30)], sharded=True)
    shards = root / "cbir" / "index" / "g.flat.shards"

    def build() -> tuple[int, int, int]:
        result = CliRunner().invoke(main, ["index", "build", str(root), "--global", "g", "--index", "flat",
                                           "--shard-size", "20", "--json"])
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        return summary["shards"], summary["built"], summary["kept"]

    assert build() == (2, 2, 0)  # parts 10 + 10 | 10
    assert sorted(p.name for p in shards.glob("*.h5")) == ["000000000-000000020.h5", "000000020-000000030.h5"]
    _write(store, "global-features", [range(30, 40)], sharded=None)  # appended: a new part
    assert build() == (2, 1, 1)  # 10 + 10 kept | 10 + 10: the last group again
    _write(store, "global-features", [range(40, 60)], sharded=None)
    with open_store(store) as s:
        assert len(s.parts) == 5
    assert build() == (3, 1, 2)  # the new part alone
    assert build() == (3, 0, 3)
    pairs = {}
    for label, extra in (("indexed", ["--index", "flat"]), ("exact", [])):
        out = tmp_path / f"{label}.txt"
        result = CliRunner().invoke(main, ["retrieve", "--map", str(root), "--global", "g", "--topk", "5",
                                           "--shard-size", "20", "-o", str(out), *extra])
        assert result.exit_code == 0, result.output
        assert "for this call only" not in result.output
        pairs[label] = read_pairs(out)
    assert pairs["indexed"] == pairs["exact"] and len(pairs["exact"]) == 60 * 5
    result = CliRunner().invoke(main, ["check", str(root), "--images", "skip"])
    assert "g.flat" not in result.output, result.output  # every kept index matches the parts it was built from
    assert merge_sharded(store) == 5  # one file now: the indexes of its former parts are flagged
    result = CliRunner().invoke(main, ["check", str(root), "--images", "skip"])
    assert result.output.count("g.flat.shards") == 4 and "rebuild it" in result.output, result.output  # 20-30 too


def test_a_part_fingerprint_is_the_parts_own_and_outlives_an_append(tmp_path):
    path = tmp_path / "g.h5"
    _write(path, "global-features", RUNS[:2], sharded=True)
    with open_store(path) as s:
        before = s.part_fingerprints()
        for part, fingerprint in zip(s.parts, before, strict=True):
            with open_store(part) as p:
                assert p.fingerprint() == fingerprint
        assert len(set(before)) == 2
        assert s.fingerprint_of_rows(np.arange(len(s))) == s.fingerprint()
        assert s.fingerprint_of_rows(np.array([3, 5])) == before[:1]
    _write(path, "global-features", RUNS[2:], sharded=None)
    with open_store(path) as s:
        assert s.part_fingerprints()[:2] == before and len(s.parts) == 4
        assert s.fingerprint_of_rows(np.arange(17, 30)) == s.part_fingerprints()[1:3]

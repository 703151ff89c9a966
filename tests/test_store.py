"""Columnar HDF5 stores: layout, slicing, streaming, atomic and resumable writes, locking,
configuration checks and corrupt input."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from cbir.errors import CbirError, FormatError, LockedError, VersionError
from cbir.io.store import StoreWriter, open_store

ATTRS = {"name": "toy", "config": {"max_keypoints": 100, "resize": 1024}}


def _items(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        k = int(rng.integers(0, 40))
        yield f"dir/{i:05d}.jpg", {
            "keypoints": rng.random((k, 2), dtype=np.float32) * 100,
            "descriptors": rng.standard_normal((k, 16)).astype(np.float16),
            "scores": rng.random(k, dtype=np.float32),
            "image_sizes": np.array([640, 480]),
        }


def _write(path: Path, n: int, **kw) -> dict:
    items = dict(_items(n))
    with StoreWriter(path, "local-features", ATTRS, **kw) as w:
        for name, cols in items.items():
            if name not in w:
                w.add(name, **cols)
    return items


def test_layout_is_columnar_and_items_are_slices(tmp_path):
    path = tmp_path / "f.h5"
    items = _write(path, 50, batch_size=7)
    with h5py.File(path) as f:
        assert set(f) == {"names", "keys_blob", "offsets", "keypoints", "descriptors", "scores", "image_sizes"}
        assert f["keys_blob"][()].tobytes().decode().split("\n") == list(f["names"].asstr()[()])
        assert f["offsets"].shape == (51,) and f["offsets"][0] == 0
        assert f["keypoints"].shape == (f["offsets"][-1], 2) and f["keypoints"].chunks is None
        assert f.attrs["format_version"] == "1.2" and f.attrs["cbir_format"] == "local-features"
    with open_store(path) as s:
        assert s.keys == list(items)
        for name, cols in items.items():
            got = s.get(name)
            for c, v in cols.items():
                np.testing.assert_array_equal(got[c], v.astype(got[c].dtype))
        assert s.config == ATTRS["config"]


def test_streaming_covers_everything_in_bounded_batches(tmp_path):
    path = tmp_path / "f.h5"
    items = _write(path, 100)
    seen = []
    with open_store(path) as s:
        for keys, cols, offs in s.iter_batches(batch_size=9, max_rows=60):
            assert len(keys) <= 9 and (len(keys) == 1 or offs[-1] <= 60)
            assert len(cols["keypoints"]) == offs[-1]
            for i, k in enumerate(keys):
                np.testing.assert_array_equal(cols["keypoints"][offs[i]:offs[i + 1]], items[k]["keypoints"])
                seen.append(k)
    assert seen == list(items)


def test_rerun_skips_present_items_and_appends_new_ones(tmp_path):
    path = tmp_path / "f.h5"
    _write(path, 10)
    items = _write(path, 15)  # same config: resumes, adds 5
    with open_store(path) as s:
        assert s.keys == list(items)


def test_other_configuration_is_refused_unless_overwrite(tmp_path):
    path = tmp_path / "f.h5"
    _write(path, 5)
    before = path.read_bytes()
    other = {"name": "toy", "config": {"max_keypoints": 200, "resize": 1024}}
    with pytest.raises(CbirError, match=r"config.max_keypoints: 100 -> 200.*--overwrite"):
        StoreWriter(path, "local-features", other)
    assert path.read_bytes() == before
    with StoreWriter(path, "local-features", other, overwrite=True) as w:
        w.add("x.jpg", keypoints=np.zeros((1, 2)), descriptors=np.zeros((1, 16), np.float16))
    with open_store(path) as s:
        assert s.keys == ["x.jpg"] and s.config["max_keypoints"] == 200


def test_failure_inside_writer_keeps_previous_store_and_finished_batches(tmp_path):
    path = tmp_path / "f.h5"
    _write(path, 5)
    before = path.read_bytes()
    items = list(_items(20, seed=1))
    with pytest.raises(RuntimeError):
        with StoreWriter(path, "local-features", ATTRS, batch_size=4) as w:
            for i, (name, cols) in enumerate(items):
                if i == 10:
                    raise RuntimeError("extractor crashed")
                w.add("new/" + name, **cols)
    assert path.read_bytes() == before  # the finished store is untouched
    batches = sorted((tmp_path / "f.h5.batches").glob("batch-*.h5"))
    assert len(batches) == 3  # 8 items in full batches, and the 2 buffered ones written on the way out
    with StoreWriter(path, "local-features", ATTRS) as w:
        assert sum(("new/" + n) in w for n, _ in items) == 10
        for name, cols in items:
            if "new/" + name not in w:
                w.add("new/" + name, **cols)
    with open_store(path) as s:
        assert len(s) == 25
    assert not (tmp_path / "f.h5.batches").exists() and not (tmp_path / "f.h5.lock").exists()


def test_buffered_items_are_written_every_few_seconds(tmp_path, monkeypatch):
    """A slow extractor (an image every 15 s) loses at most the image in flight when killed:
    items are flushed once ``flush_interval_s`` has passed, whatever the batch size."""
    import cbir.io.store as store_mod

    clock = [0.0]
    monkeypatch.setattr(store_mod.time, "monotonic", lambda: clock[0])
    path = tmp_path / "f.h5"
    w = StoreWriter(path, "local-features", ATTRS, batch_size=64, flush_interval_s=5.0)
    for i, (name, cols) in enumerate(_items(4, seed=2)):
        clock[0] += 15.0 if i else 0.0  # the first item comes quickly, then one every 15 s
        w.add(name, **cols)
    assert len(sorted((tmp_path / "f.h5.batches").glob("batch-*.h5"))) == 3  # items 2, 3 and 4
    w._lock.release()  # as if killed: the lock dies with the process
    with StoreWriter(path, "local-features", ATTRS) as again:
        assert len(again.present) == 4


def test_interrupt_inside_add_leaves_only_whole_items(tmp_path):
    """Ctrl-C can land in the middle of add() (here: while the descriptors of the third item
    are converted, its keypoints already were): what is flushed on the way out is whole
    items only, and the store opens."""
    class Interrupting:
        def __array__(self, *args, **kwargs):
            raise KeyboardInterrupt

    path = tmp_path / "f.h5"
    items = list(_items(3, seed=3))
    with pytest.raises(KeyboardInterrupt):
        with StoreWriter(path, "local-features", ATTRS) as w:
            for i, (name, cols) in enumerate(items):
                w.add(name, **(dict(cols, descriptors=Interrupting()) if i == 2 else cols))
    with StoreWriter(path, "local-features", ATTRS) as w:
        assert w.present == {items[0][0], items[1][0]}
    with open_store(path) as s:
        assert sorted(s.keys) == sorted([items[0][0], items[1][0]])


def test_a_writer_killed_before_its_first_batch_leaves_nothing_to_refuse(tmp_path):
    """A process killed between creating the batch folder and writing its identity (a Ray
    worker killed mid-shard did) leaves an empty folder: the next writer starts afresh;
    batches of unknown identity are still refused."""
    path = tmp_path / "f.h5"
    (tmp_path / "f.h5.batches").mkdir()
    with StoreWriter(path, "local-features", ATTRS) as w:
        for name, cols in _items(3):
            w.add(name, **cols)
    assert len(open_store(path)) == 3
    (tmp_path / "g.h5.batches").mkdir()
    (tmp_path / "g.h5.batches" / "batch-000000.h5").write_bytes(b"")
    with pytest.raises(CbirError, match="unfinished batches"):
        StoreWriter(tmp_path / "g.h5", "local-features", ATTRS)


def test_killed_writer_loses_at_most_the_batch_in_flight(tmp_path):
    """SIGKILL a real writer process in the middle of a run; a re-run resumes."""
    path = tmp_path / "f.h5"
    flag = tmp_path / "flushed"
    script = textwrap.dedent(f"""
        import os, time, numpy as np
        from cbir.io.store import StoreWriter
        w = StoreWriter({str(path)!r}, "local-features", {ATTRS!r}, batch_size=5)
        for i in range(1000):
            w.add(f"{{i:05d}}.jpg", keypoints=np.zeros((3, 2)), descriptors=np.zeros((3, 16), np.float16))
            if i == 12:
                open({str(flag)!r}, "w").close()
                time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(600):
            if flag.exists():
                break
            if proc.poll() is not None:
                pytest.fail("writer exited early")
            import time
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not path.exists()
    with StoreWriter(path, "local-features", ATTRS) as w:  # the dead writer's lock is gone
        assert len(w.present) == 10  # two batches of 5 were flushed; items 10-12 were in flight
        for i in range(10, 20):
            w.add(f"{i:05d}.jpg", keypoints=np.zeros((3, 2)), descriptors=np.zeros((3, 16), np.float16))
    with open_store(path) as s:
        assert s.keys == [f"{i:05d}.jpg" for i in range(20)]


def test_two_writers_cannot_write_the_same_store(tmp_path):
    path = tmp_path / "f.h5"
    with StoreWriter(path, "local-features", ATTRS):
        with pytest.raises(LockedError, match="another process is writing"):
            StoreWriter(path, "local-features", ATTRS)


def test_empty_store_is_valid(tmp_path):
    path = tmp_path / "f.h5"
    with StoreWriter(path, "global-features", {"name": "g", "config": {}}):
        pass
    with open_store(path) as s:
        assert len(s) == 0 and s.read_all("descriptors").shape[0] == 0


def test_items_with_zero_rows(tmp_path):
    path = tmp_path / "f.h5"
    with StoreWriter(path, "local-features", ATTRS) as w:
        w.add("blank.png", keypoints=np.zeros((0, 2)), descriptors=np.zeros((0, 16), np.float16))
        w.add("b.png", keypoints=np.ones((2, 2)), descriptors=np.ones((2, 16), np.float16))
    with open_store(path) as s:
        assert s.get("blank.png")["keypoints"].shape == (0, 2) and s.count("b.png") == 2


def test_matches_store_keys_are_pairs(tmp_path):
    path = tmp_path / "m.h5"
    with StoreWriter(path, "matches", {"name": "nn", "local_features": "toy", "config": {}}) as w:
        w.add(("a.jpg", "b.jpg"), matches=[[0, 1], [1, 0]], scores=[0.5, 0.25], inliers=[True, False])
    with open_store(path, "matches") as s:
        assert s.keys == [("a.jpg", "b.jpg")] and ("a.jpg", "b.jpg") in s and ("b.jpg", "a.jpg") not in s
        np.testing.assert_array_equal(s.get(("a.jpg", "b.jpg"))["inliers"], [True, False])


@pytest.mark.parametrize("bad,message", [
    (dict(keypoints=np.zeros((3, 3))), "rows have shape"),
    (dict(keypoints=np.zeros((3, 2)), descriptors=np.zeros((2, 16))), "has 2 rows, expected 3"),
    (dict(descriptors=np.zeros((2, 16))), "'keypoints' is required"),
    (dict(keypoints=np.zeros((1, 2)), descriptors=np.zeros((1, 16)), colour=np.zeros(1)), "unknown columns"),
])
def test_writer_rejects_malformed_items(tmp_path, bad, message):
    with StoreWriter(tmp_path / "f.h5", "local-features", ATTRS) as w:
        with pytest.raises(ValueError, match=message):
            w.add("x.jpg", **bad)


# ------------------------------------------------------------------ corrupt input

def test_truncated_file(tmp_path):
    path = tmp_path / "f.h5"
    _write(path, 30)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError) as info:
        with open_store(path) as s:
            for _ in s.iter_batches():
                pass
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_garbage_file(tmp_path):
    path = tmp_path / "f.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + os.urandom(5000))
    with pytest.raises(FormatError, match="not a readable HDF5 file"):
        open_store(path)


def test_empty_file(tmp_path):
    path = tmp_path / "f.h5"
    path.write_bytes(b"")
    with pytest.raises(FormatError, match="not a readable HDF5 file"):
        open_store(path)


def test_missing_file(tmp_path):
    with pytest.raises(CbirError, match="file not found"):
        open_store(tmp_path / "nope.h5")


def test_newer_major_version_is_refused(tmp_path):
    path = tmp_path / "f.h5"
    _write(path, 2)
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = "2.0"
    with pytest.raises(VersionError, match=r"format 2.0 is newer than this cbir supports \(1.x\)"):
        open_store(path)


def test_newer_minor_version_is_read(tmp_path):
    path = tmp_path / "f.h5"
    _write(path, 2)
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = "1.7"
        f.create_dataset("something_new", data=[1, 2, 3])
    with open_store(path) as s:
        assert len(s) == 2


def test_inconsistent_offsets(tmp_path):
    path = tmp_path / "f.h5"
    _write(path, 3)
    with h5py.File(path, "a") as f:
        del f["offsets"]
        f["offsets"] = np.array([0, 1])
    with pytest.raises(FormatError, match=r"'offsets' must be 4 integers .*got shape \(2,\)"):
        open_store(path)


def test_wrong_kind(tmp_path):
    path = tmp_path / "f.h5"
    _write(path, 1)
    with pytest.raises(FormatError, match="is a local-features store, expected matches"):
        open_store(path, "matches")


def test_not_a_cbir_file(tmp_path):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        f["x"] = [1]
    with pytest.raises(FormatError, match="not a cbir store"):
        open_store(path)


def test_keys_blob_must_agree_with_the_names(tmp_path):
    """A 1.0 file (no blob) reads the same; a blob that disagrees with the names in any way
    (count, order: swapped names) is refused on open, since readers could not tell which
    image is which."""
    path = tmp_path / "f.h5"
    items = list(_write(path, 20, batch_size=6))
    with h5py.File(path, "a") as f:
        del f["keys_blob"]
    with open_store(path) as s:
        assert s.keys == items
    blob = "\n".join(items).encode()
    swapped = "\n".join([items[1], items[0], *items[2:]]).encode()
    for bad in (b"only\none", swapped):
        with h5py.File(path, "a") as f:
            if "keys_blob" in f:
                del f["keys_blob"]
            f.create_dataset("keys_blob", data=np.frombuffer(bad, np.uint8))
        with pytest.raises(FormatError, match="'keys_blob' disagrees with 'names'"):
            open_store(path)
    with h5py.File(path, "a") as f:
        del f["keys_blob"]
        f.create_dataset("keys_blob", data=np.frombuffer(blob, np.uint8))
    with open_store(path) as s:
        assert s.keys == items


def test_names_with_separators_get_no_blob(tmp_path):
    from cbir.io.store import encode_keys_blob

    assert encode_keys_blob(["a", "b\nc"]) is None and encode_keys_blob([("a", "b\x00")]) is None
    assert encode_keys_blob([("a", "b"), ("c", "d")]).tobytes() == b"a\x00b\nc\x00d"


def test_large_columns_start_on_a_page(tmp_path):
    """Datasets of 1 MiB and more start on a 4 KiB page of the file, so that a row of 8 KiB
    spans two pages, not three; small ones are packed (formats/SPEC.md, 5)."""
    path = tmp_path / "g.h5"
    with StoreWriter(path, "global-features", {"name": "g", "config": {}, "descriptor_dim": 2048,
                                               "descriptor_dtype": "float32"}) as w:
        for i in range(200):  # 1.6 MB of descriptors
            w.add(f"{i:03d}.jpg", descriptors=np.full(2048, i + 1, np.float32))
    with open_store(path) as s:
        assert s._infos["descriptors"].offset % 4096 == 0
        np.testing.assert_array_equal(s.read_rows("descriptors", np.array([150, 3]))[:, 0], [151, 4])


def test_scattered_rows_are_read_in_the_order_asked(tmp_path):
    """``read_rows`` of scattered (repeated, unsorted) rows returns them in the order asked."""
    rng = np.random.default_rng(0)
    desc = rng.standard_normal((300, 24)).astype(np.float32)
    path = tmp_path / "g.h5"
    with StoreWriter(path, "global-features", {"name": "g", "config": {}, "descriptor_dim": 24,
                                               "descriptor_dtype": "float32"}) as w:
        for i, d in enumerate(desc):
            w.add(f"{i:03d}.jpg", descriptors=d)
    rows = rng.integers(0, 300, 100)
    with open_store(path) as s:
        np.testing.assert_array_equal(s.read_rows("descriptors", rows), desc[rows])
        np.testing.assert_array_equal(s.read_rows("descriptors", np.arange(40, 60)), desc[40:60])
        with pytest.raises(IndexError, match="beyond"):  # a caller's error, not the file's
            s.read_rows("descriptors", np.array([3, 300]))


# ---------------------------------------------------------------- merging
def test_crc32_combine_equals_the_crc_of_the_concatenation():
    """``crc32_combine`` gives zlib's CRC-32 of ``a + b`` from the two parts' CRCs (any
    lengths, empty ones included), which merging records without reading the parts."""
    import zlib

    from cbir.io.store import crc32_combine

    rng = np.random.default_rng(0)
    for la, lb in [(0, 0), (0, 5), (7, 0), (1, 1), (1000, 4096), (3, 70_001)]:
        a, b = rng.bytes(la), rng.bytes(lb)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), lb) == zlib.crc32(a + b), (la, lb)


def _merge_parts(tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "merged.h5"
    return out, _merge_parts_into(tmp_path, out)


def _merge_parts_into(tmp_path: Path, out: Path) -> dict:
    """Two stores written, then merged into ``out``: the items of both, in order."""
    from cbir.io.store import merge_stores

    first, second = dict(_items(30)), dict(_items(20, seed=1))
    second = {k.replace("dir/", "other/"): v for k, v in second.items()}
    for path, items in (("a.h5", first), ("b.h5", second)):
        with StoreWriter(tmp_path / path, "local-features", ATTRS) as w:
            for name, cols in items.items():
                w.add(name, **cols)
    with open_store(tmp_path / "a.h5") as s:
        schema = s.schema
    merge_stores([tmp_path / "a.h5", tmp_path / "b.h5"], out, schema, ATTRS)
    return {**first, **second}


@pytest.mark.parametrize("kernel_copy", ["copy_file_range", "refused", "absent"])
def test_merged_store_holds_every_part_and_checksums_that_verify(tmp_path, monkeypatch, kernel_copy):
    """Merging copies each part's columns (by the kernel, or through the process where the
    file system refuses or the OS lacks ``copy_file_range``): the merged store reads back
    every item of every part, and its combined checksums verify."""
    import errno

    if kernel_copy == "refused":
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    elif kernel_copy == "absent":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    out, items = _merge_parts(tmp_path)
    with open_store(out) as s:
        assert s.keys == list(items) and s.verify_checksums() == []
        for name, cols in items.items():
            for column, value in cols.items():
                np.testing.assert_array_equal(s.get(name)[column], value)


def test_batch_files_record_checksums_that_verify(tmp_path):
    """A writer's batch files record their CRCs when written (so that its close copies them
    without reading them): they verify, and the store they merge into verifies."""
    w = StoreWriter(tmp_path / "s.h5", "local-features", ATTRS, batch_size=7)
    for name, cols in _items(20):
        w.add(name, **cols)
    w.flush()
    batches = sorted((tmp_path / "s.h5.batches").glob("batch-*.h5"))
    assert len(batches) == 3
    for batch in batches:
        with open_store(batch) as s:
            assert s.verify_checksums() == []
    w.close()
    with open_store(tmp_path / "s.h5") as s:
        assert len(s) == 20 and s.verify_checksums() == []


def test_a_part_whose_checksum_is_wrong_leaves_a_merged_store_that_says_so(tmp_path):
    """A part's recorded CRC is combined, not recomputed: bytes changed in a part after it
    was written are reported by the merged store's check, not blessed with a new checksum."""
    import h5py

    with StoreWriter(tmp_path / "b.h5", "local-features", ATTRS) as w:
        for name, cols in _items(5, seed=1):
            w.add(name.replace("dir/", "other/"), **cols)
    with h5py.File(tmp_path / "b.h5", "r+") as f:
        f["scores"][0] = f["scores"][0] + 1
    from cbir.io.store import merge_stores

    with StoreWriter(tmp_path / "a.h5", "local-features", ATTRS) as w:
        for name, cols in _items(5):
            w.add(name, **cols)
    with open_store(tmp_path / "a.h5") as s:
        schema = s.schema
    merge_stores([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "m.h5", schema, ATTRS)
    with open_store(tmp_path / "m.h5") as s:
        assert s.verify_checksums() == ["'scores' changed since the store was written (checksum)"]


def test_a_copy_that_fails_names_the_part_in_one_line(tmp_path, monkeypatch):
    """An I/O error while copying a part (not a full disk, which says so) is one line naming
    the part and the column, and leaves no merged file."""
    import errno

    from cbir.io.atomic import atomic_output

    def fail(*args):
        raise OSError(errno.EIO, "Input/output error")

    from cbir.io.store import merge_stores

    _write(tmp_path / "a.h5", 10)
    with open_store(tmp_path / "a.h5") as s:
        schema = s.schema
    monkeypatch.setattr(os, "copy_file_range", fail, raising=False)
    copy_failed = r"a\.h5: cannot copy column '\w+' into merged\.h5\.[\w-]+\.partial \(.*Input/output"
    with pytest.raises(CbirError, match=copy_failed):
        with atomic_output(tmp_path / "merged.h5") as tmp:
            merge_stores([tmp_path / "a.h5"], tmp, schema, ATTRS)
    assert not list(tmp_path.glob("merged*"))


def test_copy_blocks_are_bounded_in_bytes():
    """Merging and verifying read at most 64 MB at a time, whatever the row size (a 2048-D
    float32 row is 8 KB: a block of a million of them would be 8 GB)."""
    from cbir.io.store import _COPY_BLOCK_BYTES, _row_blocks

    for total, row_bytes in [(0, 8), (10, 8), (3_000_000, 8192), (5, 200 << 20)]:
        spans = list(_row_blocks(total, row_bytes))
        assert sum(s.stop - s.start for s in spans) == total
        assert all(s.stop - s.start == 1 or (s.stop - s.start) * row_bytes <= _COPY_BLOCK_BYTES for s in spans)


def test_metadata_is_read_by_a_process_holding_descriptors_past_1024(tmp_path):
    """The child's answer is waited for with poll(), not select(), which refuses descriptors
    from 1024 on (a process reading many parts, sockets or files may hold that many)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"this system allows {hard} open files")
    path = tmp_path / "g.h5"
    with StoreWriter(path, "global-features", {"name": "g", "config": {}, "descriptor_dim": 4}) as w:
        w.add("a.jpg", descriptors=np.ones(4, np.float32))
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with open_store(path) as s:
            assert s.keys == ["a.jpg"]
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

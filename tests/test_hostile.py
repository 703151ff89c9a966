"""Hostile and corrupt input: each case of the audit (issue 11) reproduced.

Every case runs the real command (in-process, ``catch_exceptions=False``: a traceback
fails the test) and checks the outcome the user must see: exit code 1 and one line
naming the file and the problem, or the bad item skipped and reported; nothing written
outside the target; no hang (corrupt HDF5 metadata is read in a time-limited child).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cbir.cli import main
from cbir.errors import CbirError, FormatError
from cbir.io.store import STR_DTYPE, Store, StoreWriter, open_store

from .hdf5_storage import FOREIGN_STORAGE, store_column_as


def run(*args) -> CliRunner.Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(result, *fragments: str) -> str:
    """The run failed with exit code 1 and one error line holding every fragment."""
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    line = " ".join(result.output.split())  # rich may wrap a long line
    for f in fragments:
        assert f in line, (f, result.output)
    return line


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def written_outside(root: Path, before: set[Path], target: Path) -> set[Path]:
    """Paths under ``root`` that appeared since ``before`` and are not ``target`` or in it."""
    return {p for p in files_under(root) - before if p != target and target not in p.parents}


def rewrite(path: Path, **datasets) -> None:
    """Replace datasets of an HDF5 file (None deletes one)."""
    with h5py.File(path, "a") as f:
        for name, data in datasets.items():
            if name in f:
                del f[name]
            if data is not None:
                f.create_dataset(name, data=data, **({"dtype": STR_DTYPE} if _is_text(data) else {}))


def _is_text(data) -> bool:
    arr = np.asarray(data, dtype=object)
    return arr.size > 0 and isinstance(arr.flat[0], str)


def set_names(path: Path, names: list[str]) -> None:
    """Rename a store's items consistently (names and keys_blob), as a tool editing it would."""
    rewrite(path, names=np.array(names, dtype=object),
            keys_blob=np.frombuffer("\n".join(names).encode(), np.uint8))


# ============================================================================ 1. writes outside the target

@pytest.fixture
def kapture_src(maupertuis, tmp_path) -> Path:
    src = tmp_path / "work" / "src"
    shutil.copytree(maupertuis, src)
    for p in src.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return src


@pytest.mark.parametrize("kp_type", ["../escaped", "ABS", "a/b", ".."])
def test_kapture_import_refuses_observation_types_that_are_paths(kapture_src, tmp_path, kp_type):
    if kp_type == "ABS":
        kp_type = str(tmp_path / "escaped")
    obs = kapture_src / "reconstruction/observations.txt"
    lines = obs.read_text().splitlines()
    data = [i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#")]
    fields = lines[data[0]].split(",")
    fields[1] = f" {kp_type}"
    lines[data[0]] = ",".join(fields)
    obs.write_text("\n".join(lines) + "\n")
    before = files_under(tmp_path)
    result = run("import", "kapture", kapture_src, tmp_path / "work" / "dst", "--images", "skip")
    one_line_error(result, "observations.txt:", "keypoints type", "invalid store name")
    assert files_under(tmp_path) == before  # refused before anything was written
    assert not list(tmp_path.rglob("escaped*"))


def test_kapture_import_refuses_a_keypoints_type_that_leaves_the_source(kapture_src, tmp_path):
    desc = kapture_src / "reconstruction/descriptors/SIFT/descriptors.txt"
    desc.write_text(desc.read_text().replace("SIFT, L2", "../../../x, L2"))
    assert "../../../x" in desc.read_text()
    result = run("import", "kapture", kapture_src, tmp_path / "work" / "dst", "--images", "skip")
    one_line_error(result, "descriptors.txt:", "keypoints_type '../../../x' is not a single file name")


@pytest.mark.parametrize("evil", ["../../escaped.jpg", "/ABS/escaped.jpg"])
def test_kapture_export_refuses_store_keys_that_leave_the_target(sample_dataset, tmp_path, evil):
    evil = evil.replace("/ABS", str(tmp_path))
    store = sample_dataset / "cbir/local/sample.h5"
    with open_store(store) as s:
        names = list(s.keys)
    set_names(store, [evil] + names[1:])
    before = files_under(tmp_path)
    result = run("export", "kapture", sample_dataset, tmp_path / "out", "--local", "sample", "--images", "skip")
    one_line_error(result, "sample.h5", "image name", repr(evil))
    assert not written_outside(tmp_path, before, tmp_path / "out")
    assert not list(tmp_path.rglob("escaped*"))


def test_store_writer_refuses_keys_that_cannot_be_image_paths(tmp_path):
    with StoreWriter(tmp_path / "g.h5", "global-features", {"name": "g"}) as w:
        for bad in ("../x.jpg", "/x.jpg", "a/./b.jpg", "a\\b.jpg", "a\0b.jpg", "x" * 256 + ".jpg"):
            with pytest.raises(CbirError, match="image name"):
                w.add(bad, descriptors=np.ones(4, np.float32) / 2)


def test_hloc_import_refuses_dotdot_groups(sample_dataset, tmp_path):
    feats = tmp_path / "feats.h5"
    with h5py.File(feats, "w") as f:
        for name in ("left/000.png", "../../escaped.png"):
            g = f.create_group(name)
            g.create_dataset("keypoints", data=np.zeros((2, 2), np.float32))
            g.create_dataset("descriptors", data=np.zeros((4, 2), np.float32))
    result = run("import", "hloc", sample_dataset, "--features", feats)
    one_line_error(result, "feats.h5:", "image group", "escapes")
    assert not (sample_dataset / "cbir/local/hloc.h5").exists()


def _colmap_text_model(root: Path, image_name: str) -> Path:
    root.mkdir(parents=True)
    (root / "cameras.txt").write_text("1 PINHOLE 64 48 60 60 32 24\n")
    (root / "images.txt").write_text(f"1 1 0 0 0 0 0 0 1 {image_name}\n\n")
    (root / "points3D.txt").write_text("")
    return root


def test_colmap_import_refuses_image_names_that_leave_the_dataset(tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"not for copying")
    model = _colmap_text_model(tmp_path / "work" / "model", "../../../secret.jpg")
    images = tmp_path / "work" / "images"
    images.mkdir()
    before = files_under(tmp_path)
    result = run("import", "colmap", model, tmp_path / "work" / "ds", "--image-dir", images)
    one_line_error(result, "model", "image 1", "escapes records_data/ with '..'")
    assert files_under(tmp_path) == before


def test_result_names_cannot_leave_the_dataset(sample_dataset, tmp_path):
    before = files_under(tmp_path)
    result = run("localize", "--query", sample_dataset, "--map", sample_dataset, "--pairs",
                 sample_dataset / "cbir/pairs/sample.txt", "--local", "sample", "--matches", "sample",
                 "--name", "../../escaped")
    one_line_error(result, "invalid store name '../../escaped'")
    assert files_under(tmp_path) == before


def test_images_linked_out_of_records_data_are_refused_on_copy(tmp_path):
    """A records_data/ symlink that leads elsewhere cannot be used to write outside."""
    model = _colmap_text_model(tmp_path / "model", "sub/a.jpg")
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "sub/a.jpg").write_bytes(b"x")
    dst = tmp_path / "ds"
    (dst / "sensors/records_data").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (dst / "sensors/records_data/sub").symlink_to(tmp_path / "elsewhere")
    result = run("import", "colmap", model, dst, "--image-dir", images)
    one_line_error(result, "leads out of", "symbolic link")
    assert not any((tmp_path / "elsewhere").iterdir())


# ============================================================================ 2. no hang

def _zero_global_heap(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(b"GCOL")
    assert at > 0, "no global heap collection in the file"
    data[at + 16:at + 16 + 128] = bytes(128)
    path.write_bytes(bytes(data))


def test_corrupt_global_heap_is_reported_not_hung(sample_dataset, monkeypatch):
    """libhdf5 spins forever reading a string attribute of this file; every command that
    opens it reports a corrupt file within the time limit instead."""
    monkeypatch.setenv("CBIR_HDF5_TIMEOUT", "3")
    store = sample_dataset / "cbir/global/sample.h5"
    _zero_global_heap(store)
    start = time.monotonic()
    with pytest.raises(FormatError, match="did not finish in 3 s: the file is corrupt"):
        open_store(store)
    one_line_error(run("check", sample_dataset, "--images", "skip"), "sample.h5", "corrupt")
    one_line_error(run("retrieve", "--map", sample_dataset, "--global", "sample", "--topk", "1",
                       "-o", sample_dataset / "p.txt"), "sample.h5", "corrupt")
    info = run("info", sample_dataset)
    assert info.exit_code == 0 and "corrupt" in " ".join(info.output.split())
    assert time.monotonic() - start < 40


# ============================================================================ 3. structure checked on open

def _store_cases(tmp_path: Path):
    """(name, mutation, expected message) over copies of the sample stores."""
    local, glob, matches = "cbir/local/sample.h5", "cbir/global/sample.h5", "cbir/matches/sample.h5"
    return [
        ("decreasing offsets", local, lambda p: rewrite(p, offsets=np.array([0, 5, 3, 9])),
         "'offsets' must start at 0 and never decrease"),
        ("offsets not from 0", local, lambda p: rewrite(p, offsets=np.array([1, 5, 9, 9])),
         "'offsets' must start at 0"),
        ("float offsets", local, lambda p: rewrite(p, offsets=np.array([0, 5.0, 9, 9])),
         "'offsets' must be 4 integers"),
        ("fewer descriptors than keypoints", local,
         lambda p: rewrite(p, descriptors=np.zeros((7, 8), np.float16)), "'descriptors' has 7 rows, offsets end at 9"),
        ("image_sizes rows", local, lambda p: rewrite(p, image_sizes=np.zeros((2, 2), np.int32)),
         "'image_sizes' has 2 rows, items: 3"),
        ("1-D descriptors", local, lambda p: rewrite(p, descriptors=np.zeros(9, np.float16)),
         "'descriptors' rows have shape ()"),
        ("string descriptors", glob, lambda p: rewrite(p, descriptors=np.array(["a", "b", "c"], dtype=object)),
         "'descriptors' is not numeric"),
        ("fewer global rows than names", glob, lambda p: rewrite(p, descriptors=np.ones((2, 4), np.float32)),
         "'descriptors' has 2 rows, items: 3"),
        ("keypoints as float64", local, lambda p: rewrite(p, keypoints=np.zeros((9, 2))),
         "'keypoints' is float64, expected float32"),
        ("swapped names", glob, lambda p: rewrite(p, names=np.array(["right/000.png", "left/000.png", "left/001.png"],
                                                                     dtype=object)),
         "'keys_blob' disagrees with 'names'"),
        ("duplicate names", glob, lambda p: set_names(p, ["left/000.png", "left/000.png", "left/001.png"]),
         "duplicate item 'left/000.png'"),
        ("names not strings", glob, lambda p: rewrite(p, names=np.arange(3), keys_blob=None),
         "'names' must hold strings"),
        ("names 2-D", glob, lambda p: rewrite(p, names=np.array([["a", "b"]] * 3, dtype=object), keys_blob=None),
         "'names' has shape (3, 2), expected (N,)"),
        ("names a group", glob, lambda p: _replace_by_group(p, "names"), "'names' is a group"),
        ("config a list", glob, lambda p: _set_attr(p, "config", "[1, 2]"), "'config' attribute is not a JSON object"),
        ("config not JSON", glob, lambda p: _set_attr(p, "config", "{oops"), "'config' attribute is not valid JSON"),
        ("config a number", glob, lambda p: _set_attr(p, "config", 3), "the 'config' attribute is not a string"),
        ("pairs 1-D", matches, lambda p: rewrite(p, pairs=np.array(["a", "b", "c"], dtype=object), keys_blob=None),
         "'pairs' has shape (3,), expected (N, 2)"),
        ("matches 3 columns", matches, lambda p: _resize_matches(p), "'matches' rows have shape (3,), expected (2)"),
        ("newer major version", glob, lambda p: _set_attr(p, "format_version", "2.0"), "newer than this cbir"),
        ("not a store", glob, lambda p: _set_attr(p, "cbir_format", None), "not a cbir store"),
        ("dimension an array", glob, lambda p: _set_attr(p, "descriptor_dim", np.arange(3)),
         "the 'descriptor_dim' attribute is not an integer"),
    ]


def _set_attr(path: Path, key: str, value) -> None:
    with h5py.File(path, "a") as f:
        if value is None:
            del f.attrs[key]
        else:
            f.attrs[key] = value


def _replace_by_group(path: Path, name: str) -> None:
    with h5py.File(path, "a") as f:
        del f[name]
        f.create_group(name)


def _resize_matches(path: Path) -> None:
    with h5py.File(path, "a") as f:
        m = f["matches"][()]
    rewrite(path, matches=np.column_stack([m, m[:, :1]]))


@pytest.mark.parametrize("case", range(22))
def test_broken_store_structure_is_refused_on_open(sample_dataset, tmp_path, case):
    name, rel, mutate, message = _store_cases(tmp_path)[case]
    path = sample_dataset / rel
    mutate(path)
    with pytest.raises(CbirError) as e:
        Store(path).close()
    assert message in str(e.value), (name, str(e.value))
    assert str(path) in str(e.value)


def test_swapped_names_stop_retrieve_and_match(sample_dataset):
    """Readers, not only `cbir check`, refuse a store whose names disagree with keys_blob."""
    for rel, argv in (("cbir/global/sample.h5", ["retrieve", "--map", sample_dataset, "--global", "sample",
                                                  "--topk", "1", "-o", sample_dataset / "p.txt"]),
                      ("cbir/local/sample.h5", ["match", "--query", sample_dataset, "--pairs",
                                                sample_dataset / "cbir/pairs/sample.txt", "--local", "sample"])):
        path = sample_dataset / rel
        backup = path.read_bytes()
        rewrite(path, names=np.array(["right/000.png", "left/000.png", "left/001.png"], dtype=object))
        one_line_error(run(*argv), rel, "'keys_blob' disagrees")
        path.write_bytes(backup)


def test_deep_check_finds_values_changed_inside_a_column(sample_dataset):
    assert run("check", sample_dataset, "--deep", "--images", "skip").exit_code == 0
    with h5py.File(sample_dataset / "cbir/local/sample.h5", "a") as f:
        f["keypoints"][3] = f["keypoints"][3] + 1.0
    assert run("check", sample_dataset, "--images", "skip").exit_code == 0  # plausible values: only checksums see it
    result = run("check", sample_dataset, "--deep", "--images", "skip")
    assert result.exit_code == 1
    assert "'keypoints' changed since the store was written (checksum)" in " ".join(result.output.split())


def test_matches_indexing_beyond_the_keypoints_stop_their_consumers(sample_dataset, tmp_path):
    """Matches made on other features (or damaged) index keypoints that do not exist:
    export and drawing refuse them instead of crashing or drawing the wrong points."""
    with h5py.File(sample_dataset / "cbir/matches/sample.h5", "a") as f:
        f["matches"][0] = [4, 99]
        pair = tuple(x.decode() for x in f["pairs"][0])
    one_line_error(run("export", "hloc", sample_dataset, "--local", "sample", "--matches", "sample",
                       "--matches-out", tmp_path / "m.h5"), "matches/sample.h5", "match index 99 beyond")
    one_line_error(run("show", "matches", sample_dataset, "--pair", *pair, "-o", tmp_path / "p.png"),
                   "matches/sample.h5", "beyond")
    assert not (tmp_path / "m.h5").exists()


def test_non_finite_features_stop_matching(sample_dataset):
    with h5py.File(sample_dataset / "cbir/local/sample.h5", "a") as f:
        f["descriptors"][1] = np.nan
    one_line_error(run("match", "--query", sample_dataset, "--pairs", sample_dataset / "cbir/pairs/sample.txt",
                       "--local", "sample", "--name", "m"),
                   "local/sample.h5", "the descriptors of 'left/000.png' have NaN or infinite values")


def test_matches_are_used_only_with_the_features_they_were_made_on(sample_dataset):
    """Provenance (issue 12, item 1): matches of another local-feature store, or of another
    configuration of the same store, are refused by their consumers and by `cbir check`;
    a mistyped --matches is "not found", not "another configuration"."""
    shutil.copyfile(sample_dataset / "cbir/local/sample.h5", sample_dataset / "cbir/local/other.h5")
    one_line_error(run("map", sample_dataset, "--local", "other", "--matches", "sample"),
                   "matches/sample.h5", "made on the local features 'sample', not 'other'")
    one_line_error(run("map", sample_dataset, "--local", "sample", "--matches", "typo"),
                   "matches/typo.h5", "file not found")
    assert run("match", "--query", sample_dataset, "--pairs", sample_dataset / "cbir/pairs/sample.txt",
               "--local", "sample", "--name", "m").exit_code == 0
    with h5py.File(sample_dataset / "cbir/local/sample.h5", "a") as f:
        f.attrs["config"] = '{"max_keypoints": 6}'
    one_line_error(run("map", sample_dataset, "--local", "sample", "--matches", "m"),
                   "matches/m.h5", "made on another configuration of 'sample' (max_keypoints: ")
    result = run("check", sample_dataset, "--images", "skip")
    assert result.exit_code == 1 and "made on another configuration of 'sample'" in " ".join(result.output.split())


def test_string_datasets_whose_names_hold_a_separator_read_back(tmp_path):
    """Names holding '\\n' come back from the reader's child as a list, not joined bytes: the
    store and the map readers decode both forms the same way."""
    from cbir.io.map_store import PointMap, read_map, write_map

    names = ["a\nb.jpg", "c.jpg"]
    with StoreWriter(tmp_path / "g.h5", "global-features", {"name": "g"}):
        pass  # an empty store, its names replaced below
    rewrite(tmp_path / "g.h5", names=np.array(names, dtype=object), keys_blob=None,
            descriptors=np.ones((2, 4), np.float32) / 2)
    with open_store(tmp_path / "g.h5") as s:
        assert s.keys == names
    m = PointMap(images=names, points=np.zeros((1, 3)), colors=np.zeros((1, 3), np.uint8),
                 errors=np.zeros(1, np.float32), track_offsets=np.array([0, 2]),
                 track_images=np.array([0, 1], np.int32), track_keypoints=np.array([0, 0], np.int32))
    write_map(tmp_path / "m.h5", m)
    assert read_map(tmp_path / "m.h5").images == names


def test_closing_a_store_while_its_memory_map_is_viewed(sample_dataset):
    s = open_store(sample_dataset / "cbir/global/sample.h5")
    view = s._views["descriptors"]  # e.g. held by a traceback frame
    s.close()  # no BufferError
    assert view.shape == (3, 4)


# ============================================================================ 4. one-line errors

@pytest.mark.parametrize("width", ["inf", "1e400", "nan", "-64", "64.5", "0", "3e9"])
def test_camera_sizes_that_are_not_image_sizes(sample_dataset, width):
    sensors = sample_dataset / "sensors/sensors.txt"
    sensors.write_text(sensors.read_text().replace("SIMPLE_RADIAL, 64,", f"SIMPLE_RADIAL, {width},"))
    for cmd in (["info", sample_dataset], ["check", sample_dataset], ["extract", sample_dataset, "--local", "sift"]):
        one_line_error(run(*cmd), "sensors.txt:3", "image size must be integers")


@pytest.mark.parametrize("name, message", [("left/a\0b.png", "contains a NUL byte"),
                                           ("left/" + "x" * 300 + ".png", "over 255 bytes"),
                                           ("left/a\tb.png", "control character")])
def test_image_names_that_cannot_be_files(sample_dataset, name, message):
    records = sample_dataset / "sensors/records_camera.txt"
    records.write_text(records.read_text().replace("left/001.png", name))
    one_line_error(run("info", sample_dataset), "records_camera.txt:5", message)


def test_utf8_bom_is_named(sample_dataset, tmp_path):
    sensors = sample_dataset / "sensors/sensors.txt"
    sensors.write_bytes(b"\xef\xbb\xbf" + sensors.read_bytes())
    one_line_error(run("info", sample_dataset), "sensors.txt:1", "byte-order mark (BOM)")
    pairs = tmp_path / "pairs.txt"
    pairs.write_bytes(b"\xef\xbb\xbfleft/000.png, right/000.png\n")
    sensors.write_bytes(sensors.read_bytes()[3:])
    one_line_error(run("match", "--query", sample_dataset, "--pairs", pairs, "--local", "sample"),
                   "pairs.txt", "byte-order mark (BOM)")


def test_records_file_that_is_a_symlink_loop(sample_dataset):
    records = sample_dataset / "sensors/records_camera.txt"
    records.unlink()
    records.symlink_to(records)
    one_line_error(run("info", sample_dataset), "records_camera.txt", "cannot read", "symbolic links")


def _png_header_claiming(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_image_claiming_a_huge_size_is_skipped_not_fatal(sample_dataset):
    (sample_dataset / "sensors/records_data/right/000.png").write_bytes(_png_header_claiming(100000, 100000))
    result = run("extract", sample_dataset, "--local", "sift", "--json")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "right/000.png" in out and "over the limit of 268435456" in out
    with open_store(sample_dataset / "cbir/local/sift.h5") as s:
        assert sorted(s.keys) == ["left/000.png", "left/001.png"]
    small = run("extract", sample_dataset, "--local", "rootsift", "--max-image-pixels", "1000")
    one_line_error(small, "rootsift.h5", "no image could be extracted (3 skipped", "over the limit of 1000")
    assert run("extract", sample_dataset, "--local", "rootsift").exit_code == 0  # the empty store blocks nothing


def test_check_compares_sizes_of_stored_pixels(sample_dataset):
    """One EXIF rule for the whole tool: a rotated photo is reported against intrinsics of
    the stored pixels, with the reason."""
    import cv2

    path = sample_dataset / "sensors/records_data/left/000.png"
    cv2.imwrite(str(path), np.zeros((64, 48, 3), np.uint8))
    result = run("check", sample_dataset)
    assert "image is 48x64 but camera 'left' is 64x48 (rotated" in " ".join(result.output.split())


# ============================================================================ disk full, signals

def test_no_space_left_is_one_line_and_resumable(sample_dataset, monkeypatch):
    import cbir.io.store.writer as store_mod  # where the writer looks _write_arrays up

    real = store_mod._write_arrays

    def full(*args, **kwargs):
        raise OSError("Can't write data (file write failed: errno = 28, error message = 'No space left on device')")

    monkeypatch.setattr(store_mod, "_write_arrays", full)
    one_line_error(run("extract", sample_dataset, "--local", "sift"), "sift.h5.batches/batch-000000.h5",
                   "no space left on the device")
    monkeypatch.setattr(store_mod, "_write_arrays", real)
    assert run("extract", sample_dataset, "--local", "sift").exit_code == 0


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_really_full_disk(sceaux, tmp_path):
    """On a real full file system (a small tmpfs): one line, the store resumable once there
    is space, and the result equal to a run that had space all along."""
    mnt = tmp_path / "mnt"
    if not _mount_tmpfs(mnt, "6m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        ds = mnt / "ds"
        shutil.copytree(sceaux / "mapping" / "sensors", ds / "sensors")
        free = shutil.disk_usage(mnt).free
        (mnt / "filler").write_bytes(b"\0" * (free - 64 * 1024))
        args = ["extract", ds, "--local", "sift", "--max-keypoints", "500"]
        one_line_error(run(*args), "no space left on the device")
        (mnt / "filler").unlink()
        assert run(*args).exit_code == 0
        clean = tmp_path / "clean"
        shutil.copytree(sceaux / "mapping" / "sensors", clean / "sensors")
        assert run("extract", clean, "--local", "sift", "--max-keypoints", "500").exit_code == 0
        with open_store(ds / "cbir/local/sift.h5") as a, open_store(clean / "cbir/local/sift.h5") as b:
            assert a.keys == b.keys
            np.testing.assert_array_equal(a.read_all("keypoints"), b.read_all("keypoints"))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_sigterm_during_pycolmap_work_is_one_line(sceaux, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(sceaux / "mapping" / "sensors", ds / "sensors")
    assert run("extract", ds, "--local", "sift", "--max-keypoints", "4000").exit_code == 0
    assert run("pairs", "exhaustive", "--map", ds, "-o", ds / "pairs.txt").exit_code == 0
    proc = subprocess.Popen([sys.executable, "-m", "cbir", "match", "--query", ds, "--pairs", ds / "pairs.txt",
                             "--local", "sift", "--verify", "--name", "m"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = ds / "cbir/matches/m.h5.lock"
    deadline = time.monotonic() + 60
    while not lock.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # inside matching and pycolmap's verification threads
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("terminated: finished batches are kept"), err
    assert "Aborted" not in err and "stack trace" not in err and len(lines) <= 2, err


def test_sigterm_to_a_forked_worker_does_not_end_the_command():
    """Localization's workers are forked: a SIGTERM that reaches one of them alone must not
    wake the command's own watcher (which would end the whole command)."""
    script = """
import os, signal, sys, time
import cbir.cli as cli
cli.TERMINATION_GRACE_S = 0.2
cli.handle_termination()
pid = os.fork()
if pid == 0:
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    except cli.Terminated:
        os._exit(7)
    os._exit(0)
_, status = os.waitpid(pid, 0)
time.sleep(1.0)
print("alive", os.waitstatus_to_exitcode(status))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "alive 7", (proc.stdout, proc.stderr)



# ============================================================================ 5. a dataset from a stranger
# (issue 31): nothing outside the dataset read or written through links or HDF5 references

PRECIOUS = "precious: not cbir's to touch\n"


@pytest.fixture
def victim(tmp_path) -> Path:
    """A user's file outside the dataset, which no link inside it may make cbir read or write."""
    path = tmp_path / "home" / "victim.txt"
    path.parent.mkdir()
    path.write_text(PRECIOUS)
    return path


def test_a_planted_lock_link_is_refused_and_its_target_untouched(sample_dataset, victim):
    (sample_dataset / "cbir/local/sift.h5.lock").symlink_to(victim)
    result = run("extract", sample_dataset, "--local", "sift")
    one_line_error(result, "sift.h5.lock", "symbolic link")
    assert victim.read_text() == PRECIOUS
    assert not (sample_dataset / "cbir/local/sift.h5").exists()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["resume", "overwrite"])
def test_a_linked_batches_folder_is_refused(sample_dataset, victim, overwrite):
    outside = victim.parent / "batches"
    outside.mkdir()
    (outside / "batch-000000.h5").write_text(PRECIOUS)
    (outside / "meta.json").write_text(PRECIOUS)
    (sample_dataset / "cbir/local/sift.h5.batches").symlink_to(outside, target_is_directory=True)
    result = run("extract", sample_dataset, "--local", "sift", *overwrite)
    one_line_error(result, "sift.h5.batches", "symbolic link")
    assert sorted(p.name for p in outside.iterdir()) == ["batch-000000.h5", "meta.json"]
    assert all(p.read_text() == PRECIOUS for p in outside.iterdir())


@pytest.mark.parametrize("folder,command", [
    ("cbir/local", ["extract", "{ds}", "--local", "sift"]),
    ("cbir", ["extract", "{ds}", "--local", "sift"]),
    ("cbir/index", ["index", "build", "{ds}", "--global", "sample", "--index", "flat"]),
    ("cbir/global", ["retrieve", "--query", "{ds}", "--map", "{ds}", "--global", "sample", "--topk", "1"]),
])
def test_linked_cbir_folders_are_neither_read_nor_written(sample_dataset, victim, folder, command):
    link = sample_dataset / folder
    outside = victim.parent / "elsewhere"
    if link.exists():
        shutil.move(link, outside)
    else:
        outside.mkdir()
    link.symlink_to(outside, target_is_directory=True)
    before = {p: p.stat().st_mtime_ns for p in files_under(victim.parent)}
    result = run(*[a.format(ds=sample_dataset) for a in command])
    one_line_error(result, str(link), "symbolic link", "--trust-links")
    assert {p: p.stat().st_mtime_ns for p in files_under(victim.parent)} == before


def test_trusted_links_are_followed(sample_dataset, victim, monkeypatch):
    """The user who keeps stores on another disk says so once, and cbir follows the link."""
    outside = victim.parent / "local"
    shutil.move(sample_dataset / "cbir/local", outside)
    (sample_dataset / "cbir/local").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv("CBIR_TRUST_LINKS", "1")
    assert run("extract", sample_dataset, "--local", "sift").exit_code == 0
    assert (outside / "sift.h5").is_file()


@pytest.mark.parametrize("how", sorted(FOREIGN_STORAGE))
def test_store_data_held_in_other_files_is_refused(sample_dataset, victim, how):
    store = sample_dataset / "cbir/local/sample.h5"
    with h5py.File(store, "a") as f:
        data = f["descriptors"][()]
        del f["descriptors"]
        store_column_as(f, "descriptors", how, data, victim.parent / "other.h5")
    for command in (["export", "kapture", sample_dataset, victim.parent / "out", "--local", "sample",
                     "--images", "skip"], ["check", sample_dataset],
                    ["export", "hloc", sample_dataset, "--local", "sample", "--features-out", victim.parent / "h.h5"]):
        result = run(*command)
        one_line_error(result, "sample.h5", "holds data of other files", how.split()[-1][:7], "--trust-links")
    assert not (victim.parent / "out").exists() and not (victim.parent / "h.h5").exists()


def test_hloc_files_whose_data_is_elsewhere_are_not_imported(sample_dataset, victim, tmp_path):
    feats = tmp_path / "feats.h5"
    with h5py.File(feats, "w") as f:
        g = f.create_group("left/000.png")
        g["keypoints"] = np.zeros((2, 2), np.float32)
        g.create_dataset("descriptors", shape=(2, 2), dtype=np.uint8, external=[(str(victim), 0, 4)])
    result = run("import", "hloc", sample_dataset, "--features", feats, "--name", "stolen")
    one_line_error(result, "feats.h5", "holds data of other files", "external storage")
    assert not (sample_dataset / "cbir/local/stolen.h5").exists()


GOOD_RESULT = {"name": "left/000.png", "success": True, "method": "pnp", "num_map_images": 1, "num_2d3d": 10,
               "num_inliers": 8, "qvec": [1, 0, 0, 0], "tvec": [0, 0, 0]}


def _result(dataset: Path, report, record) -> Path:
    """A localization result ``x`` of ``dataset`` with these report.json and run.json contents
    (text is written as is, anything else as JSON)."""
    directory = dataset / "cbir/localization/x"
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in (("report.json", report), ("run.json", record)):
        (directory / name).write_text(value if isinstance(value, str) else json.dumps(value))
    return directory


CRAFTED_REPORTS = {
    "an object": {}, "a number entry": [1], "a name that is a number": [{**GOOD_RESULT, "name": 5}],
    "a name that is a list": [{**GOOD_RESULT, "name": ["left/000.png"]}],
    "success 'no'": [{**GOOD_RESULT, "success": "no"}],
    "a success without qvec": [{k: v for k, v in GOOD_RESULT.items() if k != "qvec"}],
    "a zero quaternion": [{**GOOD_RESULT, "qvec": [0, 0, 0, 0]}],
    "a quaternion of norm 2": [{**GOOD_RESULT, "qvec": [2, 0, 0, 0]}],
    "a translation of 1e308 m": [{**GOOD_RESULT, "tvec": [1e308, 1e308, 0]}],
    "a text coordinate": [{**GOOD_RESULT, "tvec": [0, 0, "x"]}],
    "an infinite coordinate":
        '[{"name": "left/000.png", "success": true, "qvec": [1, 0, 0, 0], "tvec": [0, 0, 1e999]}]',
    "a negative count": [{**GOOD_RESULT, "num_inliers": -1}],
    "a camera object": [{**GOOD_RESULT, "camera": {"model": "PINHOLE"}}],
    "a query twice": [GOOD_RESULT, GOOD_RESULT], "an unknown field": [{**GOOD_RESULT, "extra": 1}],
    "a name out of the dataset": [{**GOOD_RESULT, "name": "../../x.png"}],
    "deep nesting": "[" * 100_000 + "]" * 100_000, "nesting past the limit": [[[[[[[[[[[[] * 1]]]]]]]]]]] * 1,
    "not JSON": "[{", "not UTF-8": "\udcff",
}


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("case", list(CRAFTED_REPORTS))
def test_crafted_localization_reports_are_one_line_errors(sample_dataset, case):
    content = CRAFTED_REPORTS[case]
    if case == "nesting past the limit":
        content = "[" * 70 + "]" * 70
    directory = _result(sample_dataset, "", {"config": {}, "inputs": {}})
    if case == "not UTF-8":
        (directory / "report.json").write_bytes(b"[\xff]")
    else:
        (directory / "report.json").write_text(content if isinstance(content, str) else json.dumps(content))
    for command in (["report", "--query", sample_dataset, "--map", sample_dataset, "--results", "x", "-o",
                     sample_dataset / "r.html"],
                    ["evaluate", "--query", sample_dataset, "--results", "x", "--gt", sample_dataset]):
        one_line_error(run(*command), "report.json")
    assert not (sample_dataset / "r.html").exists()


CRAFTED_RECORDS = {
    "a list": [], "a config list": {"config": []}, "a matches number": {"config": {"matches": 5}},
    "a map list": {"config": {"map": ["sample"]}}, "pairs as a list": {"config": {"pairs": ["x"]}},
    "a pairs file number": {"config": {"pairs": {"file": 7}}},
    "deep nesting": '{"config": ' + "[" * 100_000 + "]" * 100_000 + "}",
}


@pytest.mark.parametrize("case", list(CRAFTED_RECORDS))
def test_crafted_run_records_are_one_line_errors(sample_dataset, case):
    _result(sample_dataset, [GOOD_RESULT], CRAFTED_RECORDS[case])
    result = run("report", "--query", sample_dataset, "--map", sample_dataset, "--results", "x",
                 "-o", sample_dataset / "r.html")
    one_line_error(result, "run.json")
    assert not (sample_dataset / "r.html").exists()


@pytest.mark.parametrize("file", ["/etc/hosts", "../../../../../../../../etc/hosts", "{outside}"])
def test_a_pairs_file_named_outside_the_dataset_is_not_read(sample_dataset, victim, file):
    victim.write_text("left/000.png, right/000.png, secret-third-field\n")
    _result(sample_dataset, [GOOD_RESULT], {"config": {"pairs": {"file": file.format(outside=victim)}}})
    result = run("report", "--query", sample_dataset, "--map", sample_dataset, "--results", "x",
                 "-o", sample_dataset / "r.html")
    line = one_line_error(result, "run.json", "outside the query dataset", "--pairs")
    assert "secret" not in line and "localhost" not in line
    # the same file, named by the user, is read
    if file == "{outside}":
        victim.write_text("left/000.png, right/000.png, 0.5\n")
        assert run("report", "--query", sample_dataset, "--map", sample_dataset, "--results", "x", "--pairs", victim,
                   "-o", sample_dataset / "r.html").exit_code == 0


@pytest.mark.parametrize("special", ["fifo", "/dev/zero", "directory"])
@pytest.mark.parametrize("file", ["records_camera.txt", "trajectories.txt"])
def test_sensor_files_that_are_not_regular_files(sample_dataset, special, file):
    """A FIFO would block every reader for ever, /dev/zero would fill the memory: both are
    refused before a byte is read."""
    path = sample_dataset / "sensors" / file
    path.unlink()
    if special == "fifo":
        os.mkfifo(path)
    elif special == "directory":
        path.mkdir()
    else:
        path.symlink_to(special)
    kind = {"fifo": "a FIFO", "/dev/zero": "a device", "directory": "a directory"}[special]
    for command in (["info", sample_dataset], ["check", sample_dataset], ["extract", sample_dataset, "--local",
                                                                          "sift"]):
        one_line_error(run(*command), file, kind, "not a regular file")


def test_names_with_unicode_line_breaks_round_trip(sample_dataset, tmp_path):
    """kapture and Python split a text file's lines at '\\n' and '\\r' only: a name holding
    U+2028 or U+0085 is one name, and the pairs file cbir writes is read back."""
    names = ["left/a\u2028b.png", "left/c\u0085d.png", "left/e\u2029f.png"]
    records = sample_dataset / "sensors/records_camera.txt"
    image = (sample_dataset / "sensors/records_data/left/000.png").read_bytes()
    lines = [f"{10 + i}, left, {n}" for i, n in enumerate(names)]
    records.write_text(records.read_text() + "\n".join(lines) + "\n")
    for n in names:
        (sample_dataset / "sensors/records_data" / n).write_bytes(image)
    assert run("check", sample_dataset).exit_code == 0
    pairs = tmp_path / "pairs.txt"
    assert run("pairs", "exhaustive", "--map", sample_dataset, "-o", pairs).exit_code == 0
    from cbir.io.pairs import read_pairs

    read = read_pairs(pairs)
    assert {p.query for p in read} | {p.map for p in read} >= set(names)


def test_a_huge_pairs_record_is_not_copied(sample_dataset, tmp_path):
    from cbir.io.pairs import MAX_RECORD_BYTES, read_pairs_record

    pairs = tmp_path / "pairs.txt"
    pairs.write_text('# cbir: {"config": "' + "x" * MAX_RECORD_BYTES + '"}\nleft/000.png, right/000.png\n')
    assert read_pairs_record(pairs) is None
    deep = tmp_path / "deep.txt"
    deep.write_text("# cbir: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert read_pairs_record(deep) is None


@pytest.mark.parametrize("how", ["toml", "set"])
def test_configurations_nested_too_deep_are_one_line_errors(tmp_path, how):
    from cbir.pipeline import load_config

    deep = "[" * 5000 + "]" * 5000
    if how == "toml":
        (tmp_path / "c.toml").write_text(f"[datasets]\nmap = 'm'\nquery = 'q'\n[local_conf]\nx = {deep}\n")
        result = run("pipeline", tmp_path / "c.toml", "--check")
        one_line_error(result, "c.toml", "nested too deep")
    else:
        with pytest.raises(FormatError, match="--set local_conf.x: nested"):
            load_config(None, [f"local_conf.x={deep}"])


@pytest.mark.parametrize("where", ["reconstruction/descriptors/SIFT", "sensors"])
def test_kapture_import_does_not_follow_links_out_of_the_source(kapture_src, tmp_path, victim, where):
    """A feature file linked to a file of the user's is not imported (it would land in a
    store, then in every export) unless --follow-symlinks says the links are meant."""
    folder = kapture_src / where
    target = next(p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix in (".desc", ".txt"))
    shutil.copyfile(target, victim)
    target.unlink()
    target.symlink_to(victim)
    dst = tmp_path / "work" / "dst"
    one_line_error(run("import", "kapture", kapture_src, dst, "--images", "skip"), str(target), "symbolic link out of",
                   "--follow-symlinks")
    assert not dst.exists()
    assert run("import", "kapture", kapture_src, dst, "--images", "skip", "--follow-symlinks").exit_code == 0


def _claim_rows(path: Path, last: int) -> None:
    """Make the last image of a local store claim ``last`` keypoints, with datasets of that
    many rows declared but never written (HDF5 allocates nothing: the file stays small)."""
    with h5py.File(path, "a") as f:
        offsets = f["offsets"][()]
        rows = int(offsets[-2]) + last
        offsets[-1] = rows
        f["offsets"][...] = offsets
        for name in ("keypoints", "descriptors", "scores", "keypoint_params"):
            old = f[name]
            shape, dtype = (rows, *old.shape[1:]), old.dtype
            del f[name]
            f.create_dataset(name, shape=shape, dtype=dtype)
        del f.attrs["checksums"]


@pytest.mark.parametrize("last", [2 ** 23, 2 ** 32, 2 ** 40])
def test_stores_claiming_rows_they_do_not_hold(sample_dataset, tmp_path, last):
    """Memory follows the file's real size: a header's row count is checked against the file
    before anything is allocated for it."""
    import resource

    store = sample_dataset / "cbir/local/sample.h5"
    _claim_rows(store, last)
    assert store.stat().st_size < 1 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for command in (["check", sample_dataset], ["check", sample_dataset, "--deep"],
                    ["export", "kapture", sample_dataset, tmp_path / "out", "--local", "sample", "--images", "skip"],
                    ["export", "hloc", sample_dataset, "--local", "sample", "--features-out", tmp_path / "f.h5"],
                    ["match", "--query", sample_dataset, "--pairs", sample_dataset / "cbir/pairs/sample.txt",
                     "--local", "sample", "--name", "m"]):
        one_line_error(run(*command), "sample.h5", "does not hold", "truncated or corrupt")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing near the claim
    assert not (tmp_path / "out").exists() and not (tmp_path / "f.h5").exists()


@pytest.mark.parametrize("at", [24, 40])
def test_a_column_whose_object_header_is_corrupt_is_not_dropped(sample_dataset, tmp_path, at):
    """h5py's ``get`` answers None for an object it cannot open: such a column must make the
    store corrupt, not absent (an export would drop it, ``check`` would say ok)."""
    store = sample_dataset / "cbir/matches/sample.h5"
    with h5py.File(store, "r") as f:
        header = h5py.h5o.get_info(f["H"].id).addr
    with open(store, "r+b") as f:
        f.seek(header + at)
        f.write(b"\xff" * 8)
    one_line_error(run("check", sample_dataset), "sample.h5", "cannot open 'H'")
    one_line_error(run("export", "kapture", sample_dataset, tmp_path / "out", "--matches", "sample", "--images",
                       "skip"), "sample.h5", "cannot open 'H'")


# ---------------------------------------------------------------- kept faiss indexes

def _kept_index(dataset: Path, kind: str) -> tuple[Path, Path]:
    """Build the ``kind`` index of the sample's global store: (record file, faiss file)."""
    assert run("index", "build", dataset, "--global", "sample", "--index", kind).exit_code == 0
    record = dataset / f"cbir/index/sample.{kind}.h5"
    return record, next((dataset / "cbir/index").glob(f"sample.{kind}.*.faiss"))


def _swap_bytes(record: Path, faiss_file: Path, data: bytes) -> None:
    """Replace a kept index's faiss bytes and make its record agree (size and CRC), as a
    crafted dataset would."""
    import zlib

    faiss_file.write_bytes(data)
    with h5py.File(record, "a") as f:
        files = json.loads(f.attrs["files"])
        files[0].update(size=len(data), crc32=f"{zlib.crc32(data):08x}")
        f.attrs["files"] = json.dumps(files)


def _retrieve(dataset: Path, kind: str):
    return run("retrieve", "--query", dataset, "--map", dataset, "--global", "sample", "--index", kind, "--topk", "2",
               "-o", dataset / "pairs.txt")


def _patch(data: bytes, offset: int, new: bytes) -> bytes:
    offset %= len(data)
    return data[:offset] + new + data[offset + len(new):]


#: crafted faiss files: (kind of the record, how the bytes are made from the kept files, the error)
CRAFTED_INDEXES = {
    "nlist 2^25": ("ivf", lambda kept: _patch(kept["ivf"], 37, np.int64(2 ** 25).tobytes()), "cannot read the index"),
    "flat under ivf": ("ivf", lambda kept: kept["flat"], "IndexFlatIP, where a ivf index is a IndexIVFFlat"),
    "ivfpq under ivf": ("ivf", lambda kept: kept["ivfpq"], "where a ivf index is a IndexIVFFlat"),
    "L2 under inner product": ("flat", lambda kept: b"IxF2" + kept["flat"][4:], "IndexFlatL2"),
    "dimension": ("flat", lambda kept: _patch(kept["flat"], 4, np.int32(5).tobytes()), "cannot read the index"),
    "NaN vectors": ("flat", lambda kept: _patch(kept["flat"], -48, np.full(12, np.nan, np.float32).tobytes()),
                    "found no candidate"),
    "negative ids": ("ivf", lambda kept: _patch(kept["ivf"], -24, np.full(3, -5, np.int64).tobytes()),
                     "returned image -5"),
    "not an index": ("flat", lambda kept: b"root:x:0:0:root:/root:/bin/bash\n" * 3, "cannot read the index"),
}


@pytest.mark.parametrize("case", list(CRAFTED_INDEXES))
def test_crafted_kept_indexes_are_refused(sample_dataset, case):
    import resource

    kind, make, error = CRAFTED_INDEXES[case]
    kept = {k: _kept_index(sample_dataset, k)[1].read_bytes() for k in ("flat", "ivf", "ivfpq")}
    record, faiss_file = _kept_index(sample_dataset, kind)
    _swap_bytes(record, faiss_file, make(kept))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    one_line_error(_retrieve(sample_dataset, kind), error)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
    assert not (sample_dataset / "pairs.txt").exists()


def test_a_kept_index_linked_out_of_the_dataset_is_refused(sample_dataset, victim):
    record, faiss_file = _kept_index(sample_dataset, "flat")
    victim.write_bytes(faiss_file.read_bytes())  # the same bytes, size and CRC: only the link is wrong
    faiss_file.unlink()
    faiss_file.symlink_to(victim)
    for command in (["retrieve", "--query", sample_dataset, "--map", sample_dataset, "--global", "sample",
                     "--index", "flat", "-o", sample_dataset / "pairs.txt"], ["check", sample_dataset, "--deep"]):
        one_line_error(run(*command), faiss_file.name, "symbolic link")


def test_lsh_codes_are_bounded(sample_dataset):
    """An 8192-D descriptor's default LSH code (2 x dim bits) would take minutes to set up in
    one uninterruptible faiss call: codes are at most 4096 bits, by default and on request."""
    from cbir.retrieval.index import MAX_LSH_BITS, IndexConf, _factory

    assert _factory("lsh", 8192, 8, IndexConf("lsh")).nbits == MAX_LSH_BITS == 4096
    assert _factory("lsh", 256, 8, IndexConf("lsh")).nbits == 512
    with pytest.raises(CbirError, match=r"lsh_bits must be in \[0, 4096\]"):
        IndexConf("lsh", lsh_bits=16384)
    result = run("index", "build", sample_dataset, "--global", "sample", "--index", "lsh", "--lsh-bits", "16384")
    assert result.exit_code == 2 and "16384 is not in the range 1<=x<=4096" in result.output


def test_worker_counts_are_bounded(sample_dataset, tmp_path, monkeypatch):
    """A configuration cannot make cbir start thousands of processes, and a pool never has
    more workers than tasks."""
    from cbir import localize
    from cbir.cores import MAX_WORKERS, pool_size
    from cbir.pipeline import load_config, plan

    assert pool_size(48, 3) == 3 and pool_size(100_000, 10 ** 6) == MAX_WORKERS and pool_size(0, 5) == 1
    (tmp_path / "c.toml").write_text(f"num_workers = 100000\n[datasets]\nmap = '{sample_dataset}'\n"
                                     f"query = '{sample_dataset}'\n")
    with pytest.raises(CbirError, match=r"num_workers must be in \[0, 256\]"):
        plan(load_config(tmp_path / "c.toml"))
    started = []

    class Pool:
        def __init__(self, n):
            started.append(n)
            raise RuntimeError("stop here")

    monkeypatch.setattr(localize, "ProcessPoolExecutor", Pool)
    with pytest.raises(RuntimeError, match="stop here"):
        localize.estimate_locally([{}, {}, {}], 48, None)
    assert started == [3]


def test_an_image_whose_header_pillow_cannot_read_is_held_to_the_limit(sample_dataset):
    """A Radiance HDR (a format OpenCV decodes and Pillow cannot identify) has no size to
    check before decoding: it is decoded in a child whose memory is bounded by the pixel
    limit, and refused over it, whatever its name says."""
    import resource

    ok, hdr = cv2.imencode(".hdr", np.zeros((4000, 4000, 3), np.float32))
    (sample_dataset / "sensors/records_data/right/000.png").write_bytes(hdr.tobytes())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run("extract", sample_dataset, "--local", "sift", "--max-image-pixels", "1000000", "--json")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: 192 MB decoded would show
    assert result.exit_code == 0, result.output
    assert "right/000.png" in result.output and "over the limit of 1000000 pixels" in " ".join(result.output.split())
    with open_store(sample_dataset / "cbir/local/sift.h5") as s:
        assert "right/000.png" not in s.keys


def _colmap_model(directory: Path) -> Path:
    """A one-image COLMAP model written by pycolmap (binary)."""
    import pycolmap

    rec = pycolmap.Reconstruction()
    rec.add_camera_with_trivial_rig(pycolmap.Camera(model="SIMPLE_PINHOLE", width=100, height=80,
                                                    params=[50, 50, 40], camera_id=1))
    image = pycolmap.Image(name="a.jpg", camera_id=1, image_id=1)
    image.points2D = pycolmap.Point2DList([pycolmap.Point2D(np.array([1.0, 2.0]))])
    rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d())
    directory.mkdir(parents=True)
    rec.write(str(directory))
    return directory


def _points2d_count_at(images_bin: bytes) -> int:
    return images_bin.index(b"a.jpg\0") + len(b"a.jpg\0")


COLMAP_CLAIMS = {
    "2^28 points2D": ("images.bin", lambda b: b[:_points2d_count_at(b)] + np.uint64(2 ** 28).tobytes()),
    "a name without its NUL": ("images.bin", lambda b: b[:_points2d_count_at(b) - 1]),
    "10^12 points3D": ("points3D.bin", lambda b: np.uint64(10 ** 12).tobytes()),
    "a track of 2^40": ("points3D.bin", lambda b: np.uint64(1).tobytes() + np.uint64(1).tobytes()
                        + np.zeros(3).tobytes() + bytes(3) + np.zeros(1).tobytes() + np.uint64(2 ** 40).tobytes()),
}


@pytest.mark.parametrize("case", list(COLMAP_CLAIMS))
def test_colmap_binaries_claiming_what_they_lack(tmp_path, case):
    """pycolmap allocates what a count claims before reading: the model is read first in a
    child whose memory follows the files' sizes."""
    import resource

    model = _colmap_model(tmp_path / "model")
    name, make = COLMAP_CLAIMS[case]
    (model / name).write_bytes(make((model / name).read_bytes()))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    one_line_error(run("import", "colmap", model, tmp_path / "dst"), "model", "cannot read COLMAP model")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
    assert not (tmp_path / "dst").exists()


def test_two_builds_of_one_index_do_not_both_work(sample_dataset):
    """The second ``index build`` of the same file, while the first holds it, is refused at
    once (one line), instead of doing all the work again."""
    from cbir.io.atomic import WriteLock

    with WriteLock(sample_dataset / "cbir/index/sample.flat.h5"):
        result = run("index", "build", sample_dataset, "--global", "sample", "--index", "flat")
        one_line_error(result, "sample.flat.h5", "another process is writing this file")
    assert run("index", "build", sample_dataset, "--global", "sample", "--index", "flat").exit_code == 0


def test_two_writers_of_one_path_never_share_a_partial_file(tmp_path):
    from cbir.io.atomic import atomic_output

    with atomic_output(tmp_path / "x.txt") as a, atomic_output(tmp_path / "x.txt") as b:
        assert a != b
        a.write_text("first")
        b.write_text("second")
    assert (tmp_path / "x.txt").read_text() == "first"  # the last to finish wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_a_linked_result_folder_is_neither_read_nor_written(sample_dataset, victim):
    outside = victim.parent / "results"
    _result(sample_dataset, [GOOD_RESULT], {"config": {}, "inputs": {}})
    shutil.move(sample_dataset / "cbir/localization/x", outside)
    (sample_dataset / "cbir/localization/x").symlink_to(outside, target_is_directory=True)
    for command in (["report", "--query", sample_dataset, "--map", sample_dataset, "--results", "x"],
                    ["evaluate", "--query", sample_dataset, "--results", "x", "--gt", sample_dataset]):
        one_line_error(run(*command), "cbir/localization/x", "symbolic link")
    assert sorted(p.name for p in outside.iterdir()) == ["report.json", "run.json"]


def test_store_names_too_long_for_a_file_name(sample_dataset):
    """A store name is a file name with suffixes: one that cannot be is refused by name, not
    by the file system (a traceback, found by the records fuzzer)."""
    long = "x" * 1000
    one_line_error(run("extract", sample_dataset, "--local", "sift", "--name", long), "longer than 200 characters")
    _result(sample_dataset, [GOOD_RESULT], {"config": {"matches": long}})  # matches it cannot read: no pictures
    assert run("report", "--query", sample_dataset, "--map", sample_dataset, "--results", "x").exit_code == 0
    assert run("extract", sample_dataset, "--local", "sift", "--name", "x" * 200).exit_code == 0

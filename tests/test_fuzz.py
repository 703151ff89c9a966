"""Seeded fuzzing of everything cbir reads: kapture text files, stores, images, pairs, maps.

Each case mutates a valid input (bytes, lines, fields, HDF5 datasets and attributes) and
reads it the way the commands do. A case fails on
- a traceback: any exception other than a one-line :class:`CbirError`;
- a hang: a case that runs over ``CASE_LIMIT_S`` kills the test run (faulthandler);
- a silent acceptance: input accepted although it breaks an invariant that the oracle
  below checks independently of the reader (names that are not confined paths, camera
  sizes that are not image sizes, store structure that does not hold together, ...).

CI runs a few hundred cases (``CBIR_FUZZ_CASES`` per target, default 100; text targets run 2-4 times as many) from seed
``CBIR_FUZZ_SEED`` (default 0); run more with e.g.
``CBIR_FUZZ_CASES=5000 CBIR_FUZZ_SEED=$RANDOM bash tests/run.sh tests/test_fuzz.py``.
A failure prints the seed and case number that reproduce it.
"""

from __future__ import annotations

import faulthandler
import json
import math
import os
import random
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest

from cbir.errors import CbirError
from cbir.geometry.cameras import MAX_IMAGE_SIDE, UNKNOWN_CAMERA, Camera
from cbir.geometry.poses import validate_pose
from cbir.io.dataset import Dataset
from cbir.io.images import read_image
from cbir.io.kapture_text import read_sensor_data, write_sensor_data
from cbir.io.map_store import read_map
from cbir.io.pairs import read_pairs
from cbir.io.paths import check_relative_name
from cbir.io.store import STR_DTYPE, Store, encode_keys_blob

from .conftest import SAMPLES
from .hdf5_storage import FOREIGN_STORAGE, STORAGE_KINDS, store_column_as

SEED = int(os.environ.get("CBIR_FUZZ_SEED", "0"))
CASES = int(os.environ.get("CBIR_FUZZ_CASES", "100"))
CASE_LIMIT_S = 60.0

#: replacements for a numeric field and for a name field (ids, paths, models)
HOSTILE_NUMBERS = ["", "nan", "inf", "-inf", "1e400", "-1", "0", "2.5", "1e12", "3e9", "0x10", "-0", "1_000",
                   "1e-320", "9" * 40]
HOSTILE_NAMES = ["", " ", "../x", "/etc/x", "a/../b", "a//b", "./a", "a\\b", "C:x", "a\0b", "\t", "\ufeff",
                 "é" * 200, "x" * 300, "#", "SIMPLE_PINHOLE", "UNKNOWN_CAMERA", "camera", "rig", "left", "right"]


def hostile_value(field: str, rng: random.Random) -> str:
    try:
        float(field)
        numeric = True
    except ValueError:
        numeric = False
    return rng.choice(HOSTILE_NUMBERS if numeric and rng.random() < 0.85 else HOSTILE_NAMES)


@contextmanager
def case_limit(label: str):
    """A hang (even inside native code holding the GIL) dumps the stacks and exits the run."""
    sys.stderr.write("")
    faulthandler.dump_traceback_later(CASE_LIMIT_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def accepted(func, label: str):
    """``func()``'s result, or None when it raised a CbirError; anything else fails the case."""
    with case_limit(label):
        try:
            return func()
        except CbirError as e:
            assert "\n" not in str(e), f"{label}: multi-line error {e!r}"
            return None
        except Exception as e:  # noqa: BLE001 - the point: no other exception may escape
            pytest.fail(f"{label}: traceback {type(e).__name__}: {e}")


# ============================================================================ mutations

def mutate_text(text: str, rng: random.Random) -> str:
    lines = text.split("\n")
    op = rng.choice([0, 0, 0, 1, 2, 3, 4, 5, 6])
    data = [k for k, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")]
    i = rng.choice(data) if data and rng.random() < 0.9 else rng.randrange(len(lines))
    if op == 0:  # a field replaced by a hostile value
        fields = lines[i].split(",")
        k = rng.randrange(len(fields))
        fields[k] = " " + hostile_value(fields[k].strip(), rng)
        lines[i] = ",".join(fields)
    elif op == 1:  # a field added or removed
        fields = lines[i].split(",")
        if rng.random() < 0.5 and len(fields) > 1:
            del fields[rng.randrange(len(fields))]
        else:
            fields.insert(rng.randrange(len(fields) + 1), " " + rng.choice(HOSTILE_NUMBERS + HOSTILE_NAMES))
        lines[i] = ",".join(fields)
    elif op == 2:  # a line duplicated
        lines.insert(i, lines[i])
    elif op == 3:  # a line deleted
        del lines[i]
    elif op == 4:  # two lines swapped
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif op == 5:  # a BOM or a version header of the future
        lines.insert(0, rng.choice(["\ufeff# kapture format: 1.1", "# kapture format: 2.0"]))
    else:  # the same field in two lines swapped (ids, names)
        j = rng.randrange(len(lines))
        a, b = lines[i].split(","), lines[j].split(",")
        k = rng.randrange(min(len(a), len(b)))
        a[k], b[k] = b[k], a[k]
        lines[i], lines[j] = ",".join(a), ",".join(b)
    return "\n".join(lines)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    data = bytearray(data)
    op = rng.randrange(4)
    at = rng.randrange(len(data))
    if op == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif op == 1:
        data[at:at + 128] = bytes(len(data[at:at + 128]))
    elif op == 2:
        del data[at:at + rng.randint(1, 64)]
    else:
        data = data[:at]
    return bytes(data)


# ============================================================================ oracles

def sensor_invariants(root: Path) -> None:
    """What a dataset accepted by cbir must satisfy, checked without cbir's reader."""
    data = read_sensor_data(root)
    for cam in data.cameras.values():
        assert isinstance(cam.width, int) and isinstance(cam.height, int)
        assert 1 <= cam.width <= MAX_IMAGE_SIDE and 1 <= cam.height <= MAX_IMAGE_SIDE
        assert all(math.isfinite(p) for p in cam.params) or cam.model == UNKNOWN_CAMERA
    names = [r.name for r in data.records]
    assert len(set(names)) == len(names)
    for r in data.records:
        assert check_relative_name(r.name) is None, r.name
        assert isinstance(data.sensors[r.camera_id], Camera)
        path = (root / "sensors/records_data" / r.name).resolve()
        assert (root / "sensors/records_data").resolve() in path.parents
    for pose in list(data.trajectories.values()) + [p for rig in data.rigs.values() for p in rig.values()]:
        assert validate_pose(pose.qvec, pose.tvec) is None
    for (_, device) in data.trajectories:
        assert device in data.sensors or device in data.rigs
    # what is accepted is written back and read again unchanged
    copy = root.parent / (root.name + "-roundtrip")
    shutil.rmtree(copy, ignore_errors=True)
    write_sensor_data(copy, data)
    again = read_sensor_data(copy)
    order = lambda r: (r.timestamp, r.camera_id, r.name)  # noqa: E731 - written sorted, as kapture does
    assert sorted(again.records, key=order) == sorted(data.records, key=order)
    assert again.trajectories == data.trajectories
    assert again.sensors == data.sensors and again.rigs == data.rigs


def store_invariants(path: Path) -> None:
    """Re-check an accepted store with plain h5py (only for files whose HDF5 layer is intact)."""
    with h5py.File(path, "r") as f:
        kind = f.attrs["cbir_format"]
        kind = kind.decode() if isinstance(kind, bytes) else kind
        key = "pairs" if kind == "matches" else "names"
        raw = f[key].asstr()[()]
        keys = [tuple(r) for r in raw.tolist()] if key == "pairs" else raw.tolist()
        n = len(keys)
        assert len(set(keys)) == n
        assert isinstance(json.loads(f.attrs.get("config", "{}")), dict)
        if "keys_blob" in f:
            blob = encode_keys_blob(keys)
            assert blob is not None and f["keys_blob"][()].tobytes() == blob.tobytes()
        ragged = {"local-features": ("keypoints", "descriptors", "scores", "keypoint_params"),
                  "matches": ("matches", "scores", "inliers"), "global-features": ()}[kind]
        if ragged:
            offs = f["offsets"][()]
            assert offs.dtype.kind in "iu" and offs.shape == (n + 1,) and offs[0] == 0
            assert np.all(np.diff(offs) >= 0)
            for c in ragged:
                if c in f:
                    assert f[c].shape[0] == offs[-1]
        for c in f:
            if c not in ragged and c not in (key, "offsets", "keys_blob"):
                assert f[c].shape[0] == n and f[c].dtype.kind in "biuf"
        for c in ("keypoints", "matches"):
            if c in f:
                assert f[c].ndim == 2 and f[c].shape[1] == 2
        if "descriptors" in f:
            assert f["descriptors"].ndim == 2 and f["descriptors"].dtype.kind in "biuf"


def read_whole_store(path: Path) -> bool:
    """Open and read every item, as the commands do; True when accepted."""
    with Store(path) as s:
        for k in s.keys:
            s.get(k)
        for _ in s.iter_batches(2):
            pass
    return True


# ============================================================================ the targets

TEXT_FILES = ["sensors/sensors.txt", "sensors/records_camera.txt", "sensors/trajectories.txt", "sensors/rigs.txt"]


def test_fuzz_kapture_text(tmp_path):
    rng = random.Random(SEED)
    for case in range(4 * CASES):  # text cases are cheap: four times as many
        label = f"kapture text, seed {SEED} case {case}"
        root = tmp_path / f"c{case}"
        shutil.copytree(SAMPLES / "sensors", root / "sensors")
        for _ in range(rng.randint(1, 3)):
            target = root / rng.choice(TEXT_FILES)
            target.write_text(mutate_text(target.read_text(), rng))
        data = accepted(lambda root=root: Dataset(root).sensors, label)
        if data is not None:
            try:
                sensor_invariants(root)
            except AssertionError as e:
                pytest.fail(f"{label}: accepted, but {e}")
        shutil.rmtree(root)


def test_fuzz_kapture_text_bytes(tmp_path):
    rng = random.Random(SEED + 1)
    for case in range(2 * CASES):
        label = f"kapture text bytes, seed {SEED} case {case}"
        root = tmp_path / f"c{case}"
        shutil.copytree(SAMPLES / "sensors", root / "sensors")
        target = root / rng.choice(TEXT_FILES)
        target.write_bytes(mutate_bytes(target.read_bytes(), rng))
        if accepted(lambda root=root: Dataset(root).sensors, label) is not None:
            try:
                sensor_invariants(root)
            except AssertionError as e:
                pytest.fail(f"{label}: accepted, but {e}")
        shutil.rmtree(root)


STORES = ["cbir/local/sample.h5", "cbir/global/sample.h5", "cbir/matches/sample.h5"]


def _structural_mutation(path: Path, rng: random.Random) -> None:
    """Replace one dataset or attribute by a plausible but wrong one (the HDF5 layer stays intact)."""
    with h5py.File(path, "a") as f:
        names = list(f)
        # what the structure hangs on is mutated most often
        weights = [4 if n in ("offsets", "names", "pairs", "keys_blob") else 1 for n in names]
        op = rng.randrange(5)
        if op == 4 or not names:
            attr = rng.choice(["config", "format_version", "cbir_format", "descriptor_dim", "name"])
            f.attrs[attr] = rng.choice(['{"a": 1}', "[1]", "{", "", "2.0", "matches", "global-features", 7,
                                        "../x", np.arange(3)])
            return
        name = rng.choices(names, weights)[0]
        data = f[name][()]
        del f[name]
        if op == 0 and data.ndim and len(data):  # rows dropped or repeated
            data = data[:-1] if rng.random() < 0.5 else np.concatenate([data, data[:1]])
        elif op == 1 and data.ndim and len(data) > 1:  # two different rows swapped (names, offsets)
            pairs = [(i, j) for i in range(len(data)) for j in range(i + 1, len(data))
                     if not np.array_equal(data[i], data[j])]
            if pairs:
                i, j = rng.choice(pairs)
                idx = np.arange(len(data))
                idx[i], idx[j] = j, i
                data = data[idx]
        elif op == 2 and data.dtype.kind in "iuf" and data.size:  # values made hostile
            data = data.astype(np.float64)
            data.flat[rng.randrange(data.size)] = rng.choice([np.nan, -1.0, 1e30, 0.5])
        elif op == 3:  # another shape or dtype
            data = rng.choice([data.reshape(-1) if data.ndim > 1 else data[:, None] if data.ndim else data,
                               np.zeros(3, np.int8), np.array(["x", "y", "z"], dtype=object)])
        if rng.random() < 0.9:  # else the dataset stays deleted
            kw = {"dtype": STR_DTYPE} if data.dtype.kind == "O" else {}
            f.create_dataset(name, data=data, **kw)


def test_fuzz_stores_structure(tmp_path):
    rng = random.Random(SEED + 2)
    for case in range(CASES):
        label = f"store structure, seed {SEED} case {case}"
        path = tmp_path / f"c{case}.h5"
        shutil.copyfile(SAMPLES / rng.choice(STORES), path)
        for _ in range(rng.randint(1, 2)):
            _structural_mutation(path, rng)
        if accepted(lambda path=path: read_whole_store(path), label):
            try:
                store_invariants(path)
            except (AssertionError, KeyError, TypeError, ValueError) as e:
                pytest.fail(f"{label}: accepted, but {type(e).__name__}: {e}")
        path.unlink()


def test_fuzz_stores_bytes(tmp_path, monkeypatch):
    """Corrupt bytes anywhere in the file (HDF5 superblock, object headers, heaps, data):
    a one-line error or a store that still holds together, never a traceback or a hang."""
    monkeypatch.setenv("CBIR_HDF5_TIMEOUT", "5")
    rng = random.Random(SEED + 3)
    for case in range(CASES):
        label = f"store bytes, seed {SEED} case {case}"
        path = tmp_path / f"c{case}.h5"
        path.write_bytes(mutate_bytes((SAMPLES / rng.choice(STORES)).read_bytes(), rng))
        accepted(lambda path=path: read_whole_store(path), label)
        path.unlink()


def test_fuzz_maps(tmp_path, monkeypatch):
    monkeypatch.setenv("CBIR_HDF5_TIMEOUT", "5")
    rng = random.Random(SEED + 4)
    for case in range(CASES // 2):
        label = f"map, seed {SEED} case {case}"
        path = tmp_path / f"c{case}.h5"
        shutil.copyfile(SAMPLES / "cbir/map/sample.h5", path)
        if rng.random() < 0.5:
            path.write_bytes(mutate_bytes(path.read_bytes(), rng))
        else:
            _structural_mutation(path, rng)
        m = accepted(lambda path=path: read_map(path), label)
        if m is not None:
            assert m.validate() is None and len(set(m.images)) == len(m.images), label
        path.unlink()


def test_fuzz_images_and_pairs(tmp_path):
    rng = random.Random(SEED + 5)
    images = sorted((SAMPLES / "sensors/records_data").rglob("*.png"))
    pairs = (SAMPLES / "cbir/pairs/sample.txt").read_text()
    for case in range(CASES):
        label = f"image, seed {SEED} case {case}"
        path = tmp_path / f"c{case}.png"
        path.write_bytes(mutate_bytes(rng.choice(images).read_bytes(), rng))
        image = accepted(lambda path=path: read_image(path, max_size=32), label)
        if image is not None:
            assert image.array.dtype == np.uint8 and image.array.ndim == 3 and min(image.array.shape[:2]) >= 1
        ppath = tmp_path / f"c{case}.txt"
        ppath.write_text(mutate_text(pairs, rng))
        parsed = accepted(lambda ppath=ppath: read_pairs(ppath), f"pairs, seed {SEED} case {case}")
        if parsed is not None:
            assert all(p.query and p.map and isinstance(p.score, float) for p in parsed), label
        path.unlink()
        ppath.unlink()


@pytest.fixture(scope="module")
def kapture_sample(tmp_path_factory) -> Path:
    """The sample dataset exported to kapture with every reconstruction file kind."""
    from cbir.io import interchange

    root = tmp_path_factory.mktemp("kapture") / "sample"
    interchange.export_kapture(Dataset(SAMPLES), root, local=["sample"], global_=["sample"],
                               matches=["sample"], maps=["sample"], images="skip")
    return root


def test_fuzz_kapture_import(kapture_sample, tmp_path):
    """kapture's reconstruction/ files (configs, binary arrays, points, observations) mutated:
    an import either fails in one line or gives stores that open, and writes only in its
    target."""
    from cbir.io import interchange

    rng = random.Random(SEED + 6)
    files = sorted(p.relative_to(kapture_sample) for p in kapture_sample.rglob("*") if p.is_file())
    for case in range(CASES // 2):
        label = f"kapture import, seed {SEED} case {case}"
        src, dst = tmp_path / f"c{case}" / "src", tmp_path / f"c{case}" / "dst"
        shutil.copytree(kapture_sample, src)
        target = src / rng.choice(files)
        if target.suffix == ".txt" and rng.random() < 0.8:
            target.write_text(mutate_text(target.read_text(), rng))
        else:
            target.write_bytes(mutate_bytes(target.read_bytes(), rng) if target.stat().st_size else b"\0")
        before = set((tmp_path / f"c{case}").rglob("*"))
        written = accepted(lambda src=src, dst=dst: interchange.import_kapture(src, dst, images="skip"), label)
        new = set((tmp_path / f"c{case}").rglob("*")) - before
        assert all(p == dst or dst in p.parents for p in new), f"{label}: wrote outside the target"
        for path in written or []:
            if path.suffix == ".h5" and "map" not in path.parts:
                assert accepted(lambda path=path: read_whole_store(path), label), \
                    f"{label}: imported {path} does not open"
            elif path.suffix == ".h5":
                assert accepted(lambda path=path: read_map(path), label) is not None, \
                    f"{label}: imported map does not open"
        shutil.rmtree(tmp_path / f"c{case}")



# ============================================================================ issue 31: a stranger's files

#: stored in the file, but compressed: what it claims is not bounded by the file's size
COMPRESSED_STORAGE = {"gzip"}


def test_fuzz_store_storage_kinds(tmp_path):
    """Every numeric column stored every way HDF5 allows: data in another file is refused
    (whatever a reader would do with it), so are compressed data and a header's claim beyond
    the file (neither is bounded by the file's size); data held in the file plainly
    (contiguous, chunked, behind a soft link) is read back as written."""
    rng = random.Random(SEED + 7)
    for case in range(CASES // 2):
        label = f"storage kinds, seed {SEED} case {case}"
        path = tmp_path / f"c{case}.h5"
        shutil.copyfile(SAMPLES / rng.choice(STORES), path)
        with h5py.File(path, "a") as f:
            numeric = sorted(n for n in f if f[n].dtype.kind in "biuf" and f[n].size)
            name, kind = rng.choice(numeric), rng.choice(STORAGE_KINDS)
            data = f[name][()]
            del f[name]
            store_column_as(f, name, kind, data, tmp_path / f"c{case}-elsewhere.h5")
        ok = accepted(lambda path=path: read_whole_store(path), f"{label} ({kind} {name})")
        if kind in FOREIGN_STORAGE | COMPRESSED_STORAGE or kind == "unwritten":
            assert not ok, f"{label}: a column stored as {kind} was accepted"
        else:
            assert ok, f"{label}: a column stored as {kind} was refused"
            with Store(path) as s:
                if name == "offsets" or name in s.columns:  # keys_blob: accepted means it equals the keys
                    read = s.offsets if name == "offsets" else s.read_all(name)
                    assert np.array_equal(read, data, equal_nan=True), label
        for p in tmp_path.glob(f"c{case}*"):
            p.unlink()


def _json_mutation(value, rng: random.Random, depth: int = 0):
    """``value`` with one part replaced by a JSON value of another type or a hostile one."""
    hostile = [None, True, "no", 0, -1, 1.5, 1e308, "", "../../x", "<!--<script>", [], {}, [[[[1]]]], {"a": {"b": 1}},
               "x" * 1000, 2 ** 70, [0, 0, 0, 0], ["a"]]
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        out = dict(value)
        if rng.random() < 0.15:
            del out[key]
        else:
            out[key] = _json_mutation(value[key], rng, depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        out = list(value)
        i = rng.randrange(len(out))
        out[i] = _json_mutation(out[i], rng, depth + 1)
        return out
    return rng.choice(hostile)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a leaked numeric warning is a defect too
def test_fuzz_localization_records(tmp_path):
    """report.json and run.json mutated field by field: ``cbir report`` and ``cbir evaluate``
    exit 0 or 1 with one line, never a traceback; an evaluation that succeeds counts only
    entries whose success is ``true``."""
    from click.testing import CliRunner

    from cbir.cli import main

    rng = random.Random(SEED + 8)
    good = [{"name": "left/000.png", "success": True, "method": "pnp", "reason": "", "num_map_images": 1,
             "num_2d3d": 10, "num_inliers": 8, "qvec": [1, 0, 0, 0], "tvec": [0, 0, 0],
             "camera": ["SIMPLE_PINHOLE", 10, 10, [5.0, 5.0, 5.0]]},
            {"name": "left/001.png", "success": False, "reason": "too few inliers"}]
    record = {"config": {"matches": "sample", "map": "sample", "pairs": {"file": "cbir/pairs/sample.txt"}},
              "inputs": {}, "seconds": {"localize": 1.0}}
    root = tmp_path / "sample"
    shutil.copytree(SAMPLES, root)
    results = root / "cbir/localization/x"
    results.mkdir(parents=True)
    for case in range(CASES):
        label = f"localization records, seed {SEED} case {case}"
        report, run_json = good, record
        if rng.random() < 0.6:
            report = _json_mutation(good, rng)
        else:
            run_json = _json_mutation(record, rng)
        (results / "report.json").write_text(json.dumps(report))
        (results / "run.json").write_text(json.dumps(run_json))
        for command in (["report", "--query", root, "--map", root, "--results", "x", "-o", tmp_path / "r.html"],
                        ["evaluate", "--query", root, "--results", "x", "--gt", root, "--json"]):
            with case_limit(label):
                result = CliRunner().invoke(main, [str(a) for a in command])
            assert result.exception is None or isinstance(result.exception, SystemExit), \
                f"{label}: {command[0]}: traceback {type(result.exception).__name__}: {result.exception}"
            assert result.exit_code in (0, 1), f"{label}: {command[0]}: exit {result.exit_code}: {result.output}"
            if result.exit_code == 1:
                errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
                assert len(errors) == 1, f"{label}: {command[0]}: {result.output}"
            elif command[0] == "evaluate" and isinstance(report, list):
                summary = json.loads(result.stdout)["conditions"]["all"]
                posed = {"left/000.png", "left/001.png", "right/000.png"}  # the images with a ground truth
                successes = sum(1 for r in report if r.get("success") is True and r.get("name") in posed)
                assert summary["localized"] == successes, label
        (tmp_path / "r.html").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def kept_indexes(tmp_path_factory) -> Path:
    """The sample dataset with a kept index of every kind of its global store."""
    from click.testing import CliRunner

    from cbir.cli import main

    root = tmp_path_factory.mktemp("indexes") / "sample"
    shutil.copytree(SAMPLES, root)
    for kind in ("flat", "ivf", "ivfpq", "lsh"):
        result = CliRunner().invoke(main, ["index", "build", str(root), "--global", "sample", "--index", kind])
        assert result.exit_code == 0, result.output
    return root


def test_fuzz_kept_indexes(kept_indexes, tmp_path):
    """A kept index's faiss bytes (with a record made to agree: size and CRC) or its record
    mutated: retrieval exits 1 with one line, or gives pairs whose scores are the exact
    similarities of their images, best first."""
    import zlib

    from click.testing import CliRunner

    from cbir.cli import main

    rng = random.Random(SEED + 9)
    exact = {}
    with Store(kept_indexes / "cbir/global/sample.h5") as s:
        vectors = {k: s.get(k)["descriptors"].astype(np.float64) for k in s.keys}
    for q in vectors:
        for m in vectors:
            a, b = vectors[q], vectors[m]
            exact[q, m] = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    for case in range(CASES // 2):
        label = f"kept index, seed {SEED} case {case}"
        root = tmp_path / f"c{case}"
        shutil.copytree(kept_indexes, root)
        kind = rng.choice(["flat", "ivf", "ivfpq", "lsh"])
        record = root / f"cbir/index/sample.{kind}.h5"
        faiss_file = next((root / "cbir/index").glob(f"sample.{kind}.*.faiss"))
        with h5py.File(record, "a") as f:
            if rng.random() < 0.7:
                data = mutate_bytes(faiss_file.read_bytes(), rng)
                faiss_file.write_bytes(data)
                files = json.loads(f.attrs["files"])
                files[0].update(size=len(data), crc32=f"{zlib.crc32(data):08x}")
                f.attrs["files"] = json.dumps(files)
            else:
                attr = rng.choice(["record", "files"])
                f.attrs[attr] = json.dumps(_json_mutation(json.loads(f.attrs[attr]), rng))
        with case_limit(label):
            result = CliRunner().invoke(main, ["retrieve", "--query", str(root), "--map", str(root), "--global",
                                               "sample", "--index", kind, "--topk", "2", "-o", str(root / "p.txt")])
        assert result.exception is None or isinstance(result.exception, SystemExit), \
            f"{label}: traceback {type(result.exception).__name__}: {result.exception}"
        assert result.exit_code in (0, 1), f"{label}: exit {result.exit_code}: {result.output}"
        if result.exit_code == 0:
            pairs = read_pairs(root / "p.txt")
            assert pairs, f"{label}: exit 0 without pairs"
            for p in pairs:
                assert abs(p.score - exact[p.query, p.map]) < 1e-3, f"{label}: {p} is not the exact score"
        else:
            assert len([ln for ln in result.output.splitlines() if ln.startswith("error:")]) == 1, label
        shutil.rmtree(root)

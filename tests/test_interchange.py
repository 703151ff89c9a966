"""Import and export: kapture (text and binary reconstruction), COLMAP, hloc and
visuallocalization.net, on the real sample datasets; values are compared, not counts."""

from __future__ import annotations

import dataclasses
import filecmp
from pathlib import Path

import h5py
import kapture.io.csv as kcsv
import numpy as np
import pycolmap
import pytest

from cbir.errors import CbirError, FormatError
from cbir.io import interchange
from cbir.io.dataset import Dataset
from cbir.io.kapture_text import read_sensor_data
from cbir.io.map_store import read_map
from cbir.io.store import open_store

pytestmark = pytest.mark.slow


def _raw(path: Path, dtype, dsize: int) -> np.ndarray:
    return np.fromfile(path, dtype=dtype).reshape(-1, dsize)


@pytest.fixture
def imported(maupertuis, tmp_path) -> Path:
    interchange.import_kapture(maupertuis, tmp_path / "ds")
    return tmp_path / "ds"


def test_kapture_import_gives_exactly_the_binary_arrays(maupertuis, imported):
    rec = maupertuis / "reconstruction"
    with open_store(imported / "cbir/local/SIFT.h5", "local-features") as s:
        assert sorted(s.keys) == ["00.jpg", "01.jpg", "02.jpg", "03.jpg"]
        assert s.attrs["keypoint_params"] == "a11,a12,a21,a22"
        for name in s.keys:
            kpt = _raw(rec / f"keypoints/SIFT/{name}.kpt", np.float32, 6)
            desc = _raw(rec / f"descriptors/SIFT/{name}.desc", np.uint8, 128)
            got = s.get(name)
            np.testing.assert_array_equal(np.column_stack([got["keypoints"], got["keypoint_params"]]), kpt)
            np.testing.assert_array_equal(got["descriptors"], desc)
            assert got["descriptors"].dtype == np.uint8
            np.testing.assert_array_equal(got["image_sizes"], [1919, 1079])
    with open_store(imported / "cbir/matches/SIFT.h5", "matches") as s:
        files = sorted((rec / "matches/SIFT").rglob("*.matches"))
        assert len(s) == len(files) == 6
        for f in files:
            pair = (f.parent.name[: -len(".overlapping")], f.name[: -len(".matches")])
            m = _raw(f, np.float64, 3)
            got = s.get(pair)
            np.testing.assert_array_equal(got["matches"], m[:, :2])
            np.testing.assert_array_equal(got["scores"], m[:, 2])
    m = read_map(imported / "cbir/map/SIFT.h5")
    pts = np.loadtxt(rec / "points3d.txt", delimiter=",")
    np.testing.assert_array_equal(m.points, pts[:, :3])
    np.testing.assert_array_equal(m.colors, pts[:, 3:])
    lines = [l.split(", ") for l in (rec / "observations.txt").read_text().splitlines() if not l.startswith("#")]
    assert len(lines) == len(m)
    for fields in lines:
        imgs, kps = m.track(int(fields[0]))
        assert [m.images[i] for i in imgs] == fields[2::2]
        assert kps.tolist() == [int(v) for v in fields[3::2]]


def test_kapture_export_is_byte_identical(maupertuis, imported, tmp_path):
    out = tmp_path / "exported"
    interchange.export_kapture(Dataset(imported), out, local=["SIFT"], matches=["SIFT"], maps=["SIFT"])
    originals = sorted(p for p in (maupertuis / "reconstruction").rglob("*") if p.is_file())
    assert len(originals) == 18  # 4 kpt + 4 desc + 6 matches + 2 configs + points3d + observations
    for p in originals:
        copy = out / p.relative_to(maupertuis)
        assert filecmp.cmp(p, copy, shallow=False), f"{copy} differs from {p}"
    assert read_sensor_data(out) == read_sensor_data(maupertuis)
    assert (out / "sensors/records_gnss.txt").read_bytes() == (maupertuis / "sensors/records_gnss.txt").read_bytes()


def test_kapture_loads_exported_features_with_same_values(imported, tmp_path):
    """What cbir exports is what kapture(-localization) loads."""
    out = tmp_path / "exported"
    interchange.export_kapture(Dataset(imported), out, local=["SIFT"], matches=["SIFT"], maps=["SIFT"])
    kdata = kcsv.kapture_from_dir(str(out))
    assert set(kdata.keypoints["SIFT"]) == {"00.jpg", "01.jpg", "02.jpg", "03.jpg"}
    from kapture.io.features import get_descriptors_fullpath, image_descriptors_from_file
    with open_store(imported / "cbir/local/SIFT.h5") as s:
        for name in s.keys:
            d = image_descriptors_from_file(get_descriptors_fullpath("SIFT", str(out), name), np.uint8, 128)
            np.testing.assert_array_equal(d, s.get(name)["descriptors"])
    assert len(kdata.matches["SIFT"]) == 6
    assert len(kdata.points3d) == 1039 and kdata.observations is not None


def test_global_features_round_trip_through_kapture(tmp_path, sample_dataset):
    ds = Dataset(sample_dataset)
    out = tmp_path / "kap"
    interchange.export_kapture(ds, out, global_=["sample"], images="skip")
    kdata = kcsv.kapture_from_dir(str(out))
    assert set(kdata.global_features["sample"]) == set(ds.sensors.image_names())
    interchange.import_kapture(out, tmp_path / "back", images="skip")
    with open_store(sample_dataset / "cbir/global/sample.h5") as a, \
            open_store(tmp_path / "back/cbir/global/sample.h5") as b:
        assert sorted(a.keys) == sorted(b.keys)
        for k in a.keys:
            np.testing.assert_array_equal(a.get(k)["descriptors"], b.get(k)["descriptors"])
    interchange.export_kapture(Dataset(tmp_path / "back"), tmp_path / "again", global_=["sample"], images="skip")
    for p in (out / "reconstruction").rglob("*.gfeat"):
        assert p.read_bytes() == (tmp_path / "again" / p.relative_to(out)).read_bytes()


def test_kapture_import_in_place_and_refusing_overwrite(maupertuis, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(maupertuis, src)
    written = interchange.import_kapture(src)
    assert (src / "cbir/local/SIFT.h5") in written
    with pytest.raises(CbirError, match="exists"):
        interchange.import_kapture(maupertuis, src, images="skip")


def test_corrupt_kapture_binary_is_reported(maupertuis, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(maupertuis, src)
    kpt = src / "reconstruction/keypoints/SIFT/01.jpg.kpt"
    kpt.chmod(0o644)
    kpt.write_bytes(kpt.read_bytes()[:-3])
    with pytest.raises(FormatError, match=r"01.jpg.kpt: size .* is not a multiple of 6 x float32"):
        interchange.import_kapture(src, tmp_path / "dst", images="skip")


# ------------------------------------------------------------------ COLMAP

@pytest.mark.parametrize("binary", [False, True])
def test_colmap_round_trip_of_sensors_and_poses(sceaux, tmp_path, binary):
    ds = Dataset(sceaux / "mapping")
    interchange.export_colmap(ds, tmp_path / "model", binary=binary)
    assert (tmp_path / "model" / ("images.bin" if binary else "images.txt")).exists()
    rec = pycolmap.Reconstruction(str(tmp_path / "model"))
    assert rec.num_reg_images() == 8
    poses = ds.sensors.image_poses()
    for image in rec.images.values():
        expected = poses[image.name]
        np.testing.assert_allclose(image.cam_from_world().rotation.matrix(), expected.rotation_matrix, atol=1e-12)
        np.testing.assert_allclose(image.cam_from_world().translation, expected.tvec, atol=1e-12)
    interchange.import_colmap(tmp_path / "model", tmp_path / "back", images_dir=str(ds.records_dir))
    back = read_sensor_data(tmp_path / "back")
    (cam,) = back.cameras.values()
    assert cam == dataclasses.replace(ds.sensors.cameras["cam0"], name="")  # COLMAP has no camera names
    for name, pose in back.image_poses().items():
        np.testing.assert_allclose(pose.qvec, poses[name].qvec, atol=1e-12)
        np.testing.assert_allclose(pose.tvec, poses[name].tvec, atol=1e-12)
    assert (tmp_path / "back/sensors/records_data/100_7100.jpg").is_file()


def test_colmap_round_trip_of_a_map_with_tracks(imported, tmp_path):
    ds = Dataset(imported)
    interchange.export_colmap(ds, tmp_path / "model", map_name="SIFT", local="SIFT")
    rec = pycolmap.Reconstruction(str(tmp_path / "model"))
    m = read_map(imported / "cbir/map/SIFT.h5")
    assert rec.num_points3D() == len(m)
    with open_store(imported / "cbir/local/SIFT.h5") as s:
        kps = {n: s.get(n)["keypoints"] for n in s.keys}
    by_name = {im.name: im for im in rec.images.values()}
    for name, im in by_name.items():  # keypoints gain COLMAP's +0.5
        xy = np.array([p.xy for p in im.points2D])
        np.testing.assert_allclose(xy, kps[name] + 0.5, atol=1e-4)
    interchange.import_colmap(tmp_path / "model", tmp_path / "back", images="skip")
    back = read_map(tmp_path / "back/cbir/map/colmap.h5")
    np.testing.assert_allclose(np.sort(back.points, axis=0), np.sort(m.points, axis=0))
    assert sorted(back.track_lengths.tolist()) == sorted(m.track_lengths.tolist())
    with open_store(tmp_path / "back/cbir/local/colmap.h5") as s:
        for name in s.keys:
            np.testing.assert_allclose(s.get(name)["keypoints"], kps[name], atol=1e-4)


def test_not_a_colmap_model(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m/cameras.txt").write_text("garbage\n")
    with pytest.raises(FormatError, match="not a COLMAP model"):
        interchange.import_colmap(tmp_path / "m", tmp_path / "out")


# ------------------------------------------------------------------ hloc

def test_hloc_round_trip(imported, tmp_path):
    ds = Dataset(imported)
    interchange.export_hloc(ds, "SIFT", features_out=str(tmp_path / "feats.h5"), matches="SIFT",
                            matches_out=str(tmp_path / "matches.h5"))
    with h5py.File(tmp_path / "feats.h5") as f, open_store(imported / "cbir/local/SIFT.h5") as s:
        g = f["00.jpg"]
        np.testing.assert_array_equal(g["keypoints"][()], s.get("00.jpg")["keypoints"])
        assert g["descriptors"].shape == (128, s.count("00.jpg"))  # hloc stores D x K
        np.testing.assert_array_equal(g["image_size"][()], [1919, 1079])
    with h5py.File(tmp_path / "matches.h5") as f:
        assert "00.jpg" in f and "01.jpg" in f["00.jpg"] and "matches0" in f["00.jpg/01.jpg"]
    interchange.import_hloc(ds, features=str(tmp_path / "feats.h5"), matches=str(tmp_path / "matches.h5"))
    with open_store(imported / "cbir/local/SIFT.h5") as a, open_store(imported / "cbir/local/hloc.h5") as b:
        for n in a.keys:
            np.testing.assert_array_equal(a.get(n)["descriptors"], b.get(n)["descriptors"])
    with open_store(imported / "cbir/matches/SIFT.h5") as a, open_store(imported / "cbir/matches/hloc.h5") as b:
        assert sorted(a.keys) == sorted(b.keys)
        for k in a.keys:
            ma, mb = a.get(k)["matches"], b.get(k)["matches"]
            # hloc keeps one match per keypoint of image0 (matches0): compare on that support
            first = {int(i): int(j) for i, j in ma}
            assert {int(i): int(j) for i, j in mb} == first


def test_hloc_nested_names_and_old_pair_keys(tmp_path, sample_dataset):
    ds = Dataset(sample_dataset)
    interchange.export_hloc(ds, "sample", features_out=str(tmp_path / "f.h5"))
    with h5py.File(tmp_path / "old.h5", "w") as f:  # hloc < 1.4 keys: name0_name1 with '/' -> '-'
        g = f.create_group("left-000.png_right-000.png")
        g["matches0"] = np.array([1, -1, 0, -1, 3], np.int32)
        g["matching_scores0"] = np.array([0.9, 0, 0.8, 0, 0.7], np.float32)
    interchange.import_hloc(ds, features=str(tmp_path / "f.h5"), matches=str(tmp_path / "old.h5"), name="h")
    with open_store(sample_dataset / "cbir/matches/h.h5") as s:
        got = s.get(("left/000.png", "right/000.png"))
        assert got["matches"].tolist() == [[0, 1], [2, 0], [4, 3]]


# ------------------------------------------------------------------ visuallocalization.net

def test_vlnet_round_trip(sceaux, tmp_path):
    import shutil
    shutil.copytree(sceaux / "query_gt", tmp_path / "gt")
    shutil.copytree(sceaux / "query", tmp_path / "q")
    interchange.export_vlnet(Dataset(tmp_path / "gt"), tmp_path / "poses.txt")
    lines = (tmp_path / "poses.txt").read_text().splitlines()
    assert len(lines) == 3 and lines[0].split()[0] == "100_7102.jpg" and len(lines[0].split()) == 8
    interchange.import_vlnet(tmp_path / "poses.txt", Dataset(tmp_path / "q"))
    assert read_sensor_data(tmp_path / "q").trajectories == read_sensor_data(tmp_path / "gt").trajectories


def test_vlnet_bad_lines(tmp_path, sceaux):
    p = tmp_path / "s.txt"
    p.write_text("100_7102.jpg 1 0 0 0 1 2\n")
    with pytest.raises(FormatError, match=r"s.txt:1: expected 8 fields"):
        interchange.import_vlnet(p, Dataset(sceaux / "query"))


def test_an_image_folder_becomes_a_dataset_with_exif_cameras(tmp_path):
    """`cbir import images`: one record per image in name order; images whose EXIF gives a
    focal length share a SIMPLE_RADIAL camera per make, model, focal and size, the others
    get an UNKNOWN_CAMERA each; other files and links are skipped and reported (issue 26)."""
    from PIL import Image

    src = tmp_path / "photos"
    (src / "day").mkdir(parents=True)

    def save(name: str, size: tuple[int, int], make: str | None = None, f35: int | None = None) -> None:
        exif = Image.Exif()
        if make:
            exif[0x010F], exif[0x0110] = make, "Model X\x00"
        if f35:
            exif.get_ifd(0x8769)[0xA405] = f35
        Image.new("RGB", size, (90, 120, 200)).save(src / name, exif=exif)

    save("a.jpg", (640, 480), "Canon", 28)
    save("day/b.jpg", (640, 480), "Canon", 28)  # the same camera
    save("c.jpg", (640, 480), "Canon", 50)  # another focal length
    save("d.jpg", (320, 240))  # no EXIF
    (src / "notes.txt").write_text("not an image")
    (src / ".hidden.jpg").write_bytes(b"")
    (src / "link.jpg").symlink_to(src / "a.jpg")
    report = interchange.import_images(src, tmp_path / "ds")
    assert (report.images, report.exif_cameras, report.exif_images, report.unknown_images) == (4, 2, 3, 1)
    assert {f for f, _ in report.skipped} == {"notes.txt", "link.jpg"}
    data = read_sensor_data(tmp_path / "ds")
    assert [(r.timestamp, r.name) for r in data.records] == [(0, "a.jpg"), (1, "c.jpg"), (2, "d.jpg"),
                                                             (3, "day/b.jpg")]
    cam = {r.name: data.sensors[r.camera_id] for r in data.records}
    assert cam["a.jpg"] is cam["day/b.jpg"] and cam["a.jpg"].name == "Canon Model X"
    assert cam["a.jpg"].model == "SIMPLE_RADIAL" and cam["a.jpg"].params == (28 / 36 * 640, 320.0, 240.0, 0.0)
    assert cam["c.jpg"].params[0] == 50 / 36 * 640
    assert (cam["d.jpg"].model, cam["d.jpg"].width, cam["d.jpg"].height) == ("UNKNOWN_CAMERA", 320, 240)
    assert filecmp.cmp(src / "day" / "b.jpg", tmp_path / "ds" / "sensors" / "records_data" / "day" / "b.jpg")
    with pytest.raises(CbirError, match="already a dataset"):
        interchange.import_images(src, tmp_path / "ds")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CbirError, match="no image to import"):
        interchange.import_images(tmp_path / "empty", tmp_path / "ds2")
    assert not (tmp_path / "ds2" / "sensors").exists()

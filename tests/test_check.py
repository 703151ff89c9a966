"""`check_dataset` finds each kind of problem and names the file."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from cbir.errors import CbirError
from cbir.io.check import check_dataset, dataset_info
from cbir.io.dataset import Dataset


def _problems(root: Path, **kw) -> list[str]:
    return [str(p) for p in check_dataset(Dataset(root), **kw)]


def test_valid_sample_has_no_problem(sample_dataset):
    assert _problems(sample_dataset) == []


def test_missing_and_unreadable_images(sample_dataset):
    (sample_dataset / "sensors/records_data/left/000.png").unlink()
    (sample_dataset / "sensors/records_data/right/000.png").write_bytes(b"garbage")
    problems = _problems(sample_dataset)
    assert any("left/000.png: image file is missing" in p for p in problems)
    assert any("right/000.png: image cannot be read: cannot decode image" in p for p in problems)
    assert all(p.startswith("error") for p in problems)
    assert not any("right/000.png" in p for p in _problems(sample_dataset, images="exists"))


def test_image_size_differs_from_camera(sample_dataset):
    import cv2
    cv2.imwrite(str(sample_dataset / "sensors/records_data/left/001.png"), np.zeros((10, 10, 3), np.uint8))
    (p,) = _problems(sample_dataset)
    assert p.startswith("warning") and "is 10x10 but camera 'left' is 64x48" in p


def test_symlink_out_of_the_dataset(sample_dataset, tmp_path):
    outside = tmp_path / "outside.png"
    target = sample_dataset / "sensors/records_data/left/000.png"
    os.replace(target, outside)
    target.symlink_to(outside)
    (p,) = _problems(sample_dataset)
    assert "symbolic link out of records_data/" in p and "--follow-symlinks" in p
    assert check_dataset(Dataset(sample_dataset, follow_symlinks=True)) == []


def test_broken_sensor_file_is_reported_with_its_line(sample_dataset):
    traj = sample_dataset / "sensors/trajectories.txt"
    traj.write_text(traj.read_text().replace("0, rig, 1.0", "0, rig, 2.0"))
    (p,) = _problems(sample_dataset)
    assert "trajectories.txt:3: quaternion is not a rotation" in p


def test_every_broken_sensor_file_is_reported_in_one_run(sample_dataset):
    """One broken file does not hide the others: each is read on its own (issue 26)."""
    sensors = sample_dataset / "sensors"
    for name, line in (("sensors.txt", "oops"), ("records_camera.txt", "x, y"), ("trajectories.txt", "a, b")):
        (sensors / name).write_text((sensors / name).read_text() + line + "\n")
    problems = [str(p) for p in _problems(sample_dataset)]
    assert [p.split(":")[1].strip().rsplit("/", 1)[-1] for p in problems] == \
        ["sensors.txt", "records_camera.txt", "trajectories.txt"], problems


def test_nan_in_local_features(sample_dataset):
    with h5py.File(sample_dataset / "cbir/local/sample.h5", "a") as f:
        f["keypoints"][6] = [np.nan, 1.0]
    (p,) = _problems(sample_dataset)
    assert "local/sample.h5: 'keypoints' has NaN or infinite values (first in 'right/000.png')" in p


def test_ragged_column_length_mismatch(sample_dataset):
    with h5py.File(sample_dataset / "cbir/local/sample.h5", "a") as f:
        del f["scores"]
        f["scores"] = np.zeros(4, np.float32)
    (p,) = _problems(sample_dataset)
    assert "'scores' has 4 rows, offsets end at 9" in p


def test_descriptor_dim_attribute_mismatch(sample_dataset):
    with h5py.File(sample_dataset / "cbir/local/sample.h5", "a") as f:
        f.attrs["descriptor_dim"] = 128
    (p,) = _problems(sample_dataset)
    assert "descriptors have 8 dimensions, the descriptor_dim attribute says 128" in p


def test_unnormalized_global_descriptor_is_a_warning(sample_dataset):
    with h5py.File(sample_dataset / "cbir/global/sample.h5", "a") as f:
        f["descriptors"][1] = [3.0, 0, 0, 0]
    (p,) = _problems(sample_dataset)
    assert p.startswith("warning") and "'right/000.png' is not L2-normalized (norm 3)" in p


def test_match_index_beyond_keypoints(sample_dataset):
    with h5py.File(sample_dataset / "cbir/matches/sample.h5", "a") as f:
        f["matches"][2] = [4, 99]
    (p,) = _problems(sample_dataset)
    assert "match index beyond the keypoints" in p and "right/000.png" in p


def test_map_track_beyond_keypoints(sample_dataset):
    with h5py.File(sample_dataset / "cbir/map/sample.h5", "a") as f:
        f["track_keypoints"][1] = 50
    (p,) = _problems(sample_dataset)
    assert "map/sample.h5: a track references a keypoint index beyond" in p


def test_corrupt_store_does_not_stop_the_check(sample_dataset):
    (sample_dataset / "cbir/local/sample.h5").write_bytes(b"\0" * 100)
    problems = _problems(sample_dataset)
    assert any("local/sample.h5: not a readable HDF5 file" in p for p in problems)


def test_info_counts(sample_dataset):
    info = dataset_info(Dataset(sample_dataset))
    assert info["images"] == 3 and info["images_with_pose"] == 3
    assert [c["id"] for c in info["cameras"]] == ["left", "right"]
    stores = {(s["kind"], s["name"]): s for s in info["stores"]}
    assert stores["local", "sample"]["rows"] == 9 and stores["local", "sample"]["dim"] == 8
    assert stores["matches", "sample"]["verified"] is True
    assert stores["map", "sample"]["mean_track_length"] == 1.5


def test_not_a_dataset(tmp_path):
    with pytest.raises(CbirError, match="sensors/sensors.txt is missing"):
        Dataset(tmp_path)


def test_unmerged_ray_shards_are_reported(sample_dataset):
    """Shards left by an interrupted `cbir extract --executor ray` are a warning that says
    how to finish them."""
    (sample_dataset / "cbir" / "shards" / "0123456789abcdef" / "000000" / "local").mkdir(parents=True)
    problems = _problems(sample_dataset)
    assert len(problems) == 1 and problems[0].startswith("warning") and "run the same command again" in problems[0]

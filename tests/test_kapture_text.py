"""kapture 1.1 text files: exact round trips with the kapture package, both directions,
and one-line errors on malformed input."""

from __future__ import annotations

import shutil
from pathlib import Path

import kapture
import kapture.io.csv as kcsv
import numpy as np
import pytest

from cbir.errors import FormatError, VersionError
from cbir.geometry.cameras import CAMERA_MODELS, Camera
from cbir.geometry.poses import Pose
from cbir.io.kapture_text import (
    read_records_camera,
    read_rigs,
    read_sensor_data,
    read_sensors,
    read_trajectories,
    write_sensor_data,
)
from cbir.io.sensors import ImageRecord, Sensor, SensorData

KAPTURE_MODELS = [m for m in CAMERA_MODELS if m in kapture.CameraType.__members__]


def _assert_same_as_kapture(ours: SensorData, theirs: kapture.Kapture) -> None:
    cams = {k: v for k, v in theirs.sensors.items() if isinstance(v, kapture.Camera)}
    assert set(cams) == set(ours.cameras)
    for sid, cam in cams.items():
        mine = ours.cameras[sid]
        assert cam.camera_type.value == mine.model
        assert [float(v) for v in cam.camera_params] == [mine.width, mine.height, *mine.params]
    others = {k: v for k, v in theirs.sensors.items() if not isinstance(v, kapture.Camera)}
    assert {k: (v.sensor_type, list(v.sensor_params)) for k, v in others.items()} == \
        {k: (v.sensor_type, list(v.params)) for k, v in ours.sensors.items() if isinstance(v, Sensor)}
    records = theirs.records_camera or {}
    assert {(ts, cam, name) for ts, cam, name in kapture.flatten(records)} == \
        {(r.timestamp, r.camera_id, r.name) for r in ours.records}
    traj = theirs.trajectories or {}
    assert len(list(kapture.flatten(traj))) == len(ours.trajectories)
    for ts, dev, pose in kapture.flatten(traj):
        mine = ours.trajectories[(ts, dev)]
        assert pose.r_raw == list(mine.qvec) and pose.t_raw == list(mine.tvec)
    rigs = theirs.rigs or {}
    assert {(r, s): (p.r_raw, p.t_raw) for r, s, p in kapture.flatten(rigs)} == \
        {(r, s): (list(p.qvec), list(p.tvec)) for r, rig in ours.rigs.items() for s, p in rig.items()}


def _kapture_load(root: Path) -> kapture.Kapture:
    return kcsv.kapture_from_dir(str(root), skip_list=[kapture.Keypoints, kapture.Descriptors,
                                                       kapture.GlobalFeatures, kapture.Matches,
                                                       kapture.Points3d, kapture.Observations])


def generated_sensor_data() -> SensorData:
    """Every camera model kapture knows, a rig, odd but legal values."""
    rng = np.random.default_rng(1)
    data = SensorData()
    for i, model in enumerate(KAPTURE_MODELS):
        n = len(CAMERA_MODELS[model])
        params = tuple(float(v) for v in np.concatenate([[500.0 + i], rng.uniform(0.001, 300, n - 1)]))
        data.sensors[f"cam{i}"] = Camera(model, 640 + i, 480, params, f"camera {i}")
    data.sensors["lidar0"] = Sensor("lidar", (), "")
    data.rigs["rig0"] = {"cam0": Pose((1.0, 0.0, 0.0, 0.0), (0.25, 0.0, 0.0)),
                         "cam1": Pose.from_matrix(np.diag([1.0, -1.0, -1.0]), np.array([1e-7, 2.0, 3.5]))}
    for t in range(5):
        for c in ("cam0", "cam1", "cam2"):
            data.records.append(ImageRecord(t * 1000, c, f"seq/{c}/{t:04d}.jpg"))
        q = rng.standard_normal(4)
        q /= np.linalg.norm(q)
        data.trajectories[(t * 1000, "rig0")] = Pose(tuple(q), tuple(rng.standard_normal(3) * 100))
        data.trajectories[(t * 1000, "cam2")] = Pose(tuple(-q), (0.1, 1e-12, -3e8))
    return data


def test_generated_dataset_is_read_by_kapture_with_same_values(tmp_path):
    data = generated_sensor_data()
    write_sensor_data(tmp_path, data)
    _assert_same_as_kapture(data, _kapture_load(tmp_path))
    again = read_sensor_data(tmp_path)
    assert again == data


def test_kapture_written_dataset_is_read_by_cbir(tmp_path):
    data = generated_sensor_data()
    write_sensor_data(tmp_path / "a", data)
    theirs = _kapture_load(tmp_path / "a")
    kcsv.kapture_to_dir(str(tmp_path / "b"), theirs)
    ours = read_sensor_data(tmp_path / "b")
    _assert_same_as_kapture(ours, theirs)
    assert ours.trajectories == data.trajectories and ours.rigs == data.rigs


@pytest.mark.parametrize("name", ["kapture_maupertuis", "sceaux_castle/mapping", "sceaux_castle/query_gt"])
def test_real_datasets_round_trip_through_kapture(shared, tmp_path, name):
    src = shared / "data" / name
    ours = read_sensor_data(src)
    _assert_same_as_kapture(ours, _kapture_load(src))
    write_sensor_data(tmp_path / "cbir", ours)
    _assert_same_as_kapture(ours, _kapture_load(tmp_path / "cbir"))
    kcsv.kapture_to_dir(str(tmp_path / "kap"), _kapture_load(src))
    assert read_sensor_data(tmp_path / "kap") == ours


def test_rig_composition_matches_kapture(tmp_path):
    """image_poses() composes rig and trajectory poses as kapture's rigs_remove does."""
    import quaternion
    from kapture.core.Trajectories import rigs_remove

    data = generated_sensor_data()
    write_sensor_data(tmp_path, data)
    theirs = _kapture_load(tmp_path)
    flat = rigs_remove(theirs.trajectories, theirs.rigs)
    poses = data.image_poses()
    assert len(poses) == len(data.records)
    for r in data.records:
        expected = flat[r.timestamp, r.camera_id]
        assert np.allclose(poses[r.name].rotation_matrix, quaternion.as_rotation_matrix(expected.r), atol=1e-9)
        assert np.allclose(poses[r.name].tvec, expected.t.ravel(), rtol=1e-9, atol=1e-6)


# ------------------------------------------------------------------ malformed input

def _write(tmp_path: Path, text: str | bytes, name: str = "f.txt") -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def _error(func, path, *args) -> str:
    before = path.read_bytes()
    with pytest.raises(FormatError) as info:
        func(path, *args)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path))
    assert path.read_bytes() == before  # input untouched
    return msg


def test_comments_blank_lines_and_extra_spaces_are_accepted(tmp_path):
    p = _write(tmp_path, "# kapture format: 1.1\n\n# comment\n  cam0 ,  name , camera , PINHOLE ,"
                         " 10 , 20 , 5 , 5 , 5 , 10  \n   \n")
    cams = read_sensors(p)
    assert cams["cam0"] == Camera("PINHOLE", 10, 20, (5.0, 5.0, 5.0, 10.0), "name")


def test_missing_columns_name_the_line(tmp_path):
    p = _write(tmp_path, "# kapture format: 1.1\n0, cam0, a.jpg\n1, cam0\n")
    assert ":3: expected 3 columns" in _error(read_records_camera, p)


def test_wrong_parameter_count_for_camera_model(tmp_path):
    p = _write(tmp_path, "cam0, , camera, SIMPLE_RADIAL, 10, 20, 5, 5, 5\n")
    assert ":1: camera model SIMPLE_RADIAL takes" in _error(read_sensors, p)


def test_unknown_camera_model(tmp_path):
    p = _write(tmp_path, "cam0, , camera, BROWN_CONRADY, 10, 20, 5\n")
    assert "unknown camera model 'BROWN_CONRADY'" in _error(read_sensors, p)


def test_unknown_sensor_types_are_kept_verbatim(tmp_path):
    p = _write(tmp_path, "s0, thermo, thermometer, celsius, 3\n")
    assert read_sensors(p)["s0"] == Sensor("thermometer", ("celsius", "3"), "thermo")


@pytest.mark.parametrize("pose,message", [
    ("nan, 0, 0, 0, 1, 2, 3", "NaN"),
    ("1, 0, 0, 0, inf, 2, 3", "NaN or infinite"),
    ("0.5, 0.5, 0, 0, 1, 2, 3", "not a rotation"),
    ("0, 0, 0, 0, 1, 2, 3", "not a rotation"),
    ("1, 0, 0, 0, 1, 2", "expected 9 columns"),
    ("1, 0, 0, 0, x, 2, 3", "tx is not a number"),
    (", , , , 1, 2, 3", "empty rotation"),
])
def test_bad_poses(tmp_path, pose, message):
    p = _write(tmp_path, f"# kapture format: 1.1\n0, cam0, {pose}\n")
    assert message in _error(read_trajectories, p)


def test_quaternion_with_limited_precision_is_accepted(tmp_path):
    p = _write(tmp_path, "0, cam0, 0.998245, -0.000889039, -0.0384732, -0.045019, 1, 2, 3\n")
    pose = read_trajectories(p)[(0, "cam0")]
    assert pose.qvec == (0.998245, -0.000889039, -0.0384732, -0.045019)  # kept as written


def test_duplicate_image_names(tmp_path):
    p = _write(tmp_path, "0, cam0, a.jpg\n1, cam1, a.jpg\n")
    assert ":2: duplicate image 'a.jpg' (first at line 1)" in _error(read_records_camera, p)


def test_two_images_for_one_camera_and_timestamp(tmp_path):
    p = _write(tmp_path, "0, cam0, a.jpg\n0, cam0, b.jpg\n")
    assert "two images at timestamp 0" in _error(read_records_camera, p)


def test_record_of_unknown_camera(tmp_path):
    p = _write(tmp_path, "0, cam9, a.jpg\n")
    assert "unknown camera 'cam9'" in _error(read_records_camera, p, {"cam0"})


@pytest.mark.parametrize("name,message", [
    ("/etc/passwd", "absolute"), ("../x.jpg", "escapes"), ("a/../../x.jpg", "escapes"),
    ("C:/x.jpg", "absolute"), ("a\\b.jpg", "backslash"), ("a//b.jpg", "not normalized"),
])
def test_image_paths_escaping_records_data(tmp_path, name, message):
    p = _write(tmp_path, f"0, cam0, {name}\n")
    assert message in _error(read_records_camera, p)


def test_non_utf8_line(tmp_path):
    p = _write(tmp_path, b"0, cam0, caf\xe9.jpg\n")
    assert ":1: line is not valid UTF-8" in _error(read_records_camera, p)


def test_utf8_names_are_fine(tmp_path):
    p = _write(tmp_path, "0, cam0, café/東京.jpg\n")
    assert read_records_camera(p)[0].name == "café/東京.jpg"


def test_empty_files_give_empty_data(tmp_path):
    assert read_sensors(_write(tmp_path, "")) == {}
    assert read_trajectories(_write(tmp_path, "", "t.txt")) == {}


def test_newer_major_version_is_refused(tmp_path):
    p = _write(tmp_path, "# kapture format: 2.0\n0, cam0, a.jpg\n")
    with pytest.raises(VersionError, match="kapture format 2.0 is newer"):
        read_records_camera(p)


def test_rig_entry_of_an_unknown_sensor_is_dropped_with_a_warning(tmp_path):
    """As kapture does (its own tutorial dataset has such entries); a malformed one is still an error."""
    p = _write(tmp_path, "rig, cam0, 1, 0, 0, 0, 0, 0, 0\nrig, camX, 1, 0, 0, 0, 0, 0, 0\n")
    warnings: list = []
    assert set(read_rigs(p, {"cam0"}, warnings)["rig"]) == {"cam0"}
    assert len(warnings) == 1 and "'camX', which sensors.txt lacks" in warnings[0][2] and warnings[0][1] == 2
    bad = _write(tmp_path, "rig, camX, nan, 0, 0, 0, 0, 0, 0\n")
    assert "NaN" in _error(read_rigs, bad, {"cam0"})


def test_duplicate_trajectory(tmp_path):
    p = _write(tmp_path, "0, cam0, 1, 0, 0, 0, 0, 0, 0\n0, cam0, 1, 0, 0, 0, 1, 0, 0\n")
    assert "duplicate pose" in _error(read_trajectories, p)


def test_writes_are_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves the previous file intact and no partial file behind."""
    data = generated_sensor_data()
    write_sensor_data(tmp_path, data)
    before = (tmp_path / "sensors/trajectories.txt").read_bytes()
    import cbir.io.kapture_text as kt

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(kt, "format_trajectories", boom)
    with pytest.raises(RuntimeError):
        write_sensor_data(tmp_path, data)
    assert (tmp_path / "sensors/trajectories.txt").read_bytes() == before
    assert not list(tmp_path.rglob("*.partial"))
    shutil.rmtree(tmp_path / "sensors")

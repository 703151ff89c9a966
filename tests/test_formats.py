"""The golden samples of formats/ are read with the values the specification gives,
and the sample generator still writes exactly them."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np

from cbir.io.check import check_dataset
from cbir.io.dataset import Dataset
from cbir.io.map_store import read_map
from cbir.io.pairs import read_pairs
from cbir.io.store import open_store

from .conftest import REPO, SAMPLES


def test_samples_are_valid_and_hold_the_documented_values():
    ds = Dataset(SAMPLES)
    assert check_dataset(ds) == []
    data = ds.sensors
    assert data.cameras["right"].model == "OPENCV" and data.cameras["right"].params[-1] == 0.0005
    assert set(data.image_poses()) == {"left/000.png", "right/000.png", "left/001.png"}
    np.testing.assert_allclose(data.image_poses()["right/000.png"].tvec, [-0.1, 0, 0])
    with open_store(SAMPLES / "cbir/local/sample.h5") as s:
        assert s.keys == ["left/000.png", "right/000.png", "left/001.png"]
        assert s.offsets.tolist() == [0, 5, 9, 9]
        assert s.get("left/001.png")["keypoints"].shape == (0, 2)
        assert s.attrs["keypoint_params"] == "scale" and s.dataset("descriptors").dtype == np.float16
    with open_store(SAMPLES / "cbir/global/sample.h5") as s:
        np.testing.assert_allclose(np.linalg.norm(s.read_all("descriptors"), axis=1), 1, atol=1e-6)
    with open_store(SAMPLES / "cbir/matches/sample.h5") as s:
        got = s.get(("left/000.png", "right/000.png"))
        assert got["matches"].tolist() == [[0, 1], [2, 0], [4, 3]] and got["inliers"].tolist() == [1, 1, 0]
        assert got["geometry_config"] == 2 and np.isnan(got["F"]).all()
    m = read_map(SAMPLES / "cbir/map/sample.h5")
    assert m.track_offsets.tolist() == [0, 2, 3] and m.colors[1].tolist() == [0, 128, 255]
    kp2pt = m.keypoint_to_point()
    assert kp2pt["left/000.png"][0].tolist() == [0, 2] and kp2pt["left/000.png"][1].tolist() == [0, 1]
    assert [p.score for p in read_pairs(SAMPLES / "cbir/pairs/sample.txt")] == [0.96, 0.5]


def test_sample_generator_reproduces_the_committed_samples(tmp_path):
    out = tmp_path / "samples"
    subprocess.run([sys.executable, str(REPO / "formats" / "make_samples.py"), str(out)], check=True)
    committed = sorted(p.relative_to(SAMPLES) for p in SAMPLES.rglob("*") if p.is_file())
    assert committed == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for rel in committed:
        if rel.suffix == ".h5":
            with h5py.File(SAMPLES / rel) as a, h5py.File(out / rel) as b:
                assert sorted(a) == sorted(b)
                assert {k: v for k, v in a.attrs.items() if k != "cbir_version"} == \
                       {k: v for k, v in b.attrs.items() if k != "cbir_version"}
                for name in a:
                    np.testing.assert_array_equal(a[name][()], b[name][()])
                    assert a[name].dtype == b[name].dtype
        else:
            assert (SAMPLES / rel).read_bytes() == (out / rel).read_bytes(), rel

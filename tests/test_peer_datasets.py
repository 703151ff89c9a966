"""kapture-localization's own tutorial dataset, read and localized as its tutorial does.

``../shared/data/virtual_gallery_tutorial``: a mapping rig whose rigs.txt names four sensors
that sensors.txt lacks (kapture drops them), one camera per query, and the tutorial's
precomputed R2D2 (500 keypoints) and AP-GeM features laid out beside the kapture. The
tutorial links those folders into ``reconstruction/``; so does this test, then imports
(``--follow-symlinks``: the links lead out of the kapture folder),
retrieves, matches, maps, localizes and evaluates with cbir's commands.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cbir.cli import main
from cbir.io.check import check_dataset
from cbir.io.dataset import Dataset

pytestmark = pytest.mark.slow


def run(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def tutorial(shared: Path) -> Path:
    root = shared / "data" / "virtual_gallery_tutorial"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    return root


def _as_the_tutorial_links_it(tutorial: Path, part: str, dst: Path) -> Path:
    """A kapture dataset whose reconstruction/ links the feature folders beside it."""
    kapture = dst / f"{part}-kapture"
    kapture.mkdir(parents=True)
    (kapture / "sensors").symlink_to(tutorial / part / "sensors", target_is_directory=True)
    rec = kapture / "reconstruction"
    for kind, folder in (("keypoints", "local_features/r2d2_500/keypoints"),
                         ("descriptors", "local_features/r2d2_500/descriptors"),
                         ("global_features", "global_features/AP-GeM-LM18/global_features")):
        name = "AP-GeM-LM18" if kind == "global_features" else "r2d2_500"
        (rec / kind).mkdir(parents=True)
        (rec / kind / name).symlink_to(tutorial / folder, target_is_directory=True)
    return kapture


def test_the_tutorial_dataset_is_read_as_kapture_reads_it(tutorial):
    """rigs.txt names training_camera_2..5, which sensors.txt lacks: read, dropped, and
    reported by `cbir check` as a warning (kapture reads the dataset)."""
    ds = Dataset(tutorial / "mapping")
    assert set(ds.sensors.rigs["training_rig"]) == {"training_camera_0", "training_camera_1"}
    assert len(ds.sensors.image_poses()) == 12
    run("info", tutorial / "mapping")
    problems = check_dataset(ds, images="exists")
    assert [p.level for p in problems] == ["warning"] * 4
    assert all("sensors.txt lacks: the entry is ignored" in p.message for p in problems)


def test_tutorial_queries_localized_with_its_precomputed_features(tutorial, tmp_path):
    m, q = tmp_path / "mapping", tmp_path / "query"
    for part, out in (("mapping", m), ("query", q)):
        linked = _as_the_tutorial_links_it(tutorial, part, tmp_path)
        if part == "mapping":  # links out of the dataset are followed only when asked (issue 31)
            result = CliRunner().invoke(main, ["import", "kapture", str(linked), str(out), "--images", "link"])
            assert result.exit_code == 1 and "pass --follow-symlinks" in result.output and not out.exists()
        run("import", "kapture", linked, out, "--images", "link", "--follow-symlinks")
        assert (out / "cbir/local/r2d2_500.h5").is_file() and (out / "cbir/global/AP-GeM-LM18.h5").is_file()
    run("retrieve", "--map", m, "--query", q, "--global", "AP-GeM-LM18", "--topk", "5", "-o", tmp_path / "q.txt")
    run("pairs", "exhaustive", "--map", m, "-o", tmp_path / "m.txt")
    # map pairs verified with their known poses: the images' poses come through the rig
    # (trajectories.txt holds the rig's), so a wrong composition would lose the inliers
    out = json.loads(run("match", "--query", m, "--pairs", tmp_path / "m.txt", "--local", "r2d2_500", "--verify",
                         "poses", "--name", "map", "--json"))
    assert out["verified_with_poses"] == out["matched"] == 66 and out["ransac_fallbacks"] == []
    assert out["inliers"] > 0.5 * out["matches"]
    run("map", m, "--local", "r2d2_500", "--matches", "map")
    run("match", "--query", q, "--map", m, "--pairs", tmp_path / "q.txt", "--local", "r2d2_500", "--verify",
        "--name", "query")
    run("localize", "--query", q, "--map", m, "--pairs", tmp_path / "q.txt", "--local", "r2d2_500",
        "--matches", "query", "--config", "config2")
    gt = tmp_path / "gt"
    shutil.copytree(tutorial / "query" / "sensors", gt / "sensors", symlinks=True)
    overall = json.loads(run("evaluate", "--query", q, "--gt", gt, "--json"))["conditions"]["all"]
    # measured: all 4 within (0.25 m, 2 deg), median 7 mm / 0.12 deg
    assert overall["queries"] == 4 and overall["localized"] == 4
    assert overall["within"][0] == 1.0 and overall["median_translation"] < 0.05

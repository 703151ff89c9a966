"""The README's example: the rendered courtyard is localized end to end by `cbir pipeline`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cbir.cli import main
from cbir.io.dataset import Dataset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_make_scene():
    spec = importlib.util.spec_from_file_location("make_scene", EXAMPLES / "make_scene.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rendered_views_follow_their_poses(tmp_path):
    """A wall corner projected with the ground-truth pose lands where the renderer drew it."""
    ms = load_make_scene()
    tex = ms.textures()
    pose = ms.look(0.0, 0.0, (0.0, 0.0, 0.0))
    img = ms.render(pose, tex, np.random.default_rng(0)).astype(float)
    # the back wall's bottom edge (y = 2, z = 12) projects to row 240 + 420 * 2 / 12 = 310
    row = int(round(ms.HEIGHT / 2 + ms.FOCAL * 2.0 / 12.0))
    above, below = img[row - 6:row - 2, 300:340].mean(), img[row + 2:row + 6, 300:340].mean()
    assert abs(above - below) > 5  # an edge (rocket photo above, gravel below)


@pytest.mark.slow
def test_example_pipeline_localizes_every_query(tmp_path):
    ms = load_make_scene()
    scene = tmp_path / "scene"
    ms.main(scene)
    assert len(Dataset(scene / "mapping").sensors.image_poses()) == 12
    assert not Dataset(scene / "query").sensors.image_poses()
    config = (EXAMPLES / "scene.toml").read_text().replace("_out/scene", str(scene))
    (tmp_path / "scene.toml").write_text(config)
    r = CliRunner().invoke(main, ["pipeline", str(tmp_path / "scene.toml"), "--json"])
    assert r.exit_code == 0, r.output + r.stderr
    ev = json.loads(r.stdout)["evaluation"]["all"]
    assert ev["queries"] == 5 and ev["localized"] == 5
    assert ev["within"] == [1.0, 1.0, 1.0] and ev["median_translation"] < 0.05

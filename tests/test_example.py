"""The README's example: the rendered courtyard is localized end to end by `cbir pipeline`."""

from __future__ import annotations

import importlib.util
import json
import math
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


@pytest.fixture(scope="module")
def example_run(tmp_path_factory) -> tuple[Path, dict]:
    """The README's example: rendered, then `cbir pipeline examples/scene.toml`."""
    tmp_path = tmp_path_factory.mktemp("example")
    ms = load_make_scene()
    scene = tmp_path / "scene"
    ms.main(scene)
    config = (EXAMPLES / "scene.toml").read_text().replace("_out/scene", str(scene))
    (tmp_path / "scene.toml").write_text(config)
    r = CliRunner().invoke(main, ["pipeline", str(tmp_path / "scene.toml"), "--json"])
    assert r.exit_code == 0, r.output + r.stderr
    return scene, json.loads(r.stdout)


@pytest.mark.slow
def test_example_pipeline_localizes_every_query(example_run):
    scene, result = example_run
    assert len(Dataset(scene / "mapping").sensors.image_poses()) == 12
    assert not Dataset(scene / "query").sensors.image_poses()
    ev = result["evaluation"]["all"]
    assert ev["queries"] == 5 and ev["localized"] == 5
    assert ev["within"] == [1.0, 1.0, 1.0] and ev["median_translation"] < 0.05


@pytest.mark.slow
def test_example_report_opens_in_a_browser(example_run, browser):
    """The pipeline's report of the example, in headless Chromium with no network: no console
    error, the 3D view drawn, one card per query with its retrieved images and matches."""
    from .test_report import ESTIMATE_GREEN, TRUTH_BLUE, canvas_pixels, open_report

    [page] = (example_run[0] / "query" / "cbir" / "localization").glob("*/report.html")
    opened = open_report(browser, page)
    assert [m for m in opened["log"] if m["level"] == "SEVERE"] == []
    assert opened["cards"] == 5
    assert browser.execute_script("return document.querySelectorAll('.card .matches img').length") == 5
    assert browser.execute_script("return document.querySelectorAll('.retrieved figure.yes').length") >= 5
    assert canvas_pixels(browser, "scene3d") > 2000  # drawn: grid, points, cameras
    # the query cameras in it (estimates and ground truth millimetres apart: one hides the other);
    # the legend's two symbols alone are about 16 pixels
    assert canvas_pixels(browser, "scene3d", ESTIMATE_GREEN) + canvas_pixels(browser, "scene3d", TRUTH_BLUE) > 100
    assert canvas_pixels(browser, "curve-t") > 2000
    # a summary row per condition; the run's timings beside its configuration
    scene = example_run[0]
    r = CliRunner().invoke(main, ["report", "--query", str(scene / "query"), "--map", str(scene / "mapping"),
                                  "--gt", str(scene / "query_gt"), "--condition", "odd=query_00[13]",
                                  "-o", str(scene / "conditions.html")])
    assert r.exit_code == 0, r.output
    open_report(browser, scene / "conditions.html")
    rows = browser.execute_script("return Array.from(document.querySelectorAll('#summary table')[0].rows)"
                                  ".slice(1).map(r => [r.cells[0].textContent, r.cells[1].textContent])")
    assert rows == [["all", "5"], ["odd", "2"]]
    assert "localization time (s)" in browser.execute_script("return document.getElementById('config').textContent")
    # what the metrics count, under their table; curves from a decade to a decade, starting right
    # of the y axis; the 3D view says how an estimate shows at millimetre errors
    summary = browser.execute_script("return document.getElementById('summary').textContent")
    assert "mAP: the mean average precision over every correct map image" in summary
    ranges = browser.execute_script("return ['curve-t', 'curve-r'].map(id => "
                                    "document.getElementById(id).layout.xaxis.range)")
    for lo, hi in ranges:
        first = math.ceil(lo)  # the first decade, 4% of the span right of the axis
        assert float(hi).is_integer() and first - lo == pytest.approx(0.04 * (hi - first))
    assert "green ring" in browser.execute_script("return document.getElementById('scene-legend').textContent")


@pytest.mark.slow
def test_the_python_api_example_runs_the_steps_as_the_pipeline(example_run):
    """examples/python_api.py (the README's Python walk-through) on the example's output: every
    query localized, and the map it triangulates is the pipeline's, point for point."""
    from cbir.io.map_store import read_map

    scene, _ = example_run
    spec = importlib.util.spec_from_file_location("python_api", EXAMPLES / "python_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accuracy = module.run(scene)
    assert accuracy["queries"] == 5 and accuracy["within"] == [1.0, 1.0, 1.0]
    ours, pipeline = (read_map(scene / "mapping" / "cbir" / "map" / f"{name}.h5") for name in ("api", "sift"))
    np.testing.assert_array_equal(ours.points, pipeline.points)


@pytest.mark.slow
def test_the_readme_python_snippet_runs_on_the_example(example_run):
    """The README's "Reading what they wrote" snippet, as printed, on the example's output."""
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    part = readme[readme.index("Reading what they wrote"):]
    code = part[part.index("```python") + len("```python"):]
    code = code[:code.index("```")].replace("examples/_out/scene", str(example_run[0])).replace("...", "pass")
    names: dict = {}
    exec(compile(code, "README.md", "exec"), names)
    assert names["kp"].shape[1] == 2 and names["points"].shape[1] == 3 and len(names["poses"]) == 12


@pytest.mark.slow
def test_the_pipeline_retrieves_by_binary_codes(example_run, tmp_path):
    """[retrieve] hash: the pipeline encodes the global store with a hash model and ranks by
    the codes (the pairs of `cbir hash search`); a re-run reuses them; another model is a
    changed configuration, refused without --overwrite."""
    import shutil

    from cbir.io.pairs import read_pairs, read_pairs_record

    scene = tmp_path / "scene"
    shutil.copytree(example_run[0], scene)  # features reused; the other tests keep their copy
    runner = CliRunner()

    def cbir(*args: object) -> str:
        r = runner.invoke(main, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.output

    for seed in (0, 1):
        cbir("hash", "train", scene / "mapping", "--global", "densevlad", "--method", "lsh", "--bits", 64,
             "--seed", seed, "--out", tmp_path / f"lsh{seed}.npz")
    config = (EXAMPLES / "scene.toml").read_text().replace("_out/scene", str(scene))
    (tmp_path / "scene.toml").write_text(config)
    hashed = ["--set", f"retrieve.hash='{tmp_path / 'lsh0.npz'}'"]
    out = json.loads(cbir("pipeline", tmp_path / "scene.toml", "--json", *hashed))
    assert any(s.startswith("hash densevlad: densevlad-lsh64") for s in out["steps"])
    assert out["evaluation"]["all"]["localized"] == 5
    [pairs_file] = (scene / "query" / "cbir" / "pairs").glob("densevlad-lsh64_top5.txt")
    assert read_pairs_record(pairs_file)["config"]["stores"] == ["densevlad-lsh64"]
    cbir("hash", "search", "--map", scene / "mapping", "--query", scene / "query", "--global", "densevlad-lsh64",
         "--topk", 5, "-o", tmp_path / "hamming.txt")
    assert [(p.query, p.map) for p in read_pairs(pairs_file)] == \
        [(p.query, p.map) for p in read_pairs(tmp_path / "hamming.txt")]
    again = json.loads(cbir("pipeline", tmp_path / "scene.toml", "--json", *hashed))
    assert any("(reused)" in s for s in again["steps"] if s.startswith("retrieve"))
    # supervision by the map's co-visibility (the pipeline triangulated it, named by its local features)
    from cbir.pipeline.config import load_config
    from cbir.pipeline.plan import plan

    local = plan(load_config(tmp_path / "scene.toml")).local_name
    trained = json.loads(cbir("hash", "train", scene / "mapping", "--global", "densevlad", "--method", "dpsh",
                              "--bits", 16, "--covisible", 30, "--map-name", local, "--conf", "epochs=2",
                              "--out", tmp_path / "cov.npz", "--json"))
    assert trained["images"] == 12
    if len(list((scene / "mapping" / "cbir" / "map").glob("*.h5"))) > 1:  # the Python API example's map too
        r = runner.invoke(main, ["hash", "train", str(scene / "mapping"), "--global", "densevlad", "--method", "dpsh",
                                 "--bits", 16, "--covisible", 30, "--out", str(tmp_path / "x.npz")])
        assert r.exit_code != 0 and "name one with --map-name" in r.output
    from cbir.hashing.model import HashModel

    assert HashModel.load(tmp_path / "cov.npz").conf["supervision"] == "covisibility"
    other = ["--set", f"retrieve.hash='{tmp_path / 'lsh1.npz'}'"]
    r = runner.invoke(main, ["pipeline", str(tmp_path / "scene.toml"), *other])
    assert r.exit_code != 0 and "configuration changed" in r.output and "densevlad-lsh64" in r.output

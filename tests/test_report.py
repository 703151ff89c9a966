"""`cbir report`: the page's data, and the page itself opened in headless Chromium.

The README example's report (made by `cbir pipeline`) is opened in test_example.py."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cbir import report as report_mod
from cbir.errors import CbirError

from .conftest import writable_copy


def open_report(browser, path: Path) -> dict:
    """Open ``path``, wait for the page to be built; its console messages and timings."""
    browser.get_log("browser")  # drop what an earlier page logged
    browser.get(path.resolve().as_uri())
    deadline = time.time() + 30
    while browser.execute_script("return document.body.getAttribute('data-ready')") != "true":
        assert time.time() < deadline, "the page never finished building"
        time.sleep(0.05)
    return {"log": browser.get_log("browser"), **browser.execute_script("return window.cbirReport")}


def canvas_pixels(browser, element_id: str, colour: tuple[int, int, int] | None = None) -> int:
    """Pixels of an element's screenshot that are not the page's white background (or that
    are close to ``colour``, RGB), once the 3D view (drawn after the rest of the page) is done."""
    from selenium.webdriver.common.by import By

    deadline = time.time() + 60
    while browser.execute_script("return document.body.getAttribute('data-scene')") != "ready":
        assert time.time() < deadline, "the 3D view was never drawn"
        time.sleep(0.1)
    element = browser.find_element(By.ID, element_id)
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", element)
    time.sleep(0.5)  # the view repaints where it scrolled to
    png = element.screenshot_as_png
    img = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB).astype(int)
    reference = np.array(colour if colour is not None else (255, 255, 255))
    distance = np.abs(img - reference).sum(axis=2)
    return int((distance < 60).sum() if colour is not None else (distance > 60).sum())


#: the page's colours of the estimated and ground-truth query cameras
ESTIMATE_GREEN, TRUTH_BLUE = (0x2e, 0x9e, 0x5b), (0x25, 0x63, 0xeb)


def _thumbnails(shared: Path, n: int) -> list[str]:
    photos = sorted((shared / "data" / "sceaux_castle" / "mapping" / "sensors" / "records_data").rglob("*.jpg"))
    out = []
    for i in range(n):
        img = cv2.imread(str(photos[i % len(photos)]))
        img = cv2.resize(img, (160, 120), interpolation=cv2.INTER_AREA)
        img = np.roll(img, i, axis=1)  # every thumbnail its own bytes, as with real queries
        out.append(report_mod._jpeg(img))
    return out


def synthetic_report(shared: Path, queries: int, points: int) -> dict:
    """The data of a large run, as :func:`cbir.report.collect` makes it: ``queries`` cards
    with a thumbnail, 5 retrieved images and a matches picture each, ``points`` 3D points."""
    rng = np.random.default_rng(0)
    thumbs = _thumbnails(shared, queries + 50)
    wide = cv2.hconcat([cv2.imdecode(np.frombuffer(__import__("base64").b64decode(t.split(",")[1]), np.uint8),
                                     cv2.IMREAD_COLOR) for t in thumbs[:2]])
    cards = []
    for i in range(queries):
        ok = i % 10 != 0
        cards.append({"name": f"query/{i:05d}.jpg", "thumb": thumbs[i], "success": ok, "method": "pnp" if ok else "",
                      "reason": "" if ok else "too few inliers", "map_images": 5, "correspondences": 900,
                      "inliers": 400 if ok else 3, "error_t": float(rng.exponential(0.2)) if ok else None,
                      "error_R": float(rng.exponential(1.0)) if ok else None,
                      "retrieved": [{"name": f"map/{(i + k) % 50:04d}.jpg", "score": 0.9 - 0.1 * k,
                                     "correct": bool(k % 3)} for k in range(5)],
                      "matches": {"map": f"map/{i % 50:04d}.jpg", "inliers": 400,
                                  "image": report_mod._jpeg(np.roll(wide, i, axis=1), 75)} if ok else None})
    pts = rng.normal(0, 10, (points, 3))
    centres = rng.normal(0, 5, (50, 3))
    return {"title": "1000 queries", "config": {"config": "config2"}, "thresholds": [[0.25, 2], [0.5, 5], [5, 10]],
            "queries": queries, "localized": sum(c["success"] for c in cards),
            "evaluation": {"queries": queries, "localized": 900, "not_localized": 100, "within": [0.6, 0.8, 0.9],
                           "median_translation": 0.15, "median_rotation_deg": 0.7},
            "failed": [{"name": c["name"], "reason": c["reason"]} for c in cards if not c["success"]],
            "scene": {"points": pts.round(3).tolist(), "colors": ["#808080"] * points, "total_points": points,
                      "map_cameras": {"names": [f"map/{i:04d}.jpg" for i in range(50)], "centres": centres.tolist(),
                                      "axes": (centres + [0, 0, 1]).tolist()},
                      "queries": [{"name": c["name"],
                                   "estimate": rng.normal(0, 5, 3).tolist() if c["success"] else None,
                                   "truth": rng.normal(0, 5, 3).tolist()} for c in cards],
                      "bounds": [[-30, -30, -30], [30, 30, 30]]},
            "cards": cards, "map_thumbs": {f"map/{i:04d}.jpg": thumbs[queries + i] for i in range(50)}}


# ---------------------------------------------------------------- the page's data
def test_page_data_never_ends_its_script_element_and_has_no_nan(tmp_path):
    data = {"title": "</script><script>alert(1)</script>", "cards": [{"name": "a</b", "error_t": float("nan")}],
            "scene": {"points": [], "total_points": 0, "map_cameras": {"names": [], "centres": [], "axes": []},
                      "queries": []}, "value": np.int64(3), "ratio": np.float32(0.5)}
    report_mod.write(data, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    payload = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S).group(1)
    assert "</script>" not in payload and json.loads(payload)["cards"][0]["error_t"] is None
    assert json.loads(payload)["value"] == 3 and json.loads(payload)["title"] == "</script><script>alert(1)</script>"
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", page)  # nothing to fetch: all inline


def test_an_empty_run_gives_no_page(sample_dataset, tmp_path):
    from click.testing import CliRunner

    from cbir.cli import main

    (tmp_path / "empty.txt").write_text("# query_image, map_image, score\n")
    r = CliRunner().invoke(main, ["report", "--query", str(sample_dataset), "--map", str(sample_dataset),
                                  "--pairs", str(tmp_path / "empty.txt")])
    assert r.exit_code == 1 and "nothing to report" in r.output and not (tmp_path / "empty.html").exists()


def test_report_conf_checks_its_values():
    with pytest.raises(CbirError, match="thumb_size"):
        report_mod.ReportConf(thumb_size=4)
    with pytest.raises(CbirError, match="max_angle"):
        report_mod.ReportConf(max_angle=0)


# ---------------------------------------------------------------- in a real browser
@pytest.mark.slow
def test_a_1000_query_report_opens_quickly_and_stays_small(browser, shared, tmp_path):
    data = synthetic_report(shared, 1000, 100_000)
    out = tmp_path / "big.html"
    report_mod.write(data, out)
    size_mb = out.stat().st_size / 2 ** 20
    assert size_mb < 50, f"{size_mb:.1f} MB"
    page = open_report(browser, out)
    assert [m for m in page["log"] if m["level"] == "SEVERE"] == []
    assert page["cards"] == 1000
    # open: summary, curves and the 1000 cards shown; the 3D view of 100k points follows (seconds
    # on this machine's software WebGL)
    assert page["readyMs"] < 3000, f"built {page['readyMs']:.0f} ms after the navigation started"
    assert browser.execute_script("return document.querySelectorAll('#cards article').length") == 1000
    # filtering and sorting work on the built page
    browser.execute_script("const f = document.getElementById('filter'); f.value = 'failed';"
                           "f.dispatchEvent(new Event('change'));")
    assert browser.execute_script("return document.querySelectorAll('#cards article').length") == 100
    assert canvas_pixels(browser, "scene3d") > 5000


@pytest.mark.slow
def test_a_report_of_real_photos(browser, sceaux, tmp_path):
    """A retrieval-only report (no localization): retrieval cards alone, marked against
    pose-based ground truth, and no curves or failure list."""
    from click.testing import CliRunner

    from cbir.cli import main

    root = writable_copy(sceaux, tmp_path / "sceaux")
    m, q = root / "mapping", root / "query"
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("100_7102.jpg, 100_7101.jpg, 0.9\n100_7102.jpg, 100_7110.jpg, 0.8\n"
                     "100_7105.jpg, 100_7104.jpg, 0.7\n100_7108.jpg, 100_7107.jpg, 0.6\n")
    r = CliRunner().invoke(main, ["report", "--query", str(q), "--map", str(m), "--pairs", str(pairs),
                                  "--gt", str(root / "query_gt"), "--max-points", "10"])
    assert r.exit_code == 0, r.output
    page = open_report(browser, tmp_path / "pairs.html")
    assert [m for m in page["log"] if m["level"] == "SEVERE"] == []
    assert page["cards"] == 3
    marks = browser.execute_script(
        "return Array.from(document.querySelectorAll('.retrieved figure')).map(f => f.className)")
    assert len(marks) == 4 and set(marks) <= {"yes", "no"}
    assert browser.execute_script("return getComputedStyle(document.getElementById('curves-section')).display") \
        == "none"


HOSTILE_NAMES = ["q/<!--<script>.jpg", 'q/<a href="https://example.com" target="_top">link</a>.jpg',
                 'q/<span style="color:red">styled</span>.jpg', "q/a&amp;b\u2028c.jpg"]


def test_names_that_are_markup_stay_text(browser, tmp_path):
    """A name holding ``<!--<script>`` does not blank the page (the data block escapes the
    HTML parser's script states), and names in the 3D view's hover labels are text, not the
    links and styles plotly would render (issue 31)."""
    cards = [{"name": n, "success": True, "retrieved": [], "error_t": 0.1, "error_R": 0.2} for n in HOSTILE_NAMES]
    data = {"title": HOSTILE_NAMES[0], "thresholds": [[0.25, 2]], "queries": len(cards), "localized": len(cards),
            "failed": [], "cards": cards, "map_thumbs": {},
            "scene": {"points": [[0, 0, 0]], "colors": ["#808080"], "total_points": 1,
                      "map_cameras": {"names": HOSTILE_NAMES, "centres": [[i, 0, 0] for i in range(4)],
                                      "axes": [[i, 0, 1] for i in range(4)]},
                      "queries": [{"name": n, "estimate": [0, i, 0], "truth": [0, i, 1]}
                                  for i, n in enumerate(HOSTILE_NAMES)], "bounds": [[-1, -1, -1], [4, 4, 4]]}}
    report_mod.write(data, tmp_path / "r.html")
    payload = (tmp_path / "r.html").read_text().split('id="report-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in payload and json.loads(payload)["cards"][0]["name"] == HOSTILE_NAMES[0]
    assert open_report(browser, tmp_path / "r.html")["cards"] == len(HOSTILE_NAMES)
    deadline = time.time() + 60
    while browser.execute_script("return document.body.getAttribute('data-scene')") != "ready":
        assert time.time() < deadline, "the 3D view was never drawn"
        time.sleep(0.1)
    texts = browser.execute_script("return document.getElementById('scene3d').data.map((t) => t.text || [])")
    shown = [t for trace in texts for t in trace]
    assert shown and not any("<" in t for t in shown), shown
    assert any("&lt;a href" in t for t in shown)
    assert browser.execute_script("return document.querySelectorAll('a[target=_top], span[style*=red]').length") == 0
    assert browser.execute_script("return document.title") is not None  # the page is still there, not navigated

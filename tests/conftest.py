"""Shared fixtures. Real data is read in place from ../shared (override with --shared or CBIR_SHARED)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "formats" / "samples" / "dataset"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shared", default=None, help="path of the shared data folder (default: ../shared)")


@pytest.fixture(scope="session")
def shared(request: pytest.FixtureRequest) -> Path:
    path = Path(request.config.getoption("--shared") or os.environ.get("CBIR_SHARED") or REPO.parent / "shared")
    if not (path / "data").is_dir():
        pytest.skip(f"shared data not found at {path} (set --shared or CBIR_SHARED)")
    return path


def writable_copy(src: Path, dst: Path) -> Path:
    """A copy of a dataset the test may write into (../shared is read-only)."""
    import shutil

    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    return dst


def render_example(dst: Path) -> Path:
    """The README's example dataset, rendered by examples/make_scene.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_scene", REPO / "examples" / "make_scene.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(dst)
    return dst


@pytest.fixture(scope="session")
def maupertuis(shared: Path) -> Path:
    return shared / "data" / "kapture_maupertuis"


@pytest.fixture(scope="session")
def sceaux(shared: Path) -> Path:
    return shared / "data" / "sceaux_castle"


@pytest.fixture
def sample_dataset(tmp_path: Path) -> Path:
    """A writable copy of the golden sample dataset."""
    import shutil

    dst = tmp_path / "sample"
    shutil.copytree(SAMPLES, dst)
    return dst


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by Selenium (Debian's chromium and chromium-driver; `.ci/run`
    installs them). Without them the browser tests are skipped, unless CBIR_REQUIRE_BROWSER=1
    (CI) makes that a failure."""
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        message = "headless Chromium not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CBIR_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--enable-unsafe-swiftshader", "--use-angle=swiftshader",  # WebGL without a GPU
                "--host-resolver-rules=MAP * ~NOTFOUND"):  # no network: a page that needs one fails
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()

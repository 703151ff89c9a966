"""Shared fixtures. Real data is read in place from ../shared (override with --shared or CBIR_SHARED)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "formats" / "samples" / "dataset"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--shared", default=None, help="path of the shared data folder (default: ../shared)")


def pytest_sessionstart(session: pytest.Session) -> None:
    """The CPU and the math libraries of the run, printed first (also with -q): a result that
    depends on them (a float's last bits through a BLAS kernel) fails on some machines only."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for line in machine_lines():
            reporter.write_line(line)


def machine_lines() -> list[str]:
    """The CPU model and its vector extensions, torch's kernels, BLAS and threads, numpy's BLAS."""
    import platform
    import re

    import numpy as np
    import torch

    model, flags = platform.processor() or "unknown", ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M).group(1)
        present = set(re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M).group(1).split())
        wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile")
        flags = " ".join(f for f in wanted if f in present)
    except (OSError, AttributeError):
        pass
    blas = {c["name"] + " " + str(c.get("version", "")) for c in _numpy_blas(np)}
    torch_config = torch.__config__.show()
    torch_blas = ", ".join(sorted({m.group(1) for m in re.finditer(r"BLAS_INFO=(\w+)|LAPACK_INFO=(\w+)", torch_config)
                                   if m.group(1)})) or "?"
    return [f"cpu: {model} ({os.cpu_count()} cores; {flags or 'no AVX2'})",
            f"torch {torch.__version__}: {torch.backends.cpu.get_cpu_capability()} kernels, BLAS {torch_blas}, "
            f"{torch.get_num_threads()} threads; numpy {np.__version__}: BLAS {', '.join(sorted(blas)) or '?'}"]


def _numpy_blas(np) -> list[dict]:
    try:
        config = np.show_config(mode="dicts")
        return [v for k, v in config.get("Build Dependencies", {}).items() if k in ("blas", "lapack")]
    except Exception:  # an older numpy without mode="dicts": the header is information only
        return []


#: the thread counts equality tests run at: a sum reduced in another order by another count
#: of threads fails on a 2-core machine too
THREADS = (1, 2, 3)


@pytest.fixture(params=THREADS, ids=[f"{n}threads" for n in THREADS])
def threads(request: pytest.FixtureRequest):
    """torch's intra-op threads set to 1, 2 and 3 for the test, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def assert_rankings_agree(ours: list, theirs: list, tol: float) -> None:
    """Two rankings of ``(query, map, score)`` (or pairs) computed by different arithmetic:
    each query's scores within ``tol`` rank by rank, and the images in the same order except
    where their scores are closer than ``tol`` (swapped, or one left out at the k-th place)."""
    def by_query(pairs: list) -> dict[str, list[tuple[str, float]]]:
        out: dict[str, list[tuple[str, float]]] = {}
        for p in pairs:
            q, m, s = (p.query, p.map, p.score) if hasattr(p, "query") else p
            out.setdefault(q, []).append((m, float(s)))
        return out

    a, b = by_query(ours), by_query(theirs)
    assert list(a) == list(b), "not the same queries"
    for q in a:
        assert len(a[q]) == len(b[q]), f"{q}: {len(a[q])} pairs against {len(b[q])}"
        for rank, ((ma, sa), (mb, sb)) in enumerate(zip(a[q], b[q], strict=True)):
            assert abs(sa - sb) <= tol or sa != sa and sb != sb, f"{q} rank {rank}: score {sa} against {sb}"
            if ma != mb:  # a swap: the other list has this image at a score within tol
                other = dict(b[q]).get(ma)
                assert other is not None and (abs(other - sa) <= tol or sa != sa and other != other) \
                    or abs(sa - b[q][-1][1]) <= tol, \
                    f"{q} rank {rank}: {ma} ({sa}) against {mb} ({sb})"


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


#: tests that run TensorFlow (the official DELG export and SavedModel reading), by name
TENSORFLOW_TESTS = ("test_converter_reads_the_official_tensorflow_files",
                    "test_converter_reads_the_official_keras_export")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The markers of pyproject.toml, from what a test uses: ``ray`` (tests/test_ray.py),
    ``browser`` (the headless Chromium fixture) and ``tensorflow`` (the DELG converter's
    TensorFlow tests), so that ``-m "not ray"`` and the like select lanes."""
    for item in items:
        if item.path.name == "test_ray.py":
            item.add_marker(pytest.mark.ray)
        if "browser" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)
        if item.name.split("[")[0] in TENSORFLOW_TESTS:
            item.add_marker(pytest.mark.tensorflow)

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

"""A dataset directory: kapture 1.1 sensors/ plus cbir's own stores under cbir/.

```
DATASET/sensors/{sensors,rigs,records_camera,trajectories}.txt, sensors/records_data/
DATASET/cbir/{local,global,matches,map}/<name>.h5, DATASET/cbir/pairs/<name>.txt
```
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path

from ..errors import CbirError
from .kapture_text import RECORDS_DATA_DIR, SENSORS_FILE, read_sensor_data
from .paths import check_relative_name
from .sensors import SensorData

STORE_DIRS = {"local": "local-features", "global": "global-features", "matches": "matches", "map": "map"}
_STORE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
#: longest store name: ``<name>.model.h5.batches``, ``<name>.h5.<pid>-<hex>.partial`` and the
#: like must stay within a file name's 255 bytes (the name is ASCII)
MAX_STORE_NAME = 200


#: files beside the stores that are not stores: a global extractor's learned model
#: (DenseVLAD: ``cbir/global/<name>.model.h5``)
MODEL_SUFFIX = ".model"


def model_path(store_path: Path) -> Path:
    """The learned model beside a global store: ``cbir/global/<name>.model.h5``."""
    return store_path.with_name(f"{store_path.stem}{MODEL_SUFFIX}.h5")


def check_store_name(name: str) -> None:
    if not isinstance(name, str):
        raise CbirError(f"invalid store name {name!r}: not a string")
    if len(name) > MAX_STORE_NAME:
        raise CbirError(f"invalid store name {name[:40]!r}...: longer than {MAX_STORE_NAME} characters (its files "
                        "add suffixes to it, and a file name has at most 255 bytes)")
    if not _STORE_NAME_RE.match(name) or name.endswith((".h5", ".partial", MODEL_SUFFIX)):
        raise CbirError(f"invalid store name {name!r}: use letters, digits, '_', '-', '+', '.' "
                        f"(no path, no extension, not ending in {MODEL_SUFFIX})")


#: how each kind of store is made (said when one is missing)
_MAKES = {"local": "cbir extract {root} --local {name}", "global": "cbir extract {root} --global {name}",
          "matches": "cbir match --query {root} --pairs PAIRS --local LOCAL --name {name}",
          "map": "cbir map {root} --local {name} --matches MATCHES (after cbir match --verify of its map pairs)"}


def missing_file_message(path: str | os.PathLike) -> str:
    """Why a file is missing, in words that say the fix: for a store of a dataset
    (``DATASET/cbir/<kind>/<name>.h5``), the stores of that kind there are and the command
    that makes one; for any other file, "file not found"."""
    path = Path(path)
    kind, root = path.parent.name, path.parent.parent.parent
    if path.suffix != ".h5" or path.parent.parent.name != "cbir" or kind not in STORE_DIRS:
        return "file not found"
    present = [p.stem for p in _store_files(path.parent, ".h5")]
    there = f"{kind} stores there: {', '.join(present)}" if present else f"{root} has no {kind} store yet"
    return f"file not found ({there}); make it with {_MAKES[kind].format(root=root, name=path.stem)}"


def _store_files(directory: Path, ext: str) -> list[Path]:
    """The stores of one kind's folder (learned models beside them are not stores)."""
    return sorted(p for p in directory.glob(f"*{ext}") if p.is_file() and not p.stem.endswith(MODEL_SUFFIX)) \
        if directory.is_dir() else []


class Dataset:
    """Paths and lazily-read sensor data of one dataset directory.

    ``follow_symlinks=True`` accepts images that are symbolic links to files outside
    the dataset (kapture's importers create such links); by default they are refused.
    """

    def __init__(self, root: str | os.PathLike, *, follow_symlinks: bool = False):
        self.root = Path(root)
        self.follow_symlinks = follow_symlinks
        if not self.root.is_dir():
            raise CbirError("dataset directory not found", self.root)
        if not os.path.lexists(self.root / SENSORS_FILE):  # a link loop is reported when read
            raise CbirError(f"not a kapture/cbir dataset: {SENSORS_FILE} is missing", self.root)

    @cached_property
    def sensors(self) -> SensorData:
        return read_sensor_data(self.root)

    @property
    def records_dir(self) -> Path:
        return self.root / RECORDS_DATA_DIR

    def image_path(self, name: str) -> Path:
        """Path of an image of records_camera.txt, confined to records_data/."""
        problem = check_relative_name(name)
        if problem:
            raise CbirError(problem, self.root / "sensors/records_camera.txt")
        path = self.records_dir / name
        if not self.follow_symlinks:
            base = self.records_dir.resolve()
            real = path.resolve()
            if real != base and base not in real.parents:
                raise CbirError(f"image {name!r} is a symbolic link out of records_data/ "
                                f"(to {real}); pass --follow-symlinks to accept it", path)
        return path

    # -- stores
    def store_path(self, kind: str, name: str) -> Path:
        check_store_name(name)
        if kind == "pairs":
            return self.root / "cbir" / "pairs" / f"{name}.txt"
        if kind not in STORE_DIRS:
            raise ValueError(f"unknown store kind {kind!r}")
        return self.root / "cbir" / kind / f"{name}.h5"

    def list_stores(self) -> dict[str, list[Path]]:
        out: dict[str, list[Path]] = {}
        for kind in (*STORE_DIRS, "pairs"):
            ext = ".txt" if kind == "pairs" else ".h5"
            out[kind] = _store_files(self.root / "cbir" / kind, ext)
        return out

    # -- localization results (``cbir/localization/<name>/``)
    def localization_results(self) -> list[str]:
        """Names of the localization results (directories with a ``report.json``)."""
        root = self.root / "cbir" / "localization"
        return sorted(p.name for p in root.iterdir() if (p / "report.json").is_file()) if root.is_dir() else []

    def localization_result(self, name: str | None = None) -> Path:
        """The directory of the result ``name`` (default: the only one); a missing result is an
        error that lists those there are, or says to run ``cbir localize`` when there is none."""
        root = self.root / "cbir" / "localization"
        names = self.localization_results()
        if not names:
            raise CbirError(f"no localization result yet: run cbir localize --query {self.root} ... (or cbir "
                            "pipeline) first", root)
        if name is None:
            if len(names) != 1:
                raise CbirError(f"name the results with --results (found: {', '.join(names)})", root)
            return root / names[0]
        check_store_name(name)
        if name not in names:
            raise CbirError(f"no localization result {name!r} (found: {', '.join(names)})", root)
        return root / name

    def __repr__(self) -> str:
        return f"Dataset({str(self.root)!r})"

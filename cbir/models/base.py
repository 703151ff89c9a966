"""The extractor registry: a name, a default configuration, and one call per image.

As in hloc, configuration is data: an extractor is built from a dict merged over its
``default_conf``; the merged configuration (less run-time keys such as the device) is
stored in the output file, so a store always says how it was made, and a re-run with
another configuration is refused instead of mixing outputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..devices import to_device
from ..errors import CbirError
from ..io.images import LoadedImage
from ..validate import check_integer, merged_conf


@dataclass(frozen=True)
class WeightFile:
    """A weight file an extractor loads: its ``name`` (the default file looked up), where it
    is ``published`` (the official source; nothing is ever downloaded) and its ``licence``."""

    name: str
    published: str
    licence: str

    def describe(self) -> str:
        return f"{self.name}: {self.published} ({self.licence})"


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(image: np.ndarray, device: torch.device, mean: tuple[float, ...] = IMAGENET_MEAN,
              std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """uint8 H x W x 3 RGB -> 1 x 3 x H x W float, as torchvision's ToTensor + Normalize
    compute it (same operations, same order: bit-identical)."""
    x = to_device(image, device).permute(2, 0, 1).float().div(255)  # the uint8 pixels travel
    m = torch.tensor(mean, device=device)[:, None, None]
    s = torch.tensor(std, device=device)[:, None, None]
    return x.sub_(m).div_(s)[None]


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CbirError(f"device {device!r} requested but torch sees no CUDA device")
    try:
        return torch.device(device)
    except RuntimeError:
        raise CbirError(f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)") from None


def weights_search_path() -> list[Path]:
    """Where weight files are looked up by name: $CBIR_WEIGHTS (os.pathsep-separated), then
    ~/.cache/cbir/weights. Nothing is ever downloaded."""
    dirs = [Path(d) for d in os.environ.get("CBIR_WEIGHTS", "").split(os.pathsep) if d]
    return dirs + [Path.home() / ".cache" / "cbir" / "weights"]


def find_weights(weights: str | os.PathLike, source: str, directory: str | os.PathLike | None = None) -> Path:
    """Resolve a weight file: a path as given, else its name in ``directory`` and the search path."""
    path = Path(weights)
    if path.is_file():
        return path
    candidates = ([Path(directory)] if directory else []) + weights_search_path()
    for d in candidates:
        if (d / path.name).is_file():
            return d / path.name
    raise CbirError(f"weight file {path.name!r} not found (looked in {', '.join(str(d) for d in candidates)}); "
                    f"it is published at {source}: download it and pass --weights FILE_OR_DIR")


class ImageSkipped(CbirError):
    """An extractor cannot describe this image (smaller than its network needs, say): the
    extraction skips it and reports why, as it does an unreadable image."""


class Extractor:
    """What local and global extractors share: a name, a configuration merged over
    ``default_conf`` (unknown keys refused), and the identity stored with the output."""

    name: ClassVar[str]
    default_conf: ClassVar[dict[str, Any]] = {}
    grayscale: ClassVar[bool] = False
    descriptor_dtype: ClassVar[str] = "float32"
    runtime_keys: ClassVar[tuple[str, ...]] = ()
    #: resize with the image loader before extraction (None: the extractor handles sizes itself)
    loader_max_size_key: ClassVar[str | None] = None
    #: the weight files it loads (empty: none); ``conf["weights"]`` names the one used
    weight_files: ClassVar[tuple[WeightFile, ...]] = ()
    #: it learns a model on the map before extracting (DenseVLAD's vocabulary and PCA): with
    #: ``conf["learn"]`` on the map, or ``conf["model"]`` the map's model, for the queries
    learns_on_map: ClassVar[bool] = False
    #: how its descriptors are compared (kapture's ``metric_type``): ``L2``, or ``Hamming`` for
    #: packed binary descriptors (uint8, ``descriptor_dim`` bytes), which L2 matchers refuse
    metric_type: ClassVar[str] = "L2"
    descriptor_dim: int

    def __init__(self, conf: dict[str, Any] | None = None):
        self.conf = merged_conf(self.name, self.default_conf, conf)
        # the options most extractors share, with the rules of the command line
        if self.conf.get("max_size") is not None:
            check_integer(f"{self.name} max_size", self.conf["max_size"], 1)
        if self.conf.get("max_keypoints") is not None:
            check_integer(f"{self.name} max_keypoints", self.conf["max_keypoints"], 0)

    def store_config(self) -> dict[str, Any]:
        """The ``config`` its stores record (with the descriptors' ``metric_type`` when not L2)."""
        metric = {} if self.metric_type == "L2" else {"metric_type": self.metric_type}
        return {"extractor": self.name, **self.identity(), **metric}

    def default_store_name(self) -> str:
        return self.name

    def identity(self) -> dict[str, Any]:
        """The configuration that determines the output (stored in the file)."""
        return {k: v for k, v in self.conf.items() if k not in self.runtime_keys}

    @property
    def loader_max_size(self) -> int | None:
        return self.conf.get(self.loader_max_size_key) if self.loader_max_size_key else None

    def share_pass(self, other: Extractor) -> bool:
        """Let ``other`` reuse this extractor's computation (one network giving both local
        and global features: DELG); True when it now does."""
        return False

    def begin_image(self, wanted: list[Extractor]) -> None:
        """Called before the extractors ``wanted`` (this one among them) each extract the
        same image, so that extractors sharing a pass know what to compute."""
        return None

    def extract(self, image: LoadedImage) -> np.ndarray | dict[str, np.ndarray]:
        """One image's output: a descriptor (global), or keypoints and descriptors (local)."""
        raise NotImplementedError

    def store_attrs(self, store_name: str) -> dict[str, Any]:
        return {"name": store_name, "config": self.store_config(),
                "descriptor_dim": int(self.descriptor_dim), "descriptor_dtype": self.descriptor_dtype}


class WithWeights:
    """Mixin of extractors that load a weight file: the store is named after the file, and
    the stored configuration names the file, not where it lives."""

    conf: dict[str, Any]
    runtime_keys: ClassVar[tuple[str, ...]] = ("device", "weights_dir")

    def default_store_name(self) -> str:
        return Path(self.conf["weights"]).stem

    def identity(self) -> dict[str, Any]:
        conf = super().identity()  # type: ignore[misc]
        conf["weights"] = Path(conf["weights"]).name
        return conf


class GlobalExtractor(Extractor):
    """One L2-normalized descriptor per image.

    ``prepare`` runs once before the pass over a dataset: extractors that learn from the
    map (DenseVLAD's vocabulary and PCA) do it there.
    """

    def prepare(self, store_path: Path, images: list[str], load: Any, *, overwrite: bool = False,
                progress: Any = None) -> None:
        """Load or learn what the extractor needs of the dataset before it extracts (a model
        learned on the map); ``progress(advance, total)`` while learning."""
        return None

    def extract(self, image: LoadedImage) -> np.ndarray:
        raise NotImplementedError


class LocalExtractor(Extractor):
    """Keypoints and descriptors of one image.

    Subclasses set ``name``, ``default_conf``, ``descriptor_dim``, ``descriptor_dtype``,
    ``keypoint_params`` (layout of the extra per-keypoint column) and ``grayscale``, and
    implement :meth:`extract`. ``conf["max_size"]`` (when the extractor resizes before
    extraction) is applied by the image loader, which also maps keypoints back.
    """

    keypoint_params: ClassVar[str] = ""

    def store_attrs(self, store_name: str) -> dict[str, Any]:
        return {**super().store_attrs(store_name), "keypoint_params": self.keypoint_params}

    def empty(self) -> dict[str, np.ndarray]:
        n_params = len(self.keypoint_params.split(",")) if self.keypoint_params else 0
        out = {"keypoints": np.zeros((0, 2), np.float32),
               "descriptors": np.zeros((0, self.descriptor_dim), self.descriptor_dtype),
               "scores": np.zeros((0,), np.float32)}
        if n_params:
            out["keypoint_params"] = np.zeros((0, n_params), np.float32)
        return out

    def extract(self, image: LoadedImage) -> dict[str, np.ndarray]:
        raise NotImplementedError

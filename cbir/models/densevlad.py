"""DenseVLAD (Torii et al., CVPR 2015 / TPAMI 2018), weight-free: RootSIFT on a dense
multi-scale grid, VLAD over a vocabulary learned on the map, intra-normalization, PCA
whitening learned on the map, L2.

Parameters (``default_conf``): the image is reduced to ``max_size`` px (longest edge);
descriptors are taken every ``step`` px at the OpenCV SIFT sizes ``sizes`` (4 scales as
Torii et al.); the vocabulary has ``clusters`` centres (faiss k-means on up to
``samples_per_image`` random descriptors of each of up to ``train_images`` map images);
the VLAD (``clusters x 128`` dims) is intra-normalized (each centre's residual sum to unit
L2), L2-normalized, then PCA-whitened to ``pca_dim`` dims (at most the number of training
images minus one: the centred training VLADs span no more) and L2-normalized again.

The vocabulary and PCA ("the model") are learned on the map when asked (``learn=True``:
``cbir extract MAP --global densevlad --learn``; the pipeline does it for its map) and
stored beside the descriptors as ``cbir/global/<name>.model.h5``; extracting queries with
``model=<that file>`` reuses them. Without either, extraction stops before any image is
read and says so: a vocabulary learned on the queries alone would make descriptors that
do not compare with the map's. A model already beside the store (an earlier run on this
dataset) is reused. The model's digest is part of the store's configuration, so retrieval
refuses to compare descriptors made with different models.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import h5py
import numpy as np
import torch

from .. import exact
from ..errors import CbirError, FormatError
from ..io.atomic import atomic_output
from ..io.dataset import model_path
from ..io.hdf5 import read_metadata
from ..io.images import LoadedImage
from .base import GlobalExtractor
from .sift import rootsift

TRAIN_CACHE_BYTES = 1 << 30  # dense descriptors of training images kept between the two training passes
#: VLADs of the training images kept from the learning for their extraction: the map's
#: images are then described once, not twice (the same function of the same pixels)
LEARNED_VLAD_BYTES = 1 << 28


def dense_grid(width: int, height: int, step: int, sizes: list[float]) -> list[cv2.KeyPoint]:
    margin = max(sizes) / 2
    xs = np.arange(margin, width - margin, step)
    ys = np.arange(margin, height - margin, step)
    return [cv2.KeyPoint(float(x), float(y), float(s)) for s in sizes for y in ys for x in xs]


def vlad(desc: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Intra-normalized, L2-normalized VLAD of (N, D) descriptors over (K, D) centroids, the
    same bits on every machine: each descriptor goes to the centroid of least squared
    distance computed exactly (:mod:`cbir.exact`; ties to the lower index), residuals are
    summed in descriptor order, and the norms are exact."""
    k, d = centroids.shape
    if len(desc) == 0:
        return np.zeros(k * d, np.float32)
    x = torch.from_numpy(np.ascontiguousarray(desc, np.float32))
    c = exact.slice_rows(torch.from_numpy(np.ascontiguousarray(centroids, np.float32)))
    # ||x - c||^2 - ||x||^2, in float64 from exact products: a BLAS distance (faiss's) would
    # send a descriptor near two centroids to either, by the CPU's rounding
    distance = exact.dot_rows(c, x, torch.float64).mul_(-2.0).add_(exact.squared_norms(c)[:, None])
    assign = distance.argmin(dim=0).numpy()  # the first of equal minima
    residuals = desc - centroids[assign]
    v = np.zeros((k, d), np.float32)
    np.add.at(v, assign, residuals)  # in descriptor order
    intra = exact.unit_rows(torch.from_numpy(v))  # intra-normalization (a centroid with nothing stays 0)
    return exact.unit_rows(intra.reshape(1, -1))[0].numpy()


class DenseVLAD(GlobalExtractor):
    name = "densevlad"
    learns_on_map = True
    default_conf = {
        "max_size": 512,
        "step": 6,
        "sizes": [8.0, 12.0, 16.0, 20.0],
        "clusters": 64,
        "pca_dim": 4096,
        "train_images": 10000,
        "samples_per_image": 2000,
        "kmeans_iters": 20,
        "seed": 0,
        "model": None,  # the map's model file, to extract queries with
        "learn": False,  # learn the model on this dataset (the map) when it has none yet
    }
    grayscale = True
    loader_max_size_key = "max_size"
    runtime_keys = ("model", "learn")

    def __init__(self, conf: dict[str, Any] | None = None):
        super().__init__(conf)
        self._sift = cv2.SIFT_create()  # type: ignore[attr-defined]  # OpenCV's stubs lack it
        self.model: dict[str, np.ndarray] | None = None
        self._sliced: tuple[dict[str, np.ndarray], exact.Sliced] | None = None
        self._learned: dict[bytes, np.ndarray] = {}  # image key -> VLAD of a training image (see prepare)
        if self.conf["model"]:
            self.model = read_model(Path(self.conf["model"]), self)

    @property
    def descriptor_dim(self) -> int:  # type: ignore[override]
        if self.model is None:
            raise CbirError("DenseVLAD has no model yet: extract the map with --learn first (it learns the "
                            "vocabulary and PCA), then pass the map's .model.h5 for queries (--model)")
        return int(self.model["pca_components"].shape[0] or self.model["centroids"].size)

    def identity(self) -> dict[str, Any]:
        conf = super().identity()
        conf["model_digest"] = model_digest(self.model) if self.model is not None else None
        return conf

    def dense_rootsift(self, image: LoadedImage) -> np.ndarray:
        h, w = image.array.shape[:2]
        kps = dense_grid(w, h, self.conf["step"], self.conf["sizes"])
        if not kps:
            return np.zeros((0, 128), np.float32)
        _, desc = self._sift.compute(image.array, kps)
        return np.zeros((0, 128), np.float32) if desc is None else rootsift(desc)

    def prepare(self, store_path: Path, images: list[str], load: Callable[[str], LoadedImage], *,
                overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> None:
        """Load the model of ``store_path``, or learn it from ``images`` of this dataset when
        ``learn`` is set (again with ``overwrite``); ``progress(advance, total)`` counts the
        training images twice (sampled, then described for the PCA) and the k-means once."""
        path = model_path(store_path)
        if self.model is not None:
            return
        if path.exists() and not (overwrite and self.conf["learn"]):
            self.model = read_model(path, self)
            return
        if not self.conf["learn"]:
            raise CbirError("DenseVLAD needs its vocabulary and PCA learned on the map: pass --model "
                            f"MAP/cbir/global/{path.name} (the map's) to extract queries, or "
                            "--learn to learn them on this dataset (the map)", store_path.parent.parent.parent)
        if not images:
            raise CbirError("no image to learn the DenseVLAD vocabulary from", store_path.parent)
        rng = np.random.default_rng(self.conf["seed"])
        train = sorted(rng.choice(len(images), min(len(images), self.conf["train_images"]), replace=False))
        samples, kept, kept_bytes = [], {}, 0
        total = 2 * len(train) + 1
        step = progress or (lambda advance, total: None)
        keys: dict[int, bytes] = {}
        for i in train:
            image = load(images[i])
            keys[i] = _image_key(image)
            d = self.dense_rootsift(image)
            step(1, total)
            take = rng.choice(len(d), min(len(d), self.conf["samples_per_image"]), replace=False)
            samples.append(d[np.sort(take)])
            if kept_bytes + d.nbytes <= TRAIN_CACHE_BYTES:  # spares a second pass for the PCA
                kept[i], kept_bytes = d, kept_bytes + d.nbytes
        data = np.concatenate(samples).astype(np.float32)
        k = self.conf["clusters"]
        if len(data) < k:
            raise CbirError(f"{len(data)} descriptors are too few to learn {k} clusters", store_path.parent)
        import faiss

        km = faiss.Kmeans(128, k, niter=self.conf["kmeans_iters"], seed=self.conf["seed"], verbose=False)
        km.train(data)
        step(1, total)
        assert km.centroids is not None  # trained
        centroids = km.centroids.astype(np.float32)
        rows = []
        for i in train:
            rows.append(vlad(kept[i] if i in kept else self.dense_rootsift(load(images[i])), centroids))
            if (len(self._learned) + 1) * rows[-1].nbytes <= LEARNED_VLAD_BYTES:
                self._learned[keys[i]] = rows[-1]
            step(1, total)
        vlads = np.stack(rows)
        del kept
        mean = vlads.mean(axis=0)
        dim = self.conf["pca_dim"]
        if 0 < dim < len(vlads):
            _, s, vt = np.linalg.svd(vlads - mean, full_matrices=False)
            eig = (s[:dim] ** 2 / max(len(vlads) - 1, 1)).astype(np.float32)
            components = vt[:dim].astype(np.float32)
        else:  # too few images for the PCA asked for: whitening them would make them equidistant
            eig, components = np.zeros((0,), np.float32), np.zeros((0, mean.size), np.float32)
        self.model = {"centroids": centroids, "pca_mean": mean.astype(np.float32),
                      "pca_components": components, "pca_eigvals": eig}
        write_model(path, self.model, self)

    def extract(self, image: LoadedImage) -> np.ndarray:
        if self.model is None:
            raise CbirError("DenseVLAD model missing: call prepare() (cbir extract does)")
        v = self._learned.pop(_image_key(image), None) if self._learned else None
        if v is None:
            v = vlad(self.dense_rootsift(image), self.model["centroids"])
        if not len(self.model["pca_components"]):
            return v
        # the PCA projection from exact products: whitening divides by the square roots of
        # eigenvalues down to about 0, which magnifies a BLAS's rounding (1e-4 between a
        # Ray worker of one core and a local run of several, before these were exact)
        centred = torch.from_numpy(v - self.model["pca_mean"].astype(np.float32))[None]
        projected = exact.dot_rows(self._components(), centred)[:, 0].numpy()
        whitened = projected / np.sqrt(self.model["pca_eigvals"].astype(np.float32) + np.float32(1e-9))
        return exact.unit_rows(torch.from_numpy(whitened)[None])[0].numpy()

    def _components(self) -> exact.Sliced:
        """The PCA components' exact slices, made once (four times the components' memory)."""
        assert self.model is not None  # loaded or learned before extraction
        if self._sliced is None or self._sliced[0] is not self.model:
            self._sliced = (self.model, exact.slice_rows(torch.from_numpy(
                self.model["pca_components"].astype(np.float32))))
        return self._sliced[1]


def _image_key(image: LoadedImage) -> bytes:
    """Identifies an image's pixels (its shape and a 128-bit BLAKE2b digest of its bytes)."""
    a = np.ascontiguousarray(image.array)
    return hashlib.blake2b(a.tobytes(), digest_size=16, person=str(a.shape).encode()[:16]).digest()


def model_digest(model: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in ("centroids", "pca_mean", "pca_components", "pca_eigvals"):
        h.update(np.ascontiguousarray(model[key]).tobytes())
    return h.hexdigest()[:16]


_MODEL_KEYS = ("max_size", "step", "sizes", "clusters")


def write_model(path: Path, model: dict[str, np.ndarray], ex: DenseVLAD) -> None:
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["cbir_format"] = "densevlad-model"
        f.attrs["format_version"] = "1.0"
        for key in _MODEL_KEYS:
            f.attrs[key] = np.asarray(ex.conf[key])
        for key, value in model.items():
            f.create_dataset(key, data=value)


def read_model(path: Path, ex: DenseVLAD) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CbirError("DenseVLAD model not found (it is written beside the map's descriptors)", path)
    attrs = read_metadata(path).attrs  # in a time-limited child: a corrupt file cannot hang
    if attrs.get("cbir_format") != "densevlad-model":
        raise FormatError("not a DenseVLAD model file", path)
    for key in _MODEL_KEYS:
        if key not in attrs:
            raise FormatError(f"the model lacks its {key!r} attribute", path)
        if not np.array_equal(np.asarray(attrs[key]), np.asarray(ex.conf[key])):
            raise CbirError(f"the model was learned with {key}={np.asarray(attrs[key]).tolist()}, "
                            f"not {ex.conf[key]}: use the map's options (--conf {key}=...), or learn it again on "
                            "the map (--learn --overwrite)", path)
    try:
        with h5py.File(path, "r") as f:
            return {key: f[key][()] for key in ("centroids", "pca_mean", "pca_components", "pca_eigvals")}
    except (OSError, KeyError) as e:
        raise FormatError(f"cannot read the DenseVLAD model ({e})", path) from None

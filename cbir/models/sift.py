"""SIFT and RootSIFT (OpenCV): the weight-free local features.

RootSIFT (Arandjelovic & Zisserman, 2012): L1-normalize each SIFT descriptor, then take
the element-wise square root, so that the Euclidean distance of RootSIFT descriptors is
the Hellinger kernel of the SIFT histograms. Both are stored as float32 unit vectors
(RootSIFT is unit-L2 by construction; SIFT is L2-normalized so that every cbir local
feature matches by inner product).
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from ..io.images import LoadedImage
from .base import LocalExtractor


def rootsift(descriptors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """L1-normalize then square-root: (K, D) SIFT histograms -> unit-L2 RootSIFT."""
    d = np.asarray(descriptors, dtype=np.float32)
    return np.sqrt(d / np.maximum(np.abs(d).sum(axis=1, keepdims=True), eps))


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


class SIFT(LocalExtractor):
    """OpenCV SIFT, the ``max_keypoints`` strongest by response."""

    name = "sift"
    default_conf = {
        "max_keypoints": 8000,
        "max_size": 1600,  # longest image edge before extraction (keypoints are mapped back)
        "upright": False,  # one orientation per location, fixed at 0
        "n_octave_layers": 3,
        "contrast_threshold": 0.04,
        "edge_threshold": 10.0,
        "sigma": 1.6,
        "root": False,
    }
    grayscale = True
    keypoint_params = "scale,orientation"
    loader_max_size_key = "max_size"
    descriptor_dim = 128

    def __init__(self, conf: dict[str, Any] | None = None):
        super().__init__(conf)
        c = self.conf
        self._sift = cv2.SIFT_create(  # type: ignore[attr-defined]  # OpenCV's stubs lack it
            nfeatures=0, nOctaveLayers=c["n_octave_layers"], contrastThreshold=c["contrast_threshold"],
            edgeThreshold=c["edge_threshold"], sigma=c["sigma"])

    def extract(self, image: LoadedImage) -> dict[str, np.ndarray]:
        keypoints = self._sift.detect(image.array, None)
        if self.conf["upright"]:
            # one keypoint per location and scale: orientation duplicates collapse
            seen, upright = set(), []
            for kp in sorted(keypoints, key=lambda k: -k.response):
                key = (round(kp.pt[0], 2), round(kp.pt[1], 2), round(kp.size, 2))
                if key not in seen:
                    seen.add(key)
                    upright.append(cv2.KeyPoint(kp.pt[0], kp.pt[1], kp.size, 0.0, kp.response, kp.octave))
            keypoints = upright
        if not keypoints:
            return self.empty()
        response = np.array([k.response for k in keypoints], np.float32)
        order = np.argsort(-response, kind="stable")[: self.conf["max_keypoints"] or None]
        keypoints = [keypoints[i] for i in order]
        keypoints, desc = self._sift.compute(image.array, keypoints)
        if desc is None or not keypoints:
            return self.empty()
        desc = rootsift(desc) if self.conf["root"] else l2_normalize(desc)
        xy = np.array([k.pt for k in keypoints], np.float32)
        params = np.array([(k.size, k.angle) for k in keypoints], np.float32)
        sx, sy = image.scale
        params[:, 0] /= np.sqrt(sx * sy)  # size in pixels of the original image
        return {"keypoints": image.to_original(xy).astype(np.float32), "descriptors": desc,
                "scores": np.array([k.response for k in keypoints], np.float32), "keypoint_params": params}


class RootSIFT(SIFT):
    """SIFT with RootSIFT descriptors."""

    name = "rootsift"
    default_conf = {**SIFT.default_conf, "root": True}

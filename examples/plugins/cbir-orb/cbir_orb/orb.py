"""ORB (Rublee et al., 2011) from OpenCV: FAST corners ranked by the Harris score over a
scale pyramid, with rotated BRIEF descriptors of 256 bits (32 bytes, packed).

The options and their defaults are OpenCV's ``cv2.ORB_create``; cbir's loader may resize
the image first (``max_size``, default: none, as OpenCV). The descriptors are binary: their
store records ``metric_type = "Hamming"``, so cbir's L2 matcher refuses them and the
``hamming`` matcher of this package matches them.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from cbir.errors import CbirError
from cbir.io.images import LoadedImage
from cbir.models.base import LocalExtractor


class ORB(LocalExtractor):
    """OpenCV ORB: at most ``max_keypoints`` keypoints (OpenCV's ``nfeatures``)."""

    name = "orb"
    default_conf = {
        "max_keypoints": 500,  # nfeatures
        "scale_factor": 1.2,
        "n_levels": 8,
        "edge_threshold": 31,
        "first_level": 0,
        "wta_k": 2,
        "score_type": "harris",  # or "fast"
        "patch_size": 31,
        "fast_threshold": 20,
        "max_size": None,  # longest image edge before extraction (keypoints are mapped back)
    }
    grayscale = True
    keypoint_params = "scale,orientation"
    loader_max_size_key = "max_size"
    descriptor_dim = 32  # bytes: 256 bits
    descriptor_dtype = "uint8"
    metric_type = "Hamming"

    def __init__(self, conf: dict[str, Any] | None = None):
        super().__init__(conf)
        c = self.conf
        if c["score_type"] not in ("harris", "fast"):
            raise CbirError(f"orb score_type must be harris or fast, got {c['score_type']!r}")
        if not c["max_keypoints"]:
            raise CbirError("orb needs max_keypoints >= 1 (OpenCV's nfeatures)")
        score = cv2.ORB_HARRIS_SCORE if c["score_type"] == "harris" else cv2.ORB_FAST_SCORE
        self._orb = cv2.ORB_create(nfeatures=c["max_keypoints"], scaleFactor=c["scale_factor"],
                                   nlevels=c["n_levels"], edgeThreshold=c["edge_threshold"],
                                   firstLevel=c["first_level"], WTA_K=c["wta_k"], scoreType=score,
                                   patchSize=c["patch_size"], fastThreshold=c["fast_threshold"])

    def extract(self, image: LoadedImage) -> dict[str, np.ndarray]:
        keypoints, desc = self._orb.detectAndCompute(image.array, None)
        if desc is None or not keypoints:
            return self.empty()
        xy = np.array([k.pt for k in keypoints], np.float32)
        params = np.array([(k.size, k.angle) for k in keypoints], np.float32)
        sx, sy = image.scale
        params[:, 0] /= np.sqrt(sx * sy)  # size in pixels of the original image
        return {"keypoints": image.to_original(xy).astype(np.float32), "descriptors": np.ascontiguousarray(desc),
                "scores": np.array([k.response for k in keypoints], np.float32), "keypoint_params": params}

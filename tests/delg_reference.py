"""An independent NumPy re-implementation of the official DELG computation
(tensorflow/models research/delf), for the exactness tests of cbir.models.delg.

It works the TensorFlow way, on the official variables in their TF layouts: NHWC
feature maps, HWIO conv kernels, ``padding='SAME'`` computed per axis from TF's
formula, Keras' batch-norm epsilon (1e-3), ``tf.image.resize``'s bilinear sampling
(half-pixel centres) written out index by index, and the extraction of
``export_model_utils.py`` / ``extractor.py`` (receptive boxes, threshold, NMS at IoU 1.0,
per-scale L2 + sum + L2 for the global descriptor). float64 throughout.

``official_variables`` makes random weights under the official variable names (the
published checkpoint cannot be downloaded here).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

STAGES = (("l2", 3, 64, 1), ("l3", 4, 128, 2), ("l4", 6, 256, 2), ("l5", 3, 512, 2))
KERAS_BN_EPS = 1e-3


def official_variables(seed: int = 0, reduced_dim: int = 128, embedding_dim: int = 2048) -> dict[str, np.ndarray]:
    """Random DELG weights by official name (relative to the model), TF shapes, float32.
    Scaled so that activations stay O(1) through the 50 layers."""
    rng = np.random.default_rng(seed)
    v: dict[str, np.ndarray] = {}

    def conv(name: str, k: int, cin: int, cout: int, gain: float = 2.0) -> None:
        v[f"{name}/kernel"] = rng.normal(0, np.sqrt(gain / (k * k * cin)), (k, k, cin, cout))
        v[f"{name}/bias"] = rng.normal(0, 0.01, cout)

    def bn(name: str, c: int, gamma: float = 1.0) -> None:
        v[f"{name}/gamma"] = rng.uniform(0.5, 1.0, c) * gamma
        v[f"{name}/beta"] = rng.normal(0, 0.05, c)
        v[f"{name}/moving_mean"] = rng.normal(0, 0.1, c)
        v[f"{name}/moving_variance"] = rng.uniform(0.5, 1.5, c)

    conv("backbone/conv1", 7, 3, 64)
    bn("backbone/bn_conv1", 64)
    cin = 64
    for stage, blocks, f, _ in STAGES:
        for b in range(blocks):
            p = f"backbone/{stage}{'abcdef'[b]}"
            conv(f"{p}/conv2a", 1, cin, f)
            bn(f"{p}/bn2a", f)
            conv(f"{p}/conv2b", 3, f, f)
            bn(f"{p}/bn2b", f)
            conv(f"{p}/conv2c", 1, f, 4 * f)
            bn(f"{p}/bn2c", 4 * f, gamma=0.3)
            if b == 0:
                conv(f"{p}/conv_shortcut", 1, cin, 4 * f)
                bn(f"{p}/bn_shortcut", 4 * f)
            cin = 4 * f
    v["backbone/embedding_layer/kernel"] = rng.normal(0, 1 / np.sqrt(2048), (2048, embedding_dim))
    v["backbone/embedding_layer/bias"] = rng.normal(0, 0.01, embedding_dim)
    att_in = 1024
    if reduced_dim:
        conv("autoencoder/conv1", 1, 1024, reduced_dim, gain=1.0)
        conv("autoencoder/conv2", 1, reduced_dim, 1024)
    conv("attention/conv1", 1, att_in, 512)
    bn("attention/bn_conv1", 512)
    conv("attention/conv2", 1, 512, 1, gain=1.0)
    return {k: a.astype(np.float32) for k, a in v.items()}


GENERATED_NOTE = ("GENERATED random weights in the official DELG layout (tests/delg_reference.py), "
                  "not the published model")


def write_generated_npz(path, seed: int = 0, prefix: str = "_model/") -> None:
    """The generated variables as an .npz that ``cbir weights convert delg`` reads, under the
    object prefix of the official SavedModel, with a ``__source__`` note saying what they are."""
    v = official_variables(seed)
    np.savez(path, __source__=np.array(GENERATED_NOTE), **{prefix + k: a for k, a in v.items()})


# --- TF ops in NumPy (HWC, float64) ------------------------------------------------------

def _same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def conv2d(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int = 1, padding: str = "VALID") -> np.ndarray:
    kh, kw, cin, cout = kernel.shape
    if padding == "SAME":
        x = np.pad(x, (_same_pads(x.shape[0], kh, stride), _same_pads(x.shape[1], kw, stride), (0, 0)))
    if kh == kw == 1:
        cols = x[::stride, ::stride]
        oh, ow = cols.shape[:2]
        cols = cols.reshape(-1, cin)
    else:
        win = sliding_window_view(x, (kh, kw), axis=(0, 1))[::stride, ::stride]  # oh, ow, cin, kh, kw
        oh, ow = win.shape[:2]
        cols = win.transpose(0, 1, 3, 4, 2).reshape(oh * ow, kh * kw * cin)
    return (cols @ kernel.reshape(-1, cout).astype(np.float64) + bias).reshape(oh, ow, cout)


def batch_norm(x: np.ndarray, v: dict, name: str) -> np.ndarray:
    g, b = v[f"{name}/gamma"], v[f"{name}/beta"]
    m, var = v[f"{name}/moving_mean"], v[f"{name}/moving_variance"]
    return (x - m) / np.sqrt(var.astype(np.float64) + KERAS_BN_EPS) * g + b


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def resize_bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """tf.image.resize(method='bilinear'): half-pixel centres, no antialiasing."""
    def axis(out: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scale = size / out
        src = (np.arange(out) + 0.5) * scale - 0.5
        lower = np.maximum(np.floor(src), 0).astype(int)
        upper = np.minimum(np.ceil(src), size - 1).astype(int)
        return lower, upper, src - np.floor(src)

    y0, y1, fy = axis(out_h, x.shape[0])
    x0, x1, fx = axis(out_w, x.shape[1])
    top = x[y0][:, x0] * (1 - fx)[None, :, None] + x[y0][:, x1] * fx[None, :, None]
    bottom = x[y1][:, x0] * (1 - fx)[None, :, None] + x[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


# --- the network --------------------------------------------------------------------------

def block3(v: dict, image: np.ndarray) -> np.ndarray:
    """Backbone up to block 3 (subsampled: block3_strides), HWC."""
    x = relu(batch_norm(conv2d(image, v["backbone/conv1/kernel"], v["backbone/conv1/bias"], 2, "SAME"),
                        v, "backbone/bn_conv1"))
    x = sliding_window_view(x, (3, 3), axis=(0, 1))[::2, ::2].max(axis=(-2, -1))  # 3x3/2 max-pool, VALID
    return _stages(v, x, STAGES[:3])[::2, ::2]


def _stages(v: dict, x: np.ndarray, stages) -> np.ndarray:
    for stage, blocks, _, stride in stages:
        for b in range(blocks):
            p = f"backbone/{stage}{'abcdef'[b]}"
            s = stride if b == 0 and stage != "l5" else 1  # l5a has stride 1 with block3_strides
            y = relu(batch_norm(conv2d(x, v[f"{p}/conv2a/kernel"], v[f"{p}/conv2a/bias"], s), v, f"{p}/bn2a"))
            y = relu(batch_norm(conv2d(y, v[f"{p}/conv2b/kernel"], v[f"{p}/conv2b/bias"], 1, "SAME"), v, f"{p}/bn2b"))
            y = batch_norm(conv2d(y, v[f"{p}/conv2c/kernel"], v[f"{p}/conv2c/bias"]), v, f"{p}/bn2c")
            if b == 0:
                x = batch_norm(conv2d(x, v[f"{p}/conv_shortcut/kernel"], v[f"{p}/conv_shortcut/bias"], s), v,
                               f"{p}/bn_shortcut")
            x = relu(y + x)
    return x


def global_head(v: dict, b3: np.ndarray, gem_power: float = 3.0) -> np.ndarray:
    x = _stages(v, b3, STAGES[3:])
    pooled = np.mean(np.maximum(x, 1e-6) ** gem_power, axis=(0, 1)) ** (1 / gem_power)
    return pooled @ v["backbone/embedding_layer/kernel"] + v["backbone/embedding_layer/bias"]


def local_head(v: dict, b3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(attention h x w, descriptors h x w x C)."""
    reduced = conv2d(b3, v["autoencoder/conv1/kernel"], v["autoencoder/conv1/bias"])
    expanded = relu(conv2d(reduced, v["autoencoder/conv2/kernel"], v["autoencoder/conv2/bias"]))
    a = relu(batch_norm(conv2d(expanded, v["attention/conv1/kernel"], v["attention/conv1/bias"]), v,
                        "attention/bn_conv1"))
    score = conv2d(a, v["attention/conv2/kernel"], v["attention/conv2/bias"])[..., 0]
    return np.logaddexp(0, score), reduced  # softplus


# --- the official extraction ---------------------------------------------------------------

def l2_normalize(x: np.ndarray, axis: int) -> np.ndarray:
    return x / np.sqrt(np.maximum((x * x).sum(axis, keepdims=True), 1e-12))


def extract(v: dict, rgb: np.ndarray, scales: list[float], global_scale_indices: list[int], score_threshold: float,
            max_keypoints: int, max_size: int | None) -> dict[str, np.ndarray]:
    h, w = rgb.shape[:2]
    factors = np.ones(2)
    if max_size is not None and max(h, w) > max_size:
        f = max_size / max(h, w)
        nw, nh = int(round(w * f)), int(round(h * f))
        rgb = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))
        factors = np.array([nh / h, nw / w])
    image = (rgb.astype(np.float64) - 128.0) / 128.0
    h, w = image.shape[:2]
    boxes, feats, scores, feature_scales, globals_ = [], [], [], [], []
    for i, scale in enumerate(scales):
        nh, nw = (int(round(float(np.float32(h) * np.float32(scale)))),
                  int(round(float(np.float32(w) * np.float32(scale)))))
        b3 = block3(v, resize_bilinear(image, nh, nw))
        if i in global_scale_indices:
            globals_.append(global_head(v, b3))
        att, desc = local_head(v, b3)
        yy, xx = np.meshgrid(np.arange(att.shape[0]), np.arange(att.shape[1]), indexing="ij")
        pts = np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float64)
        rf = np.concatenate([pts, pts], 1) * 32.0 + np.array([-145.0, -145.0, -145.0 + 290, -145.0 + 290])
        rf /= scale
        keep = att.ravel() >= score_threshold
        boxes.append(rf[keep])
        feats.append(desc.reshape(-1, desc.shape[-1])[keep])
        scores.append(att.ravel()[keep])
        feature_scales.append(np.full(keep.sum(), 1.0 / scale))
    score = np.concatenate(scores)
    order = np.argsort(-score, kind="stable")[:max_keypoints]
    box = np.concatenate(boxes)[order]
    centres = (box[:, :2] + box[:, 2:]) / 2 / factors
    g = l2_normalize(l2_normalize(np.stack(globals_), 1).sum(0), 0)
    return {"keypoints": centres[:, ::-1], "descriptors": l2_normalize(np.concatenate(feats)[order], 1),
            "scores": score[order], "scales": np.concatenate(feature_scales)[order], "global": g}

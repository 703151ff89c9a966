"""The region machinery of a two-stage detector (Faster R-CNN: Ren, He, Girshick and Sun,
NeurIPS 2015), in plain torch, for Region-DH: anchors, the box parametrization, IoU, greedy
non-maximum suppression, Fast R-CNN's ROI max pooling, and the sampling of training targets.

Boxes are ``(x0, y0, x1, y1)`` in pixels, float, ``x1``/``y1`` exclusive (a box of width
``x1 - x0``). Every function is deterministic: ties in scores are broken by index (a stable
sort), samples are drawn from a given ``torch.Generator``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

BBOX_CLIP = math.log(1000.0 / 16)  # the largest log-scale a regression may apply (Detectron's)


def anchors(height: int, width: int, stride: int, sizes: tuple[float, ...],
            ratios: tuple[float, ...], device: torch.device | None = None) -> torch.Tensor:
    """(height * width * A) x 4 anchors, A = len(sizes) * len(ratios), centred on the cells of a
    stride-``stride`` feature map, cell-major (the anchors of cell (0, 0) first); ``ratio`` is
    height / width, the area stays ``size**2``."""
    shapes = []
    for ratio in ratios:
        for size in sizes:
            w = size / math.sqrt(ratio)
            shapes.append((w, w * ratio))
    wh = torch.tensor(shapes, dtype=torch.float32, device=device)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device),
                            torch.arange(width, dtype=torch.float32, device=device), indexing="ij")
    centres = (torch.stack([xs.reshape(-1), ys.reshape(-1)], 1) + 0.5) * stride
    centres = centres[:, None, :].expand(-1, len(shapes), -1)
    half = (wh / 2)[None].expand_as(centres)
    return torch.cat([centres - half, centres + half], 2).reshape(-1, 4)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """N x M intersection over union of boxes ``a`` (N x 4) and ``b`` (M x 4); 0 for empty boxes."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(2)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def encode_boxes(reference: torch.Tensor, target: torch.Tensor,
                 weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """The regression targets ``(dx, dy, dw, dh)`` that move ``reference`` onto ``target``."""
    rw, rh = reference[:, 2] - reference[:, 0], reference[:, 3] - reference[:, 1]
    rx, ry = reference[:, 0] + rw / 2, reference[:, 1] + rh / 2
    tw, th = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
    tx, ty = target[:, 0] + tw / 2, target[:, 1] + th / 2
    wx, wy, ww, wh = weights
    return torch.stack([wx * (tx - rx) / rw, wy * (ty - ry) / rh, ww * torch.log(tw / rw), wh * torch.log(th / rh)], 1)


def decode_boxes(reference: torch.Tensor, deltas: torch.Tensor,
                 weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)) -> torch.Tensor:
    """The inverse of :func:`encode_boxes`; ``deltas`` may hold several boxes per reference
    (N x 4k); the log-scales are clipped at log(1000/16)."""
    rw, rh = reference[:, 2:3] - reference[:, 0:1], reference[:, 3:4] - reference[:, 1:2]
    rx, ry = reference[:, 0:1] + rw / 2, reference[:, 1:2] + rh / 2
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw, dh = (deltas[:, 2::4] / ww).clamp(max=BBOX_CLIP), (deltas[:, 3::4] / wh).clamp(max=BBOX_CLIP)
    cx, cy, w, h = rx + dx * rw, ry + dy * rh, rw * torch.exp(dw), rh * torch.exp(dh)
    out = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 2)
    return out.reshape(deltas.shape)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``boxes`` (N x 4k) clipped to the image."""
    limits = torch.tensor([width, height, width, height], dtype=boxes.dtype,
                          device=boxes.device).repeat(boxes.shape[1] // 4)
    return torch.minimum(boxes.clamp(min=0), limits)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: the indices kept, best score first (equal scores: the
    lower index first); a box is dropped when its IoU with a kept one is above ``threshold``."""
    if len(boxes) == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    # the greedy loop runs on the host, in numpy: one transfer of the IoU matrix, not one
    # device sync (or torch dispatch) per box
    overlaps = (box_iou(boxes[order], boxes[order]) > threshold).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def roi_pool(features: torch.Tensor, rois: torch.Tensor, output_size: int, spatial_scale: float) -> torch.Tensor:
    """Fast R-CNN's ROI max pooling (Girshick, ICCV 2015; Caffe's ``ROIPoolingLayer``).

    ``features`` B x C x H x W, ``rois`` R x 5 ``(batch index, x0, y0, x1, y1)`` in pixels with
    ``x1``/``y1`` exclusive (Caffe's inclusive last pixel is ``x1 - 1``). As in Caffe: the ROI's
    first and last cells are ``round(x0 * scale)`` and ``round((x1 - 1) * scale)`` (at least one
    cell), cut into ``output_size`` x ``output_size`` bins, bin ``i`` from ``floor(i h / n)`` to
    ``ceil((i + 1) h / n)`` (the bins of :func:`torch.nn.functional.adaptive_max_pool2d` over the
    ROI's cells), each bin clipped to the map, its maximum taken, 0 for a bin wholly outside.
    Caffe computes the bin edges in float32, which can move an edge by a cell where a product
    lands on an integer; here they are exact. Returns R x C x output_size x output_size.
    """
    _, channels, height, width = features.shape
    if not len(rois):
        return features.new_zeros((0, channels, output_size, output_size))
    r = rois.detach().to(torch.float64)
    b = r[:, 0].long()

    def c_round(v: torch.Tensor) -> torch.Tensor:  # C's round (halves away from zero), not torch's (to even)
        return (torch.sign(v) * torch.floor(v.abs() + 0.5)).long()

    x0, y0 = c_round(r[:, 1] * spatial_scale), c_round(r[:, 2] * spatial_scale)
    x1 = torch.maximum(c_round((r[:, 3] - 1) * spatial_scale), x0)
    y1 = torch.maximum(c_round((r[:, 4] - 1) * spatial_scale), y0)
    # cells outside the map are -inf: a bin partly outside takes the maximum of its inside part
    # (Caffe's clipping), a bin wholly outside is -inf, then 0
    pad = [max(0, -int(x0.min())), max(0, int(x1.max()) - width + 1),
           max(0, -int(y0.min())), max(0, int(y1.max()) - height + 1)]
    padded = F.pad(features, pad, value=float("-inf")) if any(pad) else features
    x0, x1, y0, y1 = x0 + pad[0], x1 + pad[0], y0 + pad[2], y1 + pad[2]
    sizes = torch.stack([y1 - y0 + 1, x1 - x0 + 1], 1)
    # ROIs of one size are pooled together: one gather and one adaptive pooling per size (a
    # loop over ROIs costs a slice copy each, forward and backward)
    shapes, group = torch.unique(sizes, dim=0, return_inverse=True)
    parts, order = [], []
    for g, (h, w) in enumerate(shapes.tolist()):
        idx = torch.nonzero(group == g).flatten()
        ys = y0[idx, None] + torch.arange(h, device=features.device)
        xs = x0[idx, None] + torch.arange(w, device=features.device)
        crops = padded[b[idx, None, None], :, ys[:, :, None], xs[:, None, :]]  # G x h x w x C
        parts.append(F.adaptive_max_pool2d(crops.permute(0, 3, 1, 2), output_size))
        order.append(idx)
    pooled = torch.cat(parts)[torch.argsort(torch.cat(order))]
    return torch.where(torch.isneginf(pooled), torch.zeros_like(pooled), pooled)


def sample_labels(labels: torch.Tensor, count: int, positive_fraction: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Sub-sample ``labels`` (1 positive, 0 negative, -1 ignored) to at most ``count`` items,
    of which at most ``positive_fraction`` positive; the others set to -1. A new tensor."""
    out = labels.clone()
    positive = torch.nonzero(labels == 1).flatten().cpu()  # drawn with a host generator
    negative = torch.nonzero(labels == 0).flatten().cpu()
    keep_positive = min(len(positive), int(count * positive_fraction))
    keep_negative = min(len(negative), count - keep_positive)
    drop_positive = positive[torch.randperm(len(positive), generator=generator)[keep_positive:]]
    drop_negative = negative[torch.randperm(len(negative), generator=generator)[keep_negative:]]
    out[drop_positive.to(out.device)] = -1
    out[drop_negative.to(out.device)] = -1
    return out


def match_boxes(iou: torch.Tensor, high: float, low: float, allow_best: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of N candidates (``iou``: G ground-truth boxes x N candidates): the index of its
    best ground truth, and its label: 1 at IoU >= ``high``, 0 below ``low``, -1 between. With
    ``allow_best`` each ground truth's best candidates (ties included) are positive too (the RPN
    rule, so that every object has an anchor)."""
    best_iou, best_gt = iou.max(0)
    labels = torch.full_like(best_gt, -1)
    labels[best_iou < low] = 0
    labels[best_iou >= high] = 1
    if allow_best:
        per_gt = iou.max(1, keepdim=True).values
        hits = torch.nonzero((iou == per_gt) & (per_gt > 0))
        labels[hits[:, 1]] = 1
        best_gt[hits[:, 1]] = hits[:, 0]
    return best_gt, labels

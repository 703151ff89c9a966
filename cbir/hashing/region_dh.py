"""Region-DH: region-based deep hashing for multi-instance retrieval (Fotso Mtope and Wei).

One network gives each image an image-level code and a code per object instance in it:

- a ResNet backbone cut after ``layer3`` (stride 16, torchvision's parameter names, so that
  torchvision's ImageNet weights load unchanged from a local file);
- a region proposal network (Faster R-CNN's: a 3x3 conv, objectness and box regression per
  anchor), proposals by greedy NMS;
- Fast R-CNN's ROI max pooling (7x7) of a 1x1-reduced map, two fully connected layers, then
  per ROI: class scores, class-specific bounding-box regression, and the instance-level hash
  layer H1;
- the image-level hash layer H2 on the backbone map's average.

The multi-task loss is the sum of the RPN's (objectness, box), the ROI head's (classes, box),
and two pairwise hashing losses (DPSH's likelihood of ``u_i . u_j / 2`` plus its quantization
term): H1 over the foreground ROIs of a batch (similar: the same class) and H2 over its images
(similar: sharing a label). ``regions=False`` trains H2 alone on the same backbone: the
image-level hashing the paper compares against.

What follows the paper and what does not: its components and losses are those above; the
paper's exact layer widths, sampling sizes and weights were not available to us, so the
defaults are Faster R-CNN's (anchors, IoU thresholds, sampling, smooth-L1, ROI size) and
DPSH's (``eta``); the 1x1 reduction before the ROI pooling (``roi_channels``) is ours, to keep
the fully connected layer small. Everything is in ``default_conf``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CbirError, FormatError
from ..io.atomic import atomic_write_bytes
from . import regions as R
from .model import check_bits
from .pairwise import dpsh_loss

if TYPE_CHECKING:
    from ..io.dataset import Dataset

MODEL_FORMAT = "cbir-region-dh-1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
# where the ImageNet weights that ``pretrained`` loads are published (torchvision, BSD-3-Clause)
PRETRAINED_SOURCES = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
}

default_conf: dict[str, Any] = {
    "backbone": "resnet50",
    "pretrained": None,  # a local file of torchvision's ImageNet weights (PRETRAINED_SOURCES); None: random
    "regions": True,  # False: H2 alone (image-level hashing)
    "bits": 32,  # H1 and H2
    "anchor_sizes": [128, 256, 512],
    "anchor_ratios": [0.5, 1.0, 2.0],
    "rpn_channels": 512,
    "rpn_pre_nms": 6000, "rpn_post_nms_train": 2000, "rpn_post_nms": 300, "rpn_nms": 0.7,
    "rpn_batch": 256, "rpn_positive_fraction": 0.5, "rpn_positive_iou": 0.7, "rpn_negative_iou": 0.3,
    "roi_batch": 128, "roi_positive_fraction": 0.25, "roi_positive_iou": 0.5,
    "roi_size": 7, "roi_channels": 256, "hidden": 1024,
    # DPSH's quantization weight: 0.1 (its value on frozen descriptors, cbir.hashing.pairwise) sets
    # the codes' signs before the pairs are learned here; 0.01 measured better on the
    # multi-instance set (benchmarks/README.md)
    "eta": 0.01, "instance_weight": 1.0, "image_weight": 1.0,
    "min_score": 0.3, "instance_nms": 0.3, "max_instances": 10,
    "epochs": 20, "batch_size": 8, "lr": 1e-3, "weight_decay": 1e-4,
    "max_size": None,  # images resized so that their longest side is at most this (training and encoding)
}
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # Fast R-CNN's scaling of the ROI head's regression targets


@dataclass
class Instances:
    """What the network finds in one image: boxes (N x 4, pixels), their score and class,
    and their packed instance codes; the image's packed code."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    codes: np.ndarray
    image_code: np.ndarray


class RegionDH(nn.Module):
    def __init__(self, conf: dict[str, Any], classes: list[str]):
        super().__init__()
        from ..models.backbones import ResNet

        self.conf = {**default_conf, **conf}
        if self.conf["backbone"] not in BACKBONES:
            raise CbirError(f"unknown Region-DH backbone {self.conf['backbone']!r} (one of {', '.join(BACKBONES)})")
        self.classes = list(classes)
        c = self.conf
        self.backbone = ResNet(c["backbone"])
        self.backbone.layer4 = nn.Sequential()  # cut after layer3: stride 16
        channels = 256 * self.backbone.block.expansion
        anchors = len(c["anchor_sizes"]) * len(c["anchor_ratios"])
        self.rpn_conv = nn.Conv2d(channels, c["rpn_channels"], 3, padding=1)
        self.rpn_objectness = nn.Conv2d(c["rpn_channels"], anchors, 1)
        self.rpn_deltas = nn.Conv2d(c["rpn_channels"], 4 * anchors, 1)
        self.roi_reduce = nn.Conv2d(channels, c["roi_channels"], 1)
        self.fc6 = nn.Linear(c["roi_channels"] * c["roi_size"] ** 2, c["hidden"])
        self.fc7 = nn.Linear(c["hidden"], c["hidden"])
        self.class_scores = nn.Linear(c["hidden"], len(classes) + 1)  # 0: the background
        self.box_deltas = nn.Linear(c["hidden"], 4 * (len(classes) + 1))
        self.h1 = nn.Linear(c["hidden"], c["bits"])
        self.image_fc = nn.Linear(channels, c["hidden"])
        self.h2 = nn.Linear(c["hidden"], c["bits"])
        # Faster R-CNN's initialisation of its heads; the hash layers keep torch's default, whose
        # outputs are of order 1: the pairwise likelihood of u_i . u_j has no gradient at u = 0
        for layer, std in ((self.rpn_conv, 0.01), (self.rpn_objectness, 0.01), (self.rpn_deltas, 0.01),
                           (self.class_scores, 0.01), (self.box_deltas, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)  # type: ignore[arg-type]  # these layers all have a bias

    # -- the parts

    def features(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
        return self.backbone.forward_to((images - mean) / std, "layer3")

    def image_codes(self, fmap: torch.Tensor) -> torch.Tensor:
        """H2's real-valued output (B x bits) of backbone maps."""
        return self.h2(F.relu(self.image_fc(fmap.mean((2, 3)))))

    def _anchors(self, fmap: torch.Tensor) -> torch.Tensor:
        c = self.conf
        return R.anchors(fmap.shape[2], fmap.shape[3], 16, tuple(c["anchor_sizes"]), tuple(c["anchor_ratios"]),
                         fmap.device)

    def rpn(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectness (B x HWA) and deltas (B x HWA x 4), cell-major like :func:`regions.anchors`."""
        h = F.relu(self.rpn_conv(fmap))
        b = fmap.shape[0]
        objectness = self.rpn_objectness(h).permute(0, 2, 3, 1).reshape(b, -1)
        deltas = self.rpn_deltas(h).permute(0, 2, 3, 1).reshape(b, -1, 4)
        return objectness, deltas

    def proposals(self, anchors: torch.Tensor, objectness: torch.Tensor, deltas: torch.Tensor, height: int,
                  width: int, post_nms: int) -> torch.Tensor:
        """One image's proposals (P x 4), best first."""
        c = self.conf
        boxes = R.clip_boxes(R.decode_boxes(anchors, deltas.detach()), height, width)
        scores = objectness.detach()
        big = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        boxes, scores = boxes[big], scores[big]
        top = torch.sort(scores, descending=True, stable=True).indices[:c["rpn_pre_nms"]]
        boxes, scores = boxes[top], scores[top]
        return boxes[R.nms(boxes, scores, c["rpn_nms"])[:post_nms]]

    def roi_head(self, fmap: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class logits, box deltas and H1's real-valued output of ``rois`` (R x 5)."""
        pooled = R.roi_pool(F.relu(self.roi_reduce(fmap)), rois, self.conf["roi_size"], 1 / 16)
        h = F.relu(self.fc7(F.relu(self.fc6(pooled.flatten(1)))))
        return self.class_scores(h), self.box_deltas(h), self.h1(h)

    # -- training

    def losses(self, images: torch.Tensor, sizes: list[tuple[int, int]], boxes: list[torch.Tensor],
               box_classes: list[torch.Tensor], image_labels: torch.Tensor,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The multi-task loss's terms for a batch: images (B x 3 x H x W, zero-padded on the
        right and bottom), their sizes (h, w), boxes and classes (1-based) per image, and the
        image labels (B x L)."""
        c = self.conf
        fmap = self.features(images)
        valid = [fmap[i:i + 1, :, :-(-h // 16), :-(-w // 16)] for i, (h, w) in enumerate(sizes)]
        u2 = self.image_codes(torch.cat([v.mean((2, 3), keepdim=True) for v in valid]))
        similar = (image_labels @ image_labels.T > 0).float()
        out = {"image_hash": c["image_weight"] * dpsh_loss(u2, similar, c["eta"])}
        if not c["regions"]:
            return out
        anchors = self._anchors(fmap)
        objectness, deltas = self.rpn(fmap)
        rpn_cls, rpn_box, rois, roi_targets = [], [], [], []
        for i, (h, w) in enumerate(sizes):
            gt = boxes[i]
            inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= w) & (anchors[:, 3] <= h)
            matched, labels = R.match_boxes(R.box_iou(gt, anchors), c["rpn_positive_iou"], c["rpn_negative_iou"],
                                            allow_best=True)
            labels[~inside] = -1
            labels = R.sample_labels(labels, c["rpn_batch"], c["rpn_positive_fraction"], generator)
            sampled = labels >= 0
            rpn_cls.append(F.binary_cross_entropy_with_logits(objectness[i][sampled], labels[sampled].float(),
                                                              reduction="sum") / max(int(sampled.sum()), 1))
            positive = labels == 1
            targets = R.encode_boxes(anchors[positive], gt[matched[positive]])
            rpn_box.append(F.smooth_l1_loss(deltas[i][positive], targets, beta=1 / 9, reduction="sum")
                           / max(int(sampled.sum()), 1))
            props = torch.cat([self.proposals(anchors, objectness[i], deltas[i], h, w, c["rpn_post_nms_train"]), gt])
            matched, labels = R.match_boxes(R.box_iou(gt, props), c["roi_positive_iou"], c["roi_positive_iou"],
                                            allow_best=False)
            labels = R.sample_labels(labels, c["roi_batch"], c["roi_positive_fraction"], generator)
            keep = torch.nonzero(labels >= 0).flatten()
            cls = torch.where(labels[keep] == 1, box_classes[i][matched[keep]], torch.zeros_like(keep))
            rois.append(torch.cat([torch.full((len(keep), 1), float(i), device=props.device), props[keep]], 1))
            roi_targets.append((cls, R.encode_boxes(props[keep], gt[matched[keep]], BOX_WEIGHTS)))
        logits, box_deltas, u1 = self.roi_head(fmap, torch.cat(rois))
        cls = torch.cat([t[0] for t in roi_targets])
        box_targets = torch.cat([t[1] for t in roi_targets])
        fg = torch.nonzero(cls > 0).flatten()
        chosen = box_deltas.view(len(cls), -1, 4)[fg, cls[fg]]
        out["rpn_objectness"] = torch.stack(rpn_cls).mean()
        out["rpn_box"] = torch.stack(rpn_box).mean()
        out["roi_class"] = F.cross_entropy(logits, cls)
        out["roi_box"] = F.smooth_l1_loss(chosen, box_targets[fg], beta=1.0, reduction="sum") / max(len(cls), 1)
        if len(fg) > 1:
            same = (cls[fg, None] == cls[None, fg]).float()
            out["instance_hash"] = c["instance_weight"] * dpsh_loss(u1[fg], same, c["eta"])
        return out

    # -- inference

    @torch.no_grad()
    def find(self, image: torch.Tensor) -> Instances:
        """Image code and instances of one image (3 x H x W, RGB in [0, 1])."""
        from .model import pack

        c = self.conf
        _, h, w = image.shape
        fmap = self.features(image[None])
        image_code = pack((self.image_codes(fmap) > 0).cpu().numpy())[0]
        empty = Instances(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                          np.zeros((0, image_code.shape[0]), np.uint8), image_code)
        if not c["regions"]:
            return empty
        objectness, deltas = self.rpn(fmap)
        props = self.proposals(self._anchors(fmap), objectness[0], deltas[0], h, w, c["rpn_post_nms"])
        if not len(props):
            return empty
        logits, box_deltas, u1 = self.roi_head(fmap, torch.cat([props.new_zeros(len(props), 1), props], 1))
        probabilities = logits.softmax(1)[:, 1:]
        scores, classes = probabilities.max(1)
        refined = R.clip_boxes(R.decode_boxes(props, box_deltas.view(len(props), -1, 4)[
            torch.arange(len(props), device=props.device), classes + 1], BOX_WEIGHTS), h, w)
        confident = torch.nonzero(scores >= c["min_score"]).flatten()
        keep = confident[R.nms(refined[confident], scores[confident], c["instance_nms"])][:c["max_instances"]]
        return Instances(refined[keep].cpu().numpy(), scores[keep].cpu().numpy(), classes[keep].cpu().numpy() + 1,
                         pack((u1[keep] > 0).cpu().numpy()), image_code)


def load_pretrained(net: RegionDH, path: str | os.PathLike) -> None:
    """torchvision's ImageNet weights of the backbone (its ``fc`` and ``layer4`` unused)."""
    path = Path(path)
    if not path.is_file():
        arch = net.conf["backbone"]
        raise CbirError(f"ImageNet weights not found: download {PRETRAINED_SOURCES[arch]} (torchvision, "
                        "BSD-3-Clause) and give its path", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file: one line naming it
        raise FormatError(f"not a torch checkpoint ({type(e).__name__})", path) from None
    wanted = {k: v for k, v in state.items() if not k.startswith(("fc.", "layer4."))}
    what = f"not torchvision {net.conf['backbone']} weights"
    try:
        missing, unexpected = net.backbone.load_state_dict(wanted, strict=False)
    except RuntimeError as e:  # a parameter of another shape: another architecture
        raise FormatError(f"{what}: {str(e).splitlines()[-1].strip()[:160]}", path) from None
    missing = [k for k in missing if not k.startswith("layer4.")]
    if missing or unexpected:
        raise FormatError(f"{what}: missing {missing[:3]}, unexpected {unexpected[:3]}", path)


def save(net: RegionDH, path: str | os.PathLike, trained_on: str, extra: dict[str, Any]) -> None:
    """One ``.npz`` without pickles: a JSON header (format, configuration, classes, training
    fingerprint) and the parameters and buffers by name."""
    header = {"format": MODEL_FORMAT, "method": "region-dh", "conf": net.conf, "classes": net.classes,
              "trained_on": trained_on, "extra": extra}
    arrays = {f"param/{k}": v.detach().numpy() for k, v in net.state_dict().items()}
    buf = io.BytesIO()
    np.savez(buf, header=np.array(json.dumps(header, sort_keys=True)), **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def load(path: str | os.PathLike) -> tuple[RegionDH, dict[str, Any]]:
    """The network (in eval mode) and the file's header."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            header = json.loads(str(f["header"]))
            if not isinstance(header, dict) or header.get("format") != MODEL_FORMAT:
                raise FormatError("not a Region-DH model", path)
            state = {k[len("param/"):]: torch.from_numpy(np.array(f[k])) for k in f.files if k.startswith("param/")}
    except FileNotFoundError:
        raise CbirError("Region-DH model not found", path) from None
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise FormatError(f"not a Region-DH model ({type(e).__name__})", path) from None
    net = RegionDH(dict(header["conf"]), list(header["classes"]))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FormatError(f"parameters do not fit the configuration: {str(e).splitlines()[0][:160]}", path) from None
    check_bits(int(net.conf["bits"]))
    return net.eval(), header


def is_region_dh(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Region-DH model file (rather than a linear hash model)."""
    try:
        with np.load(Path(path), allow_pickle=False) as f:
            return "header" in f.files and json.loads(str(f["header"])).get("format") == MODEL_FORMAT
    except (OSError, ValueError, json.JSONDecodeError, AttributeError):
        return False


def digest(net: RegionDH) -> str:
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(v.detach().numpy()).tobytes())
    return h.hexdigest()[:16]


@dataclass
class Sample:
    """One training image: RGB in [0, 1] (3 x H x W), boxes (N x 4), 1-based classes, labels (L)."""

    image: torch.Tensor
    boxes: torch.Tensor
    classes: torch.Tensor
    labels: torch.Tensor


def _batches(samples: list[Sample], size: int, generator: torch.Generator) -> Iterator[list[Sample]]:
    order = torch.randperm(len(samples), generator=generator).tolist()
    for start in range(0, len(order), size):
        yield [samples[i] for i in order[start:start + size]]


def train(samples: list[Sample], classes: list[str], conf: dict[str, Any], seed: int,
          progress: Any = None, device: torch.device | None = None) -> tuple[RegionDH, list[dict[str, float]]]:
    """Train Region-DH on ``samples`` on ``device`` (default: the CPU); the loss terms averaged
    per epoch. Seeded: the same seed, machine and thread count give the same network. The
    network comes back on the CPU, in eval mode."""
    device = device or torch.device("cpu")
    torch.manual_seed(seed)  # the layers' initialisation, on the host whatever the device
    net = RegionDH(conf, classes)
    if net.conf["pretrained"]:
        load_pretrained(net, net.conf["pretrained"])
    net.to(device)
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=float(net.conf["lr"]), weight_decay=float(net.conf["weight_decay"]))
    history = []
    net.train()
    for epoch in range(int(net.conf["epochs"])):
        totals: dict[str, float] = {}
        batches = 0
        for batch in _batches(samples, int(net.conf["batch_size"]), generator):
            if len(batch) < 2:
                continue  # no pair to learn from
            height = max(s.image.shape[1] for s in batch)
            width = max(s.image.shape[2] for s in batch)
            images = torch.zeros(len(batch), 3, height, width)
            for i, s in enumerate(batch):
                images[i, :, :s.image.shape[1], :s.image.shape[2]] = s.image
            terms = net.losses(images.to(device), [(s.image.shape[1], s.image.shape[2]) for s in batch],
                               [s.boxes.to(device) for s in batch], [s.classes.to(device) for s in batch],
                               torch.stack([s.labels for s in batch]).to(device), generator)
            loss = torch.stack(list(terms.values())).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach())
            batches += 1
        history.append({k: v / max(batches, 1) for k, v in totals.items()})
        if progress is not None:
            progress(epoch, history[-1])
    return net.cpu().eval(), history


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """An H x W x 3 uint8 RGB image as 3 x H x W floats in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def make_sample(image: np.ndarray, instances: list[tuple[str, tuple[float, float, float, float]]],
                classes: list[str], labels: tuple[str, ...] | None = None) -> Sample:
    """A training sample of an RGB image and its instances (label, box); image-level labels:
    ``labels``, by default the union of its instances' classes."""
    index = {c: i for i, c in enumerate(classes)}
    boxes = torch.tensor([box for _, box in instances], dtype=torch.float32).reshape(-1, 4)
    cls = torch.tensor([index[label] + 1 for label, _ in instances], dtype=torch.long)
    image_labels = torch.zeros(len(classes))
    image_labels[[index[label] for label in labels] if labels is not None else cls - 1] = 1.0
    return Sample(to_tensor(image), boxes, cls, image_labels)


def dataset_samples(ds: Dataset, boxes_path: Path | None, labels_path: Path | None,
                    max_size: int | None) -> tuple[list[Sample], list[str], str]:
    """Training samples of ``ds``'s images named in the boxes file (or, for the image-level
    branch alone, the labels file), resized to ``max_size``; the classes (sorted labels); and
    the training data's fingerprint (16 hex digits of the SHA-256 of the boxes or labels)."""
    from ..io.images import read_image
    from .labels import read_boxes, read_labels

    source = boxes_path or labels_path
    if source is None:
        raise CbirError("Region-DH learns from a boxes file (or a labels file for the image-level branch alone)")
    boxes = read_boxes(source) if boxes_path else {n: [] for n in read_labels(source)}
    labels = read_labels(source) if labels_path else None
    missing = sorted(set(boxes) - set(ds.sensors.image_names()))
    if missing:
        raise CbirError(f"{len(missing)} images of this file are not in {ds.root}, e.g. {missing[0]!r}", source)
    classes = sorted({label for found in boxes.values() for label, _ in found} if labels is None
                     else {label for tags in labels.values() for label in tags})
    samples = []
    for name in sorted(boxes):
        image = read_image(ds.image_path(name), max_size=max_size)
        w, h = image.original_size
        if any(x1 > w + 0.5 or y1 > h + 0.5 for _, (_, _, x1, y1) in boxes[name]):
            raise CbirError(f"a box of {name!r} goes past its {w}x{h} pixels", source)
        sx, sy = image.scale
        scaled = [(label, (x0 * sx, y0 * sy, x1 * sx, y1 * sy)) for label, (x0, y0, x1, y1) in boxes[name]]
        samples.append(make_sample(image.array, scaled, classes, labels[name] if labels else None))
    content = sorted(boxes.items()) if labels is None else sorted(labels.items())
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    return samples, classes, digest

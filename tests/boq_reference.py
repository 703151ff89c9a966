"""Reference outputs of the official BoQ model (amaralibey/Bag-of-Queries ``src/boq.py``,
``src/backbones.py`` and ``hubconf.py``'s ``VPRModel``), for the exactness tests of
cbir.models.boq; the file it writes is committed as ``tests/reference/boq/generated.npz``.

    python tests/boq_reference.py BOQ_REPO DINOV2_REPO SHARED OUT_FILE

The published ``resnet50_16384.pth`` and ``dinov2_12288.pth`` could not be fetched here, so
the weights are generated (:func:`official_state`: seeded NumPy draws by parameter name, in
the official layout) for the two published configurations, built as the official
``get_trained_boq`` builds them: ResNet-50 cut after layer3 + BoQ(1024 -> 512, 64 queries, 2
blocks, 32 rows: 16,384-D), and DINOv2 ViT-B/14 + BoQ(768 -> 384, 64 queries, 2 blocks, 32
rows: 12,288-D). The DINOv2 backbone is facebookresearch/dinov2's own hub model
(``dinov2_vitb14(pretrained=False)``, its first :data:`DINOV2_BLOCKS` blocks kept to keep the
test short, given to the official ``DinoV2`` in place of ``torch.hub.load``). The official
ResNet wraps ``torchvision.models.resnet50``, which cannot be installed beside this torch:
cbir's torchvision-style ResNet-50 stands in for it (the same layers and names; the BoQ code,
the cut and the wiring are the official ones). Inputs: crops of a photo of sceaux_castle
through the official README's transform (``ToTensor``, resize bicubic with antialiasing,
which torchvision computes as ``interpolate`` does here, ImageNet ``Normalize``) at the
official sizes (384 x 384, 322 x 322), and for ResNet-50 also at 256 x 320.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: blocks of the DINOv2 ViT-B/14 tested (the published model has 12: the loader reads the count)
DINOV2_BLOCKS = 2
#: runs: (backbone, crop of the photo (rows, columns), input size)
RUNS = {"resnet": ("resnet50", (slice(0, 700), slice(100, 1000)), (384, 384)),
        "resnet_small": ("resnet50", (slice(50, 450), slice(0, 1024)), (256, 320)),
        "dinov2": ("dinov2", (slice(0, 700), slice(100, 1000)), (322, 322))}


def official_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights for the official parameters and buffers ``shapes``, in sorted name order from
    one seeded generator: matrices and kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.02), norm
    weights ~ U(0.8, 1.2), layer scales ~ U(0.05, 0.2), batch-norm means ~ N(0, 0.1) and
    variances ~ U(0.5, 1.5), tokens, positions and queries ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name in sorted(shapes):
        shape = shapes[name]
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            state[name] = torch.tensor(0)
            continue
        if leaf == "running_var":
            value = 0.5 + rng.random(shape, dtype=np.float32)
        elif leaf == "running_mean":
            value = 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif leaf == "gamma":
            value = 0.05 + 0.15 * rng.random(shape, dtype=np.float32)
        elif leaf.endswith("bias"):
            value = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        elif len(shape) == 1:
            value = 0.8 + 0.4 * rng.random(shape, dtype=np.float32)
        elif leaf.endswith("weight"):
            value = np.float32((1 / int(np.prod(shape[1:]))) ** 0.5) * rng.standard_normal(shape, dtype=np.float32)
        else:  # cls_token, pos_embed, mask_token, queries
            value = rng.standard_normal(shape, dtype=np.float32)
        state[name] = torch.from_numpy(value)
    return state


def photo(shared: Path, crop: tuple[slice, slice]) -> np.ndarray:
    import cv2

    path = shared / "data" / "sceaux_castle" / "mapping" / "sensors" / "records_data" / "100_7100.jpg"
    return np.ascontiguousarray(cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)[crop])


def transform(rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """The official README's ``input_transform``: ToTensor, Resize(bicubic, antialias), Normalize."""
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)[None]
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    return x.sub_(torch.tensor(MEAN)[:, None, None]).div_(torch.tensor(STD)[:, None, None])


def official_model(boq_repo: Path, dinov2_repo: Path, backbone: str) -> torch.nn.Module:
    from cbir.models.backbones import ResNet

    tv = types.ModuleType("torchvision")
    models = types.SimpleNamespace(resnet50=lambda weights=None: ResNet("resnet50", style="torchvision"))
    for name in ("resnet18", "resnet34", "resnet101", "resnet152", "resnext50_32x4d"):
        setattr(models, name, None)
    tv.models = models  # type: ignore[attr-defined]
    sys.modules["torchvision"] = tv
    sys.path[:0] = [str(boq_repo), str(boq_repo / "src"), str(dinov2_repo)]
    from dinov2.hub.backbones import dinov2_vitb14  # facebookresearch/dinov2's hub model

    def hub_model(*args: object, **kwargs: object) -> torch.nn.Module:
        model = dinov2_vitb14(pretrained=False)
        model.blocks = model.blocks[:DINOV2_BLOCKS]  # the published twelve, cut to keep the test short
        return model

    torch.hub.load = hub_model  # type: ignore[assignment]
    from backbones import DinoV2  # the official modules
    from backbones import ResNet as OfficialResNet
    from boq import BoQ
    from hubconf import VPRModel

    if backbone == "dinov2":
        net = DinoV2()
        aggregator = BoQ(in_channels=net.out_channels, proj_channels=384, num_queries=64, num_layers=2,
                         row_dim=12288 // 384)
    else:
        net = OfficialResNet(backbone_name=backbone, pretrained=False, crop_last_block=True)
        aggregator = BoQ(in_channels=net.out_channels, proj_channels=512, num_queries=64, num_layers=2,
                         row_dim=16384 // 512)
    model = VPRModel(backbone=net, aggregator=aggregator)
    model.load_state_dict(official_state({k: tuple(v.shape) for k, v in model.state_dict().items()}))
    return model.eval()


def main(boq_repo: Path, dinov2_repo: Path, shared: Path, out: Path) -> None:
    results = {}
    models: dict[str, torch.nn.Module] = {}
    for run, (backbone, crop, size) in RUNS.items():
        if backbone not in models:
            models[backbone] = official_model(boq_repo, dinov2_repo, backbone)
        with torch.no_grad():
            descriptor = models[backbone](transform(photo(shared, crop), size))[0][0].numpy()
        results[run] = descriptor.astype(np.float32)
        print(run, descriptor.shape, descriptor[:3])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **results)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))

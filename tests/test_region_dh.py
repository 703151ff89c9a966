"""Region-DH (issue 29): the detector's region operations against written-out references
(Caffe's ROI pooling bin by bin, greedy NMS pair by pair), training that lowers every loss
term on the multi-instance set of examples/make_instances.py, the model file, the stores
`cbir hash encode` writes, the multi-instance ranking on hand-made codes, and
`cbir hash train-regions -> encode -> search/evaluate --instances` end to end."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cbir.cli import main
from cbir.errors import CbirError, FormatError
from cbir.hashing import regions as R
from cbir.hashing.instances import InstanceSets, instance_distances
from cbir.hashing.labels import read_boxes
from cbir.hashing.model import pack

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# a small network for 160-pixel images, trained for a few epochs: enough for every loss to fall
SMALL_CONF = {"backbone": "resnet18", "anchor_sizes": [32, 64, 128], "rpn_channels": 64, "hidden": 128,
              "roi_channels": 32, "epochs": 4, "min_score": 0.05}
SMALL = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in SMALL_CONF.items()]  # as --conf items


def run(*args: object, ok: bool = True):  # noqa: ANN201  # click's Result
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert (result.exit_code == 0) == ok, result.output
    return result


def caffe_roi_pool(features: torch.Tensor, rois: torch.Tensor, n: int, scale: float) -> torch.Tensor:
    """Caffe's ROIPoolingLayer forward, bin by bin, as written in Fast R-CNN's code."""
    _, c, height, width = features.shape
    out = torch.zeros(len(rois), c, n, n)
    for r, (b, x0, y0, x1, y1) in enumerate(rois.tolist()):
        # Caffe's boxes are inclusive: (x1 - 1) is the last pixel of an exclusive box
        # C's round: halves away from zero (Python's round goes to even)
        sw, sh, ew, eh = (int(math.copysign(math.floor(abs(v * scale) + 0.5), v)) for v in (x0, y0, x1 - 1, y1 - 1))
        rw, rh = max(ew - sw + 1, 1), max(eh - sh + 1, 1)
        for i in range(n):
            for j in range(n):
                hs = min(max(math.floor(i * rh / n) + sh, 0), height)
                he = min(max(math.ceil((i + 1) * rh / n) + sh, 0), height)
                ws = min(max(math.floor(j * rw / n) + sw, 0), width)
                we = min(max(math.ceil((j + 1) * rw / n) + sw, 0), width)
                if he > hs and we > ws:
                    out[r, :, i, j] = features[int(b), :, hs:he, ws:we].amax((1, 2))
    return out


def test_roi_pool_is_caffes(threads):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 12, 15, generator=g)
    corners = torch.rand(40, 2, generator=g) * torch.tensor([200.0, 160.0])
    sizes = 16 + torch.rand(40, 2, generator=g) * 100
    boxes = torch.cat([corners, torch.minimum(corners + sizes, torch.tensor([240.0, 192.0]))], 1)
    rois = torch.cat([torch.randint(0, 2, (40, 1), generator=g).float(), boxes], 1)
    rois[0, 1:] = torch.tensor([0.0, 0.0, 240.0, 192.0])  # the whole map
    rois[1, 1:] = torch.tensor([100.0, 100.0, 104.0, 103.0])  # under one cell
    rois[2, 1:] = torch.tensor([200.0, 150.0, 260.0, 230.0])  # past the map: bins clipped, some empty
    rois[3, 1:] = torch.tensor([8.0, 24.0, 41.0, 57.0])  # cell coordinates at halves: 0.5 -> 1, 1.5 -> 2
    got = R.roi_pool(features, rois, 7, 1 / 16)
    assert torch.equal(got, caffe_roi_pool(features, rois, 7, 1 / 16))  # bit-exact: maxima of the same floats
    features.requires_grad_(True)
    R.roi_pool(features, rois, 7, 1 / 16).sum().backward()
    # each bin's maximum gets its 1, a bin wholly outside the map (0) nothing
    assert features.grad is not None and features.grad.sum() == (got != 0).sum() < 40 * 5 * 49


def test_nms_is_greedy_and_breaks_ties_by_index():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(60, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 10 + torch.rand(60, 2, generator=g) * 30], 1)
    scores = torch.round(torch.rand(60, generator=g) * 8) / 8  # many equal scores
    kept = R.nms(boxes, scores, 0.4).tolist()
    order = sorted(range(60), key=lambda i: (-float(scores[i]), i))
    expected: list[int] = []
    for i in order:
        if all(float(R.box_iou(boxes[i:i + 1], boxes[k:k + 1])) <= 0.4 for k in expected):
            expected.append(i)
    assert kept == expected
    assert R.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).numel() == 0


def test_anchors_boxes_and_sampling():
    a = R.anchors(2, 3, 16, (32.0, 64.0), (0.5, 1.0, 2.0))
    assert a.shape == (2 * 3 * 6, 4)
    wh = a[:, 2:] - a[:, :2]
    torch.testing.assert_close(wh.prod(1), torch.tensor([32.0 ** 2, 64.0 ** 2] * 3 * 6), rtol=1e-5, atol=0)
    torch.testing.assert_close((a[6, :2] + a[6, 2:]) / 2, torch.tensor([24.0, 8.0]))  # cell (0, 1)'s centre
    ref = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 16.0, 8.0]])
    target = torch.tensor([[12.0, 18.0, 60.0, 70.0], [2.0, 1.0, 10.0, 9.0]])
    deltas = R.encode_boxes(ref, target, (10.0, 10.0, 5.0, 5.0))
    torch.testing.assert_close(R.decode_boxes(ref, deltas, (10.0, 10.0, 5.0, 5.0)), target)
    iou = R.box_iou(torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[5.0, 0.0, 15.0, 10.0], [20.0, 20, 30, 30]]))
    torch.testing.assert_close(iou, torch.tensor([[1 / 3, 0.0]]))
    # the RPN rule: an object's best anchor is positive even under the IoU threshold
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    cands = torch.tensor([[0.0, 0.0, 20.0, 20.0], [50.0, 50.0, 60.0, 60.0]])
    matched, labels = R.match_boxes(R.box_iou(gt, cands), 0.7, 0.3, allow_best=True)
    assert labels.tolist() == [1, 0] and matched.tolist() == [0, 0]
    labels = torch.tensor([1] * 30 + [0] * 100 + [-1] * 5)
    sampled = R.sample_labels(labels, 64, 0.25, torch.Generator().manual_seed(0))
    assert int((sampled == 1).sum()) == 16 and int((sampled == 0).sum()) == 48
    assert torch.equal(sampled, R.sample_labels(labels, 64, 0.25, torch.Generator().manual_seed(0)))


def test_instance_ranking_on_hand_made_codes():
    def sets(rows: list[list[list[int]]]) -> InstanceSets:
        codes = [pack(np.array(r, bool).reshape(-1, 8)) for r in rows]
        offsets = np.concatenate([[0], np.cumsum([len(c) for c in codes])])
        return InstanceSets([str(i) for i in range(len(rows))], np.concatenate(codes), offsets, 8)

    cat, cup, dog = [1] * 8, [0] * 8, [1] * 4 + [0] * 4
    query = sets([[cat, cup], []])
    map_ = sets([[cat], [cat, cup], [], [dog]])
    image = np.full((2, 4), 7.0)
    d = instance_distances(query, map_, image)
    # query 0: image 0 has the cat (0) not the cup (8): mean 4; image 1 both: 0; image 2 none: the
    # image codes (7); image 3: 4 to each
    np.testing.assert_array_equal(d[0], [4.0, 0.0, 7.0, 4.0])
    np.testing.assert_array_equal(d[1], [7.0, 7.0, 7.0, 7.0])  # a query without instance: image codes


def test_boxes_files(tmp_path):
    path = tmp_path / "boxes.txt"
    path.write_text("# comment\na.png, cat, 1, 2, 30, 40\na.png, cup, 0, 0, 5.5, 6\nb.png, cat, 3, 3, 9, 9\n")
    assert read_boxes(path) == {"a.png": [("cat", (1, 2, 30, 40)), ("cup", (0, 0, 5.5, 6))],
                                "b.png": [("cat", (3, 3, 9, 9))]}
    for text, message in (("a.png, cat, 1, 2, 30\n", "expected"), ("a.png, cat, 1, 2, x, 4\n", "numbers"),
                          ("a.png, cat, 10, 2, 5, 40\n", "empty"), ("a.png, cat, 0, 0, nan, 4\n", "not finite"),
                          ("# nothing\n", "no boxes")):
        path.write_text(text)
        with pytest.raises(FormatError, match=message):
            read_boxes(path)


@pytest.fixture(scope="module")
def instances(tmp_path_factory) -> Path:
    spec = importlib.util.spec_from_file_location("make_instances", EXAMPLES / "make_instances.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = tmp_path_factory.mktemp("instances")
    module.main(root, 48, 12, 128)
    return root


def test_make_instances_writes_boxes_that_match_labels(instances):
    boxes = read_boxes(instances / "map" / "boxes.txt")
    assert len(boxes) == 48 and all(1 <= len(v) <= 3 for v in boxes.values())
    from cbir.hashing.labels import read_labels

    labels = read_labels(instances / "map" / "labels.txt")
    assert {n: tuple(sorted({lab for lab, _ in v})) for n, v in boxes.items()} == labels
    assert all(0 <= x0 < x1 <= 128 and 0 <= y0 < y1 <= 128 for v in boxes.values() for _, (x0, y0, x1, y1) in v)


def test_region_dh_end_to_end(instances, tmp_path):
    from cbir.hashing import region_dh
    from cbir.io.store import open_store

    model = tmp_path / "rdh.npz"
    conf = [a for c in SMALL for a in ("--conf", c)]
    out = json.loads(run("hash", "train-regions", instances / "map", "--boxes", instances / "map" / "boxes.txt",
                         "--bits", 12, "--out", model, "--json", *conf).output)
    assert out["classes"][:3] == ["cameraman", "cat", "coin"] and out["images"] == 48
    for term in ("rpn_objectness", "roi_class", "image_hash", "instance_hash"):
        assert out["final_loss"][term] < out["first_loss"][term], term
    run("hash", "train-regions", instances / "map", "--boxes", instances / "map" / "boxes.txt", "--bits", 12,
        "--out", model, *conf, ok=False)  # exists: not replaced
    net, header = region_dh.load(model)
    assert header["trained_on"] == out["trained_on"] and net.conf["bits"] == 12
    for d in ("map", "query"):
        run("hash", "encode", instances / d, "--model", model, "--name", "rdh")
    with open_store(instances / "map" / "cbir" / "global" / "rdh.h5") as g, \
            open_store(instances / "map" / "cbir" / "local" / "rdh.h5") as loc:
        assert g.config["code_bits"] == 12 and g.dataset("descriptors").shape == (48, 2)
        assert loc.config["hash"]["model"] == g.config["hash"]["model"] == region_dh.digest(net)
        params = loc.read_all("keypoint_params")
        assert params.shape[1] == 5 and len(params) > 0  # some instances found
        assert np.all((params[:, 4] >= 1) & (params[:, 4] <= 11))
        np.testing.assert_allclose(loc.read_all("keypoints"), (params[:, :2] + params[:, 2:4]) / 2, rtol=1e-6)
    run("check", instances / "map")  # both stores valid
    labels = tmp_path / "labels.txt"
    labels.write_text((instances / "map" / "labels.txt").read_text() + (instances / "query" / "labels.txt").read_text())
    for flag in ([], ["--instances"]):
        metrics = json.loads(run("hash", "evaluate", "--map", instances / "map", "--query", instances / "query",
                                 "--global", "rdh", "--labels", labels, "--k", 10, "--plot", tmp_path / "pr.html",
                                 *flag).output)
        assert metrics["level"] == ("instances" if flag else "image") and 0 < metrics["map"] <= 1
        page = (tmp_path / "pr.html").read_text()
        assert "<html>" in page and "plotly" in page and '<script src="http' not in page  # the bundle inlined
        assert json.dumps(metrics["pr_curve"]["precision"][3])[:6] in page
    pairs = run("hash", "search", "--map", instances / "map", "--query", instances / "query", "--global", "rdh",
                "--instances", "--topk", 5, "-o", "-").output
    rows = [line.split(", ") for line in pairs.splitlines() if not line.startswith("#")]
    assert len(rows) == 12 * 5 and all(0 <= float(r[2]) <= 12 for r in rows)
    run("hash", "search", "--map", instances / "map", "--global", "rdh", "--instances", "--rerank", "x", "-o", "-",
        ok=False)
    # hostile and mismatched inputs: one line, no traceback
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a model")
    result = run("hash", "encode", instances / "map", "--model", bad, "--global", "x", ok=False)
    assert "not a cbir hash model" in result.output and "Traceback" not in result.output
    result = run("hash", "encode", instances / "map", "--model", model, "--global", "x", ok=False)
    assert "no --global" in result.output
    other = tmp_path / "other.txt"
    other.write_text("nowhere.png, cat, 0, 0, 10, 10\n")
    result = run("hash", "train-regions", instances / "map", "--boxes", other, "--bits", 12, "--out",
                 tmp_path / "x.npz", *conf, ok=False)
    assert "not in" in result.output and not (tmp_path / "x.npz").exists()
    with pytest.raises(CbirError, match="ImageNet weights not found.*download.pytorch.org.*BSD"):
        region_dh.load_pretrained(net, tmp_path / "resnet18.pth")


def test_image_level_branch_learns_from_labels_alone(instances, tmp_path):
    """--labels with regions=false: deep hashing trained end to end with the backbone (its
    loss falls); its stores hold image codes and no instance."""
    from cbir.hashing import region_dh

    labels = instances / "map" / "labels.txt"
    run("hash", "train-regions", instances / "map", "--labels", labels, "--bits", 16, "--out", tmp_path / "x.npz",
        ok=False)  # the regions need boxes
    conf = [a for c in [*SMALL, "regions=false"] for a in ("--conf", c)]
    model = tmp_path / "image.npz"
    out = json.loads(run("hash", "train-regions", instances / "map", "--labels", labels, "--bits", 16, "--out", model,
                         "--json", *conf).output)
    assert set(out["final_loss"]) == {"image_hash"}
    assert out["final_loss"]["image_hash"] < out["first_loss"]["image_hash"]
    net, _ = region_dh.load(model)
    assert not net.conf["regions"]
    run("hash", "encode", instances / "map", "--model", model, "--name", "img")
    from cbir.io.store import open_store

    with open_store(instances / "map" / "cbir" / "local" / "img.h5") as loc:
        assert len(loc.read_all("descriptors")) == 0  # no region branch: no instance


def test_imagenet_weights_load_from_a_torchvision_file(tmp_path):
    """A file in torchvision's layout (its names, with layer4 and fc, which Region-DH does not
    use) loads into the backbone unchanged; another architecture's is refused by name."""
    from cbir.hashing import region_dh
    from cbir.models.backbones import ResNet

    torch.manual_seed(0)
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in ResNet("resnet18").state_dict().items()}
    state.update({"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)})
    torch.save(state, tmp_path / "resnet18.pth")
    net = region_dh.RegionDH({"backbone": "resnet18"}, ["cat"])
    region_dh.load_pretrained(net, tmp_path / "resnet18.pth")
    for name, value in net.backbone.state_dict().items():
        if not name.startswith("layer4."):
            assert torch.equal(value, state[name]), name
    torch.save(ResNet("resnet50").state_dict(), tmp_path / "resnet50.pth")
    with pytest.raises(FormatError, match="not torchvision resnet18 weights"):
        region_dh.load_pretrained(net, tmp_path / "resnet50.pth")


def test_training_is_seeded(instances):
    """The same seed on one machine and thread count: the same network, parameter for
    parameter (bit-exact); another seed: another network."""
    from cbir.hashing import region_dh
    from cbir.io.dataset import Dataset

    samples, classes, _ = region_dh.dataset_samples(Dataset(instances / "map"), instances / "map" / "boxes.txt",
                                                    None, None)
    nets = [region_dh.train(samples[:16], classes, {**SMALL_CONF, "epochs": 1}, seed)[0] for seed in (3, 3, 4)]
    assert region_dh.digest(nets[0]) == region_dh.digest(nets[1]) != region_dh.digest(nets[2])


def test_check_finds_bad_instance_codes(instances, tmp_path):
    """`cbir check` reads an instance store's header and padding bits like a code store's."""
    import shutil

    from cbir.hashing.model import code_store_config
    from cbir.io.store import StoreWriter

    ds = tmp_path / "ds"
    shutil.copytree(instances / "query", ds)
    identity = {"method": "region-dh", "conf": {}, "bits": 12, "trained_on": "", "model": "0" * 16}
    attrs = {"name": "bad", "config": code_store_config(12, identity, "region-dh"), "descriptor_dim": 2,
             "descriptor_dtype": "uint8", "keypoint_params": "x0,y0,x1,y1,class"}
    with StoreWriter(ds / "cbir" / "local" / "bad.h5", "local-features", attrs) as w:
        w.add("query_0000.png", keypoints=np.zeros((1, 2), np.float32), descriptors=np.array([[255, 255]], np.uint8),
              scores=np.ones(1, np.float32), keypoint_params=np.zeros((1, 5), np.float32),
              image_sizes=np.array([128, 128]))
    result = run("check", ds, ok=False)
    assert "padding bits past code_bits are not zero" in result.output and "bad.h5" in result.output


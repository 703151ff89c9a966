"""Hashing (issue 29): packed codes, the methods (ITQ against faiss's ITQTransform; the
survey's order on scikit-learn's digits: supervised above ITQ above LSH), exact Hamming
search with its tie rule, the metrics on hand-worked cases, labels files, and `cbir hash`
train -> encode -> search -> evaluate end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cbir.cli import main
from cbir.errors import CbirError, FormatError
from cbir.hashing.itq import ITQ
from cbir.hashing.labels import label_matrix, read_labels
from cbir.hashing.lsh import LSH
from cbir.hashing.metrics import hashing_metrics, label_relevance
from cbir.hashing.model import HashModel, check_bits, pack, unpack
from cbir.hashing.pairwise import DPSH, DSDH, HashNet
from cbir.hashing.search import hamming_distances, hamming_topk

FAST = {"epochs": 12}  # enough on digits for the order to show; the benchmark trains the defaults


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """scikit-learn's digits (1,797 8 x 8 images, 10 classes; bundled, no download): 200
    queries, the rest the database and the training set."""
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.default_rng(0).permutation(len(d.data))
    x, y = d.data.astype(np.float32), np.eye(10, dtype=bool)[d.target]
    return {"xq": x[perm[:200]], "yq": y[perm[:200]], "xb": x[perm[200:]], "yb": y[perm[200:]]}


def run(*args: object, ok: bool = True):  # noqa: ANN201  # click's Result
    """`cbir ARGS` in this process; it must succeed (``ok``) or fail."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert (result.exit_code == 0) == ok, result.output
    return result


def _map(model: HashModel, digits: dict[str, np.ndarray]) -> float:
    distances = hamming_distances(model.encode(digits["xq"]), model.encode(digits["xb"]))
    return hashing_metrics(distances, label_relevance(digits["yq"], digits["yb"]), model.bits)["map"]


def test_packing_round_trips_and_pads_with_zeros():
    bits = np.random.default_rng(0).random((5, 13)) > 0.5
    codes = pack(bits)
    assert codes.shape == (5, 2) and codes.dtype == np.uint8
    np.testing.assert_array_equal(unpack(codes, 13), bits)
    assert not np.any(np.unpackbits(codes, axis=1)[:, 13:])
    for bad in (4, 1025, True, 8.0):
        with pytest.raises(CbirError, match="8 to 1024 bits"):
            check_bits(bad)  # type: ignore[arg-type]


def test_itq_is_faiss_itq(digits):
    """The same method as faiss's ITQTransform (PCA, then 50 rotations; other random starts):
    the quantization loss falls, and the two mAPs on digits are within 0.03."""
    import faiss

    ours = ITQ().fit(digits["xb"], 32)
    assert ours.extra["quantization_loss"] < ours.extra["first_loss"]
    itq = faiss.ITQTransform(64, 32, True)
    itq.train(digits["xb"])
    theirs = [pack(itq.apply(digits[k]) > 0) for k in ("xq", "xb")]
    their_map = hashing_metrics(hamming_distances(*theirs), label_relevance(digits["yq"], digits["yb"]), 32)["map"]
    assert abs(_map(ours, digits) - their_map) < 0.03


def test_the_surveys_order_on_digits(digits):
    """At 32 bits: every supervised method above ITQ, ITQ above LSH."""
    lsh = _map(LSH().fit(digits["xb"], 32), digits)
    itq = _map(ITQ().fit(digits["xb"], 32), digits)
    assert itq > lsh + 0.05
    for cls in (DPSH, HashNet, DSDH):
        assert _map(cls(FAST).fit(digits["xb"], 32, digits["yb"]), digits) > itq + 0.05, cls.name


def train_sh_reference(x: np.ndarray, nbits: int) -> tuple[np.ndarray, ...]:
    """The authors' trainSH.m, line for line (PCA of cov(X), the modes matrix, sorted by
    eigenvalue with a stable sort)."""
    cov = np.cov(x.astype(np.float64), rowvar=False)
    values, vectors = np.linalg.eigh(cov)
    npca = min(nbits, x.shape[1])
    pc = vectors[:, np.argsort(values, kind="stable")[::-1][:npca]]
    xp = x.astype(np.float64) @ pc
    eps = np.finfo(np.float64).eps
    mn, mx = xp.min(0) - eps, xp.max(0) + eps
    r = mx - mn
    max_mode = np.ceil((nbits + 1) * r / r.max()).astype(int)
    n_modes = int(max_mode.sum() - len(max_mode) + 1)
    modes = np.ones((n_modes, npca))
    m = 1
    for i in range(npca):
        modes[m:m + max_mode[i] - 1, i] = np.arange(2, max_mode[i] + 1)
        m += max_mode[i] - 1
    modes -= 1
    omegas = modes * (np.pi / r)
    order = np.argsort((omegas ** 2).sum(1), kind="stable")
    return pc, mn, r, modes[order[1:nbits + 1]]


def compress_sh_reference(x: np.ndarray, pc: np.ndarray, mn: np.ndarray, r: np.ndarray,
                          modes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """compressSH.m: the bits and the products of sines they are the signs of."""
    xp = x.astype(np.float64) @ pc - mn
    u = np.stack([np.prod(np.sin(xp * (mode * np.pi / r) + np.pi / 2), axis=1) for mode in modes], 1)
    return u > 0, u


def test_spectral_hashing_is_the_authors(digits, tmp_path):
    from cbir.hashing.spectral import SpectralHashing

    ours = SpectralHashing().fit(digits["xb"], 32)
    pc, mn, r, modes = train_sh_reference(digits["xb"], 32)
    assert [[int(d), int(k)] for d, k in ours.extra["modes"]] == [[int(np.flatnonzero(m)[0]), int(m.max())]
                                                                     for m in modes]
    for key in ("xq", "xb"):
        theirs, u = compress_sh_reference(digits[key], pc, mn, r, modes)
        mine = ours.bits_of(digits[key])
        # principal directions are defined up to sign: a flipped one flips its odd modes' bits
        flips = np.array([np.sign(ours.projection[:, j] @ pc[:, d]) < 0 and k % 2 == 1
                          for j, (d, k) in enumerate(ours.extra["modes"])])
        differ = (mine ^ flips) != theirs
        assert not differ[np.abs(u) > 1e-9].any()  # equal wherever the cosine is not at its zero
    ours.save(tmp_path / "sh.npz")
    again = HashModel.load(tmp_path / "sh.npz")
    np.testing.assert_array_equal(again.encode(digits["xq"]), ours.encode(digits["xq"]))
    assert again.digest() == ours.digest() != ITQ().fit(digits["xb"], 32).digest()


def test_models_save_load_and_refuse_bad_files(digits, tmp_path):
    model = DPSH(FAST).fit(digits["xb"][:300], 16, digits["yb"][:300], seed=3)
    model.save(tmp_path / "m.npz")
    again = HashModel.load(tmp_path / "m.npz")
    np.testing.assert_array_equal(again.encode(digits["xq"]), model.encode(digits["xq"]))
    assert again.conf["seed"] == 3 and again.trained_on == model.trained_on and again.digest() == model.digest()
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(FormatError, match="not a cbir hash model"):
        HashModel.load(tmp_path / "bad.npz")
    with pytest.raises(CbirError, match="needs labels"):
        DPSH().fit(digits["xb"], 16)
    with pytest.raises(CbirError, match="at most as many bits as dimensions"):
        ITQ().fit(digits["xb"], 128)
    with pytest.raises(CbirError, match="unknown option"):
        ITQ({"rounds": 3})
    broken = digits["xq"][:3].copy()
    broken[1, 5] = np.nan
    with pytest.raises(CbirError, match="non-finite descriptors have no code"):
        model.encode(broken)


def test_exact_search_ranks_ties_by_map_order(threads):
    """Codes of 16 bits over 500 items (many equal distances): the k nearest by (distance,
    row), equal to a stable sort of every distance, at 1, 2 and 3 threads (integers: exact)."""
    import faiss

    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(1)
    codes = pack(rng.random((500, 16)) > 0.5)
    queries = pack(rng.random((40, 16)) > 0.5)
    full = hamming_distances(queries, codes)
    order = np.argsort(full, axis=1, kind="stable")[:, :25]
    distances, rows = hamming_topk(queries, codes, 25)
    np.testing.assert_array_equal(rows, order)
    np.testing.assert_array_equal(distances, np.take_along_axis(full, order, 1))
    for kind in ("multihash", "ivf"):  # approximate: what they find is ranked by the same rule
        d, r = hamming_topk(queries, codes, 25, kind)
        for qi in range(len(queries)):
            found = r[qi][r[qi] >= 0]
            assert np.all(np.diff(d[qi][r[qi] >= 0]) >= 0)
            np.testing.assert_array_equal(full[qi, found], d[qi][r[qi] >= 0])


def test_metrics_on_hand_worked_cases():
    # one query, five items at distances 0..4; relevant: items 0, 2 and 4
    distances = np.array([[0, 1, 2, 3, 4]])
    relevance = np.array([[True, False, True, False, True]])
    m = hashing_metrics(distances, relevance, bits=4, ks=(2, 5), radius=2)
    assert m["map"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert m["map@2"] == pytest.approx(1.0)  # one relevant found in the first two, at rank 1
    assert m["precision@2"] == pytest.approx(0.5) and m["recall@2"] == pytest.approx(1 / 3)
    assert m["precision_radius2"] == pytest.approx(2 / 3)  # items 0, 1, 2 within radius 2
    assert m["map_radius2"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["pr_curve"]["recall"] == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0])
    # ties: equal distances rank by map order
    tied = hashing_metrics(np.array([[1, 1, 1]]), np.array([[False, False, True]]), bits=8, ks=(1,))
    assert tied["map"] == pytest.approx(1 / 3) and tied["precision@1"] == 0.0
    with pytest.raises(CbirError, match="no query has a relevant item"):
        hashing_metrics(distances, np.zeros_like(relevance), bits=4)


def test_covisibility_from_a_maps_tracks():
    """Images sharing at least N points of a map's tracks are similar; a point seen twice by
    one image counts once; an image the map lacks is similar to itself only."""
    from cbir.hashing.labels import covisible_pairs

    images = ["a", "b", "c"]
    tracks = [[0, 1], [0, 1], [0, 1, 2], [1, 2], [2, 2]]  # point 4: image c twice
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in tracks])])
    flat = np.concatenate(tracks)
    similar = covisible_pairs(images, offsets, flat, ["c", "a", "b", "x"], 3)
    # a-b share 3 points, b-c 2, a-c 1
    assert similar.tolist() == [[True, False, False, False], [False, True, True, False],
                                [False, True, True, False], [False, False, False, True]]
    assert covisible_pairs(images, offsets, flat, ["b", "c"], 2).all()


def test_labels_files(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("# image, labels\na.jpg, cat\nb.jpg, dog, cat\n\nc.jpg, bird  # a comment\n")
    labels = read_labels(path)
    matrix, vocab = label_matrix(labels, ["a.jpg", "b.jpg", "c.jpg"], path)
    assert vocab == ["bird", "cat", "dog"]
    assert label_relevance(matrix, matrix).tolist() == [[True, True, False], [True, True, False],
                                                         [False, False, True]]
    with pytest.raises(CbirError, match="1 images have no label, e.g. 'd.jpg'"):
        label_matrix(labels, ["a.jpg", "d.jpg"], path)
    path.write_text("a.jpg, cat\na.jpg, dog\n")
    with pytest.raises(FormatError, match="line 2: 'a.jpg' is named twice"):
        read_labels(path)
    path.write_text("a.jpg\n")
    with pytest.raises(FormatError, match="line 1: expected"):
        read_labels(path)


def digits_dataset(root, digits: dict[str, np.ndarray],  # noqa: ANN001
                   n: int = 800) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A cbir dataset of ``n`` digits (each an 8 x 8 PNG, one camera) with a global store of
    their 64 pixels, ``pixels``: its names, descriptors and one-hot labels."""
    import cv2

    from cbir.io.store import StoreWriter

    x = np.vstack([digits["xq"], digits["xb"]])[:n]
    y = np.vstack([digits["yq"], digits["yb"]])[:n]
    names = [f"d{i:04d}.png" for i in range(len(x))]
    (root / "sensors" / "records_data").mkdir(parents=True)
    (root / "sensors" / "sensors.txt").write_text("# kapture format: 1.1\n# sensor_id, name, sensor_type, "
                                                  "[sensor_params]+\ncam, , camera, PINHOLE, 8, 8, 8, 8, 4, 4\n")
    (root / "sensors" / "records_camera.txt").write_text(
        "# kapture format: 1.1\n# timestamp, device_id, image_path\n" +
        "".join(f"{i}, cam, {n}\n" for i, n in enumerate(names)))
    for n, v in zip(names, x, strict=True):
        cv2.imwrite(str(root / "sensors" / "records_data" / n), (v.reshape(8, 8) * 16).clip(0, 255).astype(np.uint8))
    with StoreWriter(root / "cbir" / "global" / "pixels.h5", "global-features",
                     {"name": "pixels", "config": {"extractor": "pixels"}, "descriptor_dim": 64,
                      "descriptor_dtype": "float32"}) as w:
        for n, v in zip(names, x, strict=True):
            w.add(n, descriptors=v)
    return names, x, y


def test_cbir_hash_end_to_end(digits, tmp_path):
    """A dataset of the digits with a global store of their pixels: `cbir hash train` (ITQ,
    and DPSH with a labels file), `encode` to code stores, `search` and `cbir retrieve` (the
    same pairs; float products of codes refused), `evaluate`, `cbir check`."""
    from cbir.io.store import StoreWriter, open_store

    root = tmp_path / "digits"
    names, x, y = digits_dataset(root, digits)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{n}, {int(np.argmax(t))}\n" for n, t in zip(names, y, strict=True)))
    model = tmp_path / "itq.npz"
    out = json.loads(run("hash", "train", root, "--global", "pixels", "--method", "itq", "--bits", 32,
                         "--out", model, "--json").stdout)
    assert out["bits"] == 32 and out["dim"] == 64 and out["images"] == len(x)
    err = run("hash", "train", root, "--global", "pixels", "--method", "itq", "--bits", 32, "--out", model,
              ok=False).output
    assert "exists: pass --overwrite" in err
    err = run("hash", "train", root, "--global", "pixels", "--method", "dpsh", "--bits", 32, "--out",
              tmp_path / "d.npz", ok=False).output
    assert "needs labels" in err and err.count("\n") == 1
    run("hash", "train", root, "--global", "pixels", "--method", "dpsh", "--bits", 32, "--labels", labels,
        "--conf", "epochs=30", "--out", tmp_path / "dpsh.npz")
    for m in (model, tmp_path / "dpsh.npz"):
        run("hash", "encode", root, "--global", "pixels", "--model", m)
    with open_store(root / "cbir" / "global" / "pixels-itq32.h5") as s:
        assert s.config["metric_type"] == "Hamming" and s.config["code_bits"] == 32
        assert s.attrs["descriptor_dtype"] == "uint8" and s.attrs["descriptor_dim"] == 4
        assert s.config["hash"]["method"] == "itq" and len(s) == len(x)
    # the map cut in shards of 97 images (as a cluster cuts it): the same pairs as one shard
    from cbir.executor import LocalExecutor, ShardSizes
    from cbir.hashing.retrieve import hamming_pairs
    from cbir.io.dataset import Dataset

    class Cut(LocalExecutor):
        in_place = False

    whole = hamming_pairs(Dataset(root), Dataset(root), "pixels-itq32", 7)[0]
    assert hamming_pairs(Dataset(root), Dataset(root), "pixels-itq32", 7, executor=Cut(ShardSizes(map_images=97)))[0] \
        == whole and len(whole) == 7 * len(x)
    err = run("hash", "encode", root, "--global", "pixels-itq32", "--model", model, ok=False).output
    assert "learned from and applied to float descriptors" in err
    searched, retrieved = tmp_path / "searched.txt", tmp_path / "retrieved.txt"
    run("hash", "search", "--map", root, "--global", "pixels-dpsh32", "--topk", 5, "-o", searched)
    run("retrieve", "--map", root, "--global", "pixels-dpsh32", "--topk", 5, "-o", retrieved)
    lines = [ln.split(",") for ln in searched.read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(lines) == 5 * len(x) and all(a.strip() != b.strip() for a, b, *_ in lines)
    body = [ln for ln in retrieved.read_text().splitlines() if not ln.startswith("#")]
    assert body == [ln for ln in searched.read_text().splitlines() if not ln.startswith("#")]
    # re-ranked by the float pixels: with every image a candidate, float retrieval itself (same bits)
    reranked, floats = tmp_path / "reranked.txt", tmp_path / "floats.txt"
    run("retrieve", "--map", root, "--global", "pixels-itq32", "--rerank", "pixels", "--candidates", len(x), "--topk",
        5, "-o", reranked)
    run("retrieve", "--map", root, "--global", "pixels", "--topk", 5, "-o", floats)
    assert [ln for ln in reranked.read_text().splitlines() if not ln.startswith("#")] == \
        [ln for ln in floats.read_text().splitlines() if not ln.startswith("#")]
    run("hash", "search", "--map", root, "--global", "pixels-itq32", "--rerank", "pixels", "--candidates", 20,
        "--topk", 5, "-o", reranked)
    few = [ln.split(",") for ln in reranked.read_text().splitlines() if not ln.startswith("#")]
    assert len(few) == 5 * len(x) and all(-1 <= float(f[2]) <= 1 for f in few)
    err = run("retrieve", "--map", root, "--global", "pixels", "--rerank", "pixels", "-o", retrieved,
              ok=False).output
    assert "--rerank: for one code store" in err
    # codes in the float path (options of float search, fusion): +-1 vectors, whose cosine 1 - 2d/B
    # ranks as the Hamming distance, ties by map order: the same pairs as Hamming search
    as_floats = tmp_path / "as_floats.txt"
    run("retrieve", "--map", root, "--global", "pixels-dpsh32", "--topk", 5, "--precision", "fp16", "-o", as_floats)
    scored = [ln.split(", ") for ln in as_floats.read_text().splitlines() if not ln.startswith("#")]
    assert [f[:2] for f in scored] == [ln.split(", ")[:2] for ln in body]
    assert all(abs(float(f[2]) - (2 * float(b.split(", ")[2]) / 32 - 1)) < 1e-6 for f, b in zip(scored, body,
                                                                                                  strict=True))
    run("retrieve", "--map", root, "--global", "pixels-dpsh32,pixels", "--topk", 5, "-o", retrieved)
    results = {}
    for codes in ("pixels-itq32", "pixels-dpsh32"):
        results[codes] = json.loads(run("hash", "evaluate", "--map", root, "--query", root,
                                        "--global", codes, "--labels", labels).stdout)
    assert results["pixels-dpsh32"]["map"] > results["pixels-itq32"]["map"] > 0.4
    # the same relevance in `cbir evaluate --retrieval` of the Hamming pairs: the same precision@5
    # (relevant among the first 5, every query having relevant images)
    pairs_eval = json.loads(run("evaluate", "--retrieval", "--pairs", searched, "--labels", labels, "--map", root,
                                "--ks", "5", "--json").stdout)
    at5 = json.loads(run("hash", "evaluate", "--map", root, "--query", root, "--global", "pixels-dpsh32",
                         "--labels", labels, "--k", 5).stdout)["precision@5"]
    assert pairs_eval["precision@k"]["5"] == pytest.approx(at5, abs=1e-12)
    assert len(results["pixels-itq32"]["pr_curve"]["precision"]) == 33
    # cbir check: the code stores are valid (no L2-norm warning for codes); a set padding bit is an error
    check = json.loads(run("check", "--json", root).stdout)
    assert not [p for p in check["problems"] if "pixels-" in p["path"]], check["problems"]
    config = {"extractor": "hash", "metric_type": "Hamming", "code_bits": 12, "hash": {}, "source": {}}
    with StoreWriter(root / "cbir" / "global" / "bad.h5", "global-features",
                     {"name": "bad", "config": config, "descriptor_dim": 2, "descriptor_dtype": "uint8"}) as w:
        w.add(names[0], descriptors=np.array([255, 1], np.uint8))
    result = run("check", root, ok=False)
    assert result.exit_code == 1 and "padding bits past code_bits are not zero" in result.output
    err = run("hash", "search", "--map", root, "--global", "bad", "-o", searched, ok=False).output
    assert "padding bits past code_bits are not zero" in err


def test_poses_supervise_and_judge_codes(shared, tmp_path):
    """A localization dataset (strecha_fountain_p11): DPSH learned from pose pairs (cameras
    within a distance and angle), codes of map and queries, evaluated against the queries'
    ground-truth poses; DSDH, which needs labels, refuses pairs alone."""
    from cbir.io.dataset import Dataset
    from cbir.io.store import StoreWriter
    from tests.conftest import writable_copy

    data = shared / "data" / "strecha_fountain_p11"
    roots = {part: writable_copy(data / part, tmp_path / part) for part in ("mapping", "query")}
    rng = np.random.default_rng(0)
    for root in roots.values():  # descriptors of one (random, seeded) model for both datasets
        names = Dataset(root).sensors.image_names()
        with StoreWriter(root / "cbir" / "global" / "rand.h5", "global-features",
                         {"name": "rand", "config": {"extractor": "random"}, "descriptor_dim": 32,
                          "descriptor_dtype": "float32"}) as w:
            for n in names:
                v = rng.standard_normal(32).astype(np.float32)
                w.add(n, descriptors=v / np.linalg.norm(v))
    qposes = Dataset(data / "query_gt").sensors.image_poses()
    mposes = Dataset(roots["mapping"]).sensors.image_poses()
    gaps = np.array([[np.linalg.norm(q.center - m.center) for m in mposes.values()] for q in qposes.values()])
    limit = float(np.median(gaps))
    model = tmp_path / "dpsh.npz"
    run("hash", "train", roots["mapping"], "--global", "rand", "--method", "dpsh", "--bits", 16, "--poses",
        "--max-distance", limit, "--max-angle", 180, "--conf", "epochs=3", "--out", model)
    assert HashModel.load(model).conf["supervision"] == "poses"
    err = run("hash", "train", roots["mapping"], "--global", "rand", "--method", "dsdh", "--bits", 16, "--poses",
              "--out", tmp_path / "x.npz", ok=False).output
    assert "learns from labels" in err
    for root in roots.values():
        run("hash", "encode", root, "--global", "rand", "--model", model)
    out = json.loads(run("hash", "evaluate", "--map", roots["mapping"], "--query", roots["query"], "--global",
                         "rand-dpsh16", "--query-gt", data / "query_gt", "--max-distance", limit, "--max-angle",
                         180).stdout)
    assert out["queries"] == len(qposes) and out["queries_with_relevant"] == int((gaps <= limit).any(1).sum())
    assert out["ground_truth"].startswith("poses")

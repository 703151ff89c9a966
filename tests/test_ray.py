"""`--executor ray` on Ray's own multi-node test cluster (two nodes of one CPU each, started
here), on the real photos of sceaux_castle and the README's rendered example: extraction,
matching, retrieval and the pipeline give a local run's stores, pairs and poses; a re-run
does nothing; a worker killed in the middle of its shard is replaced and the result is still
the local one."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from cbir import extract as extract_mod
from cbir.distributed import RayConf, extract_on_ray
from cbir.io.dataset import Dataset
from cbir.io.store import open_store
from cbir.models.sift import SIFT
from tests.conftest import writable_copy

pytestmark = pytest.mark.slow
SIFT_CONF = {"max_keypoints": 1000}


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1, num_gpus=1)  # a GPU by name only: where GPU actors and tasks go
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def local_store(sceaux, tmp_path_factory) -> Path:
    """SIFT of sceaux_castle's map, extracted by this process."""
    root = writable_copy(sceaux / "mapping", tmp_path_factory.mktemp("local") / "mapping")
    return extract_mod.main(SIFT(SIFT_CONF), Dataset(root), num_workers=1).path


def assert_same_store(a: Path, b: Path) -> None:
    with open_store(a) as x, open_store(b) as y:
        assert x.names == y.names and x.config == y.config and x.columns == y.columns
        for name in x.names:
            for col, value in x.get(name).items():
                np.testing.assert_array_equal(value, y.get(name)[col], err_msg=f"{name} {col}")


def test_shards_on_two_nodes_make_the_local_store(cluster, sceaux, tmp_path, local_store):
    ds = Dataset(writable_copy(sceaux / "mapping", tmp_path / "mapping"))
    progress, merging = [], []
    [report] = extract_on_ray([("local", "sift", SIFT_CONF)], ds, store_names=[None], conf=RayConf(shard_size=3),
                              progress=lambda advance, total: progress.append((advance, total)),
                              merging=lambda advance, total: merging.append((advance, total)))
    assert report.extracted == 8 and report.already_present == 0 and not report.failed
    assert sum(a for a, _ in progress) == 8 and all(t == 8 for _, t in progress)
    assert merging == [(1, 3)] * 3  # each of the 3 shards' stores made a part of the final one
    assert_same_store(report.path, local_store)
    with open_store(report.path) as s:  # sharded: the parts, never copied into one file
        assert [p.name for p in s.parts] == ["000000.h5", "000001.h5", "000002.h5"]
    assert not (ds.root / "cbir" / "shards").exists()  # made parts, then removed
    assert len({n["NodeID"] for n in ray.nodes() if n["Alive"]}) == 2
    [again] = extract_on_ray([("local", "sift", SIFT_CONF)], ds, store_names=[None], conf=RayConf(shard_size=3))
    assert again.extracted == 0 and again.already_present == 8
    assert_same_store(again.path, local_store)


def _count_build(log: str) -> int:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    return os.getpid()


def _where(pid: int, i: int) -> tuple[int, int, list, int]:
    from cbir.distributed import assigned_cpus

    return pid, i, [str(g) for g in ray.get_gpu_ids()], assigned_cpus()


@pytest.mark.parametrize("on_gpu", [False, True])
def test_networks_are_loaded_once_per_actor(cluster, tmp_path, on_gpu):
    """Shards with a setup run on long-lived actors: one per CPU of the cluster (two), or one
    per GPU (one) when the work wants a GPU; each builds its state once for all its shards."""
    from cbir.distributed import run_shards

    log = tmp_path / "builds.txt"
    results = dict(run_shards(_where, {i: (i,) for i in range(8)}, [str(i) for i in range(8)], RayConf(), on_gpu,
                              setup=(_count_build, (str(log),))))
    assert sorted(results) == list(range(8)) and all(r[1] == i for i, r in results.items())
    builds = log.read_text().split()
    assert len(builds) == (1 if on_gpu else 2) and {r[0] for r in results.values()} <= {int(b) for b in builds}
    assert all(r[2] == (["0"] if on_gpu else []) for r in results.values())
    assert all(r[3] == 1 for r in results.values())  # one CPU a node: the CPUs per GPU, or the default
    deadline = time.monotonic() + 30  # ray.kill is asynchronous: the actors' CPUs come back
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU") == 2


def test_a_shard_no_node_can_hold_is_refused(cluster, tmp_path):
    """A shard asking for more CPUs than any node has would wait for ever: refused at once."""
    from cbir.distributed import run_shards
    from cbir.errors import CbirError

    with pytest.raises(CbirError, match="no node of the Ray cluster has 2 CPUs"):
        list(run_shards(_where, {0: (0,)}, ["0"], RayConf(cpus=2), False, setup=(_count_build, (str(tmp_path / "b"),))))


def _kill_first_shard_worker(stop: threading.Event, killed: list[bytes],
                             titles: tuple[bytes, ...] = (b"ray::ExtractionActor.run",)) -> None:
    """SIGKILL the first process Ray titles with each of ``titles`` (a worker inside a shard).
    Ray's worker processes (titled ``ray::``) are looked for every 0.2 s and watched every
    millisecond, so that a shard of a few milliseconds is caught too."""
    workers: set[str] = set()
    next_scan = 0.0
    while not stop.is_set() and len(killed) < len(titles):
        if time.monotonic() >= next_scan:
            workers |= {pid for pid in os.listdir("/proc") if pid.isdigit() and _title(pid).startswith(b"ray::")}
            next_scan = time.monotonic() + 0.2
        for pid in list(workers):
            title = _title(pid)
            if not title:
                workers.discard(pid)
            for wanted in titles:
                if wanted not in killed and title.startswith(wanted):
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(wanted)
                    workers.discard(pid)
        time.sleep(0.001)


def _title(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_worker_killed_in_its_shard_is_replaced(cluster, sceaux, tmp_path, local_store):
    ds = Dataset(writable_copy(sceaux / "mapping", tmp_path / "mapping"))
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_shard_worker, args=(stop, killed))
    killer.start()
    try:
        [report] = extract_on_ray([("local", "sift", SIFT_CONF)], ds, store_names=[None], conf=RayConf(shard_size=4))
    finally:
        stop.set()
        killer.join()
    assert killed, "no shard worker was seen running"
    assert report.extracted == 8
    assert_same_store(report.path, local_store)


def test_parts_copied_by_tasks_make_the_merged_store_despite_a_kill(cluster, tmp_path):
    """`merge_into` on the cluster: each part copied into the final file by a task of its own,
    one of them killed mid-copy and run again (it writes the same bytes): the store a local
    merge makes, byte for byte, with checksums that verify, a part that records none
    included (its CRC computed by its task)."""
    import h5py

    from cbir.distributed import merge_into
    from cbir.io.store import SCHEMAS, StoreWriter, merge_stores, open_store

    attrs = {"name": "toy", "config": {"k": 1}, "descriptor_dim": 128}
    rng = np.random.default_rng(0)
    parts = []
    for p in range(4):
        path = tmp_path / f"part{p}.h5"
        with StoreWriter(path, "local-features", attrs) as w:
            for i in range(10):
                k = 2000 + p * 10 + i
                w.add(f"p{p}/{i:02d}.jpg", keypoints=rng.random((k, 2), dtype=np.float32),
                      descriptors=rng.standard_normal((k, 128)).astype(np.float32),
                      scores=rng.random(k, dtype=np.float32), image_sizes=np.array([640, 480]))
        parts.append(path)
    with h5py.File(parts[2], "r+") as f:
        del f.attrs["checksums"]
    merge_stores(parts, tmp_path / "local.h5", SCHEMAS["local-features"], attrs)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_shard_worker, args=(stop, killed, (b"ray::copy_part",)))
    killer.start()
    try:
        merge_into(tmp_path / "final.h5", parts, "local-features", attrs, conf=RayConf())
    finally:
        stop.set()
        killer.join()
    assert killed, "no copy task was seen running"
    assert_same_store(tmp_path / "final.h5", tmp_path / "local.h5")
    with open_store(tmp_path / "final.h5") as s, open_store(tmp_path / "local.h5") as t:
        assert s.verify_checksums() == [] and s.attrs["checksums"] == t.attrs["checksums"]


def test_a_store_of_another_configuration_is_refused(cluster, sceaux, tmp_path, local_store):
    from cbir.errors import CbirError

    root = writable_copy(sceaux / "mapping", tmp_path / "mapping")
    target = Dataset(root).store_path("local", "sift")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(local_store.read_bytes())
    with pytest.raises(CbirError, match="another configuration"):
        extract_on_ray([("local", "sift", {"max_keypoints": 50})], Dataset(root), store_names=[None])


def test_the_command_runs_on_the_cluster(cluster, sceaux, tmp_path, local_store):
    """`cbir extract --executor ray --ray-address ADDRESS`: the same store, the usual summary."""
    import json

    from click.testing import CliRunner

    from cbir.cli import main

    root = writable_copy(sceaux / "mapping", tmp_path / "mapping")
    result = CliRunner().invoke(main, ["extract", str(root), "--local", "sift", "--max-keypoints", "1000",
                                       "--executor", "ray", "--ray-address", cluster.address, "--shard-size", "5",
                                       "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["extracted"] == 8 and summary["already_present"] == 0
    assert_same_store(Path(summary["store"]), local_store)


def _map_with_sift(sceaux: Path, root: Path, local_store: Path) -> Dataset:
    """A writable copy of sceaux_castle's map at ``root`` holding ``local_store`` as its SIFT."""
    ds = Dataset(writable_copy(sceaux / "mapping", root))
    target = ds.store_path("local", "sift")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(local_store.read_bytes())
    return Dataset(ds.root)


def test_matching_shards_make_the_local_store(cluster, sceaux, tmp_path, local_store):
    """Every map pair of sceaux_castle, verified by RANSAC: shards of 10 pairs on the cluster
    give the local run's store; a re-run has nothing to do; a worker killed inside its shard
    changes nothing."""
    from cbir.distributed import match_on_ray
    from cbir.io.pairs import exhaustive_pairs
    from cbir.matching import MatcherConf, VerifyConf
    from cbir.matching import match as match_mod

    stores = []
    for label in ("local", "ray"):
        ds = _map_with_sift(sceaux, tmp_path / label, local_store)
        pairs = exhaustive_pairs(ds.sensors.image_names())
        options = {"name": "m", "matcher": MatcherConf(ratio=0.8), "verify": VerifyConf(), "device": "cpu"}
        if label == "local":
            report = match_mod.main(ds, ds, pairs, "sift", num_workers=1, **options)
        else:
            report = match_on_ray(ds, ds, pairs, "sift", conf=RayConf(shard_size=10), **options)
            again = match_on_ray(ds, ds, pairs, "sift", conf=RayConf(shard_size=10), **options)
            assert again.matched == 0 and again.already_present == 28
        assert report.matched == 28 and report.inliers > 0
        stores.append(report.path)
    assert_same_store(*stores)
    # a worker killed inside its shard of pairs: the task runs again, the store is the same
    ds = _map_with_sift(sceaux, tmp_path / "killed", local_store)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_shard_worker, args=(stop, killed, (b"ray::match_shard",)))
    killer.start()
    try:
        report = match_on_ray(ds, ds, exhaustive_pairs(ds.sensors.image_names()), "sift", conf=RayConf(shard_size=10),
                              **options)
    finally:
        stop.set()
        killer.join()
    assert killed, "no matching worker was seen running"
    assert report.matched == 28
    assert_same_store(report.path, stores[0])


def test_the_pipeline_runs_on_the_cluster(cluster, tmp_path, monkeypatch):
    """The README's rendered example through `cbir pipeline` with `[executor] kind = "ray"`:
    its stores, pairs, poses and evaluation equal a local run's (extraction, DenseVLAD
    learned once on the driver, retrieval over map shards of 3 images, matching and pose
    estimation on the cluster), also when a worker is killed inside a shard of retrieval and
    inside one of pose estimation. Its progress shows the merge of every step's shards."""
    import json
    import shutil
    from contextlib import contextmanager

    from click.testing import CliRunner

    import cbir.cli.pipeline_cmds
    from cbir.cli import main
    from tests.conftest import render_example

    bars: dict[str, list[tuple[int, int]]] = {}

    @contextmanager
    def recorded_bar(label, quiet):  # the CLI's bars (not shown outside a terminal), recorded
        bars[label] = []
        yield lambda advance, total: bars[label].append((advance, total))

    monkeypatch.setattr(cbir.cli.pipeline_cmds, "progress_bar", recorded_bar)

    scene = render_example(tmp_path / "scene")
    runs = []
    for label in ("local", "ray"):
        root = tmp_path / label
        shutil.copytree(scene, root)
        toml = root / "pipe.toml"
        toml.write_text('[datasets]\nmap = "mapping"\nquery = "query"\nquery_gt = "query_gt"\n'
                        '[extract]\nlocal = "sift"\nglobal = ["densevlad"]\nlocal_conf = {max_keypoints = 1000}\n'
                        'global_conf = {max_size = 320, clusters = 16}\n'  # a light vocabulary: the suite's time
                        '[retrieve]\ntopk = 5\nmap_pairs = 0\n[match]\nratio = 0.8\n'
                        '[localize]\nconfig = "config1"\nsequence = true\n[report]\nwrite = false\n' +
                        (f'[executor]\nkind = "ray"\naddress = "{cluster.address}"\nimages_per_task = 4\n'
                         'map_images_per_task = 3\npairs_per_task = 20\nqueries_per_task = 2\n'
                         if label == "ray" else ""))
        stop, killed = threading.Event(), []
        killer = threading.Thread(target=_kill_first_shard_worker,
                                  args=(stop, killed, (b"ray::topk_shard", b"ray::LocalizationActor.run")))
        if label == "ray":  # a worker killed in a shard of retrieval and in one of pose estimation
            killer.start()
        try:
            result = CliRunner().invoke(main, ["pipeline", str(toml), "--json"])
        finally:
            stop.set()
            if label == "ray":
                killer.join()
        assert result.exit_code == 0, result.output
        assert len(killed) == (2 if label == "ray" else 0), killed
        runs.append((root, json.loads(result.stdout)))
        merges = {name: updates for name, updates in bars.items() if name.startswith("collect")}
        if label == "ray":  # every part of every store counted, once
            assert set(merges) == {"collect the parts of mapping", "collect the parts of query",
                                   "collect the parts of the map matches", "collect the parts of the query matches"}
            assert all(updates and sum(a for a, _ in updates) == updates[0][1] for updates in merges.values())
        else:
            assert not merges
        bars.clear()
    (a, ra), (b, rb) = runs
    assert ra["evaluation"] == rb["evaluation"] and rb["evaluation"]["all"]["localized"] == 5
    for rel in ("mapping/cbir/local/sift.h5", "query/cbir/local/sift.h5", "mapping/cbir/global/densevlad.h5",
                "query/cbir/global/densevlad.h5", "mapping/cbir/matches/sift-map.h5"):
        assert_same_store(a / rel, b / rel)
    assert not (b / "mapping" / "cbir" / "shards").exists() and not (b / "query" / "cbir" / "shards").exists()
    pairs = sorted((a / "query").rglob("pairs/*.txt"))
    assert pairs and all(f.read_text() == (b / f.relative_to(a)).read_text() for f in pairs)
    result = "query/cbir/localization/sift-densevlad-config1"
    assert (a / result / "trajectories.txt").read_text() == (b / result / "trajectories.txt").read_text()


@pytest.fixture(scope="module")
def densevlad_map(sceaux, tmp_path_factory) -> Path:
    """sceaux_castle's map with two DenseVLAD stores (16 and 8 clusters)."""
    from cbir.models.densevlad import DenseVLAD

    root = writable_copy(sceaux / "mapping", tmp_path_factory.mktemp("dv") / "mapping")
    extract_mod.extract_all([DenseVLAD({"learn": True, "clusters": 16}), DenseVLAD({"learn": True, "clusters": 8})],
                            Dataset(root), store_names=["dv16", "dv8"], num_workers=1)
    return root


@pytest.mark.parametrize("fusion", ["gharm", "round_robin"])
def test_retrieval_over_map_shards_is_the_exact_topk(cluster, densevlad_map, tmp_path, fusion):
    """`cbir retrieve --executor ray`: every map shard's top-k on a task, merged on the driver:
    the pairs of a local retrieval (map x map, self excluded; two descriptors, fused or in turn)."""
    from click.testing import CliRunner

    from cbir.cli import main
    from cbir.io.pairs import read_pairs

    outs = {}
    for executor in ("local", "ray"):
        out = tmp_path / f"{executor}.txt"
        args = ["retrieve", "--map", str(densevlad_map), "--global", "dv16,dv8", "--fusion", fusion, "--topk", "5",
                "-o", str(out), "--executor", executor, "--shard-size", "3"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        outs[executor] = read_pairs(out)
    assert len(outs["local"]) == 8 * 5
    assert [(p.query, p.map) for p in outs["ray"]] == [(p.query, p.map) for p in outs["local"]]
    assert outs["ray"] == outs["local"]  # scores bit for bit (cbir.exact)


@pytest.mark.parametrize("expansion", [["--qe", "2", "--qe-alpha", "3"], ["--dba", "2"], ["--dba", "2", "--qe", "3"]],
                         ids=["qe", "dba", "dba+qe"])
def test_query_expansion_and_augmentation_on_the_cluster(cluster, densevlad_map, tmp_path, expansion):
    """`cbir retrieve --qe/--dba --executor ray`: every search on map shards, the expanded
    queries and the augmented map sent to them: the pairs of a local run (map x map, self
    excluded, so that after augmentation the queries are the augmented map too)."""
    from click.testing import CliRunner

    from cbir.cli import main
    from cbir.io.pairs import read_pairs

    outs = {}
    for executor in ("local", "ray"):
        out = tmp_path / f"{executor}.txt"
        args = ["retrieve", "--map", str(densevlad_map), "--global", "dv16,dv8", "--topk", "4", *expansion,
                "-o", str(out), "--executor", executor, "--shard-size", "3"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        outs[executor] = read_pairs(out)
    plain = tmp_path / "plain.txt"
    assert CliRunner().invoke(main, ["retrieve", "--map", str(densevlad_map), "--global", "dv16,dv8", "--topk", "4",
                                     "-o", str(plain)]).exit_code == 0
    assert len(outs["local"]) == 8 * 4
    assert [p.score for p in outs["local"]] != [p.score for p in read_pairs(plain)]  # the expansion changed it
    # the same ranking, images of equal score (augmented descriptors can be equal) by map index
    assert [(p.query, p.map) for p in outs["ray"]] == [(p.query, p.map) for p in outs["local"]]
    assert outs["ray"] == outs["local"]  # scores bit for bit (cbir.exact)


def _synthetic_dataset(root: Path, n: int) -> Dataset:
    """``n`` small images (100 x 80): shifted, noisy crops of one texture, so that
    neighbours share keypoints."""
    import cv2

    from cbir.geometry.cameras import Camera
    from cbir.io.kapture_text import write_sensor_data
    from cbir.io.sensors import ImageRecord, SensorData

    images = root / "sensors" / "records_data"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(cv2.resize(rng.random((60, 80), np.float32), (200, 160)), (0, 0), 1.5) * 255
    for i in range(n):
        y, x = int(rng.integers(0, 80)), int(rng.integers(0, 100))
        crop = texture[y:y + 80, x:x + 100] + rng.normal(0, 4, (80, 100))
        cv2.imwrite(str(images / f"{i:05d}.png"), np.clip(crop, 0, 255).astype(np.uint8))
    data = SensorData(sensors={"cam0": Camera("PINHOLE", 100, 80, (90.0, 90.0, 50.0, 40.0))})
    data.records = [ImageRecord(i, "cam0", f"{i:05d}.png") for i in range(n)]
    write_sensor_data(root, data)
    return Dataset(root)


def test_thousands_of_synthetic_images(cluster, tmp_path):
    """2,000 synthetic images: extraction on the cluster's actors (32 shards) and matching of
    1,999 pairs on its tasks (8 shards) give a local run's stores."""
    import shutil

    from cbir.distributed import match_on_ray
    from cbir.io.pairs import Pair
    from cbir.matching import MatcherConf
    from cbir.matching import match as match_mod

    n, conf = 2000, {"max_keypoints": 200}
    local = _synthetic_dataset(tmp_path / "local", n)
    shutil.copytree(local.root / "sensors", tmp_path / "ray" / "sensors")
    on_ray = Dataset(tmp_path / "ray")
    mine = extract_mod.main(SIFT(conf), local, num_workers=1)
    [theirs] = extract_on_ray([("local", "sift", conf)], on_ray, store_names=[None], conf=RayConf(shard_size=64))
    assert mine.extracted == theirs.extracted == n and not theirs.failed
    assert_same_store(mine.path, theirs.path)
    names = sorted(local.sensors.image_names())
    pairs = [Pair(a, b) for a, b in zip(names, names[1:], strict=False)]
    options = {"name": "m", "matcher": MatcherConf(ratio=0.9), "device": "cpu"}
    mine = match_mod.main(local, local, pairs, "sift", num_workers=1, **options)
    theirs = match_on_ray(on_ray, on_ray, pairs, "sift", conf=RayConf(shard_size=250), **options)
    assert mine.matched == theirs.matched == n - 1 and theirs.matches == mine.matches > 10 * n
    assert_same_store(mine.path, theirs.path)


@pytest.mark.parametrize("fusion", ["gharm", "round_robin"])
def test_indexes_kept_per_map_shard(cluster, densevlad_map, tmp_path, fusion):
    """`cbir index build --executor ray` writes one index file per map shard on the cluster, and
    keeps them on a re-run; `cbir retrieve --index --executor ray` searches each shard through
    its own file (nothing built for the call) and, every shard image being a candidate (flat),
    returns the exact pairs; shards of another size have no files: built for the call, said so."""
    import json
    import shutil

    from click.testing import CliRunner

    from cbir.cli import main
    from cbir.io.pairs import read_pairs

    root = tmp_path / "map"
    shutil.copytree(densevlad_map, root)
    common = ["--map", str(root), "--global", "dv16,dv8", "--fusion", fusion, "--topk", "5"]
    runner = CliRunner()
    assert runner.invoke(main, ["retrieve", *common, "-o", str(tmp_path / "exact.txt")]).exit_code == 0
    exact = [(p.query, p.map) for p in read_pairs(tmp_path / "exact.txt")]
    build = ["index", "build", str(root), "--global", "dv16,dv8", "--index", "flat", "--executor", "ray",
             "--shard-size", "3", "--json"]
    first = runner.invoke(main, build)
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["shards"] == 3 and json.loads(first.stdout)["built"] == 3
    shards = root / "cbir" / "index" / "dv16+dv8.flat.shards"
    records = ["000000000-000000003", "000000003-000000006", "000000006-000000008"]
    assert sorted(p.name for p in shards.glob("*.h5")) == [f"{r}.h5" for r in records]
    # each shard's two indexes (one a store) in faiss files of their own, beside its record
    assert sorted(p.name.split(".")[0] + p.name[-8:] for p in shards.glob("*.faiss")) == \
        [f"{r}.{j}.faiss" for r in records for j in (0, 1)] and \
        len(list(shards.iterdir())) == 9
    assert json.loads(first.stdout)["bytes"] == sum(f.stat().st_size for f in shards.iterdir())
    assert json.loads(runner.invoke(main, build).stdout)["kept"] == 3
    for size, built in (("3", False), ("4", True)):
        out = tmp_path / f"indexed{size}.txt"
        result = runner.invoke(main, ["retrieve", *common, "--index", "flat", "--candidates", "8", "--executor", "ray",
                                      "--shard-size", size, "-o", str(out), "--recall-sample", "4", "--json"])
        assert result.exit_code == 0, result.output
        assert ("for this call only" in result.stderr) == built
        assert json.loads(result.stdout)["recall_vs_exact"] == 1.0
        assert [(p.query, p.map) for p in read_pairs(out)] == exact
    # one of two inverted lists probed: some of each exact top 5 is never a candidate, and the recall says so
    result = runner.invoke(main, ["retrieve", *common, "--index", "ivf", "--nlist", "2", "--nprobe", "1",
                                  "--executor", "ray", "--shard-size", "8", "-o", str(tmp_path / "few.txt"),
                                  "--recall-sample", "8", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["recall_vs_exact"] < 1
    # below 95% the summary names the options that raise it
    assert (summary["recall_advice"] is not None) == (summary["recall_vs_exact"] < 0.95)
    assert runner.invoke(main, ["check", str(root)]).exit_code == 0


def test_lightglue_matching_on_the_cluster_is_the_local_run(cluster, sceaux, tmp_path, local_store):
    """The matcher lightglue through the Ray executor (its network loaded by each task from
    the weights the driver named): the local run's store, SIFT's scales and orientations
    included. Weights generated in the official layout (no released weights are here)."""
    from cbir.distributed import match_on_ray
    from cbir.io.pairs import exhaustive_pairs
    from cbir.matching import match as match_mod
    from cbir.matching.lightglue import LightGlue
    from tests.test_lightglue import _released_layout, _state

    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save(_released_layout(_state(scale_ori=True)), weights / "sift_lightglue.pth")
    stores = []
    for label in ("local", "ray"):
        ds = _map_with_sift(sceaux, tmp_path / label, local_store)
        pairs = exhaustive_pairs(ds.sensors.image_names())[:12]
        options = {"name": "lg", "matcher": LightGlue({"weights_dir": str(weights), "filter_threshold": 0.0}),
                   "device": "cpu"}
        if label == "local":
            report = match_mod.main(ds, ds, pairs, "sift", num_workers=1, **options)
        else:
            report = match_on_ray(ds, ds, pairs, "sift", conf=RayConf(shard_size=5), **options)
        assert report.matched == 12 and report.matches > 12
        stores.append(report.path)
    # the same matches; scores within 1e-5, not bit-identical: a task computes with the one
    # thread it is given, this process with two, and the products are reduced in other orders
    with open_store(stores[0]) as a, open_store(stores[1]) as b:
        assert a.keys == b.keys
        for key in a.keys:
            np.testing.assert_array_equal(a.get(key)["matches"], b.get(key)["matches"])
            np.testing.assert_allclose(a.get(key)["scores"], b.get(key)["scores"], atol=1e-5, rtol=0)


def test_hamming_retrieval_over_map_shards_is_the_local_run(cluster, tmp_path):
    """`cbir retrieve --executor ray` of a code store (600 digits' ITQ codes), the map cut in
    shards of 250 images: the local run's pairs, line for line (integer distances)."""
    from click.testing import CliRunner
    from sklearn.datasets import load_digits

    from cbir.cli import main
    from tests.test_hashing import digits_dataset

    d = load_digits()
    x, y = d.data.astype(np.float32), np.eye(10, dtype=bool)[d.target]
    root = tmp_path / "digits"
    x, y = x[:600], y[:600]
    digits_dataset(root, {"xq": x[:0], "yq": y[:0], "xb": x, "yb": y}, n=600)
    runner = CliRunner()
    for args in (["hash", "train", root, "--global", "pixels", "--method", "itq", "--bits", 24, "--out",
                  tmp_path / "itq.npz"],
                 ["hash", "encode", root, "--global", "pixels", "--model", tmp_path / "itq.npz"]):
        result = runner.invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    out = {}
    for label, extra in (("local", []), ("ray", ["--executor", "ray", "--ray-address", cluster.address,
                                                  "--shard-size", "250"])):
        out[label] = tmp_path / f"{label}.txt"
        result = runner.invoke(main, [str(a) for a in ["retrieve", "--map", root, "--global", "pixels-itq24",
                                                        "--topk", 10, "-o", out[label], *extra]])
        assert result.exit_code == 0, result.output
    lines = {k: [ln for ln in v.read_text().splitlines() if not ln.startswith("#")] for k, v in out.items()}
    assert lines["ray"] == lines["local"] and len(lines["local"]) == 10 * len(x)

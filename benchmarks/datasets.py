"""The benchmarks' working copies of the shared datasets, with SIFT (8k) and DenseVLAD
extracted, every map x map pair and the DenseVLAD top-5 query pairs written as pairs files:
what bench_verify.py and bench_peer_localize.py start from."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from cbir import extract as extract_mod
from cbir.io.dataset import Dataset, model_path
from cbir.io.pairs import exhaustive_pairs, write_pairs
from cbir.io.store import open_store
from cbir.retrieval import DescriptorSet, RetrievalConf, retrieve

HERE = Path(__file__).resolve().parent
DATASETS = ("sceaux_castle", "strecha_fountain_p11", "rendered_example")


def working_copy(shared: Path, work: Path, name: str) -> Path:
    """``work/name``: a writable copy of ``shared/data/name``, or the README's rendered
    example made by examples/make_scene.py."""
    root = work / name
    if root.exists():
        return root
    if name == "rendered_example":
        spec = importlib.util.spec_from_file_location("make_scene", HERE.parent / "examples" / "make_scene.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(root)
    else:
        shutil.copytree(shared / "data" / name, root)
        for p in [root, *root.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    return root


def prepare(root: Path) -> tuple[Dataset, Dataset, Path, Path]:
    """SIFT and DenseVLAD of both datasets (resumed when present), then the pairs files:
    ``MAP/cbir/pairs/exhaustive_map.txt`` and ``QUERY/cbir/pairs/densevlad_top5.txt``."""
    m, q = Dataset(root / "mapping"), Dataset(root / "query")
    sift = extract_mod.build_extractor("sift", {}, "local")
    extract_mod.extract_all([sift, extract_mod.build_extractor("densevlad", {"learn": True}, "global")], m)
    model = model_path(m.store_path("global", "densevlad"))
    extract_mod.extract_all([sift, extract_mod.build_extractor("densevlad", {"model": str(model)}, "global")], q)
    with open_store(m.store_path("global", "densevlad")) as ms, open_store(q.store_path("global", "densevlad")) as qs:
        query_pairs = retrieve(DescriptorSet.align([qs]), DescriptorSet.align([ms]), RetrievalConf(topk=5))
    map_path, query_path = m.store_path("pairs", "exhaustive_map"), q.store_path("pairs", "densevlad_top5")
    for path, pairs in ((map_path, exhaustive_pairs(m.sensors.image_names())), (query_path, query_pairs)):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_pairs(path, pairs)
    return m, q, map_path, query_path

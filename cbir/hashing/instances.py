"""Region-DH's two stores and the multi-instance ranking (formats/SPEC.md 7a).

``cbir hash encode`` with a Region-DH model writes, for a dataset:

- a code store (``cbir/global/NAME.h5``): each image's image-level code (H2);
- an instance store (``cbir/local/NAME.h5``, a local-feature store): per image, one row per
  instance found, ``keypoints`` its box centre, ``keypoint_params`` ``(x0, y0, x1, y1, class)``
  (class: 1-based, in the model's class list), ``scores`` its detection score, ``descriptors``
  its packed instance code (H1), with the code store's ``metric_type Hamming``, ``code_bits``
  and model identity.

Ranking by instances: the distance of a map image to a query is the mean, over the query's
instances, of the Hamming distance to the nearest of the map image's instances (a query asking
for a cat and a cup ranks first the images holding both); where the query or the map image has
no instance, their image codes' distance stands in. Ties by map order. Distances are means of
integers computed in float64: the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CbirError
from .model import checked_codes, code_bits

if TYPE_CHECKING:
    from ..io.dataset import Dataset
    from ..io.pairs import Pair
    from .retrieve import CodeDistances


@dataclass
class InstanceSets:
    """The instance codes of a store's images: ``codes`` (M x bytes), image ``i``'s rows
    ``offsets[i]:offsets[i + 1]``; ``names`` in store order; the hash model that wrote them and
    the store's fingerprint."""

    names: list[str]
    codes: np.ndarray
    offsets: np.ndarray
    bits: int
    model: str | None = None
    fingerprint: str = ""


def read_instance_sets(path: Path) -> InstanceSets:
    from ..io.store import open_store

    if not path.exists():
        raise CbirError("no instance store: write it with `cbir hash encode` and a Region-DH model", path)
    with open_store(path, "local-features") as s:
        if (s.config.get("metric_type") or "") != "Hamming" or s.config.get("extractor") != "region-dh":
            raise CbirError("not a Region-DH instance store (written by `cbir hash encode` with a Region-DH model)",
                            path)
        bits = code_bits(s)  # the header checked against the codes' width
        return InstanceSets([str(k) for k in s.keys], checked_codes(s, None, bits), np.asarray(s.offsets, np.int64),
                            bits, s.config.get("hash", {}).get("model"), s.fingerprint())


def instance_distances(query: InstanceSets, map_: InstanceSets, image_distances: np.ndarray) -> np.ndarray:
    """Q x N float64 distances of the module docstring; ``image_distances`` (Q x N, the image
    codes' Hamming distances) stand in where either side has no instance."""
    if query.bits != map_.bits:
        raise CbirError(f"instance codes of {query.bits} and {map_.bits} bits")
    from .search import hamming_distances

    out = np.asarray(image_distances, np.float64).copy()
    if not len(query.codes) or not len(map_.codes):
        return out
    has = np.diff(map_.offsets) > 0
    starts = map_.offsets[:-1][has]
    for i in range(len(query.names)):
        a, b = query.offsets[i], query.offsets[i + 1]
        if a == b:
            continue
        # one query at a time: its instances x every map instance, integers
        nearest = np.minimum.reduceat(hamming_distances(query.codes[a:b], map_.codes), starts, axis=1)
        out[i, has] = nearest.sum(0) / (b - a)
    return out


def region_distances(qd: Dataset, md: Dataset, name: str) -> CodeDistances:
    """The multi-instance distances (Q x N float64) of the query and map images by the
    Region-DH stores ``name`` (code store and instance store), the four stores checked to go
    together; their fingerprints."""
    from .retrieve import code_distances

    images = code_distances(qd, md, name)
    qi, mi = (read_instance_sets(d.store_path("local", name)) for d in (qd, md))
    model = images.identity.get("model")
    for sets, names, d in ((qi, images.query_names, qd), (mi, images.map_names, md)):
        where = d.store_path("local", name)
        if sets.names != names or sets.bits != images.bits:
            raise CbirError(f"the instance store does not go with the code store {name!r} (other images or code "
                            "length): encode both with one `cbir hash encode`", where)
        if sets.model != model:
            raise CbirError("the instance codes were written by another model than the image codes", where)
    return replace(images, distances=instance_distances(qi, mi, images.distances),
                   fingerprints={**images.fingerprints, "instances": [qi.fingerprint, mi.fingerprint]})


def write_region_stores(ds: Dataset, model_path: Path, name: str | None = None, *, overwrite: bool = False,
                        device: Any = None) -> tuple[Path, Path]:
    """Encode ``ds``'s images with the Region-DH model at ``model_path`` (on ``device``): the
    code store and the instance store of the module docstring, both ``name`` (default
    ``region-dh<bits>``); images already in both are kept (a resumed run)."""
    import torch

    from ..io.images import read_image
    from ..io.store import StoreWriter
    from . import region_dh
    from .model import code_bytes, code_store_config

    net, header = region_dh.load(model_path)
    identity = {"method": "region-dh", "conf": net.conf, "bits": int(net.conf["bits"]),
                "trained_on": header.get("trained_on", ""), "model": region_dh.digest(net)}
    device = device or torch.device("cpu")
    net.to(device)
    bits = identity["bits"]
    names = ds.sensors.image_names()
    if not names:
        raise CbirError("the dataset has no image", ds.root)
    name = name or f"region-dh{bits}"
    global_path, local_path = ds.store_path("global", name), ds.store_path("local", name)
    width = {"descriptor_dim": code_bytes(bits), "descriptor_dtype": "uint8"}
    global_attrs = {"name": name, "config": code_store_config(bits, identity), **width}
    local_attrs = {"name": name, "config": code_store_config(bits, identity, "region-dh"),
                   "keypoint_params": "x0,y0,x1,y1,class", **width}
    with StoreWriter(global_path, "global-features", global_attrs, overwrite=overwrite) as g, \
            StoreWriter(local_path, "local-features", local_attrs, overwrite=overwrite) as loc:
        for n in names:
            if n in g and n in loc:
                continue
            image = read_image(ds.image_path(n), max_size=net.conf.get("max_size"))
            found = net.find(region_dh.to_tensor(image.array).to(device))
            sx, sy = image.scale
            boxes = found.boxes.astype(np.float64) / np.array([sx, sy, sx, sy])  # in the stored image's pixels
            centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
            params = np.concatenate([boxes, found.classes[:, None]], 1).astype(np.float32)
            if n not in g:
                g.add(n, descriptors=found.image_code)
            if n not in loc:
                loc.add(n, keypoints=centres.astype(np.float32), descriptors=found.codes, scores=found.scores,
                        keypoint_params=params, image_sizes=np.array(image.original_size))
    return global_path, local_path


def instance_pairs(query: Dataset, map_: Dataset, name: str, topk: int,
                   exclude_same_name: bool = False) -> tuple[list[Pair], dict[str, Any]]:
    """Each query's ``topk`` map images by the instance ranking (score: ``bits - distance``,
    ties by map order; a query's own image left out when query and map are one dataset), and
    the pairs file's record."""
    from ..io.pairs import Pair

    found = region_distances(query, map_, name)
    mnames, bits = found.map_names, found.bits
    same = query.root.resolve() == map_.root.resolve()
    pairs = []
    for i, q in enumerate(found.query_names):
        hits = [j for j in np.argsort(found.distances[i], kind="stable")
                if not ((same or exclude_same_name) and mnames[j] == q)][:topk]
        pairs += [Pair(q, mnames[j], float(bits - found.distances[i, j])) for j in hits]
    record = {"step": "retrieve", "config": {"metric": "Hamming", "level": "instances", "topk": topk,
                                             "exclude_self": same, "exclude_same_name": exclude_same_name,
                                             "stores": [name], "code_bits": bits}, "inputs": found.fingerprints}
    return pairs, record

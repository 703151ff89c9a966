"""hloc's feature and match files (one HDF5 group per image, one per pair).

features.h5: ``<image name>/keypoints`` (K x 2, same pixel convention as cbir),
``descriptors`` (D x K, transposed), ``scores`` (K), ``image_size`` (2: w, h).
matches.h5: ``<name0>/<name1>/matches0`` (K0 int, -1 where unmatched) and
``matching_scores0`` (K0), with '/' in image names replaced by '-'
(hloc's ``names_to_pair``); the older ``<name0>_<name1>`` form is read too.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import CbirError, FormatError
from .atomic import atomic_output
from .hdf5 import read_metadata
from .paths import check_relative_name
from .store import StoreWriter, check_match_indices, check_matches_provenance, open_store, pair_keys


def _open(path: Path) -> h5py.File:
    """An hloc file, once its metadata was read in a time-limited child: a corrupt file cannot
    hang, and one whose data lives in other files (external links or storage, virtual
    datasets) is refused (:func:`~cbir.io.hdf5.read_metadata`)."""
    read_metadata(path)
    try:
        return h5py.File(path, "r")
    except OSError:
        raise FormatError("not a readable HDF5 file (truncated or corrupt?)", path) from None


def hloc_pair_key(name0: str, name1: str, separator: str = "/") -> str:
    return separator.join((name0.replace("/", "-"), name1.replace("/", "-")))


def import_features(path: str | os.PathLike, out: str | os.PathLike, name: str, *,
                    overwrite: bool = False) -> int:
    path = Path(path)
    groups: list[str] = []
    with _open(path) as f:
        f.visititems(lambda key, obj: groups.append(key)
                     if isinstance(obj, h5py.Group) and "keypoints" in obj else None)
        if not groups:
            raise FormatError("no image group with a 'keypoints' dataset: not an hloc features file", path)
        for image in groups:  # they become store keys, and paths on export
            problem = check_relative_name(image, "image group")
            if problem:
                raise FormatError(problem, path)
        first = f[groups[0]]
        dim = first["descriptors"].shape[0] if "descriptors" in first else 0
        dtype = first["descriptors"].dtype if "descriptors" in first else np.dtype(np.float32)
        attrs = {"name": name, "config": {"source": "hloc"}, "descriptor_dim": int(dim),
                 "descriptor_dtype": dtype.name, "keypoint_params": ""}
        with StoreWriter(out, "local-features", attrs, overwrite=overwrite) as w:
            for image in sorted(groups):
                if image in w:
                    continue
                g = f[image]
                kps = g["keypoints"][()]
                if kps.ndim != 2 or kps.shape[1] != 2:
                    raise FormatError(f"{image}/keypoints has shape {kps.shape}, expected (K, 2)", path)
                desc = g["descriptors"][()].T if "descriptors" in g else np.zeros((len(kps), 0), dtype)
                if desc.shape != (len(kps), dim):
                    raise FormatError(f"{image}/descriptors has shape {desc.shape[::-1]}, expected "
                                      f"({dim}, {len(kps)})", path)
                cols = {"keypoints": kps, "descriptors": desc.astype(dtype, copy=False)}
                if "scores" in g:
                    cols["scores"] = g["scores"][()]
                if "image_size" in g:
                    cols["image_sizes"] = g["image_size"][()]
                w.add(image, **cols)
    return len(groups)


def export_features(store_path: str | os.PathLike, out: str | os.PathLike) -> int:
    with open_store(store_path, "local-features") as s, atomic_output(Path(out)) as tmp:
        with h5py.File(tmp, "w") as f:
            cols = [c for c in ("keypoints", "descriptors", "scores", "image_sizes") if c in s.columns]
            for keys, batch, offs in s.iter_batches(256, cols):
                for i, image in enumerate(keys):
                    a, b = offs[i], offs[i + 1]
                    g = f.create_group(image)
                    g.create_dataset("keypoints", data=batch["keypoints"][a:b])
                    g.create_dataset("descriptors", data=batch["descriptors"][a:b].T)
                    if "scores" in batch:
                        g.create_dataset("scores", data=batch["scores"][a:b])
                    if "image_sizes" in batch:
                        g.create_dataset("image_size", data=batch["image_sizes"][i])
        return len(s)


def import_matches(path: str | os.PathLike, out: str | os.PathLike, name: str, image_names: list[str], *,
                   local_features: str = "", overwrite: bool = False) -> int:
    """``image_names`` (the images of the feature store) resolve hloc's '/'->'-' pair keys."""
    path = Path(path)
    sanitized = {n.replace("/", "-"): n for n in image_names}
    found: list[tuple[str, str, str]] = []  # (group path, name0, name1)
    with _open(path) as f:
        def visit(key: str, obj) -> None:
            if not (isinstance(obj, h5py.Group) and "matches0" in obj):
                return
            parts = key.split("/")
            if len(parts) == 2 and parts[0] in sanitized and parts[1] in sanitized:
                found.append((key, sanitized[parts[0]], sanitized[parts[1]]))
                return
            for i in range(len(key)):  # older "name0_name1" keys
                if key[i] == "_" and key[:i] in sanitized and key[i + 1:] in sanitized:
                    found.append((key, sanitized[key[:i]], sanitized[key[i + 1:]]))
                    return
            raise FormatError(f"pair group {key!r} does not name two known images", path)
        f.visititems(visit)
        attrs = {"name": name, "local_features": local_features, "config": {"source": "hloc"}}
        with StoreWriter(out, "matches", attrs, overwrite=overwrite) as w:
            for key, n0, n1 in sorted(found):
                if (n0, n1) in w:
                    continue
                m0 = f[key]["matches0"][()].astype(np.int64)
                idx0 = np.flatnonzero(m0 > -1)
                cols = {"matches": np.column_stack([idx0, m0[idx0]])}
                if "matching_scores0" in f[key]:
                    cols["scores"] = f[key]["matching_scores0"][()][idx0].astype(np.float32)
                w.add((n0, n1), **cols)
    return len(found)


def export_matches(store_path: str | os.PathLike, features_path: str | os.PathLike,
                   out: str | os.PathLike) -> int:
    """hloc stores matches as a K0-long array per pair: the local store gives K0."""
    with open_store(store_path, "matches") as s, open_store(features_path, "local-features") as feats, \
            atomic_output(Path(out)) as tmp:
        check_matches_provenance(s, feats.attrs.get("name", ""), feats)
        with h5py.File(tmp, "w") as f:
            cols = ["matches"] + (["scores"] if "scores" in s.columns else [])
            for keys, batch, offs in s.iter_batches(1024, cols):
                for i, (n0, n1) in enumerate(pair_keys(keys)):
                    a, b = offs[i], offs[i + 1]
                    if n0 not in feats:
                        raise CbirError(f"image {n0!r} of pair ({n0}, {n1}) has no features", features_path)
                    m0 = np.full(feats.count(n0), -1, np.int32)
                    s0 = np.zeros(len(m0), np.float32)
                    idx = batch["matches"][a:b]
                    check_match_indices(idx, (len(m0), feats.count(n1) if n1 in feats else None),
                                        Path(store_path), (n0, n1))
                    m0[idx[:, 0]] = idx[:, 1]
                    if "scores" in batch:
                        s0[idx[:, 0]] = batch["scores"][a:b]
                    g = f.require_group(hloc_pair_key(n0, n1))
                    g.create_dataset("matches0", data=m0)
                    g.create_dataset("matching_scores0", data=s0)
        return len(s)

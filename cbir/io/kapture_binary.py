"""kapture's reconstruction/ layout: binary features, matches, points3d and observations.

```
reconstruction/keypoints/<type>/keypoints.txt          name, dtype, dsize
reconstruction/keypoints/<type>/<image>.kpt            raw (K, dsize) array
reconstruction/descriptors/<type>/descriptors.txt      name, dtype, dsize, keypoints_type, metric_type
reconstruction/descriptors/<type>/<image>.desc         raw (K, dsize) array
reconstruction/global_features/<type>/global_features.txt  name, dtype, dsize, metric_type
reconstruction/global_features/<type>/<image>.gfeat    raw (dsize,) array
reconstruction/matches/<kp type>/<im0>.overlapping/<im1>.matches   raw (M, 3) float64: i0, i1, score
reconstruction/points3d.txt, reconstruction/observations.txt
```

Import gives cbir stores holding exactly those arrays (keypoint columns beyond
x, y go to ``keypoint_params``; kapture's dtypes are kept); export writes them back
byte for byte. kapture-localization reads what export writes, and cbir reads
what kapture-localization writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import CbirError, FormatError
from .atomic import atomic_output, atomic_write_text
from .dataset import check_store_name
from .kapture_text import HEADER_VERSION, KAPTURE_VERSION, VERSION_RE, iter_rows
from .map_store import PointMap, read_map, write_map
from .paths import check_relative_name, confined, require_type_name
from .store import StoreWriter, open_store, pair_keys
from .textfile import read_file_bytes

RECONSTRUCTION = "reconstruction"
KEYPOINTS_HEADER = "# name, dtype, dsize"
DESCRIPTORS_HEADER = "# name, dtype, dsize, keypoints_type, metric_type"
GLOBAL_HEADER = "# name, dtype, dsize, metric_type"
OBSERVATIONS_HEADER = "# point3d_id, keypoints_type, [image_path, feature_id]*"
POINTS_HEADER = "X, Y, Z, R, G, B"

Progress = Callable[[str], None]


def _config_row(path: Path, n_columns: int, columns: str) -> list[str]:
    rows = list(iter_rows(path))
    if len(rows) != 1:
        raise FormatError(f"expected one line ({columns}), got {len(rows)}", path)
    lineno, fields = rows[0]
    if len(fields) != n_columns:
        raise FormatError(f"expected {n_columns} columns ({columns}), got {len(fields)}", path, lineno)
    return fields


def _header_version(path: Path) -> str:
    """The 'kapture format: X.Y' of a config file, kept so that export writes it back unchanged."""
    with open(path, "rb") as f:
        m = VERSION_RE.match(f.readline().decode("utf-8", "replace").strip())
    return f"{m.group(1)}.{m.group(2)}" if m else KAPTURE_VERSION


def _dtype(name: str, path: Path) -> np.dtype:
    name = name.replace("numpy.", "").replace("<class '", "").replace("'>", "")
    try:
        return np.dtype(name)
    except TypeError:
        raise FormatError(f"unknown dtype {name!r}", path) from None


def _dsize(value: str, path: Path) -> int:
    try:
        d = int(value)
    except ValueError:
        raise FormatError(f"dsize is not an integer: {value!r}", path) from None
    if d <= 0:
        raise FormatError(f"dsize must be positive, got {d}", path)
    return d


def _read_array(path: Path, dtype: np.dtype, dsize: int) -> np.ndarray:
    data = np.frombuffer(read_file_bytes(path, "feature file"), dtype=np.uint8)  # a regular file, within its size
    if data.size % (dtype.itemsize * dsize):
        raise FormatError(f"size {data.size} B is not a multiple of {dsize} x {dtype} "
                          "(truncated, or wrong dtype/dsize)", path)
    return data.view(dtype).reshape(-1, dsize)


def _feature_files(directory: Path, ext: str) -> list[tuple[str, Path]]:
    """(image name, file) for every feature file below ``directory``, sorted by name."""
    out = []
    for p in directory.rglob(f"*{ext}"):
        if p.is_file():
            out.append((p.relative_to(directory).as_posix()[: -len(ext)], p))
    return sorted(out)


def _feature_file(directory: Path, image: str, ext: str, source: Path) -> Path:
    """``directory/<image><ext>``, refused when the image name (a store key) would lead
    out of ``directory``."""
    return confined(directory, image, what="image name", source=source).with_name(image.rsplit("/", 1)[-1] + ext)


def _write_raw(path: Path, array: np.ndarray) -> None:
    with atomic_output(path) as tmp:
        np.ascontiguousarray(array).tofile(tmp)


# ================================================================================ import

def import_local_features(kapture_root: Path, descriptors_type: str, out: Path, *,
                          image_sizes: dict[str, tuple[int, int]] | None = None,
                          overwrite: bool = False) -> int:
    rec = kapture_root / RECONSTRUCTION
    desc_dir = rec / "descriptors" / descriptors_type
    d_name, d_dtype, d_size, kp_type, metric = _config_row(
        desc_dir / "descriptors.txt", 5, "name, dtype, dsize, keypoints_type, metric_type")
    kp_dir = rec / "keypoints" / require_type_name(kp_type, "keypoints_type", desc_dir / "descriptors.txt")
    k_name, k_dtype, k_size = _config_row(kp_dir / "keypoints.txt", 3, "name, dtype, dsize")
    kdt, kds = _dtype(k_dtype, kp_dir / "keypoints.txt"), _dsize(k_size, kp_dir / "keypoints.txt")
    ddt, dds = _dtype(d_dtype, desc_dir / "descriptors.txt"), _dsize(d_size, desc_dir / "descriptors.txt")
    if kds < 2:
        raise FormatError("keypoints need at least x and y (dsize >= 2)", kp_dir / "keypoints.txt")
    attrs = {
        "name": descriptors_type,
        "config": {"source": "kapture", "keypoints_type": kp_type, "descriptors_type": d_name,
                   "keypoints_dtype": kdt.name, "keypoints_dsize": kds, "metric_type": metric,
                   "kapture_format": {"keypoints": _header_version(kp_dir / "keypoints.txt"),
                                      "descriptors": _header_version(desc_dir / "descriptors.txt")}},
        "descriptor_dim": dds, "descriptor_dtype": ddt.name,
        "keypoint_params": _keypoint_params_layout(kds),
    }
    n = 0
    with StoreWriter(out, "local-features", attrs, overwrite=overwrite) as w:
        for name, desc_path in _feature_files(desc_dir, ".desc"):
            kpt_path = kp_dir / f"{name}.kpt"
            if not kpt_path.is_file():
                raise CbirError(f"descriptors of {name!r} have no keypoints file {kpt_path}", desc_path)
            kps = _read_array(kpt_path, kdt, kds)
            desc = _read_array(desc_path, ddt, dds)
            if len(kps) != len(desc):
                raise FormatError(f"{len(kps)} keypoints but {len(desc)} descriptors", desc_path)
            if name in w:
                continue
            cols = {"keypoints": kps[:, :2].astype(np.float32), "descriptors": desc}
            if kds > 2:
                cols["keypoint_params"] = kps[:, 2:].astype(np.float32)
            if image_sizes is not None:
                cols["image_sizes"] = np.asarray(image_sizes.get(name, (0, 0)), np.int32)
            w.add(name, **cols)
            n += 1
    return n


def _keypoint_params_layout(dsize: int) -> str:
    return {2: "", 3: "scale", 4: "scale,orientation", 6: "a11,a12,a21,a22"}.get(dsize, f"{dsize - 2} values")


def import_global_features(kapture_root: Path, gf_type: str, out: Path, *, overwrite: bool = False) -> int:
    gdir = kapture_root / RECONSTRUCTION / "global_features" / gf_type
    name, dtype, dsize, metric = _config_row(gdir / "global_features.txt", 4, "name, dtype, dsize, metric_type")
    dt, ds = _dtype(dtype, gdir / "global_features.txt"), _dsize(dsize, gdir / "global_features.txt")
    attrs = {"name": gf_type, "config": {"source": "kapture", "metric_type": metric, "kapture_format": {
                 "global_features": _header_version(gdir / "global_features.txt")}},
             "descriptor_dim": ds, "descriptor_dtype": dt.name}
    n = 0
    with StoreWriter(out, "global-features", attrs, overwrite=overwrite) as w:
        for image, path in _feature_files(gdir, ".gfeat"):
            vec = _read_array(path, dt, ds)
            if vec.shape[0] != 1:
                raise FormatError(f"expected one {ds}-D descriptor, got {vec.shape[0]}", path)
            if image not in w:
                w.add(image, descriptors=vec[0])
                n += 1
    return n


def import_matches(kapture_root: Path, kp_type: str, out: Path, *, overwrite: bool = False) -> int:
    mdir = kapture_root / RECONSTRUCTION / "matches" / kp_type
    attrs = {"name": kp_type, "local_features": kp_type, "config": {"source": "kapture"}}
    n = 0
    with StoreWriter(out, "matches", attrs, overwrite=overwrite) as w:
        for rel, path in _feature_files(mdir, ".matches"):
            if ".overlapping/" not in rel:
                raise FormatError("a matches file must be in an '<image>.overlapping/' directory", path)
            im0, im1 = rel.split(".overlapping/", 1)
            m = _read_array(path, np.dtype(np.float64), 3)
            idx = m[:, :2]
            if np.any(idx < 0) or np.any(idx != np.round(idx)) or np.any(idx > np.iinfo(np.int32).max):
                raise FormatError("match indices must be non-negative integers", path)
            if (im0, im1) not in w:
                w.add((im0, im1), matches=idx.astype(np.int32), scores=m[:, 2].copy())
                n += 1
    return n


def read_points3d(path: Path) -> np.ndarray:
    """(P, 3) or (P, 6) float64 array of kapture's points3d.txt."""
    rows = [fields for _, fields in iter_rows(path)]
    if not rows:
        return np.zeros((0, 6))
    widths = {len(r) for r in rows}
    if widths - {3, 6} or len(widths) != 1:
        raise FormatError("points3d rows must all have 3 (X, Y, Z) or 6 (X, Y, Z, R, G, B) columns", path)
    try:
        return np.array(rows, dtype=np.float64)
    except ValueError:
        raise FormatError("points3d has a value that is not a number", path) from None


def read_observations(obs_path: Path, n_points: int) -> dict[str, dict[int, list[tuple[str, int]]]]:
    """observations.txt, validated: keypoints type -> point id -> its (image, feature id)
    observations (none when the file is absent)."""
    tracks: dict[str, dict[int, list[tuple[str, int]]]] = {}
    if obs_path.exists():
        for lineno, fields in iter_rows(obs_path):
            if len(fields) < 4 or len(fields) % 2:
                raise FormatError("expected point3d_id, keypoints_type, then (image_path, feature_id) pairs",
                                  obs_path, lineno)
            try:
                pid = int(fields[0])
                obs = [(fields[i], int(fields[i + 1])) for i in range(2, len(fields), 2)]
            except ValueError:
                raise FormatError("point3d_id and feature_id must be integers", obs_path, lineno) from None
            if not 0 <= pid < n_points:
                raise FormatError(f"point3d_id {pid} out of range (points3d has {n_points})", obs_path, lineno)
            if any(not 0 <= k <= np.iinfo(np.int32).max for _, k in obs):
                raise FormatError("feature_id must be from 0 to 2^31-1", obs_path, lineno)
            for image, _ in obs:
                problem = check_relative_name(image)
                if problem:
                    raise FormatError(problem, obs_path, lineno)
            if fields[1]:  # it names the map store written for this type (cbir/map/<type>.h5)
                try:
                    check_store_name(fields[1])
                except CbirError as e:
                    raise FormatError(f"keypoints type: {e.message}", obs_path, lineno) from None
            per_type = tracks.setdefault(fields[1], {})
            if pid in per_type:
                raise FormatError(f"point {pid} has two lines for keypoints type {fields[1]!r}", obs_path, lineno)
            per_type[pid] = obs
    return tracks


def read_points(kapture_root: Path) -> dict[str, PointMap]:
    """points3d.txt + observations.txt, validated: one map per keypoints type ('' when there
    is no observation), to be written as cbir/map/<type>.h5."""
    rec = kapture_root / RECONSTRUCTION
    pts = read_points3d(rec / "points3d.txt")
    if pts.shape[1] == 6:
        rgb = pts[:, 3:]
        if np.any(rgb != np.round(rgb)) or np.any((rgb < 0) | (rgb > 255)):
            raise FormatError("colours must be integers in [0, 255]", rec / "points3d.txt")
        colors = rgb.astype(np.uint8)
    else:
        colors = np.zeros((len(pts), 3), np.uint8)
    obs_path = rec / "observations.txt"
    tracks = read_observations(obs_path, len(pts))
    maps = {}
    for kp_type, per_point in (tracks or {"": {}}).items():
        images = sorted({im for obs in per_point.values() for im, _ in obs})
        index = {im: i for i, im in enumerate(images)}
        lengths = np.array([len(per_point.get(p, ())) for p in range(len(pts))], np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = [o for p in range(len(pts)) for o in per_point.get(p, ())]
        m = PointMap(images=images, points=pts[:, :3].copy(), colors=colors,
                     errors=np.full(len(pts), np.nan, np.float32), track_offsets=offsets,
                     track_images=np.array([index[im] for im, _ in flat], np.int32),
                     track_keypoints=np.array([k for _, k in flat], np.int32),
                     local_features=kp_type, config={"source": "kapture", "has_colors": pts.shape[1] == 6})
        problem = m.validate()
        if problem:
            raise FormatError(problem, obs_path)
        maps[kp_type] = m
    return maps


def write_points(maps: dict[str, PointMap], out_dir: Path, *, overwrite: bool = False) -> list[Path]:
    """The maps of :func:`read_points`, as cbir/map/<type>.h5 (``points.h5`` for no type)."""
    written = []
    for kp_type, m in maps.items():
        path = out_dir / f"{kp_type or 'points'}.h5"
        if path.exists() and not overwrite:
            raise CbirError("exists: use --overwrite to replace it", path)
        written.append(write_map(path, m))
    return written


# ================================================================================ export

def _config_text(header: str, fields: list[str], version: str = KAPTURE_VERSION) -> str:
    return f"# kapture format: {version}\n{header}\n{', '.join(fields)}\n"


def export_local_features(store_path: Path, kapture_root: Path) -> int:
    rec = kapture_root / RECONSTRUCTION
    with open_store(store_path, "local-features") as s:
        conf = s.config
        name = require_type_name(str(s.attrs.get("name", "")), "store name", store_path)
        kp_type = require_type_name(conf.get("keypoints_type", name), "keypoints_type", store_path)
        kdt = np.dtype(conf.get("keypoints_dtype", "float32"))
        d_dtype = s.dataset("descriptors").dtype
        d_dim = s.dataset("descriptors").shape[1]
        has_params = "keypoint_params" in s.columns
        kds = 2 + (s.dataset("keypoint_params").shape[1] if has_params else 0)
        metric = conf.get("metric_type", "L2")
        versions = conf.get("kapture_format", {})
        atomic_write_text(rec / "keypoints" / kp_type / "keypoints.txt",
                          _config_text(KEYPOINTS_HEADER, [kp_type, kdt.name, str(kds)],
                                       versions.get("keypoints", KAPTURE_VERSION)))
        atomic_write_text(rec / "descriptors" / name / "descriptors.txt",
                          _config_text(DESCRIPTORS_HEADER, [name, d_dtype.name, str(d_dim), kp_type, metric],
                                       versions.get("descriptors", KAPTURE_VERSION)))
        cols = ["keypoints", "descriptors"] + (["keypoint_params"] if has_params else [])
        for keys, batch, offs in s.iter_batches(256, cols):
            for i, image in enumerate(keys):
                a, b = offs[i], offs[i + 1]
                kps = batch["keypoints"][a:b]
                if has_params:
                    kps = np.concatenate([kps, batch["keypoint_params"][a:b]], axis=1)
                _write_raw(_feature_file(rec / "keypoints" / kp_type, str(image), ".kpt", store_path), kps.astype(kdt))
                _write_raw(_feature_file(rec / "descriptors" / name, str(image), ".desc", store_path),
                           batch["descriptors"][a:b])
        return len(s)


def export_global_features(store_path: Path, kapture_root: Path) -> int:
    gdir = kapture_root / RECONSTRUCTION / "global_features"
    with open_store(store_path, "global-features") as s:
        name = require_type_name(str(s.attrs.get("name", "")), "store name", store_path)
        ds = s.dataset("descriptors")
        atomic_write_text(gdir / name / "global_features.txt",
                          _config_text(GLOBAL_HEADER, [name, ds.dtype.name, str(ds.shape[1]),
                                                       s.config.get("metric_type", "L2")],
                                       s.config.get("kapture_format", {}).get("global_features", KAPTURE_VERSION)))
        for keys, batch, _ in s.iter_batches(4096, ["descriptors"]):
            for image, vec in zip(keys, batch["descriptors"], strict=True):
                _write_raw(_feature_file(gdir / name, str(image), ".gfeat", store_path), vec)
        return len(s)


def export_matches(store_path: Path, kapture_root: Path, *, inliers_only: bool = False) -> int:
    """kapture expects pairs with im0 < im1 (its own order); other pairs are swapped."""
    with open_store(store_path, "matches") as s:
        kp_type = require_type_name(str(s.attrs.get("local_features") or s.attrs.get("name", "")),
                                    "keypoints type", store_path)
        mdir = kapture_root / RECONSTRUCTION / "matches" / kp_type
        cols = ["matches"] + (["scores"] if "scores" in s.columns else []) + \
               (["inliers"] if inliers_only and "inliers" in s.columns else [])
        for keys, batch, offs in s.iter_batches(1024, cols):
            for i, (im0, im1) in enumerate(pair_keys(keys)):
                a, b = offs[i], offs[i + 1]
                idx = batch["matches"][a:b].astype(np.float64)
                sc = batch["scores"][a:b].astype(np.float64) if "scores" in batch else np.zeros(b - a)
                if "inliers" in batch:
                    keep = batch["inliers"][a:b]
                    idx, sc = idx[keep], sc[keep]
                if im1 < im0:
                    im0, im1, idx = im1, im0, idx[:, ::-1]
                pair_dir = _feature_file(mdir, im0, ".overlapping", store_path)
                _write_raw(_feature_file(pair_dir, im1, ".matches", store_path), np.column_stack([idx, sc]))
        return len(s)


def export_points(map_path: Path, kapture_root: Path) -> int:
    """Write points3d.txt and observations.txt (lossless: 18 significant digits)."""
    m = read_map(map_path)
    rec = kapture_root / RECONSTRUCTION
    has_colors = m.config.get("has_colors", True)
    table = np.column_stack([m.points, m.colors.astype(np.float64)]) if has_colors else m.points
    header = HEADER_VERSION[2:] + "\n" + (POINTS_HEADER if has_colors else POINTS_HEADER[:7])
    with atomic_output(rec / "points3d.txt") as tmp:
        np.savetxt(tmp, table, delimiter=",", header=header, fmt="%.18e")
    lines = [HEADER_VERSION, OBSERVATIONS_HEADER]
    kp_type = m.local_features
    for p in range(len(m)):
        imgs, kps = m.track(p)
        if len(imgs):
            lines.append(", ".join([str(p), kp_type] + [f"{m.images[i]}, {k}" for i, k in zip(imgs, kps, strict=True)]))
    atomic_write_text(rec / "observations.txt", "\n".join(lines) + "\n")
    return len(m)


def list_reconstruction(kapture_root: str | os.PathLike) -> dict[str, list[str]]:
    """Feature types present in a kapture dataset's reconstruction/ directory."""
    rec = Path(kapture_root) / RECONSTRUCTION
    out: dict[str, list[str]] = {}
    for kind, config in (("keypoints", "keypoints.txt"), ("descriptors", "descriptors.txt"),
                         ("global_features", "global_features.txt")):
        d = rec / kind
        out[kind] = sorted(p.name for p in d.iterdir() if (p / config).is_file()) if d.is_dir() else []
    d = rec / "matches"
    out["matches"] = sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
    out["points3d"] = ["points3d"] if (rec / "points3d.txt").is_file() else []
    return out

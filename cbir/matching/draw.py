"""Draw one pair's matches side by side (``cbir show matches``), with OpenCV."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import cv2
import numpy as np

from ..errors import CbirError
from ..io.atomic import atomic_output
from ..io.dataset import Dataset
from ..io.images import read_image
from ..io.store import Store, check_match_indices, open_store

INLIER = (40, 200, 40)  # BGR
OUTLIER = (40, 40, 220)
UNVERIFIED = (220, 160, 40)
#: lines drawn at most by default: more hide the images
DEFAULT_MAX_LINES = 500


def _only_store(dataset: Dataset, kind: str) -> str:
    stores = dataset.list_stores()[kind]
    if len(stores) != 1:
        found = ", ".join(p.stem for p in stores) or "none"
        raise CbirError(f"name the {kind} store to use (found: {found})", dataset.root)
    return stores[0].stem


def draw_pair_matches(query: Dataset, map_: Dataset, pair: tuple[str, str], out: Path, *,
                      matches_name: str | None = None, inliers_only: bool = False,
                      max_edge: int = 1200, max_lines: int = DEFAULT_MAX_LINES, seed: int = 0) -> dict[str, int]:
    """Write a PNG of ``pair``'s matches; returns the counts (``drawn``: the lines drawn).

    At most ``max_lines`` matches are drawn (0: all), a uniform sample (``seed``) of those
    to draw, so that dense matches do not hide the images; the label gives the counts."""
    name = matches_name or _only_store(query, "matches")
    canvas, stats = render_pair_matches(query, map_, pair, name, inliers_only=inliers_only, max_edge=max_edge,
                                        max_lines=max_lines, seed=seed)
    ok, png = cv2.imencode(".png", canvas)
    if not ok:
        raise CbirError("cannot encode the picture", out)
    with atomic_output(out) as tmp:
        Path(tmp).write_bytes(png.tobytes())
    return stats


def render_pair_matches(query: Dataset, map_: Dataset, pair: tuple[str, str], matches_name: str, *,
                        inliers_only: bool = False, max_edge: int = 1200, max_lines: int = DEFAULT_MAX_LINES,
                        seed: int = 0, label: bool = True) -> tuple[np.ndarray, dict[str, int]]:
    """The two images side by side (BGR, each at most ``max_edge`` px) with ``pair``'s
    matches drawn (see :func:`draw_pair_matches`), and the counts."""
    with PairDrawer(query, map_, matches_name) as drawer:
        return drawer.render(pair, inliers_only=inliers_only, max_edge=max_edge, max_lines=max_lines, seed=seed,
                             label=label)


class PairDrawer:
    """The stores pairs of a matches store are drawn from, opened once: the matches store
    and the local features it was made on, in each dataset as a pair needs them (a report
    draws one pair per query)."""

    def __init__(self, query: Dataset, map_: Dataset, matches_name: str):
        self.query, self.map = query, map_
        self._stack = ExitStack()
        self.store = self._stack.enter_context(open_store(query.store_path("matches", matches_name), "matches"))
        local = self.store.attrs.get("local_features") or self.store.config.get("local_features")
        if not isinstance(local, str) or not local:
            self._stack.close()
            raise CbirError("the matches store does not say which local features it was made on", self.store.path)
        self.local = local
        self._features: dict[Path, Store] = {}

    def __enter__(self) -> PairDrawer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _keypoints(self, dataset: Dataset, image: str) -> np.ndarray:
        if dataset.root not in self._features:
            self._features[dataset.root] = self._stack.enter_context(
                open_store(dataset.store_path("local", self.local), "local-features"))
        s = self._features[dataset.root]
        if image not in s:
            raise CbirError(f"image {image!r} has no features", s.path)
        return s.get(image, ["keypoints"])["keypoints"]

    def render(self, pair: tuple[str, str], *, inliers_only: bool = False, max_edge: int = 1200,
               max_lines: int = DEFAULT_MAX_LINES, seed: int = 0,
               label: bool = True) -> tuple[np.ndarray, dict[str, int]]:
        """See :func:`render_pair_matches`."""
        store, query = self.store, self.query
        key: tuple[str, str] = (pair[0], pair[1])
        swapped = False
        if key not in store and key[::-1] in store:
            key, swapped = (key[1], key[0]), True
        if key not in store:
            raise CbirError(f"pair {pair[0]!r} {pair[1]!r} is not in the matches store", store.path)
        item = store.get(key)
        second = self.map if not swapped else query
        kps = [self._keypoints(query, pair[0]), self._keypoints(second, pair[1])]
        matches = item["matches"][:, ::-1] if swapped else item["matches"]
        inliers = item.get("inliers")
        check_match_indices(matches, (len(kps[0]), len(kps[1])), store.path, (pair[0], pair[1]))
        images = [read_image(query.image_path(pair[0])), read_image(second.image_path(pair[1]))]
        scales = [min(1.0, max_edge / max(im.size)) for im in images]
        tiles = [cv2.resize(cv2.cvtColor(im.array, cv2.COLOR_RGB2BGR), None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
                 for im, s in zip(images, scales, strict=True)]
        h = max(t.shape[0] for t in tiles)
        canvas = np.zeros((h, tiles[0].shape[1] + tiles[1].shape[1], 3), np.uint8)
        canvas[:tiles[0].shape[0], :tiles[0].shape[1]] = tiles[0]
        canvas[:tiles[1].shape[0], tiles[0].shape[1]:] = tiles[1]
        p0 = (kps[0][matches[:, 0]] + 0.5) * scales[0] - 0.5
        p1 = (kps[1][matches[:, 1]] + 0.5) * scales[1] - 0.5
        p1[:, 0] += tiles[0].shape[1]
        keep = np.flatnonzero(inliers if (inliers_only and inliers is not None) else np.ones(len(matches), bool))
        if max_lines and len(keep) > max_lines:
            keep = np.sort(np.random.default_rng(seed).choice(keep, max_lines, replace=False))
        radius = 2 if max_edge >= 600 else 1
        for i in keep:
            color = UNVERIFIED if inliers is None else (INLIER if inliers[i] else OUTLIER)
            a = tuple(int(round(v)) for v in p0[i])
            b = tuple(int(round(v)) for v in p1[i])
            cv2.line(canvas, a, b, color, 1, cv2.LINE_AA)
            cv2.circle(canvas, a, radius, color, -1, cv2.LINE_AA)
            cv2.circle(canvas, b, radius, color, -1, cv2.LINE_AA)
        n_in = int(inliers.sum()) if inliers is not None else 0
        if label:
            text = f"{len(matches)} matches" + (f", {n_in} inliers" if inliers is not None else "") + \
                (f" ({len(keep)} drawn)" if len(keep) < len(matches) else "")
            cv2.putText(canvas, text, (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (255, 255, 255), 2, cv2.LINE_AA)
        return canvas, {"matches": len(matches), "inliers": n_in, "drawn": len(keep)}

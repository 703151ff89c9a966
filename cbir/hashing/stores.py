"""Code stores from global stores: what ``cbir hash encode`` and the pipeline's ``[retrieve]
hash`` write (formats/SPEC.md 7a)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CbirError
from ..io.dataset import Dataset
from .model import HashModel, code_bytes, code_store_config

#: keys of a global store's config that name files rather than say what the descriptors are
#: (DenseVLAD's vocabulary: learned on the map, read from its file for the queries)
_FILE_KEYS = ("learn", "model")


def float_descriptors(path: Path) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """Names, descriptors (N x D) and config of the global store at ``path``, which must hold
    float descriptors (hash functions are learned from and applied to them)."""
    from ..io.store import open_store

    with open_store(path, "global-features") as s:
        names = [str(k) for k in s.keys]
        x = np.asarray(s.read_all("descriptors"))
        config = dict(s.config)
    if not names:
        raise CbirError("the store holds no descriptor", path)
    if (config.get("metric_type") or "L2") != "L2":
        raise CbirError(f"descriptors compared by {config['metric_type']} distance: hash functions are learned from "
                        "and applied to float descriptors", path)
    return names, x, config


def code_store_name(global_name: str, model: HashModel) -> str:
    return f"{global_name}-{model.method}{model.bits}"


def write_code_store(dataset: Dataset, global_name: str, model: HashModel, model_path: Path, name: str | None = None,
                     *, overwrite: bool = False) -> Path:
    """Encode ``dataset``'s global store ``global_name`` with ``model`` into a code store
    (default name :func:`code_store_name`); images already there are kept (a resumed run).
    The model must have been trained on descriptors of the same configuration."""
    from ..io.store import StoreWriter

    source_path = dataset.store_path("global", global_name)
    names, x, config = float_descriptors(source_path)
    source = model.extra.get("source", {}).get("config")
    if source is not None and _described(source) != _described(config):
        raise CbirError(f"the model was trained on descriptors of another configuration ({source.get('extractor')}) "
                        f"than {global_name}'s ({config.get('extractor')})", model_path)
    codes = model.encode(x, names, source_path)
    out = dataset.store_path("global", name or code_store_name(global_name, model))
    attrs = {"name": out.stem, "config": {**code_store_config(model.bits, model.identity()), "source": config},
             "descriptor_dim": code_bytes(model.bits), "descriptor_dtype": "uint8"}
    with StoreWriter(out, "global-features", attrs, overwrite=overwrite) as w:
        for n, code in zip(names, codes, strict=True):
            if n not in w:
                w.add(n, descriptors=code)
    return out


def _described(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _FILE_KEYS}

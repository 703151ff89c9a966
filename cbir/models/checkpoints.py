"""Loading published checkpoints that are full pickles, without executing them.

Some official checkpoints (naver/deep-image-retrieval's ``.pt``) pickle more than
tensors: their whitening is a scikit-learn ``PCA`` object. ``torch.load`` with
``weights_only=True`` refuses them and ``weights_only=False`` would run whatever the
pickle names. This loader allows only the tensor, numpy and container constructors a
checkpoint needs and turns every other class into an inert record of its pickled state
(``PickledObject``), so a PCA's ``mean_``, ``components_``, ``explained_variance_`` and
``whiten`` are read as plain attributes and no third-party code is imported or run.
"""

from __future__ import annotations

import pickle
import types
from pathlib import Path
from typing import Any

import torch

from ..errors import CbirError

_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch", "Size"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("_codecs", "encode"),  # numpy arrays pickled with protocol 2 carry their bytes through it
}


class PickledObject:
    """The state of a pickled object of a class that is not imported."""

    _module = ""
    _name = ""

    def __init__(self, *args: Any, **kwargs: Any):
        self._args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = {**state[0], **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"<pickled {self._module}.{self._name}>"


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        return type(name, (PickledObject,), {"_module": module, "_name": name})


_safe_pickle = types.SimpleNamespace(Unpickler=_Unpickler, load=pickle.load, __name__="cbir_safe_pickle")


def load_pickled_checkpoint(path: Path, source: str) -> dict[str, Any]:
    """A checkpoint dict, its foreign classes replaced by :class:`PickledObject` records."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_safe_pickle)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, AttributeError, TypeError) as e:
        raise CbirError(f"not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"the official file is published at {source}", path) from None
    if not isinstance(ckpt, dict):
        raise CbirError(f"not a checkpoint dictionary (got {type(ckpt).__name__})", path)
    return ckpt


def load_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A checkpoint that is a plain state dict (tensors by name), read without executing
    anything (``weights_only``): anything else is a one-line error naming ``what`` it should
    be (``an official ALIKED checkpoint``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"a {type(state).__name__}, not a state dict")
    except (RuntimeError, TypeError, EOFError, OSError, pickle.UnpicklingError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise CbirError(f"not {what} ({type(e).__name__}: {first})", path) from None
    return state


def load_into(net: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path) -> None:
    """``state`` loaded into ``net`` strictly; a mismatch is a one-line error (``what``: the
    network's name)."""
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CbirError(f"weights do not fit {what}: {str(e).splitlines()[0]}", path) from None

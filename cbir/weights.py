"""Convert official weight files that PyTorch cannot read into the files cbir loads
(``cbir weights convert MODEL SRC DST``).

DELG is published as a TensorFlow 2 SavedModel (and trained as TF checkpoints): its
variables are read here with TensorFlow, which is needed for this step only
(``pip install 'cbir[convert]'``) and never imported at extraction time. A ``.npz`` of
the variables by their official names is accepted too, without TensorFlow; its optional
``__source__`` string says where the values come from (kept in the converted file and
printed at extraction, e.g. for generated test weights).
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CbirError

_TF_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"


def _checkpoint_prefix(src: Path, tf: Any) -> Path:
    """The checkpoint prefix of a SavedModel directory, a checkpoint directory, or a prefix."""
    if (src / "variables" / "variables.index").is_file():  # SavedModel
        return src / "variables" / "variables"
    if src.is_dir():
        latest = tf.train.latest_checkpoint(str(src))
        if latest is None:
            raise CbirError("neither a SavedModel (no variables/variables.index) nor a checkpoint directory "
                            "(no 'checkpoint' file)", src)
        return Path(latest)
    if src.suffix == ".index" or src.name.split(".")[-1].startswith("data-"):
        return src.with_name(src.name.rsplit(".", 1)[0])
    if Path(f"{src}.index").is_file():
        return src
    raise CbirError("not a SavedModel directory, a checkpoint directory, a checkpoint prefix or an .npz", src)


def read_tf_variables(src: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every model variable of a TensorFlow 2 SavedModel or object-based checkpoint, by its
    object path (``_model/backbone/conv1/kernel``); optimizer slots are left out."""
    src = Path(src)
    try:
        import tensorflow as tf  # only here: conversion is the one step that needs TensorFlow
    except ImportError:
        raise CbirError("reading a TensorFlow checkpoint needs TensorFlow: pip install 'cbir[convert]' "
                        "(or pass an .npz of the variables)", src) from None
    prefix = _checkpoint_prefix(src, tf)
    try:
        reader = tf.train.load_checkpoint(str(prefix))
        names = reader.get_variable_to_shape_map()
    except Exception as e:  # TF raises its own error types for corrupt or truncated files
        raise CbirError(f"cannot read the TensorFlow checkpoint: {str(e).splitlines()[0]}", prefix) from None
    named = _named_paths(reader, prefix) if _OBJECT_GRAPH in names else {}
    out = {}
    for key in names:
        if ".OPTIMIZER_SLOT" in key or key.startswith(_OBJECT_GRAPH) or "save_counter" in key:
            continue
        out[named.get(key, key.removesuffix(_TF_SUFFIX))] = np.asarray(reader.get_tensor(key))
    return out


def _named_paths(reader: Any, prefix: Path) -> dict[str, str]:
    """Checkpoint key -> the variable's path through named attributes of the saved objects.

    A Keras model saved with TensorFlow 2 (the official DELG export) keys its variables by
    the first path the saver found, often through a list Keras keeps of every variable
    (``_model/variables/17``), which says nothing of the layer. The checkpoint's object
    graph holds every path: walked breadth first through named attributes only (never
    Keras's lists), each variable gets the path of its layer
    (``_model/backbone/l2a/conv2a/kernel``). Variables reached only through lists keep
    their key."""
    try:
        from tensorflow.core.protobuf import trackable_object_graph_pb2

        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH))
    except Exception as e:  # a corrupt graph: TensorFlow's own error types
        raise CbirError(f"cannot read the checkpoint's object graph: {str(e).splitlines()[0]}", prefix) from None
    paths: dict[str, str] = {}
    seen, queue = {0}, deque([(0, "")])
    while queue:
        node_id, path = queue.popleft()
        node = graph.nodes[node_id]
        for attribute in node.attributes:
            if attribute.name == "VARIABLE_VALUE":
                paths.setdefault(attribute.checkpoint_key, path)
        for child in node.children:
            if child.node_id not in seen and not _is_list_edge(child.local_name):
                seen.add(child.node_id)
                queue.append((child.node_id, f"{path}/{child.local_name}" if path else child.local_name))
    return paths


#: the attributes through which Keras lists variables and layers a second time
_LIST_EDGES = {"variables", "trainable_variables", "non_trainable_variables", "keras_api", "_variables",
               "weights", "trainable_weights", "non_trainable_weights", "layers", "_self_tracked_trackables"}


def _is_list_edge(name: str) -> bool:
    return name in _LIST_EDGES or name.isdigit() or name.startswith(("layer-", "layer_with_weights-"))


def read_variables(src: str | os.PathLike) -> tuple[dict[str, np.ndarray], str | None]:
    """Variables by official name from an ``.npz`` or from TensorFlow files, and the
    ``.npz``'s ``__source__`` note if any."""
    src = Path(src)
    if src.suffix == ".npz":
        try:
            with np.load(src, allow_pickle=False) as data:
                variables = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise CbirError(f"cannot read the .npz: {e}", src) from None
        note = variables.pop("__source__", None)
        return variables, (str(note) if note is not None else None)
    return read_tf_variables(src), None


def convert_delg(src: str | os.PathLike, dst: str | os.PathLike, *, gem_power: float = 3.0,
                 block3_strides: bool = True) -> dict[str, Any]:
    """The official DELG SavedModel/checkpoint (or .npz) ``src`` -> a cbir DELG file ``dst``."""
    from .models import delg

    raw, note = read_variables(src)
    variables = delg.split_model_variables(raw)
    config = delg.config_from_official(variables, gem_power=gem_power, block3_strides=block3_strides)
    net = delg.DelgNet(**config)
    state = delg.state_dict_from_official(variables, net)
    source = note or f"converted from {Path(src).name} ({len(variables)} official DELG variables)"
    delg.save_weights(dst, state, config, source)
    return {"model": "delg", "source": str(src), "output": str(dst), "config": config,
            "tensors": len(variables), "parameters": int(sum(v.numel() for v in state.values()))}


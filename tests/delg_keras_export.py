"""Run as a script (TensorFlow 2 with tf-keras, ``TF_USE_LEGACY_KERAS=1``): build DELG with
the official training code's Keras layer structure (``delf/python/training/model``:
``resnet50.py``, ``delf_model.py``, ``delg_model.py``; written here, not copied), load the
generated weights of an ``.npz`` into it, and save it the way the official
``export_local_and_global_model.py`` does: a ``tf.Module`` holding the model as ``_model``,
with a traced extraction function, through ``tf.saved_model.save``.

Usage: python tests/delg_keras_export.py VARS.npz SAVED_MODEL_DIR [--tf1]

Keras 2 keys most variables of such a SavedModel by position (``_model/variables/17``):
the converter must find their layers through the checkpoint's object graph. With
``--tf1`` the same model is built in a TensorFlow 1 graph and saved with TensorFlow 1's
SavedModel builder: its variables are then named by the Keras layer names
(``backbone/<block>/res2a_branch2a/kernel``), as a TF1-style export names them.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

layers = tf.keras.layers
STAGES = (("l2", 3, 64), ("l3", 4, 128), ("l4", 6, 256), ("l5", 3, 512))


class Block(tf.keras.Model):
    """A bottleneck block as the official _ConvBlock (with shortcut) / _IdentityBlock: the
    attribute names are what the checkpoint's object graph records."""

    def __init__(self, filters: int, stage: str, block: str, strides: int, shortcut: bool):
        super().__init__(name="")
        base = f"res{stage[1:]}{block}_branch"
        bn_base = f"bn{stage[1:]}{block}_branch"
        self.conv2a = layers.Conv2D(filters, 1, strides=strides, name=base + "2a")
        self.bn2a = layers.BatchNormalization(axis=3, name=bn_base + "2a")
        self.conv2b = layers.Conv2D(filters, 3, padding="same", name=base + "2b")
        self.bn2b = layers.BatchNormalization(axis=3, name=bn_base + "2b")
        self.conv2c = layers.Conv2D(4 * filters, 1, name=base + "2c")
        self.bn2c = layers.BatchNormalization(axis=3, name=bn_base + "2c")
        self.shortcut = shortcut
        if shortcut:
            self.conv_shortcut = layers.Conv2D(4 * filters, 1, strides=strides, name=base + "1")
            self.bn_shortcut = layers.BatchNormalization(axis=3, name=bn_base + "1")

    def call(self, x, training=False):
        y = tf.nn.relu(self.bn2a(self.conv2a(x), training=training))
        y = tf.nn.relu(self.bn2b(self.conv2b(y), training=training))
        y = self.bn2c(self.conv2c(y), training=training)
        s = self.bn_shortcut(self.conv_shortcut(x), training=training) if self.shortcut else x
        return tf.nn.relu(y + s)


class Backbone(tf.keras.Model):
    def __init__(self, embedding_dim: int):
        super().__init__(name="backbone")
        self.conv1 = layers.Conv2D(64, 7, strides=2, padding="same", name="conv1")
        self.bn_conv1 = layers.BatchNormalization(axis=3, name="bn_conv1")
        self.max_pool = layers.MaxPooling2D(3, strides=2)
        for stage, blocks, filters in STAGES:
            for b in range(blocks):
                strides = 2 if b == 0 and stage in ("l3", "l4") else 1  # block3 strides: l5a is not strided
                setattr(self, f"{stage}{'abcdef'[b]}", Block(filters, stage, "abcdef"[b], strides, b == 0))
        self.subsampling_layer = layers.MaxPooling2D(1, strides=2)
        self.embedding_layer = layers.Dense(embedding_dim, name="embedding_layer")

    def call(self, x, training=False):
        x = self.max_pool(tf.nn.relu(self.bn_conv1(self.conv1(x), training=training)))
        blocks = {}
        for stage, count, _ in STAGES:
            if stage == "l5":
                x = self.subsampling_layer(x)
            for b in range(count):
                x = getattr(self, f"{stage}{'abcdef'[b]}")(x, training=training)
            blocks[stage] = x
        pooled = tf.reduce_mean(tf.maximum(x, 1e-6) ** 3.0, [1, 2]) ** (1 / 3)
        return self.embedding_layer(pooled), blocks["l4"]


class Attention(tf.keras.Model):
    def __init__(self):
        super().__init__(name="attention")
        self.conv1 = layers.Conv2D(512, 1, padding="same", name="attn_conv1")
        self.bn_conv1 = layers.BatchNormalization(axis=3, name="bn_conv1")
        self.conv2 = layers.Conv2D(1, 1, padding="same", name="attn_conv2")

    def call(self, x, training=False):
        return tf.nn.softplus(self.conv2(tf.nn.relu(self.bn_conv1(self.conv1(x), training=training))))


class Autoencoder(tf.keras.Model):
    def __init__(self, reduced: int):
        super().__init__(name="autoencoder")
        self.conv1 = layers.Conv2D(reduced, 1, padding="same", name="autoenc_conv1")
        self.conv2 = layers.Conv2D(1024, 1, padding="same", activation="relu", name="autoenc_conv2")

    def call(self, x):
        reduced = self.conv1(x)
        return self.conv2(reduced), reduced


class Delg(tf.keras.Model):
    def __init__(self, embedding_dim: int, reduced: int):
        super().__init__(name="DELG")
        self.backbone = Backbone(embedding_dim)
        self.attention = Attention()
        self.autoencoder = Autoencoder(reduced)

    def build_call(self, images, training=False):
        global_descriptor, block3 = self.backbone(images, training=training)
        expanded, reduced = self.autoencoder(block3)
        return global_descriptor, self.attention(expanded, training=training), reduced


class ExtractModule(tf.Module):
    """As the official export's module: the model under ``_model``, one traced function."""

    def __init__(self, model: Delg):
        self._model = model

    @tf.function(input_signature=[tf.TensorSpec(shape=[None, None, 3], dtype=tf.uint8, name="input_image")])
    def ExtractFeatures(self, input_image):  # noqa: N802 - the official function's name
        image = tf.cast(input_image, tf.float32)[None] / 255.0
        global_descriptor, attention, features = self._model.build_call(image, training=False)
        return {"global_descriptors": global_descriptor, "scores": attention, "features": features}


def _assign(model: Delg, variables: dict[str, np.ndarray]) -> list:
    """The model's variable of each official name, assigned (eager) or to assign (graph)."""
    ops = []
    for name, value in variables.items():
        *path, leaf = name.split("/")
        layer = model
        for part in path:
            layer = getattr(layer, part)
        ops.append(getattr(layer, leaf).assign(value))
    assert len(ops) == len(model.variables), (len(ops), len(model.variables))
    return ops


def main(npz: str, out: str, tf1: bool = False) -> None:
    data = np.load(npz)
    variables = {k.split("/", 1)[1]: data[k] for k in data.files if not k.startswith("__")}
    dims = variables["backbone/embedding_layer/kernel"].shape[1], variables["autoencoder/conv1/kernel"].shape[3]
    if tf1:
        tf.compat.v1.disable_eager_execution()
        with tf.Graph().as_default():
            model = Delg(*dims)
            model.build_call(tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name="input_image"))
            with tf.compat.v1.Session() as session:
                session.run(_assign(model, variables))
                builder = tf.compat.v1.saved_model.Builder(out)
                builder.add_meta_graph_and_variables(session, [tf.compat.v1.saved_model.tag_constants.SERVING])
                builder.save()
        print(f"{len(variables)} variables, named by layer")
        return
    model = Delg(*dims)
    model.build_call(tf.zeros([1, 64, 64, 3]))  # creates every variable
    _assign(model, variables)
    tf.saved_model.save(ExtractModule(model), out)
    keys = tf.train.load_checkpoint(f"{out}/variables/variables").get_variable_to_shape_map()
    positional = sum("/variables/" in k for k in keys)
    print(f"{len(model.variables)} variables, {positional} keyed by position")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--tf1" in sys.argv[3:])

"""The matcher interface: what ``cbir match``, the pipeline and the Ray executor call.

As extractors, a matcher is configuration as data: a ``name``, a ``default_conf`` the user's
options are merged over (unknown keys refused), and the part of it that determines the
result (:meth:`Matcher.identity`), recorded in the matches store so that a re-run with
another configuration is refused instead of mixing matches. It declares the columns of the
local-feature stores it reads (:attr:`Matcher.columns`); the keypoints are always read (the
verification and the stores need them).

The matching step (:mod:`cbir.matching.match`) reads each image's columns once, hands them
to :meth:`Matcher.prepare` (on the matching device; cached across the pairs that share the
image), then matches chunks of pairs through a :class:`PairBatch`: on a GPU a batch queues
every pair's kernels and copies the results back once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch

from ..errors import CbirError
from ..validate import merged_conf

if TYPE_CHECKING:
    from ..io.store import Store

#: copies a host array to the matching device (:class:`cbir.devices.Uploader`)
Upload = Callable[[np.ndarray], torch.Tensor]


class PairBatch(Protocol):
    """Pairs matched together: ``add`` each pair's prepared features, ``finish`` after the
    last (queue the copy back of a device's results), ``results`` in the order added."""

    def add(self, features0: Any, features1: Any) -> None: ...

    def finish(self) -> None: ...

    def results(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per pair, ``matches`` (M x 2 int32: index in the first image, in the second) and
        ``scores`` (M float32, larger is better)."""
        ...


class Matcher:
    """A matcher of local features. Subclasses set ``name``, ``default_conf`` and ``columns``
    and implement :meth:`prepare` and :meth:`batch`."""

    name: ClassVar[str]
    default_conf: ClassVar[dict[str, Any]] = {}
    #: store columns it reads besides ``keypoints`` (``image_sizes`` is passed when stored);
    #: a matcher may set its own in :meth:`check_features`, by the features it is given
    columns: tuple[str, ...] = ("descriptors",)
    #: options that change the speed, not the matches: not recorded, not compared on re-runs
    runtime_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, conf: dict[str, Any] | None = None):
        self.conf = merged_conf(f"the {self.name} matcher", self.default_conf, conf)

    def identity(self) -> dict[str, Any]:
        """What the matches store records as its ``matcher`` configuration: the name and the
        options that determine the matches."""
        return {"name": self.name, **{k: v for k, v in self.conf.items() if k not in self.runtime_keys}}

    #: the descriptors' metric it compares (:func:`metric_type`): features of another are refused
    metric: ClassVar[str] = "L2"

    def check_features(self, store: Store) -> None:
        """Refuse, in one line, features this matcher cannot match: by default those whose
        descriptors are compared by another metric than :attr:`metric`."""
        found = metric_type(store.config)
        if found.lower() != self.metric.lower():
            raise CbirError(f"descriptors compared by {found} distance: the {self.name} matcher matches "
                            f"{self.metric} descriptors only (choose a matcher for them with --matcher)", store.path)

    def prepare(self, features: dict[str, np.ndarray], upload: Upload) -> Any:
        """One image's features (its :attr:`columns`, ``keypoints``, ``image_sizes`` when
        stored) made ready for :meth:`batch`, on the device ``upload`` copies to."""
        raise NotImplementedError

    def batch(self) -> PairBatch:
        """A new, empty batch of pairs."""
        raise NotImplementedError


def metric_type(features_config: dict[str, Any]) -> str:
    """The metric a local-feature store's descriptors are compared by: its configuration's
    ``metric_type`` (kapture's name; binary descriptors: ``Hamming``), L2 when absent."""
    return str(features_config.get("metric_type") or "L2")


def load_matcher(name: str, conf: dict[str, Any] | None = None) -> Matcher:
    """The installed matcher ``name`` (or ``module:Class``) built with ``conf``."""
    from .. import plugins

    cls = plugins.load("matcher", name)
    if not (isinstance(cls, type) and issubclass(cls, Matcher) and isinstance(getattr(cls, "name", None), str)):
        raise CbirError(f"the matcher {name!r} is {cls!r}, not a subclass of cbir.matching.base.Matcher with a name")
    return cls(conf)

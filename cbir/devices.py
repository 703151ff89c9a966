"""What the hot paths share to run well on a CUDA device (and unchanged on the CPU).

* :func:`to_device`: a host array to the device from pinned memory, without blocking the
  host; :class:`Uploader` does it on a copy stream of its own, so that the next item's
  transfer overlaps the kernels of this one;
* :func:`exact_float32`: float32 products computed in float32 (not TF32) whatever the
  process-wide settings, since the results must equal the CPU path's;
* :func:`memory_budget`: how many bytes a step may keep resident on the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from .cores import default_workers as default_workers  # sized in cbir.cores, re-exported


def to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host array on ``device``; to a GPU from pinned memory, queued on the current stream
    without blocking the host."""
    host = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return host.to(device)
    return (host if host.is_pinned() else host.pin_memory()).to(device, non_blocking=True)


class Uploader:
    """Copies host arrays to ``device``. On CUDA the copy runs on its own stream from pinned
    memory (non-blocking); the compute stream waits for it on the device, not the host."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        if self._stream is None:
            return to_device(array, self.device)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            out = to_device(array, self.device)
        compute.wait_stream(self._stream)
        out.record_stream(compute)  # its memory is not reused before the compute stream is done with it
        return out


@contextmanager
def exact_float32() -> Iterator[None]:
    """float32 matrix products in full float32 precision (TF32 off, no reduced-precision
    reductions) for the duration; the previous settings are restored after."""
    m = torch.backends.cuda.matmul
    saved = (m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
    m.allow_tf32 = False
    m.allow_fp16_reduced_precision_reduction = False
    m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_tf32, m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = saved


def memory_budget(device: torch.device, fraction: float = 0.5) -> int:
    """Bytes a step may keep resident: ``fraction`` of the device's free memory (CUDA),
    0 elsewhere (the host keeps its own, smaller caches)."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * fraction)

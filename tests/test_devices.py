"""What the GPU paths share (cbir/devices.py), checked where no GPU is: the float32 guard
restores the process's settings, uploads keep the values, worker counts stay in range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbir.devices import Uploader, default_workers, exact_float32, memory_budget


def test_exact_float32_turns_tf32_off_and_restores_the_settings():
    m = torch.backends.cuda.matmul
    saved = (m.allow_tf32, m.allow_fp16_reduced_precision_reduction)
    m.allow_tf32, m.allow_fp16_reduced_precision_reduction = True, True
    try:
        with pytest.raises(RuntimeError):
            with exact_float32():
                assert not m.allow_tf32 and not m.allow_fp16_reduced_precision_reduction
                raise RuntimeError("an error inside")
        assert m.allow_tf32 and m.allow_fp16_reduced_precision_reduction  # restored, even after an error
    finally:
        m.allow_tf32, m.allow_fp16_reduced_precision_reduction = saved


def test_upload_keeps_values_and_dtype():
    a = np.random.default_rng(0).integers(0, 255, (7, 128)).astype(np.uint8)
    t = Uploader(torch.device("cpu"))(a)
    assert t.dtype == torch.uint8 and np.array_equal(t.numpy(), a)
    assert np.array_equal(Uploader(torch.device("cpu"))(a[:, ::2]).numpy(), a[:, ::2])  # strided input


def test_default_workers_and_budget():
    assert 1 <= default_workers() <= 16 and default_workers(limit=1) == 1
    assert memory_budget(torch.device("cpu")) == 0  # the host keeps its own caches

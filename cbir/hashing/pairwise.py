"""Supervised hashing by pairwise similarity (the deep hashing survey's "pairwise similarity
preserving" family), each as a hash layer learned on frozen descriptors: ``u = (x - mean) W + c``,
code ``sign(u)``. Two items are similar when they share a label, or, for a localization
dataset's images (``dpsh``, ``hashnet``), when their cameras are close (a pairs matrix).

- ``dpsh`` (Li, Wang and Kang, "Feature Learning based Deep Supervised Hashing with Pairwise
  Labels", IJCAI 2016): the likelihood of the pairs, ``theta_ij = u_i . u_j / 2``, loss
  ``log(1 + e^theta) - s_ij theta`` over the pairs, plus ``eta ||u - sign(u)||^2``.
- ``hashnet`` (Cao, Long, Wang and Yu, "HashNet: Deep Learning to Hash by Continuation",
  ICCV 2017): ``h = tanh(beta u)`` with ``beta`` raised along training (continuation,
  ``beta = (1 + gamma t)^0.5``), a weighted likelihood of ``alpha h_i . h_j`` where similar and
  dissimilar pairs weigh as the inverse of their share (the imbalance the paper corrects).
- ``dsdh`` (Li, Sun, He and Tan, "Deep Supervised Discrete Hashing", NeurIPS 2017): the
  pairwise likelihood of ``dpsh`` plus a linear classifier of the labels from the codes
  (``mu ||y - W_c^T u||^2 + nu ||W_c||^2``) and the quantization term. The paper's discrete
  cyclic coordinate descent of ``B`` is not run here: ``B = sign(u)``.

Training: Adam, mini-batches of ``batch_size`` items (their pairs within the batch), seeded;
the same seed gives the same model on one machine and thread count (float rounding differs
across them, so models trained elsewhere differ in the last bits; their metrics agree).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..validate import check_integer
from .base import Hasher


class _Pairwise(Hasher):
    supervised = True
    default_conf = {"epochs": 60, "batch_size": 256, "lr": 1e-2, "eta": 0.1}

    def _fit(self, x: np.ndarray, bits: int, labels: np.ndarray | None, seed: int,
             pairs: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        assert labels is not None  # Hasher.fit checked it
        check_integer(f"{self.name} epochs", self.conf["epochs"], 1)
        check_integer(f"{self.name} batch_size", self.conf["batch_size"], 2)
        mean = x.mean(0, dtype=np.float64)
        centred = x.astype(np.float64) - mean
        scale = float(np.sqrt((centred ** 2).sum(1).mean())) or 1.0  # unit RMS norm: the same steps for any data
        xs = torch.from_numpy((centred / scale).astype(np.float32))
        y = torch.from_numpy(labels.astype(np.float32))
        generator = torch.Generator().manual_seed(seed)
        layer = torch.nn.Linear(x.shape[1], bits)
        with torch.no_grad():
            layer.weight.normal_(0, 1 / np.sqrt(x.shape[1]), generator=generator)
            layer.bias.zero_()
        params = list(layer.parameters())
        classifier = None
        if self.name == "dsdh":
            classifier = torch.nn.Linear(bits, y.shape[1], bias=False)
            with torch.no_grad():
                classifier.weight.normal_(0, 1 / np.sqrt(bits), generator=generator)
            params += list(classifier.parameters())
        optimizer = torch.optim.Adam(params, lr=float(self.conf["lr"]))
        n, size, step = len(xs), int(self.conf["batch_size"]), 0
        losses = []
        for _ in range(int(self.conf["epochs"])):
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, size):
                batch = order[start:start + size]
                if len(batch) < 2:
                    continue
                u = layer(xs[batch])
                s = y[batch][:, batch] if pairs else (y[batch] @ y[batch].T > 0).float()
                loss = self._loss(u, s, y[batch], classifier, step)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
                step += 1
            losses.append(total / n)
        w = layer.weight.detach().double().numpy().T / scale
        c = layer.bias.detach().double().numpy()
        return mean, w, -c, {"final_loss": losses[-1], "first_loss": losses[0]}

    def _loss(self, u: torch.Tensor, s: torch.Tensor, y: torch.Tensor, classifier: torch.nn.Module | None,
              step: int) -> torch.Tensor:
        raise NotImplementedError


def _likelihood(theta: torch.Tensor, s: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The negative log-likelihood of pairs ``s`` under ``p(s=1) = sigmoid(theta)``, averaged."""
    nll = F.softplus(theta) - s * theta
    return (nll * weights).sum() / weights.sum() if weights is not None else nll.mean()


class DPSH(_Pairwise):
    name = "dpsh"

    def _loss(self, u: torch.Tensor, s: torch.Tensor, y: torch.Tensor, classifier: torch.nn.Module | None,
              step: int) -> torch.Tensor:
        quantization = (u - u.detach().sign()).pow(2).sum(1).mean()
        return _likelihood(0.5 * u @ u.T, s) + float(self.conf["eta"]) * quantization


class HashNet(_Pairwise):
    name = "hashnet"
    default_conf = {"epochs": 60, "batch_size": 256, "lr": 1e-2, "alpha": 0.1, "gamma": 0.005}

    def _loss(self, u: torch.Tensor, s: torch.Tensor, y: torch.Tensor, classifier: torch.nn.Module | None,
              step: int) -> torch.Tensor:
        beta = (1.0 + float(self.conf["gamma"]) * step) ** 0.5
        h = torch.tanh(beta * u)
        similar = s.sum().clamp(min=1)
        dissimilar = (1 - s).sum().clamp(min=1)
        weights = torch.where(s > 0, s.numel() / similar, s.numel() / dissimilar)
        return _likelihood(float(self.conf["alpha"]) * h @ h.T, s, weights)


class DSDH(_Pairwise):
    name = "dsdh"
    pairs_only = False
    default_conf = {"epochs": 60, "batch_size": 256, "lr": 1e-2, "eta": 0.1, "mu": 1.0, "nu": 1e-3}

    def _loss(self, u: torch.Tensor, s: torch.Tensor, y: torch.Tensor, classifier: torch.nn.Module | None,
              step: int) -> torch.Tensor:
        assert classifier is not None
        quantization = (u - u.detach().sign()).pow(2).sum(1).mean()
        classification = (y - classifier(u)).pow(2).sum(1).mean()
        decay = sum(p.pow(2).sum() for p in classifier.parameters())
        return (_likelihood(0.5 * u @ u.T, s) + float(self.conf["mu"]) * classification
                + float(self.conf["nu"]) * decay + float(self.conf["eta"]) * quantization)

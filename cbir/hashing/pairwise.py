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
- ``dsdh`` (Li, Sun, He and Tan, "Deep Supervised Discrete Hashing", NeurIPS 2017): binary
  codes ``B`` of the training items kept apart from the outputs ``u``, and the paper's
  alternation: the hash layer by the pairwise likelihood of ``dpsh`` plus ``eta ||B - u||^2``;
  then the linear classifier of the labels from the codes in closed form,
  ``W = (B^T B + nu/mu I)^-1 B^T Y``; then ``B`` by discrete cyclic coordinate descent of
  ``mu ||Y - B W||^2 + eta ||B - u||^2``, one bit at a time, ``dcc_iterations`` sweeps (each
  bit's exact minimiser given the others: ``sign(P_k - B_-k W_-k w_k)``, ``P = mu Y W^T + eta U``).

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
        mean, xs, scale, layer, generator = _hash_layer(x, bits, seed)
        y = torch.from_numpy(labels.astype(np.float32))
        optimizer = torch.optim.Adam(layer.parameters(), lr=float(self.conf["lr"]))
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
                loss = self._loss(u, s, step)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
                step += 1
            losses.append(total / n)
        return _layer_model(layer, mean, scale) + ({"final_loss": losses[-1], "first_loss": losses[0]},)

    def _loss(self, u: torch.Tensor, s: torch.Tensor, step: int) -> torch.Tensor:
        """The mini-batch loss of outputs ``u`` and similar pairs ``s`` at training step ``step``."""
        raise NotImplementedError


def _hash_layer(x: np.ndarray, bits: int, seed: int) -> tuple[np.ndarray, torch.Tensor, float, torch.nn.Linear,
                                                               torch.Generator]:
    """The descriptors' mean, the centred descriptors at unit RMS norm (the same steps for any
    data), that scale, a seeded linear layer to ``bits`` outputs, and the generator of the run."""
    mean = x.mean(0, dtype=np.float64)
    centred = x.astype(np.float64) - mean
    scale = float(np.sqrt((centred ** 2).sum(1).mean())) or 1.0
    xs = torch.from_numpy((centred / scale).astype(np.float32))
    generator = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], bits)
    with torch.no_grad():
        layer.weight.normal_(0, 1 / np.sqrt(x.shape[1]), generator=generator)
        layer.bias.zero_()
    return mean, xs, scale, layer, generator


def _layer_model(layer: torch.nn.Linear, mean: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mean``, ``projection`` and ``thresholds`` of the hash model the trained layer is."""
    w = layer.weight.detach().double().numpy().T / scale
    return mean, w, -layer.bias.detach().double().numpy()


def _likelihood(theta: torch.Tensor, s: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The negative log-likelihood of pairs ``s`` under ``p(s=1) = sigmoid(theta)``, averaged."""
    nll = F.softplus(theta) - s * theta
    return (nll * weights).sum() / weights.sum() if weights is not None else nll.mean()


class DPSH(_Pairwise):
    name = "dpsh"

    def _loss(self, u: torch.Tensor, s: torch.Tensor, step: int) -> torch.Tensor:
        return dpsh_loss(u, s, float(self.conf["eta"]))


def dpsh_loss(u: torch.Tensor, s: torch.Tensor, eta: float) -> torch.Tensor:
    """DPSH's loss of outputs ``u`` (N x B) and similar pairs ``s`` (N x N): the pairs'
    likelihood under ``theta = u_i . u_j / 2`` plus ``eta ||u - sign(u)||^2`` (also Region-DH's
    hashing loss, :mod:`cbir.hashing.region_dh`)."""
    quantization = (u - u.detach().sign()).pow(2).sum(1).mean()
    return _likelihood(0.5 * u @ u.T, s) + eta * quantization


class HashNet(_Pairwise):
    name = "hashnet"
    default_conf = {"epochs": 60, "batch_size": 256, "lr": 1e-2, "alpha": 0.1, "gamma": 0.005}

    def _loss(self, u: torch.Tensor, s: torch.Tensor, step: int) -> torch.Tensor:
        beta = (1.0 + float(self.conf["gamma"]) * step) ** 0.5
        h = torch.tanh(beta * u)
        similar = s.sum().clamp(min=1)
        dissimilar = (1 - s).sum().clamp(min=1)
        weights = torch.where(s > 0, s.numel() / similar, s.numel() / dissimilar)
        return _likelihood(float(self.conf["alpha"]) * h @ h.T, s, weights)


class DSDH(_Pairwise):
    name = "dsdh"
    pairs_only = False
    default_conf = {"epochs": 60, "batch_size": 256, "lr": 1e-2, "eta": 0.1, "mu": 1.0, "nu": 1e-3,
                    "dcc_iterations": 1}

    def _fit(self, x: np.ndarray, bits: int, labels: np.ndarray | None, seed: int,
             pairs: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        assert labels is not None and not pairs  # Hasher.fit checked it (pairs_only = False)
        check_integer("dsdh epochs", self.conf["epochs"], 1)
        check_integer("dsdh batch_size", self.conf["batch_size"], 2)
        check_integer("dsdh dcc_iterations", self.conf["dcc_iterations"], 1)
        eta, mu, nu = (float(self.conf[k]) for k in ("eta", "mu", "nu"))
        mean, xs, scale, layer, generator = _hash_layer(x, bits, seed)
        y = torch.from_numpy(labels.astype(np.float64))
        optimizer = torch.optim.Adam(layer.parameters(), lr=float(self.conf["lr"]))
        with torch.no_grad():
            b = torch.sign(layer(xs)).double()
        b[b == 0] = 1.0
        n, size, losses = len(xs), int(self.conf["batch_size"]), []
        for _ in range(int(self.conf["epochs"])):
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for start in range(0, n, size):  # the hash layer, B fixed
                batch = order[start:start + size]
                if len(batch) < 2:
                    continue
                u = layer(xs[batch])
                s = (y[batch] @ y[batch].T > 0).float()
                loss = _likelihood(0.5 * u @ u.T, s) + eta * (u - b[batch].float()).pow(2).sum(1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
            losses.append(total / n)
            with torch.no_grad():
                u_all = layer(xs).double()
            # W: ridge regression of the labels on the codes, in closed form
            w = torch.linalg.solve(b.T @ b + (nu / mu) * torch.eye(bits, dtype=torch.float64), b.T @ y)  # bits x L
            b = _discrete_cyclic_coordinate(b, w, y, u_all, mu, eta, int(self.conf["dcc_iterations"]))
        return _layer_model(layer, mean, scale) + ({"final_loss": losses[-1], "first_loss": losses[0],
                                                    "code_agreement": float((torch.sign(u_all) == b).double()
                                                                            .mean())},)


def _discrete_cyclic_coordinate(b: torch.Tensor, w: torch.Tensor, y: torch.Tensor, u: torch.Tensor, mu: float,
                                eta: float, sweeps: int) -> torch.Tensor:
    """DSDH's B-step: ``min_B mu ||Y - B W||^2 + eta ||B - U||^2`` over B in {-1, 1}^(N x bits),
    one bit (column) at a time, each set to its exact minimiser given the others."""
    b = b.clone()
    p = mu * y @ w.T + eta * u  # N x bits
    bits = b.shape[1]
    for _ in range(sweeps):
        for k in range(bits):
            others = [j for j in range(bits) if j != k]
            column = p[:, k] - mu * b[:, others] @ (w[others] @ w[k])
            b[:, k] = torch.where(column >= 0, 1.0, -1.0).double()
    return b

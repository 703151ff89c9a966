"""Rigid poses in kapture's convention: world-to-camera, quaternion (qw, qx, qy, qz) then
translation (tx, ty, tz), so that x_cam = R(q) x_world + t."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: A quaternion whose norm differs from 1 by more than this is refused: it is not a
#: rotation written with limited precision but something else.
QUATERNION_NORM_TOLERANCE = 1e-3
#: largest translation component of a pose (m): Earth-centred coordinates are 1e7; beyond this,
#: centres and errors computed from it overflow
MAX_TRANSLATION = 1e12


@dataclass(frozen=True)
class Pose:
    """World-to-camera (or rig-to-sensor) rigid transform.

    ``qvec`` keeps the values as read (so a round trip writes them back unchanged);
    ``rotation_matrix`` uses the normalized quaternion.
    """

    qvec: tuple[float, float, float, float]
    tvec: tuple[float, float, float]

    @classmethod
    def from_matrix(cls, R: np.ndarray, t: np.ndarray) -> Pose:
        q, c = (float(v) for v in rotmat_to_qvec(R)), [float(v) for v in np.asarray(t).ravel()]
        qw, qx, qy, qz = q
        tx, ty, tz = c
        return cls((qw, qx, qy, qz), (tx, ty, tz))

    @property
    def rotation_matrix(self) -> np.ndarray:
        return qvec_to_rotmat(np.asarray(self.qvec, dtype=np.float64))

    @property
    def center(self) -> np.ndarray:
        """Camera centre in world coordinates: -R^T t."""
        return -self.rotation_matrix.T @ np.asarray(self.tvec, dtype=np.float64)

    def inverse(self) -> Pose:
        R = self.rotation_matrix
        return Pose.from_matrix(R.T, -R.T @ np.asarray(self.tvec))

    def __mul__(self, other: Pose) -> Pose:
        """Composition: (self * other)(x) = self(other(x))."""
        R1, R2 = self.rotation_matrix, other.rotation_matrix
        return Pose.from_matrix(R1 @ R2, R1 @ np.asarray(other.tvec) + np.asarray(self.tvec))


def validate_pose(qvec: Sequence[float], tvec: Sequence[float]) -> str | None:
    """Return a description of what is wrong with this pose, or None."""
    values = np.asarray(tuple(qvec) + tuple(tvec), dtype=np.float64)
    if not np.all(np.isfinite(values)):
        return "pose has NaN or infinite values"
    if np.abs(values[4:]).max() > MAX_TRANSLATION:
        return f"translation over {MAX_TRANSLATION:g} m: not a pose in a scene (or in Earth-centred coordinates)"
    norm = math.hypot(*values[:4])  # no overflow on 1e308, unlike a sum of squares
    if abs(norm - 1.0) > QUATERNION_NORM_TOLERANCE:
        return f"quaternion is not a rotation (norm {norm:.6g}, expected 1 within {QUATERNION_NORM_TOLERANCE})"
    return None


def qvec_to_rotmat(qvec: np.ndarray) -> np.ndarray:
    """Rotation matrix of a (w, x, y, z) quaternion, normalized first. Accepts (..., 4)."""
    q = np.asarray(qvec, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = np.moveaxis(q, -1, 0)
    R = np.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], axis=-1)
    return R.reshape(q.shape[:-1] + (3, 3))


def rotmat_to_qvec(R: np.ndarray) -> np.ndarray:
    """(w, x, y, z) quaternion with w >= 0 of a rotation matrix (Shepperd's method)."""
    R = np.asarray(R, dtype=np.float64)
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = R.ravel()
    K = np.array([
        [m00 - m11 - m22, 0.0, 0.0, 0.0],
        [m01 + m10, m11 - m00 - m22, 0.0, 0.0],
        [m02 + m20, m12 + m21, m22 - m00 - m11, 0.0],
        [m21 - m12, m02 - m20, m10 - m01, m00 + m11 + m22],
    ]) / 3.0
    eigvals, eigvecs = np.linalg.eigh(K)
    x, y, z, w = eigvecs[:, np.argmax(eigvals)]
    q = np.array([w, x, y, z])
    return -q if q[0] < 0 else q


def rotation_error_deg(R_est: np.ndarray, R_gt: np.ndarray) -> np.ndarray:
    """Angle of R_est^T R_gt in degrees (broadcasts over leading axes)."""
    trace = np.einsum("...ji,...ji->...", R_est, R_gt)
    return np.degrees(np.arccos(np.clip((trace - 1.0) / 2.0, -1.0, 1.0)))


def is_rotation_matrix(R: np.ndarray, tol: float = 1e-6) -> bool:
    return bool(np.allclose(R @ R.T, np.eye(3), atol=tol) and abs(np.linalg.det(R) - 1.0) < tol)

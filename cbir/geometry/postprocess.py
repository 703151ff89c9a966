"""Post-processing of localization results (REFERENCE.md): rigs and sequences.

* **rig**: a query camera that failed takes the pose of another camera of its rig that
  was localized at the same timestamp (or the nearest one within ``max_time_gap``, for
  unsynchronized rigs), through the rig's extrinsics:
  ``c_from_world = c_from_rig * inverse(c'_from_rig) * c'_from_world`` (kapture's rigs.txt
  stores sensor-from-rig poses).
* **sequence**: the query images of each camera, in timestamp order, are split where two
  successive timestamps are more than ``max_gap`` apart; a failed image takes the pose
  interpolated between the closest localized images before and after it in its sequence
  (camera centre linearly, rotation by slerp, by timestamp), or the pose of the closest
  one when it has localized neighbours on one side only.

Results keep how they were obtained (``method``: pnp, rig, sequence) and from what (``reason``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from ..errors import CbirError
from .poses import Pose

if TYPE_CHECKING:  # geometry is below the data model (cbir.io imports it), never the other way
    from ..io.sensors import SensorData


def _with_pose(res, pose: Pose, method: str, reason: str):
    return replace(res, success=True, method=method, reason=reason, qvec=tuple(pose.qvec), tvec=tuple(pose.tvec))


def propagate_rigs(results: list, sensors: SensorData, max_time_gap: int = 0) -> list:
    """Fill failed results from localized cameras of the same rig."""
    rig_of = {sid: rig_id for rig_id, rig in sensors.rigs.items() for sid in rig}
    for rig_id, rig in sensors.rigs.items():
        unknown = [sid for sid in rig if sid not in sensors.sensors]
        if unknown:
            raise CbirError(f"rig {rig_id!r} references unknown sensors: {', '.join(unknown)}")
    records = sensors.record_by_name()
    by_rig_time: dict[str, list[tuple[int, str, Any]]] = defaultdict(list)
    for r in results:
        rec = records.get(r.name)
        if r.success and rec is not None and rec.camera_id in rig_of:
            by_rig_time[rig_of[rec.camera_id]].append((rec.timestamp, rec.camera_id, r))
    out = []
    for r in results:
        rec = records.get(r.name)
        if r.success or rec is None or rec.camera_id not in rig_of:
            out.append(r)
            continue
        rig_id = rig_of[rec.camera_id]
        candidates = [(abs(ts - rec.timestamp), ts, cam, src) for ts, cam, src in by_rig_time[rig_id]
                      if cam != rec.camera_id and abs(ts - rec.timestamp) <= max_time_gap]
        if not candidates:
            out.append(r)
            continue
        _, ts, cam, src = min(candidates, key=lambda c: (c[0], c[1], c[2]))
        rig = sensors.rigs[rig_id]
        pose = rig[rec.camera_id] * rig[cam].inverse() * src.pose
        out.append(_with_pose(r, pose, "rig", f"from {src.name} ({cam}, timestamp {ts})"))
    return out


def interpolate_sequences(results: list, sensors: SensorData, max_gap: int) -> list:
    """Fill failed results from localized neighbours of the same camera's sequence."""
    records = sensors.record_by_name()
    by_camera: dict[str, list] = defaultdict(list)
    for r in results:
        if r.name in records:
            by_camera[records[r.name].camera_id].append(r)
    filled: dict[str, object] = {}
    for items in by_camera.values():
        items.sort(key=lambda r: records[r.name].timestamp)
        times = np.array([records[r.name].timestamp for r in items])
        breaks = np.flatnonzero(np.diff(times) > max_gap) + 1
        for seq in np.split(np.arange(len(items)), breaks):
            known = [i for i in seq if items[i].success]
            if not known:
                continue
            for i in seq:
                if items[i].success:
                    continue
                before = [k for k in known if times[k] <= times[i]]
                after = [k for k in known if times[k] >= times[i]]
                if before and after and times[after[0]] != times[before[-1]]:
                    a, b = items[before[-1]], items[after[0]]
                    f = (times[i] - times[before[-1]]) / (times[after[0]] - times[before[-1]])
                    pose = interpolate(a.pose, b.pose, float(f))
                    filled[items[i].name] = _with_pose(items[i], pose, "sequence",
                                                       f"interpolated between {a.name} and {b.name} ({f:.2f})")
                else:
                    k = before[-1] if before and (not after or
                                                  times[i] - times[before[-1]] <= times[after[0]] - times[i]) \
                        else after[0]
                    filled[items[i].name] = _with_pose(items[i], items[k].pose, "sequence",
                                                       f"copied from {items[k].name}")
    return [filled.get(r.name, r) for r in results]


def interpolate(a: Pose, b: Pose, f: float) -> Pose:
    """World-to-camera pose at fraction ``f`` from ``a`` to ``b``: centre linear, rotation slerp."""
    rots = Rotation.from_matrix(np.stack([a.rotation_matrix, b.rotation_matrix]))
    R = Slerp([0.0, 1.0], rots)([f]).as_matrix()[0]
    c = (1 - f) * a.center + f * b.center
    return Pose.from_matrix(R, -R @ c)


def estimate_rig(sensors: SensorData, cameras: list[str], reference: str | None = None) -> dict[str, Pose]:
    """A rig (sensor-from-rig poses, the rig frame being ``reference``'s) from the poses of
    images taken at the same timestamps: rotations averaged (chordal mean), translations
    averaged."""
    reference = reference or cameras[0]
    unknown = [c for c in cameras if c not in sensors.cameras]
    if unknown:
        raise CbirError(f"unknown cameras: {', '.join(unknown)}")
    poses = sensors.image_poses()
    by_time: dict[int, dict[str, Pose]] = defaultdict(dict)
    for r in sensors.records:
        if r.name in poses and r.camera_id in cameras:
            by_time[r.timestamp][r.camera_id] = poses[r.name]
    rig = {reference: Pose((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0))}
    for cam in cameras:
        if cam == reference:
            continue
        rel = [t[cam] * t[reference].inverse() for t in by_time.values() if cam in t and reference in t]
        if not rel:
            raise CbirError(f"camera {cam!r} has no image at a timestamp of {reference!r}: cannot estimate the rig")
        R = Rotation.from_matrix(np.stack([p.rotation_matrix for p in rel])).mean().as_matrix()
        t = np.mean([p.tvec for p in rel], axis=0)
        rig[cam] = Pose.from_matrix(R, t)
    return rig

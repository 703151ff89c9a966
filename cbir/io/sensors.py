"""The sensor part of a dataset, in kapture 1.1's data model.

``SensorData`` is what ``sensors/*.txt`` hold: cameras and other sensors, rigs,
image records and trajectories. File I/O lives in :mod:`cbir.io.kapture_text`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..geometry.cameras import Camera
from ..geometry.poses import Pose


@dataclass(frozen=True)
class Sensor:
    """A non-camera sensor (gnss, lidar, wifi, ... or a type kapture does not know),
    kept verbatim so that a round trip preserves it."""

    sensor_type: str
    params: tuple[str, ...] = ()
    name: str = ""


@dataclass(frozen=True)
class ImageRecord:
    timestamp: int
    camera_id: str
    name: str  # path relative to sensors/records_data/, '/'-separated


@dataclass
class SensorData:
    sensors: dict[str, Camera | Sensor] = field(default_factory=dict)
    #: rig_id -> sensor_id -> pose of the sensor in the rig (rig-to-sensor), as kapture.
    rigs: dict[str, dict[str, Pose]] = field(default_factory=dict)
    records: list[ImageRecord] = field(default_factory=list)
    #: (timestamp, device_id) -> world-to-device pose; device is a camera or a rig.
    trajectories: dict[tuple[int, str], Pose] = field(default_factory=dict)
    #: what was read but ignored, as kapture ignores it: (file, line, message), reported by `cbir check`
    warnings: list[tuple[str, int, str]] = field(default_factory=list, compare=False)

    @property
    def cameras(self) -> dict[str, Camera]:
        return {k: v for k, v in self.sensors.items() if isinstance(v, Camera)}

    def image_names(self) -> list[str]:
        return [r.name for r in self.records]

    def record_by_name(self) -> dict[str, ImageRecord]:
        return {r.name: r for r in self.records}

    def camera_of(self, image_name: str) -> Camera:
        return self.sensors[self.record_by_name()[image_name].camera_id]  # type: ignore[return-value]

    def image_poses(self) -> dict[str, Pose]:
        """World-to-camera pose of every image that has one, directly or through its rig."""
        sensor_in_rig = {(rig_id, sid): pose for rig_id, rig in self.rigs.items() for sid, pose in rig.items()}
        rig_of = {sid: rig_id for rig_id, sid in sensor_in_rig}
        poses: dict[str, Pose] = {}
        for r in self.records:
            pose = self.trajectories.get((r.timestamp, r.camera_id))
            if pose is None and r.camera_id in rig_of:
                rig_id = rig_of[r.camera_id]
                rig_pose = self.trajectories.get((r.timestamp, rig_id))
                if rig_pose is not None:
                    pose = sensor_in_rig[(rig_id, r.camera_id)] * rig_pose
            if pose is not None:
                poses[r.name] = pose
        return poses

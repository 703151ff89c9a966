"""kapture 1.1 text files: sensors.txt, rigs.txt, records_camera.txt, trajectories.txt.

Parsing follows kapture's own reader (comma-separated, fields stripped, ``#`` lines
and blank lines ignored) but is strict where kapture is lenient: a wrong column
count, a bad number, an unknown camera or a duplicate record is an error that
names the file and the line, never a silent overwrite.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import FormatError, VersionError
from ..geometry.cameras import CAMERA_MODELS, UNKNOWN_CAMERA, Camera, validate_camera
from ..geometry.poses import Pose, validate_pose
from .atomic import atomic_write_text
from .paths import check_relative_name
from .sensors import ImageRecord, Sensor, SensorData
from .textfile import read_file_bytes

KAPTURE_VERSION = "1.1"
HEADER_VERSION = f"# kapture format: {KAPTURE_VERSION}"
VERSION_RE = re.compile(r"#\s*kapture format\s*:\s*(\d+)\.(\d+)")

SENSORS_HEADER = "# sensor_id, name, sensor_type, [sensor_params]+"
RIGS_HEADER = "# rig_id, sensor_id, qw, qx, qy, qz, tx, ty, tz"
RECORDS_CAMERA_HEADER = "# timestamp, device_id, image_path"
TRAJECTORIES_HEADER = "# timestamp, device_id, qw, qx, qy, qz, tx, ty, tz"

#: sensors/ file names, relative to the dataset root.
SENSORS_FILE = "sensors/sensors.txt"
RIGS_FILE = "sensors/rigs.txt"
RECORDS_CAMERA_FILE = "sensors/records_camera.txt"
TRAJECTORIES_FILE = "sensors/trajectories.txt"
RECORDS_DATA_DIR = "sensors/records_data"

CAMERA_SENSOR_TYPES = ("camera", "depth")

UTF8_BOM = b"\xef\xbb\xbf"
BOM_MESSAGE = ("starts with a UTF-8 byte-order mark (BOM), which kapture does not read: "
               "save it as UTF-8 without BOM")


def iter_rows(path: str | os.PathLike) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, stripped fields) for each data line of a kapture text file.

    Refuses files of a newer major kapture version and lines that are not UTF-8.
    """
    path = Path(path)
    data = read_file_bytes(path)
    if data.startswith(UTF8_BOM):
        raise FormatError(BOM_MESSAGE, path, 1)
    for lineno, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError("line is not valid UTF-8", path, lineno) from None
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            m = VERSION_RE.match(stripped)
            if m and int(m.group(1)) > int(KAPTURE_VERSION.split(".")[0]):
                raise VersionError(f"kapture format {m.group(1)}.{m.group(2)} is newer than the "
                                   f"supported {KAPTURE_VERSION}", path, lineno)
            continue
        yield lineno, [f.strip() for f in line.split(",")]


def _float(value: str, what: str, path: Path, lineno: int) -> float:
    try:
        return float(value)
    except ValueError:
        raise FormatError(f"{what} is not a number: {value!r}", path, lineno) from None


def _int(value: str, what: str, path: Path, lineno: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise FormatError(f"{what} is not an integer: {value!r}", path, lineno) from None


def _pose(fields: list[str], path: Path, lineno: int) -> Pose:
    if any(f == "" for f in fields):
        raise FormatError("pose with an empty rotation or translation is not supported", path, lineno)
    values = [_float(v, name, path, lineno)
              for v, name in zip(fields, ("qw", "qx", "qy", "qz", "tx", "ty", "tz"), strict=True)]
    problem = validate_pose(values[:4], values[4:])
    if problem:
        raise FormatError(problem, path, lineno)
    return Pose(tuple(values[:4]), tuple(values[4:]))  # type: ignore[arg-type]


def _expect_columns(fields: list[str], n: int, columns: str, path: Path, lineno: int) -> None:
    if len(fields) != n:
        raise FormatError(f"expected {n} columns ({columns}), got {len(fields)}", path, lineno)


# ---------------------------------------------------------------------------- readers

def read_sensors(path: str | os.PathLike) -> dict[str, Camera | Sensor]:
    path = Path(path)
    sensors: dict[str, Camera | Sensor] = {}
    for lineno, fields in iter_rows(path):
        if len(fields) < 3:
            raise FormatError(f"expected at least 3 columns (sensor_id, name, sensor_type), got {len(fields)}",
                              path, lineno)
        sensor_id, name, sensor_type, *params = fields
        if not sensor_id:
            raise FormatError("empty sensor_id", path, lineno)
        if sensor_id in sensors:
            raise FormatError(f"duplicate sensor_id {sensor_id!r}", path, lineno)
        if sensor_type in CAMERA_SENSOR_TYPES:
            sensors[sensor_id] = _camera(params, name, path, lineno)
        else:
            sensors[sensor_id] = Sensor(sensor_type, tuple(params), name)
    return sensors


def _camera(params: list[str], name: str, path: Path, lineno: int) -> Camera:
    if len(params) < 3:
        raise FormatError("a camera needs a model, a width and a height", path, lineno)
    model, w, h, *rest = params
    width = _float(w, "width", path, lineno)
    height = _float(h, "height", path, lineno)
    values = tuple(_float(v, "camera parameter", path, lineno) for v in rest)
    problem = validate_camera(model, width, height, values)
    if problem:
        raise FormatError(problem, path, lineno)
    return Camera(model, int(width), int(height), values, name)


def read_rigs(path: str | os.PathLike, sensor_ids: set[str] | None = None,
              warnings: list[tuple[str, int, str]] | None = None) -> dict[str, dict[str, Pose]]:
    """rigs.txt. An entry of a sensor that sensors.txt lacks is dropped, as kapture drops it
    (kapture-localization's own tutorial dataset has such entries), and reported in
    ``warnings`` as (file, line, message)."""
    path = Path(path)
    rigs: dict[str, dict[str, Pose]] = {}
    for lineno, fields in iter_rows(path):
        _expect_columns(fields, 9, "rig_id, sensor_id, qw, qx, qy, qz, tx, ty, tz", path, lineno)
        rig_id, sensor_id = fields[:2]
        if sensor_ids is not None:
            if rig_id in sensor_ids:
                raise FormatError(f"rig id {rig_id!r} is also a sensor id", path, lineno)
            if sensor_id not in sensor_ids:
                _pose(fields[2:], path, lineno)  # still well-formed, or an error
                if warnings is not None:
                    warnings.append((str(path), lineno, f"rig {rig_id!r} names sensor {sensor_id!r}, which "
                                                        "sensors.txt lacks: the entry is ignored (as kapture does)"))
                continue
        rig = rigs.setdefault(rig_id, {})
        if sensor_id in rig:
            raise FormatError(f"sensor {sensor_id!r} appears twice in rig {rig_id!r}", path, lineno)
        rig[sensor_id] = _pose(fields[2:], path, lineno)
    return rigs


def read_records_camera(path: str | os.PathLike, camera_ids: set[str] | None = None) -> list[ImageRecord]:
    path = Path(path)
    records: list[ImageRecord] = []
    seen_names: dict[str, int] = {}
    seen_keys: dict[tuple[int, str], int] = {}
    for lineno, fields in iter_rows(path):
        _expect_columns(fields, 3, "timestamp, device_id, image_path", path, lineno)
        timestamp = _int(fields[0], "timestamp", path, lineno)
        camera_id, name = fields[1], fields[2]
        if camera_ids is not None and camera_id not in camera_ids:
            raise FormatError(f"unknown camera {camera_id!r} (not a camera of sensors.txt)", path, lineno)
        problem = check_relative_name(name)
        if problem:
            raise FormatError(problem, path, lineno)
        if name in seen_names:
            raise FormatError(f"duplicate image {name!r} (first at line {seen_names[name]})", path, lineno)
        key = (timestamp, camera_id)
        if key in seen_keys:
            raise FormatError(f"camera {camera_id!r} has two images at timestamp {timestamp} "
                              f"(first at line {seen_keys[key]})", path, lineno)
        seen_names[name] = seen_keys[key] = lineno
        records.append(ImageRecord(timestamp, camera_id, name))
    return records


def read_trajectories(path: str | os.PathLike, device_ids: set[str] | None = None) -> dict[tuple[int, str], Pose]:
    path = Path(path)
    poses: dict[tuple[int, str], Pose] = {}
    lines: dict[tuple[int, str], int] = {}
    for lineno, fields in iter_rows(path):
        _expect_columns(fields, 9, "timestamp, device_id, qw, qx, qy, qz, tx, ty, tz", path, lineno)
        key = (_int(fields[0], "timestamp", path, lineno), fields[1])
        if device_ids is not None and key[1] not in device_ids:
            raise FormatError(f"unknown device {key[1]!r} (neither a sensor nor a rig)", path, lineno)
        if key in poses:
            raise FormatError(f"duplicate pose for device {key[1]!r} at timestamp {key[0]} "
                              f"(first at line {lines[key]})", path, lineno)
        poses[key] = _pose(fields[2:], path, lineno)
        lines[key] = lineno
    return poses


def read_sensor_data(root: str | os.PathLike) -> SensorData:
    """Read sensors/ of a kapture (or cbir) dataset; rigs and trajectories are optional."""
    root = Path(root)
    sensors = read_sensors(root / SENSORS_FILE)
    data = SensorData(sensors=sensors)
    # lexists: a dangling link or a link loop is a file that cannot be read, not an absent one
    if os.path.lexists(root / RIGS_FILE):
        data.rigs = read_rigs(root / RIGS_FILE, set(sensors), data.warnings)
    cameras = {k for k, v in sensors.items() if isinstance(v, Camera)}
    if os.path.lexists(root / RECORDS_CAMERA_FILE):
        data.records = read_records_camera(root / RECORDS_CAMERA_FILE, cameras)
    if os.path.lexists(root / TRAJECTORIES_FILE):
        data.trajectories = read_trajectories(root / TRAJECTORIES_FILE, set(sensors) | set(data.rigs))
    return data


# ---------------------------------------------------------------------------- writers

def _num(v: float) -> str:
    """Shortest repr that reads back to the same double (what kapture writes)."""
    return repr(float(v))


def _table(header: str, rows: list[list[str]]) -> str:
    lines = [HEADER_VERSION, header] + [", ".join(row) for row in rows]
    return "\n".join(lines) + "\n"


def format_sensors(sensors: dict[str, Camera | Sensor]) -> str:
    rows = []
    for sensor_id, s in sensors.items():
        if isinstance(s, Camera):
            rows.append([sensor_id, s.name, "camera", s.model, str(s.width), str(s.height)]
                        + [_num(v) for v in s.params])
        else:
            rows.append([sensor_id, s.name, s.sensor_type, *s.params])
    return _table(SENSORS_HEADER, rows)


def _pose_fields(p: Pose) -> list[str]:
    return [_num(v) for v in p.qvec] + [_num(v) for v in p.tvec]


def format_rigs(rigs: dict[str, dict[str, Pose]]) -> str:
    rows = [[rig_id, sid] + _pose_fields(p) for rig_id, rig in rigs.items() for sid, p in rig.items()]
    return _table(RIGS_HEADER, rows)


def format_records_camera(records: list[ImageRecord]) -> str:
    ordered = sorted(records, key=lambda r: (r.timestamp, r.camera_id))
    return _table(RECORDS_CAMERA_HEADER, [[str(r.timestamp), r.camera_id, r.name] for r in ordered])


def format_trajectories(trajectories: dict[tuple[int, str], Pose]) -> str:
    rows = [[str(ts), dev] + _pose_fields(trajectories[(ts, dev)]) for ts, dev in sorted(trajectories)]
    return _table(TRAJECTORIES_HEADER, rows)


def write_sensor_data(root: str | os.PathLike, data: SensorData) -> list[Path]:
    """Write the sensors/ text files of ``data`` atomically; return the paths written."""
    root = Path(root)
    written = []
    outputs = [(SENSORS_FILE, format_sensors(data.sensors)),
               (RECORDS_CAMERA_FILE, format_records_camera(data.records))]
    if data.rigs:
        outputs.append((RIGS_FILE, format_rigs(data.rigs)))
    if data.trajectories:
        outputs.append((TRAJECTORIES_FILE, format_trajectories(data.trajectories)))
    for rel, text in outputs:
        atomic_write_text(root / rel, text)
        written.append(root / rel)
    return written


__all__ = [
    "CAMERA_MODELS", "UNKNOWN_CAMERA", "read_sensor_data", "write_sensor_data", "read_sensors", "read_rigs",
    "read_records_camera", "read_trajectories", "format_sensors", "format_rigs", "format_records_camera",
    "format_trajectories", "iter_rows",
]

"""``cloud.py`` arrays <-> ``sensor_msgs/PointCloud2``, and the 3D fields of SegmentedObject.

Writing is ours (one memory copy of the structured array). Reading uses
``sensor_msgs_py.point_cloud2.read_points`` when a ROS install provides it, and our own reader
otherwise; ours also handles big-endian data and row padding (``row_step > width * point_step``).
"""

from __future__ import annotations

import array
from typing import Any

import numpy as np
from geometry_msgs.msg import Point, Pose, Quaternion, Vector3
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

from qwen3vl_seg_ros.cloud import CLOUD_DTYPE, DEFAULT_COLOR, make_cloud, pack_rgb
from qwen3vl_seg_ros.geometry import ObjectGeometry

try:  # a ROS 2 install has it; the PyPI wheels do not
    from sensor_msgs_py.point_cloud2 import read_points as _ros_read_points
except ImportError:  # pragma: no cover - depends on the environment
    _ros_read_points = None

#: numpy (kind, itemsize) <-> PointField datatype.
_TO_POINTFIELD: dict[tuple[str, int], int] = {
    ("i", 1): PointField.INT8,
    ("u", 1): PointField.UINT8,
    ("i", 2): PointField.INT16,
    ("u", 2): PointField.UINT16,
    ("i", 4): PointField.INT32,
    ("u", 4): PointField.UINT32,
    ("f", 4): PointField.FLOAT32,
    ("f", 8): PointField.FLOAT64,
}
_FROM_POINTFIELD: dict[int, str] = {v: f"{k[0]}{k[1]}" for k, v in _TO_POINTFIELD.items()}


def point_fields(dtype: np.dtype) -> list[PointField]:
    """PointFields describing a structured dtype (offsets as in the dtype, count 1)."""
    if dtype.names is None:
        raise ValueError("a point cloud array must have a structured dtype")
    fields = []
    for name in dtype.names:
        ftype, offset = dtype.fields[name][:2]
        key = (ftype.kind, ftype.itemsize)
        if key not in _TO_POINTFIELD or ftype.shape:
            raise ValueError(f"field '{name}' has dtype {ftype}, which PointCloud2 cannot carry")
        fields.append(PointField(name=name, offset=offset, datatype=_TO_POINTFIELD[key], count=1))
    return fields


def _little_endian(arr: np.ndarray) -> np.ndarray:
    """The same values with every field little-endian (a no-op view for our own layout)."""
    le = np.dtype({
        "names": list(arr.dtype.names),
        "formats": [arr.dtype.fields[n][0].newbyteorder("<") for n in arr.dtype.names],
        "offsets": [arr.dtype.fields[n][1] for n in arr.dtype.names],
        "itemsize": arr.dtype.itemsize,
    })
    return np.ascontiguousarray(arr if le == arr.dtype else arr.astype(le))


def _xyz_finite(arr: np.ndarray) -> bool:
    names = arr.dtype.names or ()
    return all(bool(np.all(np.isfinite(arr[n]))) for n in ("x", "y", "z") if n in names)


def cloud_to_msg(cloud: np.ndarray, header: Header) -> PointCloud2:
    """Unorganised (height 1), little-endian PointCloud2 holding ``cloud`` byte for byte.

    ``is_dense`` is True only when no x/y/z is NaN or inf (consumers may skip their NaN checks).
    """
    arr = _little_endian(np.asarray(cloud).reshape(-1))
    data = array.array("B")
    data.frombytes(arr.view(np.uint8).data if arr.size else b"")
    step = arr.dtype.itemsize
    return PointCloud2(
        header=header,
        height=1,
        width=int(arr.shape[0]),
        fields=point_fields(arr.dtype),
        is_bigendian=False,
        point_step=step,
        row_step=step * int(arr.shape[0]),
        data=data,
        is_dense=_xyz_finite(arr),
    )


def fields_dtype(msg: PointCloud2) -> np.dtype:
    """The structured dtype of one point of ``msg`` (its offsets, padding and byte order)."""
    order = ">" if msg.is_bigendian else "<"
    names, formats, offsets = [], [], []
    for f in msg.fields:
        if f.datatype not in _FROM_POINTFIELD:
            raise ValueError(f"PointField '{f.name}' has unknown datatype {f.datatype}")
        base = np.dtype(order + _FROM_POINTFIELD[f.datatype])
        names.append(f.name)
        formats.append(base if f.count <= 1 else np.dtype((base, (int(f.count),))))
        offsets.append(int(f.offset))
    dt = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": int(msg.point_step)})
    return dt


def _native(dt: np.dtype) -> np.dtype:
    return np.dtype({
        "names": list(dt.names),
        "formats": [dt.fields[n][0].newbyteorder("=") for n in dt.names],
        "offsets": [dt.fields[n][1] for n in dt.names],
        "itemsize": dt.itemsize,
    })


def read_points_builtin(msg: PointCloud2) -> np.ndarray:
    """All points of ``msg`` as a flat structured array in the message's own layout (native order).

    Checks the sizes first, so a truncated or inconsistent message raises ``ValueError`` instead of
    reading garbage.
    """
    dt = fields_dtype(msg)
    n_cols, n_rows, step, row_step = int(msg.width), int(msg.height), int(msg.point_step), int(msg.row_step)
    if n_cols * n_rows == 0:
        return np.empty(0, dtype=_native(dt))
    if row_step < n_cols * step:
        raise ValueError(f"row_step {row_step} < width {n_cols} x point_step {step}")
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    if buf.size < row_step * (n_rows - 1) + n_cols * step:
        raise ValueError(f"data has {buf.size} bytes, fewer than {n_rows} rows of {row_step} need")
    if row_step == n_cols * step:
        points = buf[: n_rows * row_step].view(dt)
    else:  # rows are padded: drop the padding row by row
        rows = np.lib.stride_tricks.as_strided(buf, shape=(n_rows, n_cols * step), strides=(row_step, 1))
        points = np.ascontiguousarray(rows).reshape(-1).view(dt)
    return points.astype(_native(dt))


def read_points(msg: PointCloud2) -> np.ndarray:
    """Flat structured array of all points (sensor_msgs_py when importable, else ours)."""
    if _ros_read_points is not None:
        pts = _ros_read_points(msg, skip_nans=False)
        if isinstance(pts, np.ndarray) and pts.dtype.names:
            return pts.reshape(-1)
    return read_points_builtin(msg)


def msg_to_cloud(msg: PointCloud2) -> np.ndarray:
    """A PointCloud2 as a :data:`CLOUD_DTYPE` array (missing rgb -> default grey, id -> 0)."""
    pts = read_points(msg)
    names = pts.dtype.names or ()
    missing = [n for n in ("x", "y", "z") if n not in names]
    if missing:
        raise ValueError(f"PointCloud2 lacks the fields {missing}")
    out = np.empty(pts.shape[0], dtype=CLOUD_DTYPE)
    for n in ("x", "y", "z"):
        out[n] = pts[n]
    rgb_type = pts.dtype.fields["rgb"][0] if "rgb" in names else None
    if rgb_type is not None and rgb_type == np.float32:
        out["rgb"] = pts["rgb"]  # same-dtype copy: the bits are kept
    elif rgb_type is not None and rgb_type.kind == "u" and rgb_type.itemsize == 4:  # packed as UINT32
        out["rgb"] = (pts["rgb"].astype("<u4") & np.uint32(0x00FFFFFF)).view("<f4")
    else:
        out["rgb"] = pack_rgb(np.broadcast_to(np.array(DEFAULT_COLOR, np.uint8), (pts.shape[0], 3)))
    out["id"] = pts["id"] if "id" in names else 0
    return out


def object_cloud(geom: ObjectGeometry, object_id: int) -> np.ndarray:
    """The :data:`CLOUD_DTYPE` cloud of one object (empty when it has no 3D)."""
    if not geom.ok:
        return np.empty(0, dtype=CLOUD_DTYPE)
    return make_cloud(geom.points, geom.colors, object_id)


def fill_object_3d(obj: Any, geom: ObjectGeometry, object_id: int, header: Header) -> np.ndarray:
    """Fills the 3D fields of a ``SegmentedObject`` from ``geom``; returns the object's cloud.

    ``header`` names the frame the geometry is in (target frame or camera optical frame) and the
    image stamp. The returned array is what goes into the all-objects ``~/cloud``.
    """
    cloud = object_cloud(geom, object_id)
    obj.has_3d = bool(geom.ok)
    obj.status_3d = geom.reason
    obj.num_points = int(geom.num_points) if geom.ok else 0
    if geom.ok:
        c, q, s = geom.centroid, geom.box_quaternion, geom.box_size
        obj.centroid = Point(x=float(c[0]), y=float(c[1]), z=float(c[2]))
        b = geom.box_center
        obj.bbox_center = Pose(
            position=Point(x=float(b[0]), y=float(b[1]), z=float(b[2])),
            orientation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3])),
        )
        obj.bbox_size = Vector3(x=float(s[0]), y=float(s[1]), z=float(s[2]))
    obj.cloud = cloud_to_msg(cloud, header)
    return cloud

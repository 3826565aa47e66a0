"""PointCloud2 packing, checked with an independent CDR reader (rosbags) and rclpy round trips."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from geometry_msgs.msg import Point
from rclpy.serialization import deserialize_message, serialize_message
from rosbags.typesys import Stores, get_typestore
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import Header

from qwen3vl_seg_ros.cloud import CLOUD_DTYPE, DEFAULT_COLOR, make_cloud, pack_rgb, unpack_rgb
from qwen3vl_seg_ros.geometry import ObjectGeometry
from qwen3vl_seg_ros.msg import SegmentedObject
from qwen3vl_seg_ros.ros.pointcloud import (
    cloud_to_msg,
    fill_object_3d,
    msg_to_cloud,
    read_points,
    read_points_builtin,
)

TYPESTORE = get_typestore(Stores.ROS2_KILTED)
#: PointField datatype -> struct format character (from the message definition, not our code).
STRUCT_CHAR = {1: "b", 2: "B", 3: "h", 4: "H", 5: "i", 6: "I", 7: "f", 8: "d"}


def header(frame: str = "camera_color_optical_frame", sec: int = 12, nanosec: int = 345) -> Header:
    h = Header(frame_id=frame)
    h.stamp.sec, h.stamp.nanosec = sec, nanosec
    return h


def sample_cloud() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    points = rng.uniform(-2.0, 2.0, (37, 3)).astype(np.float32)
    colors = rng.integers(0, 256, (37, 3)).astype(np.uint8)
    colors[0] = (255, 255, 255)
    colors[1] = (1, 0, 0)  # 0x00010000: a subnormal-range float pattern whose bits must survive
    ids = np.repeat(np.array([3, 9, 4000000000], dtype=np.uint32), [10, 20, 7])
    return points, colors, ids


def decode_independently(raw_cdr: bytes) -> tuple[object, list[dict]]:
    """Deserialises with rosbags and unpacks each point with ``struct`` using the message's fields."""
    msg = TYPESTORE.deserialize_cdr(raw_cdr, "sensor_msgs/msg/PointCloud2")
    data = bytes(msg.data)
    endian = ">" if msg.is_bigendian else "<"
    out = []
    for row in range(msg.height):
        for col in range(msg.width):
            base = row * msg.row_step + col * msg.point_step
            point = {}
            for f in msg.fields:
                (point[f.name],) = struct.unpack_from(endian + STRUCT_CHAR[f.datatype], data, base + f.offset)
            point["_rgb_bits"] = struct.unpack_from(endian + "I", data, base + next(
                f.offset for f in msg.fields if f.name == "rgb"))[0]
            out.append(point)
    return msg, out


def test_bytes_decoded_by_rosbags_equal_the_points() -> None:
    points, colors, ids = sample_cloud()
    msg = cloud_to_msg(make_cloud(points, colors, ids), header())
    decoded_msg, decoded = decode_independently(serialize_message(msg))

    assert decoded_msg.header.frame_id == "camera_color_optical_frame"
    assert (decoded_msg.header.stamp.sec, decoded_msg.header.stamp.nanosec) == (12, 345)
    assert (decoded_msg.height, decoded_msg.width) == (1, 37)
    assert decoded_msg.point_step == 20 and decoded_msg.row_step == 20 * 37
    assert decoded_msg.is_bigendian is False and decoded_msg.is_dense is True
    fields = [(f.name, f.offset, f.datatype, f.count) for f in decoded_msg.fields]
    assert fields == [("x", 0, 7, 1), ("y", 4, 7, 1), ("z", 8, 7, 1), ("rgb", 12, 7, 1), ("id", 16, 6, 1)]
    for i, p in enumerate(decoded):
        assert (p["x"], p["y"], p["z"]) == tuple(float(v) for v in points[i])  # exact float32 values
        r, g, b = (int(v) for v in colors[i])
        assert p["_rgb_bits"] == (r << 16) | (g << 8) | b
        assert p["id"] == ids[i]


def test_rclpy_serialization_round_trip() -> None:
    points, colors, ids = sample_cloud()
    cloud = make_cloud(points, colors, ids)
    msg = cloud_to_msg(cloud, header())
    back = deserialize_message(serialize_message(msg), PointCloud2)
    assert back == msg
    again = msg_to_cloud(back)
    assert again.dtype == CLOUD_DTYPE
    assert again.tobytes() == cloud.tobytes()  # bit for bit, packed colours included


def test_empty_cloud() -> None:
    msg = cloud_to_msg(np.empty(0, dtype=CLOUD_DTYPE), header())
    assert (msg.width, msg.height, msg.row_step, len(msg.data)) == (0, 1, 0, 0)
    assert [f.name for f in msg.fields] == ["x", "y", "z", "rgb", "id"]
    assert msg_to_cloud(msg).shape == (0,)
    decoded_msg, decoded = decode_independently(serialize_message(msg))
    assert decoded == [] and decoded_msg.width == 0


def test_nan_points_clear_is_dense() -> None:
    cloud = make_cloud(np.array([[0.0, 0.0, 1.0], [np.nan, 0.0, 1.0]], np.float32))
    assert cloud_to_msg(cloud, header()).is_dense is False


def test_big_endian_input_is_written_little_endian() -> None:
    cloud = make_cloud(np.array([[1.5, -2.25, 3.0]], np.float32), np.array([[1, 2, 3]], np.uint8), 5)
    swapped = cloud.astype(cloud.dtype.newbyteorder(">"))
    msg = cloud_to_msg(swapped, header())
    assert bytes(msg.data) == cloud.tobytes()
    _, decoded = decode_independently(serialize_message(msg))
    assert (decoded[0]["x"], decoded[0]["y"], decoded[0]["z"], decoded[0]["id"]) == (1.5, -2.25, 3.0, 5)


def handmade_cloud(big_endian: bool, pad: int) -> PointCloud2:
    """A 2x2 organised cloud written with struct: fields x, y, z (float32) and a uint16 'ring'
    at offset 16 after 4 padding bytes, point_step 20, rows padded by ``pad`` bytes."""
    e = ">" if big_endian else "<"
    values = [[(0.5, 1.0, 2.0, 7), (np.nan, 0.0, 0.0, 8)], [(-1.0, -2.0, 3.5, 9), (4.0, 5.0, 6.0, 65535)]]
    rows = []
    for row in values:
        blob = b"".join(struct.pack(e + "fff4xH2x", *p) for p in row)
        rows.append(blob + b"\xab" * pad)
    msg = PointCloud2(height=2, width=2, point_step=20, row_step=40 + pad, is_bigendian=big_endian)
    msg.fields = [PointField(name=n, offset=o, datatype=PointField.FLOAT32, count=1)
                  for n, o in (("x", 0), ("y", 4), ("z", 8))]
    msg.fields.append(PointField(name="ring", offset=16, datatype=PointField.UINT16, count=1))
    msg.data = b"".join(rows)
    return msg


@pytest.mark.parametrize("big_endian", [False, True])
@pytest.mark.parametrize("pad", [0, 12])
def test_builtin_reader_handles_byte_order_padding_and_rows(big_endian: bool, pad: int) -> None:
    pts = read_points_builtin(handmade_cloud(big_endian, pad))
    assert pts.shape == (4,)
    np.testing.assert_array_equal(pts["x"], np.array([0.5, np.nan, -1.0, 4.0], np.float32))
    np.testing.assert_array_equal(pts["z"], np.array([2.0, 0.0, 3.5, 6.0], np.float32))
    np.testing.assert_array_equal(pts["ring"], [7, 8, 9, 65535])
    cloud = msg_to_cloud(handmade_cloud(big_endian, pad))  # no rgb, no id: defaults
    np.testing.assert_array_equal(cloud["id"], 0)
    np.testing.assert_array_equal(unpack_rgb(cloud["rgb"]), np.tile(DEFAULT_COLOR, (4, 1)))


def test_reader_rejects_truncated_data() -> None:
    msg = handmade_cloud(False, 0)
    msg.data = bytes(msg.data)[:-1]
    with pytest.raises(ValueError, match="fewer than"):
        read_points_builtin(msg)


def test_reader_in_use_is_ours_here() -> None:
    from qwen3vl_seg_ros.ros import pointcloud

    try:
        import sensor_msgs_py  # noqa: F401
    except ImportError:
        assert pointcloud._ros_read_points is None
    else:  # pragma: no cover - only on a ROS install
        pytest.skip("sensor_msgs_py present: the reader in use is ROS's")
    msg = handmade_cloud(True, 4)
    ours, used = read_points_builtin(msg), read_points(msg)
    for name in ours.dtype.names:  # NaN != NaN: compare the bits of each field
        assert used[name].tobytes() == ours[name].tobytes()


def test_uint32_rgb_field_is_read_as_packed_colour() -> None:
    msg = PointCloud2(height=1, width=1, point_step=16, row_step=16, is_bigendian=False)
    msg.fields = [PointField(name=n, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                  for i, n in enumerate("xyz")]
    msg.fields.append(PointField(name="rgb", offset=12, datatype=PointField.UINT32, count=1))
    msg.data = struct.pack("<fffI", 1.0, 2.0, 3.0, 0xFF102030)  # with an alpha byte
    cloud = msg_to_cloud(msg)
    np.testing.assert_array_equal(unpack_rgb(cloud["rgb"]), [[0x10, 0x20, 0x30]])


def test_fill_object_3d() -> None:
    pts = np.array([[0.0, 0.0, 1.0], [0.1, 0.0, 1.0]], np.float32)
    cols = np.array([[10, 20, 30], [40, 50, 60]], np.uint8)
    geom = ObjectGeometry(
        ok=True, reason="", points=pts, colors=cols, centroid=np.array([0.05, 0.0, 1.0]),
        box_center=np.array([0.05, 0.0, 1.0]), box_quaternion=np.array([0.0, 0.0, 0.0, 1.0]),
        box_size=np.array([0.1, 0.0, 0.0]), num_points=2,
    )
    obj = SegmentedObject(id=4)
    cloud = fill_object_3d(obj, geom, 4, header("base_link"))
    assert obj.has_3d and obj.status_3d == "" and obj.num_points == 2
    assert obj.centroid == Point(x=0.05, y=0.0, z=1.0)
    assert obj.bbox_center.orientation.w == 1.0 and obj.bbox_size.x == pytest.approx(0.1)
    assert obj.cloud.header.frame_id == "base_link" and obj.cloud.width == 2
    np.testing.assert_array_equal(cloud["id"], [4, 4])
    np.testing.assert_array_equal(cloud["rgb"].view(np.uint32), pack_rgb(cols).view(np.uint32))

    failed = SegmentedObject(id=5)
    empty = fill_object_3d(failed, ObjectGeometry.failure("mask is empty"), 5, header())
    assert not failed.has_3d and failed.status_3d == "mask is empty" and failed.num_points == 0
    assert empty.shape == (0,) and failed.cloud.width == 0

"""Our messages on the wire, decoded by an independent CDR implementation (rosbags).

rclpy serializes with the C type support generated from msg/*.msg; rosbags parses the same .msg
text itself and decodes the bytes in pure Python. Agreement field by field shows the generated
interfaces are what the .msg files say, which is what any other ROS 2 client will decode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from qwen3vl_seg_ros.msg import SegmentationResult, SegmentedObject
from qwen3vl_seg_ros.ros.conversions import array_to_image
from qwen3vl_seg_ros.srv import Segment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def typestore():
    store = get_typestore(Stores.ROS2_KILTED)
    types = {}
    for name in ("SegmentedObject", "SegmentationResult"):
        text = (ROOT / "msg" / f"{name}.msg").read_text()
        types.update(get_types_from_msg(text, f"qwen3vl_seg_ros/msg/{name}"))
    store.register(types)
    return store


def sample_result() -> SegmentationResult:
    result = SegmentationResult()
    result.header.frame_id = "camera_color_optical_frame"
    result.header.stamp.sec, result.header.stamp.nanosec = 1700000000, 123456789
    result.command = "the red mug ☕"
    result.request_id = "req-7"
    result.status = SegmentationResult.NO_MATCH
    result.message = "nothing matched"
    result.model_answer = '[{"bbox_2d": [1, 2, 3, 4], "label": "mug"}]'
    result.segmenter = "qwen3vl_seg"
    result.query_source = "mask_token"
    result.image_width, result.image_height = 640, 480
    result.geometry_frame_id = "base_link"
    result.input_age_ms, result.total_ms, result.mask_ms = 12.5, 80.25, 1.5
    obj = SegmentedObject()
    obj.id, obj.label, obj.score, obj.box_score, obj.mask_score = 3, "mug", 0.75, 0.9, 0.8
    obj.mask_source = "decoder"
    obj.box.x_offset, obj.box.y_offset, obj.box.width, obj.box.height = 10, 20, 4, 3
    obj.mask = array_to_image(np.array([[255, 0, 255, 0], [0, 255, 0, 255], [255, 255, 0, 0]], np.uint8), "mono8")
    obj.has_3d, obj.status_3d, obj.num_points = True, "", 42
    obj.centroid.x, obj.centroid.y, obj.centroid.z = 0.1, -0.2, 0.9
    obj.bbox_center.orientation.w = 1.0
    obj.bbox_size.x, obj.bbox_size.y, obj.bbox_size.z = 0.08, 0.08, 0.1
    obj.cloud.header.frame_id = "base_link"
    obj.cloud.width, obj.cloud.height, obj.cloud.point_step = 2, 1, 20
    obj.cloud.data = bytes(range(40))
    result.objects = [obj, SegmentedObject(id=4, label="cup")]
    return result


def test_rosbags_decodes_rclpy_bytes_field_by_field(typestore):
    result = sample_result()
    raw = serialize_message(result)
    decoded = typestore.deserialize_cdr(raw, "qwen3vl_seg_ros/msg/SegmentationResult")
    assert decoded.header.frame_id == result.header.frame_id
    assert (decoded.header.stamp.sec, decoded.header.stamp.nanosec) == (1700000000, 123456789)
    for field in ("command", "request_id", "status", "message", "model_answer", "segmenter", "query_source",
                  "image_width", "image_height", "geometry_frame_id"):
        assert getattr(decoded, field) == getattr(result, field), field
    assert decoded.total_ms == pytest.approx(80.25) and decoded.input_age_ms == pytest.approx(12.5)
    assert len(decoded.objects) == 2
    obj, ref = decoded.objects[0], result.objects[0]
    assert (obj.id, obj.label, obj.mask_source, obj.has_3d, obj.num_points) == (3, "mug", "decoder", True, 42)
    assert obj.score == pytest.approx(0.75) and obj.box_score == pytest.approx(0.9)
    assert (obj.box.x_offset, obj.box.y_offset, obj.box.width, obj.box.height) == (10, 20, 4, 3)
    assert obj.mask.encoding == "mono8" and bytes(obj.mask.data) == bytes(ref.mask.data)
    assert (obj.centroid.x, obj.centroid.y, obj.centroid.z) == (0.1, -0.2, 0.9)
    assert obj.bbox_size.z == pytest.approx(0.1) and obj.bbox_center.orientation.w == 1.0
    assert bytes(obj.cloud.data) == bytes(range(40)) and obj.cloud.header.frame_id == "base_link"
    assert decoded.objects[1].label == "cup"


def test_rosbags_bytes_decode_in_rclpy(typestore):
    """The other direction: bytes written by rosbags are read by the generated type support."""
    original = sample_result()
    decoded = typestore.deserialize_cdr(serialize_message(original), "qwen3vl_seg_ros/msg/SegmentationResult")
    raw = typestore.serialize_cdr(decoded, "qwen3vl_seg_ros/msg/SegmentationResult")
    back = deserialize_message(bytes(raw), SegmentationResult)
    # float32 fields hold the Python float as assigned until they cross the wire once
    assert back == deserialize_message(serialize_message(original), SegmentationResult)
    assert back.objects[0].box_score == pytest.approx(0.9) and back.command == original.command


def test_status_constants_and_service_shape():
    assert (SegmentationResult.OK, SegmentationResult.NO_MATCH, SegmentationResult.ERROR) == (0, 1, 2)
    request = Segment.Request(command="all screwdrivers", timeout_s=2.5, request_id="r")
    assert deserialize_message(serialize_message(request), Segment.Request) == request
    response = Segment.Response(result=sample_result())
    assert deserialize_message(serialize_message(response), Segment.Response).result.request_id == "req-7"

"""vision_msgs detections from a SegmentationResult, and the node without vision_msgs."""

from __future__ import annotations

import pytest
from geometry_msgs.msg import Point, Pose, Quaternion, Vector3
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import RegionOfInterest
from vision_msgs.msg import Detection2DArray, Detection3DArray

from qwen3vl_seg_ros.msg import SegmentationResult, SegmentedObject
from qwen3vl_seg_ros.ros import detections
from qwen3vl_seg_ros.ros.detections import detections_2d, detections_3d

from ros_harness import Client, NodeHarness, Scene, new_context


def _result() -> SegmentationResult:
    result = SegmentationResult(geometry_frame_id="base_link")
    result.header.frame_id = "camera_optical"
    result.header.stamp.sec, result.header.stamp.nanosec = 12, 34
    mug = SegmentedObject(id=1, track_id=7, label="red mug", score=0.8, has_3d=True,
                          box=RegionOfInterest(x_offset=10, y_offset=20, width=30, height=41))
    mug.centroid = Point(x=0.5, y=-0.1, z=0.05)
    mug.bbox_center = Pose(position=Point(x=0.5, y=-0.1, z=0.06), orientation=Quaternion(z=0.6, w=0.8))
    mug.bbox_size = Vector3(x=0.08, y=0.09, z=0.1)
    ball = SegmentedObject(id=2, track_id=0, label="ball", score=0.4, has_3d=False,
                           box=RegionOfInterest(x_offset=0, y_offset=0, width=5, height=5))
    result.objects = [mug, ball]
    return result


def test_every_object_is_a_2d_detection_with_its_box_centre_and_size() -> None:
    out = deserialize_message(serialize_message(detections_2d(_result())), Detection2DArray)  # over the wire
    assert out.header.frame_id == "camera_optical" and (out.header.stamp.sec, out.header.stamp.nanosec) == (12, 34)
    mug, ball = out.detections
    assert mug.id == "7" and ball.id == ""  # the track id; empty when untracked (no id to follow)
    assert (mug.bbox.center.position.x, mug.bbox.center.position.y) == (25.0, 40.5)
    assert (mug.bbox.size_x, mug.bbox.size_y, mug.bbox.center.theta) == (30.0, 41.0, 0.0)
    assert [(h.hypothesis.class_id, h.hypothesis.score) for h in mug.results] == [("red mug", pytest.approx(0.8))]


def test_only_objects_with_3d_are_3d_detections_in_the_geometry_frame() -> None:
    out = deserialize_message(serialize_message(detections_3d(_result())), Detection3DArray)
    assert out.header.frame_id == "base_link" and out.header.stamp.sec == 12
    (mug,) = out.detections
    assert mug.id == "7" and mug.header.frame_id == "base_link"
    assert mug.bbox.center.orientation == Quaternion(z=0.6, w=0.8) and mug.bbox.size == Vector3(x=0.08, y=0.09, z=0.1)
    (hyp,) = mug.results
    assert hyp.pose.pose.position == Point(x=0.5, y=-0.1, z=0.05) and hyp.pose.pose.orientation.w == 1.0
    empty = SegmentationResult()
    empty.header.frame_id = "camera_optical"
    assert detections_3d(empty).header.frame_id == "camera_optical"  # no geometry: the image's frame


@pytest.mark.ros
def test_without_vision_msgs_the_node_serves_everything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module as its failed import leaves it: AVAILABLE false and no vision_msgs names (with
    the names left in place, a call that should not happen went unnoticed)."""
    monkeypatch.setattr(detections, "AVAILABLE", False)
    for name in ("BoundingBox2D", "BoundingBox3D", "Detection2D", "Detection2DArray", "Detection3D",
                 "Detection3DArray", "ObjectHypothesisWithPose"):
        monkeypatch.delattr(detections, name)
    context = new_context("test_no_vision_msgs")
    node = NodeHarness(context)
    client = Client(context, node_fqn="/test_no_vision_msgs/qwen3vl_seg")
    try:
        client.wait_connected()
        client.publish_frame(Scene(), wait_node=node.node)
        result = client.call("red").result
        assert result.status == SegmentationResult.OK, result.message
        assert client.call("green").result.status == SegmentationResult.NO_MATCH  # no blob: empty arrays are not sent
        assert "detections" not in node.node._pubs
        assert client.node.count_publishers("/test_no_vision_msgs/qwen3vl_seg/detections") == 0
        assert client.node.count_publishers("/test_no_vision_msgs/qwen3vl_seg/result") == 1
    finally:
        client.close()
        node.close()
        context.try_shutdown()


def test_per_result_bench_rows_time_the_real_work() -> None:
    """bench/bench_geometry.py's per-result rows time what they name: the tracker gives each of
    the five objects its own id and keeps it frame after frame, and the detections hold all five."""
    from helpers import load_bench

    bench = load_bench("bench_geometry")
    result, track = bench.per_result_case()
    first = track()
    assert len(set(first)) == 5 and all(i > 0 for i in first)
    assert track() == first  # the same objects next frame: the same ids
    assert len(detections.detections_2d(result).detections) == 5
    assert len(detections.detections_3d(result).detections) == 5
    rows = bench._bench_per_result(repeat=3)
    assert [r[0] for r in rows] == ["track ids, 5 objects", "vision_msgs, 5 objects"]

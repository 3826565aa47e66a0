"""RViz markers of a SegmentationResult: a DELETEALL per namespace first, then box, label, centroid per object."""

from __future__ import annotations

import math

import numpy as np
import pytest
from geometry_msgs.msg import Point, Pose, Quaternion, Vector3
from rclpy.serialization import deserialize_message, serialize_message
from std_msgs.msg import Header
from visualization_msgs.msg import Marker, MarkerArray

from qwen3vl_seg_ros.msg import SegmentationResult, SegmentedObject
from qwen3vl_seg_ros.ros.markers import MarkerStyle, build_markers, color_for_id, markers_from_result

S = math.sqrt(0.5)


def make_object(oid: int, label: str, score: float, has_3d: bool = True) -> SegmentedObject:
    obj = SegmentedObject(id=oid, label=label, score=score, has_3d=has_3d)
    # Box rotated +90 degrees about x: its z axis is the frame's -y ("up" in an optical frame).
    obj.bbox_center = Pose(position=Point(x=0.1, y=0.2, z=1.0), orientation=Quaternion(x=S, y=0.0, z=0.0, w=S))
    obj.bbox_size = Vector3(x=0.2, y=0.1, z=0.06)
    obj.centroid = Point(x=0.11, y=0.21, z=1.01)
    return obj


def make_result(objects: list[SegmentedObject], frame: str = "camera_color_optical_frame") -> SegmentationResult:
    result = SegmentationResult(objects=objects, geometry_frame_id=frame)
    result.header.frame_id = "camera_color_optical_frame"
    result.header.stamp.sec, result.header.stamp.nanosec = 42, 7
    return result


def test_deleteall_first_then_three_markers_per_3d_object() -> None:
    objs = [make_object(1, "mug", 0.876), make_object(2, "ball", 0.5, has_3d=False), make_object(3, "box", 0.25)]
    array = markers_from_result(make_result(objs, "base_link"))
    first, rest = array.markers[:3], array.markers[3:]
    # RViz 2 matches a DELETEALL's namespace whole: one for each namespace markers are added in
    assert [(m.action, m.ns) for m in first] == [(Marker.DELETEALL, f"qwen3vl_seg/{kind}")
                                                 for kind in ("boxes", "labels", "centroids")]
    assert {m.ns for m in rest} == {m.ns for m in first}
    assert len(rest) == 6  # object 2 has no 3D
    assert [(m.ns, m.id, m.type) for m in rest] == [
        ("qwen3vl_seg/boxes", 1, Marker.CUBE), ("qwen3vl_seg/labels", 1, Marker.TEXT_VIEW_FACING),
        ("qwen3vl_seg/centroids", 1, Marker.SPHERE),
        ("qwen3vl_seg/boxes", 3, Marker.CUBE), ("qwen3vl_seg/labels", 3, Marker.TEXT_VIEW_FACING),
        ("qwen3vl_seg/centroids", 3, Marker.SPHERE),
    ]
    for m in array.markers:
        assert m.header.frame_id == "base_link"
        assert (m.header.stamp.sec, m.header.stamp.nanosec) == (42, 7)
    assert all(m.action == Marker.ADD for m in rest)


def test_box_label_and_centroid_geometry() -> None:
    box, label, dot = build_markers([make_object(5, "red mug", 0.876)], Header(frame_id="cam"),
                                    style=MarkerStyle(text_height_m=0.05)).markers[3:]
    assert box.pose.position == Point(x=0.1, y=0.2, z=1.0)
    assert box.pose.orientation == Quaternion(x=S, y=0.0, z=0.0, w=S)
    assert (box.scale.x, box.scale.y, box.scale.z) == pytest.approx((0.2, 0.1, 0.06))
    assert label.text == "red mug 0.88"
    # Above the box along its own z axis (= -y here): centre + (0.06 / 2 + 0.05) * (0, -1, 0).
    p = label.pose.position
    assert (p.x, p.y, p.z) == pytest.approx((0.1, 0.2 - 0.08, 1.0), abs=1e-12)
    assert label.scale.z == pytest.approx(0.05)
    assert dot.pose.position == Point(x=0.11, y=0.21, z=1.01)
    assert dot.scale.x == dot.scale.y == dot.scale.z == pytest.approx(0.02)


def test_colours_are_per_object() -> None:
    objs = [make_object(i, "x", 0.5) for i in (1, 2, 3)]
    markers = build_markers(objs, Header(frame_id="cam")).markers[3:]
    by_id: dict[int, set] = {}
    for m in markers:
        by_id.setdefault(m.id, set()).add((round(m.color.r, 6), round(m.color.g, 6), round(m.color.b, 6)))
    assert all(len(c) == 1 for c in by_id.values())  # box, label and centroid share the colour
    colours = [next(iter(by_id[i])) for i in (1, 2, 3)]
    assert len(set(colours)) == 3
    for a in range(3):
        for b in range(a + 1, 3):
            assert np.abs(np.subtract(colours[a], colours[b])).max() > 0.2  # clearly different
    assert color_for_id(2) == color_for_id(2)
    box = markers[0]
    assert box.color.a == pytest.approx(0.35) and markers[1].color.a == pytest.approx(1.0)


def test_namespace_lifetime_and_flat_boxes() -> None:
    obj = make_object(1, "card", 0.9)
    obj.bbox_size = Vector3(x=0.2, y=0.0, z=0.1)  # a flat object: RViz refuses zero scales
    array = build_markers([obj], Header(frame_id="cam"), lifetime_s=1.5, namespace="seg")
    assert {m.ns for m in array.markers} == {"seg/boxes", "seg/labels", "seg/centroids"}
    for m in array.markers[3:]:
        assert (m.lifetime.sec, m.lifetime.nanosec) == (1, 500_000_000)
    assert array.markers[3].scale.y > 0.0


def test_result_without_3d_gives_only_deleteall_in_image_frame() -> None:
    result = make_result([make_object(1, "mug", 0.9)], frame="")
    array = markers_from_result(result)
    assert len(array.markers) == 3 and all(m.action == Marker.DELETEALL for m in array.markers)
    assert all(m.header.frame_id == "camera_color_optical_frame" for m in array.markers)


def test_serialises() -> None:
    array = markers_from_result(make_result([make_object(1, "mug", 0.9)]))
    back = deserialize_message(serialize_message(array), MarkerArray)
    # Compared as messages, not bytes: the CDR padding after a string is not initialised, so two
    # serialisations of one message could differ (1 of 12 runs did). Colours are float32 on the
    # wire, so ``back``, which crossed it once, is what a second crossing must give unchanged.
    assert deserialize_message(serialize_message(back), MarkerArray) == back
    assert len(back.markers) == len(array.markers)
    assert [m.text for m in back.markers] == ["", "", "", "", "mug 0.90", ""]


def test_a_tracked_object_shows_its_track_and_keeps_its_colour() -> None:
    """Object 1 of this result is track 7; in the next result it is object 2, the same colour."""
    now = make_object(1, "mug", 0.9)
    now.track_id = 7
    later = make_object(2, "mug", 0.8)
    later.track_id = 7
    untracked = make_object(1, "mug", 0.9)
    first = build_markers([now], Header(frame_id="cam")).markers[3:]
    second = build_markers([later], Header(frame_id="cam")).markers[3:]
    assert first[1].text == "#7 mug 0.90" and untracked.track_id == 0
    assert build_markers([untracked], Header(frame_id="cam")).markers[4].text == "mug 0.90"
    for a, b in zip(first, second):
        assert (a.color.r, a.color.g, a.color.b) == (b.color.r, b.color.g, b.color.b)
    assert [m.id for m in second] == [2, 2, 2]  # marker ids stay the result's object ids

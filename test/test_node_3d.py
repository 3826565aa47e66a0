"""The node's 3D outputs over DDS: clouds, markers, TF to a target frame, and every failure path."""

from __future__ import annotations

import time

import numpy as np
import pytest
from geometry_msgs.msg import TransformStamped
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter
from tf2_msgs.msg import TFMessage
from visualization_msgs.msg import Marker

from qwen3vl_seg_ros.msg import SegmentationResult
from qwen3vl_seg_ros.ros.pointcloud import read_points

from helpers import wait_for
from ros_harness import Client, NodeHarness, Scene, camera_info_msg, image_msg, new_context, transient_local_qos

pytestmark = pytest.mark.ros
SUCCESS = TransitionCallbackReturn.SUCCESS


@pytest.fixture(scope="module")
def system():
    context = new_context("test_node_3d")
    node = NodeHarness(context, {"min_points": 20, "erode_px": 1})
    client = Client(context, node_fqn="/test_node_3d/qwen3vl_seg")
    client.wait_connected()
    yield node, client
    client.close()
    node.close()
    context.try_shutdown()


def set_params(node: NodeHarness, **values) -> None:
    node.node.set_parameters([Parameter(k, value=v) for k, v in values.items()])


def publish(system, scene: Scene, depth: np.ndarray, depth_encoding="32FC1", depth_frame="camera_optical",
            info=True, info_scene: Scene | None = None, image_frame="camera_optical",
            info_frame: str | None = None) -> None:
    """Publishes one RGB-D frame and waits until the node holds it (image, depth and info)."""
    node, client = system
    stamp = client.node.get_clock().now().to_msg()
    t = stamp.sec + stamp.nanosec * 1e-9

    def holds() -> bool:
        frame = node.node._frames.latest(time.monotonic())
        return (frame is not None and frame.stamp == t and frame.depth_stamp == t
                and (not info or (frame.camera_info is not None and frame.camera_info.header.stamp == stamp)))

    for _ in range(10):  # best-effort topics: send again when a message was lost
        client.image_pub.publish(image_msg(scene.rgb(), "rgb8", frame_id=image_frame, stamp=stamp))
        client.depth_pub.publish(image_msg(depth, depth_encoding, frame_id=depth_frame, stamp=stamp))
        if info:
            client.info_pub.publish(camera_info_msg(info_scene or scene, stamp=stamp,
                                                    frame_id=image_frame if info_frame is None else info_frame))
        if wait_for(holds, 1.0):
            return
    raise AssertionError("the node did not receive the published frame")


def test_cloud_and_markers_are_published_for_all_objects(system):
    node, client = system
    scene = Scene()
    n_clouds, n_markers = len(client.snapshot(client.clouds)), len(client.snapshot(client.markers))
    publish(system, scene, scene.depth_m())
    result = client.call("red blue").result
    assert result.status == SegmentationResult.OK and all(o.has_3d for o in result.objects)
    assert wait_for(lambda: len(client.snapshot(client.clouds)) > n_clouds, 5)
    assert wait_for(lambda: len(client.snapshot(client.markers)) > n_markers, 5)
    cloud = read_points(client.snapshot(client.clouds)[-1])
    assert set(np.unique(cloud["id"])) == {o.id for o in result.objects}
    for obj in result.objects:
        pts = cloud[cloud["id"] == obj.id]
        assert len(pts) == obj.num_points
        assert float(np.mean(pts["z"])) == pytest.approx(obj.centroid.z, abs=1e-4)
    markers = client.snapshot(client.markers)[-1].markers
    assert [m.action for m in markers[:3]] == [Marker.DELETEALL] * 3
    kinds = sorted(m.type for m in markers[3:])
    assert kinds.count(Marker.CUBE) == 2 and kinds.count(Marker.TEXT_VIEW_FACING) == 2
    assert all(m.header.frame_id == "camera_optical" for m in markers[1:])


def test_a_result_without_3d_clears_the_objects_on_display(system):
    """After an answer with 3D objects, a NO_MATCH (or an answer without 3D) publishes the lone
    DELETEALL and an empty cloud, so RViz does not go on showing the old objects; the next one
    without 3D publishes nothing more."""
    node, client = system
    scene = Scene()
    publish(system, scene, scene.depth_m())
    n_clouds, n_markers = len(client.snapshot(client.clouds)), len(client.snapshot(client.markers))
    assert client.call("red").result.status == SegmentationResult.OK
    assert wait_for(lambda: len(client.snapshot(client.markers)) > n_markers
                    and len(client.snapshot(client.clouds)) > n_clouds, 5)  # this call's objects shown
    time.sleep(0.1)
    n_clouds, n_markers = len(client.snapshot(client.clouds)), len(client.snapshot(client.markers))
    assert client.call("green").result.status == SegmentationResult.NO_MATCH  # no green blob in the scene
    assert wait_for(lambda: len(client.snapshot(client.markers)) == n_markers + 1, 5)
    assert wait_for(lambda: len(client.snapshot(client.clouds)) == n_clouds + 1, 5)
    cleared = client.snapshot(client.markers)[-1].markers
    assert [m.action for m in cleared] == [Marker.DELETEALL] * 3
    assert all(m.header.frame_id == "camera_optical" for m in cleared)
    empty = client.snapshot(client.clouds)[-1]
    assert empty.width * empty.height == 0 and empty.header.frame_id == "camera_optical"
    assert client.call("green").result.status == SegmentationResult.NO_MATCH
    time.sleep(0.3)  # nothing more to clear
    assert len(client.snapshot(client.markers)) == n_markers + 1 and len(client.snapshot(client.clouds)) == n_clouds + 1



def test_an_output_switched_off_clears_what_it_shows_at_once(system):
    """`ros2 param set ... publish_markers false` (and the cloud and detections) left the last
    objects on display for good (markers last until replaced, a planner keeps the last arrays):
    each output that shows objects clears them when switched off, then stays silent."""
    node, client = system
    scene = Scene()
    publish(system, scene, scene.depth_m())
    outputs = (client.clouds, client.markers, client.detections, client.detections_3d)

    def counts() -> list[int]:
        return [len(client.snapshot(out)) for out in outputs]

    before = counts()
    assert client.call("red").result.status == SegmentationResult.OK
    assert wait_for(lambda: all(a > b for a, b in zip(counts(), before)), 5)
    time.sleep(0.1)
    shown = counts()
    try:
        set_params(node, publish_cloud=False, publish_markers=False, publish_detections=False)
        assert wait_for(lambda: counts() == [n + 1 for n in shown], 5), (counts(), shown)
        assert [m.action for m in client.snapshot(client.markers)[-1].markers] == [Marker.DELETEALL] * 3
        empty = client.snapshot(client.clouds)[-1]
        assert empty.width * empty.height == 0 and empty.header.frame_id == "camera_optical"
        assert not client.snapshot(client.detections)[-1].detections
        assert not client.snapshot(client.detections_3d)[-1].detections
        assert client.call("red").result.status == SegmentationResult.OK  # off: nothing more
    finally:
        set_params(node, publish_cloud=True, publish_markers=True, publish_detections=True)
    # on again, a sentinel call on a new frame: once its message is the last on each output, exactly
    # one more each means the call made while off sent nothing (each output's messages come in order)
    publish(system, scene, scene.depth_m())
    sentinel = client.call("red").result
    assert sentinel.status == SegmentationResult.OK

    def last_stamps() -> list:
        last = [client.snapshot(out)[-1] for out in outputs]
        return [last[0].header.stamp, last[1].markers[-1].header.stamp, last[2].header.stamp, last[3].header.stamp]

    assert wait_for(lambda: last_stamps() == [sentinel.header.stamp] * 4, 5), (last_stamps(), sentinel.header.stamp)
    assert counts() == [n + 2 for n in shown]
    assert len(client.snapshot(client.detections)[-1].detections) == 1


def test_mask_overlay_and_marker_parameters_reach_their_outputs(system):
    """publish_mask / publish_overlay off send nothing (a sentinel call afterwards, with them on,
    is the next message); overlay_alpha 0 leaves a mask's pixels as the camera saw them, 1 paints
    them; marker_lifetime_s reaches every marker. No test used these four before."""
    node, client = system
    scene = Scene()
    publish(system, scene, scene.depth_m())
    red = scene.rgb()[55, 40]  # inside the red rectangle (20..60, 30..80), away from its box's lines

    def counts() -> tuple[int, int]:
        return len(client.snapshot(client.masks)), len(client.snapshot(client.overlays))

    try:
        set_params(node, publish_mask=False, publish_overlay=False)
        before = counts()
        assert client.call("red").result.status == SegmentationResult.OK
        set_params(node, publish_mask=True, publish_overlay=True, overlay_alpha=0.0, marker_lifetime_s=1.5)
        n_markers = len(client.snapshot(client.markers))
        assert client.call("red").result.status == SegmentationResult.OK  # the sentinel
        assert wait_for(lambda: counts() == (before[0] + 1, before[1] + 1), 5), (counts(), before)
        plain = client.snapshot(client.overlays)[-1]
        assert tuple(np.frombuffer(bytes(plain.data), np.uint8).reshape(plain.height, plain.width, 3)[55, 40]) \
            == tuple(int(v) for v in red[::-1])  # bgr8, untouched
        assert wait_for(lambda: len(client.snapshot(client.markers)) > n_markers, 5)
        shown = [m for m in client.snapshot(client.markers)[-1].markers if m.action == Marker.ADD]
        assert shown and all((m.lifetime.sec, m.lifetime.nanosec) == (1, 500_000_000) for m in shown)
        set_params(node, overlay_alpha=1.0)
        assert client.call("red").result.status == SegmentationResult.OK
        assert wait_for(lambda: counts()[1] == before[1] + 2, 5)
        painted = client.snapshot(client.overlays)[-1]
        pixel = np.frombuffer(bytes(painted.data), np.uint8).reshape(painted.height, painted.width, 3)[55, 40]
        assert tuple(pixel) != tuple(int(v) for v in red[::-1])  # the object's colour, not the camera's
    finally:
        set_params(node, publish_mask=True, publish_overlay=True, overlay_alpha=0.5, marker_lifetime_s=0.0)

def test_depth_at_half_resolution_scales_intrinsics(system):
    node, client = system
    scene = Scene()
    half = scene.depth_m()[::2, ::2].copy()
    publish(system, scene, half)
    result = client.call("blue").result
    assert result.status == SegmentationResult.OK, result.message
    obj = result.objects[0]
    assert obj.has_3d and obj.centroid.z == pytest.approx(0.8, abs=0.005)
    x1, _, x2, _, z = scene.rects["blue"]
    assert obj.centroid.x == pytest.approx(((x1 + x2 - 1) / 2 - scene.cx) * z / scene.fx, abs=0.015)


def test_depth_with_another_aspect_ratio_is_an_error(system):
    node, client = system
    scene = Scene()
    publish(system, scene, np.ones((100, 100), np.float32))
    result = client.call("red").result
    assert result.status == SegmentationResult.ERROR
    assert "aspect ratios" in result.message and "100x100" in result.message


def test_depth_in_another_frame_is_reported_not_mixed(system):
    node, client = system
    scene = Scene()
    publish(system, scene, scene.depth_m(), depth_frame="other_camera")
    result = client.call("red").result
    assert result.status == SegmentationResult.OK
    obj = result.objects[0]
    assert not obj.has_3d and "differs from the colour image frame" in obj.status_3d
    assert "other_camera" in result.message


@pytest.mark.parametrize("empty", ["depth image", "camera_info"])
def test_depth_or_camera_info_without_a_frame_is_used_with_a_warning(system, empty):
    """Whether they belong to the colour camera cannot be checked: said, not silent."""
    node, client = system
    scene = Scene()
    publish(system, scene, scene.depth_m(), depth_frame="" if empty == "depth image" else "camera_optical",
            info_frame="" if empty == "camera_info" else None)
    result = client.call("red").result
    assert result.status == SegmentationResult.OK and result.objects[0].has_3d
    assert f"{empty} has an empty header.frame_id: cannot check that it belongs to 'camera_optical'" in result.message
    other = "camera_info" if empty == "depth image" else "depth image"
    assert f"{other} has an empty" not in result.message


def test_empty_camera_frame_gives_2d_with_reason(system):
    """Clouds in frame "" are dropped by TF and RViz; the result says why there is no 3D."""
    node, client = system
    scene = Scene()
    publish(system, scene, scene.depth_m(), depth_frame="", image_frame="")
    result = client.call("red").result
    assert result.status == SegmentationResult.OK and result.geometry_frame_id == ""
    obj = result.objects[0]
    assert not obj.has_3d and "empty header.frame_id" in obj.status_3d
    assert "empty header.frame_id" in result.message


def test_leading_slash_frame_is_dropped_from_3d_outputs(system):
    """tf2 rejects frame ids that start with '/', a ROS 1 habit some drivers keep."""
    node, client = system
    scene = Scene()
    publish(system, scene, scene.depth_m(), depth_frame="/camera_optical", image_frame="/camera_optical")
    result = client.call("red").result
    assert result.status == SegmentationResult.OK and result.objects[0].has_3d
    assert result.geometry_frame_id == "camera_optical"
    assert result.objects[0].cloud.header.frame_id == "camera_optical"


def test_deactivate_and_cleanup_clear_the_objects_on_display():
    """An inactive or unconfigured node reports no objects: its markers (lasting until replaced)
    and cloud are cleared once, and a node configured anew does not leave the old ones behind."""
    context = new_context("test_node_3d_lifecycle")
    node = NodeHarness(context, {"min_points": 20})
    client = Client(context, node_fqn="/test_node_3d_lifecycle/qwen3vl_seg")

    def shown_then_cleared_by(transition) -> None:
        client.wait_connected()
        scene = Scene()
        publish((node, client), scene, scene.depth_m())
        streams = (client.clouds, client.markers, client.detections, client.detections_3d)
        before = [len(client.snapshot(stream)) for stream in streams]
        assert client.call("red").result.objects[0].has_3d
        # each output of this one result, counted, not a pause: on a loaded machine 0.3 s was short
        assert wait_for(lambda: all(len(client.snapshot(s)) == n + 1 for s, n in zip(streams, before)), 5)
        n_clouds, n_markers, n_2d, n_3d = (n + 1 for n in before)
        assert client.snapshot(client.detections)[-1].detections  # vision_msgs consumers see the object
        assert transition() == SUCCESS
        assert wait_for(lambda: len(client.snapshot(client.markers)) == n_markers + 1, 5)
        assert [m.action for m in client.snapshot(client.markers)[-1].markers] == [Marker.DELETEALL] * 3
        assert wait_for(lambda: len(client.snapshot(client.clouds)) == n_clouds + 1, 5)
        assert client.snapshot(client.clouds)[-1].width == 0
        # and the detection topics, which a consumer also reads as "what is there now"
        assert wait_for(lambda: len(client.snapshot(client.detections)) == n_2d + 1
                        and len(client.snapshot(client.detections_3d)) == n_3d + 1, 5)
        assert not client.snapshot(client.detections)[-1].detections
        assert not client.snapshot(client.detections_3d)[-1].detections

    try:
        shown_then_cleared_by(node.node.trigger_deactivate)
        assert node.node.trigger_activate() == SUCCESS
        shown_then_cleared_by(node.node.trigger_deactivate)
        assert node.node.trigger_cleanup() == SUCCESS  # already cleared: nothing more
        assert node.node.trigger_configure() == SUCCESS and node.node.trigger_activate() == SUCCESS
        client.wait_connected()
        time.sleep(0.3)
        n_markers = len(client.snapshot(client.markers))
        shown_then_cleared_by(node.node.trigger_deactivate)
        assert len(client.snapshot(client.markers)) == n_markers + 2  # the objects, then their clear
    finally:
        client.close()
        node.close()
        context.try_shutdown()


def test_markers_live_in_the_node_names_namespace():
    """Two nodes' markers remapped onto one topic must not clear each other's: each node's
    DELETEALLs and markers carry its own name."""
    context = new_context("test_node_3d_named")
    node = NodeHarness(context, {"min_points": 20}, node_name="left_arm_seg")
    client = Client(context, node_fqn="/test_node_3d_named/left_arm_seg")
    try:
        client.wait_connected()
        scene = Scene()
        publish((node, client), scene, scene.depth_m())
        assert client.call("red").result.objects[0].has_3d
        assert wait_for(lambda: client.snapshot(client.markers), 5)
        spaces = {m.ns for m in client.snapshot(client.markers)[-1].markers}
        assert spaces == {"left_arm_seg/boxes", "left_arm_seg/labels", "left_arm_seg/centroids"}
    finally:
        client.close()
        node.close()
        context.try_shutdown()


def test_missing_camera_info_gives_2d_with_reason():
    context = new_context("test_node_3d_no_info")
    node = NodeHarness(context)
    client = Client(context, node_fqn="/test_node_3d_no_info/qwen3vl_seg")
    try:
        client.wait_connected()
        scene = Scene()
        publish((node, client), scene, scene.depth_m(), info=False)
        result = client.call("red").result
        assert result.status == SegmentationResult.OK
        assert not result.objects[0].has_3d and "no CameraInfo" in result.objects[0].status_3d
    finally:
        client.close()
        node.close()
        context.try_shutdown()


def test_invalid_depth_everywhere_gives_reason_per_object(system):
    node, client = system
    scene = Scene()
    depth = np.full((scene.height, scene.width), np.nan, np.float32)
    publish(system, scene, depth)
    result = client.call("red").result
    assert result.status == SegmentationResult.OK
    obj = result.objects[0]
    assert not obj.has_3d and obj.status_3d and "no 3D for object" in result.message
    zeros = np.zeros((scene.height, scene.width), np.uint16)
    publish(system, scene, zeros, depth_encoding="16UC1")
    obj = client.call("red").result.objects[0]
    assert not obj.has_3d and obj.status_3d


def test_target_frame_through_tf_and_its_failure(system):
    node, client = system
    scene = Scene()
    # camera_optical sits 0.5 m above base_link, optical axis pointing down (z_cam = -z_base)
    tf_pub = client.node.create_publisher(TFMessage, "/tf_static", transient_local_qos())
    t = TransformStamped()
    t.header.frame_id, t.child_frame_id = "base_link", "camera_optical"
    t.transform.translation.z = 0.5
    t.transform.rotation.x = 1.0  # 180 deg about x: y -> -y, z -> -z
    t.transform.rotation.w = 0.0
    tf_pub.publish(TFMessage(transforms=[t]))
    set_params(node, target_frame="base_link", tf_timeout_s=1.0)
    try:
        time.sleep(0.5)
        publish(system, scene, scene.depth_m())
        result = client.call("blue").result
        assert result.status == SegmentationResult.OK, result.message
        obj = result.objects[0]
        assert result.geometry_frame_id == "base_link" and obj.cloud.header.frame_id == "base_link"
        assert obj.centroid.z == pytest.approx(0.5 - 0.8, abs=0.005)
        x1, y1, x2, y2, z = scene.rects["blue"]
        assert obj.centroid.y == pytest.approx(-((y1 + y2 - 1) / 2 - scene.cy) * z / scene.fy, abs=0.01)

        set_params(node, target_frame="no_such_frame", tf_timeout_s=0.2)
        publish(system, scene, scene.depth_m())
        result = client.call("blue").result
        assert result.status == SegmentationResult.OK
        assert result.geometry_frame_id == "camera_optical"
        assert "no transform to target_frame 'no_such_frame'" in result.message
        assert result.objects[0].centroid.z == pytest.approx(0.8, abs=0.005)
    finally:
        set_params(node, target_frame="")
        client.node.destroy_publisher(tf_pub)

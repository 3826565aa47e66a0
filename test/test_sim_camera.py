"""The simulated RGB-D camera: what it renders, and what arrives over DDS (frames, TF, ground truth).

The last test runs the real node (colour-blob test double) on the simulated camera and checks
its 3D answers, in the world frame through the camera's static TF, against the scene's truth.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import rclpy
from builtin_interfaces.msg import Time
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage

from qwen3vl_seg_ros.msg import SegmentationResult
from qwen3vl_seg_ros.ros.sim_camera import (
    FLAT_RGB,
    SimCamera,
    camera_info,
    depth_image,
    ground_truth,
    latched_qos,
    render_scene,
    static_transforms,
    top_z,
)
from qwen3vl_seg_ros.ros.spinner import BackgroundSpinner
from qwen3vl_seg_ros.ros.tf import transform_from_msg
from qwen3vl_seg_ros.training.synthetic import SPLIT_OFFSETS, SceneConfig, generate_sample, split_seed

from helpers import wait_for
from ros_harness import Client, NodeHarness, new_context

FRAMES = {"camera": "camera_color_optical_frame", "world": "world", "table": "table"}
SMALL = {"width": 160, "height": 120}


# ---------------------------------------------------------------------------------------------
# without DDS
# ---------------------------------------------------------------------------------------------
def test_scenes_come_from_the_test_split_and_are_deterministic():
    a, b = render_scene(3, **SMALL), render_scene(3, **SMALL)
    assert a.seed == split_seed("test", 3) >= SPLIT_OFFSETS["test"]
    np.testing.assert_array_equal(a.rgb, b.rgb)
    scene, queries = generate_sample(a.seed, SceneConfig(**SMALL))
    np.testing.assert_array_equal(a.scene.depth, scene.depth)
    assert [q.expression for q in a.queries] == [q.expression for q in queries]
    assert not np.array_equal(a.rgb, render_scene(4, **SMALL).rgb)


def test_flat_colours_paint_each_object_in_its_exact_colour():
    plain, flat = render_scene(5, **SMALL), render_scene(5, flat_colours=True, **SMALL)
    ids = flat.scene.instance_ids
    for obj in flat.scene.objects:
        assert (flat.rgb[obj.mask] == FLAT_RGB[obj.colour]).all()
    np.testing.assert_array_equal(flat.rgb[ids == 0], plain.rgb[ids == 0])  # the table is untouched
    np.testing.assert_array_equal(flat.scene.depth, plain.scene.depth)


def test_depth_encodings():
    depth = np.array([[0.5, np.nan], [1.2344, 70.0]], np.float32)
    np.testing.assert_array_equal(depth_image(depth, "32FC1"), depth)
    mm = depth_image(depth, "16UC1")
    assert mm.dtype == np.uint16
    np.testing.assert_array_equal(mm, [[500, 0], [1234, 65535]])  # no reading -> 0, beyond range clipped
    with pytest.raises(ValueError, match="32FC1, 16UC1"):
        depth_image(depth, "mm")


def test_camera_info_and_static_tf_match_the_scene():
    rendered = render_scene(1, **SMALL)
    intr = rendered.scene.intrinsics
    info = camera_info(intr, "cam")
    assert (info.width, info.height) == (160, 120) and info.header.frame_id == "cam"
    assert list(info.k) == [intr.fx, 0.0, intr.cx, 0.0, intr.fy, intr.cy, 0.0, 0.0, 1.0]
    assert info.p[0] == intr.fx and info.p[10] == 1.0
    tf = static_transforms(rendered.scene, FRAMES, Time(sec=1, nanosec=2))
    camera, table = tf.transforms
    assert (camera.header.frame_id, camera.child_frame_id) == ("world", "camera_color_optical_frame")
    np.testing.assert_allclose(transform_from_msg(camera.transform).as_matrix(), rendered.scene.cam_to_world,
                               atol=1e-9)
    assert (table.header.frame_id, table.child_frame_id) == ("world", "table")
    assert table.transform.translation.x == rendered.scene.table.centre[0]


def test_ground_truth_document():
    rendered = render_scene(2, **SMALL)
    doc = json.loads(json.dumps(ground_truth(rendered, 7, Time(sec=5, nanosec=6), FRAMES)))
    assert doc["number"] == 7 and doc["index"] == 2 and doc["seed"] == split_seed("test", 2)
    assert doc["stamp"] == {"sec": 5, "nanosec": 6} and doc["frame_id"] == "camera_color_optical_frame"
    ids = {o["id"] for o in doc["objects"]}
    assert ids == set(range(1, len(rendered.scene.objects) + 1))
    for q in doc["queries"]:
        assert set(q["target_ids"]) <= ids and q["type"] in ("referring", "category", "multi", "no_target")
    for o, obj in zip(doc["objects"], rendered.scene.objects):
        assert o["colour"] == obj.colour and o["position"][2] == 0.0 and 0.0 < o["top_z"] < 0.2


# ---------------------------------------------------------------------------------------------
# over DDS
# ---------------------------------------------------------------------------------------------
class Spun:
    """A node on its own context and executor thread (a separate DDS participant)."""

    def __init__(self, make) -> None:
        self.context = Context()
        rclpy.init(context=self.context)
        self.node = make(self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.spinner = BackgroundSpinner(self.executor, name="sim-camera-test-spin").start()

    def close(self) -> None:
        self.spinner.stop(shutdown_timeout=1.0)
        self.node.destroy_node()
        self.context.try_shutdown()


def camera(**params) -> Spun:
    overrides = [Parameter(k, value=v) for k, v in {**SMALL, "rate_hz": 20.0, **params}.items()]
    return Spun(lambda ctx: SimCamera(context=ctx, parameter_overrides=overrides))


class Listener:
    """Records everything the camera publishes; subscribes only when asked (late joiner)."""

    def __init__(self) -> None:
        self.spun = Spun(lambda ctx: Node("sim_listener", context=ctx))
        self.lock = threading.Lock()
        self.got: dict[str, list] = {k: [] for k in ("image", "depth", "info", "tf", "gt", "labels")}

    def keep(self, key: str):
        def callback(msg) -> None:
            with self.lock:
                self.got[key].append(msg)
        return callback

    def subscribe(self) -> None:
        sub = self.spun.node.create_subscription
        sub(Image, "image", self.keep("image"), qos_profile_sensor_data)
        sub(Image, "depth", self.keep("depth"), qos_profile_sensor_data)
        sub(CameraInfo, "camera_info", self.keep("info"), qos_profile_sensor_data)
        sub(TFMessage, "/tf_static", self.keep("tf"), latched_qos())
        sub(String, "/sim_camera/ground_truth", lambda m: self.keep("gt")(json.loads(m.data)), latched_qos())
        sub(Image, "/sim_camera/ground_truth_labels", self.keep("labels"), latched_qos())

    def of(self, key: str) -> list:
        with self.lock:
            return list(self.got[key])

    def next_scene(self) -> Trigger.Response:
        client = self.spun.node.create_client(Trigger, "/sim_camera/next_scene")
        assert client.wait_for_service(timeout_sec=10.0)
        future = client.call_async(Trigger.Request())
        assert wait_for(future.done, 10.0)
        return future.result()


def stamp_ns(msg) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


def pixels(msg: Image, dtype, channels: int = 1) -> np.ndarray:
    arr = np.frombuffer(bytes(msg.data), dtype).reshape(msg.height, -1)[:, : msg.width * channels]
    return arr.reshape(msg.height, msg.width, channels) if channels > 1 else arr


@pytest.mark.ros
def test_frames_tf_and_ground_truth_over_dds_and_next_scene():
    cam = camera(scene_seeds=[2, 5], scene_period_s=0.0)
    listener = Listener()
    try:
        # Subscribing after the camera published its TF and ground truth: latched, so they still come.
        assert wait_for(lambda: cam.node.current is not None, 5.0)
        listener.subscribe()
        assert wait_for(lambda: len(listener.of("image")) >= 3 and listener.of("tf") and listener.of("gt")
                        and listener.of("labels"), 10.0)
        first = render_scene(2, **SMALL)
        gt = listener.of("gt")[-1]
        assert gt["number"] == 0 and gt["index"] == 2 and gt["seed"] == split_seed("test", 2)
        # every frame: one stamp for image, depth and camera_info; sizes, encodings, frames, content
        assert wait_for(lambda: len({stamp_ns(m) for m in listener.of("info")}
                                    & {stamp_ns(m) for m in listener.of("image")}
                                    & {stamp_ns(m) for m in listener.of("depth")}) >= 3, 5.0)
        image, depth = listener.of("image")[-1], listener.of("depth")[-1]
        for msg in (image, depth, listener.of("info")[-1]):
            assert msg.header.frame_id == "camera_color_optical_frame" and (msg.width, msg.height) == (160, 120)
        assert image.encoding == "rgb8" and depth.encoding == "32FC1"
        np.testing.assert_array_equal(pixels(image, np.uint8, 3), first.rgb)
        np.testing.assert_array_equal(pixels(depth, np.float32), first.scene.depth)
        images = listener.of("image")
        assert len({stamp_ns(m) for m in images}) == len(images)  # a fresh stamp on every republish
        labels = listener.of("labels")[-1]
        assert labels.encoding == "mono8" and stamp_ns(labels) == gt["stamp"]["sec"] * 10**9 + gt["stamp"]["nanosec"]
        np.testing.assert_array_equal(pixels(labels, np.uint8), first.scene.instance_ids)
        tf = {t.child_frame_id: t for t in listener.of("tf")[-1].transforms}
        np.testing.assert_allclose(transform_from_msg(tf["camera_color_optical_frame"].transform).as_matrix(),
                                   first.scene.cam_to_world, atol=1e-9)

        # the next scene: new ground truth and TF first, then frames of the new scene
        answer = listener.next_scene()
        assert answer.success and json.loads(answer.message)["index"] == 5
        assert wait_for(lambda: listener.of("gt")[-1]["number"] == 1, 5.0)
        gt = listener.of("gt")[-1]
        start = gt["stamp"]["sec"] * 10**9 + gt["stamp"]["nanosec"]
        second = render_scene(5, **SMALL)
        assert gt["index"] == 5
        assert wait_for(lambda: any(stamp_ns(m) >= start for m in listener.of("image")), 5.0)
        new = [m for m in listener.of("image") if stamp_ns(m) >= start]
        np.testing.assert_array_equal(pixels(new[0], np.uint8, 3), second.rgb)
        assert all(not np.array_equal(pixels(m, np.uint8, 3), second.rgb)
                   for m in listener.of("image") if stamp_ns(m) < start)
        tf = {t.child_frame_id: t for t in listener.of("tf")[-1].transforms}
        np.testing.assert_allclose(transform_from_msg(tf["camera_color_optical_frame"].transform).as_matrix(),
                                   second.scene.cam_to_world, atol=1e-9)
        # the list cycles
        assert json.loads(listener.next_scene().message)["index"] == 2
        # every parameter is in the README's table
        readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
        declared = set(cam.node._parameters) - {"use_sim_time", "start_type_description_service"}
        assert declared and all(f"`{name}`" in readme for name in declared), declared
    finally:
        listener.spun.close()
        cam.close()


@pytest.mark.ros
def test_16uc1_depth_timed_scene_changes_and_bad_parameters():
    cam = camera(depth_encoding="16UC1", seed=7, scene_period_s=0.4, qos="sensor_data")
    listener = Listener()
    try:
        listener.subscribe()
        assert wait_for(lambda: len({g["number"] for g in listener.of("gt")}) >= 3, 10.0)
        scenes = sorted(listener.of("gt"), key=lambda g: g["number"])
        assert [g["index"] for g in scenes] == [7 + g["number"] for g in scenes]  # seed, seed + 1, ...
        begin, end = (g["stamp"]["sec"] * 10**9 + g["stamp"]["nanosec"] for g in scenes[1:3])
        depths = [m for m in listener.of("depth") if begin <= stamp_ns(m) < end]
        assert len(depths) >= 2, "scene_period_s=0.4 at 20 Hz: several frames per scene"
        expected = depth_image(render_scene(scenes[1]["index"], **SMALL).scene.depth, "16UC1")
        for depth in depths:
            assert depth.encoding == "16UC1"
            np.testing.assert_array_equal(pixels(depth, np.uint16), expected)
    finally:
        listener.spun.close()
        cam.close()
    for bad, match in (({"depth_encoding": "mm"}, "depth_encoding"), ({"qos": "fast"}, "qos"),
                       ({"scene_seeds": [1, -2]}, "scene indices"), ({"width": 0}, "width and height")):
        context = new_context()
        try:
            overrides = [Parameter(k, value=v) for k, v in {**SMALL, **bad}.items()]
            with pytest.raises(ValueError, match=match):
                SimCamera(context=context, parameter_overrides=overrides)
        finally:
            context.try_shutdown()


def first_scene_with_a_unique_colour(colours=("red", "green", "blue", "yellow", "white")) -> tuple[int, str]:
    """A test-split scene with an object whose colour no other object has (the double finds it alone)."""
    for index in range(50):
        objects = render_scene(index, flat_colours=True).scene.objects
        for obj in objects:
            if obj.colour in colours and [o.colour for o in objects].count(obj.colour) == 1:
                return index, obj.colour
    raise AssertionError("no scene with a uniquely coloured object")


@pytest.mark.ros
def test_node_on_the_sim_camera_answers_in_the_table_frame():
    index, colour = first_scene_with_a_unique_colour()
    cam = camera(width=320, height=240, rate_hz=10.0, scene_seeds=[index], scene_period_s=0.0, flat_colours=True)
    context = new_context()
    node = NodeHarness(context, {"target_frame": "world", "tf_timeout_s": 1.0})
    client = Client(context)
    try:
        result = None
        for _ in range(20):  # until the TF and a frame have arrived
            result = client.call(colour, timeout_s=3.0).result
            if result.status == SegmentationResult.OK and result.geometry_frame_id == "world":
                break
        assert result.status == SegmentationResult.OK, result.message
        assert result.geometry_frame_id == "world" and result.header.frame_id == "camera_color_optical_frame"
        truth = next(o for o in render_scene(index, flat_colours=True).scene.objects if o.colour == colour)
        obj = result.objects[0]
        assert len(result.objects) == 1 and obj.has_3d, obj.status_3d
        # The visible surface's centroid lies over the object's footprint and between table and top.
        xy = np.hypot(obj.centroid.x - truth.position[0], obj.centroid.y - truth.position[1])
        assert xy < truth.footprint_radius + 0.01, (xy, truth.footprint_radius)
        assert 0.0 < obj.centroid.z < top_z(truth.primitive) + 0.005
    finally:
        client.close()
        node.close()
        context.try_shutdown()
        cam.close()

"""Running the real node and a planner-like client over real DDS inside a test.

Both live in one process but in separate rclpy contexts, executors and participants, so every
message crosses the middleware serialized (rclpy has no intra-process shortcut).
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rclpy
from lifecycle_msgs.msg import State
from lifecycle_msgs.srv import GetState
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSDurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import String
from vision_msgs.msg import Detection2DArray, Detection3DArray
from visualization_msgs.msg import MarkerArray

from qwen3vl_seg_ros.msg import SegmentationResult
from qwen3vl_seg_ros.ros.node import SERVICE_QOS, SegmentationNode
from qwen3vl_seg_ros.ros.spinner import BackgroundSpinner
from qwen3vl_seg_ros.srv import Segment

from helpers import repeating, wait_for

DOUBLE = "doubles.color_blob_segmenter:ColorBlobSegmenterDouble"


@dataclass
class Scene:
    """A small RGB-D scene with known contents: a red and a blue rectangle in front of a wall."""

    width: int = 160
    height: int = 120
    fx: float = 100.0
    fy: float = 100.0
    cx: float = 79.5
    cy: float = 59.5
    wall_m: float = 1.5
    rects: dict[str, tuple[int, int, int, int, float]] = field(default_factory=lambda: {
        # colour: (x1, y1, x2, y2, depth_m) with exclusive x2/y2
        "red": (20, 30, 60, 80, 1.0),
        "blue": (90, 40, 140, 70, 0.8),
    })

    def rgb(self) -> np.ndarray:
        img = np.full((self.height, self.width, 3), 90, dtype=np.uint8)
        colours = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 255, 0)}
        for name, (x1, y1, x2, y2, _) in self.rects.items():
            img[y1:y2, x1:x2] = colours[name]
        return img

    def depth_m(self) -> np.ndarray:
        depth = np.full((self.height, self.width), self.wall_m, dtype=np.float32)
        for x1, y1, x2, y2, z in self.rects.values():
            depth[y1:y2, x1:x2] = z
        return depth


def image_msg(arr: np.ndarray, encoding: str, frame_id: str = "camera_optical", stamp=None) -> Image:
    arr = np.ascontiguousarray(arr)
    msg = Image()
    msg.header.frame_id = frame_id
    if stamp is not None:
        msg.header.stamp = stamp
    msg.height, msg.width = arr.shape[:2]
    msg.encoding = encoding
    msg.step = arr.strides[0]
    msg.data = arr.tobytes()
    return msg


def camera_info_msg(scene: Scene, frame_id: str = "camera_optical", stamp=None) -> CameraInfo:
    msg = CameraInfo()
    msg.header.frame_id = frame_id
    if stamp is not None:
        msg.header.stamp = stamp
    msg.width, msg.height = scene.width, scene.height
    msg.k = [scene.fx, 0.0, scene.cx, 0.0, scene.fy, scene.cy, 0.0, 0.0, 1.0]
    msg.p = [scene.fx, 0.0, scene.cx, 0.0, 0.0, scene.fy, scene.cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    msg.distortion_model = "plumb_bob"
    msg.d = [0.0] * 5
    return msg


class Client:
    """A planner and a camera: publishes inputs and commands, calls ~/segment, records outputs."""

    def __init__(self, context: Context, node_fqn: str = "/qwen3vl_seg", image_qos=qos_profile_sensor_data):
        self.node = Node("test_client", context=context)
        self.node_fqn = node_fqn
        self.image_pub = self.node.create_publisher(Image, "image", image_qos)
        self.depth_pub = self.node.create_publisher(Image, "depth", image_qos)
        self.info_pub = self.node.create_publisher(CameraInfo, "camera_info", image_qos)
        self.command_pub = self.node.create_publisher(String, "command", 10)
        self.results: list[SegmentationResult] = []
        self.masks: list[Image] = []
        self.overlays: list[Image] = []
        self.clouds: list[PointCloud2] = []
        self.markers: list[MarkerArray] = []
        self._lock = threading.Lock()
        reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(SegmentationResult, f"{node_fqn}/result", self._keep(self.results), reliable)
        self.node.create_subscription(Image, f"{node_fqn}/mask", self._keep(self.masks), reliable)
        self.node.create_subscription(Image, f"{node_fqn}/overlay", self._keep(self.overlays), reliable)
        self.node.create_subscription(PointCloud2, f"{node_fqn}/cloud", self._keep(self.clouds), reliable)
        self.node.create_subscription(MarkerArray, f"{node_fqn}/markers", self._keep(self.markers), reliable)
        self.detections: list[Any] = []
        self.detections_3d: list[Any] = []
        self.node.create_subscription(Detection2DArray, f"{node_fqn}/detections", self._keep(self.detections),
                                      reliable)
        self.node.create_subscription(Detection3DArray, f"{node_fqn}/detections_3d",
                                      self._keep(self.detections_3d), reliable)
        # deep, as docs/reliability.md tells clients with many calls in flight: a burst of answers
        # (a deactivate answers every queued call at once) overran rclpy's default depth of 10
        self.segment_client = self.node.create_client(Segment, f"{node_fqn}/segment", qos_profile=SERVICE_QOS)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.spin_errors: list[BaseException] = []
        self._spinner = BackgroundSpinner(self.executor, name="test-client-spin",
                                          on_error=report_spin_error("client", self.spin_errors)).start()

    def _keep(self, store: list) -> Callable[[Any], None]:
        def callback(msg: Any) -> None:
            with self._lock:
                store.append(msg)
        return callback

    def publish_frame(self, scene: Scene, encoding: str = "rgb8", with_depth: bool = True,
                      depth_encoding: str = "32FC1", with_info: bool = True, stamp=None,
                      rgb: np.ndarray | None = None, wait_node: SegmentationNode | None = None) -> None:
        """Publishes one frame; with ``wait_node``, returns once that node holds it as its newest
        frame (so a request sent next is served on this frame, not on an earlier one)."""
        stamp = stamp if stamp is not None else self.node.get_clock().now().to_msg()
        if wait_node is not None:
            t = stamp.sec + stamp.nanosec * 1e-9

            def holds() -> bool:
                frame = wait_node._frames.latest(time.monotonic())
                return (frame is not None and frame.stamp == t
                        and (not with_depth or not wait_node.p("use_depth") or frame.depth_stamp == t)
                        and (not with_info or (frame.camera_info is not None
                                               and frame.camera_info.header.stamp == stamp)))

            for _ in range(10):  # camera topics are best effort: a lost message is sent again
                self._publish(scene, encoding, with_depth, depth_encoding, with_info, stamp, rgb)
                if wait_for(holds, 1.0):
                    return
            raise AssertionError("the node did not receive the published frame")
        self._publish(scene, encoding, with_depth, depth_encoding, with_info, stamp, rgb)

    def _publish(self, scene: Scene, encoding: str, with_depth: bool, depth_encoding: str, with_info: bool,
                 stamp, rgb: np.ndarray | None) -> None:
        rgb = scene.rgb() if rgb is None else rgb
        self.image_pub.publish(image_msg(encode(rgb, encoding), encoding, stamp=stamp))
        if with_depth:
            depth = scene.depth_m()
            if depth_encoding == "16UC1":
                depth = np.round(depth * 1000).astype(np.uint16)
            self.depth_pub.publish(image_msg(depth, depth_encoding, stamp=stamp))
        if with_info:
            self.info_pub.publish(camera_info_msg(scene, stamp=stamp))

    @contextlib.contextmanager
    def streaming(self, scene: Scene, rate_hz: float = 10.0, **kwargs):
        """Publishes frames like a camera while the block runs."""
        with repeating(lambda: self.publish_frame(scene, **kwargs), 1.0 / rate_hz):
            yield

    def call(self, command: str, timeout_s: float = 5.0, request_id: str = "", wait: float = 20.0) -> Segment.Response:
        assert self.segment_client.wait_for_service(timeout_sec=10.0), "~/segment not available"
        future = self.segment_client.call_async(Segment.Request(command=command, timeout_s=timeout_s,
                                                                request_id=request_id))
        assert wait_for(future.done, wait), f"no answer to '{command}' within {wait} s"
        return future.result()

    def call_async(self, command: str, timeout_s: float = 5.0, request_id: str = ""):
        assert self.segment_client.wait_for_service(timeout_sec=10.0)
        return self.segment_client.call_async(Segment.Request(command=command, timeout_s=timeout_s,
                                                              request_id=request_id))

    def send_command(self, text: str) -> None:
        self.command_pub.publish(String(data=text))

    def snapshot(self, store: list) -> list:
        with self._lock:
            return list(store)

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Returns once the node is ACTIVE (asked over its lifecycle service) and the topics match."""
        deadline = time.monotonic() + timeout
        assert wait_for(lambda: self.image_pub.get_subscription_count() > 0
                        and self.command_pub.get_subscription_count() > 0, timeout), "node did not subscribe"
        assert wait_for(lambda: self.node.count_publishers(f"{self.node_fqn}/result") > 0
                        and self.node.count_subscribers(f"{self.node_fqn}/result") > 0, timeout)
        assert wait_for(lambda: self.lifecycle_state(deadline - time.monotonic()) == State.PRIMARY_STATE_ACTIVE,
                        max(deadline - time.monotonic(), 1.0)), "node did not become active"

    def lifecycle_state(self, timeout: float = 5.0) -> int | None:
        """The node's lifecycle state id from ``~/get_state``; None when it does not answer."""
        response = call_service(self.node, GetState, f"{self.node_fqn}/get_state", GetState.Request(),
                                service_wait_s=max(timeout, 0.1), answer_wait_s=max(timeout, 0.5))
        return None if response is None else response.current_state.id

    def close(self) -> None:
        self._spinner.stop(shutdown_timeout=1.0)
        self.node.destroy_node()
        assert not self.spin_errors, f"the test client's executor died: {self.spin_errors!r}"


def call_service(node: Node, srv_type: Any, name: str, request: Any, service_wait_s: float = 10.0,
                 answer_wait_s: float = 10.0) -> Any | None:
    """One call of service ``name`` from ``node`` (spun elsewhere); None when it is missing or silent."""
    client = node.create_client(srv_type, name)
    try:
        if not client.wait_for_service(timeout_sec=service_wait_s):
            return None
        future = client.call_async(request)
        return future.result() if wait_for(future.done, answer_wait_s) else None
    finally:
        node.destroy_client(client)


def must_call_service(node: Node, srv_type: Any, name: str, request: Any, service_wait_s: float = 10.0,
                      answer_wait_s: float = 10.0) -> Any:
    """:func:`call_service` for tests that need the answer: a missing or silent service fails."""
    response = call_service(node, srv_type, name, request, service_wait_s, answer_wait_s)
    assert response is not None, f"no answer from {name}"
    return response


def encode(rgb: np.ndarray, encoding: str) -> np.ndarray:
    if encoding == "rgb8":
        return rgb
    if encoding == "bgr8":
        return rgb[:, :, ::-1]
    if encoding == "rgba8":
        return np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    if encoding == "bgra8":
        return np.dstack([rgb[:, :, ::-1], np.full(rgb.shape[:2], 255, np.uint8)])
    if encoding == "mono8":
        return np.ascontiguousarray(rgb[:, :, 0])
    raise ValueError(encoding)


class NodeHarness:
    """The real SegmentationNode with the given parameters, spun on its own executor thread."""

    def __init__(self, context: Context, parameters: dict[str, Any] | None = None, autostart: bool = True,
                 node_name: str = "qwen3vl_seg"):
        params = {"segmenter": DOUBLE, "max_input_age_s": 2.0, "diagnostics_period_s": 0.2}
        params.update(parameters or {})
        overrides = [Parameter(k, value=v) for k, v in params.items()]
        self.node = SegmentationNode(node_name, context=context, parameter_overrides=overrides)
        self.executor = MultiThreadedExecutor(num_threads=4, context=context)
        self.executor.add_node(self.node)
        self.spin_errors: list[BaseException] = []
        self._spinner = BackgroundSpinner(self.executor, name="test-node-spin",
                                          on_error=report_spin_error("node", self.spin_errors)).start()
        if autostart:
            self.node.trigger_configure()
            assert self.node._segmenter is not None, f"configure failed: {self.node._configure_error}"
            self.node.trigger_activate()

    def close(self) -> None:
        self.node._release("test finished")
        self._spinner.stop(shutdown_timeout=2.0)
        self.node.destroy_node()
        # A destroyed node lives on in a reference cycle until a collection; freed later, it took
        # the /rosout publisher of its name with it, and a later node of the same name lost its
        # log lines (log assertions failed 4 of 5 times after six same-name nodes in a row).
        gc.collect()
        assert not self.spin_errors, f"the node's executor died: {self.spin_errors!r}"


def report_spin_error(who: str, errors: list[BaseException]) -> Callable[[BaseException], None]:
    """An ``on_error`` for a harness spinner: a dead executor otherwise looks like a node that
    merely stopped answering (the traceback goes to stderr, which pytest shows on failure)."""
    def report(exc: BaseException) -> None:
        errors.append(exc)
        print(f"the {who} executor died:", file=sys.stderr)
        traceback.print_exception(exc, file=sys.stderr)
    return report


def new_context(namespace: str | None = None) -> Context:
    """A fresh rclpy context; with ``namespace``, all its nodes live in ``/<namespace>``, so that
    nodes of other tests in the same DDS domain never answer its requests or see its frames."""
    context = Context()
    args = ["--ros-args", "-r", f"__ns:=/{namespace}"] if namespace else None
    rclpy.init(context=context, args=args)
    return context


def transient_local_qos(depth: int = 1) -> QoSProfile:
    return QoSProfile(depth=depth, reliability=ReliabilityPolicy.RELIABLE,
                      durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)

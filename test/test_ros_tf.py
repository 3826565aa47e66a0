"""Transform lookups: the buffer by itself, then the built-in listener over real DDS.

The expected transforms are computed by hand from the published ones (translations and yaw
angles chosen so the answer is easy to write down).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import rclpy
from geometry_msgs.msg import TransformStamped
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.time import Time
from tf2_msgs.msg import TFMessage

from qwen3vl_seg_ros.ros.tf import (
    EXTRAPOLATION_FUTURE,
    EXTRAPOLATION_PAST,
    INVALID,
    NOT_CONNECTED,
    TIMEOUT,
    UNKNOWN_FRAME,
    TfBuffer,
    TransformLookup,
    TransformUnavailable,
    tf2_ros_available,
    transform_to_msg,
)
from qwen3vl_seg_ros.ros.three_d import TF_CACHE_S
from qwen3vl_seg_ros.transforms import Transform, quat_from_axis_angle

SEC = 1_000_000_000


def yaw(deg: float, x: float = 0.0, y: float = 0.0, z: float = 0.0) -> Transform:
    return Transform(translation=(x, y, z), rotation=quat_from_axis_angle([0, 0, 1], math.radians(deg)))


def assert_tf(tf: Transform, translation, yaw_deg: float) -> None:
    np.testing.assert_allclose(tf.translation, translation, atol=1e-9)
    expected = quat_from_axis_angle([0, 0, 1], math.radians(yaw_deg))
    assert tf.almost_equal(Transform(translation=translation, rotation=expected), atol=1e-9)


# ---------------------------------------------------------------------------------------------
# the buffer alone
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def robot() -> TfBuffer:
    """world -> base (moving: x 0 -> 2 m, yaw 0 -> 90 deg between 100 s and 101 s),
    base -> camera (static, 1 m up), world -> table (static, 3 m along x, turned 180 deg)."""
    buf = TfBuffer(cache_time_s=10.0)
    buf.set_transform("world", "base", 100 * SEC, yaw(0.0))
    buf.set_transform("world", "base", 101 * SEC, yaw(90.0, x=2.0))
    buf.set_transform("base", "camera", 0, Transform(translation=(0.0, 0.0, 1.0)), static=True)
    buf.set_transform("world", "table", 0, yaw(180.0, x=3.0), static=True)
    return buf


def test_interpolates_between_two_stamps(robot: TfBuffer) -> None:
    tf = robot.lookup("world", "base", 100 * SEC + SEC // 4)
    assert_tf(tf, [0.5, 0.0, 0.0], 22.5)


def test_chain_through_a_static_frame(robot: TfBuffer) -> None:
    tf = robot.lookup("world", "camera", 100 * SEC + SEC // 2)
    # base at (1, 0, 0) yawed 45 degrees; the camera 1 m above it.
    assert_tf(tf, [1.0, 0.0, 1.0], 45.0)
    p = tf.apply(np.array([1.0, 0.0, 0.0]))
    np.testing.assert_allclose(p, [1.0 + math.sqrt(0.5), math.sqrt(0.5), 1.0], atol=1e-9)


def test_across_branches_via_the_common_ancestor(robot: TfBuffer) -> None:
    tf = robot.lookup("table", "camera", 101 * SEC)
    # camera in world: (2, 0, 1) yaw 90. table in world: (3, 0, 0) yaw 180.
    # camera in table: R(-180) ((2, 0, 1) - (3, 0, 0)) = (1, 0, 1); yaw 90 - 180 = -90.
    assert_tf(tf, [1.0, 0.0, 1.0], -90.0)
    assert robot.lookup("camera", "table", 101 * SEC).almost_equal(tf.inverse())


def test_static_frames_hold_at_any_time(robot: TfBuffer) -> None:
    for stamp in (0, 1, 50 * SEC, 10**18):
        assert_tf(robot.lookup("camera", "base", stamp), [0.0, 0.0, -1.0], 0.0)


def test_stamp_zero_is_the_latest_common_time() -> None:
    buf = TfBuffer()
    buf.set_transform("a", "b", 1 * SEC, Transform(translation=(0.0, 0.0, 0.0)))
    buf.set_transform("a", "b", 5 * SEC, Transform(translation=(4.0, 0.0, 0.0)))
    buf.set_transform("b", "c", 1 * SEC, Transform(translation=(0.0, 1.0, 0.0)))
    buf.set_transform("b", "c", 3 * SEC, Transform(translation=(0.0, 3.0, 0.0)))
    # Latest common time is 3 s: a->b is halfway from x = 0 to x = 4 there, b->c at y = 3.
    np.testing.assert_allclose(buf.lookup("a", "c", 0).translation, [2.0, 3.0, 0.0], atol=1e-9)


def test_extrapolation_errors_name_the_available_range(robot: TfBuffer) -> None:
    with pytest.raises(TransformUnavailable) as past:
        robot.lookup("world", "camera", 99 * SEC)
    assert past.value.kind == EXTRAPOLATION_PAST
    assert "past" in past.value.reason and "100.000 s to 101.000 s" in past.value.reason
    with pytest.raises(TransformUnavailable) as future:
        robot.lookup("world", "camera", 102 * SEC)
    assert future.value.kind == EXTRAPOLATION_FUTURE and "future" in future.value.reason


def test_extrapolation_tolerance_clamps_to_the_end_sample() -> None:
    buf = TfBuffer(extrapolation_tolerance_s=0.05)
    buf.set_transform("a", "b", 10 * SEC, Transform(translation=(1.0, 0.0, 0.0)))
    buf.set_transform("a", "b", 11 * SEC, Transform(translation=(2.0, 0.0, 0.0)))
    np.testing.assert_allclose(buf.lookup("a", "b", 11 * SEC + SEC // 50).translation, [2.0, 0.0, 0.0])
    with pytest.raises(TransformUnavailable, match="future"):
        buf.lookup("a", "b", 11 * SEC + SEC // 10)


def test_unknown_frame_and_disconnected_trees(robot: TfBuffer) -> None:
    robot.set_transform("elsewhere", "gizmo", 0, Transform(), static=True)
    with pytest.raises(TransformUnavailable) as unknown:
        robot.lookup("world", "ghost", 100 * SEC)
    assert unknown.value.kind == UNKNOWN_FRAME
    assert "'ghost'" in unknown.value.reason and "world" in unknown.value.reason  # lists known frames
    with pytest.raises(TransformUnavailable) as apart:
        robot.lookup("camera", "gizmo", 100 * SEC)
    assert apart.value.kind == NOT_CONNECTED
    assert "'elsewhere'" in apart.value.reason and "'world'" in apart.value.reason
    with pytest.raises(TransformUnavailable) as empty:
        robot.lookup("", "camera", 100 * SEC)
    assert empty.value.kind == INVALID


def test_same_frame_is_identity_and_leading_slash_is_ignored(robot: TfBuffer) -> None:
    assert robot.lookup("anything", "anything", 0).almost_equal(Transform.identity())
    assert robot.lookup("/world", "/table", 0).almost_equal(robot.lookup("world", "table", 0))


def test_history_is_pruned_to_the_cache_time() -> None:
    buf = TfBuffer(cache_time_s=1.0)
    for s in range(6):
        buf.set_transform("a", "b", s * SEC, Transform(translation=(float(s), 0.0, 0.0)))
    with pytest.raises(TransformUnavailable, match=r"4\.000 s to 5\.000 s"):
        buf.lookup("a", "b", 3 * SEC)
    np.testing.assert_allclose(buf.lookup("a", "b", 4 * SEC + SEC // 2).translation, [4.5, 0.0, 0.0])


def test_the_node_keeps_transforms_for_a_slow_segmentation() -> None:
    """An image taken at t=4 s whose result is ready at t=30 s (a real model on a CPU, or a
    queue of requests) still finds the moving robot's transform at its own stamp."""
    buf = TfBuffer(cache_time_s=TF_CACHE_S)
    for k in range(301):  # 30 s of a base moving at 10 Hz
        buf.set_transform("world", "camera_optical", k * SEC // 10, Transform(translation=(k / 100, 0.0, 0.0)))
    np.testing.assert_allclose(buf.lookup("world", "camera_optical", 4 * SEC).translation, [0.4, 0.0, 0.0])


def test_time_jumping_back_restarts_the_history() -> None:
    buf = TfBuffer(cache_time_s=1.0)
    buf.set_transform("a", "b", 100 * SEC, Transform(translation=(1.0, 0.0, 0.0)))
    for k in range(3):  # a bag loop: the old timeline again, sample after sample
        buf.set_transform("a", "b", 2 * SEC + k * SEC // 10, Transform(translation=(2.0, 0.0, 0.0)))
    np.testing.assert_allclose(buf.lookup("a", "b", 2 * SEC).translation, [2.0, 0.0, 0.0])
    with pytest.raises(TransformUnavailable, match="future"):
        buf.lookup("a", "b", 100 * SEC)


def test_one_stale_sample_does_not_wipe_the_history() -> None:
    """A stray sample far in the past (stamp 0 before /clock, another clock) is dropped, as tf2
    drops old data: lookups at image stamps a little behind the newest sample still work."""
    ms = SEC // 1000
    buf = TfBuffer(cache_time_s=1.0)
    for k in range(51):  # 100 Hz, 1000.00 s to 1000.50 s
        buf.set_transform("odom", "base", 1_000_000 * ms + 10 * k * ms, Transform(translation=(0.01 * k, 0.0, 0.0)))
    buf.set_transform("odom", "base", 0, Transform())
    buf.set_transform("odom", "base", 1_000_510 * ms, Transform(translation=(0.51, 0.0, 0.0)))
    np.testing.assert_allclose(buf.lookup("odom", "base", 1_000_400 * ms).translation, [0.40, 0.0, 0.0], atol=1e-9)


def test_reparenting_replaces_the_edge() -> None:
    buf = TfBuffer()
    buf.set_transform("a", "c", 0, Transform(translation=(1.0, 0.0, 0.0)), static=True)
    buf.set_transform("a", "d", 0, Transform(), static=True)  # keeps "a" a known frame
    buf.set_transform("b", "c", 0, Transform(translation=(0.0, 1.0, 0.0)), static=True)
    np.testing.assert_allclose(buf.lookup("b", "c", 0).translation, [0.0, 1.0, 0.0])
    with pytest.raises(TransformUnavailable) as exc:
        buf.lookup("a", "c", 0)
    assert exc.value.kind == NOT_CONNECTED


def test_a_cycle_is_reported_not_looped_on() -> None:
    buf = TfBuffer()
    buf.set_transform("a", "b", 0, Transform(), static=True)
    buf.set_transform("b", "a", 0, Transform(), static=True)
    buf.set_transform("x", "y", 0, Transform(), static=True)
    with pytest.raises(TransformUnavailable, match="cycle"):
        buf.lookup("y", "b", 0)


def test_waiting_lookup_wakes_up_when_data_arrives() -> None:
    buf = TfBuffer()

    def late_publisher() -> None:
        time.sleep(0.1)
        buf.set_transform("map", "robot", 5 * SEC, Transform(translation=(7.0, 0.0, 0.0)))

    thread = threading.Thread(target=late_publisher)
    thread.start()
    try:
        tf = buf.lookup("map", "robot", 5 * SEC, timeout_s=30.0)
    finally:
        thread.join()
    np.testing.assert_allclose(tf.translation, [7.0, 0.0, 0.0])


def test_timeout_keeps_the_last_reason(robot: TfBuffer) -> None:
    with pytest.raises(TransformUnavailable) as exc:
        robot.lookup("world", "camera", 200 * SEC, timeout_s=0.05)
    assert exc.value.kind == TIMEOUT
    assert "within 0.05 s" in exc.value.reason and "extrapolation into the future" in exc.value.reason


# ---------------------------------------------------------------------------------------------
# over DDS: a broadcaster node and the lookup's node in one process, spun by an executor thread
# ---------------------------------------------------------------------------------------------
def stamped(parent: str, child: str, tf: Transform, stamp_ns: int) -> TransformStamped:
    msg = TransformStamped(child_frame_id=child, transform=transform_to_msg(tf))
    msg.header.frame_id = parent
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, SEC)
    return msg


class Broadcaster:
    """Publishes /tf_static once (latched) and can republish /tf samples until stopped."""

    def __init__(self, context: Context) -> None:
        self.node = Node("tf_test_broadcaster", context=context)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                             reliability=ReliabilityPolicy.RELIABLE)
        self.static_pub = self.node.create_publisher(TFMessage, "/tf_static", latched)
        self.tf_pub = self.node.create_publisher(TFMessage, "/tf", 100)

    def publish_static(self, transforms: list[TransformStamped]) -> None:
        self.static_pub.publish(TFMessage(transforms=transforms))

    def repeat(self, transforms: list[TransformStamped]) -> threading.Event:
        """Republishes ``transforms`` every 50 ms (volatile /tf loses messages sent before the
        subscription matched); set the returned event to stop."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                self.tf_pub.publish(TFMessage(transforms=transforms))
                stop.wait(0.05)

        threading.Thread(target=loop, daemon=True).start()
        return stop


@pytest.fixture(scope="module")
def dds() -> Iterator[tuple[Context, MultiThreadedExecutor, Broadcaster]]:
    context = Context()
    rclpy.init(context=context)
    executor = MultiThreadedExecutor(num_threads=2, context=context)
    broadcaster = Broadcaster(context)
    # Published before any listener exists: late joiners must still get them (transient local).
    broadcaster.publish_static([
        stamped("base", "camera_link", Transform(translation=(0.0, 0.0, 1.0)), 0),
        stamped("camera_link", "camera_optical", yaw(90.0), 0),
        stamped("world", "table", yaw(180.0, x=3.0), 0),
        stamped("elsewhere", "gizmo", Transform(), 0),
    ])
    executor.add_node(broadcaster.node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        yield context, executor, broadcaster
    finally:
        executor.shutdown()
        spinner.join(timeout=10.0)
        broadcaster.node.destroy_node()
        rclpy.shutdown(context=context)


@pytest.fixture
def lookup(dds, request) -> Iterator[TransformLookup]:
    context, executor, _ = dds
    node = Node(f"tf_lookup_{request.node.name.replace('[', '_').replace(']', '')}", context=context)
    tfl = TransformLookup(node, use_tf2_ros=False)
    executor.add_node(node)
    try:
        yield tfl
    finally:
        tfl.close()
        executor.remove_node(node)
        node.destroy_node()


@pytest.mark.ros
def test_dds_static_chain_and_interpolation(dds, lookup: TransformLookup) -> None:
    _, _, broadcaster = dds
    assert lookup.backend == "builtin"
    stop = broadcaster.repeat([
        stamped("world", "base", yaw(0.0), 100 * SEC),
        stamped("world", "base", yaw(90.0, x=2.0), 101 * SEC),
    ])
    try:
        # world <- base (dynamic, halfway: x = 1, yaw 45) <- camera_link (1 m up) <- optical (yaw 90).
        tf = lookup.lookup("world", "camera_optical", 100 * SEC + SEC // 2, timeout_s=20.0)
        assert_tf(tf, [1.0, 0.0, 1.0], 135.0)
        # Static frames only, on another branch: table <- world <- ... at a builtin Time stamp.
        stamp = Time(seconds=101).to_msg()
        tf_table = lookup.lookup("table", "camera_link", stamp, timeout_s=20.0)
        assert_tf(tf_table, [1.0, 0.0, 1.0], -90.0)  # as in test_across_branches_via_the_common_ancestor
    finally:
        stop.set()


@pytest.mark.ros
def test_dds_unknown_frame_and_disconnected_tree(lookup: TransformLookup) -> None:
    lookup.lookup("table", "world", 0, timeout_s=20.0)  # the static frames have arrived
    with pytest.raises(TransformUnavailable) as unknown:
        lookup.lookup("world", "no_such_frame", 0)
    assert unknown.value.kind == UNKNOWN_FRAME and "'no_such_frame'" in unknown.value.reason
    with pytest.raises(TransformUnavailable) as apart:
        lookup.lookup("table", "gizmo", 0)
    assert apart.value.kind == NOT_CONNECTED


@pytest.mark.ros
def test_dds_timeout(dds, lookup: TransformLookup) -> None:
    _, _, broadcaster = dds
    stop = broadcaster.repeat([stamped("world", "rover", Transform(), 50 * SEC)])
    try:
        lookup.lookup("world", "rover", 50 * SEC, timeout_s=20.0)
        with pytest.raises(TransformUnavailable) as exc:
            lookup.lookup("world", "rover", 60 * SEC, timeout_s=0.2)
    finally:
        stop.set()
    assert exc.value.kind == TIMEOUT
    assert "future" in exc.value.reason and "50.000 s to 50.000 s" in exc.value.reason


@pytest.mark.ros
def test_auto_backend_is_builtin_without_tf2_ros(dds) -> None:
    if tf2_ros_available():  # pragma: no cover - only on a ROS install
        pytest.skip("tf2_ros is importable here")
    context, _, _ = dds
    node = Node("tf_lookup_auto", context=context)
    try:
        tfl = TransformLookup(node)
        assert tfl.backend == "builtin"
        tfl.close()
        with pytest.raises(RuntimeError, match="tf2_ros cannot be imported"):
            TransformLookup(node, use_tf2_ros=True)
    finally:
        node.destroy_node()


def test_tf2_ros_branch_wiring(monkeypatch) -> None:
    """The tf2_ros branch against a stand-in with tf2_ros's Python API (buffer.py and
    transform_listener.py of ros2/geometry2): arguments passed, result and errors converted."""
    import types

    from qwen3vl_seg_ros.ros import tf as tf_module

    calls: dict = {}

    class TransformException(Exception):  # noqa: N818 - tf2's names
        pass

    class LookupException(TransformException):
        pass

    class Buffer:
        def __init__(self, cache_time=None, node=None) -> None:
            calls["cache_time_ns"] = cache_time.nanoseconds

        def lookup_transform(self, target_frame, source_frame, time, timeout):
            calls["lookup"] = (target_frame, source_frame, time.nanoseconds, timeout.nanoseconds)
            if source_frame == "ghost":
                raise LookupException('"ghost" passed to lookupTransform argument source_frame does not exist.')
            return stamped(target_frame, source_frame, yaw(90.0, x=1.0), time.nanoseconds)

    class TransformListener:
        def __init__(self, buffer, node, *, spin_thread=False) -> None:
            calls["listener"] = (node, spin_thread)

        def unregister(self) -> None:
            calls["unregistered"] = True

    fake = types.SimpleNamespace(Buffer=Buffer, TransformListener=TransformListener,
                                 TransformException=TransformException)
    monkeypatch.setattr(tf_module, "_tf2_ros", fake)
    node = object()
    tfl = TransformLookup(node, cache_time_s=5.0)
    assert tfl.backend == "tf2_ros"
    assert calls["cache_time_ns"] == 5 * SEC and calls["listener"] == (node, False)
    tf = tfl.lookup("base", "camera", 7 * SEC + 5, timeout_s=0.25)
    assert calls["lookup"] == ("base", "camera", 7 * SEC + 5, SEC // 4)
    assert_tf(tf, [1.0, 0.0, 0.0], 90.0)
    with pytest.raises(TransformUnavailable) as exc:
        tfl.lookup("base", "ghost", 0)
    assert exc.value.kind == UNKNOWN_FRAME and "ghost" in exc.value.reason
    tfl.close()
    assert calls["unregistered"]

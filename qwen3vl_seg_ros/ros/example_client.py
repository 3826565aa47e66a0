"""A planner-side example: ask the qwen3vl_seg node for objects and read the answer.

Copy what you need into your planner. The node offers two ways to ask:

* **one-shot**, the ``~/segment`` service (qwen3vl_seg_ros/srv/Segment): one command, exactly
  one answer, within ``timeout_s``. The answer's ``status`` says OK, NO_MATCH (nothing matches;
  ``message`` says why) or ERROR (``message`` says what went wrong and what to do).
* **continuous**, the ``command`` topic (std_msgs/String): the node re-runs the command on new
  frames, at most ``max_rate_hz``, and publishes every answer on ``~/result`` until it gets an
  empty command.

Each object carries a label, a score, its box and mask, and, with depth and CameraInfo, its
3D centroid, oriented box and point cloud in ``result.geometry_frame_id`` (the node's
``target_frame``, or the camera's optical frame).

    qwen3vl_seg_client "the red mug"                       # one-shot, 5 s timeout
    qwen3vl_seg_client "all cubes" --continuous 5          # 5 s of continuous answers
    ros2 run qwen3vl_seg_ros example_client "the red mug" --node /robot/qwen3vl_seg
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Sequence

import rclpy
from rclpy.context import Context
from rclpy.duration import Duration
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.task import Future
from rclpy.utilities import remove_ros_args
from std_msgs.msg import String

from qwen3vl_seg_ros.commands import clean_command
from qwen3vl_seg_ros.msg import SegmentationResult
from qwen3vl_seg_ros.ros.results import ECHO_CHARS, truncate
from qwen3vl_seg_ros.srv import Segment
from qwen3vl_seg_ros.types import InputError

STATUS = {SegmentationResult.OK: "OK", SegmentationResult.NO_MATCH: "NO_MATCH", SegmentationResult.ERROR: "ERROR"}


def describe(result: SegmentationResult) -> str:
    """A few readable lines: the status, then one line per object with its 3D centroid."""
    status = STATUS.get(result.status, str(result.status))
    frame = result.geometry_frame_id or result.header.frame_id
    lines = [f"{status} '{result.command}' ({result.request_id}, {result.total_ms:.0f} ms): "
             f"{len(result.objects)} object(s)" + (f" - {result.message}" if result.message else "")]
    for obj in result.objects:
        box = obj.box
        where = (f"centroid ({obj.centroid.x:+.3f}, {obj.centroid.y:+.3f}, {obj.centroid.z:+.3f}) m in '{frame}', "
                 f"{obj.num_points} points" if obj.has_3d else f"no 3D ({obj.status_3d})")
        track = f" (track {obj.track_id})" if obj.track_id else ""
        lines.append(f"  {obj.id}{track}: {obj.label}, score {obj.score:.2f}, box {box.width}x{box.height} at "
                     f"({box.x_offset}, {box.y_offset}), {where}")
    return "\n".join(lines)


def segment_once(node: Node, executor: SingleThreadedExecutor, service: str, command: str, timeout_s: float,
                 wait_s: float) -> SegmentationResult | None:
    """Calls ``~/segment`` once; None when the service is missing or never answers.

    The answer is also taken from ``~/result``, where the node publishes every answer with its
    request id: right after the node starts, a service response can be lost (the node's side
    has not yet discovered this client's response reader; DDS discovery is not symmetric). That
    fallback only works once the node has discovered the ``~/result`` reader too, so the reader
    is created first, discovered while the service is awaited, and the request waits (within
    ``wait_s``) until this side sees the node's writer.
    """
    request_id = f"example-{uuid.uuid4().hex[:12]}"
    answer = Future()

    def take(result: SegmentationResult) -> None:
        if not answer.done():
            answer.set_result(result)

    published = node.create_subscription(
        SegmentationResult, service.rsplit("/", 1)[0] + "/result",
        lambda msg: take(msg) if msg.request_id == request_id else None,
        QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    try:
        ready_by = time.monotonic() + wait_s
        client = node.create_client(Segment, service)
        if not client.wait_for_service(timeout_sec=wait_s):
            print(f"service {service} is not available after {wait_s:g} s: is the node running, active, and on "
                  f"the same ROS_DOMAIN_ID?", file=sys.stderr)
            return None
        while published.get_publisher_count() == 0 and time.monotonic() < ready_by:
            executor.spin_once(timeout_sec=0.05)  # no writer seen: the fallback could not work yet
        # float(): rclpy serialises an int put into a float32 field as 0.0 (which means the default 5 s)
        future = client.call_async(Segment.Request(command=command, timeout_s=float(timeout_s), request_id=request_id))
        future.add_done_callback(lambda f: take(f.result().result))
        # The node answers within timeout_s (with an ERROR if it has to); the margin covers transport.
        # Short slices: one long wait held a Ctrl-C until it timed out (24 s with --timeout 20).
        give_up = time.monotonic() + timeout_s + 5.0
        while not answer.done() and time.monotonic() < give_up:
            executor.spin_once(timeout_sec=min(0.1, max(0.0, give_up - time.monotonic())))
    finally:
        node.destroy_subscription(published)
    if not answer.done():
        print(f"no answer from {service} within {timeout_s + 5.0:g} s", file=sys.stderr)
        return None
    return answer.result()


def answers_command(sent: str, echoed: str) -> bool:
    """Whether a result whose ``command`` is ``echoed`` answers the command this client sent.

    The node echoes the command as it cleaned it, or, when it refused it, the raw text cut to
    ``ECHO_CHARS`` with a note of how many more there were.
    """
    if echoed == truncate(sent, ECHO_CHARS):
        return True
    try:
        return echoed == clean_command(sent, sys.maxsize)[0]
    except InputError:
        return False


def stream(node: Node, executor: SingleThreadedExecutor, node_name: str, command_topic: str, command: str,
           seconds: float, wait_s: float) -> list[SegmentationResult]:
    """Continuous mode for ``seconds``: prints each answer, then stops the node with an empty command."""
    results: list[SegmentationResult] = []

    def on_result(msg: SegmentationResult) -> None:
        # one continuous command per node at a time; results of the one before may still arrive
        if msg.request_id.startswith("continuous-") and answers_command(command, msg.command):
            results.append(msg)
            print(describe(msg), flush=True)

    node.create_subscription(SegmentationResult, f"{node_name}/result", on_result,
                             QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
    publisher = node.create_publisher(String, command_topic, 10)
    give_up = time.monotonic() + wait_s
    while publisher.get_subscription_count() == 0 and time.monotonic() < give_up:
        executor.spin_once(timeout_sec=0.1)
    if publisher.get_subscription_count() == 0:
        print(f"nobody subscribes to {command_topic} after {wait_s:g} s: is the node running and active?",
              file=sys.stderr)
        return results
    publisher.publish(String(data=command))
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            executor.spin_once(timeout_sec=min(0.1, max(0.0, end - time.monotonic())))
    finally:  # also on Ctrl-C: never leave the node running a command nobody reads
        publisher.publish(String(data=""))
        publisher.wait_for_all_acked(Duration(seconds=2.0))
    return results


def _positive(text: str) -> float:
    """A timeout for the client: the node reads 0 as its own default_timeout_s, which the client
    cannot know, so it gave up after 5 s while the node would still answer (at 8 s of 30)."""
    value = float(text)
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3vl_seg_client", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", help="what to find, e.g. 'the red mug on the left'")
    parser.add_argument("--node", default="/qwen3vl_seg", help="the node's full name (default: /qwen3vl_seg)")
    parser.add_argument("--timeout", type=_positive, default=5.0,
                        help="one-shot timeout_s, > 0 (default: 5); the client waits that long plus 5 s")
    parser.add_argument("--continuous", type=float, default=0.0, metavar="SECONDS",
                        help="use continuous mode for this many seconds instead of one call")
    parser.add_argument("--command-topic", default=None,
                        help="the node's command topic (default: 'command' in the node's namespace)")
    parser.add_argument("--wait", type=float, default=10.0, help="how long to wait for the node to appear (s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 when the node answered (OK or NO_MATCH), 1 otherwise."""
    ros_argv = ["qwen3vl_seg_client", *(sys.argv[1:] if argv is None else argv)]
    args = _parser().parse_args(remove_ros_args(ros_argv)[1:])
    node_name = "/" + args.node.strip("/")
    namespace = node_name.rsplit("/", 1)[0]
    command_topic = args.command_topic or f"{namespace}/command"

    context = Context()  # its own context: the example also runs inside other programs and tests
    rclpy.init(args=ros_argv, context=context)
    node = Node("qwen3vl_seg_client", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    try:
        if args.continuous > 0:
            results = stream(node, executor, node_name, command_topic, args.command, args.continuous, args.wait)
            print(f"{len(results)} answer(s) in {args.continuous:g} s; continuous mode stopped")
            return 0 if any(r.status != SegmentationResult.ERROR for r in results) else 1
        result = segment_once(node, executor, f"{node_name}/segment", args.command, args.timeout, args.wait)
        if result is None:
            return 1
        print(describe(result))
        return 0 if result.status in (SegmentationResult.OK, SegmentationResult.NO_MATCH) else 1
    except KeyboardInterrupt:
        return 130
    finally:
        executor.shutdown()
        node.destroy_node()
        context.try_shutdown()


if __name__ == "__main__":
    sys.exit(main())

"""The planner-side example client against the real node (colour-blob double) over DDS."""

from __future__ import annotations

import pytest
from geometry_msgs.msg import Point

from qwen3vl_seg_ros.msg import SegmentationResult, SegmentedObject
from qwen3vl_seg_ros.ros import example_client

from helpers import wait_for
from ros_harness import Client, NodeHarness, Scene, new_context


def test_describe_prints_status_objects_and_centroids():
    result = SegmentationResult(command="the mug", request_id="r1", status=SegmentationResult.OK, total_ms=12.4,
                                geometry_frame_id="base_link")
    with_3d = SegmentedObject(id=1, label="red mug", score=0.91, has_3d=True, num_points=321,
                              centroid=Point(x=0.5, y=-0.25, z=0.125))
    with_3d.box.x_offset, with_3d.box.y_offset, with_3d.box.width, with_3d.box.height = 10, 20, 30, 40
    flat = SegmentedObject(id=2, label="blue mug", score=0.4, has_3d=False, status_3d="no depth")
    result.objects = [with_3d, flat]
    text = example_client.describe(result).splitlines()
    assert text[0] == "OK 'the mug' (r1, 12 ms): 2 object(s)"
    assert text[1] == ("  1: red mug, score 0.91, box 30x40 at (10, 20), centroid (+0.500, -0.250, +0.125) m in "
                       "'base_link', 321 points")
    assert text[2] == "  2: blue mug, score 0.40, box 0x0 at (0, 0), no 3D (no depth)"
    error = SegmentationResult(command="x", request_id="r2", status=SegmentationResult.ERROR, message="why")
    assert example_client.describe(error) == "ERROR 'x' (r2, 0 ms): 0 object(s) - why"


@pytest.fixture(scope="module")
def system():
    context = new_context()
    node = NodeHarness(context, {"max_rate_hz": 5.0, "min_points": 20, "erode_px": 1})
    camera = Client(context)
    camera.wait_connected()
    with camera.streaming(Scene(), rate_hz=10.0):
        yield node, camera
    camera.close()
    node.close()
    context.try_shutdown()


@pytest.mark.ros
def test_one_shot_call_prints_objects_with_3d_centroids(system, capsys):
    assert example_client.main(["the red and the blue blobs", "--timeout", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("OK 'the red and the blue blobs' (example-") and out[0].endswith("2 object(s)")
    by_label = {line.split(",")[0].split(": ")[1]: line for line in out[1:]}
    # the harness scene: red rectangle 1.0 m away, blue one 0.8 m, in the camera's optical frame
    assert "+1.000) m in 'camera_optical'" in by_label["red blob"]
    assert "+0.800) m in 'camera_optical'" in by_label["blue blob"]
    assert "box 40x50 at (20, 30)" in by_label["red blob"]


@pytest.mark.ros
def test_no_match_and_error_exit_codes(system, capsys):
    assert example_client.main(["green"]) == 0
    assert capsys.readouterr().out.startswith("NO_MATCH 'green'")
    assert example_client.main(["red raise:error"]) == 1
    assert "simulated model failure" in capsys.readouterr().out


@pytest.mark.ros
def test_continuous_mode_prints_results_and_stops_the_node(system, capsys):
    node, _ = system
    # 2.5 s, not less: the client's new subscription may take a second to be matched on a busy
    # machine, and answers published before that never reach it (1.2 s once gave one answer)
    assert example_client.main(["blue", "--continuous", "2.5"]) == 0
    out = capsys.readouterr().out
    answers = [line for line in out.splitlines() if line.startswith("OK 'blue' (continuous-")]
    assert 2 <= len(answers) <= 14, out  # max_rate_hz=5 for 2.5 s, one in flight at each end
    assert f"{len(answers)} answer(s) in 2.5 s; continuous mode stopped" in out
    # the empty command went out before the client left: the node runs nothing any more
    assert wait_for(lambda: node.node._scheduler.continuous_command is None, 3.0)


@pytest.mark.ros
def test_continuous_mode_with_only_errors_exits_1(system, capsys):
    """Every continuous answer an ERROR (here a model failure on each frame): exit 1, as the
    README says, not 0 for having heard something."""
    node, _ = system
    assert example_client.main(["blue raise:error", "--continuous", "2.5"]) == 1
    out = capsys.readouterr().out
    assert "ERROR 'blue raise:error' (continuous-" in out
    assert wait_for(lambda: node.node._scheduler.continuous_command is None, 3.0)


def test_continuous_results_are_matched_to_the_command_sent():
    """A straggler of the previous continuous command is not this command's answer."""
    assert example_client.answers_command("  blue\tblob ", "blue blob")  # as the node cleaned it
    assert not example_client.answers_command("blue raise:error", "blue")
    long = "red " * 100
    assert example_client.answers_command(long, long[:200] + "... [200 more characters]")  # a refusal's echo
    assert not example_client.answers_command("blue " * 100, long[:200] + "... [200 more characters]")


def test_ctrl_c_while_waiting_for_an_answer_ends_the_client(system):
    """The client waited in one long rcl wait that a Ctrl-C did not wake: against a slow node it
    exited 24 s after Ctrl-C (--timeout 20). People copy this file into their planners."""
    import os
    import signal
    import subprocess
    import sys

    node, _ = system
    proc = subprocess.Popen([sys.executable, "-m", "qwen3vl_seg_ros.ros.example_client", "red sleep:4",
                             "--timeout", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    try:
        # the node is on the request: the client is inside its wait
        assert wait_for(lambda: (job := node.node._scheduler._busy_job) is not None
                        and job.command == "red sleep:4", 30), "the request never reached the node"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=2.5) == 130  # it went on waiting for the answer (4 s here; 25 s at worst)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        assert wait_for(lambda: node.node._scheduler._busy_job is None, 10)  # the next tests find it idle


@pytest.mark.ros
def test_missing_node_is_reported_quickly(capsys):
    assert example_client.main(["red", "--node", "/nobody/here", "--wait", "0.5"]) == 1
    assert "service /nobody/here/segment is not available after 0.5 s" in capsys.readouterr().err
    assert example_client.main(["red", "--node", "/nobody/here", "--wait", "0.5", "--continuous", "1"]) == 1
    assert "nobody subscribes to /nobody/command" in capsys.readouterr().err


@pytest.mark.parametrize("timeout", ["0", "-1", "nan"])
def test_a_timeout_the_client_cannot_wait_for_is_refused(timeout, capsys):
    """0 means the node's default_timeout_s, unknown to the client: it gave up after 5 s while
    the node would still answer."""
    with pytest.raises(SystemExit) as exit_info:
        example_client.main(["red", "--timeout", timeout])
    assert exit_info.value.code == 2 and "must be a number of seconds > 0" in capsys.readouterr().err


class LostResponseClientDouble:
    """Test double of an rclpy service client whose response is lost in transport: the request
    reaches the node, the response never comes back (what DDS discovery can do to the first
    call after a node starts; seen in CI)."""

    def __init__(self, real, before_call=lambda: None) -> None:
        self.real = real
        self.before_call = before_call

    def wait_for_service(self, timeout_sec: float) -> bool:
        return self.real.wait_for_service(timeout_sec=timeout_sec)

    def call_async(self, request):
        from rclpy.task import Future

        self.before_call()
        self.real.call_async(request)
        return Future()  # never completed


@pytest.mark.ros
def test_a_lost_service_response_is_taken_from_the_result_topic(system, monkeypatch):
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    context = Context()
    rclpy.init(context=context)
    planner = Node("planner_with_a_lost_response", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(planner)
    real_create_client = planner.create_client
    node, _ = system
    result_pub = node.node._pubs["result"]

    def node_sees_the_planners_reader() -> None:
        # Discovery is not symmetric: under load the client saw the node's writer before the node
        # matched the client's reader, and the result was published to nobody (1 run in 43).
        # What this test checks is the fallback once both sides are matched: the node knows the
        # planner's reader, and its writer has matched every reader it knows (a count alone could
        # stand still while an earlier test's reader goes away).
        def matched() -> bool:
            readers = node.node.get_subscriptions_info_by_topic("/qwen3vl_seg/result")
            return (any(r.node_name == "planner_with_a_lost_response" for r in readers)
                    and result_pub.get_subscription_count() >= len(readers))

        assert wait_for(matched, 10), "the node never matched the planner's ~/result reader"

    monkeypatch.setattr(planner, "create_client", lambda *a, **k: LostResponseClientDouble(
        real_create_client(*a, **k), before_call=node_sees_the_planners_reader))
    try:
        result = example_client.segment_once(planner, executor, "/qwen3vl_seg/segment", "red", timeout_s=5.0,
                                             wait_s=10.0)
        assert result is not None and result.status == SegmentationResult.OK
        assert result.request_id.startswith("example-") and [o.label for o in result.objects] == ["red blob"]
    finally:
        executor.shutdown()
        planner.destroy_node()
        context.try_shutdown()

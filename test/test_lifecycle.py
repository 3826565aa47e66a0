"""Lifecycle transitions of the node, and what a client gets in each state."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import pytest
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from lifecycle_msgs.msg import State
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter

from qwen3vl_seg_ros.msg import SegmentationResult

from helpers import wait_for
from ros_harness import Client, NodeHarness, Scene, new_context

pytestmark = pytest.mark.ros


@contextlib.contextmanager
def served(namespace: str):
    """A running node (colour-blob double) in its own namespace, and a connected client."""
    context = new_context(namespace)
    harness = NodeHarness(context)
    client = Client(context, node_fqn=f"/{namespace}/qwen3vl_seg")
    try:
        client.wait_connected()
        yield harness, client
    finally:
        client.close()
        harness.close()
        context.try_shutdown()


def state_id(node) -> int:
    return node._state_machine.current_state[0]



def test_diagnostics_say_each_state_and_count_the_results():
    """/diagnostics is where docs/troubleshooting.md starts: "inactive", "no colour images" (a
    camera remapped wrong) and "serving" with its counters. Only "configure failed" and "loading"
    were tested; dropping the other states and never counting passed every test."""
    namespace = "lifecycle_diagnostics"
    context = new_context(namespace)
    harness = NodeHarness(context, {"diagnostics_period_s": 0.2}, autostart=False)
    client = Client(context, node_fqn=f"/{namespace}/qwen3vl_seg")
    seen: list[DiagnosticStatus] = []
    client.node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: seen.extend(
        s for s in m.status if s.name.startswith(namespace)), 10)

    def says(level: int, message: str, **values: Callable[[str], bool]) -> bool:
        for status in reversed(seen[-5:]):
            kv = {v.key: v.value for v in status.values}
            if status.level == level and status.message.startswith(message) and all(
                    check(kv.get(key, "")) for key, check in values.items()):
                return True
        return False

    try:
        node = harness.node
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert wait_for(lambda: says(DiagnosticStatus.WARN, "inactive"), 5), [s.message for s in seen[-3:]]
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        client.wait_connected()
        assert wait_for(lambda: says(DiagnosticStatus.WARN, "no colour images"), 5), [s.message for s in seen[-3:]]
        client.publish_frame(Scene())
        assert client.call("red").result.status == SegmentationResult.OK
        assert client.call("green").result.status == SegmentationResult.NO_MATCH
        assert wait_for(lambda: says(DiagnosticStatus.OK, "serving", results_ok=lambda v: v == "1",
                                     results_no_match=lambda v: v == "1", results_error=lambda v: v == "0",
                                     images_received=lambda v: v.isdigit() and int(v) >= 1,
                                     last_latency_ms=lambda v: v != "n/a" and float(v) > 0), 5), \
            [(s.message, {v.key: v.value for v in s.values}) for s in seen[-2:]]
    finally:
        client.close()
        harness.close()
        context.try_shutdown()

def test_transitions_and_answers_in_every_state():
    context = new_context()
    harness = NodeHarness(context, autostart=False)
    node = harness.node
    client = Client(context)
    try:
        assert state_id(node) == State.PRIMARY_STATE_UNCONFIGURED
        result = client.call("red").result
        assert result.status == SegmentationResult.ERROR and "node is not configured" in result.message

        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert state_id(node) == State.PRIMARY_STATE_INACTIVE
        segmenter = node._segmenter
        assert segmenter.warmed_up, "configure must warm the segmenter up"
        assert "not active" in client.call("red").result.message

        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert state_id(node) == State.PRIMARY_STATE_ACTIVE
        client.wait_connected()
        client.publish_frame(Scene())
        assert client.call("red").result.status == SegmentationResult.OK

        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert state_id(node) == State.PRIMARY_STATE_INACTIVE
        assert wait_for(lambda: client.image_pub.get_subscription_count() == 0, 5), "inputs still subscribed"
        assert "not active" in client.call("red").result.message
        assert node._segmenter is segmenter  # the model stays loaded while inactive

        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        client.publish_frame(Scene())
        assert client.call("red").result.status == SegmentationResult.OK
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS

        assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
        assert state_id(node) == State.PRIMARY_STATE_UNCONFIGURED
        assert segmenter.closed and node._segmenter is None
        assert "node is not configured" in client.call("red").result.message

        # and it can be configured again, taking the configure- and activate-time parameters set meanwhile
        assert all(r.successful for r in node.set_parameters([Parameter("diagnostics_period_s", value=0.5),
                                                              Parameter("sync_queue_size", value=4)]))
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert node._diag_timer.timer_period_ns == 500_000_000
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert node._frames._images.maxlen == 4 and node._frames._depths.maxlen == 4
        client.wait_connected()
        client.publish_frame(Scene())
        assert client.call("red").result.status == SegmentationResult.OK
    finally:
        client.close()
        harness.close()
        context.try_shutdown()


def test_configure_failure_keeps_node_alive_and_explains():
    context = new_context()
    harness = NodeHarness(context, {"segmenter": "no.such.module:Missing"}, autostart=False)
    client = Client(context)
    try:
        assert harness.node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert state_id(harness.node) == State.PRIMARY_STATE_UNCONFIGURED
        result = client.call("red").result
        assert result.status == SegmentationResult.ERROR
        assert "configure failed: segmenter module 'no.such.module' cannot be imported" in result.message
        # /diagnostics reports it too, in the unconfigured state
        seen: list[DiagnosticArray] = []
        client.node.create_subscription(DiagnosticArray, "/diagnostics", seen.append, 10)
        assert wait_for(lambda: any(s.level == DiagnosticStatus.ERROR and "configure failed" in s.message
                                    for m in list(seen) for s in m.status), 5)
        # named by the node's full name: /diagnostics is shared by every node on the domain
        assert {s.name for m in list(seen) for s in m.status if "configure failed" in s.message} == {
            f"{harness.node.get_fully_qualified_name().lstrip('/')}: segmentation"}
    finally:
        client.close()
        harness.close()
        context.try_shutdown()


def test_with_sim_time_and_no_clock_yet_the_node_reports_and_serves():
    """use_sim_time with a bag not started (or paused): no /clock. /diagnostics went silent (its
    timer ran on ROS time); one-shot serving never depended on it."""
    context = new_context("lifecycle_sim_time")
    harness = NodeHarness(context, {"use_sim_time": True})
    client = Client(context, node_fqn="/lifecycle_sim_time/qwen3vl_seg")
    try:
        client.wait_connected()
        assert harness.node.get_clock().now().nanoseconds == 0  # no /clock on this domain
        seen: list[DiagnosticArray] = []
        client.node.create_subscription(DiagnosticArray, "/diagnostics", seen.append, 10)
        name = f"{harness.node.get_fully_qualified_name().lstrip('/')}: segmentation"
        assert wait_for(lambda: sum(s.name == name for m in list(seen) for s in m.status) >= 2, 10)
        with client.streaming(Scene()):
            assert client.call("red").result.status == SegmentationResult.OK
    finally:
        client.close()
        harness.close()
        context.try_shutdown()


def test_a_stop_sent_while_inactive_is_not_lost():
    """The planner cancels its goal (an empty command) while a lifecycle manager has the node
    inactive: the command topic was unsubscribed, so after activate the old goal ran again."""
    with served("lifecycle_stop_inactive") as (harness, client):
        node = harness.node
        client.send_command("red")
        assert wait_for(lambda: node._scheduler.continuous_command == "red", 5)
        node.trigger_deactivate()
        client.send_command("")
        assert wait_for(lambda: node._scheduler.continuous_command is None, 5)
        client.send_command("blue")  # a new goal while inactive is the one resumed
        assert wait_for(lambda: node._scheduler.continuous_command == "blue", 5)
        node.trigger_activate()
        assert node._scheduler.continuous_command == "blue"
        node.trigger_deactivate()
        node.trigger_cleanup()  # unconfigured forgets continuous mode, as a restart does
        assert node._scheduler.continuous_command is None


def test_deactivate_answers_a_waiting_request():
    context = new_context()
    harness = NodeHarness(context)
    client = Client(context)
    try:
        client.wait_connected()
        future = client.call_async("red", timeout_s=30.0)  # no frame yet: it waits
        time.sleep(0.5)
        assert not future.done()
        harness.node.trigger_deactivate()
        assert wait_for(future.done, 5)
        result = future.result().result
        assert result.status == SegmentationResult.ERROR and "deactivated" in result.message
    finally:
        client.close()
        harness.close()
        context.try_shutdown()


def test_first_frame_of_a_new_size_warms_the_segmenter_up_before_serving():
    """The camera's own resolution is warmed up on the inference thread, once per size."""
    with served("lifecycle_warm") as (harness, client):
        segmenter = harness.node._segmenter
        segmenter.events.clear()
        client.publish_frame(Scene(), wait_node=harness.node)
        assert client.call("red").result.status == SegmentationResult.OK  # asked at once, no waiting
        # the new size was warmed up on the inference thread (never in an image callback), before
        # the first command on it ran
        events = list(segmenter.events)
        warm = next(i for i, e in enumerate(events) if e[0] == "warmup" and e[1] == (160, 120))
        assert events[warm][2] == "qwen3vl_seg_inference", events
        command = max(i for i, e in enumerate(events) if e[0] == "segment")
        assert warm < command, events
        client.publish_frame(Scene(), wait_node=harness.node)
        client.call("red")
        assert segmenter.warmed_sizes.count((160, 120)) == 1  # once per size


def test_a_publisher_destroyed_by_a_cleanup_mid_answer_loses_no_answer():
    """A cleanup on another thread can destroy ~/result between the look-up and the publish of a
    refusal: the message is dropped, the request still gets its ERROR, and the executor keeps
    serving (an exception there would stop it). The interleaving is forced, as it lasts µs."""
    with served("lifecycle_race") as (harness, client):
        node = harness.node
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS

        class DestroyedOnLookup(dict):
            def get(self, key, default=None):
                pub = super().get(key, default)
                if key == "result" and pub is not None:
                    node.destroy_publisher(pub)  # what the cleanup thread does at that instant
                return pub

        node._pubs = DestroyedOnLookup(node._pubs)
        result = client.call("red", timeout_s=2.0).result
        assert result.status == SegmentationResult.ERROR and "not active" in result.message
        node._pubs = {}
        assert "not active" in client.call("red", timeout_s=2.0).result.message  # still serving
        assert harness.spin_errors == []


def test_a_command_running_through_a_cleanup_is_answered_at_its_own_deadline():
    """Cleanup while the model runs a command (6 s here) with timeout_s 1: the deadline watchdog
    keeps working while the cleanup waits for the model, so the request is answered with its own
    timeout, not held until the cleanup gives up on the model."""
    import threading

    with served("lifecycle_cleanup_busy") as (harness, client):
        node = harness.node
        client.publish_frame(Scene(), wait_node=node)
        future = client.call_async("red sleep:6", timeout_s=1.0)
        assert wait_for(lambda: node._scheduler._busy_job is not None, 5)
        transitions = threading.Thread(target=lambda: (node.trigger_deactivate(), node.trigger_cleanup()))
        transitions.start()
        assert wait_for(future.done, 10)
        message = future.result().result.message
        assert "timed out after" in message and "the model was still running" in message, message
        assert "cleaned up" not in message
        transitions.join(10)
        assert not transitions.is_alive() and state_id(node) == State.PRIMARY_STATE_UNCONFIGURED


def test_a_failed_warm_up_closes_the_segmenter_it_loaded():
    """The model loaded, then its warm-up failed (a GPU out of memory, typically): configure
    fails and the loaded segmenter is closed, so a second configure does not start with the
    first one's memory still held."""
    from qwen3vl_seg_ros.ros.node import SegmentationNode

    from doubles.color_blob_segmenter import ColorBlobSegmenterDouble

    class WarmUpFails(ColorBlobSegmenterDouble):
        def warmup(self, progress=None, image_size=None) -> None:
            raise RuntimeError("CUDA out of memory (simulated warm-up failure)")

    loaded: list[WarmUpFails] = []

    def factory(spec, options, progress):
        loaded.append(WarmUpFails(options))
        return loaded[-1]

    context = new_context("lifecycle_warm_fails")
    node = SegmentationNode(context=context, segmenter_factory=factory)
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
        assert len(loaded) == 1 and loaded[0].closed
        assert node._segmenter is None and "CUDA out of memory" in node._configure_error
    finally:
        node.destroy_node()
        context.try_shutdown()


def test_deactivate_mid_run_leaves_no_objects_on_display():
    """A continuous run still in the model when the node is deactivated answers on ~/result,
    but its objects never reach RViz: deactivate cleared the display and it stays clear (markers
    live until replaced, and an inactive node replaces nothing)."""
    from visualization_msgs.msg import Marker

    with served("lifecycle_display") as (harness, client):
        node = harness.node
        node.set_parameters([Parameter("max_rate_hz", value=0.0)])
        with client.streaming(Scene(), rate_hz=20):
            # the first run must see depth and camera_info, or it is 2D and shows no markers
            client.publish_frame(Scene(), wait_node=node)
            client.send_command("red sleep:0.6")
            assert wait_for(lambda: len(client.snapshot(client.markers)) >= 1, 10)  # first run shown
            seen: dict = {}

            def second_run_in_the_model() -> bool:
                job = node._scheduler._busy_job  # read once: the inference thread clears it
                if job is not None and job.request_id != "continuous-1":
                    seen["job"] = job
                return "job" in seen

            assert wait_for(second_run_in_the_model, 10)
            assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
            running = seen["job"]
            assert wait_for(lambda: any(r.request_id == running.request_id
                                        for r in client.snapshot(client.results)), 10)  # it finished
        time.sleep(0.5)  # what the run would have published has arrived by now
        last_markers = client.snapshot(client.markers)[-1]
        assert last_markers.markers and all(m.action == Marker.DELETEALL for m in last_markers.markers)
        last_cloud = client.snapshot(client.clouds)[-1]
        assert last_cloud.width * last_cloud.height == 0
        client.send_command("")


def test_a_run_through_cleanup_and_reconfigure_is_marked_late():
    """A continuous run still in the model through cleanup -> configure -> activate: the cleanup
    answers it with an ERROR, and its own result, when the model returns, says it is late (it
    holds objects from before the cleanup) and shows nothing on the new session's display."""
    with served("lifecycle_straggler") as (harness, client):
        node = harness.node
        node.set_parameters([Parameter("max_rate_hz", value=0.0)])
        with client.streaming(Scene(), rate_hz=10):
            client.send_command("red sleep:3")
            assert wait_for(lambda: node._scheduler._busy_job is not None, 10)
            run_id = node._scheduler._busy_job.request_id
            node.trigger_deactivate()
            node.trigger_cleanup()
            markers_before = len(client.snapshot(client.markers))
            node.trigger_configure()
            node.trigger_activate()
            assert wait_for(lambda: len([r for r in client.snapshot(client.results) if r.request_id == run_id]) >= 2,
                            10)
        answers = [r for r in client.snapshot(client.results) if r.request_id == run_id]
        assert len(answers) == 2, [(r.status, r.message) for r in answers]
        assert answers[0].status == SegmentationResult.ERROR and "cleaned up" in answers[0].message
        assert answers[1].message.startswith("late: this run had already been answered with an ERROR")
        assert len(client.snapshot(client.markers)) == markers_before  # nothing on the new display
        assert node._scheduler.continuous_command is None  # a configure starts without continuous mode


def test_a_stop_of_invisible_characters_stops_continuous_mode():
    """A planner's "stop" read from a file can carry a BOM or a zero-width space: it is empty once
    cleaned, so it stops continuous mode instead of being refused as an empty command."""
    with served("lifecycle_blank_stop") as (harness, client):
        node = harness.node
        for blank in ("\ufeff", "\u200b", " \u200b\ufeff "):
            client.send_command("blue")
            assert wait_for(lambda: node._scheduler.continuous_command == "blue", 5)
            client.send_command(blank)
            assert wait_for(lambda: node._scheduler.continuous_command is None, 5), repr(blank)
        assert not [r for r in client.snapshot(client.results) if r.request_id == "continuous-rejected"]


def test_after_shutdown_the_refusal_says_so():
    """Finalized is the lifecycle's end: the answer must not advise configuring the node."""
    with served("lifecycle_finalized") as (harness, client):
        node = harness.node
        assert node.trigger_shutdown() == TransitionCallbackReturn.SUCCESS
        result = client.call("red", timeout_s=2.0).result
        assert result.status == SegmentationResult.ERROR
        assert "shut down" in result.message and "configure" not in result.message, result.message


def test_diagnostics_and_the_service_speak_during_a_slow_configure():
    """Configure through the lifecycle service (nav2's lifecycle manager, `ros2 lifecycle set`)
    with a model that loads for 2 s: /diagnostics keeps coming and says "loading", a command
    sent meanwhile is told the node is configuring, and `ros2 lifecycle get` says so too."""
    import threading

    from lifecycle_msgs.msg import State, Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    from rclpy.parameter import Parameter

    from reliability_helpers import RosoutRecorder
    from ros_harness import must_call_service

    namespace = "lifecycle_slow_load"
    context = new_context(namespace)
    harness = NodeHarness(context, {"segmenter": "doubles.color_blob_segmenter:SlowLoadingSegmenterDouble",
                                    "diagnostics_period_s": 0.2}, autostart=False)
    client = Client(context, node_fqn=f"/{namespace}/qwen3vl_seg")
    log = RosoutRecorder(client, f"{namespace}.qwen3vl_seg")
    seen: list[tuple[float, str]] = []
    client.node.create_subscription(DiagnosticArray, "/diagnostics", lambda m: seen.extend(
        (time.monotonic(), s.message) for s in m.status if s.name.startswith(namespace)), 10)
    try:
        assert client.segment_client.wait_for_service(timeout_sec=10)
        answer: dict = {}
        request = ChangeState.Request(transition=Transition(id=Transition.TRANSITION_CONFIGURE))
        configure = threading.Thread(target=lambda: answer.update(response=must_call_service(
            client.node, ChangeState, f"/{namespace}/qwen3vl_seg/change_state", request, answer_wait_s=20)))
        t0 = time.monotonic()
        configure.start()
        # configure began: the load is on (any message after t0 could still be the last
        # "unconfigured" one; "loading segmenter" is only said while it loads)
        assert wait_for(lambda: any(t >= t0 and m.startswith("loading segmenter") for t, m in seen), 5)
        refusal = client.call("red", timeout_s=1.0).result.message
        # a configure-time parameter set during the load: accepted, and said to wait for the next
        # configure (the load has read the old value; the set was silent)
        assert harness.node.set_parameters([Parameter("box_refine_passes", value=2)])[0].successful
        log.wait_line("box_refine_passes takes effect at the next configure")
        # `ros2 lifecycle get` answers during the load (it waited for its end): "configuring"
        node_fqn = f"/{namespace}/qwen3vl_seg"
        state = must_call_service(client.node, GetState, f"{node_fqn}/get_state", GetState.Request(),
                                  answer_wait_s=1.5).current_state
        # an internal transition asked for meanwhile waits for the configure, then is refused from
        # inactive (run at once, it left the loaded node "unconfigured" and failed the configure)
        failure: dict = {}
        internal = threading.Thread(target=lambda: failure.update(response=must_call_service(
            client.node, ChangeState, f"{node_fqn}/change_state",
            ChangeState.Request(transition=Transition(label="transition_failure")), answer_wait_s=20)))
        internal.start()
        configure.join(20)
        internal.join(20)
        t1 = time.monotonic()
        assert answer["response"].success
        assert "configuring" in refusal and "loading segmenter" in refusal, refusal
        assert (state.id, state.label) == (State.TRANSITION_STATE_CONFIGURING, "configuring"), state
        assert not failure["response"].success
        after = must_call_service(client.node, GetState, f"{node_fqn}/get_state", GetState.Request()).current_state
        assert after.label == "inactive"
        loading = [t for t, m in seen if t0 <= t <= t1 and m.startswith("loading segmenter")]
        assert len(loading) >= 3, seen  # ~10 at 0.2 s over 2 s; before the fix, one
    finally:
        client.close()
        harness.close()
        context.try_shutdown()


def test_a_job_picked_just_before_deactivate_shows_nothing_after_it():
    """The scheduler picked a job, then deactivate cleared the display before the job reached its
    first line: the job must still show nothing (held here between the pick and the run, as
    preemption would)."""
    import threading

    from visualization_msgs.msg import Marker

    with served("lifecycle_pick_race") as (harness, client):
        node = harness.node
        run_job = node._scheduler._run
        picked, go = threading.Event(), threading.Event()

        def held_after_the_pick(job, frame):
            picked.set()
            go.wait(5)
            return run_job(job, frame)

        node._scheduler._run = held_after_the_pick
        with client.streaming(Scene(), rate_hz=10):
            future = client.call_async("red", timeout_s=10.0)
            assert picked.wait(10)
            assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
            time.sleep(0.3)
            n_markers, n_detections = len(client.snapshot(client.markers)), len(client.snapshot(client.detections))
            go.set()
            assert wait_for(future.done, 10)
        time.sleep(0.5)
        assert future.result().result.status == SegmentationResult.OK  # the caller gets its answer
        assert not client.snapshot(client.markers)[n_markers:], "an inactive node put objects back on display"
        assert not client.snapshot(client.detections)[n_detections:]
        assert all(m.action == Marker.DELETEALL for a in client.snapshot(client.markers) for m in a.markers)


def test_a_request_answered_by_a_cleanup_is_not_called_a_timeout_when_late():
    with served("lifecycle_late_wording") as (harness, client):
        node = harness.node
        with client.streaming(Scene(), rate_hz=10):
            future = client.call_async("red sleep:3", timeout_s=30.0)
            assert wait_for(lambda: node._scheduler._busy_job is not None, 10)
            request_id = node._scheduler._busy_job.request_id
            node.trigger_deactivate()
            node.trigger_cleanup()
            assert wait_for(future.done, 10)
            assert "cleaned up" in future.result().result.message
            node.trigger_configure()  # ~/result exists again when the model returns
            node.trigger_activate()
            assert wait_for(lambda: len([r for r in client.snapshot(client.results)
                                         if r.request_id == request_id]) >= 2, 10)
        late = [r for r in client.snapshot(client.results) if r.request_id == request_id][-1]
        assert late.message.startswith("late: this request had already been answered with an ERROR (node was "
                                       "cleaned up"), late.message

"""BackgroundSpinner: callbacks run while it spins, stop() joins its thread, errors reach the owner."""

from __future__ import annotations

import threading
import time

import pytest
import rclpy
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import Executor, MultiThreadedExecutor, SingleThreadedExecutor
from std_msgs.msg import String

from qwen3vl_seg_ros.ros.spinner import BackgroundSpinner

from helpers import wait_for
from ros_harness import new_context

pytestmark = pytest.mark.ros


def node_on(executor_type: type[Executor], name: str, **executor_args):
    """A fresh context with one node added to a new executor of ``executor_type``."""
    context = new_context()
    node = rclpy.create_node(name, context=context)
    executor = executor_type(context=context, **executor_args)
    executor.add_node(node)
    return context, node, executor


def test_spins_callbacks_and_stop_joins_the_thread():
    context, node, executor = node_on(SingleThreadedExecutor, "spinner_test")
    got: list[str] = []
    node.create_subscription(String, "spinner_test_topic", lambda m: got.append(m.data), 10)
    pub = node.create_publisher(String, "spinner_test_topic", 10)
    spinner = BackgroundSpinner(executor, name="spinner-under-test").start()
    try:
        assert wait_for(lambda: (pub.publish(String(data="hello")), bool(got))[1], 5.0)
        assert got[0] == "hello"
    finally:
        joined = spinner.stop(timeout=2.0)
        node.destroy_node()
        context.try_shutdown()
    assert joined and spinner.done.is_set()
    assert not spinner._thread.is_alive()


def test_a_failing_callback_is_handed_to_on_error_and_ends_the_loop():
    context, node, executor = node_on(SingleThreadedExecutor, "spinner_error_test")
    errors: list[BaseException] = []

    def boom() -> None:
        raise RuntimeError("callback failed")

    node.create_timer(0.01, boom)
    spinner = BackgroundSpinner(executor, on_error=errors.append).start()
    try:
        assert spinner.done.wait(5.0), "the loop kept going after an error"
    finally:
        spinner.stop(timeout=2.0)
        node.destroy_node()
        context.try_shutdown()
    assert len(errors) == 1 and "callback failed" in str(errors[0])


def test_a_shut_down_context_ends_the_loop_without_an_error():
    context, node, executor = node_on(SingleThreadedExecutor, "spinner_shutdown_test")
    errors: list[BaseException] = []
    spinner = BackgroundSpinner(executor, on_error=errors.append).start()
    node.destroy_node()
    context.try_shutdown()
    assert spinner.done.wait(5.0)
    spinner.stop(timeout=2.0)
    assert errors == []


@pytest.mark.filterwarnings("ignore:MultiThreadedExecutor is used with a single thread")
def test_stop_lets_queued_pool_callbacks_finish_cleanly():
    """Callbacks dispatched to a MultiThreadedExecutor's pool before stop() run to the end
    without an InvalidHandle (rclpy's shutdown alone destroys the guard condition that a
    queued handler triggers once it has taken its message)."""
    # one pool thread: the second handler waits behind the first
    context, node, executor = node_on(MultiThreadedExecutor, "spinner_pool_test", num_threads=1)
    started = threading.Event()
    finished: list[str] = []

    def slow(msg: String) -> None:
        started.set()
        time.sleep(0.3)
        finished.append(msg.data)

    node.create_subscription(String, "spinner_pool_topic", slow, 10, callback_group=ReentrantCallbackGroup())
    pub = node.create_publisher(String, "spinner_pool_topic", 10)
    spinner = BackgroundSpinner(executor).start()
    try:
        assert wait_for(lambda: (pub.publish(String(data="first")), started.is_set())[1], 5.0)
        pub.publish(String(data="second"))
        # the second handler is dispatched while the first still sleeps in the only pool thread
        assert wait_for(lambda: len(executor._futures) >= 2, 2.0)
        tasks = list(executor._futures)  # rclpy's handler tasks (private, read for this check only)
    finally:
        spinner.stop(timeout=2.0, shutdown_timeout=3.0)
        node.destroy_node()
        context.try_shutdown()
    assert all(t.done() for t in tasks)
    assert [repr(t.exception()) for t in tasks if t.exception() is not None] == []
    assert finished  # (without the wait in stop(), dozens of these tasks failed with InvalidHandle)

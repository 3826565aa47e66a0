"""Shared setup of the reliability tests (issue #7): a node in its own namespace, its log lines.

Every reliability test module runs the real node and a client in one rclpy context whose
global remapping puts both in a namespace of their own (``/<ns>/image``, ``/<ns>/qwen3vl_seg``,
logger ``<ns>.qwen3vl_seg``), so nodes of other test modules in the same DDS domain can never
answer their requests or feed them frames. Log lines are checked the way an operator sees them:
on ``/rosout``, over DDS.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import rclpy
from rcl_interfaces.msg import Log
from rclpy.context import Context
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy

from qwen3vl_seg_ros.msg import SegmentationResult

from helpers import wait_for
from ros_harness import Client, NodeHarness

STATUS = {SegmentationResult.OK: "OK", SegmentationResult.NO_MATCH: "NO_MATCH", SegmentationResult.ERROR: "ERROR"}


def namespaced_context(namespace: str) -> Context:
    """A context whose nodes all live in ``/<namespace>``."""
    context = Context()
    rclpy.init(context=context, args=["--ros-args", "-r", f"__ns:=/{namespace}"])
    return context


class RosoutRecorder:
    """Records the /rosout lines of one logger (e.g. ``bad_input.qwen3vl_seg``)."""

    def __init__(self, client: Client, logger_name: str) -> None:
        self.logger_name = logger_name
        self._lines: list[tuple[int, str]] = []
        self._lock = threading.Lock()
        qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        client.node.create_subscription(Log, "/rosout", self._on_log, qos)

    def _on_log(self, msg: Log) -> None:
        if msg.name == self.logger_name:
            with self._lock:
                self._lines.append((int(msg.level), msg.msg))

    def lines(self, min_level: int = 0) -> list[str]:
        with self._lock:
            return [text for level, text in self._lines if level >= min_level]

    def wait_line(self, *needles: str, min_level: int = 0, timeout: float = 5.0) -> str:
        """The first line holding every needle; fails the test when none arrives."""
        found: list[str] = []

        def check() -> bool:
            found[:] = [t for t in self.lines(min_level) if all(n in t for n in needles)]
            return bool(found)

        assert wait_for(check, timeout), f"no log line with {needles} at level >= {min_level}: {self.lines()[-5:]}"
        return found[0]


class System:
    """Node + client + log recorder in one namespace."""

    WARN = 30
    ERROR = 40

    def __init__(self, namespace: str, parameters: dict[str, Any] | None = None) -> None:
        self.namespace = namespace
        self.context = namespaced_context(namespace)
        self.harness = NodeHarness(self.context, parameters)
        self.node = self.harness.node
        self.client = Client(self.context, node_fqn=f"/{namespace}/qwen3vl_seg")
        self.log = RosoutRecorder(self.client, f"{namespace}.qwen3vl_seg")
        self.client.wait_connected()

    def set_params(self, **values: Any) -> None:
        results = self.node.set_parameters([Parameter(k, value=v) for k, v in values.items()])
        assert all(r.successful for r in results), results
        assert wait_for(lambda: all(self.node.p(k) == v for k, v in values.items()), 5)

    def close(self) -> None:
        self.client.close()
        self.harness.close()
        self.context.try_shutdown()


def results_with(client: Client, request_id: str) -> list[SegmentationResult]:
    return [r for r in client.snapshot(client.results) if r.request_id == request_id]


def wait_result(client: Client, request_id: str, predicate: Callable[[SegmentationResult], bool] = lambda r: True,
                timeout: float = 10.0) -> SegmentationResult:
    """The first ~/result with ``request_id`` that satisfies ``predicate``."""
    found: list[SegmentationResult] = []

    def check() -> bool:
        found[:] = [r for r in results_with(client, request_id) if predicate(r)]
        return bool(found)

    assert wait_for(check, timeout), f"no ~/result for {request_id}"
    return found[0]

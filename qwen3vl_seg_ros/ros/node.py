"""The lifecycle node ``qwen3vl_seg``: topics, service, parameters and the inference thread.

Lifecycle:
  configure   load the segmenter (model, decoder) and warm it up; create publishers, TF; subscribe
              to command (so a stop sent while inactive holds)
  activate    subscribe to image / depth / camera_info; start serving
  deactivate  stop serving (queued requests get an ERROR answer); clear the objects on display
              (cloud, markers, detections); keep the model loaded
  cleanup     release the segmenter (and its GPU memory); forget continuous mode

Threads: the executor's callbacks only store messages and queue work; the scheduler's thread
runs inference and publishes. ``~/segment`` is an async service callback that waits on a future
the inference thread completes, so no executor thread is held while a model runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import InvalidHandle, InvalidParameterValueException, ParameterException
from rclpy.executors import MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import (
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
    qos_profile_sensor_data,
)
from rclpy.signals import SignalHandlerOptions
from rclpy.task import Future
from rclpy.utilities import remove_ros_args
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import Header, String
from visualization_msgs.msg import MarkerArray

from qwen3vl_seg_ros.commands import clean_command, is_blank
from qwen3vl_seg_ros.geometry import MIN_LENGTH_M
from qwen3vl_seg_ros.masks import box_mask, mask_box
from qwen3vl_seg_ros.msg import SegmentationResult
from qwen3vl_seg_ros.overlay import draw_overlay, label_image
from qwen3vl_seg_ros.ros import conversions, detections
from qwen3vl_seg_ros.ros.dds_shm import clean_before_start
from qwen3vl_seg_ros.ros.parameters import ACTIVATE, BY_NAME, CONFIGURE, PARAMETERS, Param, params_yaml
from qwen3vl_seg_ros.ros.results import (
    ECHO_CHARS,
    MAX_ANSWER_CHARS,
    new_result,
    objects_from_instances,
    safe_text,
    truncate,
)
from qwen3vl_seg_ros.ros.scheduler import Job, Scheduler
from qwen3vl_seg_ros.ros.spinner import BackgroundSpinner
from qwen3vl_seg_ros.ros.sync import Frame, RgbdSynchronizer
from qwen3vl_seg_ros.ros.tf import clean_frame
from qwen3vl_seg_ros.ros.three_d import ThreeDStage
from qwen3vl_seg_ros.segmenter import Segmenter, SegmenterOptions, create_segmenter
from qwen3vl_seg_ros.srv import Segment
from qwen3vl_seg_ros.tracking import ObjectTracker, Observation, TrackerSettings, mean_colours
from qwen3vl_seg_ros.types import InputError, Instance, SegmentationOutput, SegmenterError

NODE_NAME = "qwen3vl_seg"

#: Frame sizes the node warms the segmenter up for (the configure-time one included).
MAX_WARM_SIZES = 8
#: Parameters that switch a display output whose objects must be cleared when it is switched off.
DISPLAY_SWITCHES = ("publish_cloud", "publish_markers", "publish_detections")

#: Longest object label put into a result; longer ones are cut (a label is a name, not a text).
MAX_LABEL_CHARS = 200

#: QoS of ~/segment. KEEP_LAST drops the oldest sample beyond the depth, silently, on both sides:
#: - requests: a burst of calls (one planner firing 300, or 100 planners at once) arrives faster
#:   than the executor takes them; with a depth of 64 all but the newest 64 were never answered,
#:   not even refused. Taking a request is cheap and the surplus is refused at once
#:   (max_pending_requests), so a deep reader queue turns a burst into answers;
#: - answers: deactivation or shutdown answers every queued request at once (up to
#:   max_pending_requests, plus the running one and the refusals of a burst), and a writer
#:   keeping the last 10 (the default) drops some before a busy client has taken them.
#: Clients with many requests in flight need a deep queue on their side too.
SERVICE_QOS = QoSProfile(depth=1024, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)

SegmenterFactory = Callable[[str, SegmenterOptions, Callable[[str], None]], Segmenter]


USAGE = """usage: segmentation_node [-h] [--ros-args -p NAME:=VALUE ... --params-file FILE]

The qwen3vl_seg lifecycle node: language-conditioned instance segmentation with per-object 3D.
Topics, the ~/segment service and the messages are documented in the package's README.

  -p autostart:=false   stay unconfigured, for a lifecycle manager or `ros2 lifecycle set`
                        (default true: configure and activate at start-up)

Its parameters, with their defaults (a params file in this form sets them):

"""


def _log_id(request_id: str) -> str:
    """A request id as the log shows it: a client's id may be any length (the result echoes it
    whole), and a 1 MB id would otherwise make a 1 MB line on /rosout and the disk per call."""
    return truncate(request_id, ECHO_CHARS)


def _late_note(job: Job) -> str:
    """The prefix of a result whose request was already answered with an ERROR (its deadline, or a
    stop while the model ran): the caller has moved on, and this result comes after."""
    what = "request" if not job.continuous else "run"
    if job.failure.startswith("timed out"):
        return f"late: this {what} had already been answered with a timeout ERROR"
    return f"late: this {what} had already been answered with an ERROR ({truncate(job.failure, 200)})"


def _stamp_seconds(header: Header) -> float:
    return header.stamp.sec + header.stamp.nanosec * 1e-9


def _describe_exception(exc: BaseException) -> str:
    """User-facing reason for an unexpected model failure (GPU OOM gets advice)."""
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return (f"the segmenter ran out of memory ({exc}); use a smaller model, dtype bf16/fp16, a "
                f"smaller image_max_pixels, or free GPU memory. The node keeps serving.")
    return f"internal error in the segmenter: {name}: {exc}"


class SegmentationNode(LifecycleNode):
    """Language-conditioned instance segmentation with 3D outputs (see the module docstring)."""

    def __init__(self, node_name: str = NODE_NAME, segmenter_factory: SegmenterFactory | None = None,
                 **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._answer_lifecycle_queries_during_transitions()
        self._segmenter_factory = segmenter_factory or create_segmenter
        self._declare_parameters()
        self._segmenter: Segmenter | None = None
        self._configure_error = ""
        self._warm_sizes: set[tuple[int, int]] = set()
        self._frames = RgbdSynchronizer(
            slop_s=self.p("sync_slop_s"), queue_size=self.p("sync_queue_size"),
            depth_timeout_s=self.p("depth_timeout_s"), use_depth=self.p("use_depth"))
        self._scheduler = Scheduler(self._frames, self._run_job, self._error_result)
        self._apply_scheduler_params()
        self._three_d: ThreeDStage | None = None
        self._tracker = ObjectTracker()
        self._subs: list[Any] = []
        self._command_sub: Any = None
        self._pubs: dict[str, Any] = {}
        # Diagnostics exist in every lifecycle state, so a monitor also sees "loading" and
        # "configure failed", not only a serving node. Their timer runs on the steady clock: on
        # ROS time (use_sim_time) it would stop while no /clock comes (a bag not started or paused).
        self._diag_pub = self.create_publisher(
            DiagnosticArray, "/diagnostics",
            QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST))
        # Its own group: configure runs in the default group (with change_state), and a model
        # load there took the diagnostics with it (silent for the whole load, then STALE).
        self._diag_timer = self.create_timer(float(self.p("diagnostics_period_s")), self._publish_diagnostics,
                                             callback_group=MutuallyExclusiveCallbackGroup(),
                                             clock=Clock(clock_type=ClockType.STEADY_TIME))
        self._loading = ""  # the segmenter being loaded by configure, "" otherwise
        self._shut_down = False  # the lifecycle shutdown transition ran (Finalized: no way back)
        # RViz and the detection topics show the objects of the current active stretch only
        # (Scheduler.session): a job still in the model when the node is deactivated or cleaned up
        # publishes its answer on ~/result, but not on the display topics (deactivate cleared
        # them; they stay clear). The lock orders a job's display against the clear.
        self._display_lock = threading.Lock()
        self._detections_shown: tuple[str, str] | None = None  # frames of the last non-empty arrays
        self._last_refused: str | None = None  # the last command refused on the topic (answered once)
        self._last_tracked_at = -math.inf  # when the tracker last saw a result with objects
        self._tracks_warned_at = -math.inf  # when the log last said results come too slowly for tracks
        self._stats_lock = threading.Lock()
        self._inflight = 0  # ~/segment calls not yet answered (drained on a graceful shutdown)
        self._stats = {"ok": 0, "no_match": 0, "error": 0, "images": 0, "depths": 0,
                       "last_total_ms": float("nan"), "last_input_age_ms": float("nan")}
        # One group per stream: in a shared mutually exclusive group the executor always takes
        # the subscription created first when several are ready, and under load the colour
        # image starved the depth (measured: 14 colour vs 3 depth frames a second taken in).
        # The callbacks only store under the synchroniser's lock, so they may run side by side.
        self._image_group = MutuallyExclusiveCallbackGroup()
        self._depth_group = MutuallyExclusiveCallbackGroup()
        self._sensor_group = MutuallyExclusiveCallbackGroup()  # camera_info and command
        self._service_group = ReentrantCallbackGroup()
        # The service exists in every state so that a request always gets an answer, also
        # "not configured" or "not active" ones.
        self._service = self.create_service(Segment, "~/segment", self._on_segment, qos_profile=SERVICE_QOS,
                                            callback_group=self._service_group)
        if hasattr(self, "add_pre_set_parameters_callback"):  # rclpy >= 3.7 (Iron); Humble lacks it
            self.add_pre_set_parameters_callback(self._widen_integers)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        if hasattr(self, "add_post_set_parameters_callback"):  # rclpy >= 3.7 (Iron)
            self.add_post_set_parameters_callback(self._after_set_parameters)

    def _answer_lifecycle_queries_during_transitions(self) -> None:
        """Moves the read-only lifecycle services (get_state, available states and transitions,
        the transition graph) to a reentrant group: in the default group with change_state, a
        configure that loads a model for a minute held `ros2 lifecycle get` unanswered for that
        minute. change_state stays there, so transitions still run one at a time (with every
        lifecycle service reentrant, an internal transition such as transition_failure ran in the
        middle of a configure and left the loaded node "unconfigured"). The services are rclpy's
        own attributes; where a version names them otherwise, they stay where they are."""
        group = ReentrantCallbackGroup()
        for name in ("_service_get_state", "_service_get_available_states", "_service_get_available_transitions",
                     "_service_get_transition_graph"):
            service = getattr(self, name, None)
            if service is not None and hasattr(service, "callback_group"):
                service.callback_group = group
                group.add_entity(service)

    # ------------------------------------------------------------------------------------------
    # parameters
    # ------------------------------------------------------------------------------------------
    def _declare_parameters(self) -> None:
        self._widen_integer_overrides()
        for param in PARAMETERS:
            self.declare_parameter(param.name, param.default, self._descriptor(param))
        self._check_declared_values()
        self._say_unknown_overrides()

    def _check_declared_values(self) -> None:
        """The start-up values (params file, -p, launch arguments) through the checks a runtime
        set gets: the set callback is not called for them, and ``image_qos: Reliable`` gave a
        best-effort subscription while the log said reliable; min_depth_m above max_depth_m gave
        2D-only results blamed on the depth unit. Raised as rclpy does for an out-of-range value."""
        values = {param.name: self.p(param.name) for param in PARAMETERS}
        problem = self._values_problem(values, at_start=True)
        if problem:
            name = next((n for n in values if problem.startswith(n)), "parameters")
            raise InvalidParameterValueException(name, values.get(name, ""), problem)

    def _say_unknown_overrides(self) -> None:
        """A misspelt name in a params file (score_treshold) is dropped by rclpy without a word,
        leaving the default in force: warned (not refused: a ``/**`` file may serve other nodes)."""
        known = set(BY_NAME) | {"autostart", "use_sim_time", "start_type_description_service"}
        unknown = sorted(name for name in self._parameter_overrides if name not in known)
        qos = [name for name in unknown if name.startswith("qos_overrides.")]
        others = [name for name in unknown if name not in qos]
        if others:
            self.get_logger().warning(f"no such parameter, ignored: {', '.join(others)} "
                                      f"(the parameters: config/params.yaml or --help)")
        if qos:  # ROS's QoS overrides need each topic created for them; image_qos is the way here
            self.get_logger().warning(f"QoS overrides are not read by this node, ignored: {', '.join(qos)} "
                                      "(the camera inputs' QoS is the parameter image_qos; command and "
                                      "outputs are reliable)")

    def _widen_integer_overrides(self) -> None:
        """``max_rate_hz: 10`` in a params file (or ``-p max_input_age_s:=2``) is an integer to
        ROS, and declaring a double parameter with it raises at start-up: the process would die
        on a value every user means as 10.0. Such overrides are widened to floats first."""
        for param in self._widen_integers(list(self._parameter_overrides.values())):
            self._parameter_overrides[param.name] = param

    @staticmethod
    def _widen_integers(params: list[Parameter]) -> list[Parameter]:
        """``ros2 param set /qwen3vl_seg max_rate_hz 10`` sends an integer, which rclpy refuses for
        a double parameter ("Wrong parameter type, expected '3' got '2'"): widened, as at start-up."""
        def is_double(p: Parameter) -> bool:
            return p.name in BY_NAME and isinstance(BY_NAME[p.name].default, float)

        return [Parameter(p.name, value=float(p.value)) if p.type_ == Parameter.Type.INTEGER and is_double(p) else p
                for p in params]

    @staticmethod
    def _descriptor(param: Param) -> ParameterDescriptor:
        desc = ParameterDescriptor(description=f"{param.description} (applies at {param.applies})",
                                   read_only=param.read_only)
        if param.choices:
            desc.additional_constraints = "one of: " + ", ".join(param.choices)
        if param.min is not None and isinstance(param.default, float):
            desc.floating_point_range = [FloatingPointRange(from_value=float(param.min),
                                                            to_value=float(param.max), step=0.0)]
        elif param.min is not None and isinstance(param.default, int) and not isinstance(param.default, bool):
            desc.integer_range = [IntegerRange(from_value=int(param.min), to_value=int(param.max), step=1)]
        return desc

    def p(self, name: str) -> Any:
        """Current value of a parameter."""
        return self.get_parameter(name).value

    def _on_set_parameters(self, params: list[Any]) -> SetParametersResult:
        new = {param.name: param.value for param in params}
        problem = self._values_problem(new)
        if problem:
            return SetParametersResult(successful=False, reason=problem)
        # Applied here from the accepted values themselves: rclpy stores them only after this
        # returns, and a deferred apply (a 0 s timer) could run before that and keep the old ones.
        self._apply_scheduler_params(new)
        self._say_when_they_apply(new)
        return SetParametersResult(successful=True)

    def _values_problem(self, new: dict[str, Any], at_start: bool = False) -> str:
        """Why values cannot be taken (a choice not among those allowed, 3D values that cannot
        work together), or ""; each range alone is checked by rclpy from the descriptors."""
        for name, value in new.items():
            spec = BY_NAME.get(name)
            if spec is not None and spec.choices and value not in spec.choices:
                return f"{name} must be one of {', '.join(spec.choices)}, not '{value}'"
        return self._geometry_problem(new, at_start)

    def _geometry_problem(self, new: dict[str, Any], at_start: bool = False) -> str:
        """Why new 3D parameters cannot work together, or "". Each range alone allows them, but
        min_depth_m at or above max_depth_m made every result an ERROR, and a gap or voxel below
        a micrometre overflows the bin arithmetic."""
        value = {name: float(new[name]) if name in new else float(self.p(name))
                 for name in ("min_depth_m", "max_depth_m")}
        if ("min_depth_m" in new or "max_depth_m" in new) and value["min_depth_m"] >= value["max_depth_m"]:
            advice = "" if at_start else "; set the other end first (ros2 param set checks one parameter at a time)"
            return (f"min_depth_m ({value['min_depth_m']:g}) must be below max_depth_m "
                    f"({value['max_depth_m']:g}){advice}")
        for name in ("cluster_gap_m", "voxel_size_m"):
            if name in new and 0.0 < float(new[name]) < MIN_LENGTH_M:
                return f"{name} must be 0 (off) or at least {MIN_LENGTH_M:g} m, not {float(new[name]):g}"
        return ""

    def _say_when_they_apply(self, new: dict[str, Any]) -> None:
        """A configure- or activate-time parameter set on a node past that step is accepted but
        changes nothing yet; rclpy drops the reason of a successful set, so the log says it."""
        # a configure still loading has read its parameters already
        configured, active = self._segmenter is not None or bool(self._loading), bool(self._subs)
        for name in new:
            spec = BY_NAME.get(name)
            if spec is None:
                continue
            if spec.applies == CONFIGURE and configured:
                self.get_logger().info(f"{name} takes effect at the next configure (cleanup, configure, activate)")
            elif spec.applies == ACTIVATE and active:
                self.get_logger().info(f"{name} takes effect at the next activate (deactivate, activate)")

    def _apply_scheduler_params(self, new: dict[str, Any] | None = None) -> None:
        """Puts the live-tunable parameters into the scheduler and synchronizer; ``new`` holds
        values being set that the node does not hold yet."""
        def value(name: str) -> Any:
            return new[name] if new and name in new else self.p(name)

        self._scheduler.max_input_age_s = float(value("max_input_age_s"))
        self._scheduler.max_rate_hz = float(value("max_rate_hz"))
        self._scheduler.max_pending = int(value("max_pending_requests"))
        self._frames.slop_s = float(value("sync_slop_s"))
        self._frames.depth_timeout_s = float(value("depth_timeout_s"))
        self._scheduler.notify_frame()  # a new rate or age limit is planned with at once

    def _segmenter_options(self) -> SegmenterOptions:
        return SegmenterOptions(
            model=self.p("model"), decoder=self.p("decoder"), device=self.p("device"),
            dtype=self.p("dtype"), mask_head=self.p("mask_head"),
            local_files_only=self.p("local_files_only"), max_new_tokens=self.p("max_new_tokens"),
            max_objects=0, fast_decode=self.p("fast_decode"),  # _select keeps the best max_objects by score
            compile_cache_dir=self.p("compile_cache_dir"), image_max_pixels=self.p("image_max_pixels"),
            num_threads=self.p("num_threads"), box_refine_passes=self.p("box_refine_passes"),
            calibrate_scores=self.p("calibrate_scores"))

    # ------------------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        log = self.get_logger()
        spec = self.p("segmenter")
        self._diag_timer.timer_period_ns = int(float(self.p("diagnostics_period_s")) * 1e9)
        log.info(f"configuring: loading segmenter '{spec}' (model '{self.p('model') or 'shipped tiny model'}')")
        self._loading = spec
        self._publish_diagnostics()
        try:
            return self._configure(spec)
        finally:
            self._loading = ""

    def _configure(self, spec: str) -> TransitionCallbackReturn:
        log = self.get_logger()
        t0 = time.monotonic()
        segmenter = None
        try:
            segmenter = self._segmenter_factory(spec, self._segmenter_options(), self._progress)
            if self.p("warmup"):
                log.info("warming up (first-call allocation and compilation happen now, not on a command)")
                segmenter.warmup(self._progress)
        except Exception as exc:  # a missing model must not kill the node: stay unconfigured
            self._configure_error = str(exc) if isinstance(exc, SegmenterError) else _describe_exception(exc)
            log.error(f"configure failed: {self._configure_error}")
            if not isinstance(exc, SegmenterError):
                log.debug(traceback.format_exc())
            if segmenter is not None:  # loaded, then the warm-up failed (a GPU out of memory): free it
                with contextlib.suppress(Exception):
                    segmenter.close()
            return TransitionCallbackReturn.FAILURE
        self._segmenter = segmenter
        self._configure_error = ""
        self._warm_sizes: set[tuple[int, int]] = set()  # the camera's own size is warmed on its first frame
        log.info(f"segmenter '{segmenter.name}' ready in {time.monotonic() - t0:.1f} s; "
                 f"image decoding via {conversions.decoder_note()}")
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        images = QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        self._pubs = {
            "result": self.create_publisher(SegmentationResult, "~/result", reliable),
            "mask": self.create_publisher(Image, "~/mask", images),
            "overlay": self.create_publisher(Image, "~/overlay", images),
            "cloud": self.create_publisher(PointCloud2, "~/cloud", images),
            "markers": self.create_publisher(MarkerArray, "~/markers", reliable),
        }
        if detections.AVAILABLE:
            self._pubs["detections"] = self.create_publisher(
                detections.Detection2DArray, "~/detections", reliable)
            self._pubs["detections_3d"] = self.create_publisher(
                detections.Detection3DArray, "~/detections_3d", reliable)
        else:
            log.warning("vision_msgs is not installed: ~/detections and ~/detections_3d are not published "
                        "(install ros-$ROS_DISTRO-vision-msgs); everything else is")
        self._three_d = ThreeDStage(self)
        # Commands are heard from configure on, so a planner's stop (or new goal) sent while the
        # node is inactive is not lost: activate resumes the planner's latest wish, not an old one.
        self._command_sub = self.create_subscription(String, "command", self._on_command, 10,
                                                     callback_group=self._sensor_group)
        self._scheduler.start()
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        qos = self._image_qos()
        group = self._sensor_group
        self._frames.use_depth = bool(self.p("use_depth"))
        self._frames.clear(queue_size=int(self.p("sync_queue_size")))
        self._last_tracked_at = -math.inf  # time spent inactive is no slow result (tracking warning)
        # Accept requests before the inputs appear on the graph: a client that waits for our
        # subscriptions (as planners and tests do) must never meet a "not active" refusal.
        self._scheduler.set_active(True)
        self._subs = [
            self.create_subscription(Image, "image", self._on_image, qos, callback_group=self._image_group),
            self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, qos, callback_group=group),
        ]
        if self.p("use_depth"):
            self._subs.append(self.create_subscription(Image, "depth", self._on_depth, qos,
                                                       callback_group=self._depth_group))
        self.get_logger().info(
            f"active: image '{self.resolve_topic_name('image')}', depth "
            f"'{self.resolve_topic_name('depth') if self.p('use_depth') else 'off'}', camera_info "
            f"'{self.resolve_topic_name('camera_info')}' ({self.p('image_qos')} QoS); commands on "
            f"'{self.resolve_topic_name('command')}' and service '{self._service.srv_name}'")
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._scheduler.set_active(False, "node was deactivated before the request could run")
        self._clear_display()  # an inactive node reports no objects
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        self.get_logger().info("inactive: inputs unsubscribed, model kept loaded")
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release("node was cleaned up")
        self.get_logger().info("cleaned up: segmenter released")
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._shut_down = True
        self._release("node is shutting down")
        return TransitionCallbackReturn.SUCCESS

    def _clear_display(self) -> None:
        """Clears RViz's objects and the detection topics (after ``Scheduler.set_active(False)``
        began a new session, so that a job still running cannot put its objects back)."""
        with self._display_lock:
            if self._three_d is not None:
                self._three_d.clear_display()
            self._clear_detections()  # vision_msgs consumers keep the last array as "what is there"

    def _show(self, job: Job, publish: Callable[[], None]) -> None:
        """Runs ``publish`` (display topics) only while the active stretch the job was picked in lasts."""
        with self._display_lock:
            if job.session == self._scheduler.session:
                publish()

    def _release(self, reason: str) -> None:
        self._scheduler.set_active(False, reason)
        # a lifecycle transition waits at most 2 s for a running command (which is answered at its
        # own deadline meanwhile); past that it gets an ERROR and its thread ends with the model call
        self._scheduler.stop(reason, timeout=2.0)
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        if self._command_sub is not None:
            self.destroy_subscription(self._command_sub)
            self._command_sub = None
        self._scheduler.set_continuous(None)  # unconfigured forgets continuous mode, as a restart does
        self._clear_display()  # while the publishers exist (a deactivate may have done it)
        for pub in self._pubs.values():
            self.destroy_publisher(pub)
        self._pubs = {}
        if self._three_d is not None:
            self._three_d.close()
            self._three_d = None
        if self._segmenter is not None:
            try:
                self._segmenter.close()
            finally:
                self._segmenter = None
        self._frames.clear()
        self._tracker.clear()

    def _image_qos(self) -> QoSProfile:
        choice = self.p("image_qos")
        if choice == "sensor_data":
            return qos_profile_sensor_data
        reliability = ReliabilityPolicy.RELIABLE if choice == "reliable" else ReliabilityPolicy.BEST_EFFORT
        return QoSProfile(depth=5, reliability=reliability, history=HistoryPolicy.KEEP_LAST)

    def _progress(self, line: str) -> None:
        """A segmenter's loading steps; a line that starts with "warning: " is logged as one."""
        if line.startswith("warning: "):
            self.get_logger().warning(line.removeprefix("warning: "))
        else:
            self.get_logger().info(line)

    # ------------------------------------------------------------------------------------------
    # subscriptions (never block: store and notify)
    # ------------------------------------------------------------------------------------------
    def _on_image(self, msg: Image) -> None:
        self._warm_up_for_new_size(msg)  # queued before the frame can be taken: it runs before any command on it
        conversions.shed_unusable_bytes(msg, int(self.p("max_image_pixels")))
        self._frames.add_image(msg, _stamp_seconds(msg.header), time.monotonic())
        with self._stats_lock:
            self._stats["images"] += 1
        self._scheduler.notify_frame()

    def _warm_up_for_new_size(self, msg: Image) -> None:
        """The first frame of a new resolution queues a warm-up for it on the inference thread.

        A GPU path captures graphs per frame size, so without this the first command on a camera
        of another size than the configure-time warm-up would pay for it. Only plausible images
        count, and at most MAX_WARM_SIZES sizes, so a stream of bogus sizes cannot keep the model
        busy warming up.
        """
        size = (int(msg.width), int(msg.height))
        if size in self._warm_sizes or not self.p("warmup") or len(self._warm_sizes) >= MAX_WARM_SIZES:
            return
        if not (0 < size[0] * size[1] <= int(self.p("max_image_pixels"))) or len(msg.data) < msg.step * msg.height:
            return
        self._warm_sizes.add(size)
        self._scheduler.run_soon(lambda: self._warm_for(size))

    def _warm_for(self, size: tuple[int, int]) -> None:
        segmenter = self._segmenter
        if segmenter is None or "image_size" not in inspect.signature(segmenter.warmup).parameters:
            return
        t0 = time.monotonic()
        try:
            segmenter.warmup(self._progress, image_size=size)
        except Exception as exc:  # commands on such frames still run, only not pre-warmed
            self.get_logger().warning(f"warm-up for {size[0]}x{size[1]} frames failed: {_describe_exception(exc)}")
            return
        self.get_logger().info(f"warmed up for {size[0]}x{size[1]} frames in {time.monotonic() - t0:.2f} s")

    def _on_depth(self, msg: Image) -> None:
        stamp = _stamp_seconds(msg.header)
        if stamp == 0.0:  # pairing is by stamp: 0 matches any colour image stamped 0, however far apart
            self.get_logger().warning(
                "depth images are stamped 0: colour and depth are paired by stamp, so they cannot be "
                "matched in time; set the camera driver's timestamps", once=True)
        conversions.shed_unusable_bytes(msg, int(self.p("max_image_pixels")))
        self._frames.add_depth(msg, stamp, time.monotonic())
        with self._stats_lock:
            self._stats["depths"] += 1
        self._scheduler.notify_frame()

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self._frames.add_camera_info(msg, time.monotonic())

    def _on_command(self, msg: String) -> None:
        if is_blank(msg.data):  # also a lone BOM or zero-width space: the planner's "stop"
            self._last_refused = None
            if self._scheduler.set_continuous(None):
                self.get_logger().info("continuous mode stopped (empty command)")
            return
        try:
            command, warnings = clean_command(msg.data, int(self.p("max_command_length")))
        except InputError as exc:
            # planners re-publish their goal at a fixed rate: one ERROR per refused command, not
            # one per message (10 a second on ~/result and in the log)
            if msg.data != self._last_refused:
                self._last_refused = msg.data
                self._error_result(Job(truncate(msg.data, ECHO_CHARS), "continuous-rejected", time.monotonic(),
                                       continuous=True), f"command refused: {exc}")
            return
        self._last_refused = None
        if not self._scheduler.set_continuous(command):
            return  # planners re-publish their goal: the same command changes nothing, nor logs
        for warning in warnings:
            self.get_logger().warning(warning)
        self.get_logger().info(f"continuous mode: '{truncate(command, 200)}' at most {self.p('max_rate_hz')} Hz")

    # ------------------------------------------------------------------------------------------
    # the one-shot service
    # ------------------------------------------------------------------------------------------
    async def _on_segment(self, request: Segment.Request, response: Segment.Response) -> Segment.Response:
        with self._stats_lock:
            self._inflight += 1
        try:
            return await self._serve(request, response)
        except Exception as exc:  # never into the executor (it would stop serving): an answer, always
            self.get_logger().error(f"~/segment failed: {_describe_exception(exc)}\n{traceback.format_exc()}")
            response.result = new_result(truncate(request.command, ECHO_CHARS), request.request_id,
                                          SegmentationResult.ERROR, f"internal error: {_describe_exception(exc)}",
                                          None, "")
            return response
        finally:
            with self._stats_lock:
                self._inflight -= 1

    async def _serve(self, request: Segment.Request, response: Segment.Response) -> Segment.Response:
        received = time.monotonic()
        request_id = request.request_id or self._scheduler.next_request_id()
        job = Job(request.command, request_id, received)
        refusal = self._refusal()
        if refusal is None:
            try:
                job.command, warnings = clean_command(request.command, int(self.p("max_command_length")))
                for warning in warnings:
                    self.get_logger().warning(f"{_log_id(request_id)}: {warning}")
            except InputError as exc:
                refusal = str(exc)
        if refusal is None:
            timeout = float(request.timeout_s)
            if not math.isfinite(timeout) or timeout <= 0:
                timeout = float(self.p("default_timeout_s"))
            job.deadline = received + timeout
            future: Future = Future(executor=self.executor)
            # A done callback makes set_result() wake the executor, which then resumes this coroutine.
            future.add_done_callback(lambda _f: None)
            job.reply = future.set_result
            refusal = self._scheduler.submit(job)
            if refusal is None:
                result = await future
                response.result = result if result is not None else self._error_result(
                    job, "internal error: no result was produced")
                return response
        job.command = truncate(job.command, ECHO_CHARS)
        response.result = self._error_result(job, refusal)
        return response

    def _refusal(self) -> str | None:
        """Why no request can be served now (not configured), or None."""
        if self._shut_down:
            return "node was shut down (lifecycle state finalized); restart its process to use it again"
        if self._loading:
            return f"node is configuring (loading segmenter '{self._loading}'); try again once it is active"
        if self._segmenter is None:
            why = f" (configure failed: {self._configure_error})" if self._configure_error else ""
            return f"node is not configured{why}; configure and activate it first"
        return None

    # ------------------------------------------------------------------------------------------
    # inference thread
    # ------------------------------------------------------------------------------------------
    def _error_result(self, job: Job, reason: str, header: Header | None = None) -> SegmentationResult:
        segmenter = self._segmenter  # read once: a cleanup on another thread may clear it
        result = new_result(job.command, job.request_id, SegmentationResult.ERROR, reason, header,
                            segmenter.name if segmenter else "")
        result.total_ms = float((time.monotonic() - job.received) * 1e3)
        self._publish_result(result)
        self.get_logger().warning(f"{_log_id(job.request_id)}: ERROR: {truncate(reason, 500)}")
        return result

    def _run_job(self, job: Job, frame: Frame) -> SegmentationResult:
        """Runs one command on one frame; always returns a result (OK, NO_MATCH or ERROR)."""
        t_start = time.monotonic()
        header = frame.image.header
        segmenter = self._segmenter
        result = new_result(job.command, job.request_id, SegmentationResult.OK, "", header,
                            segmenter.name if segmenter else "")
        result.input_age_ms = float((t_start - frame.arrival) * 1e3)
        result.queue_ms = float((t_start - job.received) * 1e3)
        result.image_width, result.image_height = int(frame.image.width), int(frame.image.height)
        try:
            if segmenter is None:
                raise SegmenterError("segmenter was released (node cleaned up)")
            self._process(job, frame, segmenter, result, t_start)
        except (InputError, SegmenterError) as exc:
            result.status, result.message = SegmentationResult.ERROR, str(exc)
        except Exception as exc:  # a model bug must not kill the node
            result.status, result.message = SegmentationResult.ERROR, _describe_exception(exc)
            self.get_logger().error(f"{_log_id(job.request_id)}: {result.message}\n{traceback.format_exc()}")
        if result.status == SegmentationResult.ERROR:
            result.objects = []
            three_d = self._three_d
            if three_d is not None:  # RViz shows no objects of an earlier result
                self._show(job, lambda: three_d.publish(result, None, header))
            self._show(job, lambda: self._publish_detections(result))  # nor do the detection topics
        # claimed before the publish: a deadline passing between the publish and the return would
        # otherwise send an ERROR after this OK (to the caller too), with neither marked late
        if not self._scheduler.claim_result(job):  # the watchdog or a stop already answered it
            result.message = safe_text("; ".join(m for m in (_late_note(job), result.message) if m))
        result.total_ms = float((time.monotonic() - job.received) * 1e3)
        self._publish_result(result)
        self._log_result(result)
        return result

    def _process(self, job: Job, frame: Frame, segmenter: Segmenter, result: SegmentationResult,
                 t_start: float) -> None:
        header = frame.image.header
        max_pixels = int(self.p("max_image_pixels"))
        rgb = conversions.image_to_rgb(frame.image, max_pixels)
        warnings: list[str] = []
        three_d = self._three_d
        inputs = three_d.prepare(frame, rgb.shape[:2], max_pixels, warnings) if three_d else None
        t_pre = time.monotonic()
        result.preprocess_ms = float((t_pre - t_start) * 1e3)

        output = segmenter.segment(rgb, job.command, inputs.depth_m if inputs else None)
        t_seg = time.monotonic()
        if not isinstance(output, SegmentationOutput):
            raise SegmenterError(f"the segmenter returned {type(output).__name__}, not a SegmentationOutput "
                                 f"(a bug in segmenter '{segmenter.name}')")
        result.grounding_ms = float(output.timings_ms.get("grounding", (t_seg - t_pre) * 1e3))
        result.mask_ms = float(output.timings_ms.get("mask", 0.0))
        result.model_answer = safe_text(truncate(safe_text(output.raw_answer), MAX_ANSWER_CHARS))
        result.query_source = safe_text(output.query_source)
        warnings.extend(safe_text(w) for w in output.warnings)

        h, w = rgb.shape[:2]
        cloud = None
        instances, below = self._select(output.instances, h, w, warnings)
        ids = list(range(1, len(instances) + 1))
        result.objects = objects_from_instances(instances, ids, w, h, header)
        if not instances:
            result.status = SegmentationResult.NO_MATCH
            reason = output.no_match_reason or f"nothing in the image matches '{truncate(job.command, 200)}'"
            if below:
                reason = (f"{len(below)} candidate(s) scored below score_threshold="
                          f"{self.p('score_threshold'):.2f} (best {max(below):.2f})")
            elif output.instances:
                reason = (f"the segmenter's {len(output.instances)} candidate(s) were all unusable "
                          f"(see the warnings)")
            warnings.insert(0, safe_text(reason))
        elif three_d is not None and inputs is not None:
            t_geo = time.monotonic()
            result.geometry_frame_id, cloud = three_d.fill(result, instances, rgb, inputs, header, warnings)
            result.geometry_ms = float((time.monotonic() - t_geo) * 1e3)
        if result.objects and self.p("tracking"):
            self._track(result, rgb, instances)
        result.message = safe_text("; ".join(dict.fromkeys(warnings)))
        colour_keys = [o.track_id or o.id for o in result.objects]

        def display() -> None:
            if three_d is not None:
                three_d.publish(result, cloud, header)
            self._publish_images(rgb, instances, ids, colour_keys, header)
            self._publish_detections(result)

        self._show(job, display)

    def _select(self, instances: Any, h: int, w: int, warnings: list[str]) -> tuple[list[Instance], list[float]]:
        """Checks the segmenter's objects, then the score threshold and the best max_objects.

        Returns the objects kept and the scores of valid candidates below the threshold. A
        segmenter is an integration point (any ``package.module:Class``), so its output is
        checked like any other input: a mask of another size or type is a bug there and an
        ERROR naming it (never an exception in the publishing code or a mask in the wrong
        place); a non-finite box or score, or a box with no area inside the image, drops that
        object with a warning; swapped corners are put in order, boxes clipped to the image,
        scores clipped to [0, 1].
        """
        if not isinstance(instances, (list, tuple)):
            raise SegmenterError(f"the segmenter's instances are a {type(instances).__name__}, not a list")
        checked: list[Instance] = []
        problems: dict[str, list[int]] = {}
        for k, inst in enumerate(instances):
            fixed = self._check_instance(k, inst, h, w, problems)
            if fixed is not None:
                checked.append(fixed)
        for what, which in problems.items():
            shown = ", ".join(str(i) for i in which[:10]) + (", ..." if len(which) > 10 else "")
            warnings.append(f"segmenter output: {len(which)} object(s) {what} (index {shown})")
        threshold = float(self.p("score_threshold"))
        kept = [i for i in checked if i.score >= threshold]
        below = [i.score for i in checked if i.score < threshold]
        kept.sort(key=lambda i: i.score, reverse=True)
        limit = int(self.p("max_objects"))
        if len(kept) > limit:
            warnings.append(f"{len(kept)} objects found; kept the {limit} best (max_objects)")
            kept = kept[:limit]
        return kept, below

    def _track(self, result: SegmentationResult, rgb: np.ndarray, instances: list[Instance]) -> None:
        """Fills each object's track_id (qwen3vl_seg_ros.tracking): one id per physical object.
        ``instances`` are the result's objects, in its order (their masks give the colours)."""
        settings = TrackerSettings(iou_threshold=float(self.p("track_iou_threshold")),
                                   max_distance_m=float(self.p("track_max_distance_m")),
                                   max_age_s=float(self.p("track_max_age_s")),
                                   max_colour_distance=float(self.p("track_max_colour_distance")))
        colours = (mean_colours(rgb, [i.mask for i in instances], [i.box for i in instances])
                   if settings.max_colour_distance > 0 else None)
        observations = track_observations(result, str(self.p("target_frame")), colours)
        self._say_if_tracks_expire(settings.max_age_s)
        for obj, track_id in zip(result.objects, self._tracker.update(observations, time.monotonic(), settings)):
            obj.track_id = track_id

    def _say_if_tracks_expire(self, max_age_s: float) -> None:
        """Results further apart than track_max_age_s give every object a new id: say so (once a
        minute), since a slow model (a CPU, a Jetson) or a slow planner otherwise sees ids churn
        with no reason given."""
        now = time.monotonic()
        gap, self._last_tracked_at = now - self._last_tracked_at, now
        if (math.isfinite(gap) and gap > max_age_s and self._tracker.live_tracks() > 0
                and now - self._tracks_warned_at >= 60.0):
            self._tracks_warned_at = now
            self.get_logger().warning(
                f"tracking: {gap:.1f} s since the last result with objects, more than track_max_age_s="
                f"{max_age_s:g}: its objects get new track ids; raise track_max_age_s above the time "
                f"between results")

    @staticmethod
    def _check_instance(k: int, inst: Any, h: int, w: int, problems: dict[str, list[int]]) -> Instance | None:
        """One object of a segmenter's output, fixed where that is safe; None drops it."""
        if not isinstance(inst, Instance):
            raise SegmenterError(f"the segmenter's object {k} is a {type(inst).__name__}, not an Instance")
        mask = inst.mask
        if mask is not None:
            if not isinstance(mask, np.ndarray) or mask.ndim != 2 or mask.shape != (h, w):
                shape = "x".join(str(v) for v in reversed(np.shape(mask))) or "a scalar"
                raise SegmenterError(f"the segmenter returned a mask of {shape} for object {k} of a {w}x{h} "
                                     f"image; masks must be HxW bool at the image's size")
            if mask.dtype != np.bool_:
                raise SegmenterError(f"the segmenter returned a {mask.dtype} mask for object {k}; masks must be "
                                     f"HxW bool")
        try:
            box = np.asarray(inst.box, dtype=np.float64).reshape(4)
            score = float(inst.score)
        except (TypeError, ValueError):
            problems.setdefault("had a box or score that is not numbers, dropped", []).append(k)
            return None
        if not np.all(np.isfinite(box)):
            problems.setdefault("had a non-finite box, dropped", []).append(k)
            return None
        if not math.isfinite(score):
            problems.setdefault("had a non-finite score, dropped", []).append(k)
            return None
        if box[0] > box[2] or box[1] > box[3]:
            problems.setdefault("had swapped box corners, put in order", []).append(k)
            box = np.array([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])])
        clipped = np.clip(box, 0.0, [w, h, w, h])
        if clipped[2] - clipped[0] < 1.0 or clipped[3] - clipped[1] < 1.0:
            problems.setdefault("had no box area inside the image, dropped", []).append(k)
            return None
        if not np.array_equal(clipped, box):
            problems.setdefault("had a box reaching outside the image, clipped", []).append(k)
        if mask is not None and mask.any():
            # The message's mask is a crop at the box: a mask reaching past its box (a decoder
            # without refinement passes) lost those pixels there, while ~/mask and the cloud
            # kept them. The box grows to cover its mask.
            covered = mask_box(mask)
            clipped = np.concatenate([np.minimum(clipped[:2], covered[:2]), np.maximum(clipped[2:], covered[2:])])

        def unit(v: Any) -> float:
            v = float(v)
            return min(max(v, 0.0), 1.0) if math.isfinite(v) else 0.0

        scores = (score, inst.box_score, inst.mask_score)
        try:
            score, box_score, mask_score = (unit(v) for v in scores)
        except (TypeError, ValueError):
            problems.setdefault("had a score that is not a number, dropped", []).append(k)
            return None
        if any(not (0.0 <= float(v) <= 1.0) for v in scores):
            problems.setdefault("had scores outside [0, 1], clipped", []).append(k)
        label = safe_text(inst.label)
        if len(label) > MAX_LABEL_CHARS:
            problems.setdefault(f"had a label longer than {MAX_LABEL_CHARS} characters, cut", []).append(k)
            label = truncate(label, MAX_LABEL_CHARS)
        return dataclasses.replace(inst, box=clipped.astype(np.float32), label=label, score=score,
                                   box_score=box_score, mask_score=mask_score,
                                   mask_source=safe_text(inst.mask_source))

    # ------------------------------------------------------------------------------------------
    # publishing
    # ------------------------------------------------------------------------------------------
    def _send(self, name: str, msg: Any) -> None:
        """Publishes on output ``name`` if it exists. A cleanup on another thread may destroy the
        publisher between the look-up and the publish; the message is then dropped (the output is
        going away), never raised into the executor, which would stop serving."""
        pub = self._pubs.get(name)
        if pub is None:
            return
        try:
            pub.publish(msg)
        except InvalidHandle:
            self.get_logger().debug(f"~/{name}: its publisher was destroyed (cleanup); message dropped")

    def _publish_result(self, result: SegmentationResult) -> None:
        self._send("result", result)
        key = {SegmentationResult.OK: "ok", SegmentationResult.NO_MATCH: "no_match"}.get(result.status, "error")
        with self._stats_lock:
            self._stats[key] += 1
            if result.status != SegmentationResult.ERROR:
                self._stats["last_total_ms"] = result.total_ms
                self._stats["last_input_age_ms"] = result.input_age_ms

    def _publish_images(self, rgb: np.ndarray, instances: list[Instance], ids: list[int],
                        colour_keys: list[int], header: Header) -> None:
        """~/mask and ~/overlay; the overlay colours objects as the markers do (by track id)."""
        h, w = rgb.shape[:2]
        if self.p("publish_mask") and "mask" in self._pubs:
            labels = label_image([i.mask if i.mask is not None else box_mask((h, w), i.box) for i in instances],
                                 h, w)
            self._send("mask", conversions.label_image_msg(labels, header))
        if self.p("publish_overlay") and "overlay" in self._pubs:
            bgr = draw_overlay(rgb, instances, float(self.p("overlay_alpha")), ids, colour_keys)
            self._send("overlay", conversions.array_to_image(bgr, "bgr8", header))

    def _publish_detections(self, result: SegmentationResult) -> None:
        """The result as vision_msgs detections (empty arrays for NO_MATCH and ERROR: no objects
        now). Switched off (``publish_detections``), the topics get empty arrays once instead, if
        they held objects: a consumer keeps the last array as what is there."""
        if not self.p("publish_detections"):
            self._clear_detections()
            return
        if "detections" in self._pubs:  # vision_msgs is not installed: its types do not exist
            self._send_detections(result)

    def _clear_detections(self) -> None:
        """Empty detection arrays where the last ones held objects (in their frames, stamped now)."""
        if self._detections_shown is None:
            return
        empty = SegmentationResult()
        empty.header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self._detections_shown[0])
        empty.geometry_frame_id = self._detections_shown[1]
        self._send_detections(empty)

    def _send_detections(self, result: SegmentationResult) -> None:
        """Both detection arrays of ``result``, whatever publish_detections says (a clear must go out)."""
        self._send("detections", detections.detections_2d(result))
        self._send("detections_3d", detections.detections_3d(result))
        self._detections_shown = (result.header.frame_id, result.geometry_frame_id) if result.objects else None

    def _after_set_parameters(self, params: list[Parameter]) -> None:
        """A display output switched off at runtime clears what it shows now, not at the next
        result (which may never come while no command is running)."""
        if any(p.name in DISPLAY_SWITCHES and p.value is False for p in params):
            with self._display_lock:
                three_d = self._three_d  # once: a cleanup may set it to None meanwhile
                if three_d is not None:
                    three_d.clear_switched_off()
                if not self.p("publish_detections"):
                    self._clear_detections()

    def publish_output(self, name: str, msg: PointCloud2 | MarkerArray) -> None:
        """Publishes on ``~/cloud`` or ``~/markers`` (for the 3D stage, which decides what and when)."""
        self._send(name, msg)

    def _log_result(self, result: SegmentationResult) -> None:
        status = {0: "OK", 1: "NO_MATCH", 2: "ERROR"}.get(result.status, str(result.status))
        text = f"{_log_id(result.request_id)}: {status} {len(result.objects)} object(s) in {result.total_ms:.0f} ms"
        if result.message:
            text += f" ({truncate(result.message, 300)})"
        if result.status == SegmentationResult.ERROR:
            self.get_logger().warning(text)
        elif result.request_id.startswith("continuous-"):
            self.get_logger().debug(text)
        else:
            self.get_logger().info(text)

    # ------------------------------------------------------------------------------------------
    # diagnostics
    # ------------------------------------------------------------------------------------------
    def _publish_diagnostics(self) -> None:
        pub = self._diag_pub
        now = time.monotonic()
        arrivals = self._frames.last_arrivals()
        with self._stats_lock:
            stats = dict(self._stats)
        segmenter = self._segmenter  # read once: a cleanup on another thread may clear it
        # the full name: /diagnostics is one topic for the whole graph, so two nodes named
        # qwen3vl_seg in different namespaces must stay apart there
        status = DiagnosticStatus(name=f"{self.get_fully_qualified_name().lstrip('/')}: segmentation",
                                  hardware_id=self.p("model") or "tiny")
        active = bool(self._subs)
        image_age = None if arrivals["image"] is None else now - arrivals["image"]
        loading = self._loading
        if segmenter is None and loading:
            status.level, status.message = DiagnosticStatus.WARN, f"loading segmenter '{loading}'"
        elif segmenter is None and self._configure_error:
            status.level = DiagnosticStatus.ERROR
            status.message = truncate(f"configure failed: {self._configure_error}", 500)
        elif segmenter is None:
            status.level, status.message = DiagnosticStatus.WARN, "not configured"
        elif not active:
            status.level, status.message = DiagnosticStatus.WARN, "inactive"
        elif image_age is None or image_age > 2.0:
            status.level = DiagnosticStatus.WARN
            status.message = "no colour images (check topic remapping and image_qos)"
        else:
            status.level, status.message = DiagnosticStatus.OK, "serving"

        def fmt(v: float | None) -> str:
            return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"

        status.values = [
            KeyValue(key="segmenter", value=segmenter.name if segmenter else "none"),
            KeyValue(key="continuous_command", value=self._scheduler.continuous_command or ""),
            KeyValue(key="pending_requests", value=str(self._scheduler.pending_count())),
            KeyValue(key="last_latency_ms", value=fmt(stats["last_total_ms"])),
            KeyValue(key="last_input_age_ms", value=fmt(stats["last_input_age_ms"])),
            KeyValue(key="image_age_s", value=fmt(image_age)),
            KeyValue(key="images_received", value=str(stats["images"])),
            KeyValue(key="depths_received", value=str(stats["depths"])),
            KeyValue(key="results_ok", value=str(stats["ok"])),
            KeyValue(key="results_no_match", value=str(stats["no_match"])),
            KeyValue(key="results_error", value=str(stats["error"])),
        ]
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        pub.publish(msg)

    # ------------------------------------------------------------------------------------------
    # shutdown
    # ------------------------------------------------------------------------------------------
    def drain(self, reason: str, grace_s: float = 2.0) -> None:
        """Answers every open ~/segment call before the process goes away.

        Queued requests get an ERROR with ``reason`` at once; the running one gets its result
        if the model finishes within ``grace_s``, else the same ERROR; then this waits (up to
        ``grace_s``) until the executor has sent the answers. Without it, SIGINT/SIGTERM from
        launch or systemd would leave clients waiting for answers that never come.
        """
        self._scheduler.set_active(False, reason)
        self._scheduler.stop(reason, timeout=grace_s)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with self._stats_lock:
                if self._inflight == 0:
                    break
            time.sleep(0.02)
        time.sleep(0.1)  # the executor sends a response just after the service coroutine returns


def track_observations(result: SegmentationResult, target_frame: str = "",
                       colours: list[tuple[float, float, float]] | None = None) -> list[Observation]:
    """What the tracker sees of each object: its box, its mean colour (``colours``, one per
    object, from :func:`~qwen3vl_seg_ros.tracking.mean_colours`), and its centroid in the geometry
    frame where it has 3D. With a target_frame set, a centroid left in the camera frame (TF
    unavailable for this result) is not given: the tracker keeps the track's world centroid instead."""
    frame = result.geometry_frame_id
    target = clean_frame(target_frame)
    usable = bool(frame) and (not target or frame == target)
    colours = colours if colours is not None else [None] * len(result.objects)
    return [Observation(
        box=(o.box.x_offset, o.box.y_offset, o.box.x_offset + o.box.width, o.box.y_offset + o.box.height),
        centroid=(o.centroid.x, o.centroid.y, o.centroid.z) if o.has_3d and usable else None,
        frame_id=frame if o.has_3d and usable else "", colour=colour)
        for o, colour in zip(result.objects, colours)]


def main(args: list[str] | None = None) -> int:
    """Entry point: ``segmentation_node --ros-args --params-file config/params.yaml``.

    The node configures and activates itself unless ``-p autostart:=false`` is given (then a
    lifecycle manager or ``ros2 lifecycle set`` drives it). SIGINT / SIGTERM shut it down
    gracefully: open ~/segment calls are answered (see :meth:`SegmentationNode.drain`) before
    the middleware goes; a second signal ends the process at once.
    """
    argv = args if args is not None else sys.argv
    own = remove_ros_args(argv)[1:]
    if "-h" in own or "--help" in own:  # answered before any model loads or participant starts
        print(USAGE + params_yaml(), end="")
        return 0
    # Before any participant: a stale Fast DDS port file would hang this process for good.
    clean_before_start(log=lambda line: print(line, file=sys.stderr, flush=True))
    # rclpy's own handlers would shut the context down at once, before open calls are answered.
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = SegmentationNode()
    except ParameterException as exc:  # a wrong type or an out-of-range value in the overrides
        print(f"[qwen3vl_seg] bad parameter: {exc}; see config/params.yaml for each parameter's "
              "type and range", file=sys.stderr, flush=True)
        rclpy.try_shutdown()
        return 2
    executor = MultiThreadedExecutor(num_threads=4)
    executor.add_node(node)
    autostart = node.declare_parameter(
        "autostart", True, ParameterDescriptor(description="Configure and activate at startup.")).value
    stop = threading.Event()
    caught: list[str] = []
    serving = False

    def on_signal(signum: int, _frame: Any) -> None:
        if not serving:
            raise KeyboardInterrupt  # during start-up (a model may load for minutes): stop now
        caught.append(signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second signal: no more grace
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stop.set()

    def on_spin_error(_exc: BaseException) -> None:  # pragma: no cover - logged, then a clean shutdown
        node.get_logger().fatal(traceback.format_exc())
        caught.append("error")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    spinner = BackgroundSpinner(executor, name="qwen3vl_seg_executor", on_error=on_spin_error)
    code = 0
    try:
        spinner.start()
        if autostart:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().error("not configured; fix the error above, then call configure again")
            elif node.trigger_activate() == TransitionCallbackReturn.SUCCESS:
                node.get_logger().info("ready: waiting for images and commands")
        serving = True
        while not stop.wait(0.5) and not spinner.done.is_set():
            pass
        if "error" in caught:
            code = 1
        reason = f"node is shutting down ({caught[0] if caught else 'executor stopped'})"
        node.get_logger().info(f"{reason}: answering open requests")
        node.drain(reason)
    except KeyboardInterrupt:
        pass
    except Exception:  # pragma: no cover - logged for the user, then a clean shutdown
        node.get_logger().fatal(traceback.format_exc())
        code = 1
    finally:
        node._release("node is shutting down")
        spinner.stop(timeout=5.0, shutdown_timeout=5.0)
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    _exit_if_threads_linger(code)
    return code


def _exit_if_threads_linger(code: int) -> None:
    """Ends the process at once when a daemon thread is still alive (a model call that ignored
    the grace period, a stuck middleware wait).

    Python's finaliser stops such a thread with a forced unwind; inside C++ code (torch, rclpy)
    that aborts the process ("terminate called without an active exception", exit -6), so
    launch and systemd would report a crash for what was an orderly shutdown.
    """
    lingering = [t.name for t in threading.enumerate() if t is not threading.current_thread() and t.is_alive()]
    if not lingering:
        return
    print(f"qwen3vl_seg: exiting with threads still running: {', '.join(lingering)}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())

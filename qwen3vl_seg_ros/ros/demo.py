"""The demo behind ``make demo``: the real node on a simulated camera, driven like a planner.

In order:

1. starts the segmentation node (``python -m qwen3vl_seg_ros.ros.node`` with
   config/params.yaml and ``target_frame:=world``) and the simulated camera
   (:mod:`.sim_camera`, a new scene only when asked) as child processes, logging to
   ``<out>/node.log`` and ``<out>/sim_camera.log``, and shows the node's model loading and
   warm-up progress until it is ready;
2. for each of ``--scenes`` scenes: asks the camera for the next scene, reads its ground truth
   and sends commands made of the scene's own referring expressions to ``~/segment``, as a
   planner would; every answer is compared with the ground truth (IoU of the answer's masks
   with the target objects' masks; distance of each 3D centroid to the matched object);
3. shows continuous mode for a few seconds (a command on the ``command`` topic, results on
   ``~/result``), then stops it;
4. prints the answers as a table and saves, per command, the node's overlay and label mask
   (PNG) and the objects' clouds (PLY), plus ``summary.json``, into ``--out``.

It never hangs: a global ``--timeout``, per-request timeouts, and the child processes are
stopped (SIGINT, then SIGTERM, then SIGKILL) on every way out, Ctrl-C included; on Linux they
also get SIGTERM if the demo itself is killed.

``--readme-images`` writes only the README's two pictures (``demo_overlay.png``,
``demo_cloud.png``) into ``--out``:
``python -m qwen3vl_seg_ros.ros.demo --out docs/images --readme-images``.

Exit codes: 0 every command was answered (OK or NO_MATCH); 1 some answer was an ERROR, never
came, or came three times on a frame of the previous scene (STALE, not scored); 2 the node or
the camera could not start (a missing model, say), or another camera or node of the demo's
names already runs on this ROS_DOMAIN_ID; 124 ``--timeout`` passed; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

from qwen3vl_seg_ros.cloud import concat_clouds, unpack_rgb
from qwen3vl_seg_ros.geometry import depth_from_raw
from qwen3vl_seg_ros.msg import SegmentationResult
from qwen3vl_seg_ros.ros.conversions import depth_to_raw, image_to_rgb
from qwen3vl_seg_ros.ros.dds_shm import clean_before_start
from qwen3vl_seg_ros.ros.pointcloud import msg_to_cloud
from qwen3vl_seg_ros.ros.sim_camera import latched_qos
from qwen3vl_seg_ros.ros.spinner import BackgroundSpinner
from qwen3vl_seg_ros.srv import Segment

ROOT = Path(__file__).resolve().parents[2]
NODE = "/qwen3vl_seg"
CAMERA = "/sim_camera"
WORLD = "world"
STATUS_NAMES = {SegmentationResult.OK: "OK", SegmentationResult.NO_MATCH: "NO_MATCH",
                SegmentationResult.ERROR: "ERROR"}
#: Query types of the ground truth, in the order the demo prefers them for its commands.
COMMAND_ORDER = ("referring", "multi", "no_target", "category")
_LOG_LINE = re.compile(r"^\[(\w+)\] \[[\d.]+\] \[([^\]]+)\]: (.*)$")


class DemoTimeoutError(Exception):
    """The global --timeout passed."""


class StartupError(Exception):
    """The node or the camera could not start; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# pure helpers (no ROS): command choice, masks, IoU, PLY, table
# ---------------------------------------------------------------------------------------------
def choose_commands(queries: Sequence[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Up to ``count`` ground-truth queries, one per type in :data:`COMMAND_ORDER` per round.

    A planner mostly asks for one object ("the red mug on the left"), sometimes several, and
    sometimes for something that is not there; the mix shows all three kinds of answer.
    """
    chosen: list[dict[str, Any]] = []
    remaining = list(queries)
    while len(chosen) < count and remaining:
        picked = False
        for kind in COMMAND_ORDER:
            match = next((q for q in remaining if q["type"] == kind), None)
            if match is not None and len(chosen) < count:
                chosen.append(match)
                remaining.remove(match)
                picked = True
        if not picked:
            break
    return chosen


def object_mask(obj: Any, width: int, height: int) -> np.ndarray:
    """The full-image bool mask of a SegmentedObject (its mask is cropped to its box)."""
    full = np.zeros((height, width), dtype=bool)
    box, crop = obj.box, obj.mask
    if crop.width == 0 or crop.height == 0:
        return full
    data = np.frombuffer(bytes(crop.data), np.uint8).reshape(crop.height, crop.step)[:, : crop.width]
    y0, x0 = int(box.y_offset), int(box.x_offset)
    h, w = min(crop.height, height - y0), min(crop.width, width - x0)
    full[y0:y0 + h, x0:x0 + w] = data[:h, :w] > 0
    return full


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1.0 when both are empty (nothing = nothing)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def image_array(msg: Image) -> np.ndarray:
    """An 8-bit Image message as an HxW or HxWxC array (rgb8, bgr8, mono8)."""
    channels = {"mono8": 1, "rgb8": 3, "bgr8": 3}.get(msg.encoding)
    if channels is None:
        raise ValueError(f"unexpected encoding '{msg.encoding}'")
    flat = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.step)[:, : msg.width * channels]
    return flat.reshape(msg.height, msg.width, channels) if channels > 1 else flat


PLY_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"),
                      ("id", "<u4")])


def write_ply(path: Path, cloud: np.ndarray, frame_id: str) -> None:
    """A cloud of :data:`~qwen3vl_seg_ros.cloud.CLOUD_DTYPE` as binary PLY (x y z, rgb, object id).

    PLY because every point-cloud viewer opens it (CloudCompare, MeshLab, Open3D, Blender).
    """
    vertex = np.empty(cloud.shape[0], dtype=PLY_DTYPE)
    for axis in "xyz":
        vertex[axis] = cloud[axis]
    rgb = unpack_rgb(cloud["rgb"]) if cloud.shape[0] else np.zeros((0, 3), np.uint8)
    vertex["red"], vertex["green"], vertex["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    vertex["id"] = cloud["id"]
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"comment qwen3vl_seg_ros object clouds, metres, frame {frame_id}\n"
        f"element vertex {cloud.shape[0]}\n"
        "property float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        "property uint id\nend_header\n"
    )
    path.write_bytes(header.encode("ascii") + vertex.tobytes())


def read_ply(path: Path) -> tuple[np.ndarray, list[str]]:
    """Reads back what :func:`write_ply` writes (vertices, header comments)."""
    data = path.read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    header = data[:end].decode("ascii").splitlines()
    if header[1] != "format binary_little_endian 1.0":
        raise ValueError(f"{path}: not a binary little-endian PLY")
    count = next(int(line.split()[2]) for line in header if line.startswith("element vertex"))
    comments = [line[len("comment "):] for line in header if line.startswith("comment ")]
    return np.frombuffer(data[end:], dtype=PLY_DTYPE, count=count), comments


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str | list[str]]]) -> str:
    """A plain-text table; a cell may be a list of lines (one object per line)."""
    cells = [[c if isinstance(c, list) else [c] for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], *(len(line) for line in cell)) if cell else widths[i]

    def line(parts: Sequence[str]) -> str:
        return "  ".join(p.ljust(w) for p, w in zip(parts, widths)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    for row in cells:
        for k in range(max(len(c) for c in row)):
            out.append(line([c[k] if k < len(c) else "" for c in row]))
    return "\n".join(out)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _scene_stamp_ns(gt: dict[str, Any]) -> int:
    """Stamp of a scene's first frame, from its ground-truth document."""
    return int(gt["stamp"]["sec"]) * 1_000_000_000 + int(gt["stamp"]["nanosec"])


# ---------------------------------------------------------------------------------------------
# child processes
# ---------------------------------------------------------------------------------------------
def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the demo dies, even by SIGKILL (no orphaned node)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Child:
    """A child process whose output goes to a log file and, filtered, to the terminal."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, echo: Callable[[str, str], bool]) -> None:
        self.name = name
        self._echo = echo
        self._lines: deque[str] = deque(maxlen=500)
        self._cond = threading.Condition()
        self._log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        # Own session: a Ctrl-C in the terminal reaches only the demo, which then stops the
        # children once, in order (a second SIGINT during a node's shutdown helps nobody).
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self._reader = threading.Thread(target=self._read, name=f"{name}-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            text = raw.rstrip()
            self._log.write(raw)
            self._log.flush()
            match = _LOG_LINE.match(text)
            level, message = (match.group(1), match.group(3)) if match else ("", text)
            if message.strip() and self._echo(level, message):
                print(f"  [{self.name}] {level + ' ' if level and level != 'INFO' else ''}{message}", flush=True)
            with self._cond:
                self._lines.append(text)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, patterns: dict[str, str], deadline: float) -> tuple[str, str]:
        """Waits until a log line contains one of ``patterns`` (key -> substring); (key, line).

        Raises StartupError when the process exits first and DemoTimeoutError at ``deadline``.
        """
        seen = 0
        with self._cond:
            while True:
                lines = list(self._lines)
                for text in lines[seen:]:
                    for key, needle in patterns.items():
                        if needle in text:
                            return key, text
                seen = len(lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    tail = "\n    ".join(lines[-15:])
                    raise StartupError(f"{self.name} exited with code {self.proc.returncode}:\n    {tail}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DemoTimeoutError(f"{self.name} did not get ready in time")
                self._cond.wait(min(remaining, 0.5))

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGINT (what Ctrl-C sends; the nodes shut down cleanly), then SIGTERM, then SIGKILL."""
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)
        self._reader.join(2.0)
        self._log.close()
        return self.proc.poll()


# ---------------------------------------------------------------------------------------------
# the planner side: one rclpy node in the demo's own context
# ---------------------------------------------------------------------------------------------
@dataclass
class _Received:
    arrival: float
    msg: Any


class DemoClient:
    """Talks to the node and the camera over DDS, and records what they publish."""

    def __init__(self, context: Context) -> None:
        self.node = Node("qwen3vl_seg_demo", context=context)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.ground_truth: dict[int, dict[str, Any]] = {}  # by scene number
        self.gt_labels: dict[int, np.ndarray] = {}  # by stamp (ns)
        self.results: list[_Received] = []
        self.overlays: list[_Received] = []
        self.masks: list[_Received] = []
        self.images: deque[Image] = deque(maxlen=3)
        self.depths: deque[Image] = deque(maxlen=3)
        self.diagnostics: dict[str, str] = {}
        self.diagnostics_arrival = 0.0
        self.watched: list[Child] = []  # child processes whose death ends every wait at once
        reliable = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)
        sub = self.node.create_subscription
        sub(String, f"{CAMERA}/ground_truth", self._on_ground_truth, latched_qos())
        sub(Image, f"{CAMERA}/ground_truth_labels", self._on_gt_labels, latched_qos())
        # Reliable, like the simulated camera publishes: best effort drops big images under load.
        frames = QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE)
        sub(Image, "image", lambda m: self._keep(self.images, m), frames)
        sub(Image, "depth", lambda m: self._keep(self.depths, m), frames)
        # the node's outputs: _wait_until_ready waits until each is matched with its publisher
        self.output_subs = [
            sub(SegmentationResult, f"{NODE}/result", lambda m: self._record(self.results, m), reliable),
            sub(Image, f"{NODE}/overlay", lambda m: self._record(self.overlays, m), reliable),
            sub(Image, f"{NODE}/mask", lambda m: self._record(self.masks, m), reliable),
        ]
        sub(DiagnosticArray, "/diagnostics", self._on_diagnostics, reliable)
        self.segment_client = self.node.create_client(Segment, f"{NODE}/segment")
        self.next_scene_client = self.node.create_client(Trigger, f"{CAMERA}/next_scene")
        self.command_pub = self.node.create_publisher(String, "command", 10)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self._spinner = BackgroundSpinner(self.executor, name="demo-spin").start()

    def _keep(self, store: deque, msg: Any) -> None:
        with self._cond:
            store.append(msg)
            self._cond.notify_all()

    def _record(self, store: list[_Received], msg: Any) -> None:
        with self._cond:
            store.append(_Received(time.monotonic(), msg))
            del store[:-200]  # keep memory bounded in long continuous runs
            self._cond.notify_all()

    def _on_ground_truth(self, msg: String) -> None:
        doc = json.loads(msg.data)
        with self._cond:
            self.ground_truth[int(doc["number"])] = doc
            self._cond.notify_all()

    def _on_gt_labels(self, msg: Image) -> None:
        with self._cond:
            self.gt_labels[_stamp_ns(msg.header.stamp)] = image_array(msg).copy()
            self._cond.notify_all()

    def _on_diagnostics(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if status.name == f"{NODE.lstrip('/')}: segmentation":  # its own node's, not another's on the domain
                values = {kv.key: kv.value for kv in status.values}
                values.update(level=str(int.from_bytes(status.level, "little") if isinstance(status.level, bytes)
                                        else int(status.level)), message=status.message)
                with self._cond:
                    self.diagnostics = values
                    self.diagnostics_arrival = time.monotonic()
                    self._cond.notify_all()

    def _check_children(self) -> None:
        for child in self.watched:
            if child.proc.poll() is not None:
                raise StartupError(f"the {child.name} process exited with code {child.proc.returncode}; see its log")

    def wait(self, predicate: Callable[[], Any], deadline: float, what: str) -> Any:
        """Waits until ``predicate()`` (called under the lock) is truthy; returns its value."""
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                self._check_children()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DemoTimeoutError(f"timed out waiting for {what}")
                self._cond.wait(min(remaining, 0.2))

    def _wait_for_service(self, client: Any, deadline: float, what: str) -> None:
        while not client.wait_for_service(timeout_sec=0.2):
            self._check_children()
            if time.monotonic() > deadline:
                raise DemoTimeoutError(f"the service for {what} did not appear")

    def call(self, client: Any, request: Any, deadline: float, what: str) -> Any:
        """A service call that gives up at ``deadline`` (the service may not even exist yet)."""
        self._wait_for_service(client, deadline, what)
        future = client.call_async(request)
        while not future.done():
            self._check_children()
            if time.monotonic() > deadline:
                future.cancel()
                raise DemoTimeoutError(f"no answer to {what}")
            time.sleep(0.01)
        return future.result()

    def segment(self, request: Any, deadline: float, what: str) -> SegmentationResult:
        """``~/segment``, with ``~/result`` as a second way back: the node publishes every answer
        there too, and a service response can be lost right after start-up (the node's side had
        not yet discovered the client's response reader: DDS discovery is not symmetric). Seen
        in CI on a loaded machine: the node answered OK in 71 ms, the response never came."""
        self._wait_for_service(self.segment_client, deadline, what)
        sent = time.monotonic()
        future = self.segment_client.call_async(request)
        future.add_done_callback(lambda _f: self._notify())

        def answered() -> SegmentationResult | None:
            if future.done():
                return future.result().result
            return next((r.msg for r in reversed(self.results)
                         if r.arrival >= sent and r.msg.request_id == request.request_id), None)

        try:
            return self.wait(answered, deadline, f"an answer to {what}")
        except DemoTimeoutError:
            future.cancel()
            raise

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def find_image(self, store: list[_Received], stamp: Any, after: float, deadline: float) -> Image | None:
        """The image of ``store`` with this stamp that arrived after ``after`` (None at deadline)."""
        target = _stamp_ns(stamp)

        def found() -> Image | None:
            return next((r.msg for r in reversed(store) if r.arrival >= after
                         and _stamp_ns(r.msg.header.stamp) == target), None)

        with contextlib.suppress(DemoTimeoutError):
            return self.wait(found, deadline, "an image")
        return None

    def close(self) -> None:
        self._spinner.stop(shutdown_timeout=1.0)
        self.node.destroy_node()


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One command and its answer, as printed and saved."""

    scene: int
    command: str
    query_type: str
    target_ids: list[int] | None  # None: the user's own command, no ground truth
    status: str
    message: str = ""
    latency_ms: float | None = None
    iou: float | None = None
    frame: str = ""
    objects: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m qwen3vl_seg_ros.ros.demo",
        description="Run the qwen3vl_seg node on a simulated RGB-D camera, send it commands like a planner, "
                    "print the answers and save overlays, masks and clouds.")
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: demo_output)")
    parser.add_argument("--scenes", type=int, default=3, help="number of scenes (default: 3)")
    parser.add_argument("--commands", type=int, default=3, help="commands per scene (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="first scene's index in the held-out test split")
    parser.add_argument("--command", action="append", default=[],
                        help="send this command in every scene instead of the scene's own expressions "
                             "(repeatable; no ground-truth comparison then)")
    parser.add_argument("--model", default=None,
                        help="Qwen3-VL(-Seg) folder or hub id (default: the shipped tiny model)")
    parser.add_argument("--segmenter", default=None,
                        help="segmenter spec, 'qwen3vl_seg' (default) or 'package.module:ClassName'")
    parser.add_argument("--device", default=None, help="torch device: auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--rate-hz", type=float, default=5.0, help="simulated camera frame rate (default: 5)")
    parser.add_argument("--continuous-s", type=float, default=3.0,
                        help="seconds of continuous mode at the end (0 = skip; default: 3)")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="timeout of each ~/segment call (s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="the whole demo's time limit (s, default 600)")
    parser.add_argument("--flat-colours", action="store_true",
                        help="flat saturated object colours (for colour-threshold test segmenters)")
    parser.add_argument("--readme-images", action="store_true",
                        help="write only demo_overlay.png and demo_cloud.png (the README's pictures) into --out")
    args = parser.parse_args(argv)
    if args.scenes < 1 or args.commands < 1:
        parser.error("--scenes and --commands must be at least 1")
    if not args.rate_hz > 0 or not args.timeout > 0 or not args.request_timeout > 0:
        parser.error("--rate-hz, --timeout and --request-timeout must be positive")
    return args


def _params_file() -> Path:
    source = ROOT / "config" / "params.yaml"
    if source.is_file():
        return source
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory("qwen3vl_seg_ros")) / "config" / "params.yaml"


def _start_node(args: argparse.Namespace, logs: Path) -> Child:
    cmd = [sys.executable, "-m", "qwen3vl_seg_ros.ros.node", "--ros-args", "--params-file", str(_params_file()),
           "-p", f"target_frame:={WORLD}"]
    for name in ("model", "segmenter", "device"):
        value = getattr(args, name)
        if value is not None:
            cmd += ["-p", f"{name}:={value}"]
    ready = threading.Event()

    def echo(level: str, message: str) -> bool:  # loading progress until ready, then problems only
        if "ready: waiting for images" in message:
            ready.set()
            return True
        return not ready.is_set() or level in ("WARN", "ERROR", "FATAL")

    return Child("node", cmd, logs / "node.log", echo)


def _start_camera(args: argparse.Namespace, logs: Path) -> Child:
    cmd = [sys.executable, "-m", "qwen3vl_seg_ros.ros.sim_camera", "--ros-args",
           "-p", f"rate_hz:={args.rate_hz}", "-p", "scene_period_s:=0.0", "-p", f"seed:={args.seed}"]
    if args.flat_colours:
        cmd += ["-p", "flat_colours:=true"]
    return Child("camera", cmd, logs / "sim_camera.log", lambda level, msg: level in ("WARN", "ERROR", "FATAL")
                 or not msg.startswith("scene "))


def _wait_until_ready(node: Child, client: DemoClient, deadline: float, model_text: str) -> None:
    print(f"[demo] loading the segmenter ({model_text}); progress below", flush=True)
    t0 = time.monotonic()
    key, line = node.wait_for({"ready": "ready: waiting for images and commands", "failed": "configure failed:"},
                              deadline)
    if key == "failed":
        reason = line.split("configure failed:", 1)[1].strip()
        hint = ""
        if "demo model is missing" in reason:
            hint = ("\n  Or run the demo with another checkpoint: ./scripts/run_demo.sh --model <folder or hub id>")
        raise StartupError(f"the node could not load its segmenter: {reason}{hint}")
    while not client.segment_client.wait_for_service(timeout_sec=0.2):
        if time.monotonic() > deadline:
            raise DemoTimeoutError("~/segment did not appear")
    # Discovery of the node's output publishers can lag the service under load; a first answer
    # published before they match our subscriptions would come without its overlay and mask.
    while not all(s.get_publisher_count() > 0 for s in client.output_subs):
        if time.monotonic() > deadline:
            missing = [s.topic_name for s in client.output_subs if s.get_publisher_count() == 0]
            raise DemoTimeoutError(f"no publisher matched on {', '.join(missing)}")
        time.sleep(0.05)
    _check_alone(client)
    print(f"[demo] node ready after {time.monotonic() - t0:.1f} s", flush=True)


def _check_alone(client: DemoClient) -> None:
    """Another camera or node of the same names on this ROS domain (a second demo, a launched
    sim_camera) would mix its frames and ground truth into this run's: refuse to score that."""
    counts = {topic: client.node.count_publishers(topic) for topic in
              (client.node.resolve_topic_name("image"), f"{CAMERA}/ground_truth", f"{NODE}/result")}
    crowded = {topic: n for topic, n in counts.items() if n > 1}
    if crowded:
        seen = ", ".join(f"{n} publishers on {topic}" for topic, n in crowded.items())
        raise StartupError(f"another camera or node already runs on this ROS_DOMAIN_ID ({seen}); stop it, or "
                           f"run the demo on a free domain: ROS_DOMAIN_ID=<0-101> make demo")


def _object_row(obj: Any, width: int, height: int, labels: np.ndarray | None, gt: dict[str, Any],
                frame: str) -> dict[str, Any]:
    """One answered object with its best-overlapping ground-truth object and 3D error."""
    mask = object_mask(obj, width, height)
    entry: dict[str, Any] = {"id": int(obj.id), "track_id": int(obj.track_id), "label": obj.label,
                             "score": round(float(obj.score), 3),
                             "has_3d": bool(obj.has_3d), "status_3d": obj.status_3d,
                             "num_points": int(obj.num_points)}
    if obj.has_3d:
        entry["centroid"] = [round(float(v), 4) for v in (obj.centroid.x, obj.centroid.y, obj.centroid.z)]
    if labels is not None and mask.any():
        counts = np.bincount(labels[mask].ravel(), minlength=len(gt["objects"]) + 1)
        counts[0] = 0
        if counts.max() > 0:
            gt_id = int(counts.argmax())
            gt_obj = gt["objects"][gt_id - 1]
            entry["gt_id"] = gt_id
            entry["gt_iou"] = round(iou(mask, labels == gt_id), 3)
            entry["gt_object"] = f"{gt_obj['size']} {gt_obj['colour']} {gt_obj['shape']}"
            if obj.has_3d and frame == gt["world_frame"]:
                entry["gt_position"] = gt_obj["position"]
                entry["xy_error_m"] = round(float(np.hypot(*(np.array(entry["centroid"][:2])
                                                              - np.array(gt_obj["position"][:2])))), 4)
    return entry


def _save_outputs(client: DemoClient, result: SegmentationResult, sent: float, out: Path, stem: str,
                  deadline: float) -> dict[str, str]:
    files: dict[str, str] = {}
    if result.status == SegmentationResult.ERROR:
        return files
    wait_until = min(deadline, time.monotonic() + 3.0)
    overlay = client.find_image(client.overlays, result.header.stamp, sent, wait_until)
    if overlay is not None:
        path = out / f"{stem}_overlay.png"
        cv2.imwrite(str(path), image_array(overlay))
        files["overlay"] = path.name
    mask = client.find_image(client.masks, result.header.stamp, sent, wait_until)
    if mask is not None and mask.encoding == "mono8":
        path = out / f"{stem}_mask.png"
        cv2.imwrite(str(path), image_array(mask))  # lossless label image: 0 background, k = object id k
        files["mask"] = path.name
    clouds = [msg_to_cloud(o.cloud) for o in result.objects if o.has_3d]
    if clouds:
        path = out / f"{stem}_cloud.ply"
        write_ply(path, concat_clouds(clouds), result.geometry_frame_id)
        files["cloud"] = path.name
    return files


def _run_command(client: DemoClient, args: argparse.Namespace, gt: dict[str, Any], query: dict[str, Any],
                 out: Path, stem: str, deadline: float) -> Row:
    """Sends one command (again when answered on a frame of the previous scene) and scores it."""
    scene_stamp = _scene_stamp_ns(gt)
    labels = client.gt_labels.get(scene_stamp)
    targets = query["target_ids"]
    row = Row(gt["number"], query["expression"], query["type"], None if targets is None else list(targets),
              "NO ANSWER")
    result = None
    for _attempt in range(3):
        sent = time.monotonic()
        request = Segment.Request(command=query["expression"], timeout_s=float(args.request_timeout),
                                  request_id=f"demo-{stem}")
        call_deadline = min(deadline, sent + args.request_timeout + 10.0)
        try:
            result = client.segment(request, call_deadline, f"'{query['expression']}'")
        except DemoTimeoutError:
            if time.monotonic() >= deadline:
                raise
            row.message = f"no answer within {args.request_timeout + 10:.0f} s"
            return row
        if result.status == SegmentationResult.ERROR or _stamp_ns(result.header.stamp) >= scene_stamp:
            break
        time.sleep(0.2)  # answered on a frame of the previous scene: ask again on a new one
    assert result is not None
    row.latency_ms = float(result.total_ms)
    if result.status != SegmentationResult.ERROR and _stamp_ns(result.header.stamp) < scene_stamp:
        # scoring it against this scene's ground truth would be scoring another picture
        row.status = "STALE"
        row.message = "answered three times on a frame of the previous scene; not scored"
        return row
    row.status = STATUS_NAMES.get(result.status, str(result.status))
    row.message = result.message
    row.frame = result.geometry_frame_id
    width, height = int(result.image_width), int(result.image_height)
    if (result.status != SegmentationResult.ERROR and row.target_ids is not None and labels is not None
            and labels.shape == (height, width)):
        predicted = np.zeros((height, width), dtype=bool)
        for obj in result.objects:
            predicted |= object_mask(obj, width, height)
        row.iou = iou(predicted, np.isin(labels, row.target_ids))
    row.objects = [_object_row(o, width, height, labels, gt, row.frame) for o in result.objects]
    row.files = _save_outputs(client, result, sent, out, stem, deadline)
    return row


def _gt_text(row: Row) -> list[str]:
    if row.target_ids is None:  # the user's own command: name the ground-truth object each answer covers
        return [f"is the {o['gt_object']}" + (f", {100 * o['xy_error_m']:.1f} cm" if "xy_error_m" in o else "")
                if "gt_object" in o else "-" for o in row.objects] or ["-"]
    if row.iou is None:
        return ["-"]
    if not row.target_ids:
        return ["nothing there: " + ("right" if not row.objects else "wrong")]
    lines = [f"IoU {row.iou:.2f} ({len(row.target_ids)} target{'s' if len(row.target_ids) > 1 else ''})"]
    # targets only: a wrong object's centroid sits near that object, and its distance read as the
    # target's 3D error (the demo printed "IoU 0.00, x-y off by 1.2 cm")
    errors = [o["xy_error_m"] for o in row.objects if "xy_error_m" in o and o.get("gt_id") in row.target_ids]
    if errors:
        # the centroid of the visible surface against the object's footprint centre: a distance on
        # the table plane (the height of a visible-surface centroid is not the object's centre's)
        lines.append(f"x-y off by {100 * max(errors):.1f} cm")
    wrong = [o["gt_object"] for o in row.objects if "gt_object" in o and o.get("gt_id") not in row.target_ids]
    if wrong:
        lines.append(f"not a target: {', '.join(wrong)}")
    return lines


def _print_rows(rows: list[Row]) -> None:
    table = []
    for k, row in enumerate(rows, start=1):
        objects = []
        for o in row.objects:
            where = ("@ ({:+.3f}, {:+.3f}, {:+.3f})".format(*o["centroid"]) if o["has_3d"]
                     else f"(no 3D: {_short(o['status_3d'], 30)})")
            objects.append(f"{_short(o['label'], 22)} {o['score']:.2f} {where}")
        if not objects:
            objects = [_short(row.message, 60) if row.message else "-"]
        table.append([str(k), str(row.scene), _short(row.command, 40), row.status, objects, _gt_text(row),
                      "-" if row.latency_ms is None else f"{row.latency_ms:.0f}"])
    frames = "/".join(sorted({r.frame for r in rows if r.frame})) or "-"
    print()
    print(format_table(["#", "scene", "command", "status", f"objects: label, score, centroid x y z in '{frames}' (m)",
                        "vs ground truth", "ms"], table))
    print()


def _continuous(client: DemoClient, command: str, seconds: float, deadline: float) -> dict[str, Any]:
    """Continuous mode: the command on the topic, results on ~/result, then an empty command stops it."""
    print(f"[demo] continuous mode for {seconds:g} s: publishing '{command}' on "
          f"{client.command_pub.topic_name}, results on {NODE}/result", flush=True)
    client.wait(lambda: client.command_pub.get_subscription_count() > 0, deadline, "the node's command subscription")
    start = time.monotonic()
    client.command_pub.publish(String(data=command))
    end = min(start + seconds, deadline)
    try:
        while time.monotonic() < end:
            client._check_children()
            time.sleep(0.05)
    finally:
        client.command_pub.publish(String(data=""))
    stopped = time.monotonic()
    with client._cond:
        runs = [r.msg for r in client.results
                if start <= r.arrival <= stopped and r.msg.request_id.startswith("continuous-")]
    latencies = [r.total_ms for r in runs if r.status != SegmentationResult.ERROR]
    summary = {"command": command, "seconds": round(stopped - start, 2), "results": len(runs),
               "rate_hz": round(len(runs) / max(stopped - start, 1e-6), 2),
               "median_latency_ms": round(float(np.median(latencies)), 1) if latencies else None,
               "statuses": sorted({STATUS_NAMES.get(r.status, str(r.status)) for r in runs}),
               # how many results held each track: one object seen in every frame keeps one id
               "track_ids": dict(Counter(str(o.track_id) for r in runs for o in r.objects if o.track_id))}
    latency = f", median latency {summary['median_latency_ms']:.0f} ms" if latencies else ""
    print(f"[demo] continuous mode: {len(runs)} results in {summary['seconds']:.1f} s "
          f"({summary['rate_hz']:.1f} Hz, at most the node's max_rate_hz){latency}; stopped with an empty command",
          flush=True)
    if summary["track_ids"]:
        tracks = ", ".join(f"#{k} in {v}" for k, v in summary["track_ids"].items())
        print(f"[demo] continuous mode: object track ids (results holding each): {tracks} of {len(runs)}", flush=True)
    return summary


def _readme_images(rows: list[Row], work: Path, out: Path, scene_frames: dict[int, tuple[Image, Image]],
                   scenes: dict[int, dict[str, Any]]) -> list[Path]:
    """The best answer's overlay (as the node drew it) and a picture of its clouds in the world."""
    candidates = [r for r in rows if r.status == "OK" and "overlay" in r.files and "cloud" in r.files
                  and r.scene in scene_frames]
    if not candidates:
        seen = "; ".join(f"{r.command!r}: {r.status}, files {sorted(r.files)}, camera frame "
                         f"{'kept' if r.scene in scene_frames else 'missing'}" for r in rows)
        raise RuntimeError(f"no OK answer with an overlay and 3D to make the README images from ({seen})")

    def quality(r: Row) -> tuple[float, int, int]:
        distinct = len({o.get("gt_id", o["id"]) for o in r.objects if o["has_3d"]})
        return (round(r.iou, 2) if r.iou is not None else 0.0, distinct, -len(r.objects))

    best = max(candidates, key=quality)
    out.mkdir(parents=True, exist_ok=True)
    overlay = out / "demo_overlay.png"
    cv2.imwrite(str(overlay), cv2.imread(str(work / best.files["overlay"])), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    cloud_png = out / "demo_cloud.png"
    rgb_msg, depth_msg = scene_frames[best.scene]
    vertices, _ = read_ply(work / best.files["cloud"])
    labels = {o["id"]: o["label"] for o in best.objects}
    keys = {o["id"]: o["track_id"] or o["id"] for o in best.objects}  # the overlay's colours
    depth = depth_from_raw(depth_to_raw(depth_msg), depth_msg.encoding)
    draw_cloud_figure(cloud_png, vertices, labels, image_to_rgb(rgb_msg), depth, scenes[best.scene], best.command,
                      keys)
    return [overlay, cloud_png]


def draw_cloud_figure(path: Path, vertices: np.ndarray, labels: dict[int, str], rgb: np.ndarray,
                      depth: np.ndarray, gt: dict[str, Any], title: str,
                      colour_keys: dict[int, int] | None = None) -> None:
    """The answer's object clouds (bold, in the overlay's colours) on the scene's own cloud (faint).

    The view is cropped to the objects' surroundings and looks from the camera's side, so the
    picture reads like the overlay seen in 3D; axes are metres in the world frame.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qwen3vl_seg_ros.geometry import backproject
    from qwen3vl_seg_ros.overlay import colours_for
    from qwen3vl_seg_ros.transforms import Transform
    from qwen3vl_seg_ros.types import CameraIntrinsics

    intr = CameraIntrinsics(width=gt["width"], height=gt["height"], **gt["intrinsics"])
    cam_to_world = np.array(gt["cam_to_world"], dtype=np.float64)
    organised = backproject(depth, intr)[::2, ::2].reshape(-1, 3)
    colours = rgb[::2, ::2].reshape(-1, 3)
    keep = np.isfinite(organised).all(axis=1)
    scene_pts = Transform.from_matrix(cam_to_world).apply(organised[keep].astype(np.float64))
    colours = colours[keep]
    objects = np.stack([vertices["x"], vertices["y"], vertices["z"]], axis=1).astype(np.float64)
    lo, hi = objects.min(axis=0) - 0.12, objects.max(axis=0) + 0.05
    lo[2], hi[2] = -0.005, max(hi[2], 0.08)
    inside = np.all((scene_pts >= lo) & (scene_pts <= hi), axis=1)
    scene_pts, colours = scene_pts[inside], colours[inside]

    fig = plt.figure(figsize=(6.4, 4.8), dpi=100)
    ax = fig.add_subplot(projection="3d")
    ax.scatter(scene_pts[:, 0], scene_pts[:, 1], scene_pts[:, 2], c=colours / 255.0, s=2, alpha=0.35,
               linewidths=0, depthshade=False)
    ids = [int(k) for k in np.unique(vertices["id"])]
    keys = colour_keys or {}
    tints = colours_for([keys.get(k, k) for k in ids]) / 255.0
    for k, tint in zip(ids, tints):
        pts = vertices[vertices["id"] == k]
        ax.scatter(pts["x"], pts["y"], pts["z"], color=tint, s=5, linewidths=0, depthshade=False,
                   label=f"{k}: {labels.get(k, '')}")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_zlabel("z (m)")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_zlim(lo[2], hi[2])
    ax.set_box_aspect(hi - lo)
    eye = cam_to_world[:3, 3] - (lo + hi) / 2
    ax.view_init(elev=35, azim=float(np.degrees(np.arctan2(eye[1], eye[0]))))
    ax.set_title(f"'{_short(title, 60)}': object clouds in '{gt['world_frame']}'", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """The demo; returns the exit code (see the module docstring)."""
    deadline = time.monotonic() + args.timeout
    final_out: Path = args.out
    work = Path(tempfile.mkdtemp(prefix="qwen3vl_seg_demo_")) if args.readme_images else final_out
    work.mkdir(parents=True, exist_ok=True)
    model_text = (f"segmenter {args.segmenter}" if args.segmenter
                  else f"model {args.model}" if args.model else "the shipped tiny model")
    clean_before_start(log=lambda line: print(f"[demo] {line}", flush=True))  # see ros/dds_shm.py
    print(f"[demo] starting the segmentation node and the simulated camera (logs in {work})", flush=True)
    children: list[Child] = []
    context = Context()
    client: DemoClient | None = None
    try:
        children.append(_start_node(args, work))
        children.append(_start_camera(args, work))
        rclpy.init(context=context, args=[])
        client = DemoClient(context)
        client.watched = children
        _wait_until_ready(children[0], client, deadline, model_text)
        return _drive(args, client, work, final_out, deadline)
    except StartupError as exc:
        print(f"\n[demo] stopped: {exc}", file=sys.stderr, flush=True)
        return 2
    except DemoTimeoutError as exc:
        print(f"\n[demo] gave up after --timeout={args.timeout:g} s: {exc}. Logs in {work}.", file=sys.stderr,
              flush=True)
        return 124
    except KeyboardInterrupt:
        print("\n[demo] interrupted; stopping the node and the camera", file=sys.stderr, flush=True)
        return 130
    finally:
        # the clean-up runs to its end: a Ctrl-C (or kill, or hang-up) during it abandoned it half-way,
        # with a traceback or an abort from rclpy's spin thread at exit; the children stop in ~16 s at most
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if client is not None:
            client.close()
        context.try_shutdown()
        for child in reversed(children):
            code = child.stop()
            if code not in (0, None, -signal.SIGINT):
                print(f"[demo] {child.name} exited with code {code} (see its log in {work})", flush=True)
        if args.readme_images:
            shutil.rmtree(work, ignore_errors=True)


def _scene_frame(client: DemoClient, stamp: int, wait_until: float) -> tuple[Image, Image] | None:
    """The newest colour and depth frames of the scene from ``stamp`` on, as the demo received them.

    Waits a little: a command answered at once can come before the demo's own subscriptions got
    a frame of a new scene (the node's may match the camera first under load).
    """
    def newest() -> tuple[Image, Image] | None:
        frames = [m for m in client.images if _stamp_ns(m.header.stamp) >= stamp]
        depths = [m for m in client.depths if _stamp_ns(m.header.stamp) >= stamp]
        return (frames[-1], depths[-1]) if frames and depths else None

    with contextlib.suppress(DemoTimeoutError):
        return client.wait(newest, wait_until, "a camera frame of the scene")
    return None


def _drive(args: argparse.Namespace, client: DemoClient, work: Path, final_out: Path, deadline: float) -> int:
    rows: list[Row] = []
    scenes: dict[int, dict[str, Any]] = {}
    scene_frames: dict[int, tuple[Image, Image]] = {}
    last_query = None
    for s in range(args.scenes):
        if s > 0:
            answer = client.call(client.next_scene_client, Trigger.Request(), deadline, "the next scene")
            if not answer.success:
                raise StartupError(f"the camera could not make a scene: {answer.message}")
            number = int(json.loads(answer.message)["number"])
            gt = client.wait(lambda n=number: client.ground_truth.get(n), deadline, f"scene {number}'s ground truth")
        else:  # the camera's first scene: 0, or later when a layout failed to render
            gt = client.wait(lambda: client.ground_truth[min(client.ground_truth)] if client.ground_truth else None,
                             deadline, "the first scene's ground truth")
            number = int(gt["number"])
        stamp = _scene_stamp_ns(gt)
        client.wait(lambda st=stamp: st in client.gt_labels, deadline, "the ground-truth labels")
        scenes[number] = gt
        objects = ", ".join(f"{o['size']} {o['colour']} {o['shape']}" for o in gt["objects"])
        print(f"[demo] scene {number} (test split #{gt['index']}): {len(gt['objects'])} object(s): {objects}",
              flush=True)
        if args.command:  # the user's own commands: no ground truth to compare with
            queries = [{"expression": c, "type": "custom", "target_ids": None} for c in args.command]
        else:
            queries = choose_commands(gt["queries"], args.commands)
        for k, query in enumerate(queries):
            row = _run_command(client, args, gt, query, work, f"scene{number}_{k}", deadline)
            rows.append(row)
            latency = "" if row.latency_ms is None else f", {row.latency_ms:.0f} ms"
            print(f"[demo]   '{row.command}' -> {row.status}, {len(row.objects)} object(s){latency}", flush=True)
            if query["type"] in ("referring", "custom"):  # continuous mode runs on the last scene shown
                last_query = query["expression"]
        pair = _scene_frame(client, stamp, min(deadline, time.monotonic() + 3.0))
        if pair is not None:
            scene_frames[number] = pair

    continuous = None
    if args.continuous_s > 0 and rows:
        continuous = _continuous(client, last_query or rows[-1].command, args.continuous_s, deadline)
    _print_rows(rows)
    # /diagnostics comes once a second: wait for one that has seen the last answer
    last_answer = time.monotonic()
    with contextlib.suppress(DemoTimeoutError):
        client.wait(lambda: client.diagnostics_arrival > last_answer, min(deadline, last_answer + 2.5),
                    "/diagnostics")
    diag = dict(client.diagnostics)
    if diag:
        level = {"0": "OK", "1": "WARN", "2": "ERROR", "3": "STALE"}.get(diag.get("level", ""), diag.get("level"))
        print(f"[demo] /diagnostics: {level} '{diag.get('message', '')}', last latency "
              f"{diag.get('last_latency_ms')} ms, input age {diag.get('last_input_age_ms')} ms, "
              f"results ok/no_match/error {diag.get('results_ok')}/{diag.get('results_no_match')}/"
              f"{diag.get('results_error')}")
    answered = [r for r in rows if r.status in ("OK", "NO_MATCH")]
    summary = {"rows": [r.__dict__ for r in rows], "continuous": continuous, "diagnostics": diag,
               "scenes": {str(k): {key: v for key, v in gt.items() if key != "queries"} for k, gt in scenes.items()}}
    if args.readme_images:
        try:
            written = _readme_images(rows, work, final_out, scene_frames, scenes)
        except RuntimeError as exc:
            print(f"[demo] no README images: {exc}", file=sys.stderr)
            return 1
        print("[demo] README images: " + ", ".join(f"{p} ({p.stat().st_size // 1024} kB)" for p in written))
    else:
        (work / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
        print(f"[demo] saved overlays (*_overlay.png), label masks (*_mask.png), object clouds (*_cloud.ply) and "
              f"summary.json in {work}/")
    print(f"[demo] {len(answered)} of {len(rows)} commands answered "
          f"({sum(r.status == 'OK' for r in rows)} OK, {sum(r.status == 'NO_MATCH' for r in rows)} NO_MATCH)")
    return 0 if len(answered) == len(rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (``make demo``, ``ros2 run qwen3vl_seg_ros demo``)."""
    args = _parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:  # `kill` and terminal hang-up: clean up like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

"""Load and soak harness of the ``qwen3vl_seg`` node (issue #7). A script, not a unit test.

Run (the full soak, about 11 minutes with start-up)::

    source env.sh && python bench/soak.py --duration 600

and a short smoke run with ``--duration 20``. What it does:

* starts the real node as a subprocess (``python -m qwen3vl_seg_ros.ros.node``) with the
  colour-blob test double at the model boundary; every call sleeps ``--model-sleep`` seconds
  to stand in for a model (the double reads ``sleep:<s>`` from the command);
* a camera process publishes ``--width`` x ``--height`` RGB (rgb8), aligned depth (16UC1,
  millimetres, as RealSense/Orbbec drivers publish it) and CameraInfo at ``--rate`` Hz with
  sensor-data QoS, a red blob moving across a wall so every frame has something to find;
* a client process (this one) turns continuous mode on over ``command`` and calls
  ``~/segment`` at ``--request-rate`` Hz, open loop (a request does not wait for the previous
  answer, like independent planner calls), and records every answer and every ``~/result``;
* it samples the node's resident memory (psutil) once a second.

Reported (stdout as Markdown, and JSON with ``--out``): requests answered out of sent, their
statuses and error reasons; client round-trip latency and the node's ``total_ms`` (p50, p99);
input age of the frames used; resident memory at start, after warm-up and at the end, the
growth after warm-up and its linear trend; frames published, received by the node (from
/diagnostics), used by inference, and the difference split by cause (lost in transport with
best-effort QoS, or skipped by the node's newest-frame-only policy). Exit status 1 when a
request went unanswered or resident memory grew by more than ``--max-rss-growth-mb``.

Fault options (each documented in docs/reliability.md): ``--frozen-subscriber`` starts a
process subscribed to ``~/result`` and ``~/overlay`` and freezes it (SIGSTOP) for the middle
third of the run, so its DDS reader never reads or acknowledges anything; the report then
splits latency by phase so that a slowed inference would show.

Set ``ROS_DOMAIN_ID`` to choose the DDS domain; otherwise a random one is used so that the
soak never talks to other nodes on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOUBLE = "doubles.color_blob_segmenter:ColorBlobSegmenterDouble"
NODE = "/qwen3vl_seg"


# ----------------------------------------------------------------------------------------------
# the camera (its own process, so that publishing keeps its rate whatever the client does)
# ----------------------------------------------------------------------------------------------
def _frames(width: int, height: int, n: int) -> list[tuple[Any, Any]]:
    """``n`` RGB / 16UC1 depth pairs of a red blob moving in front of a wall."""
    import numpy as np

    out = []
    bw, bh = width // 8, height // 6
    for k in range(n):
        rgb = np.full((height, width, 3), 90, np.uint8)
        depth = np.full((height, width), 1500, np.uint16)  # wall at 1.5 m
        x0 = int((width - bw) * k / max(1, n - 1))
        y0 = height // 3
        rgb[y0:y0 + bh, x0:x0 + bw] = (255, 0, 0)
        depth[y0:y0 + bh, x0:x0 + bw] = 1000  # blob at 1.0 m
        out.append((rgb, depth))
    return out


def camera_main(domain: int, width: int, height: int, rate: float, stop: Any, published: Any,
                ready: Any) -> None:
    """Publishes image, depth and camera_info at ``rate`` Hz until ``stop`` is set."""
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import CameraInfo, Image

    rclpy.init()
    node = rclpy.create_node("soak_camera")
    pubs = {name: node.create_publisher(typ, name, qos_profile_sensor_data)
            for name, typ in (("image", Image), ("depth", Image), ("camera_info", CameraInfo))}
    frames = []
    for rgb, depth in _frames(width, height, 16):
        img = Image(height=height, width=width, encoding="rgb8", step=width * 3, data=rgb.tobytes())
        dep = Image(height=height, width=width, encoding="16UC1", step=width * 2, data=depth.tobytes())
        img.header.frame_id = dep.header.frame_id = "camera_color_optical_frame"
        frames.append((img, dep))
    info = CameraInfo(width=width, height=height, distortion_model="plumb_bob", d=[0.0] * 5)
    f = 0.94 * width
    info.k = [f, 0.0, (width - 1) / 2, 0.0, f, (height - 1) / 2, 0.0, 0.0, 1.0]
    info.p = [f, 0.0, (width - 1) / 2, 0.0, 0.0, f, (height - 1) / 2, 0.0, 0.0, 0.0, 1.0, 0.0]
    info.header.frame_id = "camera_color_optical_frame"
    ready.set()
    period = 1.0 / rate
    next_t = time.monotonic()
    k = 0
    while not stop.is_set():
        img, dep = frames[k % len(frames)]
        stamp = node.get_clock().now().to_msg()
        img.header.stamp = dep.header.stamp = info.header.stamp = stamp
        pubs["image"].publish(img)
        pubs["depth"].publish(dep)
        pubs["camera_info"].publish(info)
        k += 1
        published.value = k
        next_t += period
        delay = next_t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_t = time.monotonic()  # fell behind: do not burst to catch up
    node.destroy_node()
    rclpy.try_shutdown()


def frozen_subscriber_main(domain: int, ready: Any) -> None:
    """A subscriber of ~/result and ~/overlay that the harness freezes with SIGSTOP."""
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image

    from qwen3vl_seg_ros.msg import SegmentationResult

    rclpy.init()
    node = rclpy.create_node("soak_slow_subscriber")
    reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    node.create_subscription(SegmentationResult, f"{NODE}/result", lambda _m: time.sleep(0.5), reliable)
    node.create_subscription(Image, f"{NODE}/overlay", lambda _m: time.sleep(0.5), reliable)
    ready.set()
    with contextlib.suppress(Exception):
        rclpy.spin(node)


# ----------------------------------------------------------------------------------------------
# the client (this process)
# ----------------------------------------------------------------------------------------------
@dataclass
class Answer:
    request_id: str
    sent: float  # monotonic
    received: float | None = None
    status: int | None = None
    message: str = ""
    total_ms: float = float("nan")
    input_age_ms: float = float("nan")
    stamp: float = float("nan")


@dataclass
class Report:
    """Everything the run measured; dumped as JSON and summarised as Markdown."""

    command: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    requests_sent: int = 0
    requests_answered: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    error_reasons: dict[str, int] = field(default_factory=dict)
    round_trip_ms: dict[str, float] = field(default_factory=dict)
    node_total_ms: dict[str, float] = field(default_factory=dict)
    input_age_ms: dict[str, float] = field(default_factory=dict)
    continuous_results: int = 0
    continuous_total_ms: dict[str, float] = field(default_factory=dict)
    continuous_input_age_ms: dict[str, float] = field(default_factory=dict)
    frames_published: int = 0
    frames_received_by_node: int = -1
    depths_received_by_node: int = -1
    frames_used: int = 0
    frames_lost_in_transport: int = -1
    frames_skipped_newest_only: int = -1
    results_without_depth_pair: int = 0
    rss_mb: dict[str, float] = field(default_factory=dict)
    rss_growth_after_warmup_mb: float = float("nan")
    rss_trend_mb_per_hour: float = float("nan")
    rss_trend_second_half_mb_per_hour: float = float("nan")  # allocator warm-up takes ~10 min
    rss_samples: list[tuple[float, float]] = field(default_factory=list)  # (s since start, MB) every 10 s
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    unanswered: list[dict[str, Any]] = field(default_factory=list)  # never answered: id, sent at, ~/result?
    node_exit_code: int | None = None
    load_average: dict[str, str] = field(default_factory=dict)
    passed: bool = False
    failures: list[str] = field(default_factory=list)


def summary(values: list[float]) -> dict[str, float]:
    """p50 / p99 / max / mean / n of finite values (empty dict when there are none)."""
    vals = sorted(v for v in values if v == v)
    if not vals:
        return {}

    def pct(p: float) -> float:
        return vals[min(len(vals) - 1, round(p / 100 * (len(vals) - 1)))]

    return {"p50": round(pct(50), 2), "p99": round(pct(99), 2), "max": round(vals[-1], 2),
            "mean": round(statistics.fmean(vals), 2), "n": len(vals)}


def trend_mb_per_hour(pts: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per hour (NaN for fewer than 10)."""
    if len(pts) < 10:
        return float("nan")
    mt = statistics.fmean(t for t, _ in pts)
    mm = statistics.fmean(m for _, m in pts)
    var = sum((t - mt) ** 2 for t, _ in pts)
    slope = sum((t - mt) * (m - mm) for t, m in pts) / var if var else 0.0
    return round(slope * 3600, 1)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory and the versions that matter, for the report."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = float("nan")
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gb = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    versions: dict[str, str] = {"python": platform.python_version()}
    from importlib import metadata

    for dist in ("rclpy", "numpy", "opencv-python-headless", "psutil"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "memory_gb": round(mem_gb, 1),
            "kernel": platform.release(), "rmw": os.environ.get("RMW_IMPLEMENTATION", "default"),
            "versions": versions}


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "n/a"


class SoakClient:
    """Continuous mode on, one-shot requests at a fixed rate, every answer recorded."""

    def __init__(self, context: Any, request_rate: float, timeout_s: float, command: str) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from std_msgs.msg import String

        from qwen3vl_seg_ros.msg import SegmentationResult
        from qwen3vl_seg_ros.ros.spinner import BackgroundSpinner
        from qwen3vl_seg_ros.srv import Segment

        self._segment_type = Segment
        self.node = rclpy.create_node("soak_client", context=context)
        self.request_rate = request_rate
        self.timeout_s = timeout_s
        self.command = command
        self.lock = threading.Lock()
        self.answers: list[Answer] = []
        self.continuous: list[tuple[float, float, float, str]] = []  # arrival, total_ms, input_age_ms, message
        self.used_stamps: set[tuple[int, int]] = set()
        self.oneshot_on_topic: dict[str, tuple[int, str]] = {}  # request_id -> (status, message) seen on ~/result
        self.processing: list[tuple[float, float]] = []  # (arrival, total_ms - queue_ms) of every result
        self.diag: dict[str, str] = {}
        self.command_pub = self.node.create_publisher(String, "command", 10)
        reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(SegmentationResult, f"{NODE}/result", self._on_result, reliable)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)
        # Up to ~20 requests are in flight (5 Hz, open loop): the default depth of 10 would let a
        # busy executor lose answers (see docs/reliability.md, "What a client should do").
        self.client = self.node.create_client(Segment, f"{NODE}/segment",
                                              qos_profile=QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        self.executor = MultiThreadedExecutor(num_threads=2, context=context)
        self.executor.add_node(self.node)
        self._spinner = BackgroundSpinner(self.executor, name="soak-spin").start()
        self._stop = threading.Event()
        self._caller: threading.Thread | None = None

    def _on_result(self, msg: Any) -> None:
        with self.lock:
            self.used_stamps.add((msg.header.stamp.sec, msg.header.stamp.nanosec))
            if msg.status != 2:
                self.processing.append((time.monotonic(), msg.total_ms - msg.queue_ms))
            if msg.request_id.startswith("soak-"):
                self.oneshot_on_topic[msg.request_id] = (int(msg.status), msg.message[:200])
            if msg.request_id.startswith("continuous-"):
                self.continuous.append((time.monotonic(), msg.total_ms, msg.input_age_ms, msg.message))

    def _on_diag(self, msg: Any) -> None:
        for status in msg.status:
            if status.name.startswith("qwen3vl_seg"):
                with self.lock:
                    self.diag = {kv.key: kv.value for kv in status.values}

    def start_continuous(self) -> None:
        from std_msgs.msg import String

        self.command_pub.publish(String(data=self.command))

    def stop_continuous(self) -> None:
        from std_msgs.msg import String

        self.command_pub.publish(String(data=""))

    def start_requests(self) -> None:
        self._caller = threading.Thread(target=self._call_loop, daemon=True)
        self._caller.start()

    def stop_requests(self) -> None:
        self._stop.set()
        if self._caller is not None:
            self._caller.join()

    def _call_loop(self) -> None:
        period = 1.0 / self.request_rate
        next_t = time.monotonic()
        k = 0
        while not self._stop.is_set():
            k += 1
            answer = Answer(request_id=f"soak-{k}", sent=time.monotonic())
            request = self._segment_type.Request(command=self.command, timeout_s=self.timeout_s,
                                                 request_id=answer.request_id)
            with self.lock:
                self.answers.append(answer)
            future = self.client.call_async(request)
            future.add_done_callback(lambda f, a=answer: self._on_answer(a, f))
            next_t += period
            delay = next_t - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_t = time.monotonic()

    def _on_answer(self, answer: Answer, future: Any) -> None:
        now = time.monotonic()
        with contextlib.suppress(Exception):
            result = future.result().result
            with self.lock:
                answer.received = now
                answer.status = int(result.status)
                answer.message = result.message
                answer.total_ms = float(result.total_ms)
                answer.input_age_ms = float(result.input_age_ms)
                answer.stamp = result.header.stamp.sec + result.header.stamp.nanosec * 1e-9

    def outstanding(self) -> int:
        with self.lock:
            return sum(1 for a in self.answers if a.received is None)

    def close(self) -> None:
        self._spinner.stop(shutdown_timeout=2.0)
        self.node.destroy_node()


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def start_node(args: argparse.Namespace, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwen3vl_seg_ros.ros.node", "--ros-args",
           "-p", f"segmenter:={DOUBLE}", "-p", f"max_rate_hz:={args.continuous_rate}",
           "-p", "diagnostics_period_s:=1.0", "--log-level", "qwen3vl_seg:=warn"]
    log = open(log_path, "w")  # noqa: SIM115 - owned by the child for its whole life
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_ready(client: SoakClient, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.client.service_is_ready() and client.command_pub.get_subscription_count() > 0:
            return True
        time.sleep(0.1)
    return False


def run(args: argparse.Namespace) -> Report:
    domain = int(os.environ.get("ROS_DOMAIN_ID") or random.SystemRandom().randint(101, 200))
    os.environ["ROS_DOMAIN_ID"] = str(domain)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "test"), env.get("PYTHONPATH", "")) if p)
    sys.path.insert(0, str(ROOT / "test"))

    import psutil
    import rclpy
    from rclpy.context import Context

    report = Report(command=" ".join([Path(sys.executable).name, *sys.argv]), machine=machine_info(),
                    settings={k: v for k, v in vars(args).items() if k != "out"} | {"ros_domain_id": domain})
    report.load_average["start"] = loadavg()
    out_dir = Path(args.log_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    node_log = out_dir / "soak_node.log"
    node = start_node(args, env, node_log)
    ctx = mp.get_context("spawn")
    stop_camera, published, cam_ready = ctx.Event(), ctx.Value("l", 0), ctx.Event()
    camera = ctx.Process(target=camera_main, name="soak_camera",
                         args=(domain, args.width, args.height, args.rate, stop_camera, published, cam_ready))
    slow_sub = None
    context = Context()
    rclpy.init(context=context)
    command = f"red sleep:{args.model_sleep}"
    client = SoakClient(context, args.request_rate, args.timeout_s, command)
    rss: list[tuple[float, float]] = []
    try:
        if not wait_ready(client, 60.0):
            raise RuntimeError(f"the node did not come up within 60 s; see {node_log}")
        proc = psutil.Process(node.pid)
        camera.start()
        if not cam_ready.wait(60.0):
            raise RuntimeError("the camera process did not start")
        if args.frozen_subscriber:
            slow_ready = ctx.Event()
            slow_sub = ctx.Process(target=frozen_subscriber_main, args=(domain, slow_ready), name="soak_slow_sub")
            slow_sub.start()
            slow_ready.wait(60.0)
            time.sleep(2.0)  # discovery
        time.sleep(1.0)
        if not args.intake_only:
            client.start_continuous()
        t0 = time.monotonic()
        if not args.intake_only:
            client.start_requests()
        frozen = False
        phase_marks = {"start": t0}
        next_print = t0 + 30.0
        while (now := time.monotonic()) < t0 + args.duration:
            rss.append((now - t0, proc.memory_info().rss / 2**20))
            if slow_sub is not None and slow_sub.pid:
                if not frozen and now - t0 >= args.duration / 3 and "frozen" not in phase_marks:
                    os.kill(slow_sub.pid, signal.SIGSTOP)
                    frozen = True
                    phase_marks["frozen"] = now
                elif frozen and now - t0 >= 2 * args.duration / 3:
                    os.kill(slow_sub.pid, signal.SIGCONT)
                    frozen = False
                    phase_marks["thawed"] = now
            if node.poll() is not None:
                report.failures.append(f"the node exited with code {node.returncode} during the run")
                break
            if now >= next_print:
                with client.lock:
                    done = sum(1 for a in client.answers if a.received is not None)
                    sent = len(client.answers)
                print(f"[soak] {now - t0:5.0f} s: {done}/{sent} answered, {len(client.continuous)} continuous, "
                      f"rss {rss[-1][1]:.1f} MB, camera {published.value} frames, load {loadavg()}", flush=True)
                next_print += 30.0
            time.sleep(1.0)
        t_end = time.monotonic()
        client.stop_requests()
        client.stop_continuous()
        deadline = time.monotonic() + args.timeout_s + 10.0
        while client.outstanding() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # one more /diagnostics message
        stop_camera.set()
        camera.join(10.0)
        with client.lock:
            diag = dict(client.diag)
            answers = list(client.answers)
            continuous = list(client.continuous)
            used = len(client.used_stamps)
            on_topic = dict(client.oneshot_on_topic)
            processing = list(client.processing)
        report.load_average["end"] = loadavg()
    finally:
        if slow_sub is not None and slow_sub.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(slow_sub.pid, signal.SIGCONT)
            slow_sub.terminate()
            slow_sub.join(5.0)
        stop_camera.set()
        if camera.is_alive():
            camera.join(5.0)
            if camera.is_alive():
                camera.kill()
        if node.poll() is None:
            node.send_signal(signal.SIGINT)
            try:
                report.node_exit_code = node.wait(timeout=20)
            except subprocess.TimeoutExpired:
                node.kill()
                report.node_exit_code = node.wait()
        else:
            report.node_exit_code = node.returncode
        client.close()
        context.try_shutdown()

    # ------------------------------------------------------------------------------ analysis
    report.requests_sent = len(answers)
    answered = [a for a in answers if a.received is not None]
    report.unanswered = [{"request_id": a.request_id, "sent_s": round(a.sent - t0, 2),
                          "result_on_topic": on_topic.get(a.request_id)} for a in answers if a.received is None]
    report.requests_answered = len(answered)
    names = {0: "OK", 1: "NO_MATCH", 2: "ERROR"}
    for a in answered:
        key = names.get(a.status or 0, str(a.status))
        report.status_counts[key] = report.status_counts.get(key, 0) + 1
        if a.status == 2:
            reason = a.message.split(":")[0][:80]
            report.error_reasons[reason] = report.error_reasons.get(reason, 0) + 1
    report.round_trip_ms = summary([(a.received - a.sent) * 1e3 for a in answered])
    report.node_total_ms = summary([a.total_ms for a in answered if a.status != 2])
    report.input_age_ms = summary([a.input_age_ms for a in answered if a.status != 2])
    report.continuous_results = len(continuous)
    report.continuous_total_ms = summary([c[1] for c in continuous])
    report.continuous_input_age_ms = summary([c[2] for c in continuous])
    report.results_without_depth_pair = sum(1 for c in continuous if "no depth image paired" in c[3]) + sum(
        1 for a in answered if "no depth image paired" in a.message)
    report.frames_published = int(published.value)
    with contextlib.suppress(KeyError, ValueError):
        report.frames_received_by_node = int(diag["images_received"])
        report.depths_received_by_node = int(diag["depths_received"])
    report.frames_used = used
    if report.frames_received_by_node >= 0:
        report.frames_lost_in_transport = report.frames_published - report.frames_received_by_node
        report.frames_skipped_newest_only = report.frames_received_by_node - used
    if rss:
        warm = max(5.0, min(60.0, 0.1 * args.duration))
        after = [m for t, m in rss if t >= warm]
        base = statistics.fmean(after[:5]) if after else rss[0][1]
        end = statistics.fmean([m for _, m in rss[-5:]])
        report.rss_mb = {"start": round(rss[0][1], 1), "after_warmup": round(base, 1), "end": round(end, 1),
                         "max": round(max(m for _, m in rss), 1), "warmup_s": warm}
        report.rss_growth_after_warmup_mb = round(end - base, 1)
        report.rss_samples = [(round(t, 1), round(m, 1)) for t, m in rss[::10]]
        report.rss_trend_mb_per_hour = trend_mb_per_hour([(t, m) for t, m in rss if t >= warm])
        report.rss_trend_second_half_mb_per_hour = trend_mb_per_hour([(t, m) for t, m in rss if t >= rss[-1][0] / 2])
    if "frozen" in phase_marks:
        bounds = [("before", phase_marks["start"], phase_marks["frozen"]),
                  ("frozen", phase_marks["frozen"], phase_marks.get("thawed", t_end)),
                  ("after", phase_marks.get("thawed", t_end), t_end)]
        for name, lo, hi in bounds:
            sel = [a for a in answered if lo <= a.sent < hi]
            trip = summary([(a.received - a.sent) * 1e3 for a in sel])
            report.phases[name] = {"requests": len(sel), "answered_ok": sum(1 for a in sel if a.status == 0),
                                   "round_trip_p50_ms": trip.get("p50", -1), "round_trip_p99_ms": trip.get("p99", -1),
                                   "continuous_results": sum(1 for c in continuous if lo <= c[0] < hi),
                                   "processing_ms": summary([ms for t, ms in processing if lo <= t < hi])}
    if report.requests_answered != report.requests_sent:
        report.failures.append(f"{report.requests_sent - report.requests_answered} request(s) never answered")
    if report.rss_growth_after_warmup_mb > args.max_rss_growth_mb:
        report.failures.append(f"resident memory grew {report.rss_growth_after_warmup_mb} MB after warm-up "
                               f"(limit {args.max_rss_growth_mb} MB)")
    report.passed = not report.failures
    return report


def markdown(report: Report) -> str:
    r = report
    lines = [
        f"- command: `{r.command}`",
        f"- machine: {r.machine['cpu']}, {r.machine['logical_cores']} logical cores, {r.machine['memory_gb']} GB, "
        f"kernel {r.machine['kernel']}, {r.machine['rmw']}; load average {r.load_average.get('start')} at start, "
        f"{r.load_average.get('end')} at the end",
        f"- versions: {', '.join(f'{k} {v}' for k, v in r.machine['versions'].items())}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| requests answered / sent | {r.requests_answered} / {r.requests_sent} |",
        f"| statuses | {r.status_counts} |",
        f"| error reasons | {r.error_reasons or 'none'} |",
        f"| one-shot round trip ms (client) p50 / p99 / max | {r.round_trip_ms.get('p50')} / "
        f"{r.round_trip_ms.get('p99')} / {r.round_trip_ms.get('max')} |",
        f"| one-shot total_ms (node) p50 / p99 | {r.node_total_ms.get('p50')} / {r.node_total_ms.get('p99')} |",
        f"| one-shot input age ms p50 / p99 | {r.input_age_ms.get('p50')} / {r.input_age_ms.get('p99')} |",
        f"| continuous results | {r.continuous_results} |",
        f"| continuous total_ms p50 / p99 | {r.continuous_total_ms.get('p50')} / {r.continuous_total_ms.get('p99')} |",
        f"| continuous input age ms p50 / p99 | {r.continuous_input_age_ms.get('p50')} / "
        f"{r.continuous_input_age_ms.get('p99')} |",
        f"| resident memory MB start / after warm-up / end / max | {r.rss_mb.get('start')} / "
        f"{r.rss_mb.get('after_warmup')} / {r.rss_mb.get('end')} / {r.rss_mb.get('max')} |",
        f"| resident memory growth after warm-up | {r.rss_growth_after_warmup_mb} MB "
        f"(trend {r.rss_trend_mb_per_hour} MB/h; second half {r.rss_trend_second_half_mb_per_hour} MB/h) |",
        f"| frames published by the camera | {r.frames_published} |",
        f"| frames received by the node (/diagnostics) | {r.frames_received_by_node} "
        f"(depth {r.depths_received_by_node}) |",
        f"| frames used by inference | {r.frames_used} |",
        f"| dropped before the node's callbacks (best-effort reader queue of 5 overwritten) | "
        f"{r.frames_lost_in_transport} |",
        f"| dropped: skipped by the newest-frame policy | {r.frames_skipped_newest_only} |",
        f"| results without a depth pair (2D only) | {r.results_without_depth_pair} |",
        f"| node exit code after SIGINT | {r.node_exit_code} |",
    ]
    for name, phase in r.phases.items():
        lines.append(f"| phase '{name}' (frozen subscriber) | {phase} |")
    for lost in r.unanswered:
        lines.append(f"| never answered | {lost} |")
    lines.append(f"| verdict | {'PASS' if r.passed else 'FAIL: ' + '; '.join(r.failures)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--rate", type=float, default=30.0, help="camera rate, Hz")
    parser.add_argument("--request-rate", type=float, default=5.0, help="~/segment calls per second")
    parser.add_argument("--continuous-rate", type=float, default=5.0,
                        help="the node's max_rate_hz for continuous mode (0 = as fast as possible)")
    parser.add_argument("--model-sleep", type=float, default=0.03, help="seconds each model call sleeps")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="timeout_s of each request")
    parser.add_argument("--max-rss-growth-mb", type=float, default=50.0)
    parser.add_argument("--frozen-subscriber", action="store_true",
                        help="freeze a reliable subscriber of ~/result and ~/overlay for the middle third")
    parser.add_argument("--intake-only", action="store_true",
                        help="no continuous mode and no requests: measure how many frames the node takes in")
    parser.add_argument("--log-dir", default=str(ROOT / "runs" / "soak"), help="node log folder")
    parser.add_argument("--out", default="", help="write the report as JSON here")
    args = parser.parse_args(argv)
    report = run(args)
    text = markdown(report)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())

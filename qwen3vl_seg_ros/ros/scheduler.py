"""Decides what the single inference thread runs next, and on which frame.

Executor callbacks only *submit* work here (a one-shot request, a new continuous command, "a
frame arrived"); inference runs on this scheduler's own thread, so no ROS callback ever waits
for a model. Rules:

* one-shot requests go first, oldest first, each on the newest frame no older than
  ``max_input_age_s``; a request whose ``timeout_s`` passes before such a frame exists is
  answered with an error saying what was missing (exactly one answer per request, always);
* continuous mode re-runs its command on frames it has not seen yet, at most ``max_rate_hz``;
* only the newest frame is ever used: older frames are skipped, never queued.

No rclpy here: the node passes callables, which keeps this logic testable with plain threads.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qwen3vl_seg_ros.ros.sync import Frame, RgbdSynchronizer


@dataclass
class Job:
    """One unit of inference: a one-shot request or one run of continuous mode."""

    command: str
    request_id: str
    received: float  # monotonic
    deadline: float | None = None  # monotonic; None for continuous mode
    continuous: bool = False
    reply: Callable[[Any], None] | None = None  # receives the result (one-shot only)
    answered: bool = field(default=False, repr=False)


RunFn = Callable[[Job, Frame], Any]  # runs a job, returns the result it published
FailFn = Callable[[Job, str], Any]  # builds an ERROR result with the reason, returns it


class Scheduler:
    """Owns the inference thread and the queue of work for it."""

    def __init__(self, frames: RgbdSynchronizer, run: RunFn, fail: FailFn,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.frames = frames
        self._run = run
        self._fail = fail
        self._clock = clock
        self.max_input_age_s = 0.5
        self.max_rate_hz = 5.0
        self.max_pending = 16
        self._pending: deque[Job] = deque()
        self._continuous: str | None = None
        self._continuous_seq = 0
        self._last_seen_seq = 0
        self._next_continuous_at = 0.0
        self._active = False
        self._stopping = False
        self._busy_job: Job | None = None
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._counter = itertools.count(1)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        with self._cv:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="qwen3vl_seg_inference", daemon=True)
            self._thread.start()

    def stop(self, reason: str = "node is shutting down", timeout: float = 10.0) -> None:
        """Stops the thread after the running job; pending requests get an ERROR answer."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._fail_all(reason)

    def set_active(self, active: bool, reason: str = "") -> None:
        """Inactive: nothing runs, queued one-shot requests are answered with ``reason``."""
        with self._cv:
            self._active = active
            self._cv.notify_all()
        if not active:
            self._fail_all(reason or "node was deactivated")

    # -- submissions (any thread, never blocks on inference) -----------------------------------
    def submit(self, job: Job) -> str | None:
        """Queues a one-shot job; returns a refusal reason instead when it cannot be queued."""
        with self._cv:
            if not self._active:
                return "node is not active (lifecycle state); activate it first"
            if len(self._pending) >= self.max_pending:
                return f"too many pending requests ({self.max_pending}); try again later"
            self._pending.append(job)
            self._cv.notify_all()
        return None

    def set_continuous(self, command: str | None) -> None:
        """Starts (or replaces) continuous mode with ``command``; None or '' stops it."""
        with self._cv:
            self._continuous = command or None
            self._next_continuous_at = 0.0
            self._last_seen_seq = 0
            self._cv.notify_all()

    @property
    def continuous_command(self) -> str | None:
        return self._continuous

    def notify_frame(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def pending_count(self) -> int:
        with self._cv:
            return len(self._pending) + (1 if self._busy_job and not self._busy_job.continuous else 0)

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._stopping:
                    return
                expired, picked, wait_s = self._plan(self._clock())
                if picked is None and not expired:
                    self._cv.wait(timeout=wait_s)
                    continue
                self._busy_job = picked[0] if picked else None
            for job, reason in expired:
                self._answer_failure(job, reason)
            if picked is not None:
                job, frame = picked
                try:
                    result = self._run(job, frame)
                    self._deliver(job, result)
                except Exception as exc:  # the node's run() reports its own errors; this is a last guard
                    self._answer_failure(job, f"internal error: {type(exc).__name__}: {exc}")
                finally:
                    with self._cv:
                        self._busy_job = None

    def _plan(self, now: float) -> tuple[list[tuple[Job, str]], tuple[Job, Frame] | None, float]:
        """Under the lock: expired requests, the job to run next (if any), and how long to wait."""
        expired: list[tuple[Job, str]] = []
        for job in list(self._pending):
            if job.deadline is not None and now >= job.deadline:
                self._pending.remove(job)
                expired.append((job, self._timeout_reason(job, now)))
        if not self._active:
            return expired, None, 0.5
        frame = self.frames.latest(now)
        fresh = frame is not None and frame.age(now) <= self.max_input_age_s
        if self._pending and fresh:
            return expired, (self._pending.popleft(), frame), 0.0
        waits = [0.5]
        if self._pending:
            waits += [j.deadline - now for j in self._pending if j.deadline is not None]
        if self._continuous and fresh and frame.seq > self._last_seen_seq:
            if now >= self._next_continuous_at:
                self._last_seen_seq = frame.seq
                period = 1.0 / self.max_rate_hz if self.max_rate_hz > 0 else 0.0
                self._next_continuous_at = now + period
                self._continuous_seq += 1
                job = Job(self._continuous, f"continuous-{self._continuous_seq}", now, continuous=True)
                return expired, (job, frame), 0.0
            waits.append(self._next_continuous_at - now)
        return expired, None, max(0.001, min(waits))

    def _timeout_reason(self, job: Job, now: float) -> str:
        waited = now - job.received
        return (f"timed out after {waited:.2f} s waiting for a synchronized frame no older than "
                f"max_input_age_s={self.max_input_age_s:.2f} s: {self.frames.explain(now)}")

    def _answer_failure(self, job: Job, reason: str) -> None:
        try:
            result = self._fail(job, reason)
        except Exception as exc:  # never lose the answer because building it failed
            result = None
            reason = f"{reason} (and building the error result failed: {exc})"
        self._deliver(job, result)

    def _deliver(self, job: Job, result: Any) -> None:
        if job.reply is not None and not job.answered:
            job.answered = True
            job.reply(result)

    def _fail_all(self, reason: str) -> None:
        with self._cv:
            jobs = list(self._pending)
            self._pending.clear()
        for job in jobs:
            self._answer_failure(job, reason)

    def next_request_id(self) -> str:
        return f"req-{next(self._counter)}"

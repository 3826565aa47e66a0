"""Decides what the single inference thread runs next, and on which frame.

Executor callbacks only *submit* work here (a one-shot request, a new continuous command, "a
frame arrived"); inference runs on this scheduler's own thread, so no ROS callback ever waits
for a model. Rules:

* one-shot requests go first, oldest first, each on the newest frame no older than
  ``max_input_age_s``; a request whose ``timeout_s`` passes before such a frame exists is
  answered with an error saying what was missing (exactly one answer per request, always);
* continuous mode re-runs its command on frames it has not seen yet, at most ``max_rate_hz``;
* only the newest frame is ever used: older frames are skipped, never queued;
* ``timeout_s`` covers the wait *and* the inference: a watchdog thread answers a request at
  its deadline even while the model is still busy (with an earlier request, or with this one;
  a model call cannot be interrupted, so its late result is still published on ~/result).

No rclpy here: the node passes callables, which keeps this logic testable with plain threads.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qwen3vl_seg_ros.ros.sync import Frame, RgbdSynchronizer

#: The watchdog's longest single wait; it wakes and re-plans after it (far below threading.TIMEOUT_MAX).
MAX_WAIT_S = 3600.0


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
    failure: str = field(default="", repr=False)  # the ERROR it was answered with, if any
    session: int = field(default=0, repr=False)  # the scheduler's session when it was picked
    # the run holds the answer (Scheduler.claim_result) and the inference thread has not given it yet
    result_claimed: bool = field(default=False, repr=False)


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
        self._chores: deque[Callable[[], None]] = deque()  # run on the inference thread before jobs
        self._continuous: str | None = None
        self._continuous_seq = 0
        self._last_seen_seq = 0
        self._last_continuous_at = -math.inf  # when continuous mode last took a frame
        self._active = False
        self._stopping = False
        self._busy_job: Job | None = None
        self._busy_since = 0.0
        self._chore_since: float | None = None  # when the running chore (a warm-up) began
        # An active stretch (activate to deactivate): a job picked in an older one shows nothing
        # on the display topics when it returns (deactivate cleared them, and they stay clear).
        self._session = 0
        self._cv = threading.Condition()
        self._answer_lock = threading.Lock()  # makes "answer once" atomic across threads
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._straggler: threading.Thread | None = None  # an old inference thread still in a model call
        # Each start() begins a generation; threads of an older one exit. A model call that
        # outlives stop()'s join must not leave a second inference thread behind.
        self._generation = 0
        self._counter = itertools.count(1)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        with self._cv:
            if self._thread is not None:
                return
            self._stopping = False
            self._generation += 1
            gen = self._generation
            self._thread = threading.Thread(target=self._loop, args=(gen, self._straggler),
                                            name="qwen3vl_seg_inference", daemon=True)
            self._straggler = None
            self._watchdog = threading.Thread(target=self._watch, args=(gen,), name="qwen3vl_seg_deadlines",
                                              daemon=True)
            self._thread.start()
            self._watchdog.start()

    def stop(self, reason: str = "node is shutting down", timeout: float = 10.0) -> None:
        """Stops the threads after the running job; pending requests get an ERROR answer.

        A running job that does not finish within ``timeout`` is answered with ``reason`` too
        (its thread ends when the model returns); a continuous run is claimed the same way, so
        its late result says so. The deadline watchdog goes on until then, so a running
        request is still answered at its own deadline while this waits.
        """
        with self._cv:
            self._stopping = True
            self._chores.clear()
            self._cv.notify_all()
            thread, self._thread = self._thread, None
            watchdog, self._watchdog = self._watchdog, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._cv:
            stuck = thread is not None and thread.is_alive()
            busy = self._busy_job if stuck else None
            if stuck:
                self._straggler = thread
        if busy is not None:
            self._answer_failure(busy, f"{reason} (the model was still running on this request)")
        with self._cv:
            self._cv.notify_all()  # the watchdog sees that nothing is left to watch
        if watchdog is not None and watchdog is not threading.current_thread():
            watchdog.join(timeout)
        self._fail_all(reason)

    def set_active(self, active: bool, reason: str = "") -> None:
        """Inactive: nothing runs, queued one-shot requests are answered with ``reason``."""
        with self._cv:
            if self._active and not active:
                self._session += 1
            self._active = active
            self._cv.notify_all()
        if not active:
            self._fail_all(reason or "node was deactivated")

    # -- submissions (any thread, never blocks on inference) -----------------------------------
    def submit(self, job: Job) -> str | None:
        """Queues a one-shot job; returns a refusal reason instead when it cannot be queued."""
        with self._cv:
            if self._stopping:
                return "node is shutting down (or cleaned up); the request was not run"
            if not self._active:
                return "node is not active (lifecycle state); activate it first"
            if len(self._pending) >= self.max_pending:
                return f"too many pending requests ({self.max_pending}); try again later"
            self._pending.append(job)
            self._cv.notify_all()
        return None

    def set_continuous(self, command: str | None) -> bool:
        """Starts (or replaces) continuous mode with ``command``; None or '' stops it. Returns
        whether anything changed.

        The same command again changes nothing: planners often re-publish their goal at a fixed
        rate, and restarting would re-run the last frame each time, past ``max_rate_hz``. A new
        command may run on the newest frame even if an older one saw it, at once when the rate
        allows; it does not restart the rate limit, or two publishers alternating goals would
        drive the model back to back, past ``max_rate_hz``.
        """
        with self._cv:
            if (command or None) == self._continuous:
                return False
            self._continuous = command or None
            self._last_seen_seq = 0  # every frame is new to this command; _last_continuous_at stays
            self._cv.notify_all()
            return True

    @property
    def continuous_command(self) -> str | None:
        return self._continuous

    @property
    def session(self) -> int:
        """The current active stretch (see ``Job.session``); it changes when the node deactivates."""
        return self._session

    def notify_frame(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def pending_count(self) -> int:
        """Requests still owed an answer (/diagnostics): a running one the deadline has answered
        is not, though the model is still busy with it."""
        with self._cv:
            busy = self._busy_job
            return len(self._pending) + (1 if busy and not busy.continuous and not busy.answered else 0)

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self, gen: int, straggler: threading.Thread | None = None) -> None:
        if straggler is not None:  # never two model calls at once: wait for the old one to return
            straggler.join()
        while True:
            # one lock section for "a chore?" and "which job?": with two, a warm-up queued between
            # them (the first frame of a new size, then a request on it) was overtaken by the job
            with self._cv:
                if self._stopping or gen != self._generation:
                    return
                chore = self._chores.popleft() if self._chores else None
                if chore is not None:
                    self._chore_since = self._clock()  # a request timing out meanwhile is told so
                else:
                    expired, picked, wait_s = self._plan(self._clock())
                    if picked is None and not expired:
                        self._cv.wait(timeout=wait_s)
                        continue
                    if picked is not None:
                        self._busy_job, self._busy_since = picked[0], self._clock()
                        picked[0].session = self._session
                        self._cv.notify_all()  # the watchdog now watches this job's deadline
            if chore is not None:
                self._run_chore(chore)
                continue
            for job, reason in expired:
                self._answer_failure(job, reason)
            if picked is not None:
                job, frame = picked
                try:
                    result = self._run(job, frame)
                    self._deliver(job, result)
                except Exception as exc:  # the node's run() reports its own errors; this is a last guard
                    self._answer_failure(job, f"internal error: {type(exc).__name__}: {exc}", job.result_claimed)
                finally:
                    with self._cv:
                        if self._busy_job is job:
                            self._busy_job = None
                            self._cv.notify_all()  # a stopping watchdog has nothing left to watch

    def run_soon(self, chore: Callable[[], None]) -> None:
        """Runs ``chore`` on the inference thread before the next job (e.g. a warm-up for a new
        frame size), so model work never happens on an executor thread."""
        with self._cv:
            self._chores.append(chore)
            self._cv.notify_all()

    def _run_chore(self, chore: Callable[[], None]) -> None:
        """Runs a chore that ``_loop`` took (and marked in ``_chore_since``). A failed warm-up
        must not stop serving: the chore logs its own failure."""
        try:
            with contextlib.suppress(Exception):
                chore()
        finally:
            with self._cv:
                self._chore_since = None

    def _watch(self, gen: int) -> None:
        """Answers requests whose deadline passes while the inference thread is busy."""
        while True:
            with self._cv:
                busy = self._busy_job
                if gen != self._generation or (self._stopping and (busy is None or busy.answered
                                                                    or busy.reply is None)):
                    return  # stopping: on until the running request is answered (continuous: no one waits)
                now = self._clock()
                expired = self._take_expired(now)
                overdue = None
                if (busy is not None and busy.reply is not None and not busy.answered
                        and busy.deadline is not None and now >= busy.deadline):
                    overdue = (busy, f"timed out after {now - busy.received:.2f} s: the model was still "
                                     f"running on this request (for {now - self._busy_since:.2f} s; timeout_s "
                                     f"covers the inference); its result will be published on ~/result when "
                                     f"it is done")
                if not expired and overdue is None:
                    deadlines = [j.deadline for j in self._pending if j.deadline is not None]
                    if busy is not None and busy.deadline is not None and not busy.answered:
                        deadlines.append(busy.deadline)
                    # capped: threading refuses waits past TIMEOUT_MAX (a timeout_s of 1e10 would kill this thread)
                    wait = min(MAX_WAIT_S, max(0.001, min(deadlines) - now)) if deadlines else None
                    self._cv.wait(timeout=wait)
                    continue
            for job, reason in expired:
                self._answer_failure(job, reason)
            if overdue is not None:
                self._answer_failure(*overdue)

    def _take_expired(self, now: float) -> list[tuple[Job, str]]:
        """Under the lock: removes the pending requests past their deadline, with the reason."""
        expired: list[tuple[Job, str]] = []
        for job in list(self._pending):
            if job.deadline is not None and now >= job.deadline:
                self._pending.remove(job)
                expired.append((job, self._timeout_reason(job, now)))
        return expired

    def _plan(self, now: float) -> tuple[list[tuple[Job, str]], tuple[Job, Frame] | None, float]:
        """Under the lock: expired requests, the job to run next (if any), and how long to wait."""
        expired = self._take_expired(now)
        if not self._active or not (self._pending or self._continuous):
            # nothing to run: pairing frames (sync_queue_size may be 1000) would only hold the
            # lock and burn CPU on every frame notification
            return expired, None, 0.5
        frame = self.frames.latest(now)
        fresh = frame is not None and frame.age(now) <= self.max_input_age_s
        if self._pending and fresh:
            return expired, (self._pending.popleft(), frame), 0.0
        waits = [0.5]
        if self._pending:
            waits += [j.deadline - now for j in self._pending if j.deadline is not None]
        if self._continuous and fresh and frame.seq > self._last_seen_seq:
            # the period of the rate now in force (a rate raised at runtime applies at once)
            period = 1.0 / self.max_rate_hz if self.max_rate_hz > 0 else 0.0
            next_at = self._last_continuous_at + period
            if now >= next_at:
                self._last_seen_seq = frame.seq
                self._last_continuous_at = now
                self._continuous_seq += 1
                job = Job(self._continuous, f"continuous-{self._continuous_seq}", now, continuous=True)
                return expired, (job, frame), 0.0
            waits.append(next_at - now)
        return expired, None, max(0.001, min(waits))

    def _timeout_reason(self, job: Job, now: float) -> str:
        waited = now - job.received
        busy = self._busy_job
        frame = self.frames.latest(now)
        fresh = frame is not None and frame.age(now) <= self.max_input_age_s
        if busy is None and self._chore_since is not None and fresh:
            return (f"timed out after {waited:.2f} s in the queue: the model was warming up for a new "
                    f"frame size (for {now - self._chore_since:.2f} s)")
        if busy is not None and fresh:
            return (f"timed out after {waited:.2f} s in the queue: the model was busy with "
                    f"'{busy.request_id}' (running for {now - self._busy_since:.2f} s)")
        return (f"timed out after {waited:.2f} s waiting for a synchronized frame no older than "
                f"max_input_age_s={self.max_input_age_s:.2f} s: {self.frames.explain(now)}")

    def _claim(self, job: Job, failure: str = "") -> bool:
        """True for the one caller that may answer ``job`` (the inference thread or the watchdog).
        ``failure`` is set with the claim, so a run that lost it reads why in its late note."""
        with self._answer_lock:
            if job.answered:
                return False
            job.answered, job.failure = True, failure
            return True

    def claim_result(self, job: Job) -> bool:
        """For the run, just before it publishes its result: True when that result is the
        answer; from then on neither the deadline nor a stop can answer ``job`` with an ERROR
        (claimed only after the publish, a deadline in between sent both). False: ``job`` was
        answered with ``job.failure`` already, so its result is late and must say so."""
        won = self._claim(job)
        job.result_claimed = won
        return won

    def _answer_failure(self, job: Job, reason: str, claimed: bool = False) -> None:
        """Answers ``job`` with an ERROR unless it has its answer. ``claimed``: the run claimed
        its result, then raised before delivering it; the answer is still owed, and only here."""
        if claimed:
            job.result_claimed, job.failure = False, reason
        elif not self._claim(job, reason):
            return  # already answered: no second ERROR on ~/result either (a continuous run too:
            # stopped with an ERROR, its late result is marked so)
        try:
            result = self._fail(job, reason)
        except Exception:  # never lose the answer because building it failed
            result = None
        if job.reply is not None:
            job.reply(result)

    def _deliver(self, job: Job, result: Any) -> None:
        """Answers with the run's result, if the run claimed the answer (or can claim it now)."""
        claimed, job.result_claimed = job.result_claimed, False  # given once, even if reply raises
        if job.reply is not None and (claimed or self._claim(job)):
            job.reply(result)

    def _fail_all(self, reason: str) -> None:
        with self._cv:
            jobs = list(self._pending)
            self._pending.clear()
        for job in jobs:
            self._answer_failure(job, reason)

    def next_request_id(self) -> str:
        return f"req-{next(self._counter)}"

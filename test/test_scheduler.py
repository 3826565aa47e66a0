"""Scheduling rules of the inference thread, with plain threads and a fake model call."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

import pytest

from qwen3vl_seg_ros.ros.scheduler import Job, Scheduler
from qwen3vl_seg_ros.ros.sync import RgbdSynchronizer

from helpers import repeating, wait_for


class ModelRecorderDouble:
    """Test double of the model side of the scheduler: records the jobs it runs and fails."""

    def __init__(self, delay: float = 0.0):
        self.runs: list[tuple[str, int]] = []
        self.failures: list[tuple[str, str]] = []
        self.delay = delay
        self.lock = threading.Lock()

    def run(self, job, frame):
        time.sleep(self.delay)
        with self.lock:
            self.runs.append((job.request_id, frame.seq))
        return ("ok", job.request_id, frame.seq)

    def fail(self, job, reason):
        with self.lock:
            self.failures.append((job.request_id, reason))
        return ("error", job.request_id, reason)


def make(delay=0.0, active=True):
    frames = RgbdSynchronizer(use_depth=False)
    rec = ModelRecorderDouble(delay)
    sched = Scheduler(frames, rec.run, rec.fail)
    sched.max_input_age_s = 0.5
    sched.start()
    sched.set_active(active)
    return frames, rec, sched


@contextlib.contextmanager
def camera(frames, sched, period_s: float):
    """A camera thread adding a frame every ``period_s``; the scheduler is stopped afterwards."""

    def frame() -> None:
        frames.add_image("img", 0.0, time.monotonic())
        sched.notify_frame()

    try:
        with repeating(frame, period_s):
            yield
    finally:
        sched.stop()


def one_shot(sched, rid, timeout=1.0):
    answers = []
    now = time.monotonic()
    job = Job("cmd", rid, now, deadline=now + timeout, reply=answers.append)
    return job, answers, sched.submit(job)


def test_one_shot_runs_on_fresh_frame_and_gets_exactly_one_answer():
    frames, rec, sched = make()
    try:
        seq = frames.add_image("img", 0.0, time.monotonic())
        job, answers, refusal = one_shot(sched, "r1")
        assert refusal is None
        assert wait_for(lambda: answers, 5)
        time.sleep(0.1)
        assert answers == [("ok", "r1", seq)]
    finally:
        sched.stop()


def test_stale_frame_is_not_used_and_request_times_out_with_reason():
    frames, rec, sched = make()
    try:
        frames.add_image("old", 0.0, time.monotonic() - 5.0)  # arrived 5 s ago, max age 0.5 s
        job, answers, _ = one_shot(sched, "r1", timeout=0.3)
        assert wait_for(lambda: answers, 5)
        assert rec.runs == []
        assert answers[0][0] == "error" and "timed out after" in answers[0][2]
        assert "max_input_age_s=0.50" in answers[0][2]
    finally:
        sched.stop()


def test_waits_for_next_frame_within_timeout():
    frames, rec, sched = make()
    try:
        job, answers, _ = one_shot(sched, "r1", timeout=3.0)
        time.sleep(0.2)
        assert answers == []
        seq = frames.add_image("new", 0.0, time.monotonic())
        sched.notify_frame()
        assert wait_for(lambda: answers, 5)
        assert answers == [("ok", "r1", seq)]
    finally:
        sched.stop()


def test_inactive_refuses_and_deactivation_answers_queued_requests():
    frames, rec, sched = make(active=False)
    try:
        _, _, refusal = one_shot(sched, "r0")
        assert refusal and "not active" in refusal
        sched.set_active(True)
        job, answers, _ = one_shot(sched, "r1", timeout=10.0)
        sched.set_active(False, "node was deactivated")
        assert answers and answers[0][0] == "error" and answers[0][2] == "node was deactivated"
    finally:
        sched.stop()


def test_queue_limit_refuses_with_reason():
    frames, rec, sched = make()
    sched.max_pending = 2
    try:
        refusals = [one_shot(sched, f"r{k}", timeout=10.0)[2] for k in range(3)]
        assert refusals[:2] == [None, None]
        assert "too many pending requests (2)" in refusals[2]
    finally:
        sched.stop()


def test_continuous_mode_rate_limit_new_frames_only_and_stop():
    frames, rec, sched = make()
    sched.max_rate_hz = 5.0
    with camera(frames, sched, period_s=0.01):  # 100 Hz camera
        sched.set_continuous("find things")
        time.sleep(1.5)
        sched.set_continuous(None)
        n_stopped = len(rec.runs)
        time.sleep(0.5)
        assert len(rec.runs) == n_stopped  # stopped
        # 1.5 s at most 5 Hz: 7 or 8 runs at most (the first runs at once); it repeated (a loose
        # lower bound: how many fit in 1.5 s depends on the machine's load)
        assert 2 <= n_stopped <= 8, rec.runs
        seqs = [s for _, s in rec.runs]
        assert seqs == sorted(set(seqs))  # never the same frame twice
        assert all(rid.startswith("continuous-") for rid, _ in rec.runs)


def test_continuous_mode_does_not_rerun_an_unchanged_frame():
    frames, rec, sched = make()
    sched.max_rate_hz = 0.0  # as fast as possible
    try:
        frames.add_image("img", 0.0, time.monotonic())
        sched.set_continuous("x")
        assert wait_for(lambda: rec.runs, 5)
        time.sleep(0.3)  # nothing more comes
        assert len(rec.runs) == 1
    finally:
        sched.stop()


def test_continuous_command_published_again_changes_nothing():
    """Planners re-publish their goal at a fixed rate: the same command again neither re-runs the
    frame already seen nor bypasses max_rate_hz; a new command runs the latest frame (as soon as
    max_rate_hz allows: see test_alternating_continuous_commands_stay_within_max_rate_hz)."""
    frames, rec, sched = make()
    sched.max_rate_hz = 1.0
    sched.max_input_age_s = 100.0
    try:
        frames.add_image("img", 0.0, time.monotonic())  # one frame, never a new one
        for _ in range(10):
            sched.set_continuous("the red mug")
            time.sleep(0.05)
        assert wait_for(lambda: len(rec.runs) >= 1)
        time.sleep(0.2)
        assert [seq for _, seq in rec.runs] == [1]
        sched.set_continuous("the blue cube")
        assert wait_for(lambda: len(rec.runs) == 2)
    finally:
        sched.stop()


class InferenceClockDouble:
    """A clock the test moves; counts the inference thread's reads (it reads it to plan)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.planned = 0

    def __call__(self) -> float:
        if threading.current_thread().name == "qwen3vl_seg_inference":
            self.planned += 1
        return self.now


def test_alternating_continuous_commands_stay_within_max_rate_hz():
    """Two publishers alternating goals (a planner and a teleop panel): a change lets the new
    command run on the frame the old one saw, at once when the rate allows, but it must not
    restart the rate limit, or the model runs back to back past max_rate_hz."""
    clock, frames, runs = InferenceClockDouble(), RgbdSynchronizer(use_depth=False), []
    sched = Scheduler(frames, lambda job, frame: runs.append((job.command, frame.seq)), lambda job, r: None,
                      clock=clock)
    sched.max_rate_hz, sched.max_input_age_s = 1.0, 100.0

    def change_and_plan(command: str) -> None:
        with sched._cv:  # a plan counted after this one saw the new command
            planned = clock.planned
            sched.set_continuous(command)
        assert wait_for(lambda: clock.planned > planned, 5)
        with sched._cv:  # that plan (and any run it picked) is decided
            pass

    sched.start()
    sched.set_active(True)
    try:
        frames.add_image("img", 0.0, 0.0)  # one frame, never a new one
        change_and_plan("the red mug")
        assert wait_for(lambda: len(runs) == 1, 5)  # a first command runs at once
        for k in range(1, 10):  # every 0.1 s of the 1 s period, the other goal
            clock.now = k / 10
            change_and_plan("the blue cube" if k % 2 else "the red mug")
        assert runs == [("the red mug", 1)]  # every plan so far is decided, and none ran
        clock.now = 1.0  # the period has passed: the current goal runs, once
        sched.notify_frame()
        assert wait_for(lambda: len(runs) >= 2, 5)
        clock.now = 5.0  # long after: a new command runs at once, on the frame already seen
        change_and_plan("the green ball")
        assert wait_for(lambda: len(runs) >= 3, 5)
    finally:
        sched.stop()
    assert runs == [("the red mug", 1), ("the blue cube", 1), ("the green ball", 1)]


class PairingCounterFrames(RgbdSynchronizer):
    """The frame store, counting how often the scheduler pairs frames (``latest``)."""

    pairings = 0

    def latest(self, now: float):
        self.pairings += 1
        return super().latest(now)


def test_frame_notifications_pair_nothing_while_there_is_nothing_to_run():
    """No request, no continuous command: a frame notification must not pair frames (with
    sync_queue_size 1000 that held the lock and burnt a core while idle). A request still runs."""
    clock, frames, rec = InferenceClockDouble(), PairingCounterFrames(use_depth=False), ModelRecorderDouble()
    sched = Scheduler(frames, rec.run, rec.fail, clock=clock)
    sched.start()
    sched.set_active(True)
    try:
        frames.add_image("img", 0.0, 0.0)
        for _ in range(3):
            with sched._cv:  # what notify_frame does, noting the plans before it
                planned = clock.planned
                sched._cv.notify_all()
            assert wait_for(lambda planned=planned: clock.planned > planned, 5)  # the loop planned after it
        with sched._cv:  # and that plan is over
            assert frames.pairings == 0
        answers: list = []
        assert sched.submit(Job("cmd", "r1", 0.0, deadline=100.0, reply=answers.append)) is None
        assert wait_for(lambda: answers, 5) and answers == [("ok", "r1", 1)]
    finally:
        sched.stop()


def test_a_rate_raised_at_runtime_applies_at_once():
    """From one run per 50 s to 10 Hz: the next run follows the new rate, not the old period."""
    frames, rec, sched = make()
    sched.max_rate_hz = 0.02
    sched.max_input_age_s = 100.0
    with camera(frames, sched, period_s=0.05):
        sched.set_continuous("c")
        assert wait_for(lambda: len(rec.runs) == 1)
        time.sleep(0.3)
        assert len(rec.runs) == 1  # the old rate: nothing more for 50 s
        sched.max_rate_hz = 10.0
        sched.notify_frame()
        assert wait_for(lambda: len(rec.runs) >= 4, 5.0), rec.runs


def test_a_huge_timeout_does_not_stop_the_watchdog():
    """timeout_s is any positive float32: 1e10 s is past threading's longest wait. The watchdog
    must survive it and still answer a later request at its own deadline while the model is busy."""
    frames, rec, gate = RgbdSynchronizer(use_depth=False), ModelRecorderDouble(), threading.Event()

    def busy_run(job, frame):
        gate.wait(5.0)  # the model is busy until the test lets it go
        return rec.run(job, frame)

    sched = Scheduler(frames, busy_run, rec.fail)
    sched.start()
    sched.set_active(True)
    try:
        frames.add_image("img", 0.0, time.monotonic())
        now = time.monotonic()
        huge = []
        assert sched.submit(Job("cmd", "huge", now, deadline=now + 1e10, reply=huge.append)) is None
        assert wait_for(lambda: sched._busy_job is not None)
        _, answers, refusal = one_shot(sched, "short", timeout=0.3)
        assert refusal is None
        assert wait_for(lambda: len(answers) == 1, timeout=2.0)
        assert answers[0][0] == "error" and "timed out" in answers[0][2]
        assert sched._watchdog.is_alive()
        gate.set()
        assert wait_for(lambda: len(huge) == 1) and huge[0][0] == "ok"
    finally:
        gate.set()
        sched.stop()


def test_one_shot_has_priority_over_continuous():
    frames, rec, sched = make(delay=0.05)
    sched.max_rate_hz = 0.0
    try:
        sched.set_continuous("c")
        for _ in range(3):
            frames.add_image("img", 0.0, time.monotonic())
            sched.notify_frame()
            time.sleep(0.01)
        job, answers, _ = one_shot(sched, "r1", timeout=5.0)
        with rec.lock:
            done = len(rec.runs)  # runs finished by now; at most one more was in progress
        frames.add_image("img", 0.0, time.monotonic())  # a new frame continuous mode would take
        sched.notify_frame()
        assert wait_for(lambda: answers, 5)
        first_oneshot = next(k for k, (rid, _) in enumerate(rec.runs) if rid == "r1")
        # only the continuous run in progress when it arrived may come before it
        assert first_oneshot <= done + 1, rec.runs
    finally:
        sched.stop()


def test_exception_in_run_still_answers():
    frames = RgbdSynchronizer(use_depth=False)
    failures = []

    def run(job, frame):
        raise ValueError("boom")

    def fail(job, reason):
        failures.append(reason)
        return ("error", reason)

    sched = Scheduler(frames, run, fail)
    sched.start()
    sched.set_active(True)
    try:
        frames.add_image("img", 0.0, time.monotonic())
        answers = []
        now = time.monotonic()
        sched.submit(Job("c", "r", now, now + 2, reply=answers.append))
        assert wait_for(lambda: answers, 5)
        assert answers == [("error", "internal error: ValueError: boom")]
    finally:
        sched.stop()


def test_stop_answers_pending_requests():
    frames, rec, sched = make()
    job, answers, _ = one_shot(sched, "r1", timeout=30.0)
    sched.stop("shutting down")
    assert answers and answers[0][2] == "shutting down"


def test_stop_with_a_continuous_run_in_the_model_ends_both_threads_in_one_timeout():
    """No caller waits for a continuous run: stop answers it with an ERROR once, and the watchdog
    ends with it, so stop() blocks for its timeout once, not twice (launch's SIGTERM grace)."""
    frames, rec, sched = make(delay=3.0)
    sched.max_rate_hz = 0.0
    frames.add_image("img", 0.0, time.monotonic())
    sched.set_continuous("red")
    assert wait_for(lambda: sched._busy_job is not None, 5)
    watchdog = sched._watchdog
    sched.stop("cleaned up", timeout=0.3)
    assert not watchdog.is_alive()  # joined within stop's timeout
    failures = [f for f in rec.failures if f[0] == "continuous-1"]
    assert len(failures) == 1 and "cleaned up" in failures[0][1]
    assert sched._busy_job.answered  # its late result will say so


def test_a_request_timing_out_behind_a_warm_up_is_told_so():
    """A warm-up for a new frame size holds the inference thread: a request that times out behind
    it on a fresh frame must not be sent off to debug its camera."""
    frames, rec, sched = make()
    release = threading.Event()
    sched.run_soon(lambda: release.wait(5))
    try:
        frames.add_image("img", 0.0, time.monotonic())
        _, answers, refusal = one_shot(sched, "r1", timeout=0.3)
        assert refusal is None
        assert wait_for(lambda: answers, 3)
        reason = rec.failures[0][1]
        assert "warming up for a new frame size" in reason and "synchronized frame" not in reason, reason
    finally:
        release.set()
        sched.stop()


class ReleaseHookCondition(threading.Condition):
    """The scheduler's lock, calling ``hook`` each time the inference thread leaves a ``with``
    block on it, from its first idle wait on (so the count does not depend on how far the
    thread got at start). The lock is free then: the hook does what an executor callback could
    do at that instant (a race forced, not waited for)."""

    def __init__(self, hook: Callable[[], None]) -> None:
        super().__init__()
        self.hook: Callable[[], None] | None = hook
        self._idle_seen = False

    @staticmethod
    def _on_inference_thread() -> bool:
        return threading.current_thread().name == "qwen3vl_seg_inference"

    def wait(self, timeout: float | None = None) -> bool:
        if self._on_inference_thread():
            self._idle_seen = True
        return super().wait(timeout)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        hook = self.hook
        if hook is not None and self._idle_seen and self._on_inference_thread():
            hook()


@pytest.mark.parametrize("release", [1, 2, 3])
def test_a_warm_up_queued_before_a_request_runs_first_wherever_the_loop_is(release):
    """node._on_image queues the warm-up for a new frame size before the frame is stored and a
    request can take it: the warm-up must run first, whichever lock release of the inference
    thread the three arrive at (between "no chore" and "plan", the request overtook it)."""
    frames = RgbdSynchronizer(use_depth=False)
    order: list[str] = []
    sched = Scheduler(frames, lambda job, frame: order.append(f"run {job.request_id}"), lambda job, r: None)
    releases, arrived = [], threading.Event()

    def arrive() -> None:  # what the executor does for a frame of a new size, then a request
        releases.append(1)
        if len(releases) < release:
            return
        cv.hook = None  # once (the calls below take the lock too)
        sched.run_soon(lambda: order.append("warm-up"))
        frames.add_image("img", 0.0, time.monotonic())
        sched.notify_frame()
        one_shot(sched, "r1", timeout=30.0)
        arrived.set()

    sched._cv = cv = ReleaseHookCondition(arrive)  # before the threads start
    sched.start()
    sched.set_active(True)
    try:
        # wake the idle loop until it has released the lock `release` times
        assert wait_for(lambda: (sched.notify_frame(), arrived.is_set())[1], 10)
        assert wait_for(lambda: len(order) == 2, 10)
        assert order == ["warm-up", "run r1"]
    finally:
        cv.hook = None
        sched.stop()

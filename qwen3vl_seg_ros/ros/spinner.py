"""An executor spun on a background thread that can be stopped and joined.

``threading.Thread(target=executor.spin, daemon=True)`` is the usual pattern, and it is not
safe at process exit: ``Executor.shutdown()`` destroys its guard condition without waiting for
the spinning thread, so that thread may still sit in rclpy's C++ wait when Python finalises,
and the finaliser's forced unwind through C++ aborts the process ("terminate called without an
active exception", exit code -6). Here the thread runs its own ``spin_once`` loop, and
:meth:`BackgroundSpinner.stop` ends and joins it before the executor is shut down.

The loop also survives a race inside rclpy (ros2/rclpy#1206): when one thread destroys a
subscription while the executor's thread builds its wait set, the subscription's QoS event
handler may already be marked for destruction when it is added, and ``spin_once`` raises
``InvalidHandle`` from ``_wait_for_ready_callbacks``. The node destroys its input
subscriptions on every lifecycle deactivation, so under load this ended the executor (a
test of deactivate/activate cycles under load lost the node in about 3 runs of 45). Such a wait is
simply built again: the destroyed entity has already left the node's lists.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

from rclpy.exceptions import InvalidHandle
from rclpy.executors import Executor, ExternalShutdownException

POLL_S = 0.1  # how long stop() may wait for the thread to notice
# Waits in a row that may fail on a destroyed entity before it counts as an error: one
# destruction spoils at most a wait or two, so a long run means an entity that never leaves.
MAX_STALE_WAITS = 50


def raised_while_building_the_wait(exc: BaseException) -> bool:
    """True for an InvalidHandle raised while rclpy gathered its wait set (the #1206 race),
    not by a callback: a callback's error stays an error."""
    if not isinstance(exc, InvalidHandle):
        return False
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_wait_for_ready_callbacks":
            return True
        tb = tb.tb_next
    return False


class BackgroundSpinner:
    """Spins ``executor`` on a daemon thread until :meth:`stop`.

    ``on_error`` gets an exception raised by a callback or the wait, and the loop ends; a
    shut-down context ends the loop quietly. Without ``on_error``, errors end it silently too.
    A wait spoiled by an entity destroyed meanwhile is retried and counted in
    :attr:`stale_waits`.
    """

    def __init__(self, executor: Executor, name: str = "executor",
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.executor = executor
        self._on_error = on_error
        self._running = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.stale_waits = 0  # waits retried after the rclpy#1206 race (see the module docstring)

    def start(self) -> BackgroundSpinner:
        self._running.set()
        self._thread.start()
        return self

    @property
    def done(self) -> threading.Event:
        """Set when the loop has ended, by stop() or on its own (context shut down, error)."""
        return self._done

    def _loop(self) -> None:
        in_a_row = 0
        try:
            while self._running.is_set() and self.executor.context.ok():
                try:
                    self.executor.spin_once(timeout_sec=POLL_S)
                    in_a_row = 0
                except InvalidHandle as exc:
                    if not raised_while_building_the_wait(exc) or in_a_row >= MAX_STALE_WAITS:
                        raise
                    in_a_row += 1
                    self.stale_waits += 1
        except ExternalShutdownException:
            pass
        except Exception as exc:  # handed to on_error (the node logs it as fatal)
            # an error raised because the context went away mid-wait is a shutdown, not a failure
            if self._running.is_set() and self.executor.context.ok() and self._on_error is not None:
                self._on_error(exc)
        finally:
            self._done.set()

    def stop(self, timeout: float = 5.0, shutdown_timeout: float = 2.0) -> bool:
        """Ends the loop, joins the thread, then shuts the executor down (waiting for callbacks
        still running in a thread pool). False when the thread did not end within ``timeout``."""
        self._running.clear()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        joined = not self._thread.is_alive()
        self._wait_for_handlers(shutdown_timeout)
        self.executor.shutdown(timeout_sec=shutdown_timeout)
        return joined

    def _wait_for_handlers(self, timeout: float) -> None:
        """Lets callbacks still running in a MultiThreadedExecutor's pool finish first.

        ``Executor.shutdown()`` destroys the executor's guard condition without waiting for them
        (the race of ros2/rclpy#968), and each one ends by triggering that guard condition: it
        then fails with InvalidHandle, printed at exit as "The following exception was never
        retrieved: cannot use Destroyable...". rclpy keeps those tasks in ``_futures``; a
        SingleThreadedExecutor runs callbacks on the (now joined) spinning thread and has none.
        """
        pending = list(getattr(self.executor, "_futures", ()))
        deadline = time.monotonic() + timeout
        for task in pending:
            while not task.done() and time.monotonic() < deadline:
                time.sleep(0.005)

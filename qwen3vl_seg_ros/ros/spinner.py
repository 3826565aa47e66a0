"""An executor spun on a background thread that can be stopped and joined.

``threading.Thread(target=executor.spin, daemon=True)`` is the usual pattern, and it is not
safe at process exit: ``Executor.shutdown()`` destroys its guard condition without waiting for
the spinning thread, so that thread may still sit in rclpy's C++ wait when Python finalises,
and the finaliser's forced unwind through C++ aborts the process ("terminate called without an
active exception", exit code -6). Here the thread runs its own ``spin_once`` loop, and
:meth:`BackgroundSpinner.stop` ends and joins it before the executor is shut down.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from rclpy.executors import Executor, ExternalShutdownException

POLL_S = 0.1  # how long stop() may wait for the thread to notice


class BackgroundSpinner:
    """Spins ``executor`` on a daemon thread until :meth:`stop`.

    ``on_error`` gets an exception raised by a callback or the wait, and the loop ends; a
    shut-down context ends the loop quietly. Without ``on_error``, errors end it silently too,
    as a test harness wants.
    """

    def __init__(self, executor: Executor, name: str = "executor",
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.executor = executor
        self._on_error = on_error
        self._running = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> BackgroundSpinner:
        self._running.set()
        self._thread.start()
        return self

    @property
    def done(self) -> threading.Event:
        """Set when the loop has ended, by stop() or on its own (context shut down, error)."""
        return self._done

    def _loop(self) -> None:
        try:
            while self._running.is_set() and self.executor.context.ok():
                self.executor.spin_once(timeout_sec=POLL_S)
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

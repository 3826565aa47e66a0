"""Shared test setup: an isolated ROS domain per test run, no stale Fast DDS files, a hard
limit on a hung test, and the test double's import path."""

from __future__ import annotations

import faulthandler
import gc
import os
import random
import sys
from pathlib import Path

import pytest

from qwen3vl_seg_ros.ros.dds_shm import clean_before_start, unfinished_ports

TEST_DIR = Path(__file__).resolve().parent
HANG_REPORT = TEST_DIR.parent / "log" / "pytest_hang.txt"
# pytest-timeout (300 s, pyproject.toml) works by a signal that Python handles between bytecodes;
# a test stuck inside C code (a DDS participant that never finishes starting) never gets there.
# faulthandler's watchdog is a C thread: past this limit it writes every thread's stack to
# HANG_REPORT and ends the run, which scripts/run_tests.sh then prints.
HARD_LIMIT_S = float(os.environ.get("QWEN3VL_SEG_TEST_HARD_LIMIT_S", "600"))

# Each pytest run gets its own DDS domain so that runs side by side never see each other's
# topics. A random draw alone gave two overlapping runs the same domain about one time in a
# hundred, and then each answered the other's requests: a run claims its domain with a lock file
# held for its lifetime (the OS releases it when the process ends, however it ends). Set before
# anything imports rclpy; subprocesses started by tests inherit it.
_DOMAIN_LOCK = None


def _claim_domain() -> str:
    global _DOMAIN_LOCK
    import fcntl
    import tempfile

    domains = list(range(1, 101))  # 0-101 is the range ROS 2 documents as safe on Linux
    random.SystemRandom().shuffle(domains)
    for domain in domains:
        lock = open(Path(tempfile.gettempdir()) / f"qwen3vl_seg_test_domain_{domain}.lock", "w")  # noqa: SIM115
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        _DOMAIN_LOCK = lock
        return str(domain)
    return str(domains[0])  # a hundred runs at once: share one rather than not run


if "QWEN3VL_SEG_TEST_DOMAIN" not in os.environ:
    os.environ["QWEN3VL_SEG_TEST_DOMAIN"] = _claim_domain()
os.environ["ROS_DOMAIN_ID"] = os.environ["QWEN3VL_SEG_TEST_DOMAIN"]
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

# Fast DDS files left in /dev/shm by killed processes can hang every new participant, whatever
# the domain (a CI run once hung 90 minutes on one); see qwen3vl_seg_ros/ros/dds_shm.py.
_SHM_CLEANUP: list[str] = []
clean_before_start(log=_SHM_CLEANUP.append)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return _SHM_CLEANUP

# The test double (test/doubles/) is importable as `doubles.<module>` in tests and in node
# subprocesses started by tests.
if str(TEST_DIR) not in sys.path:
    sys.path.insert(0, str(TEST_DIR))
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(TEST_DIR), os.environ.get("PYTHONPATH", "")) if p
)


def pytest_collection_finish(session: object) -> None:
    """Moves everything imported while collecting (torch, transformers, every test module) out of
    the garbage collector's reach.

    Why: the ROS tests run the node in this process. With the whole suite collected, full
    collections walk that large heap while holding the GIL, and the node's threads stall for
    hundreds of milliseconds: the colour-blob double's 20 ms answers took up to 1.1 s, and
    ``test_faults.py::test_deactivate_and_activate_under_load`` failed 5 of 8 runs of
    ``pytest test -k deactivate_and_activate``, 0 of 5 with the heap frozen. (Its "lifecycle call
    unanswered in 10 s" failures were later traced to a different cause, an executor killed by
    rclpy#1206; see ``qwen3vl_seg_ros/ros/spinner.py``.) Objects made later are collected as
    usual. A launched node does not need this: serving the shipped model for 90 s (874 calls)
    ran no full collection at all, while one costs about 170 ms over its 400,000 objects.
    """
    gc.collect()
    gc.freeze()


_hang_report = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Arms the hard limit for one test (setup, call and teardown)."""
    global _hang_report
    if _hang_report is None:
        HANG_REPORT.parent.mkdir(exist_ok=True)
        _hang_report = open(HANG_REPORT, "w")  # noqa: SIM115 (kept open: faulthandler writes to it)
    _hang_report.seek(0)
    _hang_report.truncate()
    _hang_report.write(f"{item.nodeid} ran past {HARD_LIMIT_S} s; the stacks of all threads:\n")
    _hang_report.flush()
    if unfinished_ports():  # a process killed by an earlier test mid-start may have left one
        clean_before_start(log=lambda line: print(line, file=sys.stderr))
    faulthandler.dump_traceback_later(HARD_LIMIT_S, exit=True, file=_hang_report)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run that ends normally leaves no hang report behind."""
    if _hang_report is not None:
        _hang_report.close()
        HANG_REPORT.unlink(missing_ok=True)

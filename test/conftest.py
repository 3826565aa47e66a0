"""Shared test setup: an isolated ROS domain per test run, and the test double's import path."""

from __future__ import annotations

import gc
import os
import random
import sys
from pathlib import Path

TEST_DIR = Path(__file__).resolve().parent

# Each pytest run gets its own DDS domain so that runs side by side never see each other's
# topics. Set before anything imports rclpy; subprocesses started by tests inherit it.
if "QWEN3VL_SEG_TEST_DOMAIN" not in os.environ:
    os.environ["QWEN3VL_SEG_TEST_DOMAIN"] = str(random.SystemRandom().randint(1, 100))
os.environ["ROS_DOMAIN_ID"] = os.environ["QWEN3VL_SEG_TEST_DOMAIN"]
os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

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

"""Shared test setup: an isolated ROS domain per test run, and the test double's import path."""

from __future__ import annotations

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

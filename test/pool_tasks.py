"""Tasks for the process-pool tests, in a module of their own: each spawned worker imports it,
and this one imports nothing heavy (the test modules import torch)."""

from __future__ import annotations

import os


def no_setup() -> None:
    """The process pool's initializer in test_evaluate.py."""


def square_or_die(task: int) -> int:
    """A task run in a spawned worker: task 2 ends its process as a kill or a crash would."""
    if task == 2:
        os._exit(3)
    return task * task


def square_or_fail(task: int) -> int:
    if task == 2:
        raise ValueError("task 2 is bad")
    return task * task

"""Small test utilities with no ROS imports."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import select
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
#: The shipped tiny model (tests that need it skip while it is missing).
SHIPPED_MODEL = REPO / "models" / "tiny_qwen3vl_seg"


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, period: float = 0.01) -> bool:
    """Polls ``predicate`` until it holds or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period)
    return bool(predicate())


@contextlib.contextmanager
def repeating(action: Callable[[], None], period_s: float) -> Iterator[None]:
    """Runs ``action`` every ``period_s`` on a thread while the block runs (a camera, say)."""
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            action()
            stop.wait(period_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def udp_only_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a DDS process that a test kills or freezes (SIGKILL, SIGSTOP) mid-traffic.

    Why: Fast DDS's shared-memory transport has each writer lock the reader's port, a mutex in
    memory shared between the processes. A reader stopped or killed while it holds that lock
    leaves it held, and a writer in the test process then blocks in C with the GIL held: the
    whole pytest process freezes, deaf to pytest-timeout, until the hard limit ends the run (and
    a frozen reader is only resumed by the test process itself). Over UDP there is no shared lock.
    Such a process talks to the test process (localhost discovery, shared memory) over UDP only:
    ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST makes rmw_fastrtps add shared memory whatever
    FASTDDS_BUILTIN_TRANSPORTS says, so the process uses SUBNET discovery with UDPv4 only; the
    test process still finds it through its unicast localhost discovery. The test's own domain
    (test/conftest.py) keeps it apart from anything else on the network.
    """
    return {**env, "ROS_AUTOMATIC_DISCOVERY_RANGE": "SUBNET", "FASTDDS_BUILTIN_TRANSPORTS": "UDPv4"}


def fastdds_shm_mapped(pid: int) -> list[str]:
    """The Fast DDS shared-memory files process ``pid`` has mapped (none for a UDP-only one)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({line.split()[-1] for line in maps.splitlines() if "/dev/shm/fastdds" in line})


def read_line(proc: subprocess.Popen, timeout: float) -> str | None:
    """The next line ``proc`` prints (stdout a text pipe), or None after ``timeout`` s: a
    subprocess stuck while starting (as one once was, in Fast DDS) must fail a test, not hold it."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else None


@functools.cache
def load_bench(name: str) -> ModuleType:
    """The script ``bench/<name>.py`` as a module (the bench folder is not a package), loaded once."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def byte_level_tokenizer(texts: list[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer (Qwen's kind) trained on ``texts`` with few merges, so that
    accented and CJK characters split over tokens; it has no special tokens of its own (no
    <|seg|>, as a plain Qwen3-VL-Instruct tokenizer has none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts) * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)

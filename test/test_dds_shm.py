"""Stale Fast DDS shared-memory files (qwen3vl_seg_ros/ros/dds_shm.py).

The rule on files in a scratch folder, then the failure it exists for, in a private /dev/shm
(test/shm_hang_driver.py): a zero-size port file left by a killed process hangs a new
participant until it is removed.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen3vl_seg_ros.ros import dds_shm

from helpers import REPO


def make(path: Path, size: int = 0) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_only_files_that_no_process_holds_are_stale(tmp_path):
    zombie_port = make(tmp_path / "fastdds_port7003")  # 0 bytes: its creator died mid-way
    zombie_mutex = make(tmp_path / "sem.fastdds_port7003_mutex", 32)
    zombie_lock = make(tmp_path / "fastdds_port7001_el")
    open_lock = make(tmp_path / "fastdds_port7002_el")
    live_mutex = make(tmp_path / "sem.fastdds_port7002_mutex", 32)  # unheld, but its port's lock is
    mapped = make(tmp_path / "fastdds_0123456789abcdef", 4096)
    not_ours = make(tmp_path / "lttng-ust-wait-6", 16)
    with open(open_lock, "rb"), open(mapped, "r+b") as f:
        view = mmap.mmap(f.fileno(), 4096)
        f.close()  # mapped, no longer open: still held
        try:
            stale = dds_shm.stale_files(tmp_path)
            assert dds_shm.unfinished_ports(tmp_path) == [zombie_port]
            assert stale == sorted([zombie_port, zombie_mutex, zombie_lock])
            assert dds_shm.main(["--dry-run", "--shm-dir", str(tmp_path)]) == 0
            assert all(p.exists() for p in stale)  # a dry run removes nothing
            assert dds_shm.remove_stale_files(tmp_path) == stale
        finally:
            view.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (open_lock, live_mutex, mapped,
                                                                                   not_ours))
    # once nothing holds them, the lock, its port's mutex and the segment are stale too
    assert dds_shm.remove_stale_files(tmp_path) == sorted([mapped, open_lock, live_mutex])
    assert [p.name for p in tmp_path.iterdir()] == [not_ours.name]


def test_a_process_that_cannot_be_inspected(tmp_path, monkeypatch):
    """On a made-up /proc: a process whose maps are unreadable but that holds no Fast DDS file
    open is no participant and is passed over; one that may hold our files unseen leaves only
    the hazard to remove, port files of 0 bytes old enough that no creator is filling them."""
    shm, proc = tmp_path / "shm", tmp_path / "proc"
    shm.mkdir()
    old_port = make(shm / "fastdds_port7003")
    os.utime(old_port, (time.time() - 60, time.time() - 60))
    new_port = make(shm / "fastdds_port7004")  # 0 bytes, but its creator may be filling it now
    segment = make(shm / "fastdds_0123456789abcdef", 64)
    lock = make(shm / "fastdds_port7002_el")
    for pid, opened in ((100, ["/dev/null"]), (101, [lock]), (102, [])):
        (proc / str(pid) / "fd").mkdir(parents=True)
        for k, target in enumerate(opened):
            (proc / str(pid) / "fd" / str(k)).symlink_to(target)
        (proc / str(pid) / "maps").write_text("")
    hidden: dict[str, set[str]] = {"maps": set(), "fd": set()}
    real_mapped, real_open = dds_shm._mapped_paths, dds_shm._open_paths

    def guarded(real, kind):
        def read(path: Path):
            if path.parent.name in hidden[kind]:
                raise PermissionError(path)
            return real(path)
        return read

    monkeypatch.setattr(dds_shm, "_mapped_paths", guarded(real_mapped, "maps"))
    monkeypatch.setattr(dds_shm, "_open_paths", guarded(real_open, "fd"))
    found = dds_shm.scan(shm, proc)
    assert (found.stale, found.unsure, found.uninspectable) == ([segment, old_port, new_port], [], [])
    hidden["maps"] = {"100"}  # no Fast DDS file open: no participant
    assert dds_shm.scan(shm, proc) == found
    hidden["maps"] = {"100", "101"}  # holds a lock open: a participant whose maps we cannot see
    found = dds_shm.scan(shm, proc)
    assert (found.stale, found.unsure, found.uninspectable) == ([old_port], [segment, new_port], [101])
    hidden["maps"], hidden["fd"] = set(), {"102"}
    found = dds_shm.scan(shm, proc)
    assert (found.stale, found.unsure, found.uninspectable) == ([old_port], [segment, new_port], [102])
    # a participant stuck opening the old empty port holds it open: it goes all the same (the
    # next participant must not meet it), while a young one, perhaps being filled, stays
    hidden["fd"] = set()
    for k, port in enumerate((old_port, new_port), start=1):
        (proc / "100" / "fd" / str(k)).symlink_to(port)
    found = dds_shm.scan(shm, proc)
    assert (found.stale, found.unsure, found.uninspectable) == ([segment, old_port], [], [])
    hidden["fd"] = {"102"}
    assert dds_shm.remove_stale_files(shm, proc) == [old_port]
    assert sorted(shm.iterdir()) == [segment, lock, new_port]


def test_the_startup_cleanup_and_how_to_turn_it_off(tmp_path, monkeypatch):
    assert dds_shm.uses_fastdds({})
    assert dds_shm.uses_fastdds({"RMW_IMPLEMENTATION": "rmw_fastrtps_dynamic_cpp"})
    assert not dds_shm.uses_fastdds({"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"})
    monkeypatch.setattr(dds_shm, "SHM_DIR", tmp_path)
    zombie = make(tmp_path / "fastdds_port7003")
    lines: list[str] = []
    for env in ({"QWEN3VL_SEG_DDS_SHM_CLEANUP": "0"}, {"RMW_IMPLEMENTATION": "rmw_cyclonedds_cpp"}):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            assert dds_shm.clean_before_start(lines.append) == []
    assert zombie.exists() and lines == []
    monkeypatch.delenv("RMW_IMPLEMENTATION", raising=False)
    assert dds_shm.clean_before_start(lines.append) == [zombie]
    assert not zombie.exists() and len(lines) == 1 and "removed 1 stale Fast DDS" in lines[0]


# ---------------------------------------------------------------------------------------------
# the failure, in a private /dev/shm
# ---------------------------------------------------------------------------------------------
PRIVATE_SHM = ["unshare", "-rm", "--fork", "sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$0" "$@"']


def private_shm_available() -> bool:
    """Whether this machine lets an unprivileged process mount its own /dev/shm (user and mount
    namespaces; some distributions restrict them)."""
    try:
        return subprocess.run([*PRIVATE_SHM, "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.ros
@pytest.mark.skipif(not dds_shm.uses_fastdds(), reason="the hang is Fast DDS's")
def test_a_zero_size_port_file_hangs_a_new_participant_until_it_is_removed():
    """In a private /dev/shm (zero-size port files in the real one would also hang every other
    process that starts a participant meanwhile, for good): the probe gets stuck holding a
    planted file open, SIGTERM does not end it, the cleanup removes every planted file although
    the stuck probe holds one, and a new probe then starts."""
    if not private_shm_available():
        pytest.skip("this machine does not allow `unshare -rm` (a private /dev/shm for the probe)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([*PRIVATE_SHM, sys.executable, str(REPO / "test" / "shm_hang_driver.py")],
                         capture_output=True, text=True, timeout=180, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["private_shm_empty_at_start"]
    assert report["stuck_printed"] is None, report  # never finished creating its node
    assert report["stuck_waits_on"], report  # ... because it holds a planted file open
    assert report["stuck_survived_sigterm"], report
    assert report["planted_removed"] == report["planted"] == 300, report
    assert report["fresh_printed"] == "created", report
    assert report["stuck_still_stuck"], report  # the cleanup cannot rescue it; only kill -9 ends it

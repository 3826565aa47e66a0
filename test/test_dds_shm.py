"""Stale Fast DDS shared-memory files (qwen3vl_seg_ros/ros/dds_shm.py).

The rule on files in a scratch folder, then the failure it exists for, on the real /dev/shm:
a zero-size port file left by a killed process hangs a new participant until it is removed.
"""

from __future__ import annotations

import mmap
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen3vl_seg_ros.ros import dds_shm


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
# the failure, on the real /dev/shm
# ---------------------------------------------------------------------------------------------
PROBE = """
import os, rclpy
rclpy.init()
node = rclpy.create_node("shm_probe")  # kept: the participant lives as long as a node does
own = []
for fd in os.listdir("/proc/self/fd"):
    try:
        own.append(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:  # the listing's own descriptor, closed by now
        pass
print("created", *sorted(p for p in own if p.startswith("/dev/shm/fastdds_port7")), flush=True)
"""


def start_probe() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, text=True, env=dict(os.environ))


def printed(proc: subprocess.Popen, timeout: float) -> str | None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else None


def held_by(pid: int) -> set[str]:
    return set(dds_shm._open_paths(Path(f"/proc/{pid}/fd")))


def plant_zero_size_ports() -> list[Path]:
    """0-byte files, dated a minute back like leftovers, at every port from 7000 to 7299 without
    a live owner (one holds the port's ``_el`` lock open; a process that only sends to a port maps
    it too, so a port whose owner died can still be held). A new participant starts looking at
    7000 + its participant id and takes the first port it can own."""
    dds_shm.remove_stale_files()
    held = dds_shm.held_files().paths
    planted = []
    for n in range(7000, 7300):
        path = dds_shm.SHM_DIR / f"fastdds_port{n}"
        if f"{path}_el" in held:
            continue
        path.unlink(missing_ok=True)  # an orphan still mapped by a sender: its mappings stay valid
        make(path)
        os.utime(path, (time.time() - 60, time.time() - 60))
        planted.append(path)
    return planted


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()  # SIGKILL: a participant stuck in Fast DDS ignores SIGTERM
        proc.wait()


@pytest.mark.ros
@pytest.mark.skipif(not dds_shm.uses_fastdds() or not dds_shm.SHM_DIR.is_dir(), reason="needs Fast DDS on /dev/shm")
def test_a_zero_size_port_file_hangs_a_new_participant_until_it_is_removed():
    """The probe gets stuck holding a planted file open; after the cleanup a new probe starts.
    The files stay a few seconds at most (the suite's start removes any left). A port whose
    owner exits between the planting and the probe's start lets the probe start on it: then
    the attempt is repeated, and a probe that started on a planted file fails the test."""
    planted: list[Path] = []
    probes: list[subprocess.Popen] = []
    try:
        for _attempt in range(3):
            planted = plant_zero_size_ports()
            stuck = start_probe()
            probes.append(stuck)
            line = printed(stuck, 15.0)
            if line is None:
                break
            own = set(line.split()[1:])
            assert not own & {f"{p}_el" for p in planted}, f"the probe started on a planted file: {line}"
            print(f"the probe started on {sorted(own)}, a port whose owner left after the planting; again")
            stop(stuck)
            for path in planted:
                path.unlink(missing_ok=True)
        else:
            pytest.fail("in all 3 attempts the probe found a port whose owner had left meanwhile")
        assert held_by(stuck.pid) & {str(p) for p in planted}, "the probe is not waiting on a planted file"
        stop(stuck)
        removed = dds_shm.remove_stale_files()
        assert set(planted) <= set(removed)
        fresh = start_probe()
        probes.append(fresh)
        line = printed(fresh, 60.0)
        assert line is not None and line.startswith("created"), line
        assert fresh.wait(timeout=30) == 0
    finally:
        for proc in probes:
            stop(proc)
        for path in planted:
            path.unlink(missing_ok=True)
        dds_shm.remove_stale_files()  # what the killed probe left

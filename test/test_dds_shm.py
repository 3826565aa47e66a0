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
    mapped = make(tmp_path / "fastdds_0123456789abcdef", 4096)
    not_ours = make(tmp_path / "lttng-ust-wait-6", 16)
    with open(open_lock, "rb"), open(mapped, "r+b") as f:
        view = mmap.mmap(f.fileno(), 4096)
        f.close()  # mapped, no longer open: still held
        try:
            stale = dds_shm.stale_files(tmp_path)
            assert stale == sorted([zombie_port, zombie_mutex, zombie_lock])
            assert dds_shm.main(["--dry-run", "--shm-dir", str(tmp_path)]) == 0
            assert all(p.exists() for p in stale)  # a dry run removes nothing
            assert dds_shm.remove_stale_files(tmp_path) == stale
        finally:
            view.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (open_lock, mapped, not_ours))
    # once nothing holds them, the lock and the segment are stale too
    assert dds_shm.remove_stale_files(tmp_path) == sorted([mapped, open_lock])
    assert [p.name for p in tmp_path.iterdir()] == [not_ours.name]


def test_a_process_that_cannot_be_inspected(tmp_path, monkeypatch):
    """One of ours whose open files are unreadable: nothing is called stale. One whose maps are
    unreadable but that holds no Fast DDS file open (no participant): it is passed over."""
    make(tmp_path / "fastdds_port7003")
    me = str(os.getpid())
    real_mapped = dds_shm._mapped_paths

    def no_maps(maps: Path):
        if maps.parent.name == me:
            raise PermissionError(maps)
        return real_mapped(maps)

    monkeypatch.setattr(dds_shm, "_mapped_paths", no_maps)
    assert [p.name for p in dds_shm.stale_files(tmp_path)] == ["fastdds_port7003"]
    with open(tmp_path / "fastdds_port7002_el", "w"):  # now this process looks like a participant
        with pytest.raises(PermissionError, match="cannot see which files"):
            dds_shm.stale_files(tmp_path)
        assert dds_shm.main(["--shm-dir", str(tmp_path)]) == 1
    assert (tmp_path / "fastdds_port7003").exists()

    real_open = dds_shm._open_paths

    def no_fds(fd_dir: Path):
        if fd_dir.parent.name == me:
            raise PermissionError(fd_dir)
        return real_open(fd_dir)

    monkeypatch.setattr(dds_shm, "_open_paths", no_fds)
    with pytest.raises(PermissionError):
        dds_shm.stale_files(tmp_path)


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
PROBE = "import rclpy; rclpy.init(); rclpy.create_node('shm_probe'); print('created', flush=True)"


def start_probe() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, text=True, env=dict(os.environ))


def printed(proc: subprocess.Popen, timeout: float) -> str | None:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else None


def held_by(pid: int) -> set[str]:
    return set(dds_shm._open_paths(Path(f"/proc/{pid}/fd")))


@pytest.mark.ros
@pytest.mark.skipif(not dds_shm.uses_fastdds() or not dds_shm.SHM_DIR.is_dir(), reason="needs Fast DDS on /dev/shm")
def test_a_zero_size_port_file_hangs_a_new_participant_until_it_is_removed():
    """Zero-size files at the lowest free shared-memory ports of the 7000s (taken by every new
    participant): the probe gets stuck holding one open, SIGTERM or not; after the cleanup a new
    probe starts. The files stay at most a few seconds, and the suite's start removes any left."""
    dds_shm.remove_stale_files()
    taken = {p.name for p in dds_shm.SHM_DIR.iterdir()}
    planted = [dds_shm.SHM_DIR / f"fastdds_port{n}" for n in range(7000, 7200) if f"fastdds_port{n}" not in taken][:4]
    probes: list[subprocess.Popen] = []
    try:
        for path in planted:
            make(path)
        stuck = start_probe()
        probes.append(stuck)
        assert printed(stuck, 15.0) is None, "the probe started in spite of the zero-size port files"
        assert held_by(stuck.pid) & {str(p) for p in planted}, "the probe is not waiting on a planted file"
        stuck.kill()
        stuck.wait()
        removed = dds_shm.remove_stale_files()
        assert set(planted) <= set(removed)
        fresh = start_probe()
        probes.append(fresh)
        assert printed(fresh, 60.0) == "created"
        assert fresh.wait(timeout=30) == 0
    finally:
        for proc in probes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for path in planted:
            path.unlink(missing_ok=True)
        dds_shm.remove_stale_files()  # what the killed probe left

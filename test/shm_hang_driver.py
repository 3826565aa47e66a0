"""Run by test_dds_shm.py inside ``unshare -rm`` with a private tmpfs on /dev/shm: the failure
that qwen3vl_seg_ros/ros/dds_shm.py exists for, where it can harm no other process.

Plants 0-byte port files (dated a minute back, like leftovers) at ports 7000-7299, starts a
probe participant, and reports as JSON whether it got stuck on one of them, whether the cleanup
(run while it is still stuck) removed them all, and whether a new probe then starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from qwen3vl_seg_ros.ros import dds_shm

from helpers import read_line  # this script's own folder, test/, is on sys.path

PROBE = """
import rclpy
rclpy.init()
node = rclpy.create_node("shm_probe")  # kept: the participant lives as long as a node does
print("created", flush=True)
"""


def main() -> None:
    report: dict = {"private_shm_empty_at_start": not any(dds_shm.SHM_DIR.iterdir())}
    planted = [dds_shm.SHM_DIR / f"fastdds_port{n}" for n in range(7000, 7300)]
    for path in planted:
        path.write_bytes(b"")
        os.utime(path, (time.time() - 60, time.time() - 60))
    stuck = subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, text=True)
    fresh = None
    try:
        report["stuck_printed"] = read_line(stuck, 15.0)
        opened = set(dds_shm._open_paths(dds_shm.Path(f"/proc/{stuck.pid}/fd")))
        report["stuck_waits_on"] = sorted(p.name for p in planted if str(p) in opened)
        stuck.send_signal(15)  # SIGTERM: rclpy's handler only sets a flag; the C++ wait goes on
        try:
            stuck.wait(3.0)
            report["stuck_survived_sigterm"] = False
        except subprocess.TimeoutExpired:
            report["stuck_survived_sigterm"] = True
        # cleaned while the stuck probe still holds its file: a new probe must start regardless
        removed = set(dds_shm.remove_stale_files())
        report["planted_removed"] = sum(p in removed for p in planted)
        report["planted"] = len(planted)
        fresh = subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, text=True)
        report["fresh_printed"] = read_line(fresh, 60.0)
        report["stuck_still_stuck"] = stuck.poll() is None
    finally:
        for proc in (stuck, fresh):
            if proc is not None:
                proc.kill()
                proc.wait()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()

"""Stale Fast DDS shared-memory files, found and removed before any participant starts.

Why this exists: Fast DDS (the default RMW here) keeps its shared-memory transport in files
under ``/dev/shm`` (``fastdds_port<N>``, ``fastdds_<16 hex>``, their ``_el``/``_sl`` lock files,
``sem.fastdds_port<N>_mutex``). A process killed while it is creating a port leaves a
zero-size ``fastdds_port<N>`` behind. The next participant that opens that port waits in
Boost.Interprocess for the file to be initialised, which never happens: ``rclpy.init()`` or
``create_node()`` hangs for good, holding the GIL, deaf to SIGTERM (rclpy handles it) and to
pytest-timeout. The shared-memory ports in the 7000s are taken by every participant on the
machine, whatever its ``ROS_DOMAIN_ID``, so one such file can stall every later ROS process.
We saw exactly this: a test run hung for 90 minutes on a ``fastdds_port7003`` of 0 bytes left
by a process killed two hours earlier. ``fastdds shm clean`` does not help there: it judges a
port by its lock file, and a port killed that early has none.

The rule used here needs no knowledge of Fast DDS internals: a file is stale when no live
process has it open or mapped. A participant keeps every such file either open (lock files)
or mapped (ports, segments, named semaphores) for as long as it lives, so a file nobody
holds can only be left over. Only files owned by the current user are considered: they are
created with the user's umask, so another user's process cannot hold them read-write.

ROS-free on purpose (plain ``/proc`` and ``os``): it must run before rclpy creates anything.
Called by the node's ``main``, the demo and the test suite (``test/conftest.py``) before they start
ROS; operators can run ``python -m qwen3vl_seg_ros.ros.dds_shm [--dry-run]`` (docs/troubleshooting.md).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SHM_DIR = Path("/dev/shm")
FASTDDS_FILE = re.compile(r"^(sem\.)?fastdds_")


@dataclass
class HeldFiles:
    """The files that live processes hold, and this user's processes that could not be inspected."""

    paths: set[str] = field(default_factory=set)
    unreadable_own: list[int] = field(default_factory=list)


def held_files(proc: Path = Path("/proc")) -> HeldFiles:
    """Every file that a live process has open (``fd/``) or mapped (``maps``).

    A process that exits while we look is skipped, and so is another user's process that we may
    not read (it cannot hold our files read-write). One of ours whose open files we may not
    read goes to ``unreadable_own``, and then nothing can be called stale. One whose open files
    we may read but whose ``maps`` we may not (a sandbox's supervisor, for instance) is no Fast
    DDS participant when it holds no Fast DDS file open: a participant keeps its lock files open
    for as long as it lives.
    """
    held = HeldFiles()
    uid = os.getuid()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            opened = list(_open_paths(entry / "fd"))
            held.paths.update(opened)
            try:
                held.paths.update(_mapped_paths(entry / "maps"))
            except PermissionError:
                if not any(FASTDDS_FILE.match(os.path.basename(p)) for p in opened):
                    continue
                raise
        except PermissionError:
            try:
                if entry.stat().st_uid == uid:
                    held.unreadable_own.append(int(entry.name))
            except FileNotFoundError:
                continue
        except (FileNotFoundError, ProcessLookupError):
            continue  # it exited meanwhile
    return held


def _open_paths(fd_dir: Path) -> Iterable[str]:
    for fd in os.listdir(fd_dir):
        try:
            yield os.readlink(fd_dir / fd)
        except OSError:  # closed meanwhile
            continue


def _mapped_paths(maps: Path) -> Iterable[str]:
    with open(maps) as lines:
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) == 6:
                yield parts[5].strip().removesuffix(" (deleted)")


def stale_files(shm_dir: Path = SHM_DIR, proc: Path = Path("/proc")) -> list[Path]:
    """The Fast DDS files in ``shm_dir`` owned by this user that no live process holds.

    Listed before the processes are inspected: a file created after the listing is never
    considered, and one created just before it is already held by its creator. Raises
    PermissionError when one of this user's processes cannot be inspected.
    """
    if not shm_dir.is_dir():
        return []
    uid = os.getuid()
    candidates = []
    for path in sorted(shm_dir.resolve().iterdir()):  # resolved: /proc shows real paths
        try:
            if FASTDDS_FILE.match(path.name) and path.is_file() and path.lstat().st_uid == uid:
                candidates.append(path)
        except FileNotFoundError:
            continue
    if not candidates:
        return []
    held = held_files(proc)
    if held.unreadable_own:
        raise PermissionError(f"cannot see which files processes {held.unreadable_own[:5]} of this user hold")
    return [path for path in candidates if str(path) not in held.paths]


def remove_stale_files(shm_dir: Path = SHM_DIR, proc: Path = Path("/proc")) -> list[Path]:
    """Removes :func:`stale_files`; returns the ones it removed."""
    removed = []
    for path in stale_files(shm_dir, proc):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue  # someone else cleaned it
    return removed


def uses_fastdds(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether ROS processes started with this environment use Fast DDS (the default RMW)."""
    return environ.get("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp").startswith("rmw_fastrtps")


def clean_before_start(log: Callable[[str], None] = print) -> list[Path]:
    """What the node, the demo and the tests call before their first participant: removes stale
    files when Fast DDS is the RMW, and says so when there were any. Never raises: a cleanup
    that fails must not keep ROS from starting. ``QWEN3VL_SEG_DDS_SHM_CLEANUP=0`` turns it off."""
    if not uses_fastdds() or os.environ.get("QWEN3VL_SEG_DDS_SHM_CLEANUP", "1") == "0":
        return []
    try:
        removed = remove_stale_files(SHM_DIR)
    except OSError as exc:
        log(f"[dds_shm] could not check {SHM_DIR} for stale Fast DDS files: {exc}")
        return []
    if removed:
        log(f"[dds_shm] removed {len(removed)} stale Fast DDS shared-memory file(s) in {SHM_DIR} "
            f"(left by killed ROS processes; one could hang every new node)")
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qwen3vl_seg_ros.ros.dds_shm [--dry-run]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list the stale files, remove nothing")
    parser.add_argument("--shm-dir", type=Path, default=SHM_DIR, help="where Fast DDS keeps its files")
    args = parser.parse_args(argv)
    try:
        files = stale_files(args.shm_dir) if args.dry_run else remove_stale_files(args.shm_dir)
    except PermissionError as exc:
        print(f"nothing removed: {exc}", file=sys.stderr)
        return 1
    for path in files:
        print(path)
    print(f"{len(files)} stale Fast DDS file(s) {'found' if args.dry_run else 'removed'} in {args.shm_dir}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

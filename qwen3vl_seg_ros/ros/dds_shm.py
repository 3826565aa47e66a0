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

The rule used here needs little knowledge of Fast DDS internals: a port or segment is stale
when no live process has any of its files open or mapped. Its owner keeps its lock file open
and the port or segment mapped for as long as it lives, and every process that writes to a
port maps it, so a port nobody holds can only be left over. (Judged per file, the port's
mutex would look abandoned while its owner lives: it is only mapped while in use.) Only files
owned by the current user are considered: they are created with the user's umask, so another
user's process cannot hold them read-write.

ROS-free on purpose (plain ``/proc`` and ``os``): it must run before rclpy creates anything.
Called by the node's ``main``, the demo and the test suite (``test/conftest.py``) before they start
ROS; operators can run ``python -m qwen3vl_seg_ros.ros.dds_shm [--dry-run]`` (docs/troubleshooting.md).
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SHM_DIR = Path("/dev/shm")
FASTDDS_FILE = re.compile(r"^(sem\.)?fastdds_")
PORT_FILE = re.compile(r"^fastdds_port\d+$")
UNFINISHED_AGE_S = 10.0


@dataclass
class HeldFiles:
    """The files that live processes hold, and this user's processes that could not be inspected."""

    paths: set[str] = field(default_factory=set)
    unreadable_own: list[int] = field(default_factory=list)


def held_files(proc: Path = Path("/proc")) -> HeldFiles:
    """Every file that a live process has open (``fd/``) or mapped (``maps``).

    A process that exits while we look is skipped, and so is another user's process that we may
    not read (it cannot hold our files read-write). One of ours whose open files we may not
    read goes to ``unreadable_own`` (see :func:`scan` for what that changes). One whose open files
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


@dataclass
class Scan:
    """What :func:`scan` found: files to remove, and files it could not judge."""

    stale: list[Path] = field(default_factory=list)
    unsure: list[Path] = field(default_factory=list)  # held by no process we could inspect
    uninspectable: list[int] = field(default_factory=list)  # this user's processes we could not


def scan(shm_dir: Path = SHM_DIR, proc: Path = Path("/proc"), now: float | None = None) -> Scan:
    """The Fast DDS files in ``shm_dir`` owned by this user whose port or segment no live
    process holds (none of its files open or mapped, see :func:`object_of`).

    Listed before the processes are inspected: a file created after the listing is never
    considered, and one created just before it is already held by its creator. When one of
    this user's processes cannot be inspected (seen in a sandbox without CAP_SYS_PTRACE), only
    the hazard itself is removed: port files of 0 bytes older than ``UNFINISHED_AGE_S``, which a
    live creator fills within milliseconds; the rest is left, in ``unsure``. Those are removed
    even when held: by a participant stuck opening one (it stays stuck; unlinked, the file no
    longer catches the next one).
    """
    result = Scan()
    if not shm_dir.is_dir():
        return result
    uid = os.getuid()
    root = shm_dir.resolve()  # /proc shows real paths
    candidates = []
    for path in sorted(root.iterdir()):
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue
        if FASTDDS_FILE.match(path.name) and stat.S_ISREG(info.st_mode) and info.st_uid == uid:
            candidates.append((path, info))
    if not candidates:
        return result
    held = held_files(proc)
    result.uninspectable = held.unreadable_own
    alive = {object_of(Path(p).name) for p in held.paths if Path(p).parent == root}
    now = time.time() if now is None else now
    for path, info in candidates:
        old_and_empty = PORT_FILE.match(path.name) and info.st_size == 0 and now - info.st_mtime > UNFINISHED_AGE_S
        if old_and_empty:  # broken even when held: by a participant stuck on it, which stays stuck
            result.stale.append(path)
        elif object_of(path.name) not in alive:
            (result.unsure if held.unreadable_own else result.stale).append(path)
    return result


def object_of(name: str) -> str:
    """The port or segment a file belongs to: ``fastdds_port7000`` for the port itself, its lock
    files ``_el``/``_sl`` and its mutex ``sem.fastdds_port7000_mutex``.

    Judged as a whole because a live owner does not hold every file: it keeps the port mapped and
    its ``_el`` lock open but closes the mutex between uses, so the mutex alone looks abandoned
    (removing it would give the next process a different mutex for the same port)."""
    name = name.removeprefix("sem.")
    for suffix in ("_mutex", "_el", "_sl"):
        name = name.removesuffix(suffix)
    return name


def stale_files(shm_dir: Path = SHM_DIR, proc: Path = Path("/proc")) -> list[Path]:
    """The files :func:`scan` would remove."""
    return scan(shm_dir, proc).stale


def unfinished_ports(shm_dir: Path = SHM_DIR) -> list[Path]:
    """Port files of 0 bytes: the hazard itself, either being created this instant or left by a
    process killed while creating it. Cheap (no /proc scan): a test run checks it between tests."""
    found = []
    try:
        for entry in os.scandir(shm_dir):
            if PORT_FILE.match(entry.name) and entry.stat(follow_symlinks=False).st_size == 0:
                found.append(Path(entry.path))
    except FileNotFoundError:
        return []
    return found


def remove_stale_files(shm_dir: Path = SHM_DIR, proc: Path = Path("/proc")) -> list[Path]:
    """Removes :func:`stale_files`; returns the ones it removed."""
    return remove(scan(shm_dir, proc).stale)


def remove(paths: Iterable[Path]) -> list[Path]:
    """Unlinks ``paths`` (found by :func:`scan`); returns the ones it removed."""
    removed = []
    for path in paths:
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
            f"(left by ROS processes that ended or were killed; a 0-byte one hangs every new node)")
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qwen3vl_seg_ros.ros.dds_shm [--dry-run]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list the stale files, remove nothing")
    parser.add_argument("--shm-dir", type=Path, default=SHM_DIR, help="where Fast DDS keeps its files")
    args = parser.parse_args(argv)
    found = scan(args.shm_dir)
    files = found.stale if args.dry_run else remove(found.stale)
    for path in files:
        print(path)
    print(f"{len(files)} stale Fast DDS file(s) {'found' if args.dry_run else 'removed'} in {args.shm_dir}",
          file=sys.stderr)
    if found.uninspectable:
        print(f"{len(found.unsure)} more held by no process that could be inspected were left: processes "
              f"{found.uninspectable[:5]} of this user could not be (run as their owner, or as root)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""RGB-D pairing by approximate time, and the newest-frame store the worker reads from.

Colour and depth arrive on separate topics with slightly different stamps. A frame is the
newest colour image that has a depth image within ``slop_s`` of its stamp, with the closest
such depth (a newer colour image whose depth has not arrived yet waits for it). Depth
is optional: while no depth has arrived for ``depth_timeout_s`` the node serves colour-only
frames (2D results), and says so.

Why not ``message_filters``' ApproximateTimeSynchronizer: it hands over only pairs, so when
the depth stream stops no colour image would reach the node at all, where this store keeps
serving colour-only frames after ``depth_timeout_s`` and says what is missing; and it matches
every message as it arrives, where this pairs only the frame a command is run on.
This module does not import rclpy: messages are opaque payloads with stamps in seconds.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Frame:
    """One synchronized input: colour image, depth (or None) and the latest CameraInfo."""

    seq: int  # increases with every colour image; continuous mode never runs a frame twice
    image: Any
    stamp: float  # colour image stamp, seconds
    arrival: float  # monotonic time the colour image arrived
    depth: Any | None = None
    depth_stamp: float | None = None
    camera_info: Any | None = None

    def age(self, now: float) -> float:
        return now - self.arrival


@dataclass
class _Stamped:
    msg: Any
    stamp: float
    arrival: float
    seq: int = 0


class RgbdSynchronizer:
    """Thread-safe store of recent colour and depth messages; pairs them on demand."""

    def __init__(self, slop_s: float = 0.05, queue_size: int = 10, depth_timeout_s: float = 1.0,
                 use_depth: bool = True) -> None:
        self.slop_s = slop_s
        self.depth_timeout_s = depth_timeout_s
        self.use_depth = use_depth
        self._images: deque[_Stamped] = deque(maxlen=max(1, queue_size))
        self._depths: deque[_Stamped] = deque(maxlen=max(1, queue_size))
        self._camera_info: Any | None = None
        self._camera_info_arrival: float | None = None
        self._seq = 0
        self._lock = threading.Lock()

    # -- input ---------------------------------------------------------------------------------
    def add_image(self, msg: Any, stamp: float, arrival: float) -> int:
        with self._lock:
            self._seq += 1
            self._images.append(_Stamped(msg, stamp, arrival, self._seq))
            return self._seq

    def add_depth(self, msg: Any, stamp: float, arrival: float) -> None:
        with self._lock:
            self._depths.append(_Stamped(msg, stamp, arrival))

    def add_camera_info(self, msg: Any, arrival: float) -> None:
        with self._lock:
            self._camera_info = msg
            self._camera_info_arrival = arrival

    def clear(self, queue_size: int | None = None) -> None:
        """Forgets every message; ``queue_size`` also sets how many of each stream are kept."""
        with self._lock:
            if queue_size is not None:
                self._images = deque(maxlen=max(1, int(queue_size)))
                self._depths = deque(maxlen=max(1, int(queue_size)))
            self._images.clear()
            self._depths.clear()
            self._camera_info = None
            self._camera_info_arrival = None

    # -- output --------------------------------------------------------------------------------
    def _depth_active_locked(self, now: float) -> bool:
        """Depth is expected when it is enabled and some arrived within depth_timeout_s."""
        if not self.use_depth or not self._depths:
            return False
        return now - self._depths[-1].arrival <= self.depth_timeout_s

    def latest(self, now: float) -> Frame | None:
        """The newest usable frame, or None (then :meth:`explain` says why)."""
        with self._lock:
            info = self._camera_info
            if not self._images:
                return None
            if not self._depth_active_locked(now):
                img = self._images[-1]
                return Frame(img.seq, img.msg, img.stamp, img.arrival, camera_info=info)
            index = self._depth_index()
            for img in reversed(self._images):
                depth = self._closest_depth(index, img.stamp)
                if depth is not None:
                    return Frame(img.seq, img.msg, img.stamp, img.arrival, depth.msg, depth.stamp, info)
            return None

    def _depth_index(self) -> list[tuple[float, int]]:
        """(stamp, queue position) of each depth image, by stamp. Pairing bisects it: with
        sync_queue_size in the hundreds and depth that never pairs, a scan of every depth per
        colour image took 0.1 s, under the scheduler's lock and on every frame."""
        return sorted((d.stamp, k) for k, d in enumerate(self._depths))

    @staticmethod
    def _nearest(index: list[tuple[float, int]], stamp: float) -> tuple[int, float]:
        """Where ``stamp`` goes in ``index``, and the smallest stamp gap to it (inf without depth).
        A computed gap never shrinks away from ``stamp`` on either side, so it is next to it."""
        k = bisect.bisect_left(index, stamp, key=lambda entry: entry[0])
        return k, min((abs(index[j][0] - stamp) for j in (k - 1, k) if 0 <= j < len(index)), default=math.inf)

    def _closest_depth(self, index: list[tuple[float, int]], stamp: float) -> _Stamped | None:
        """The depth closest in stamp within slop_s; of equally close ones, the newest in the
        queue (the choice of the linear scan this replaces, ties and rounding included)."""
        k, gap = self._nearest(index, stamp)
        if gap > self.slop_s:
            return None
        newest = -1
        for j, step in ((k - 1, -1), (k, 1)):  # the equally close run on each side
            while 0 <= j < len(index) and abs(index[j][0] - stamp) == gap:
                newest = max(newest, index[j][1])
                j += step
        return self._depths[newest]

    def explain(self, now: float) -> str:
        """Why no frame is usable right now, in words a user can act on."""
        with self._lock:
            if not self._images:
                return "no colour image received yet (check the 'image' remapping and image_qos)"
            newest = self._images[-1]
            parts = [f"newest colour image arrived {now - newest.arrival:.2f} s ago"]
            # only when pairing is what failed: a paired frame that is merely too old (a slow
            # camera) must not send the user off to debug depth alignment
            index = self._depth_index() if self._depth_active_locked(now) else []
            gap = min(self._nearest(index, i.stamp)[1] for i in self._images)
            if index and gap > self.slop_s:
                parts.append(
                    f"no depth image within sync_slop_s={self.slop_s:.3f} s of any recent colour image "
                    f"(closest stamp gap {gap:.3f} s); check that depth is aligned to colour "
                    f"and stamped from the same clock"
                )
                oldest = self._images[0]
                if self._depths[-1].stamp < oldest.stamp:
                    # depth that is merely late pairs with colour images already dropped from the
                    # queue: the same symptom as another clock, with another cure
                    parts.append(
                        f"every depth image is older than the oldest kept colour image; if depth "
                        f"arrives late rather than on another clock, raise sync_queue_size (the "
                        f"{len(self._images)} kept colour images span {newest.stamp - oldest.stamp:.3f} s)"
                    )
            if self._camera_info is None:
                parts.append("no CameraInfo received (3D outputs disabled)")
            return "; ".join(parts)

    def last_arrivals(self) -> dict[str, float | None]:
        """Arrival times of the newest image, depth and CameraInfo (for diagnostics)."""
        with self._lock:
            return {
                "image": self._images[-1].arrival if self._images else None,
                "depth": self._depths[-1].arrival if self._depths else None,
                "camera_info": self._camera_info_arrival,
            }

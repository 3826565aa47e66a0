"""Object identities across results: the same physical object keeps its track id.

Why: a planner in continuous mode ("all mugs" at 5 Hz) has to know that the second object of this
result is the first object of the last one, or it re-plans a grasp on every frame; a result's own
``id`` only numbers its objects by score. A track is a physical object, whatever command found it:
"the red mug" and then "all mugs" give that mug the same id. A new result's objects are matched
one-to-one (Hungarian assignment, :func:`scipy.optimize.linear_sum_assignment`) to the live
tracks:

* by 3D centroid distance when both have a centroid in the same frame: with a target frame fixed
  in the world this survives camera motion;
* otherwise by the IoU of their 2D boxes, which holds for a still camera.

A pair further apart than the gate is never matched; an object left unmatched starts a new track;
a track unseen for ``max_age_s`` is forgotten. Ids are never reused while the tracker lives.
Labels are not compared: the model's label for one object can change from frame to frame, its
place does not. This module does not import rclpy.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from qwen3vl_seg_ros.training.metrics import box_iou_matrix

#: Cost of a pair outside the gate; larger than any gated cost (those lie in [0, 1]).
_BLOCKED = 1e6

#: Most tracks kept (the longest unseen go first): bounds memory and matching time whatever
#: ``max_age_s`` is.
MAX_TRACKS = 1000


@dataclass(frozen=True)
class Observation:
    """One object of one result, as the tracker sees it."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels
    centroid: tuple[float, float, float] | None = None  # metres, in ``frame_id``
    frame_id: str = ""


@dataclass(frozen=True)
class TrackerSettings:
    """Gates and lifetime. Defaults suit tabletop objects a few centimetres apart."""

    iou_threshold: float = 0.3  # smallest 2D box IoU of a match
    max_distance_m: float = 0.05  # largest 3D centroid distance of a match
    max_age_s: float = 2.0  # a track unseen this long is forgotten


@dataclass
class _Track:
    track_id: int
    last: Observation
    last_seen: float


def match_cost(tracks: Sequence[Observation], observations: Sequence[Observation],
               settings: TrackerSettings) -> np.ndarray:
    """``(tracks, observations)`` costs in [0, 1] for gated pairs, ``_BLOCKED`` for the rest.

    A pair with centroids in one frame is judged in 3D only (distance / gate), so that a camera
    that moved does not block it through its 2D boxes; any other pair by ``1 - IoU``.
    """
    boxes_t = np.array([t.box for t in tracks], dtype=float).reshape(-1, 4)
    boxes_o = np.array([o.box for o in observations], dtype=float).reshape(-1, 4)
    iou = box_iou_matrix(boxes_t, boxes_o)
    cost = np.where(iou >= settings.iou_threshold, 1.0 - iou, _BLOCKED)
    has_3d_t = np.array([t.centroid is not None and bool(t.frame_id) for t in tracks], bool)
    has_3d_o = np.array([o.centroid is not None and bool(o.frame_id) for o in observations], bool)
    same_frame = np.array([[t.frame_id == o.frame_id for o in observations] for t in tracks], bool)
    use_3d = has_3d_t[:, None] & has_3d_o[None, :] & same_frame.reshape(len(tracks), len(observations))
    if use_3d.any():
        cen_t = np.array([t.centroid if t.centroid is not None else (np.nan,) * 3 for t in tracks], float)
        cen_o = np.array([o.centroid if o.centroid is not None else (np.nan,) * 3 for o in observations], float)
        dist = np.linalg.norm(cen_t[:, None, :] - cen_o[None, :, :], axis=-1)
        gate = max(settings.max_distance_m, 1e-9)
        within = np.isfinite(dist) & (dist <= gate)
        cost_3d = np.where(within, np.nan_to_num(dist, nan=0.0) / gate, _BLOCKED)
        cost = np.where(use_3d, cost_3d, cost)
    return cost


class ObjectTracker:
    """Track ids for the objects of successive results. Thread-safe."""

    def __init__(self) -> None:
        self._tracks: list[_Track] = []
        self._next_id = 1
        self._lock = threading.Lock()

    def update(self, observations: Sequence[Observation], now: float,
               settings: TrackerSettings | None = None) -> list[int]:
        """Track ids for ``observations`` (same order); the tracks are brought up to date."""
        settings = settings or TrackerSettings()
        with self._lock:
            tracks = self._tracks = [t for t in self._tracks if now - t.last_seen <= settings.max_age_s]
            ids = [0] * len(observations)
            if tracks and observations:
                cost = match_cost([t.last for t in tracks], observations, settings)
                for row, col in zip(*linear_sum_assignment(cost)):
                    if cost[row, col] < _BLOCKED:
                        ids[col] = tracks[row].track_id
                        tracks[row].last, tracks[row].last_seen = observations[col], now
            for col, obs in enumerate(observations):
                if ids[col] == 0:
                    ids[col] = self._next_id
                    tracks.append(_Track(self._next_id, obs, now))
                    self._next_id += 1
            if len(tracks) > MAX_TRACKS:
                tracks.sort(key=lambda t: t.last_seen, reverse=True)
                del tracks[MAX_TRACKS:]
            return ids

    def live_tracks(self) -> int:
        """Tracks held (for diagnostics and tests); expired ones go at the next update."""
        with self._lock:
            return len(self._tracks)

    def clear(self) -> None:
        """Forgets every track; ids keep counting up, so an old id never names a new object."""
        with self._lock:
            self._tracks.clear()

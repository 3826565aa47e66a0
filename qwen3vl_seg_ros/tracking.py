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
a track unseen for ``max_age_s`` is forgotten. Ids are not reused while the tracker lives,
until they pass the message field's range (uint32, years at any real rate): then they start
again at 1, skipping live ones.
Labels are not compared: the model's label for one object can change from frame to frame, its
place does not. Colour is: a pair whose mean colours (CIELAB, :func:`mean_colours`) differ by more
than a gate is never matched, so that a red cup found 4 cm from where a blue one was tracked does
not take its id (position alone gave it, and the blue one a new id at its next sighting).
Neighbours of one colour and size closer than the distance gate stay ambiguous: keep that gate
below half the spacing of such objects. This module does not import rclpy.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from scipy.optimize import linear_sum_assignment

from qwen3vl_seg_ros.training.metrics import box_iou_matrix

#: Cost of a pair outside the gate; larger than any gated cost (those lie in [0, 1]).
_BLOCKED = 1e6

#: Cost of leaving a track or an observation unmatched. Without it the assignment matched as
#: many pairs as the gates allow before it looked at distances: with caps A and B tracked and
#: then B (unmoved) and a new screw C 4 cm from it found, B took A's id and C took B's. Two
#: unmatched cost a hair more than the worst gated pair (1.0, a pair right on the gate), so a
#: lone pair in the gate is always matched, but a still object is never moved off its own track to
#: make room for more matches. The price of this choice: when every object moves by more than
#: about half their spacing in the frame compared (a moving camera without target_frame), ids can
#: pass to neighbours; with target_frame fixed in the world, centroids do not move.
_UNMATCHED = 0.5 + 1e-6

#: Largest track id: ``SegmentedObject.track_id`` is a uint32 (0 means "tracking off").
MAX_TRACK_ID = 2**32 - 1

#: Most tracks kept (the longest unseen go first): bounds memory and matching time whatever
#: ``max_age_s`` is.
MAX_TRACKS = 1000


@dataclass(frozen=True)
class Observation:
    """One object of one result, as the tracker sees it."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels
    centroid: tuple[float, float, float] | None = None  # metres, in ``frame_id``
    frame_id: str = ""
    colour: tuple[float, float, float] | None = None  # mean CIELAB (L 0-100) of the object's pixels


@dataclass(frozen=True)
class TrackerSettings:
    """Gates and lifetime. Defaults suit tabletop objects a few centimetres apart."""

    iou_threshold: float = 0.3  # smallest 2D box IoU of a match
    max_distance_m: float = 0.05  # largest 3D centroid distance of a match
    max_age_s: float = 2.0  # a track unseen this long is forgotten
    max_colour_distance: float = 40.0  # largest CIELAB distance of mean colours of a match (0: off)


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
    cost = np.where((iou >= settings.iou_threshold) & (iou > 0), 1.0 - iou, _BLOCKED)  # 0: any overlap, not any box
    has_3d_t = np.array([t.centroid is not None and bool(t.frame_id) for t in tracks], bool)
    has_3d_o = np.array([o.centroid is not None and bool(o.frame_id) for o in observations], bool)
    frames_t = np.array([t.frame_id for t in tracks], dtype=object)
    frames_o = np.array([o.frame_id for o in observations], dtype=object)
    use_3d = has_3d_t[:, None] & has_3d_o[None, :] & (frames_t[:, None] == frames_o[None, :])
    if use_3d.any():
        cen_t = np.array([t.centroid if t.centroid is not None else (np.nan,) * 3 for t in tracks], float)
        cen_o = np.array([o.centroid if o.centroid is not None else (np.nan,) * 3 for o in observations], float)
        dist = np.linalg.norm(cen_t[:, None, :] - cen_o[None, :, :], axis=-1)
        gate = max(settings.max_distance_m, 1e-9)
        within = np.isfinite(dist) & (dist <= gate)
        cost_3d = np.where(within, np.nan_to_num(dist, nan=0.0) / gate, _BLOCKED)
        cost = np.where(use_3d, cost_3d, cost)
    if settings.max_colour_distance > 0:
        cost = np.where(_colours_apart(tracks, observations, settings.max_colour_distance), _BLOCKED, cost)
    return cost


def _colours_apart(tracks: Sequence[Observation], observations: Sequence[Observation], gate: float) -> np.ndarray:
    """``(tracks, observations)``: both have a colour, further apart than ``gate`` (CIELAB)."""
    def table(items: Sequence[Observation]) -> np.ndarray:
        return np.array([o.colour if o.colour is not None else (np.nan,) * 3 for o in items], float).reshape(-1, 3)
    distance = np.linalg.norm(table(tracks)[:, None, :] - table(observations)[None, :, :], axis=-1)
    return np.nan_to_num(distance, nan=0.0) > gate  # a missing colour blocks nothing


def mean_colours(rgb: np.ndarray, masks: Sequence[np.ndarray | None],
                 boxes: Sequence[Sequence[float]]) -> list[tuple[float, float, float]]:
    """Mean CIELAB colour (L 0-100) of each object's mask pixels inside its box (the whole box
    where the mask is missing or empty there): the mean RGB, then converted. Each object reads
    its box's crop only (an object's box covers its mask in the node's results), about 0.04 ms
    per object at any frame size."""
    if not len(masks):
        return []
    means = np.zeros((len(masks), 3), np.float32)
    h, w = rgb.shape[:2]
    for k, (mask, box) in enumerate(zip(masks, boxes)):
        x0, y0 = min(w - 1, max(0, int(box[0]))), min(h - 1, max(0, int(box[1])))
        x1, y1 = min(w, max(x0 + 1, int(np.ceil(box[2])))), min(h, max(y0 + 1, int(np.ceil(box[3]))))
        crop = np.ascontiguousarray(rgb[y0:y1, x0:x1])
        inside = None if mask is None else mask[y0:y1, x0:x1]
        if inside is not None and inside.any():
            means[k] = cv2.mean(crop, mask=inside.astype(np.uint8))[:3]
        else:
            means[k] = crop.reshape(-1, 3).mean(axis=0)
    lab = cv2.cvtColor((means / 255.0)[None], cv2.COLOR_RGB2Lab)[0]
    return [tuple(float(v) for v in row) for row in lab]


def assign(cost: np.ndarray) -> list[tuple[int, int]]:
    """The (track, observation) pairs of least total cost, where leaving either side unmatched
    costs ``_UNMATCHED`` each; only rows and columns with a pair inside the gate take part (the
    others could only stay unmatched), which keeps the problem as small as the plain one."""
    gated = cost < _BLOCKED
    rows, cols = np.flatnonzero(gated.any(axis=1)), np.flatnonzero(gated.any(axis=0))
    sub = cost[np.ix_(rows, cols)]
    n_t, n_o = sub.shape
    padded = np.full((n_t + n_o, n_o + n_t), _BLOCKED)
    padded[:n_t, :n_o] = sub
    padded[np.arange(n_t), n_o + np.arange(n_t)] = _UNMATCHED  # the track stays unmatched
    padded[n_t + np.arange(n_o), np.arange(n_o)] = _UNMATCHED  # the observation starts a track
    padded[n_t:, n_o:] = 0.0
    return [(int(rows[r]), int(cols[c])) for r, c in zip(*linear_sum_assignment(padded))
            if r < n_t and c < n_o and sub[r, c] < _BLOCKED]


def keep_3d(old: Observation, new: Observation) -> Observation:
    """The new observation, with the old centroid where the new one has none: one result without
    depth (or whose TF fell back to the camera frame) must not demote a track fixed in the world
    to box matching, which a moving camera breaks at the next result."""
    if (new.centroid is None or not new.frame_id) and old.centroid is not None and old.frame_id:
        return Observation(new.box, old.centroid, old.frame_id, new.colour)
    return new


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
                for row, col in assign(cost):
                    ids[col] = tracks[row].track_id
                    tracks[row].last = keep_3d(tracks[row].last, observations[col])
                    tracks[row].last_seen = now
            live = {t.track_id for t in tracks}
            for col, obs in enumerate(observations):
                if ids[col] == 0:
                    ids[col] = self._new_id(live)
                    live.add(ids[col])
                    tracks.append(_Track(ids[col], obs, now))
            limit = max(MAX_TRACKS, len(observations))  # never the tracks of this result
            if len(tracks) > limit:
                tracks.sort(key=lambda t: t.last_seen, reverse=True)
                del tracks[limit:]
            return ids

    def _new_id(self, live: set[int]) -> int:
        """The next id: counting up, back to 1 after the message field's largest value (uint32:
        past it the wire carried 0, "tracking off", then small ids again), skipping live ones."""
        while True:
            candidate = self._next_id
            self._next_id = 1 if candidate >= MAX_TRACK_ID else candidate + 1
            if candidate not in live:
                return candidate

    def live_tracks(self) -> int:
        """Tracks held (for diagnostics and tests); expired ones go at the next update."""
        with self._lock:
            return len(self._tracks)

    def clear(self) -> None:
        """Forgets every track; ids keep counting up, so an old id never names a new object."""
        with self._lock:
            self._tracks.clear()

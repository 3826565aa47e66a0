"""Object identities across results (qwen3vl_seg_ros.tracking), without ROS."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3vl_seg_ros import tracking
from qwen3vl_seg_ros.tracking import ObjectTracker, Observation, TrackerSettings, box_iou_matrix, match_cost

SETTINGS = TrackerSettings(iou_threshold=0.3, max_distance_m=0.05, max_age_s=2.0)


def box(x0: float, y0: float, w: float = 20, h: float = 20) -> Observation:
    return Observation((x0, y0, x0 + w, y0 + h))


def at(x: float, y: float = 0.0, z: float = 1.0, frame: str = "world", box_x: float = 0) -> Observation:
    return Observation((box_x, 0, box_x + 20, 20), (x, y, z), frame)


def test_box_iou_matrix_against_hand_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 5]], float)  # the second has no area
    b = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]], float)
    iou = box_iou_matrix(a, b)
    # overlap 5x10 = 50, union 100 + 100 - 50 = 150
    np.testing.assert_allclose(iou, [[50 / 150, 1.0, 0.0], [0.0, 0.0, 0.0]])


def test_same_place_keeps_its_id_and_a_new_object_gets_a_new_one():
    tracker = ObjectTracker()
    first = tracker.update([box(0, 0), box(50, 0)], now=0.0, settings=SETTINGS)
    assert len(set(first)) == 2 and 0 not in first
    # listed the other way round, each moved by 2 px, and a third object
    second = tracker.update([box(52, 0), box(2, 1), box(100, 100)], now=0.5, settings=SETTINGS)
    assert second[:2] == [first[1], first[0]]
    assert second[2] not in first
    assert tracker.live_tracks() == 3


def test_an_object_beyond_the_2d_gate_is_a_new_track():
    tracker = ObjectTracker()
    (old,) = tracker.update([box(0, 0)], now=0.0, settings=SETTINGS)
    (new,) = tracker.update([box(15, 0)], now=0.1, settings=SETTINGS)  # IoU 5/35 < 0.3
    assert new != old


def test_3d_match_survives_camera_motion_in_a_fixed_frame():
    """Boxes far apart in the image (the camera turned), centroids 1 cm apart in 'world'."""
    tracker = ObjectTracker()
    (old,) = tracker.update([at(0.30, box_x=0)], now=0.0, settings=SETTINGS)
    (same,) = tracker.update([at(0.31, box_x=200)], now=0.1, settings=SETTINGS)
    assert same == old


def test_3d_gate_separates_objects_at_the_same_pixels():
    """One box in the image, but 30 cm apart along the ray: another object."""
    tracker = ObjectTracker()
    (old,) = tracker.update([at(0.0, z=1.0)], now=0.0, settings=SETTINGS)
    (new,) = tracker.update([at(0.0, z=1.3)], now=0.1, settings=SETTINGS)
    assert new != old


def test_centroids_in_different_frames_fall_back_to_boxes():
    tracker = ObjectTracker()
    (old,) = tracker.update([at(0.0, frame="world")], now=0.0, settings=SETTINGS)
    # 5 m apart as numbers, but in another frame (TF failed, camera frame): the boxes decide
    (same,) = tracker.update([at(5.0, frame="camera_optical")], now=0.1, settings=SETTINGS)
    assert same == old
    cost = match_cost([at(0.0, frame="world")], [at(5.0, frame="world")], SETTINGS)
    assert cost[0, 0] >= 1e6


def test_assignment_is_joint_not_greedy():
    """Greedy matching would give the nearer track B to the first object and leave the second
    without one; the joint assignment matches both (A-o1 4 cm, B-o2 3 cm)."""
    tracker = ObjectTracker()
    a, b = tracker.update([at(0.00), at(0.05)], now=0.0, settings=SETTINGS)
    o1, o2 = tracker.update([at(0.04), at(0.08)], now=0.1, settings=SETTINGS)
    assert (o1, o2) == (a, b)


def test_tracks_expire_and_ids_are_never_reused():
    tracker = ObjectTracker()
    (first,) = tracker.update([box(0, 0)], now=0.0, settings=SETTINGS)
    (kept,) = tracker.update([box(0, 0)], now=1.9, settings=SETTINGS)
    assert kept == first
    assert tracker.update([], now=3.0, settings=SETTINGS) == []  # 1.1 s unseen: still there
    assert tracker.live_tracks() == 1
    (late,) = tracker.update([box(0, 0)], now=4.0, settings=SETTINGS)  # 2.1 s unseen: forgotten
    assert late != first
    tracker.clear()
    (after_clear,) = tracker.update([box(0, 0)], now=4.1, settings=SETTINGS)
    assert after_clear not in (first, late) and tracker.live_tracks() == 1


def test_track_count_is_bounded(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(tracking, "MAX_TRACKS", 5)
    tracker = ObjectTracker()
    slow = TrackerSettings(max_age_s=1e9)
    for k in range(4):
        tracker.update([box(100 * k, 0), box(100 * k, 50)], now=float(k), settings=slow)
    assert tracker.live_tracks() == 5
    # the newest objects are the ones kept
    assert tracker.update([box(300, 0), box(300, 50)], now=10.0, settings=slow) == [7, 8]


def test_non_finite_centroids_never_match():
    tracker = ObjectTracker()
    (old,) = tracker.update([at(float("nan"), box_x=0)], now=0.0, settings=SETTINGS)
    (new,) = tracker.update([at(float("nan"), box_x=0)], now=0.1, settings=SETTINGS)
    assert new != old

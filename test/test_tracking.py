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



def test_an_iou_threshold_of_0_means_any_overlap_not_any_box():
    """With track_iou_threshold 0 (IoU >= 0), boxes 300 px apart kept one id."""
    settings = TrackerSettings(iou_threshold=0.0, max_distance_m=0.05, max_age_s=2.0)
    tracker = ObjectTracker()
    (old,) = tracker.update([box(0, 0)], now=0.0, settings=settings)
    (far,) = tracker.update([box(300, 0)], now=0.1, settings=settings)
    (touching,) = tracker.update([box(310, 10)], now=0.2, settings=settings)  # IoU 100/700
    assert far != old and touching == far

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
    """Greedy matching in the result's order would give the nearer track B to the first object
    (2 cm) and leave the second without one; the joint assignment matches both (A-o1 3 cm,
    B-o2 1 cm)."""
    tracker = ObjectTracker()
    a, b = tracker.update([at(0.00), at(0.05)], now=0.0, settings=SETTINGS)
    o1, o2 = tracker.update([at(0.03), at(0.06)], now=0.1, settings=SETTINGS)
    assert (o1, o2) == (a, b)


def test_a_still_object_keeps_its_id_when_a_neighbour_goes_and_another_comes():
    """'all caps' finds caps A (x=0) and B (4 cm); 'cap B and the screw' finds B, unmoved, and a
    screw C 4 cm beyond it. Matching as many pairs as possible gave B A's id and C B's."""
    tracker = ObjectTracker()
    a, b = tracker.update([at(0.00), at(0.04)], now=0.0, settings=SETTINGS)
    still, new = tracker.update([at(0.04), at(0.08)], now=0.1, settings=SETTINGS)
    assert still == b and new not in (a, b)
    # the same without depth: overlapping boxes A [0, 40], B [20, 60], then B and C [40, 80]
    tracker = ObjectTracker()
    a, b = tracker.update([box(0, 0, 40, 20), box(20, 0, 40, 20)], now=0.0, settings=SETTINGS)
    still, new = tracker.update([box(20, 0, 40, 20), box(40, 0, 40, 20)], now=0.1, settings=SETTINGS)
    assert still == b and new not in (a, b)


def test_a_result_without_3d_does_not_cost_a_world_track_its_id():
    """A wrist camera pans while a mug stands still in 'world'; one result has no depth for it.
    The track kept only that result's box, and the next 3D result (box moved on) got a new id."""
    tracker = ObjectTracker()
    (first,) = tracker.update([at(0.30, box_x=0)], now=0.0, settings=SETTINGS)
    (blind,) = tracker.update([Observation((10, 0, 30, 20))], now=0.1, settings=SETTINGS)  # IoU 0.33
    (again,) = tracker.update([at(0.301, box_x=25)], now=0.2, settings=SETTINGS)  # IoU with t1 0.14
    assert blind == first and again == first


def test_a_centroid_left_in_the_camera_frame_is_not_given_to_the_tracker():
    """With target_frame set, a result whose TF fell back to the camera frame must not overwrite
    the track's world centroid with a camera-frame one."""
    from qwen3vl_seg_ros.msg import SegmentationResult, SegmentedObject
    from qwen3vl_seg_ros.ros.node import track_observations

    obj = SegmentedObject(has_3d=True)
    obj.centroid.x, obj.box.width, obj.box.height = 0.3, 20, 20
    result = SegmentationResult(geometry_frame_id="camera_optical", objects=[obj])
    assert track_observations(result, "world")[0].centroid is None
    assert track_observations(result, "")[0].frame_id == "camera_optical"
    result.geometry_frame_id = "world"
    assert track_observations(result, "/world")[0].centroid == (0.3, 0.0, 0.0)


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


def test_a_pair_right_on_the_gate_is_matched():
    """A distance equal to track_max_distance_m (or an IoU equal to the threshold) is inside the
    gate: it must not tie with leaving both unmatched."""
    tracker = ObjectTracker()
    (old,) = tracker.update([at(0.0)], now=0.0, settings=SETTINGS)
    (same,) = tracker.update([at(0.05)], now=0.1, settings=SETTINGS)
    assert same == old


def test_ids_start_again_at_one_after_the_uint32_range_skipping_live_ones():
    """track_id is a uint32: past 2^32 - 1 the wire carried 0 ("tracking off"), then old ids."""
    tracker = ObjectTracker()
    (one,) = tracker.update([box(0, 0)], now=0.0, settings=SETTINGS)
    tracker._next_id = tracking.MAX_TRACK_ID
    last, wrapped = tracker.update([box(0, 0), box(100, 0), box(200, 0)], now=0.1, settings=SETTINGS)[1:]
    assert one == 1 and last == tracking.MAX_TRACK_ID and wrapped == 2  # 1 is live: skipped


RED, BLUE = (53.2, 80.1, 67.2), (32.3, 79.2, -107.9)  # CIELAB of pure red and blue


def test_a_new_object_of_another_colour_next_to_a_tracked_one_gets_a_new_id():
    """Position alone gave a blue cup found 3 cm from a tracked red one (not in this result) the
    red one's id, and the red one a new id at its next sighting."""
    tracker = ObjectTracker()
    red = Observation((0, 0, 20, 20), (0.30, 0.0, 1.0), "world", RED)
    blue = Observation((4, 0, 24, 20), (0.33, 0.0, 1.0), "world", BLUE)
    assert tracker.update([red], now=0.0, settings=SETTINGS) == [1]
    assert tracker.update([blue], now=0.1, settings=SETTINGS) == [2]
    assert tracker.update([red, blue], now=0.2, settings=SETTINGS) == [1, 2]
    # a result without 3D for the red one keeps its world centroid, and its colour still guards it
    red_2d = Observation((0, 0, 20, 20), None, "", RED)
    assert tracker.update([red_2d], now=0.25, settings=SETTINGS) == [1]
    assert tracker.update([Observation((4, 0, 24, 20), (0.31, 0.0, 1.0), "world", BLUE)], now=0.26,
                          settings=SETTINGS) == [2]
    # a shade of the same colour (other light) still matches; 0 turns the gate off
    shade = Observation((0, 0, 20, 20), (0.30, 0.0, 1.0), "world", (48.0, 74.0, 60.0))
    assert tracker.update([shade], now=0.3, settings=SETTINGS) == [1]
    off = TrackerSettings(max_colour_distance=0.0)
    assert ObjectTracker().update([red], 0.0, off) == ObjectTracker().update([red], 0.0, off)
    t = ObjectTracker()
    t.update([red], 0.0, off)
    assert t.update([blue], 0.1, off) == [1]  # without colours, position alone decides


def test_mean_colours_read_the_mask_and_fall_back_to_the_box():
    rgb = np.zeros((10, 20, 3), np.uint8)
    rgb[:, :10] = (255, 0, 0)
    rgb[:, 10:] = (0, 0, 255)
    left = np.zeros((10, 20), bool)
    left[2:8, 1:9] = True
    colours = tracking.mean_colours(rgb, [left, None, np.zeros((10, 20), bool)],
                                    [(0, 0, 20, 10), (12, 0, 20, 10), (11.5, 2, 18, 9)])
    np.testing.assert_allclose(colours[0], RED, atol=0.5)
    np.testing.assert_allclose(colours[1], BLUE, atol=0.5)  # no mask: its box
    np.testing.assert_allclose(colours[2], BLUE, atol=0.5)  # an empty mask: its box
    assert tracking.mean_colours(rgb, [], []) == []


def test_a_result_larger_than_the_track_limit_keeps_its_ids(monkeypatch: pytest.MonkeyPatch):
    """Pruning dropped tracks seen in that very update: past the limit, ids changed every result."""
    monkeypatch.setattr(tracking, "MAX_TRACKS", 5)
    tracker = ObjectTracker()
    objects = [box(30 * k, 0) for k in range(8)]
    first = tracker.update(objects, now=0.0, settings=SETTINGS)
    assert tracker.update(objects, now=0.1, settings=SETTINGS) == first == list(range(1, 9))

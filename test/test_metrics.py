"""Metrics against hand-computed values (rectangles whose IoUs are easy to count)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3vl_seg_ros.training.metrics import (
    SegmentationMetrics,
    box_iou_matrix,
    evaluate_sample,
    mask_iou_matrix,
    match_above,
    match_max_iou,
    summarize,
)

H, W = 20, 30


def box_mask(box) -> np.ndarray:
    """The mask of an integer box [x1, y1, x2, y2] (right/bottom edges exclusive)."""
    m = np.zeros((H, W), dtype=bool)
    x1, y1, x2, y2 = (int(v) for v in box)
    m[y1:y2, x1:x2] = True
    return m


def instances(*boxes) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4) and their rectangle masks (N, H, W)."""
    b = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    return b, np.array([box_mask(x) for x in b], dtype=bool).reshape(-1, H, W)


NONE = instances()


def test_box_iou_of_simple_rectangles() -> None:
    a = [[0, 0, 10, 10]]
    b = [[5, 0, 15, 10], [0, 0, 10, 10], [20, 0, 25, 5], [0, 0, 5, 5], [3, 3, 3, 8]]
    # overlaps 50/150, 100/100, 0, 25/100, degenerate (zero area) -> 0
    np.testing.assert_allclose(box_iou_matrix(a, b), [[1 / 3, 1.0, 0.0, 0.25, 0.0]])
    assert box_iou_matrix(np.zeros((0, 4)), b).shape == (0, 5)


def test_mask_iou_of_simple_rectangles() -> None:
    _, a = instances([0, 0, 10, 10], [0, 0, 2, 2])
    _, b = instances([5, 0, 15, 10], [0, 0, 1, 1])
    # [0:10]x[0:10] vs [5:15]x[0:10]: 50 / 150; vs the 1-pixel square: 1 / 100
    # 2x2 square vs [5:15]x[0:10]: 0; vs the 1-pixel square: 1 / 4
    np.testing.assert_allclose(mask_iou_matrix(a, b), [[1 / 3, 0.01], [0.0, 0.25]])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, W - 1), st.integers(0, H - 1), st.integers(1, 10), st.integers(1, 10)),
        min_size=1, max_size=4,
    ),
    st.lists(
        st.tuples(st.integers(0, W - 1), st.integers(0, H - 1), st.integers(1, 10), st.integers(1, 10)),
        min_size=1, max_size=4,
    ),
)
def test_mask_and_box_iou_agree_on_rectangles(a, b) -> None:
    """Two independent computations of the same quantity: pixel counts and box arithmetic."""
    to_boxes = lambda xs: [[x, y, min(x + w, W), min(y + h, H)] for x, y, w, h in xs]  # noqa: E731
    boxes_a, masks_a = instances(*to_boxes(a))
    boxes_b, masks_b = instances(*to_boxes(b))
    np.testing.assert_allclose(mask_iou_matrix(masks_a, masks_b), box_iou_matrix(boxes_a, boxes_b), atol=1e-7)


def test_giou_ciou_precision_and_no_target() -> None:
    m = SegmentationMetrics()
    # 1: IoU 50/150
    m.add(*instances([5, 0, 15, 10]), *instances([0, 0, 10, 10]), "referring")
    # 2: two targets, one predicted mask covering exactly both: 32/32 (as a union)
    pb, _ = instances([0, 0, 14, 14])
    pm = (box_mask([0, 0, 4, 4]) | box_mask([10, 10, 14, 14]))[None]
    m.add(pb, pm, *instances([0, 0, 4, 4], [10, 10, 14, 14]), "multi")
    # 3: no target, nothing predicted -> 1;  4: no target, one instance predicted -> 0
    m.add(None, None, *NONE, "no_target")
    m.add(*instances([0, 0, 3, 3]), *NONE, "no_target")
    s = m.summary()
    assert s["num_samples"] == 4 and s["num_with_target"] == 2 and s["num_no_target"] == 2
    assert s["giou"] == pytest.approx((1 / 3 + 1 + 1 + 0) / 4)
    no_target_pixels = int(instances([0, 0, 3, 3])[1].sum())  # sample 4's predicted mask
    assert s["ciou"] == pytest.approx((50 + 32) / (150 + 32 + no_target_pixels))  # GRES: all samples
    assert s["precision@0.5"] == 0.5 and s["precision@0.7"] == 0.5 and s["precision@0.9"] == 0.5
    assert s["no_target_acc"] == 0.5 and s["no_target_fp_rate"] == 0.5
    assert s["no_target_fp_instances"] == 0.5
    assert s["target_acc"] == 1.0
    # box of sample 1: IoU 1/3 -> miss; sample 2: one box for two targets -> not all matched
    assert s["box_acc@0.5"] == 0.0
    assert s["box_recall@0.5"] == 0.0 and s["box_precision@0.5"] == 0.0
    by = s["by_type"]
    assert set(by) == {"referring", "multi", "no_target"}
    assert by["referring"]["giou"] == pytest.approx(1 / 3) and by["referring"]["no_target_acc"] is None
    assert by["multi"]["ciou"] == 1.0
    assert by["no_target"]["giou"] == 0.5 and by["no_target"]["ciou"] == 0.0


def test_hungarian_matching_where_greedy_fails() -> None:
    # Boxes share rows 0..10, so IoU is the ratio of column overlaps:
    #   p1 = [1, 10): with A = [0, 10) 9/10, with B = [2, 12) 8/11
    #   p2 = [0, 7):  with A 7/10,            with B 5/12
    # Greedy takes p1-A (0.9) first and is left with p2-B (0.42): one hit.
    # One-to-one matching finds p1-B (0.73) and p2-A (0.7): two hits.
    pred = instances([1, 0, 10, 10], [0, 0, 7, 10])
    gt = instances([0, 0, 10, 10], [2, 0, 12, 10])
    np.testing.assert_allclose(box_iou_matrix(pred[0], gt[0]), [[0.9, 8 / 11], [0.7, 5 / 12]])
    result = evaluate_sample(*pred, *gt, "multi")
    assert result.box_matches == 2
    s = summarize([result])
    assert s["box_acc@0.5"] == 1.0 and s["box_recall@0.5"] == 1.0 and s["box_precision@0.5"] == 1.0


def test_matching_prefers_more_hits_over_more_total_iou() -> None:
    iou = np.array([[0.95, 0.55], [0.55, 0.45]])
    # maximum total IoU pairs the diagonal (1.40 > 1.10), but 0.45 is no hit
    rows, cols = match_max_iou(iou)
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 0), (1, 1)]
    rows, cols = match_above(iou, 0.5)
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 1), (1, 0)]
    # with equal hit counts, the larger total IoU wins
    rows, cols = match_above(np.array([[0.9, 0.6], [0.6, 0.8]]), 0.5)
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(0, 0), (1, 1)]


def test_extra_predictions_cost_box_accuracy_and_instance_iou() -> None:
    gt = instances([0, 0, 10, 10], [20, 0, 30, 10])
    # exact copy of the first, the left half of the second (IoU 0.5), and a stray box
    pred = instances([0, 0, 10, 10], [20, 0, 25, 10], [0, 15, 5, 20])
    s = summarize([evaluate_sample(*pred, *gt, "multi")])
    assert s["box_recall@0.5"] == 0.5  # 0.5 is not > 0.5
    assert s["box_precision@0.5"] == pytest.approx(1 / 3)
    assert s["box_acc@0.5"] == 0.0
    assert s["instance_miou"] == pytest.approx((1.0 + 0.5) / 3)
    # per-sample IoU of the unions: (100 + 50) / (200 + 25)
    assert s["giou"] == pytest.approx(150 / 225)
    # the same sample without the stray box: every GT box matched? the second only at 0.5 -> no
    s = summarize([evaluate_sample(*instances([0, 0, 10, 10], [20, 0, 26, 10]), *gt)])
    assert s["box_acc@0.5"] == 1.0 and s["instance_miou"] == pytest.approx((1.0 + 0.6) / 2)


def test_empty_summary_and_bad_inputs() -> None:
    s = SegmentationMetrics().summary()
    assert s["num_samples"] == 0 and s["giou"] is None and s["ciou"] is None and s["by_type"] == {}
    boxes, masks = instances([0, 0, 5, 5])
    with pytest.raises(ValueError, match="disagree"):
        evaluate_sample(boxes, np.concatenate([masks, masks]), *instances([0, 0, 5, 5]))
    with pytest.raises(ValueError, match="predicted masks are"):
        evaluate_sample(boxes, np.zeros((1, H + 1, W), bool), *instances([0, 0, 5, 5]))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        evaluate_sample(boxes, masks[0], *instances([0, 0, 5, 5]))


def test_accumulator_keeps_results_and_resets() -> None:
    m = SegmentationMetrics()
    r = m.add(*instances([0, 0, 10, 10]), *instances([0, 0, 10, 10]))
    assert r.iou == 1.0 and r.query_type == "referring" and len(m) == 1
    assert m.summary()["box_acc@0.5"] == 1.0 and m.summary()["instance_miou"] == 1.0
    m.reset()
    assert len(m) == 0

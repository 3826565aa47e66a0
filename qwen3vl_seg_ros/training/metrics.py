"""Referring-segmentation metrics: gIoU, cIoU, precision@IoU, box accuracy, no-target accuracy.

Definitions (one *sample* = one expression on one image; its ground truth is K >= 0 instances,
its prediction P >= 0 instances, each a box and a mask):

* **per-sample IoU**: IoU of the union of the predicted masks with the union of the ground-truth
  masks. For a *no-target* sample (K = 0) it is 1 if nothing is predicted (P = 0) and 0
  otherwise, as in gRefCOCO; "nothing predicted" means no instance, whatever its mask.
* **gIoU**: mean per-sample IoU over all samples (no-target samples included, scored as above).
* **cIoU**: cumulative intersection / cumulative union of the mask unions, over all samples:
  what is predicted for a no-target sample adds to the union (as in GRES/ReLA's evaluation), so a
  model that paints objects on "nothing there" commands pays for their pixels.
* **precision@t** (t = 0.5, 0.7, 0.9): fraction of samples with targets whose IoU >= t.
* **box matching**: predicted and ground-truth boxes are matched one-to-one (Hungarian) so as
  to make the most pairs with box IoU > 0.5, ties going to the larger total IoU (maximising total
  IoU alone can trade two good pairs for one excellent and one useless pair).

  - **box_acc@0.5**: fraction of samples with targets where *every* ground-truth box is matched
    and no prediction is left over (for one target and one predicted box this is the usual
    REC accuracy at IoU > 0.5);
  - **box_recall@0.5** / **box_precision@0.5**: matched pairs / ground-truth boxes, and matched
    pairs / predicted boxes, over samples with targets.
* **instance_miou**: masks matched one-to-one by Hungarian on mask IoU (maximum total IoU); per
  sample the sum of matched IoUs divided by max(P, K), so misses and extra instances both count
  as 0; mean over samples with targets.
* **no_target_acc**: fraction of no-target samples with no prediction; **no_target_fp_rate** is
  its complement (samples where something was predicted), **no_target_fp_instances** the mean
  number of instances predicted on no-target samples. **target_acc**: fraction of samples with
  targets where something was predicted (gRefCOCO's T-acc).

``summary()`` gives these over all samples and per ``query_type`` (under ``"by_type"``); a metric
over no samples is ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

PRECISION_THRESHOLDS = (0.5, 0.7, 0.9)
BOX_IOU_THRESHOLD = 0.5


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (P, 4) with every box in ``b`` (K, 4), ``[x1, y1, x2, y2]``; (P, K)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def mask_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every mask in ``a`` (P, H, W) with every mask in ``b`` (K, H, W); (P, K).

    One matrix product gives all intersections; float32 counts are exact below 2**24 pixels.
    """
    fa = a.reshape(len(a), int(np.prod(a.shape[1:])))
    fb = b.reshape(len(b), int(np.prod(b.shape[1:])))
    dtype = np.float32 if fa.shape[1] < 2**24 else np.float64
    inter = fa.astype(dtype) @ fb.astype(dtype).T
    area_a = fa.sum(1, dtype=np.float64)
    area_b = fb.sum(1, dtype=np.float64)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros(union.shape), where=union > 0)


def match_above(iou: np.ndarray, threshold: float = BOX_IOU_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs (rows, cols) with IoU > ``threshold``: as many as possible, then the largest total IoU.

    The weight of a pair is ``1 + iou / (n + 1)`` above the threshold (n = the most pairs
    possible) and 0 otherwise, so one more pair always outweighs any IoU gain.
    """
    if iou.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    above = iou > threshold
    weight = np.where(above, 1.0 + iou / (min(iou.shape) + 1), 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    keep = above[rows, cols]
    return rows[keep], cols[keep]


def match_max_iou(iou: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairs (rows, cols) with the largest total IoU (pairs of IoU 0 dropped)."""
    if iou.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    keep = iou[rows, cols] > 0
    return rows[keep], cols[keep]


@dataclass(frozen=True)
class SampleResult:
    """What one sample contributes to the metrics."""

    query_type: str
    num_pred: int
    num_gt: int
    intersection: int  # pixels of (union of predicted masks) & (union of GT masks)
    union: int
    iou: float  # per-sample IoU (no target: 1 if nothing predicted else 0)
    box_matches: int  # one-to-one pairs with box IoU > BOX_IOU_THRESHOLD
    instance_iou_sum: float  # total mask IoU of the Hungarian (max total IoU) pairs


def _as_masks(masks: np.ndarray, name: str) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W), got shape {masks.shape}")
    return masks.astype(bool, copy=False)


def evaluate_sample(
    pred_boxes: np.ndarray | None, pred_masks: np.ndarray | None, gt_boxes: np.ndarray, gt_masks: np.ndarray,
    query_type: str = "referring",
) -> SampleResult:
    """Scores one prediction against its ground truth (see the module docstring for definitions).

    ``pred_boxes`` (P, 4) and ``pred_masks`` (P, H, W) describe the same P instances; ``None``
    means none. Ground truth: ``gt_boxes`` (K, 4), ``gt_masks`` (K, H, W), K = 0 for no target.
    """
    gt_masks = _as_masks(gt_masks, "gt_masks")
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    hw = gt_masks.shape[1:]
    pred_boxes = np.zeros((0, 4)) if pred_boxes is None else np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    pred_masks = np.zeros((len(pred_boxes), *hw), bool) if pred_masks is None else _as_masks(pred_masks, "pred_masks")
    if len(pred_masks) != len(pred_boxes) or len(gt_masks) != len(gt_boxes):
        raise ValueError(
            f"boxes and masks disagree: {len(pred_boxes)} predicted boxes vs {len(pred_masks)} masks, "
            f"{len(gt_boxes)} GT boxes vs {len(gt_masks)} masks"
        )
    if pred_masks.shape[1:] != hw:
        raise ValueError(f"predicted masks are {pred_masks.shape[1:]}, ground truth {hw}")
    num_pred, num_gt = len(pred_boxes), len(gt_boxes)
    pred_union = pred_masks.any(axis=0) if num_pred else np.zeros(hw, bool)
    gt_union = gt_masks.any(axis=0) if num_gt else np.zeros(hw, bool)
    inter = int(np.count_nonzero(pred_union & gt_union))
    union = int(np.count_nonzero(pred_union | gt_union))
    if num_gt == 0:
        iou = 1.0 if num_pred == 0 else 0.0
    else:
        iou = inter / union if union else 1.0  # only if every GT mask is empty and nothing predicted
    box_matches = len(match_above(box_iou_matrix(pred_boxes, gt_boxes))[0])
    mask_iou = mask_iou_matrix(pred_masks, gt_masks)
    rows, cols = match_max_iou(mask_iou)
    return SampleResult(
        query_type=query_type, num_pred=num_pred, num_gt=num_gt, intersection=inter, union=union, iou=iou,
        box_matches=box_matches, instance_iou_sum=float(mask_iou[rows, cols].sum()),
    )


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def summarize(results: list[SampleResult]) -> dict[str, float | int | None]:
    """The metrics of the module docstring over a list of sample results (no breakdown)."""
    num_pred = np.array([r.num_pred for r in results], dtype=np.int64)
    num_gt = np.array([r.num_gt for r in results], dtype=np.int64)
    iou = np.array([r.iou for r in results], dtype=np.float64)
    inter = np.array([r.intersection for r in results], dtype=np.int64)
    union = np.array([r.union for r in results], dtype=np.int64)
    matches = np.array([r.box_matches for r in results], dtype=np.int64)
    inst = np.array([r.instance_iou_sum for r in results], dtype=np.float64)
    tgt = num_gt > 0
    none = ~tgt
    out: dict[str, float | int | None] = {
        "num_samples": len(results),
        "num_with_target": int(tgt.sum()),
        "num_no_target": int(none.sum()),
        "giou": _mean(iou),
        "ciou": _ratio(inter.sum(), union.sum()),
    }
    for t in PRECISION_THRESHOLDS:
        out[f"precision@{t}"] = _mean((iou[tgt] >= t).astype(np.float64))
    all_matched = (matches == num_gt) & (num_pred == num_gt)
    out["box_acc@0.5"] = _mean(all_matched[tgt].astype(np.float64))
    out["box_recall@0.5"] = _ratio(matches[tgt].sum(), num_gt[tgt].sum())
    out["box_precision@0.5"] = _ratio(matches[tgt].sum(), num_pred[tgt].sum())
    out["instance_miou"] = _mean(inst[tgt] / np.maximum(num_pred[tgt], num_gt[tgt]))
    out["target_acc"] = _mean((num_pred[tgt] > 0).astype(np.float64))
    out["no_target_acc"] = _mean((num_pred[none] == 0).astype(np.float64))
    out["no_target_fp_rate"] = _mean((num_pred[none] > 0).astype(np.float64))
    out["no_target_fp_instances"] = _mean(num_pred[none].astype(np.float64))
    return out


class SegmentationMetrics:
    """Accumulates samples and summarises them, overall and per query type.

    Usage: ``m.add(pred_boxes, pred_masks, gt_boxes, gt_masks, query_type)`` per sample, then
    ``m.summary()``. Per-sample results are kept (a few numbers each), so summaries over any
    subset stay exact.
    """

    def __init__(self) -> None:
        self.results: list[SampleResult] = []

    def add(
        self, pred_boxes: np.ndarray | None, pred_masks: np.ndarray | None, gt_boxes: np.ndarray,
        gt_masks: np.ndarray, query_type: str = "referring",
    ) -> SampleResult:
        """Scores and records one sample; returns its result."""
        result = evaluate_sample(pred_boxes, pred_masks, gt_boxes, gt_masks, query_type)
        self.results.append(result)
        return result

    def reset(self) -> None:
        self.results.clear()

    def __len__(self) -> int:
        return len(self.results)

    def summary(self) -> dict:
        """All metrics over every sample, plus ``"by_type"``: the same per query type."""
        out: dict = summarize(self.results)
        types = sorted({r.query_type for r in self.results})
        out["by_type"] = {t: summarize([r for r in self.results if r.query_type == t]) for t in types}
        return out

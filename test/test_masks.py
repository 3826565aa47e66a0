"""Weight-free mask heads on synthetic scenes whose true masks are known."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from qwen3vl_seg_ros.masks import (
    box_head,
    box_mask,
    box_pixels,
    depth_mask,
    grabcut_mask,
    valid_depth_fraction,
    weight_free_mask,
)

H, W = 120, 160


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def disk_scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A red disk on a textured green-grey table; returns image, true mask, box."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((H, W, 3), np.uint8)
    rgb[...] = (90, 140, 90)
    rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((H, W), np.uint8)
    cv2.circle(truth, (80, 60), 25, 1, -1)
    truth = truth.astype(bool)
    rgb[truth] = (210, 30, 30)
    box = np.array([53.0, 33.0, 107.0, 87.0], np.float32)
    return rgb, truth, box


def test_box_pixels_and_box_mask_follow_edge_convention() -> None:
    assert box_pixels(np.array([10.0, 20.0, 30.0, 40.0]), H, W) == (10, 20, 30, 40)
    assert box_pixels(np.array([-5.0, -5.0, 500.0, 500.0]), H, W) == (0, 0, W, H)
    mask = box_mask((H, W), np.array([10.2, 20.0, 29.5, 40.0]))
    assert mask.sum() == 20 * 20  # floor of the left edge, ceil of the right one
    assert mask[20, 10] and not mask[19, 10] and mask[39, 29] and not mask[40, 29]


def test_grabcut_finds_the_disk_and_scores_it_above_noise() -> None:
    rgb, truth, box = disk_scene()
    estimate = grabcut_mask(rgb, box)
    assert estimate.source == "grabcut"
    assert estimate.mask.shape == (H, W) and estimate.mask.dtype == bool
    assert iou(estimate.mask, truth) > 0.85
    assert not estimate.mask[~box_mask((H, W), box)].any()
    noise = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    assert 0.0 <= grabcut_mask(noise, box).score < estimate.score <= 1.0


def test_grabcut_with_box_covering_whole_image() -> None:
    rgb, truth, _ = disk_scene()
    estimate = grabcut_mask(rgb, np.array([0.0, 0.0, W, H], np.float32))
    assert estimate.mask.any()
    assert estimate.source in ("grabcut", "box")


def depth_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A box-shaped object at 0.6 m in front of a wall at 1.2 m, with some missing readings."""
    depth = np.full((H, W), 1.2, np.float32)
    truth = np.zeros((H, W), bool)
    truth[40:80, 60:110] = True
    depth[truth] = 0.6
    depth[::7, ::5] = np.nan
    return depth, truth, np.array([58.0, 38.0, 112.0, 82.0], np.float32)


def test_depth_mask_segments_the_near_object() -> None:
    depth, truth, box = depth_scene()
    estimate = depth_mask(depth, box)
    assert estimate is not None and estimate.source == "depth"
    assert iou(estimate.mask, truth) > 0.9
    assert 0.5 < estimate.score <= 1.0


def test_depth_mask_needs_valid_depth() -> None:
    depth, _, box = depth_scene()
    depth[30:90, 50:120] = np.nan
    assert valid_depth_fraction(depth, box) == 0.0
    assert depth_mask(depth, box) is None


def test_depth_score_is_low_when_the_box_is_all_one_depth() -> None:
    flat = np.full((H, W), 0.8, np.float32)
    depth, _, box = depth_scene()
    good = depth_mask(depth, box)
    bad = depth_mask(flat, box)
    assert good is not None and bad is not None
    assert bad.score < good.score


def test_box_head_score_reflects_contrast() -> None:
    rgb, _, box = disk_scene()
    flat = np.full_like(rgb, 128)
    assert box_head(rgb, box).score > box_head(flat, box).score
    assert box_head(rgb, box).mask.sum() == 54 * 54


@pytest.mark.parametrize(("head", "with_depth", "expected"), [
    ("auto", True, "depth"), ("auto", False, "grabcut"), ("depth", False, "grabcut"),
    ("grabcut", True, "grabcut"), ("box", True, "box"),
])
def test_weight_free_mask_chooses_head(head: str, with_depth: bool, expected: str) -> None:
    rgb, _, box = disk_scene()
    depth = np.full((H, W), 1.0, np.float32)
    depth[35:85, 55:105] = 0.5
    estimate = weight_free_mask(head, rgb, box, depth if with_depth else None)
    assert estimate.source == expected


def test_weight_free_mask_rejects_unknown_head() -> None:
    rgb, _, box = disk_scene()
    with pytest.raises(ValueError, match="unknown"):
        weight_free_mask("sam", rgb, box)

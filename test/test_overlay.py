"""The overlay people look at: masks, boxes and readable labels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from qwen3vl_seg_ros.overlay import colours_for, draw_overlay, label_image
from qwen3vl_seg_ros.types import Instance

H, W = 120, 160


def _instance(box: tuple[int, int, int, int], label: str = "yellow can", score: float = 0.64) -> Instance:
    mask = np.zeros((H, W), bool)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = True
    return Instance(box=np.array(box, np.float32), label=label, score=score, mask=mask, mask_source="decoder")


@pytest.mark.parametrize("box", [(140, 40, 160, 60), (0, 40, 20, 60), (70, 0, 90, 20)])
def test_the_whole_label_stays_inside_the_image(box: tuple[int, int, int, int]) -> None:
    """A box at the image's edge keeps its label (id, name and score) readable, not cut off."""
    out = draw_overlay(np.full((H, W, 3), 90, np.uint8), [_instance(box)])
    colour = colours_for([1])[0][::-1]  # id 1, BGR
    font_scale = max(0.35, min(H, W) / 900)
    (tw, th), _ = cv2.getTextSize("1:yellow can 0.64", cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    filled = np.all(out == colour, axis=-1)
    x1, y1, x2, y2 = box
    filled[y1 + 2:y2 - 1, x1 + 2:x2 - 1] = False  # the mask's tint inside the box is not the label
    columns = np.flatnonzero(filled.any(axis=0))
    assert columns.size and columns.max() - columns.min() + 1 >= tw, (columns.min(), columns.max(), tw)


def test_masks_are_tinted_and_label_image_numbers_objects() -> None:
    a, b = _instance((10, 10, 40, 40)), _instance((30, 30, 60, 60), "mug", 0.3)
    labels = label_image([a.mask, b.mask], H, W)
    assert labels[20, 20] == 1 and labels[50, 50] == 2 and labels[100, 100] == 0
    assert labels[35, 35] == 1  # an overlap goes to the earlier (better-scored) object
    rgb = np.full((H, W, 3), 90, np.uint8)
    out = draw_overlay(rgb, [a, b], alpha=0.5)
    assert not np.array_equal(out[50, 50], rgb[50, 50])  # tinted inside a mask
    np.testing.assert_array_equal(out[100, 100], rgb[100, 100])  # untouched outside

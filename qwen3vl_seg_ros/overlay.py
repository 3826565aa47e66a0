"""Drawing results for people: label images and the overlay (masks, boxes, labels, scores).

Shared by the node (``~/overlay``, ``~/mask``), the demo and the evaluation figures, so that
what a user sees in RViz and in a report is drawn the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from qwen3vl_seg_ros.types import Instance


def colours_for(keys: Sequence[int]) -> np.ndarray:
    """One bright RGB colour (uint8, ``(n, 3)``) per key, the same for a key everywhere: the
    overlay, the RViz markers and the demo's figures all colour an object by its key (the track id,
    or the object id when untracked), so one object looks the same in every view. Golden-angle
    hues keep neighbouring keys far apart."""
    k = np.asarray(keys, dtype=np.float64).reshape(-1)
    hue = (k * 137.508) % 360.0
    hsv = np.stack([hue / 2.0, np.full_like(hue, 220.0), np.full_like(hue, 255.0)], axis=-1)
    return cv2.cvtColor(hsv.astype(np.uint8).reshape(-1, 1, 3), cv2.COLOR_HSV2RGB).reshape(-1, 3)


def label_image(masks: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """0 for background, k for object k (1-based, in the order given); an overlap goes to the
    earlier object (the node lists objects best score first, so to the better one; each object's
    own mask in the result keeps every pixel).

    uint8 while the ids fit, uint16 beyond 255 objects.
    """
    dtype = np.uint8 if len(masks) <= 255 else np.uint16
    labels = np.zeros((height, width), dtype=dtype)
    for k in range(len(masks), 0, -1):  # the earliest painted last: it wins
        if masks[k - 1] is not None:
            labels[masks[k - 1]] = k
    return labels


def draw_overlay(
    rgb: np.ndarray,
    instances: Sequence[Instance],
    alpha: float = 0.5,
    ids: Sequence[int] | None = None,
    colour_keys: Sequence[int] | None = None,
) -> np.ndarray:
    """Returns a **BGR** image (ready for ``bgr8`` and ``cv2.imwrite``) with masks, boxes and labels.

    Labels show ``ids`` (1..n by default); colours follow ``colour_keys`` (default: ``ids``), which
    the node sets to the track ids so that an object keeps its colour from result to result.
    """
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if not instances:
        return bgr
    h, w = rgb.shape[:2]
    ids = list(ids) if ids is not None else list(range(1, len(instances) + 1))
    colours_rgb = colours_for(colour_keys if colour_keys is not None else ids)
    labels = label_image([inst.mask for inst in instances], h, w)
    inside = labels > 0
    if inside.any():
        # Map label k -> colour of instance k's id in one vectorised lookup.
        lut = np.zeros((len(instances) + 1, 3), dtype=np.uint8)
        lut[1:] = colours_rgb[:, ::-1]
        tint = lut[labels[inside]]
        bgr[inside] = (bgr[inside] * (1.0 - alpha) + tint * alpha).astype(np.uint8)
    thickness = max(1, round(min(h, w) / 240))
    font_scale = max(0.35, min(h, w) / 900)
    for inst, obj_id, rgb_colour in zip(instances, ids, colours_rgb):
        colour = tuple(int(c) for c in rgb_colour[::-1])
        x1, y1, x2, y2 = (round(float(v)) for v in inst.box)
        cv2.rectangle(bgr, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), colour, thickness)
        text = f"{obj_id}:{_ascii(inst.label)} {inst.score:.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = y1 - 3 if y1 - th - base - 3 >= 0 else min(h - 1, y1 + th + 3)
        tx = max(0, min(x1, w - tw - 3))  # a box at the right edge would cut its score off
        cv2.rectangle(bgr, (tx, ty - th - 2), (tx + tw + 2, ty + base - 1), colour, -1)
        cv2.putText(bgr, text, (tx + 1, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return bgr


def _ascii(text: str, limit: int = 40) -> str:
    """OpenCV's Hershey fonts draw ASCII only; replace the rest rather than drawing '?' boxes."""
    clean = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    return clean if len(clean) <= limit else clean[: limit - 1] + "~"

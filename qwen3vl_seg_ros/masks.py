"""Weight-free mask heads: a mask inside a box without a trained decoder.

They let the package give usable masks with a plain Qwen3-VL-Instruct checkpoint (boxes only),
at a lower quality than the trained decoder:

* ``grabcut``: OpenCV GrabCut on a crop around the box (colour models of object and
  surroundings); fails on objects coloured like their background.
* ``depth``: with an aligned depth image, the pixels at the depth of the box centre, connected
  to the centre; fails where the object touches something at the same depth (the table under it).
* ``box``: the box itself, the last resort.

Each head also returns a heuristic mask score in 0..1 computed from the data (documented per
head) so that results can still be ranked; it is not a calibrated IoU like the decoder's.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: Mask heads that need no weights.
WEIGHT_FREE_HEADS = ("grabcut", "depth", "box")

#: Fraction of valid depth readings a box needs for the depth head.
MIN_VALID_DEPTH_FRACTION = 0.5


@dataclass
class MaskEstimate:
    """A full-image mask, its heuristic score and the head that made it."""

    mask: np.ndarray  # (H, W) bool
    score: float  # 0..1
    source: str  # "decoder", "grabcut", "depth" or "box"
    box: np.ndarray | None = None  # (4,) the box the mask refined (decoder passes); None: the given box stands


def box_pixels(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """Integer pixel bounds (exclusive right/bottom) of a float box, clipped, at least 1 pixel."""
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box).reshape(4))
    ix1 = int(np.clip(np.floor(x1), 0, width - 1))
    iy1 = int(np.clip(np.floor(y1), 0, height - 1))
    ix2 = int(np.clip(np.ceil(x2), ix1 + 1, width))
    iy2 = int(np.clip(np.ceil(y2), iy1 + 1, height))
    return ix1, iy1, ix2, iy2


def mask_box(mask: np.ndarray) -> np.ndarray:
    """``[x1, y1, x2, y2]`` (exclusive right/bottom) of a mask; zeros for an empty mask."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return np.zeros(4, dtype=np.float32)
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


def box_mask(shape: tuple[int, int], box: np.ndarray) -> np.ndarray:
    """The box as a full-image mask."""
    height, width = shape
    x1, y1, x2, y2 = box_pixels(box, height, width)
    mask = np.zeros((height, width), dtype=bool)
    mask[y1:y2, x1:x2] = True
    return mask


def _context(box: tuple[int, int, int, int], height: int, width: int, margin: float) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    mx = round((x2 - x1) * margin) + 4
    my = round((y2 - y1) * margin) + 4
    return max(0, x1 - mx), max(0, y1 - my), min(width, x2 + mx), min(height, y2 + my)


def colour_separation(rgb: np.ndarray, inside: np.ndarray, outside: np.ndarray) -> float:
    """Bhattacharyya distance (0 same, 1 disjoint) of the colour histograms of two pixel sets."""
    if inside.sum() < 4 or outside.sum() < 4:
        return 0.0
    hists = []
    for region in (inside, outside):
        hist = cv2.calcHist([rgb], [0, 1, 2], region.astype(np.uint8), [8, 8, 8], [0, 256] * 3)
        hists.append(cv2.normalize(hist, hist).flatten())
    return float(np.clip(cv2.compareHist(hists[0], hists[1], cv2.HISTCMP_BHATTACHARYYA), 0.0, 1.0))


def _largest_component(mask: np.ndarray, seed: np.ndarray | None = None) -> np.ndarray:
    """The connected component with most pixels (among those touching ``seed``, if given)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros_like(mask, dtype=bool)
    candidates = range(1, count)
    if seed is not None:
        touching = set(np.unique(labels[seed & mask]).tolist()) - {0}
        candidates = sorted(touching) or candidates
    best = max(candidates, key=lambda i: stats[i, cv2.CC_STAT_AREA])
    return labels == best


def fill_score(fill: float) -> float:
    """Plausibility of a mask covering ``fill`` of its box: 0 for empty or the whole box."""
    return float(np.clip(min(fill / 0.2, (1.0 - fill) / 0.02), 0.0, 1.0))


def grabcut_mask(rgb: np.ndarray, box: np.ndarray, iterations: int = 3, max_side: int = 256) -> MaskEstimate:
    """GrabCut inside ``box``, learning the background from a margin around it.

    Score: colour separation of mask and surroundings (Bhattacharyya distance) times
    :func:`fill_score` of the mask in its box. An empty result falls back to the box head.
    """
    height, width = rgb.shape[:2]
    bx = box_pixels(box, height, width)
    cx1, cy1, cx2, cy2 = _context(bx, height, width, margin=0.25)
    crop = np.ascontiguousarray(rgb[cy1:cy2, cx1:cx2])
    scale = min(1.0, max_side / max(crop.shape[:2]))
    small = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else crop
    sh, sw = small.shape[:2]
    if sh < 3 or sw < 3:
        return box_head(rgb, box)
    init = np.full((sh, sw), cv2.GC_BGD, dtype=np.uint8)
    rx1, ry1 = int((bx[0] - cx1) * scale), int((bx[1] - cy1) * scale)
    rx2, ry2 = max(rx1 + 1, int(np.ceil((bx[2] - cx1) * scale))), max(ry1 + 1, int(np.ceil((bx[3] - cy1) * scale)))
    init[ry1:ry2, rx1:rx2] = cv2.GC_PR_FGD
    if not (init == cv2.GC_BGD).any():  # the box covers the image: its rim must model background
        init[[0, -1], :] = cv2.GC_PR_BGD
        init[:, [0, -1]] = cv2.GC_PR_BGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(cv2.cvtColor(small, cv2.COLOR_RGB2BGR), init, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return box_head(rgb, box)
    fg = (init == cv2.GC_FGD) | (init == cv2.GC_PR_FGD)
    fg = cv2.resize(fg.astype(np.uint8), (cx2 - cx1, cy2 - cy1), interpolation=cv2.INTER_NEAREST).astype(bool)
    mask = np.zeros((height, width), dtype=bool)
    mask[cy1:cy2, cx1:cx2] = fg
    mask &= box_mask((height, width), box)
    mask = _largest_component(mask)
    if not mask.any():
        return box_head(rgb, box)
    context = np.zeros_like(mask)
    context[cy1:cy2, cx1:cx2] = True
    fill = mask.sum() / float((bx[2] - bx[0]) * (bx[3] - bx[1]))
    score = colour_separation(rgb, mask, context & ~mask) * fill_score(fill)
    return MaskEstimate(mask, score, "grabcut")


def valid_depth_fraction(depth: np.ndarray, box: np.ndarray) -> float:
    """Fraction of finite, positive depth readings inside the box."""
    x1, y1, x2, y2 = box_pixels(box, *depth.shape[:2])
    patch = depth[y1:y2, x1:x2]
    return float(np.mean(np.isfinite(patch) & (patch > 0))) if patch.size else 0.0


def depth_mask(
    depth: np.ndarray, box: np.ndarray, rel_tolerance: float = 0.08, min_tolerance_m: float = 0.02
) -> MaskEstimate | None:
    """The depth foreground inside ``box``: pixels within a tolerance of the centre's depth.

    The object's depth is the median of the central third of the box; pixels within
    ``max(min_tolerance_m, rel_tolerance * depth)`` of it, connected to the centre, form the
    mask. Returns None when fewer than :data:`MIN_VALID_DEPTH_FRACTION` of the box has depth.
    Score: valid-depth fraction times the fraction of the box border *not* in the mask (an
    object separated from its surroundings leaves the border free), times :func:`fill_score`.
    """
    height, width = depth.shape[:2]
    if valid_depth_fraction(depth, box) < MIN_VALID_DEPTH_FRACTION:
        return None
    x1, y1, x2, y2 = box_pixels(box, height, width)
    patch = depth[y1:y2, x1:x2].astype(np.float32)
    valid = np.isfinite(patch) & (patch > 0)
    ph, pw = patch.shape
    centre = np.zeros_like(valid)
    centre[ph // 3: max(ph // 3 + 1, 2 * ph // 3), pw // 3: max(pw // 3 + 1, 2 * pw // 3)] = True
    central = patch[centre & valid]
    if central.size == 0:
        return None
    d0 = float(np.median(central))
    tolerance = max(min_tolerance_m, rel_tolerance * d0)
    near = valid & (np.abs(np.where(valid, patch, d0 + 10 * tolerance) - d0) <= tolerance)
    near = _largest_component(near, seed=centre)
    if not near.any():
        return None
    near = cv2.morphologyEx(near.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8)).astype(bool)
    border = np.ones_like(valid)
    border[1:-1, 1:-1] = False
    free_border = 1.0 - float(near[border].mean())
    score = float(valid.mean()) * free_border * fill_score(float(near.mean()))
    mask = np.zeros((height, width), dtype=bool)
    mask[y1:y2, x1:x2] = near
    return MaskEstimate(mask, score, "depth")


def box_head(rgb: np.ndarray, box: np.ndarray) -> MaskEstimate:
    """The box as mask. Score: colour separation of the box from a ring around it (a box
    tight on a distinct object differs from its surroundings)."""
    height, width = rgb.shape[:2]
    mask = box_mask((height, width), box)
    cx1, cy1, cx2, cy2 = _context(box_pixels(box, height, width), height, width, margin=0.25)
    ring = np.zeros_like(mask)
    ring[cy1:cy2, cx1:cx2] = True
    return MaskEstimate(mask, colour_separation(rgb, mask, ring & ~mask), "box")


def weight_free_mask(head: str, rgb: np.ndarray, box: np.ndarray, depth: np.ndarray | None = None) -> MaskEstimate:
    """Runs a weight-free head; ``"auto"`` is depth where the box has depth, else GrabCut.

    A ``"depth"`` head without usable depth in the box falls back to GrabCut; the returned
    ``source`` always names the head that made the mask.
    """
    if head not in (*WEIGHT_FREE_HEADS, "auto"):
        raise ValueError(f"unknown weight-free mask head {head!r}; use one of {WEIGHT_FREE_HEADS} or 'auto'")
    if head == "box":
        return box_head(rgb, box)
    if head in ("depth", "auto") and depth is not None:
        estimate = depth_mask(depth, box)
        if estimate is not None:
            return estimate
    return grabcut_mask(rgb, box)

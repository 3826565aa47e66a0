"""Depth -> per-object 3D points, robust filtering, centroids and oriented boxes. No ROS here.

Frames and conventions
----------------------
Points are computed in the camera's **optical frame** (x right, y down, z forward, metres), the
frame of the depth image, which must be registered to the colour image (same frame_id; see
:func:`depth_frame_mismatch`). Depth values are the z coordinate (distance along the optical
axis, REP 118), not the length of the ray. Pixel ``(u, v)`` (column, row) is the pixel *centre*,
and ``K`` follows the OpenCV/ROS convention in which the first pixel's centre is at (0, 0).

A pixel back-projects to ``x = (u - cx) * z / fx``, ``y = (v - cy) * z / fy``, ``z``.

Per object (:func:`extract_objects`)
-------------------------------------
1. The mask (colour-image resolution) is sampled at the depth pixels' centres.
2. Its edge is eroded by ``erode_px`` *depth* pixels: depth at object borders mixes foreground
   and background ("flying pixels"). A mask too thin to survive erosion is used un-eroded, with a
   warning in ``reason``.
3. Depths outside ``[min_depth_m, max_depth_m]`` are dropped.
4. Depths are clustered along z: a histogram with bins of ``cluster_gap_m / 2``; bins holding
   fewer than 0.2 % of the points count as empty (they are the sparse flying pixels that bridge
   an object and its background), and runs of non-empty bins are clusters. Of the clusters that
   hold at least ``cluster_min_fraction`` of the points, the **nearest** is kept: a mask that
   leaks onto the table or wall behind an object still gives the object, while a few stray pixels
   in front do not win. ``cluster_gap_m = 0`` turns clustering off.
5. Outlier depths are rejected around a robust centre (the median, or the histogram mode for
   ``outlier_method="mode"``): kept when ``|z - centre| <= outlier_threshold * s`` with ``s`` the
   scaled MAD (1.4826 MAD, the standard deviation for Gaussian noise), floored at
   ``outlier_min_spread_m`` so that a flat, fronto-parallel object (MAD ~ 0) keeps its points.
6. Fewer than ``min_points`` points left -> ``ok=False`` with the reason.
7. The kept pixels are back-projected (optionally transformed to a target frame), and the
   centroid (mean) and an oriented box are computed on all of them; the output cloud is then
   optionally voxel-downsampled.

Oriented box
------------
``box_method="upright"`` (default): the box's z axis is the "up" direction (``up_axis_camera``
for camera-frame output, ``up_axis_target`` when a transform is given); its x and y axes are
the minimum-area rectangle enclosing the points projected on the plane normal to up (every
convex-hull edge direction is tried; the hull comes from OpenCV after an exact octagon
pre-filter), x along the longer side; its z extent is the points' extent along up. For objects
standing on a table this is the box a grasp planner wants: yaw only, and stable when only one
side is visible, unlike PCA whose axes swing with the visible part.
``box_method="pca"``: the axes are the principal axes of the points (x the largest variance).

The box centre is the centre of the extents (not the centroid). Signs are deterministic: an
upright box's x has a positive component along the frame axis least aligned with up (for the
default camera up -y that is the camera's x; for a z-up target frame its x); a PCA box's x and
y each have a positive largest component. y = z cross x, so the rotation is right-handed. The box
covers the visible surface only: its far side ends at the last visible point.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from qwen3vl_seg_ros.cloud import DEFAULT_COLOR, voxel_downsample_points
from qwen3vl_seg_ros.transforms import Transform, quat_of_rotation
from qwen3vl_seg_ros.types import CameraIntrinsics, InputError

#: Depth encodings accepted from sensor_msgs/Image, with the factor from raw units to metres.
DEPTH_ENCODINGS: dict[str, float] = {"16UC1": 1e-3, "mono16": 1e-3, "32FC1": 1.0}
OUTLIER_METHODS = ("mad", "mode", "none")
BOX_METHODS = ("upright", "pca")

#: Scale of the median absolute deviation to a Gaussian standard deviation.
_MAD_TO_SIGMA = 1.4826
#: Depth-histogram bins with fewer than this fraction of the points count as empty (step 4).
_SPARSE_BIN_FRACTION = 0.002
#: Histogram bin of the "mode" outlier centre when clustering is off (cluster_gap_m = 0).
_DEFAULT_MODE_BIN_M = 0.01
#: The smallest non-zero cluster gap or voxel size: below it, depth / length overflows the
#: integer bins (1e-20 m gave a negative bin count, or one voxel for the whole cloud).
MIN_LENGTH_M = 1e-6


# ---------------------------------------------------------------------------------------------
# configuration and results
# ---------------------------------------------------------------------------------------------
@dataclass
class GeometryConfig:
    """Parameters of the per-object geometry (filled from the node's 3D parameters)."""

    erode_px: int = 2  # mask erosion, in depth pixels
    outlier_method: str = "mad"  # one of OUTLIER_METHODS
    outlier_threshold: float = 3.0  # in robust standard deviations
    outlier_min_spread_m: float = 0.005  # floor of the robust spread (sensor noise)
    cluster_gap_m: float = 0.03  # depth gap that separates two surfaces; 0 = no clustering
    cluster_min_fraction: float = 0.2  # a cluster with less of the points is never "dominant"
    min_points: int = 50  # fewer valid points -> no 3D for this object
    min_depth_m: float = 0.1
    max_depth_m: float = 10.0
    voxel_size_m: float = 0.0  # 0 = publish every point
    box_method: str = "upright"  # one of BOX_METHODS
    up_axis_camera: tuple[float, float, float] = (0.0, -1.0, 0.0)  # image "up" for a level camera
    up_axis_target: tuple[float, float, float] = (0.0, 0.0, 1.0)  # REP 103: z up

    def validate(self) -> None:
        """Raises :class:`InputError` naming the first bad parameter."""
        checks = [
            (self.erode_px >= 0, "erode_px must be >= 0"),
            (self.outlier_method in OUTLIER_METHODS, f"outlier_method must be one of {OUTLIER_METHODS}"),
            (self.outlier_threshold > 0, "outlier_threshold must be > 0"),
            (self.outlier_min_spread_m >= 0, "outlier_min_spread_m must be >= 0"),
            (self.cluster_gap_m == 0 or self.cluster_gap_m >= MIN_LENGTH_M,
             f"cluster_gap_m must be 0 (no clustering) or at least {MIN_LENGTH_M:g} m"),
            (0.0 <= self.cluster_min_fraction <= 1.0, "cluster_min_fraction must be in [0, 1]"),
            (self.min_points >= 1, "min_points must be >= 1"),
            (0.0 <= self.min_depth_m < self.max_depth_m, "need 0 <= min_depth_m < max_depth_m"),
            (self.voxel_size_m == 0 or self.voxel_size_m >= MIN_LENGTH_M,
             f"voxel_size_m must be 0 (no downsampling) or at least {MIN_LENGTH_M:g} m"),
            (self.box_method in BOX_METHODS, f"box_method must be one of {BOX_METHODS}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"geometry parameter: {message}")
        for name in ("up_axis_camera", "up_axis_target"):
            axis = np.asarray(getattr(self, name), dtype=np.float64)
            if axis.shape != (3,) or not np.all(np.isfinite(axis)) or np.linalg.norm(axis) < 1e-9:
                raise InputError(f"geometry parameter: {name} must be a non-zero 3-vector")


def _empty_points() -> np.ndarray:
    return np.zeros((0, 3), dtype=np.float32)


def _empty_colors() -> np.ndarray:
    return np.zeros((0, 3), dtype=np.uint8)


@dataclass
class ObjectGeometry:
    """3D description of one object; ``ok=False`` means no 3D and ``reason`` says why.

    When ``ok`` is True, ``reason`` may hold a warning. ``num_points`` counts the filtered points
    the centroid and box were computed from; ``points`` may hold fewer after voxel downsampling.
    """

    ok: bool
    reason: str = ""
    points: np.ndarray = field(default_factory=_empty_points)  # Nx3 float32
    colors: np.ndarray = field(default_factory=_empty_colors)  # Nx3 uint8 RGB
    centroid: np.ndarray = field(default_factory=lambda: np.zeros(3))
    box_center: np.ndarray = field(default_factory=lambda: np.zeros(3))
    box_quaternion: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 0.0, 1.0]))
    box_size: np.ndarray = field(default_factory=lambda: np.zeros(3))  # full edge lengths x, y, z
    num_points: int = 0

    @classmethod
    def failure(cls, reason: str) -> ObjectGeometry:
        return cls(ok=False, reason=reason)

    def transformed(self, transform: Transform) -> ObjectGeometry:
        """The same geometry expressed in another frame (a rigid motion of points and box).

        The box keeps its shape; for a gravity-aligned upright box in the new frame, pass the
        transform to :func:`extract_objects` instead.
        """
        if not self.ok:
            return self
        center, quat = transform.apply_pose(self.box_center, self.box_quaternion)
        return replace(
            self,
            points=transform.apply(self.points.astype(np.float32, copy=False)),
            centroid=transform.apply(self.centroid.astype(np.float64)),
            box_center=center,
            box_quaternion=quat,
        )


# ---------------------------------------------------------------------------------------------
# depth images and intrinsics
# ---------------------------------------------------------------------------------------------
def depth_from_raw(raw: np.ndarray, encoding: str) -> np.ndarray:
    """Converts a raw depth image to ``HxW float32`` metres with NaN where there is no reading.

    "16UC1"/"mono16" hold millimetres, "32FC1" metres (the unit comes from the encoding, as in
    depth_image_proc). 0, NaN, +-inf and negative values all mean "no reading".
    """
    if encoding not in DEPTH_ENCODINGS:
        raise InputError(
            f"depth encoding '{encoding}' is not supported; use 16UC1 or mono16 (millimetres) "
            "or 32FC1 (metres)"
        )
    arr = np.asarray(raw)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise InputError(f"a depth image is HxW (one channel), got shape {arr.shape}")
    if encoding == "32FC1":
        if arr.dtype.kind != "f":
            raise InputError(f"32FC1 depth must be floating point, got dtype {arr.dtype}")
        depth = arr.astype(np.float32)  # always a copy: NaNs are written below
        valid = (depth > 0.0) & (depth < np.inf)  # False for NaN, 0, negatives and inf
        depth[~valid] = np.nan
        return depth
    if arr.dtype.kind != "u" or arr.dtype.itemsize != 2:
        raise InputError(f"{encoding} depth must be 16-bit unsigned, got dtype {arr.dtype}")
    # Divide (not multiply by 0.001f): float32(mm) / 1000 is the correctly rounded metre value,
    # the same a 32FC1 driver would produce for the same reading.
    depth = np.divide(arr, np.float32(1000.0), dtype=np.float32)
    depth[arr == 0] = np.nan
    return depth


def _aspect(size: tuple[int, int]) -> float:
    return float(size[0]) / float(size[1])


def _same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether one of ``a`` and ``b`` is the other resized by one factor, each side rounded
    (down, up or to the nearest pixel).

    Why not a relative tolerance: 1 % let RealSense's native depth (848x480, another sensor with
    another field of view) pass for a resize of its 1280x720 colour image (0.6 % apart).
    """
    return _is_resize(a, b) or _is_resize(b, a)


def _is_resize(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Whether some factor s gives both sides of ``a`` within a pixel of ``b``'s times s: the
    ranges of s that each side allows overlap."""
    (aw, ah), (bw, bh) = a, b
    return max((aw - 1) / bw, (ah - 1) / bh) <= min((aw + 1) / bw, (ah + 1) / bh)


def resolve_depth_intrinsics(
    image_size: tuple[int, int],
    depth_size: tuple[int, int],
    intrinsics: CameraIntrinsics,
) -> CameraIntrinsics:
    """Intrinsics of the depth image, from the colour camera's CameraInfo.

    Sizes are ``(width, height)``. A depth image registered to the colour camera but at another
    resolution (a common driver setting) sees the same field of view, so the intrinsics scale
    with it. A different aspect ratio means the depth is *not* such an image (another sensor,
    cropped, or unregistered): that is an error, never a guess.
    """
    if not intrinsics.is_valid():
        raise InputError(
            f"camera_info is unusable: need finite fx, fy > 0 and a non-zero size, got fx={intrinsics.fx}, "
            f"fy={intrinsics.fy}, cx={intrinsics.cx}, cy={intrinsics.cy}, "
            f"{intrinsics.width}x{intrinsics.height}"
        )
    iw, ih = (int(v) for v in image_size)
    dw, dh = (int(v) for v in depth_size)
    if min(iw, ih, dw, dh) <= 0:
        raise InputError(f"empty image ({iw}x{ih}) or depth image ({dw}x{dh})")
    cam = (intrinsics.width, intrinsics.height)
    if not _same_aspect(cam, (iw, ih)):
        raise InputError(
            f"camera_info is for a {cam[0]}x{cam[1]} image but the colour image is {iw}x{ih} "
            "(another aspect ratio): the camera_info topic does not belong to this image"
        )
    if not _same_aspect((dw, dh), (iw, ih)):
        raise InputError(
            f"depth image is {dw}x{dh} but the colour image is {iw}x{ih}: the aspect ratios "
            f"({_aspect((dw, dh)):.4f} vs {_aspect((iw, ih)):.4f}) differ, so the depth is not "
            "registered to the colour image; use a depth topic aligned to the colour camera "
            "(e.g. aligned_depth_to_color) or the same resolution"
        )
    if cam == (dw, dh):
        return intrinsics
    return intrinsics.scaled_to(dw, dh)


def depth_frame_mismatch(image_frame_id: str, depth_frame_id: str) -> str:
    """Why depth and colour must not be combined, or "" when their frames agree.

    A registered depth image carries the colour camera's optical frame. Different frames mean the
    depth pixel (u, v) is not the colour pixel (u, v); mixing them puts objects in the wrong
    place. Empty frame ids cannot be checked and pass (the caller may warn).
    """
    img, dep = image_frame_id.lstrip("/"), depth_frame_id.lstrip("/")
    if not img or not dep or img == dep:
        return ""
    return (
        f"depth frame '{dep}' differs from the colour image frame '{img}': the depth is not "
        "registered to the colour image; use a depth topic aligned to the colour camera "
        "(e.g. aligned_depth_to_color/image_raw)"
    )


def index_map(n_dst: int, n_src: int) -> np.ndarray:
    """For each of ``n_dst`` pixels, the nearest of ``n_src`` pixels covering the same span.

    Pixel centres: destination pixel ``i`` sits at source coordinate ``(i + 0.5) * s - 0.5``.
    """
    if n_dst == n_src:
        return np.arange(n_dst, dtype=np.intp)
    idx = np.floor((np.arange(n_dst) + 0.5) * (n_src / n_dst)).astype(np.intp)
    return np.minimum(idx, n_src - 1)


def mask_to_depth_resolution(mask: np.ndarray, depth_shape: tuple[int, int]) -> np.ndarray:
    """Samples an image-resolution mask at the depth pixels' centres (nearest neighbour)."""
    rows = index_map(depth_shape[0], mask.shape[0])
    cols = index_map(depth_shape[1], mask.shape[1])
    return mask[np.ix_(rows, cols)]


@functools.lru_cache(maxsize=8)
def _rays(intr: CameraIntrinsics) -> tuple[np.ndarray, np.ndarray]:
    """Per-column ``(u - cx) / fx`` and per-row ``(v - cy) / fy``: x = z * xr[u], y = z * yr[v]."""
    xr = ((np.arange(intr.width, dtype=np.float64) - intr.cx) / intr.fx).astype(np.float32)
    yr = ((np.arange(intr.height, dtype=np.float64) - intr.cy) / intr.fy).astype(np.float32)
    xr.setflags(write=False)
    yr.setflags(write=False)
    return xr, yr


def _check_depth(depth: np.ndarray, intr: CameraIntrinsics) -> np.ndarray:
    d = np.asarray(depth)
    if d.ndim != 2 or d.dtype != np.float32:
        raise InputError(f"depth must be HxW float32 metres, got shape {d.shape} dtype {d.dtype}")
    if (intr.width, intr.height) != (d.shape[1], d.shape[0]):
        raise InputError(
            f"depth intrinsics are for {intr.width}x{intr.height} but the depth image is "
            f"{d.shape[1]}x{d.shape[0]}; use resolve_depth_intrinsics"
        )
    return d


def backproject(depth: np.ndarray, intr: CameraIntrinsics) -> np.ndarray:
    """Organised cloud ``HxWx3 float32`` of a depth image; NaN where there is no reading."""
    d = _check_depth(depth, intr)
    xr, yr = _rays(intr)
    out = np.empty((*d.shape, 3), dtype=np.float32)
    np.multiply(d, xr[None, :], out=out[:, :, 0])
    np.multiply(d, yr[:, None], out=out[:, :, 1])
    out[:, :, 2] = d
    return out


def depth_to_points(
    depth: np.ndarray, intr: CameraIntrinsics, mask: np.ndarray | None = None
) -> np.ndarray:
    """``Nx3 float32`` points of the pixels with a reading (and inside ``mask``, if given)."""
    d = _check_depth(depth, intr)
    valid = d > 0.0  # NaN compares False
    if mask is not None:
        valid &= mask
    # Three boolean selections of full-frame products beat np.nonzero + fancy indexing by ~4x.
    xr, yr = _rays(intr)
    z = d[valid]
    pts = np.empty((z.shape[0], 3), dtype=np.float32)
    pts[:, 0] = (d * xr[None, :])[valid]
    pts[:, 1] = (d * yr[:, None])[valid]
    pts[:, 2] = z
    return pts


# ---------------------------------------------------------------------------------------------
# per-object filtering
# ---------------------------------------------------------------------------------------------
@dataclass
class _Frame:
    """Per-frame data shared by all objects: depth, rgb and the image->depth index maps."""

    depth: np.ndarray
    rgb: np.ndarray | None
    intr: CameraIntrinsics
    row_map: np.ndarray  # depth row -> image row
    col_map: np.ndarray  # depth col -> image col
    same_size: bool


@dataclass
class _Pixels:
    """Depth pixels of one object (absolute depth-image indices) and their depths."""

    rows: np.ndarray
    cols: np.ndarray
    z: np.ndarray
    warning: str = ""


def _crop_bounds(mask: np.ndarray, frame: _Frame, pad: int) -> tuple[int, int, int, int] | None:
    """Depth-pixel bounds [r0, r1) x [c0, c1) of the mask, padded by ``pad``; None if empty."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))  # one SIMD pass over the image-size mask
    if w == 0 or h == 0:
        return None
    r0 = int(np.searchsorted(frame.row_map, y, "left"))
    r1 = int(np.searchsorted(frame.row_map, y + h - 1, "right"))
    c0 = int(np.searchsorted(frame.col_map, x, "left"))
    c1 = int(np.searchsorted(frame.col_map, x + w - 1, "right"))
    if r0 >= r1 or c0 >= c1:
        return None
    d_h, d_w = frame.depth.shape
    return max(0, r0 - pad), min(d_h, r1 + pad), max(0, c0 - pad), min(d_w, c1 + pad)


@functools.lru_cache(maxsize=16)
def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _object_pixels(mask: np.ndarray, frame: _Frame, cfg: GeometryConfig) -> _Pixels | str:
    """The object's depth pixels with a depth in range, after erosion; or why there are none."""
    bounds = _crop_bounds(mask, frame, cfg.erode_px)
    if bounds is None:
        total = int(np.count_nonzero(mask))
        if total == 0:
            return "mask is empty"
        return f"mask ({total} px) covers no depth pixel centre (depth image is coarser)"
    r0, r1, c0, c1 = bounds
    if frame.same_size:
        crop = mask[r0:r1, c0:c1]
    else:
        crop = mask[np.ix_(frame.row_map[r0:r1], frame.col_map[c0:c1])]
    z_crop = frame.depth[r0:r1, c0:c1]
    in_range = (z_crop >= cfg.min_depth_m) & (z_crop <= cfg.max_depth_m)  # NaN -> False
    selected = crop & in_range
    n_valid = int(np.count_nonzero(selected))
    if n_valid < cfg.min_points:
        return (
            f"not enough valid depth: {n_valid} of {int(np.count_nonzero(crop))} mask pixels have depth in "
            f"[{cfg.min_depth_m:g}, {cfg.max_depth_m:g}] m (min_points={cfg.min_points})"
        )
    warning = ""
    if cfg.erode_px > 0:
        # Borders of the crop are either >= erode_px away from the mask or the image border;
        # OpenCV's default erosion border value leaves the image border uneroded (no depth edge).
        eroded = cv2.erode(crop.astype(np.uint8), _disk(cfg.erode_px)).view(bool)
        eroded_sel = eroded & in_range
        n_eroded = int(np.count_nonzero(eroded_sel))
        if n_eroded >= cfg.min_points:
            selected = eroded_sel
        else:
            warning = (
                f"mask too thin to erode by {cfg.erode_px} px ({n_eroded} points left); "
                "used the un-eroded mask"
            )
    rows, cols = np.nonzero(selected)
    z = z_crop[selected]  # same (row-major) order as np.nonzero, cheaper than fancy indexing
    return _Pixels(rows=rows + r0, cols=cols + c0, z=z, warning=warning)


def _depth_bins(z: np.ndarray, bin_m: float) -> np.ndarray:
    return ((z - z.min()) * np.float32(1.0 / bin_m)).astype(np.intp)


def _bin_table(bins: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """``(values, counts, index)``: the histogram's bin values in order (None when they are
    0, 1, 2, ...: the dense table), their counts, and each point's place among them.

    Dense (one ``bincount``, the fast path) when the bins span little more than there are
    points; else only the occupied bins (a sort). Why: the span grows as the bin shrinks, so a
    tiny ``cluster_gap_m`` on a mask that reaches a far wall would allocate gigabytes densely.
    """
    span = int(bins.max()) + 1
    if span <= 4 * bins.shape[0] + 4096:
        return None, np.bincount(bins, minlength=span), bins
    values, index, counts = np.unique(bins, return_inverse=True, return_counts=True)
    return values, counts, index.reshape(-1)


def _median(x: np.ndarray) -> float:
    """Median of a 1D array without NaNs (np.median's NaN scan costs as much as the partition)."""
    n = x.shape[0]
    k = n // 2
    if n % 2:
        return float(np.partition(x, k)[k])
    part = np.partition(x, (k - 1, k))
    return 0.5 * (float(part[k - 1]) + float(part[k]))


def nearest_dominant_cluster(z: np.ndarray, gap_m: float, min_fraction: float) -> np.ndarray:
    """Boolean keep-mask of the nearest depth cluster holding >= ``min_fraction`` of the points.

    See step 4 in the module docstring. Surfaces more than ``gap_m`` apart in depth are always
    separated; closer than ``gap_m / 2`` never. If no cluster is big enough, the largest is kept.
    """
    n = z.shape[0]
    values, counts, index = _bin_table(_depth_bins(z, 0.5 * gap_m))
    occupied = counts >= max(2, math.ceil(_SPARSE_BIN_FRACTION * n))
    if not occupied.any():
        return np.ones(n, dtype=bool)
    starts = occupied.copy()
    follows = occupied[:-1] if values is None else occupied[:-1] & (np.diff(values) == 1)
    starts[1:] &= ~follows  # a run goes on only into the next bin value
    run_of_bin = np.where(occupied, np.cumsum(starts), 0)  # 0 = sparse, clusters are 1..K
    sizes = np.bincount(run_of_bin, weights=counts)  # sizes[0] = points in sparse bins
    sizes[0] = 0.0
    big = np.flatnonzero(sizes >= min_fraction * n)
    big = big[big > 0]
    chosen = int(big[0]) if big.size else int(np.argmax(sizes))  # runs are ordered near -> far
    return (run_of_bin == chosen)[index]


def reject_outliers(
    z: np.ndarray, method: str, threshold: float, min_spread_m: float, bin_m: float
) -> np.ndarray:
    """Boolean keep-mask: depths within ``threshold`` robust deviations of a robust centre."""
    if method == "none" or z.shape[0] == 0:
        return np.ones(z.shape[0], dtype=bool)
    if method == "mode":
        bins = _depth_bins(z, bin_m)
        values, counts, _ = _bin_table(bins)
        best = int(np.argmax(counts))
        centre = _median(z[bins == (best if values is None else int(values[best]))])
    else:
        centre = _median(z)
    dev = np.abs(z - np.float32(centre))
    spread = max(_MAD_TO_SIGMA * _median(dev), min_spread_m)
    return dev <= threshold * spread


# ---------------------------------------------------------------------------------------------
# oriented boxes
#
# Points are handled as a (3, N) float64 array here: numpy reduces a contiguous row of N values
# an order of magnitude faster than the (N, 3) column layout, and matrix products go to BLAS.
# ---------------------------------------------------------------------------------------------
def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cross product of two 3-vectors (np.cross's generality costs ~50 us a call)."""
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _horizontal_basis(up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors spanning the plane normal to ``up``; the first follows the frame axis
    least aligned with up (deterministic, so boxes do not flip between frames)."""
    axis = np.eye(3)[int(np.argmin(np.abs(up)))]
    e1 = _unit(axis - np.dot(axis, up) * up)
    return e1, _cross(up, e1)


#: Directions of the octagon used to discard points that cannot be on the convex hull.
_OCTAGON = np.array([[np.cos(a), np.sin(a)] for a in np.arange(8) * (np.pi / 4)])


def _next(a: np.ndarray, axis: int) -> np.ndarray:
    """``a`` shifted by one along ``axis`` with wrap-around: element i holds a[i + 1]."""
    return np.concatenate((a[1:], a[:1]) if axis == 0 else (a[:, 1:], a[:, :1]), axis=axis)


def _hull_candidates(uv: np.ndarray) -> np.ndarray:
    """Columns of ``uv`` (2, N) that may be convex-hull vertices (Akl-Toussaint filter).

    The extreme points in 8 directions span a convex octagon inside the hull; a point strictly
    inside it cannot be a hull vertex. Exact, vectorised (two small matrix products), and it
    leaves the hull algorithm a fraction of a dense object's points.
    """
    ext = uv[:, np.argmax(_OCTAGON @ uv, axis=1)]  # (2, 8), counter-clockwise
    edges = _next(ext, axis=1) - ext
    keep = np.hypot(edges[0], edges[1]) > 1e-12
    if np.count_nonzero(keep) < 3:
        return uv
    a, e = ext[:, keep], edges[:, keep]
    inward = np.stack((-e[1], e[0]), axis=1)  # left normals: inside for a counter-clockwise polygon
    offset = np.einsum("ij,ji->i", inward, a)
    inside = np.all(inward @ uv > (offset + 1e-12)[:, None], axis=0)
    return uv[:, ~inside]


def _min_area_rectangle(uv: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Minimum-area rectangle enclosing the 2D points ``uv`` (2, N): (unit direction of one side,
    extent along it, extent across it).

    A minimal rectangle has a side collinear with an edge of the convex hull (rotating calipers),
    so all hull edge directions are tried at once (edges x hull points projections); extents of
    a point set are those of its hull.
    """
    cand = np.ascontiguousarray(_hull_candidates(uv).T, dtype=np.float32)
    hull = cand[cv2.convexHull(cand, returnPoints=False).reshape(-1)].astype(np.float64)
    edges = _next(hull, axis=0) - hull
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    valid = lengths > 1e-12
    if not np.any(valid):  # all points coincide
        return np.array([1.0, 0.0]), 0.0, 0.0
    d = edges[valid] / lengths[valid, None]
    along = d @ hull.T  # (edges, hull points)
    across = np.stack((-d[:, 1], d[:, 0]), axis=1) @ hull.T
    width = along.max(axis=1) - along.min(axis=1)
    height = across.max(axis=1) - across.min(axis=1)
    k = int(np.argmin(width * height))
    return d[k], float(width[k]), float(height[k])


def _upright_axes(p: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Columns x, y, z of an upright box's rotation for centred points ``p`` (3, N)."""
    z_axis = _unit(up)
    e1, e2 = _horizontal_basis(z_axis)
    direction, along, across = _min_area_rectangle(np.stack((e1, e2)) @ p)
    if across > along:  # x along the longer side
        direction = np.array([-direction[1], direction[0]])
    x_axis = direction[0] * e1 + direction[1] * e2
    if np.dot(x_axis, e1) < 0.0 or (abs(np.dot(x_axis, e1)) < 1e-12 and np.dot(x_axis, e2) < 0.0):
        x_axis = -x_axis
    return np.column_stack((x_axis, _cross(z_axis, x_axis), z_axis))


def _pca_axes(p: np.ndarray) -> np.ndarray:
    """Columns x, y, z: principal axes of centred ``p`` (3, N) by decreasing variance."""
    _, vecs = np.linalg.eigh(p @ p.T)
    x_axis, y_axis = vecs[:, 2], vecs[:, 1]
    x_axis = x_axis if x_axis[np.argmax(np.abs(x_axis))] > 0 else -x_axis
    y_axis = y_axis if y_axis[np.argmax(np.abs(y_axis))] > 0 else -y_axis
    return np.column_stack((x_axis, y_axis, _cross(x_axis, y_axis)))


def _box_of_rows(p: np.ndarray, up: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`oriented_box` of points given as a (3, N) float64 array."""
    mean = p.mean(axis=1)
    centred = p - mean[:, None]
    axes = _pca_axes(centred) if up is None else _upright_axes(centred, up)
    local = axes.T @ centred  # coordinates along the box axes, (3, N)
    lo, hi = local.min(axis=1), local.max(axis=1)
    centre = mean + axes @ (0.5 * (lo + hi))
    return centre, quat_of_rotation(axes), hi - lo


def oriented_box(
    points: np.ndarray, up_axis: np.ndarray | Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Oriented box of ``Nx3`` points: (centre (3,), quaternion xyzw (4,), size (3,)).

    ``up_axis`` given: the upright minimum-area box (z = up); None: the PCA box. See the module
    docstring for the axis conventions.
    """
    p = np.asarray(points)
    if p.ndim != 2 or p.shape[1] != 3 or p.shape[0] == 0:
        raise ValueError(f"points must be Nx3 with N > 0, got shape {p.shape}")
    up = None if up_axis is None else np.asarray(up_axis, dtype=np.float64)
    return _box_of_rows(np.ascontiguousarray(p.T, dtype=np.float64), up)


# ---------------------------------------------------------------------------------------------
# the per-frame entry point
# ---------------------------------------------------------------------------------------------
def _check_inputs(
    masks: Sequence[np.ndarray], depth: np.ndarray, rgb: np.ndarray | None, intr: CameraIntrinsics
) -> tuple[int, int]:
    d = _check_depth(depth, intr)
    image_shape: tuple[int, int] | None = None
    if rgb is not None:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InputError(f"rgb must be HxWx3 uint8, got shape {rgb.shape} dtype {rgb.dtype}")
        image_shape = (rgb.shape[0], rgb.shape[1])
    for i, m in enumerate(masks):
        if m.ndim != 2 or m.dtype != np.bool_:
            raise InputError(f"mask {i} must be HxW bool, got shape {m.shape} dtype {m.dtype}")
        if image_shape is None:
            image_shape = (m.shape[0], m.shape[1])
        elif (m.shape[0], m.shape[1]) != image_shape:
            raise InputError(
                f"mask {i} is {m.shape[1]}x{m.shape[0]} but the image is {image_shape[1]}x{image_shape[0]}"
            )
    if image_shape is None:
        return d.shape[0], d.shape[1]
    if not _same_aspect((image_shape[1], image_shape[0]), (d.shape[1], d.shape[0])):
        raise InputError(
            f"masks are {image_shape[1]}x{image_shape[0]} but depth is {d.shape[1]}x{d.shape[0]} "
            "(another aspect ratio): depth is not registered to the image"
        )
    return image_shape


def _colors_of(frame: _Frame, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    if frame.rgb is None:
        return np.broadcast_to(np.array(DEFAULT_COLOR, dtype=np.uint8), (rows.shape[0], 3)).copy()
    # One flat gather of whole pixels: much faster than rgb[rows, cols] on an HxWx3 array.
    flat = frame.rgb.reshape(-1, 3)
    if frame.same_size:
        return np.take(flat, rows * frame.rgb.shape[1] + cols, axis=0)
    return np.take(flat, frame.row_map[rows] * frame.rgb.shape[1] + frame.col_map[cols], axis=0)


def _filtered_pixels(px: _Pixels, cfg: GeometryConfig) -> np.ndarray:
    """Indices into ``px`` of the pixels kept by clustering and outlier rejection."""
    if cfg.cluster_gap_m > 0.0:
        idx = np.flatnonzero(nearest_dominant_cluster(px.z, cfg.cluster_gap_m, cfg.cluster_min_fraction))
    else:
        idx = np.arange(px.z.shape[0])
    mode_bin = 0.5 * cfg.cluster_gap_m if cfg.cluster_gap_m > 0.0 else _DEFAULT_MODE_BIN_M
    z = px.z[idx]
    keep = reject_outliers(z, cfg.outlier_method, cfg.outlier_threshold, cfg.outlier_min_spread_m, mode_bin)
    return idx[keep]


def _one_object(
    mask: np.ndarray, frame: _Frame, cfg: GeometryConfig, transform: Transform | None
) -> ObjectGeometry:
    px = _object_pixels(mask, frame, cfg)
    if isinstance(px, str):
        return ObjectGeometry.failure(px)
    idx = _filtered_pixels(px, cfg)
    if idx.shape[0] < cfg.min_points:
        return ObjectGeometry.failure(
            f"not enough consistent depth: {idx.shape[0]} of {px.z.shape[0]} points left after clustering "
            f"and outlier rejection (min_points={cfg.min_points})"
        )
    rows, cols, z = px.rows[idx], px.cols[idx], px.z[idx]
    xr, yr = _rays(frame.intr)
    p = np.empty((3, z.shape[0]), dtype=np.float64)  # rows x, y, z (see the oriented-box section)
    np.multiply(xr[cols], z, out=p[0])  # float32 products, as depth_to_points computes them
    np.multiply(yr[rows], z, out=p[1])
    p[2] = z
    if transform is not None:
        p = transform.rotation_matrix() @ p + transform.translation[:, None]
        up = np.asarray(cfg.up_axis_target, dtype=np.float64)
    else:
        up = np.asarray(cfg.up_axis_camera, dtype=np.float64)
    centre, quat, size = _box_of_rows(p, up if cfg.box_method == "upright" else None)
    points = p.T.astype(np.float32)
    colors = _colors_of(frame, rows, cols)
    if cfg.voxel_size_m > 0.0:
        points, colors = voxel_downsample_points(points, cfg.voxel_size_m, colors)
    return ObjectGeometry(
        ok=True, reason=px.warning, points=points, colors=colors, centroid=p.mean(axis=1),
        box_center=centre, box_quaternion=quat, box_size=size, num_points=int(z.shape[0]),
    )


def extract_objects(
    masks: Sequence[np.ndarray],
    depth: np.ndarray,
    rgb: np.ndarray | None,
    depth_intrinsics: CameraIntrinsics,
    cfg: GeometryConfig | None = None,
    transform: Transform | None = None,
) -> list[ObjectGeometry]:
    """3D geometry of each mask (one :class:`ObjectGeometry` per mask, in order).

    ``masks`` are ``HxW bool`` at the colour image's resolution, ``rgb`` the colour image (or
    None), ``depth`` ``float32`` metres with NaN = no reading at any resolution of the same aspect
    ratio, with ``depth_intrinsics`` from :func:`resolve_depth_intrinsics`. ``transform`` maps
    camera-frame points into the output frame (then the box's up is ``cfg.up_axis_target``).
    Raises :class:`InputError` for inconsistent inputs; per-object failures are ``ok=False``.
    """
    cfg = cfg or GeometryConfig()
    cfg.validate()
    img_h, img_w = _check_inputs(masks, depth, rgb, depth_intrinsics)
    d_h, d_w = depth.shape
    frame = _Frame(
        depth=depth, rgb=rgb, intr=depth_intrinsics,
        row_map=index_map(d_h, img_h), col_map=index_map(d_w, img_w),
        same_size=(img_h, img_w) == (d_h, d_w),
    )
    return [_one_object(m, frame, cfg, transform) for m in masks]

"""sensor_msgs <-> numpy, with every check a camera driver's bad day calls for.

Decoding uses ``cv_bridge`` when it is importable (a ROS 2 install) and decodes a probe image
as our own numpy code does (:func:`probe_bridge`), and that numpy code otherwise (the PyPI
environment, where only the ROS 1 cv_bridge exists). Both paths run the same validation first,
so a bad message gives the same clear error either way.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from sensor_msgs.msg import CameraInfo, Image, RegionOfInterest
from std_msgs.msg import Header

from qwen3vl_seg_ros.types import CameraIntrinsics, InputError

_BRIDGE = None  # set at the end of the module by _working_bridge(), once the readers exist
_BRIDGE_NOTE = "cv_bridge is not importable"

#: Colour encodings the node accepts, with (channels, dtype).
COLOR_ENCODINGS: dict[str, tuple[int, type]] = {
    "rgb8": (3, np.uint8),
    "bgr8": (3, np.uint8),
    "rgba8": (4, np.uint8),
    "bgra8": (4, np.uint8),
    "mono8": (1, np.uint8),
    # packed 4:2:2 and raw Bayer (usb_cam's raw modes, machine-vision cameras), converted by
    # OpenCV as cv_bridge converts them; channels = bytes per pixel of the one plane
    "yuv422": (2, np.uint8),  # UYVY
    "uyvy": (2, np.uint8),
    "yuv422_yuy2": (2, np.uint8),  # YUYV
    "yuyv": (2, np.uint8),
    "bayer_rggb8": (1, np.uint8),
    "bayer_bggr8": (1, np.uint8),
    "bayer_gbrg8": (1, np.uint8),
    "bayer_grbg8": (1, np.uint8),
}
#: The OpenCV conversion of each encoding that needs one. OpenCV names a Bayer pattern by the
#: second row's second and third pixels, so ROS's RGGB is OpenCV's "BG" (cv_bridge's mapping).
_OPENCV_TO_RGB = {
    "yuv422": "COLOR_YUV2RGB_UYVY", "uyvy": "COLOR_YUV2RGB_UYVY",
    "yuv422_yuy2": "COLOR_YUV2RGB_YUY2", "yuyv": "COLOR_YUV2RGB_YUY2",
    "bayer_rggb8": "COLOR_BayerBG2RGB", "bayer_bggr8": "COLOR_BayerRG2RGB",
    "bayer_gbrg8": "COLOR_BayerGR2RGB", "bayer_grbg8": "COLOR_BayerGB2RGB",
}
#: The encodings handed to cv_bridge when it works (the others always take OpenCV here).
BRIDGE_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")
#: Depth encodings: 16UC1 / mono16 in millimetres, 32FC1 in metres (REP 118).
DEPTH_ENCODINGS: dict[str, tuple[int, type]] = {
    "16UC1": (1, np.uint16),
    "mono16": (1, np.uint16),
    "32FC1": (1, np.float32),
}

#: Largest image accepted by default (pixels); bigger ones are refused, not processed slowly.
DEFAULT_MAX_PIXELS = 4096 * 4096


def decoder_note() -> str:
    """How colour images are decoded, and why not through cv_bridge when it is not (for the log)."""
    return "cv_bridge" if _BRIDGE is not None else f"numpy ({_BRIDGE_NOTE})"


def _checked_array(msg: Image, table: dict[str, tuple[int, type]], what: str, max_pixels: int) -> np.ndarray:
    """Validates an Image message and returns an HxWxC (or HxW) array viewing its data."""
    if msg.encoding not in table:
        raise InputError(
            f"unsupported {what} encoding '{msg.encoding}'; supported: {', '.join(table)}"
        )
    channels, dtype = table[msg.encoding]
    height, width = int(msg.height), int(msg.width)
    if height <= 0 or width <= 0:
        raise InputError(f"{what} image has zero size ({width}x{height})")
    if height * width > max_pixels:
        raise InputError(
            f"{what} image is too large ({width}x{height} = {height * width} pixels; "
            f"the limit is max_image_pixels = {max_pixels})"
        )
    itemsize = np.dtype(dtype).itemsize
    row_bytes = width * channels * itemsize
    step = int(msg.step)
    if step < row_bytes:
        raise InputError(
            f"{what} image step {step} is smaller than width x bytes per pixel = {row_bytes} "
            f"({msg.encoding}, width {width})"
        )
    expected = step * height
    data = np.frombuffer(msg.data, dtype=np.uint8)
    if data.size == 0:
        raise InputError(f"{what} image has no pixel data (it arrived while larger than max_image_pixels, "
                         f"whose pixels are not kept, or its publisher sent none): the next frame is used")
    if data.size < expected:
        raise InputError(
            f"{what} image data is truncated: {data.size} bytes, expected step x height = {expected}"
        )
    rows = data[:expected].reshape(height, step)[:, :row_bytes]
    arr = np.ascontiguousarray(rows).view(dtype)
    big = bool(msg.is_bigendian)
    if itemsize > 1 and big != (sys.byteorder == "big"):
        arr = arr.byteswap()
    return arr.reshape(height, width, channels) if channels > 1 else arr.reshape(height, width)


def shed_unusable_bytes(msg: Image, max_pixels: int) -> Image:
    """Drops the bytes of an incoming image that no request could ever use, before it is kept.

    Why: the node keeps up to ``sync_queue_size`` colour and depth messages, and checks them only
    when a command runs. Ten 8000x6000 frames (refused, too large) held 1.4 GB; a 160x120 frame
    with 100 MB of trailing data held 100 MB each. An image over ``max_pixels`` keeps its header
    alone (its refusal reads the size from the header), and one longer than ``step x height``
    loses the tail (the reader never looks past it).
    """
    pixels = int(msg.width) * int(msg.height)
    needed = int(msg.step) * int(msg.height)
    if pixels > max_pixels:
        msg.data = b""
    elif 0 < needed < len(msg.data):
        msg.data = msg.data[:needed]
    return msg


def bridge_reads_exactly(msg: Image) -> bool:
    """Whether cv_bridge decodes this colour image as our own reader does.

    Why: cv_bridge views a multi-channel image as rows of ``step / bytes per pixel`` pixels, so
    rows padded by a part of a pixel (rgb8 at width 5, rows of 16 bytes) come out sheared; and
    it byte-swaps on ``is_bigendian`` even for 8-bit data, through an API numpy 2 removed. Those
    images take the numpy reader, which handles both.
    """
    if msg.encoding not in BRIDGE_ENCODINGS:
        return False
    channels, dtype = COLOR_ENCODINGS[msg.encoding]
    return int(msg.step) % (channels * np.dtype(dtype).itemsize) == 0 and not msg.is_bigendian


def image_to_rgb(msg: Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any supported colour encoding -> HxWx3 uint8 RGB (a copy the caller owns)."""
    arr = _checked_array(msg, COLOR_ENCODINGS, "colour", max_pixels)
    if _BRIDGE is not None and bridge_reads_exactly(msg):  # pragma: no cover - on ROS 2 installs only
        return np.array(_BRIDGE.imgmsg_to_cv2(msg, desired_encoding="rgb8"), dtype=np.uint8, copy=True)
    return _numpy_rgb(msg.encoding, arr)


def _numpy_rgb(enc: str, arr: np.ndarray) -> np.ndarray:
    """The numpy reader's encoding -> RGB step (``arr`` from :func:`_checked_array`)."""
    if enc in _OPENCV_TO_RGB:
        return _opencv_rgb(enc, arr)
    if enc == "rgb8":
        return arr.copy()
    if enc == "bgr8":
        return np.ascontiguousarray(arr[:, :, ::-1])
    if enc == "rgba8":
        return np.ascontiguousarray(arr[:, :, :3])
    if enc == "bgra8":
        return np.ascontiguousarray(arr[:, :, 2::-1])
    return np.repeat(arr[:, :, None], 3, axis=2)  # mono8


def _opencv_rgb(enc: str, arr: np.ndarray) -> np.ndarray:
    import cv2

    height, width = arr.shape[:2]
    if enc.startswith("bayer_") and (height < 2 or width < 2):
        raise InputError(f"a {enc} image needs at least 2x2 pixels (one Bayer cell), got {width}x{height}")
    if not enc.startswith("bayer_") and width % 2:
        raise InputError(f"a {enc} image has an even width (two pixels share their colour), got {width}")
    return np.ascontiguousarray(cv2.cvtColor(np.ascontiguousarray(arr), getattr(cv2, _OPENCV_TO_RGB[enc])))


def depth_to_raw(msg: Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A depth Image -> HxW array in its wire unit (uint16 mm or float32 m), validated."""
    return _checked_array(msg, DEPTH_ENCODINGS, "depth", max_pixels).copy()


def camera_info_to_intrinsics(msg: CameraInfo) -> CameraIntrinsics:
    """Pinhole intrinsics of the image a CameraInfo describes, read as image_geometry reads them.

    The projection P is the rectified image's camera matrix (REP 104), which is what the 3D
    outputs project with: K when P is unset (some drivers leave it zero). Then the region of
    interest and binning: a cropped or binned image has its principal point moved and its
    focal length divided, and its own size. Refuses zero or non-finite values with the reason.
    """
    p = np.asarray(msg.p, dtype=np.float64)
    k = np.asarray(msg.k, dtype=np.float64)
    if p.shape == (12,) and np.all(np.isfinite(p[[0, 2, 5, 6]])) and p[0] > 0 and p[5] > 0:
        fx, fy, cx, cy = p[0], p[5], p[2], p[6]
    elif k.shape == (9,):
        fx, fy, cx, cy = k[0], k[4], k[2], k[5]
    else:
        raise InputError(f"CameraInfo K has {k.size} elements, expected 9")
    bx, by = max(1, int(msg.binning_x)), max(1, int(msg.binning_y))
    roi = msg.roi
    width, height = (int(roi.width) or int(msg.width)), (int(roi.height) or int(msg.height))
    intr = CameraIntrinsics(fx=float(fx / bx), fy=float(fy / by), cx=float((cx - roi.x_offset) / bx),
                            cy=float((cy - roi.y_offset) / by), width=width // bx, height=height // by)
    if not intr.is_valid():
        raise InputError(
            f"CameraInfo is unusable: fx={intr.fx}, fy={intr.fy}, cx={intr.cx}, cy={intr.cy}, "
            f"size {intr.width}x{intr.height} (uncalibrated camera? K and P must be non-zero)"
        )
    return intr


def distortion_note(msg: CameraInfo) -> str:
    """A note when CameraInfo describes lens distortion, else "".

    Why: the 3D outputs project with P, the rectified image's camera matrix, as depth_image_proc
    does. That is right for ``image_rect`` topics (whose CameraInfo keeps the camera's D); fed the
    unrectified ``image_raw`` of a distorting lens, points away from the centre land off by the
    distortion, with nothing else to show it. The node cannot tell which it gets, so it says so.
    """
    d = np.asarray(msg.d, dtype=np.float64)
    if d.size == 0 or not np.any(np.abs(d[np.isfinite(d)]) > 1e-9):
        return ""
    return (f"CameraInfo has lens distortion ('{msg.distortion_model}', D != 0): 3D projects with P, for the "
            f"rectified image; make sure 'image' and 'depth' are rectified (image_rect), not image_raw")


def array_to_image(arr: np.ndarray, encoding: str, header: Header | None = None) -> Image:
    """numpy -> Image without per-element copies (``bytes`` assignment is fast in rclpy).

    The bytes go out in the host's order, which ``is_bigendian`` states: an array of another
    byte order ('>u2' on a little-endian host) is converted first rather than mislabelled.
    """
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(arr.shape[0]), int(arr.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = sys.byteorder == "big"
    msg.step = int(arr.strides[0]) if arr.size else 0
    msg.data = arr.tobytes()
    return msg


def label_image_msg(labels: np.ndarray, header: Header) -> Image:
    """The ~/mask label image: mono8 while ids fit, 16UC1 beyond 255 objects (lossless)."""
    encoding = "mono8" if labels.dtype == np.uint8 else "16UC1"
    return array_to_image(labels, encoding, header)


def box_to_roi(box: np.ndarray, width: int, height: int) -> RegionOfInterest:
    """Float [x1, y1, x2, y2] -> the smallest integer RegionOfInterest containing it, clipped."""
    x1 = int(np.clip(np.floor(box[0]), 0, width))
    y1 = int(np.clip(np.floor(box[1]), 0, height))
    x2 = int(np.clip(np.ceil(box[2]), x1, width))
    y2 = int(np.clip(np.ceil(box[3]), y1, height))
    return RegionOfInterest(x_offset=x1, y_offset=y1, width=x2 - x1, height=y2 - y1, do_rectify=False)


def mask_crop_msg(mask: np.ndarray | None, roi: RegionOfInterest, header: Header) -> Image:
    """Object mask cropped to its box, mono8 255 inside (the box itself when there is no mask)."""
    h, w = int(roi.height), int(roi.width)
    if mask is None:
        crop = np.full((h, w), 255, dtype=np.uint8)
    else:
        y0, x0 = int(roi.y_offset), int(roi.x_offset)
        crop = mask[y0:y0 + h, x0:x0 + w].astype(np.uint8) * 255
    return array_to_image(crop, "mono8", header)


def probe_bridge(bridge: Any) -> str:
    """Why ``bridge`` must not decode our images, or "" when it reads them as our own reader does.

    Why: a cv_bridge that imports is not one that works. ROS 2's package imports while its
    compiled part cannot load (its ``__init__`` swallows that ImportError, and every call then
    raises); the ROS 1 package on PyPI imports too, but ignores ``step`` and, with OpenCV 5,
    refuses every colour image. Each would turn every frame into an error. A 3x2 image of each
    encoding, its rows padded by one pixel, is decoded both ways once, at import.
    """
    data = np.arange(64, dtype=np.uint8)
    for enc in BRIDGE_ENCODINGS:
        channels = COLOR_ENCODINGS[enc][0]
        msg = Image(height=2, width=3, encoding=enc, step=4 * channels, data=data[: 8 * channels].tobytes())
        try:
            got = np.asarray(bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8"))
        except Exception as exc:  # any failure means: decode with numpy
            return f"cv_bridge fails on {enc}: {type(exc).__name__}: {exc}"
        want = _numpy_rgb(enc, _checked_array(msg, COLOR_ENCODINGS, "colour", DEFAULT_MAX_PIXELS))
        if got.shape != want.shape or not np.array_equal(got, want):
            return f"cv_bridge decodes {enc} differently from the ROS 2 convention"
    return ""


def _working_bridge() -> tuple[Any, str]:
    """cv_bridge when importable and :func:`probe_bridge` passes it, else None; and why not."""
    try:
        from cv_bridge import CvBridge

        bridge = CvBridge()
    except ImportError:
        return None, "cv_bridge is not importable"
    except Exception as exc:  # the ROS 1 package from PyPI may fail on import
        return None, f"cv_bridge fails on import: {type(exc).__name__}: {exc}"
    problem = probe_bridge(bridge)
    return (None, problem) if problem else (bridge, "")


_BRIDGE, _BRIDGE_NOTE = _working_bridge()

"""Image / depth / CameraInfo conversions: every encoding, and every malformed message."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from sensor_msgs.msg import Image
from std_msgs.msg import Header

from qwen3vl_seg_ros.ros import conversions as cv
from qwen3vl_seg_ros.types import InputError

from doubles.cv_bridges import Ros2CvBridgeDouble, StepIgnoringCvBridgeDouble, UnloadedCvBridgeDouble
from ros_harness import Scene, camera_info_msg, encode, image_msg


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8"])
def test_colour_encodings_decode_to_rgb(rgb, encoding):
    out = cv.image_to_rgb(image_msg(encode(rgb, encoding), encoding))
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    np.testing.assert_array_equal(out, rgb)


COLOUR = (200, 60, 20)  # R, G and B all different: a swapped channel or pattern shows


@pytest.mark.parametrize("encoding, pattern", [("bayer_rggb8", "RGGB"), ("bayer_bggr8", "BGGR"),
                                               ("bayer_gbrg8", "GBRG"), ("bayer_grbg8", "GRBG")])
def test_bayer_images_are_demosaiced_with_the_ros_pattern(encoding, pattern):
    """A camera's raw mosaic of one flat colour: each 2x2 cell holds the pattern's samples."""
    h, w = 8, 10
    index = {"R": 0, "G": 1, "B": 2}
    mosaic = np.zeros((h, w), np.uint8)
    for k, channel in enumerate(pattern):
        mosaic[k // 2::2, k % 2::2] = COLOUR[index[channel]]
    out = cv.image_to_rgb(image_msg(mosaic, encoding))
    assert out.shape == (h, w, 3)
    np.testing.assert_array_equal(out[2:-2, 2:-2], np.broadcast_to(COLOUR, (h - 4, w - 4, 3)))


def _yuv_of(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """BT.601 video-range Y, U, V of a colour (what a 4:2:2 camera sends)."""
    r, g, b = (c / 255 for c in rgb)
    return (round(16 + 65.481 * r + 128.553 * g + 24.966 * b), round(128 - 37.797 * r - 74.203 * g + 112 * b),
            round(128 + 112 * r - 93.786 * g - 18.214 * b))


@pytest.mark.parametrize("encoding, order", [("yuv422", "UYVY"), ("uyvy", "UYVY"), ("yuv422_yuy2", "YUYV"),
                                             ("yuyv", "YUYV")])
def test_packed_yuv422_images_decode_in_their_byte_order(encoding, order):
    h, w = 4, 6
    y, u, v = _yuv_of(COLOUR)
    pair = bytes({"Y": y, "U": u, "V": v}[c] for c in order)  # the 4 bytes of two pixels
    msg = Image(height=h, width=w, encoding=encoding, step=2 * w, data=pair * (h * w // 2))
    out = cv.image_to_rgb(msg).astype(int)
    assert out.shape == (h, w, 3)
    assert np.abs(out - np.array(COLOUR)).max() <= 3, out[0, 0]


@pytest.mark.parametrize("encoding, width, height, message", [("yuv422", 5, 2, "even width"),
                                                              ("bayer_rggb8", 1, 4, "at least 2x2")])
def test_converted_encodings_refuse_sizes_they_cannot_have(encoding, width, height, message):
    bpp = 2 if encoding == "yuv422" else 1
    msg = Image(height=height, width=width, encoding=encoding, step=bpp * width, data=bytes(bpp * width * height))
    with pytest.raises(InputError, match=message):
        cv.image_to_rgb(msg)


def test_mono8_is_replicated(rgb):
    out = cv.image_to_rgb(image_msg(rgb[:, :, 0], "mono8"))
    np.testing.assert_array_equal(out, np.repeat(rgb[:, :, :1], 3, axis=2))


def test_padded_rows_are_handled(rgb):
    padded = np.zeros((7, 40), np.uint8)
    padded[:, :33] = rgb.reshape(7, 33)
    msg = image_msg(padded, "rgb8")
    msg.width = 11
    np.testing.assert_array_equal(cv.image_to_rgb(msg), rgb)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: setattr(m, "encoding", "nv21"), "unsupported colour encoding 'nv21'"),
        (lambda m: setattr(m, "encoding", "32FC1"), "supported: rgb8, bgr8, rgba8, bgra8, mono8"),
        (lambda m: (setattr(m, "width", 0), setattr(m, "height", 0)), "zero size (0x0)"),
        (lambda m: setattr(m, "step", 10), "step 10 is smaller than width x bytes per pixel = 33"),
        (lambda m: setattr(m, "data", bytes(100)), "truncated: 100 bytes, expected step x height = 231"),
        (lambda m: (setattr(m, "width", 5000), setattr(m, "height", 5000)), "too large (5000x5000"),
        # a frame whose pixels were shed on arrival (over max_image_pixels then), read after the
        # limit was raised: not "truncated: 0 bytes"
        (lambda m: cv.shed_unusable_bytes(m, 10), "has no pixel data (it arrived while larger than max_image_pixels"),
    ],
)
def test_malformed_colour_images_raise_clear_errors(rgb, mutate, message):
    msg = image_msg(rgb, "rgb8")
    mutate(msg)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cv.image_to_rgb(msg)


def test_depth_16uc1_and_32fc1_and_big_endian():
    mm = np.array([[0, 1000], [65535, 1500]], np.uint16)
    np.testing.assert_array_equal(cv.depth_to_raw(image_msg(mm, "16UC1")), mm)
    big = image_msg(mm.astype(">u2"), "16UC1")
    big.is_bigendian = True
    np.testing.assert_array_equal(cv.depth_to_raw(big), mm)
    m = np.array([[np.nan, 1.25]], np.float32)
    np.testing.assert_array_equal(cv.depth_to_raw(image_msg(m, "32FC1")), m)
    with pytest.raises(InputError, match="unsupported depth encoding 'rgb8'"):
        cv.depth_to_raw(image_msg(np.zeros((2, 2, 3), np.uint8), "rgb8"))


def test_camera_info_intrinsics_and_refusal_of_zero_k():
    intr = cv.camera_info_to_intrinsics(camera_info_msg(Scene()))
    assert (intr.fx, intr.fy, intr.cx, intr.cy, intr.width, intr.height) == (100, 100, 79.5, 59.5, 160, 120)
    bad = camera_info_msg(Scene())
    bad.k, bad.p = [0.0] * 9, [0.0] * 12
    with pytest.raises(InputError, match="uncalibrated camera"):
        cv.camera_info_to_intrinsics(bad)
    only_k = camera_info_msg(Scene())
    only_k.p = [0.0] * 12  # a driver that leaves P unset: K it is
    assert cv.camera_info_to_intrinsics(only_k).fx == 100


def test_camera_info_is_read_as_image_geometry_reads_it():
    """P (the rectified image's matrix) before K; a region of interest moves the principal point
    and gives the image's own size; binning divides both (image_geometry's conventions)."""
    rectified = camera_info_msg(Scene(width=640, height=480))
    rectified.k = [600.0, 0, 330.0, 0, 600.0, 250.0, 0, 0, 1]  # the raw image's
    rectified.p = [520.0, 0, 318.0, 0, 0, 520.0, 236.0, 0, 0, 0, 1, 0]  # the rectified image's
    intr = cv.camera_info_to_intrinsics(rectified)
    assert (intr.fx, intr.fy, intr.cx, intr.cy, intr.width, intr.height) == (520, 520, 318, 236, 640, 480)
    cropped = camera_info_msg(Scene(width=640, height=480))
    cropped.p = [500.0, 0, 320.0, 0, 0, 500.0, 240.0, 0, 0, 0, 1, 0]
    cropped.roi.x_offset, cropped.roi.y_offset, cropped.roi.width, cropped.roi.height = 160, 120, 320, 240
    intr = cv.camera_info_to_intrinsics(cropped)
    assert (intr.fx, intr.fy, intr.cx, intr.cy, intr.width, intr.height) == (500, 500, 160, 120, 320, 240)
    cropped.binning_x = cropped.binning_y = 2
    intr = cv.camera_info_to_intrinsics(cropped)
    assert (intr.fx, intr.fy, intr.cx, intr.cy, intr.width, intr.height) == (250, 250, 80, 60, 160, 120)


def test_label_image_encodings_are_lossless():
    header = Header(frame_id="cam")
    small = cv.label_image_msg(np.array([[0, 3]], np.uint8), header)
    assert small.encoding == "mono8" and bytes(small.data) == b"\x00\x03"
    big = cv.label_image_msg(np.array([[0, 300]], np.uint16), header)
    assert big.encoding == "16UC1" and np.frombuffer(big.data, np.uint16).tolist() == [0, 300]
    assert big.header.frame_id == "cam"


def test_box_to_roi_rounds_outwards_and_clips():
    roi = cv.box_to_roi(np.array([-3.2, 4.5, 9.1, 200.0]), width=50, height=20)
    assert (roi.x_offset, roi.y_offset, roi.width, roi.height) == (0, 4, 10, 16)


def test_mask_crop_is_mono8_255_inside():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 3:7] = True
    roi = cv.box_to_roi(np.array([3, 2, 7, 5]), 10, 10)
    msg = cv.mask_crop_msg(mask, roi, Header())
    crop = np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.step)[:, : msg.width]
    assert msg.encoding == "mono8" and crop.shape == (3, 4) and (crop == 255).all()


def test_cv_bridge_is_used_only_where_it_reads_exactly():
    """cv_bridge views rows as step / bytes-per-pixel pixels (sheared by part-pixel padding) and
    byte-swaps on is_bigendian through an API numpy 2 removed: those images take our reader."""
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    plain = image_msg(rgb, "rgb8")
    assert cv.bridge_reads_exactly(plain)
    padded = image_msg(rgb, "rgb8")
    padded.step = 16  # rows of 15 bytes padded to 16
    padded.data = b"".join(rgb[r].tobytes() + b"\xee" for r in range(4))
    assert not cv.bridge_reads_exactly(padded)
    np.testing.assert_array_equal(cv.image_to_rgb(padded), rgb)
    swapped = image_msg(rgb, "rgb8")
    swapped.is_bigendian = True
    assert not cv.bridge_reads_exactly(swapped)
    np.testing.assert_array_equal(cv.image_to_rgb(swapped), rgb)
    whole_pixels = image_msg(rgb, "rgb8")
    whole_pixels.step = 18  # a whole pixel of padding: cv_bridge reads it right
    whole_pixels.data = b"".join(rgb[r].tobytes() + b"\xee" * 3 for r in range(4))
    assert cv.bridge_reads_exactly(whole_pixels)


def test_an_array_of_the_other_byte_order_keeps_its_values_on_the_wire():
    values = np.array([[1, 2], [300, 65535]], dtype=np.uint16)
    for arr in (values.astype(">u2"), values.astype("<u2")):
        msg = cv.array_to_image(arr, "16UC1")
        np.testing.assert_array_equal(cv.depth_to_raw(msg), values)


def test_a_bridge_is_used_only_when_it_reads_as_our_reader_does():
    """A cv_bridge that imports is probed once: one whose compiled part did not load, or ROS 1's
    that ignores ``step``, would turn every frame into an error or a sheared image."""
    assert cv.probe_bridge(Ros2CvBridgeDouble()) == ""
    assert "fails on rgb8: ImportError" in cv.probe_bridge(UnloadedCvBridgeDouble())
    assert "decodes rgb8 differently" in cv.probe_bridge(StepIgnoringCvBridgeDouble())


@pytest.mark.parametrize("bridge, used", [(Ros2CvBridgeDouble, True), (UnloadedCvBridgeDouble, False),
                                          (StepIgnoringCvBridgeDouble, False)])
def test_an_importable_bridge_is_kept_only_when_it_passes_the_probe(monkeypatch, bridge, used):
    module = types.ModuleType("cv_bridge")
    module.CvBridge = bridge
    monkeypatch.setitem(sys.modules, "cv_bridge", module)
    chosen, note = cv._working_bridge()
    assert (chosen is not None) == used and (note == "") == used
    monkeypatch.setitem(sys.modules, "cv_bridge", None)  # what an absent package looks like to import
    assert cv._working_bridge() == (None, "cv_bridge is not importable")


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"])
def test_through_a_working_bridge_every_image_decodes_as_without_it(monkeypatch, rgb, encoding):
    pixels = rgb[:, :, 0] if encoding == "mono8" else encode(rgb, encoding)
    images = [image_msg(pixels, encoding)]
    padded = image_msg(pixels, encoding)  # rows padded by one pixel and a byte (part-pixel: numpy reads it)
    extra = b"\xee" * (pixels.itemsize * (pixels.shape[2] if pixels.ndim == 3 else 1) + 1)
    padded.step += len(extra)
    padded.data = b"".join(row.tobytes() + extra for row in pixels)
    images.append(padded)
    expected = [cv.image_to_rgb(m) for m in images]
    monkeypatch.setattr(cv, "_BRIDGE", Ros2CvBridgeDouble())
    for msg, want in zip(images, expected):
        np.testing.assert_array_equal(cv.image_to_rgb(msg), want)


@pytest.mark.parametrize("box", [[10.6, 5.6, 20.4, 15.4], [11.5, 5.0, 12.5, 15.0], [-3.0, -2.5, 7.2, 4.0]])
def test_an_object_without_a_mask_is_the_same_box_everywhere(box):
    """A segmenter may give a box without a mask: its SegmentedObject.mask (cropped to the ROI),
    its pixels in ~/mask and its 3D points all use one rounding (outwards), never an empty box."""
    from qwen3vl_seg_ros.masks import box_mask

    roi = cv.box_to_roi(np.array(box), width=60, height=40)
    crop = cv.mask_crop_msg(None, roi, Header())
    from_roi = np.zeros((40, 60), bool)
    from_roi[roi.y_offset:roi.y_offset + crop.height, roi.x_offset:roi.x_offset + crop.width] = True
    full = box_mask((40, 60), np.array(box))
    assert full.any()
    np.testing.assert_array_equal(full, from_roi)

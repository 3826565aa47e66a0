"""Image / depth / CameraInfo conversions: every encoding, and every malformed message."""

from __future__ import annotations

import numpy as np
import pytest
from std_msgs.msg import Header

from qwen3vl_seg_ros.ros import conversions as cv
from qwen3vl_seg_ros.types import InputError

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
        (lambda m: setattr(m, "encoding", "yuv422"), "unsupported colour encoding 'yuv422'"),
        (lambda m: setattr(m, "encoding", "32FC1"), "supported: rgb8, bgr8, rgba8, bgra8, mono8"),
        (lambda m: (setattr(m, "width", 0), setattr(m, "height", 0)), "zero size (0x0)"),
        (lambda m: setattr(m, "step", 10), "step 10 is smaller than width x bytes per pixel = 33"),
        (lambda m: setattr(m, "data", bytes(100)), "truncated: 100 bytes, expected step x height = 231"),
        (lambda m: (setattr(m, "width", 5000), setattr(m, "height", 5000)), "too large (5000x5000"),
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
    bad.k = [0.0] * 9
    with pytest.raises(InputError, match="uncalibrated camera"):
        cv.camera_info_to_intrinsics(bad)


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

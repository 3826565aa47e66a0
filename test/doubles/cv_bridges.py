"""Test doubles of cv_bridge, which cannot be installed here (no ROS 2 install; PyPI only has ROS 1's).

They stand in for the three bridges a user's machine may have, so that the node's choice between
cv_bridge and its own numpy reader (:func:`qwen3vl_seg_ros.ros.conversions.probe_bridge`) is tested:

* :class:`Ros2CvBridgeDouble` reads like ROS 2's ``cv_bridge.imgmsg_to_cv2(msg, "rgb8")``: a numpy
  view of ``step / channels`` pixels per row, cut to ``width``, then ``cv2.cvtColor``;
* :class:`UnloadedCvBridgeDouble` is ROS 2's package whose compiled part did not load: it imports,
  and each call raises (its ``__init__`` swallowed the ImportError);
* :class:`StepIgnoringCvBridgeDouble` reads rows of ``width`` pixels whatever ``step`` says, as
  ROS 1's package from PyPI does.
"""

from __future__ import annotations

import cv2
import numpy as np
from sensor_msgs.msg import Image

_CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}
_TO_RGB = {"bgr8": cv2.COLOR_BGR2RGB, "rgba8": cv2.COLOR_RGBA2RGB, "bgra8": cv2.COLOR_BGRA2RGB,
           "mono8": cv2.COLOR_GRAY2RGB}


def _to_rgb(encoding: str, pixels: np.ndarray) -> np.ndarray:
    code = _TO_RGB.get(encoding)
    return pixels.copy() if code is None else cv2.cvtColor(pixels, code)


class Ros2CvBridgeDouble:
    def imgmsg_to_cv2(self, msg: Image, desired_encoding: str = "passthrough") -> np.ndarray:
        assert desired_encoding == "rgb8"
        n = _CHANNELS[msg.encoding]
        shape = (msg.height, msg.step // n, n) if n > 1 else (msg.height, msg.step)
        view = np.ndarray(shape=shape, dtype=np.uint8, buffer=bytes(msg.data))[:, : msg.width]
        return _to_rgb(msg.encoding, np.ascontiguousarray(view))


class UnloadedCvBridgeDouble:
    def imgmsg_to_cv2(self, msg: Image, desired_encoding: str = "passthrough") -> np.ndarray:
        raise ImportError("libcv_bridge_boost.so: cannot open shared object file")


class StepIgnoringCvBridgeDouble:
    def imgmsg_to_cv2(self, msg: Image, desired_encoding: str = "passthrough") -> np.ndarray:
        n = _CHANNELS[msg.encoding]
        flat = np.frombuffer(bytes(msg.data), np.uint8)[: msg.height * msg.width * n]
        return _to_rgb(msg.encoding, flat.reshape((msg.height, msg.width, n) if n > 1 else (msg.height, msg.width)))

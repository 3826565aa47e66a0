"""The node's 3D stage: depth and CameraInfo checks, per-object geometry, TF, clouds, markers.

The maths lives in the core (geometry.py, transforms.py, cloud.py); this file decides, for one
frame, what is usable and says why when something is not:

* no depth, or depth in another frame than the colour image, or no / unusable CameraInfo, or
  CameraInfo of another frame: 2D results are still served; every object gets
  ``has_3d = false`` with the reason;
* depth (or CameraInfo) of another aspect ratio than the image: the result is an ERROR (the
  topics do not belong together, and guessing would put objects in the wrong place);
* target_frame unavailable in TF: geometry stays in the camera frame and the result says so;
* depth whose typical reading looks like a unit mistake (metres written as 16UC1: nearer than
  min_depth_m; millimetres as 32FC1: beyond max_depth_m and 100 m): the range check leaves no
  points (has_3d false), and the result and each object's status_3d name the likely mistake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from std_msgs.msg import Header

from qwen3vl_seg_ros.cloud import concat_clouds
from qwen3vl_seg_ros.geometry import (
    GeometryConfig,
    depth_frame_mismatch,
    depth_from_raw,
    extract_objects,
    mask_to_depth_resolution,
    resolve_depth_intrinsics,
)
from qwen3vl_seg_ros.masks import box_mask
from qwen3vl_seg_ros.msg import SegmentationResult
from qwen3vl_seg_ros.ros import conversions
from qwen3vl_seg_ros.ros.markers import build_markers
from qwen3vl_seg_ros.ros.pointcloud import cloud_to_msg, fill_object_3d
from qwen3vl_seg_ros.ros.sync import Frame
from qwen3vl_seg_ros.ros.tf import TransformLookup, TransformUnavailable, clean_frame
from qwen3vl_seg_ros.types import CameraIntrinsics, InputError, Instance

if TYPE_CHECKING:
    from qwen3vl_seg_ros.ros.node import SegmentationNode


#: A median depth beyond this (and beyond max_depth_m) is taken for millimetres in a 32FC1 image.
_IMPLAUSIBLY_FAR_M = 100.0


@dataclass
class ThreeDInputs:
    """Depth for one frame: at image resolution for the segmenter, native for the geometry."""

    depth_m: np.ndarray | None  # image resolution, metres, NaN = no reading (what the segmenter sees;
    # None when the depth is not registered to the colour image, so no mask head cuts by it)
    depth_native: np.ndarray  # the depth image's own resolution
    intrinsics: CameraIntrinsics | None  # of depth_native; None -> no 3D
    frame_id: str  # the camera optical frame of the geometry
    reason: str = ""  # why there is no 3D, when intrinsics is None
    unit_hint: str = ""  # set when the depth values look like the wrong unit for the encoding


# How far back transforms are kept. The lookup happens once the frame is segmented, at the
# image's stamp: a real model on a CPU, or requests queued behind each other, can take longer
# than tf2's default 10 s, after which a moving robot's older transforms are gone and every
# result falls back to the camera frame.
TF_CACHE_S = 60.0
#: The 3D display outputs, each switched by its ``publish_<output>`` parameter.
OUTPUTS = ("cloud", "markers")


class ThreeDStage:
    def __init__(self, node: SegmentationNode) -> None:
        self._node = node
        self._tf = TransformLookup(node, cache_time_s=TF_CACHE_S)
        self._shown: dict[str, str] = {}  # output ("cloud", "markers") -> frame of the objects it shows

    def close(self) -> None:
        self._tf.close()

    def prepare(self, frame: Frame, image_hw: tuple[int, int], max_pixels: int,
                warnings: list[str]) -> ThreeDInputs | None:
        """Decodes and checks depth and CameraInfo; None when the frame has no depth."""
        if frame.depth is None:
            if self._node.p("use_depth"):
                warnings.append("no depth image paired with this frame: 2D results only")
            return None
        h, w = image_hw
        raw = conversions.depth_to_raw(frame.depth, max_pixels)
        depth = depth_from_raw(raw, frame.depth.encoding)
        dh, dw = depth.shape
        # tf2 and RViz reject frame ids with a leading slash (a ROS 1 habit some drivers keep)
        frame_id = frame.image.header.frame_id.lstrip("/")
        mismatch = depth_frame_mismatch(frame_id, frame.depth.header.frame_id)
        intrinsics, reason = None, ""
        if not frame_id.strip():
            # clouds and markers in frame "" are dropped by TF and RViz, and an empty
            # geometry_frame_id tells the client that no 3D was attempted: say why instead
            reason = ("the colour image has an empty header.frame_id: 3D outputs need the camera's "
                      "frame (REP 105); set the camera driver's frame_id")
        elif frame.camera_info is None:
            reason = "no CameraInfo received on 'camera_info': 3D outputs disabled"
        elif mismatch:
            reason = mismatch
        elif info_frame_mismatch(frame_id, frame.camera_info.header.frame_id):
            reason = info_frame_mismatch(frame_id, frame.camera_info.header.frame_id)
        else:
            try:
                cam = conversions.camera_info_to_intrinsics(frame.camera_info)
            except InputError as exc:
                reason = str(exc)
            else:
                # A different aspect ratio of depth or CameraInfo is an ERROR (raised here).
                intrinsics = resolve_depth_intrinsics((w, h), (dw, dh), cam)
                distortion = conversions.distortion_note(frame.camera_info)
                if distortion:
                    warnings.append(distortion)
        if intrinsics is None and not mismatch and (dh, dw) != (h, w):
            # depth in another frame is never used (reason above), whatever its size: a depth
            # topic remapped to the unaligned stream keeps 2D results either way
            resolve_depth_intrinsics((w, h), (dw, dh), CameraIntrinsics(1, 1, 0, 0, w, h))
        if reason:
            warnings.append(reason)
        elif intrinsics is not None:
            warnings.extend(_unchecked_frames(frame_id, frame))
        hint = depth_unit_hint(depth, frame.depth.encoding, float(self._node.p("min_depth_m")),
                               float(self._node.p("max_depth_m")))
        if hint:
            warnings.append(hint)
        if mismatch:
            at_image = None
        else:
            at_image = depth if (dh, dw) == (h, w) else mask_to_depth_resolution(depth, (h, w))
        return ThreeDInputs(at_image, depth, intrinsics, frame_id, reason, hint)

    def geometry_config(self) -> GeometryConfig:
        p = self._node.p
        return GeometryConfig(
            erode_px=int(p("erode_px")), outlier_method=p("outlier_method"),
            outlier_threshold=float(p("outlier_threshold")), cluster_gap_m=float(p("cluster_gap_m")),
            min_points=int(p("min_points")), min_depth_m=float(p("min_depth_m")),
            max_depth_m=float(p("max_depth_m")), voxel_size_m=float(p("voxel_size_m")))

    def fill(self, result: SegmentationResult, instances: list[Instance], rgb: np.ndarray,
             inputs: ThreeDInputs, header: Header, warnings: list[str]) -> tuple[str, Any]:
        """Fills the objects' 3D fields; returns their frame and the objects' combined cloud (None
        without 3D), which :meth:`publish` sends once the node has given the objects their track ids."""
        if inputs.intrinsics is None:
            for obj in result.objects:
                obj.has_3d, obj.status_3d = False, inputs.reason
            return "", None
        transform, out_frame = self._target_transform(header, inputs.frame_id, warnings)
        # an object without a mask is its box, in the pixels its SegmentedObject.mask and ~/mask give it
        masks = [inst.mask if inst.mask is not None else box_mask(rgb.shape[:2], inst.box) for inst in instances]
        config = self.geometry_config()
        try:
            config.validate()
        except InputError as exc:  # parameters that cannot work together (a params file): 2D stays
            for obj in result.objects:
                obj.has_3d, obj.status_3d = False, str(exc)
            warnings.append(f"no 3D: {exc}")
            return "", None
        geoms = extract_objects(masks, inputs.depth_native, rgb, inputs.intrinsics, config, transform)
        cloud_header = Header(stamp=header.stamp, frame_id=out_frame)
        clouds = []
        for obj, geom in zip(result.objects, geoms):
            clouds.append(fill_object_3d(obj, geom, obj.id, cloud_header))
        if inputs.unit_hint:
            for obj in result.objects:
                if not obj.has_3d:
                    obj.status_3d = f"{obj.status_3d}; {inputs.unit_hint}" if obj.status_3d else inputs.unit_hint
        missing = [f"{obj.id} ({obj.status_3d})" for obj in result.objects if not obj.has_3d]
        if missing:
            warnings.append("no 3D for object " + ", ".join(missing))
        return out_frame, cloud_to_msg(concat_clouds(clouds), cloud_header)

    def publish(self, result: SegmentationResult | None, cloud: Any, image_header: Header) -> None:
        """~/cloud and ~/markers of a filled result (markers show each object's track id).

        An output with nothing new to show (a result without a cloud: NO_MATCH, ERROR, no 3D; or
        switched off by ``publish_cloud``/``publish_markers``) clears what it shows, once: an empty
        cloud or the DELETEALLs alone, in that frame. Else, with markers that last until replaced,
        RViz (and a planner reading the cloud) would go on seeing objects that are gone.
        """
        for output in OUTPUTS:
            if cloud is not None and self._node.p(f"publish_{output}"):
                self._node.publish_output(output, cloud if output == "cloud" else
                                          self._markers(result.objects, cloud.header))
                self._shown[output] = cloud.header.frame_id
            else:
                self._clear(output, image_header.stamp)

    def clear_switched_off(self) -> None:
        """Clears at once what an output switched off at runtime shows (``ros2 param set ...
        publish_markers false``), rather than at the next result."""
        for output in OUTPUTS:
            if not self._node.p(f"publish_{output}"):
                self._clear(output, self._node.get_clock().now().to_msg())

    def _clear(self, output: str, stamp: Any) -> None:
        if output not in self._shown:
            return
        header = Header(stamp=stamp, frame_id=self._shown.pop(output))
        self._node.publish_output(output, cloud_to_msg(concat_clouds([]), header) if output == "cloud" else
                                  self._markers([], header))

    def _markers(self, objects: Any, header: Header) -> Any:
        """The objects' markers (none: the DELETEALLs alone), in the node's name as namespace, so
        that two nodes' markers on one topic never clear each other's."""
        return build_markers(objects, header, lifetime_s=float(self._node.p("marker_lifetime_s")),
                             namespace=self._node.get_name())

    def clear_display(self) -> None:
        """Clears the objects on display, if any, when the node stops reporting (deactivate,
        cleanup): markers that last until replaced would otherwise stay in RViz, and a 3D stage
        made anew at the next configure would not know they are there."""
        self.publish(None, None, Header(stamp=self._node.get_clock().now().to_msg()))

    def _target_transform(self, header: Header, camera_frame: str, warnings: list[str]):
        target = clean_frame(str(self._node.p("target_frame")))
        if not target or target == camera_frame.lstrip("/"):
            return None, camera_frame
        try:
            transform = self._tf.lookup(target, camera_frame, header.stamp, float(self._node.p("tf_timeout_s")))
        except TransformUnavailable as exc:
            warnings.append(f"3D outputs stay in the camera frame '{camera_frame}': no transform to "
                            f"target_frame '{target}' ({exc})")
            return None, camera_frame
        return transform, target


def info_frame_mismatch(image_frame_id: str, info_frame_id: str) -> str:
    """Why a CameraInfo must not be used for an image, or "" when their frames agree.

    The node keeps the newest CameraInfo; one of another camera (a wrong remapping) would
    project every object with the wrong intrinsics, silently. Empty frame ids pass.
    """
    img, info = image_frame_id.lstrip("/"), info_frame_id.lstrip("/")
    if not img or not info or img == info:
        return ""
    return (f"CameraInfo frame '{info}' differs from the colour image frame '{img}': it belongs to another "
            f"camera (check the 'camera_info' remapping); 3D outputs disabled")


def depth_unit_hint(depth_m: np.ndarray, encoding: str, min_depth_m: float, max_depth_m: float) -> str:
    """A hint when the typical depth reading looks like a unit mistake, else "": nearer than
    ``min_depth_m``, or farther than both ``max_depth_m`` and 100 m (a far scene alone is not one).

    The unit of a depth image comes from its encoding (REP 118: 16UC1 millimetres, 32FC1
    metres). A driver that writes metres into 16UC1 gives readings of 1-5 mm, one that writes
    millimetres into 32FC1 gives 500-5000 m: the range check then leaves no point, and
    "not enough valid depth" alone would not say why. Looks at every 8th pixel (cheap at 720p).
    """
    sample = depth_m[::8, ::8]
    valid = sample[np.isfinite(sample)]
    if valid.size == 0:
        return ""
    median = float(np.median(valid))
    mm = encoding in ("16UC1", "mono16")
    if median < min_depth_m:
        guess = ("metres written as millimetres? 16UC1/mono16 hold millimetres" if mm else
                 "32FC1 holds metres: were the values divided by 1000 twice?")
        return (f"depth looks like the wrong unit: the median reading is {median:.4g} m, nearer than "
                f"min_depth_m={min_depth_m:g} m ({guess})")
    if median > max(max_depth_m, _IMPLAUSIBLY_FAR_M):
        return (f"depth looks like the wrong unit: the median reading is {median:.4g} m, farther than "
                f"max_depth_m={max_depth_m:g} m (millimetres written as metres? 32FC1 holds metres; "
                f"use 16UC1 for millimetres)")
    return ""


def _unchecked_frames(frame_id: str, frame: Frame) -> list[str]:
    """Warnings for a depth image or CameraInfo without a frame_id: used, but whether it belongs to
    the colour camera cannot be checked (a driver that leaves it empty may well publish unaligned
    depth)."""
    parts = (("depth image", frame.depth), ("camera_info", frame.camera_info))
    return [f"{what} has an empty header.frame_id: cannot check that it belongs to '{frame_id}'"
            for what, msg in parts if msg is not None and not msg.header.frame_id.strip("/ ")]

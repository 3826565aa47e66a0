"""A result as standard ``vision_msgs`` detections, for tools that know no package-specific message.

Why: trackers, RViz's vision_msgs displays, behaviour trees and grasp pipelines read
``vision_msgs/Detection2DArray`` and ``Detection3DArray``; our ``SegmentationResult`` carries
more (masks, clouds, timings) but only our clients can read it. Each object becomes one
detection with one hypothesis (its label and score); a detection's ``id`` is the object's
``track_id`` (vision_msgs: "detections of the same object in different messages should have the
same id"), or empty when tracking is off (:func:`detection_id`). 3D detections exist only for objects with
3D, in the result's ``geometry_frame_id``: the oriented box, and the centroid as the
hypothesis's pose.

``vision_msgs`` is not a hard dependency: without it (:data:`AVAILABLE` false) the node publishes
the rest and says once why these two topics are missing.
"""

from __future__ import annotations

from typing import Any

from geometry_msgs.msg import Pose, Quaternion
from std_msgs.msg import Header

try:
    from vision_msgs.msg import (
        BoundingBox2D,
        BoundingBox3D,
        Detection2D,
        Detection2DArray,
        Detection3D,
        Detection3DArray,
        ObjectHypothesisWithPose,
    )

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised by the node test that hides the package
    AVAILABLE = False


def detection_id(obj: Any) -> str:
    """The id a consumer can follow across messages: the track, else "" (untracked).

    vision_msgs asks that one object keep its id across messages, and allows an empty one: the
    object's number in a result names another object in the next, and a consumer that associates
    by id would merge them.
    """
    return str(obj.track_id) if obj.track_id else ""


def _hypotheses(obj: Any, pose: Pose | None = None) -> list[Any]:
    hypothesis = ObjectHypothesisWithPose()
    hypothesis.hypothesis.class_id = obj.label
    hypothesis.hypothesis.score = float(obj.score)
    if pose is not None:
        hypothesis.pose.pose = pose
    return [hypothesis]


def detections_2d(result: Any) -> Any:
    """``Detection2DArray`` of every object: its box (pixels, centre and size) and hypothesis."""
    out = Detection2DArray(header=result.header)
    for obj in result.objects:
        roi = obj.box
        bbox = BoundingBox2D(size_x=float(roi.width), size_y=float(roi.height))
        bbox.center.position.x = roi.x_offset + roi.width / 2.0
        bbox.center.position.y = roi.y_offset + roi.height / 2.0
        out.detections.append(Detection2D(header=result.header, results=_hypotheses(obj), bbox=bbox,
                                          id=detection_id(obj)))
    return out


def detections_3d(result: Any) -> Any:
    """``Detection3DArray`` of the objects with 3D, in the result's geometry frame (image stamp)."""
    header = Header(stamp=result.header.stamp, frame_id=result.geometry_frame_id or result.header.frame_id)
    out = Detection3DArray(header=header)
    for obj in result.objects:
        if not obj.has_3d:
            continue
        centroid = Pose(position=obj.centroid, orientation=Quaternion(w=1.0))
        bbox = BoundingBox3D(center=obj.bbox_center, size=obj.bbox_size)
        out.detections.append(Detection3D(header=header, results=_hypotheses(obj, centroid), bbox=bbox,
                                          id=detection_id(obj)))
    return out

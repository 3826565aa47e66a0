"""RViz ``visualization_msgs/MarkerArray`` of a SegmentationResult.

Every array starts with a DELETEALL marker for each of the three namespaces below, so the boxes
of objects that are gone vanish even when the new result has fewer objects (RViz keeps a marker
until it is deleted or expires). A DELETEALL with a namespace clears that namespace exactly (RViz
2 compares it whole, not as a prefix), and one without would clear other publishers' markers on
the same display too. Then, per object with 3D: an oriented CUBE (the box), a TEXT_VIEW_FACING
label with the score above it, and a SPHERE at the centroid. The three kinds live in the
namespaces ``<ns>/boxes``, ``<ns>/labels`` and ``<ns>/centroids`` (toggled separately in RViz); the marker id is the
object id, the colour follows the track id (the object id when untracked) as in ``~/overlay``
(:func:`color_for_id`), the frame is the result's
``geometry_frame_id`` and the stamp the image's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from builtin_interfaces.msg import Duration
from geometry_msgs.msg import Point, Pose, Quaternion, Vector3
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from qwen3vl_seg_ros.overlay import colours_for
from qwen3vl_seg_ros.transforms import quat_rotate

#: RViz complains about zero-scale markers; flat objects get this thickness instead.
_MIN_SCALE_M = 0.002


@dataclass
class MarkerStyle:
    """Appearance of the markers (the node sets ``lifetime_s`` from ``marker_lifetime_s``)."""

    namespace: str = "qwen3vl_seg"
    lifetime_s: float = 0.0  # 0 = until replaced (the next DELETEALL)
    box_alpha: float = 0.35
    text_height_m: float = 0.04
    centroid_diameter_m: float = 0.02


def color_for_id(object_id: int) -> tuple[float, float, float]:
    """The RGB colour in [0, 1] of a key, the one ``~/overlay`` draws it in
    (:func:`qwen3vl_seg_ros.overlay.colours_for`)."""
    r, g, b = (float(c) / 255.0 for c in colours_for([int(object_id)])[0])
    return r, g, b


def _duration(seconds: float) -> Duration:
    ns = round(float(seconds) * 1e9)
    return Duration(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def _marker(header: Header, ns: str, marker_id: int, kind: int, style: MarkerStyle) -> Marker:
    m = Marker(header=header, ns=ns, id=int(marker_id) & 0x7FFFFFFF, type=kind, action=Marker.ADD)
    m.lifetime = _duration(style.lifetime_s)
    m.frame_locked = False
    return m


def _color(object_id: int, alpha: float) -> ColorRGBA:
    r, g, b = color_for_id(object_id)
    return ColorRGBA(r=float(r), g=float(g), b=float(b), a=float(alpha))


def _point(v: np.ndarray) -> Point:
    return Point(x=float(v[0]), y=float(v[1]), z=float(v[2]))


#: The namespaces under the style's: one per kind of marker.
KINDS = ("boxes", "labels", "centroids")


def delete_all_marker(header: Header, namespace: str = "") -> Marker:
    """A DELETEALL marker: RViz 2 clears the markers of exactly ``namespace`` on it (all of the
    display's, of every publisher, for "")."""
    return Marker(header=header, ns=namespace, id=0, action=Marker.DELETEALL)


def object_markers(obj: Any, header: Header, style: MarkerStyle) -> list[Marker]:
    """Box, label and centroid markers of one ``SegmentedObject`` with ``has_3d``."""
    oid = int(obj.id)
    track = int(obj.track_id)
    hue = track or oid  # a tracked object keeps its colour from result to result
    boxes, labels, centroids = (f"{style.namespace}/{kind}" for kind in KINDS)
    box = _marker(header, boxes, oid, Marker.CUBE, style)
    box.pose = obj.bbox_center
    size = obj.bbox_size
    box.scale = Vector3(x=max(size.x, _MIN_SCALE_M), y=max(size.y, _MIN_SCALE_M), z=max(size.z, _MIN_SCALE_M))
    box.color = _color(hue, style.box_alpha)

    # The label floats just beyond the box's top face along the box's own z axis (the "up" of an
    # upright box), so it never hides inside the box.
    q = obj.bbox_center.orientation
    quat = np.array([q.x, q.y, q.z, q.w], dtype=np.float64)
    centre = np.array([obj.bbox_center.position.x, obj.bbox_center.position.y, obj.bbox_center.position.z])
    offset = 0.5 * max(size.z, 0.0) + style.text_height_m
    text_pos = centre + quat_rotate(quat, np.array([0.0, 0.0, offset]))
    label = _marker(header, labels, oid, Marker.TEXT_VIEW_FACING, style)
    label.pose = Pose(position=_point(text_pos), orientation=Quaternion(w=1.0))
    label.scale = Vector3(z=float(style.text_height_m))
    label.color = _color(hue, 1.0)
    label.text = (f"#{track} " if track else "") + f"{obj.label} {obj.score:.2f}"

    dot = _marker(header, centroids, oid, Marker.SPHERE, style)
    dot.pose = Pose(position=obj.centroid, orientation=Quaternion(w=1.0))
    d = float(style.centroid_diameter_m)
    dot.scale = Vector3(x=d, y=d, z=d)
    dot.color = _color(hue, 1.0)
    return [box, label, dot]


def build_markers(
    objects: Iterable[Any],
    header: Header,
    lifetime_s: float | None = None,
    namespace: str | None = None,
    style: MarkerStyle | None = None,
) -> MarkerArray:
    """A DELETEALL per namespace, then box, label and centroid of each ``SegmentedObject`` with ``has_3d``.

    ``header`` gives the frame the objects' 3D fields are in and the image stamp. ``lifetime_s``
    and ``namespace``, when given, override those of ``style``.
    """
    style = style or MarkerStyle()
    if lifetime_s is not None:
        style = replace(style, lifetime_s=float(lifetime_s))
    if namespace is not None:
        style = replace(style, namespace=namespace)
    markers = [delete_all_marker(header, f"{style.namespace}/{kind}") for kind in KINDS]
    for obj in objects:
        if obj.has_3d:
            markers.extend(object_markers(obj, header, style))
    return MarkerArray(markers=markers)


def markers_from_result(result: Any, style: MarkerStyle | None = None) -> MarkerArray:
    """:func:`build_markers` for a ``SegmentationResult``: its geometry frame and image stamp.

    A result without 3D (empty ``geometry_frame_id``) gives only the DELETEALL, in the image frame.
    """
    frame = result.geometry_frame_id or result.header.frame_id
    header = Header(stamp=result.header.stamp, frame_id=frame)
    objects = result.objects if result.geometry_frame_id else []
    return build_markers(objects, header, style=style)

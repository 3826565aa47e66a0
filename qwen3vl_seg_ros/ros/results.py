"""Core outputs -> SegmentationResult / SegmentedObject messages."""

from __future__ import annotations

import re
from collections.abc import Sequence

from std_msgs.msg import Header

from qwen3vl_seg_ros.msg import SegmentationResult, SegmentedObject
from qwen3vl_seg_ros.ros.conversions import box_to_roi, mask_crop_msg
from qwen3vl_seg_ros.types import Instance

#: Longest raw model answer copied into a result (characters); the rest is cut with a note.
MAX_ANSWER_CHARS = 4096
#: A refused command is echoed in its result cut to this many characters (with a note of the rest).
ECHO_CHARS = 200


_SURROGATES = re.compile("[\ud800-\udfff]")


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters]"


def safe_text(text: object) -> str:
    """``text`` as a str that serialises as UTF-8: lone surrogates become U+FFFD.

    ROS strings are UTF-8 on the wire; one lone surrogate (e.g. a model's ``"\\ud83d"`` label,
    half of an escaped emoji cut off by the token limit) makes rclpy's publish raise, which
    would turn a good result into an error. Non-str values (a segmenter's None label) are
    converted with ``str``.
    """
    text = text if isinstance(text, str) else str(text)
    return _SURROGATES.sub("\ufffd", text)


def new_result(command: str, request_id: str, status: int, message: str,
               header: Header | None = None, segmenter: str = "") -> SegmentationResult:
    """A result with its identity filled; ERROR results are complete as returned."""
    result = SegmentationResult()
    if header is not None:
        result.header = header
    result.command = safe_text(command)
    result.request_id = safe_text(request_id)
    result.status = status
    result.message = safe_text(message)
    result.segmenter = safe_text(segmenter)
    return result


def objects_from_instances(instances: Sequence[Instance], ids: Sequence[int], width: int, height: int,
                           header: Header) -> list[SegmentedObject]:
    """2D fields of each object; the geometry stage fills the 3D fields afterwards."""
    objects = []
    for inst, obj_id in zip(instances, ids):
        obj = SegmentedObject()
        obj.id = int(obj_id)
        obj.label = safe_text(inst.label)
        obj.score = float(inst.score)
        obj.box_score = float(inst.box_score)
        obj.mask_score = float(inst.mask_score)
        obj.mask_source = safe_text(inst.mask_source)
        obj.box = box_to_roi(inst.box, width, height)
        obj.mask = mask_crop_msg(inst.mask, obj.box, header)
        obj.has_3d = False
        objects.append(obj)
    return objects

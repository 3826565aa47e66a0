"""Plain data passed between the stages: numpy arrays and dataclasses, no ROS, no torch.

Conventions used everywhere in the package:

* images are ``HxWx3 uint8`` **RGB** arrays (the ROS layer converts from the wire encoding);
* depth is ``HxW float32`` in **metres**, with ``NaN`` where the sensor gave no reading
  (0, NaN and inf on the wire all become NaN);
* boxes are ``[x1, y1, x2, y2]`` float pixel coordinates of the original image, ``x2``/``y2``
  being the right/bottom *edges* (a box covering pixel columns 10..19 is ``x1=10, x2=20``);
* masks are full-image ``HxW bool`` arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Names of the mask heads, as reported in ``Instance.mask_source``.
MASK_SOURCES = ("decoder", "grabcut", "depth", "box")

#: Where the decoder's object query came from, as reported in ``SegmentationOutput.query_source``.
QUERY_SOURCES = ("mask_token", "last_json_token", "none")


class SegmenterError(RuntimeError):
    """The segmenter could not serve a command; the message is shown to the user as is."""


class InputError(ValueError):
    """An input (image, depth, camera info, command) is unusable; the message says why."""


@dataclass
class Instance:
    """One object found in an image."""

    box: np.ndarray  # (4,) float32, [x1, y1, x2, y2] in pixels
    label: str
    score: float  # final confidence in [0, 1]
    mask: np.ndarray | None = None  # (H, W) bool, full image
    box_score: float = 0.0  # grounding confidence in [0, 1]
    mask_score: float = 0.0  # mask confidence (IoU head or heuristic) in [0, 1]
    mask_source: str = "box"  # one of MASK_SOURCES
    # The grounding model's own box; ``box`` differs from it when the decoder refined the box
    # from the mask (``box_refine_passes``). None: the same as ``box``.
    model_box: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.box = np.asarray(self.box, dtype=np.float32).reshape(4)
        self.model_box = self.box.copy() if self.model_box is None else \
            np.asarray(self.model_box, dtype=np.float32).reshape(4)


@dataclass
class SegmentationOutput:
    """What a segmenter returns for one image and one command."""

    instances: list[Instance] = field(default_factory=list)
    raw_answer: str = ""  # the grounding model's text, kept for debugging and NO_MATCH reasons
    query_source: str = "none"  # one of QUERY_SOURCES
    no_match_reason: str = ""  # why nothing was found, when instances is empty
    warnings: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)  # "grounding", "mask"


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics of a (rectified) camera, as in CameraInfo's K matrix."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def is_valid(self) -> bool:
        vals = np.array([self.fx, self.fy, self.cx, self.cy], dtype=np.float64)
        return bool(
            np.all(np.isfinite(vals)) and self.fx > 0 and self.fy > 0
            and self.width > 0 and self.height > 0
        )

    def scaled_to(self, width: int, height: int) -> CameraIntrinsics:
        """Intrinsics of the same camera at another resolution (same field of view).

        Uses the pixel-edge convention: a pixel centre at u maps to (u + 0.5) * s - 0.5.
        """
        sx = width / self.width
        sy = height / self.height
        return CameraIntrinsics(
            fx=self.fx * sx,
            fy=self.fy * sy,
            cx=(self.cx + 0.5) * sx - 0.5,
            cy=(self.cy + 0.5) * sy - 0.5,
            width=int(width),
            height=int(height),
        )

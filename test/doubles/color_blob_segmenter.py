"""Test double of the segmenter: finds coloured blobs named in the command.

It stands at the model boundary only (the node, conversions, geometry and publishing are all
real), so tests can check every field of a result against what they drew into the image.
Rules, chosen to be easy to predict from a test:

* the command's colour words (red, green, blue, yellow, white) select the pixels whose RGB
  value equals that colour exactly; each 4-connected component of at least 20 pixels is one
  instance with its tight box, label "<colour> blob" and score = its fill ratio of the box;
* "sleep:<seconds>" anywhere in the command sleeps that long first (slow model);
* "raise:oom" raises a torch-style CUDA out-of-memory error, "raise:error" a RuntimeError,
  "raise:segmenter" a SegmenterError (model failures).
"""

from __future__ import annotations

import re
import time

import cv2
import numpy as np

from qwen3vl_seg_ros.segmenter import Segmenter, SegmenterOptions
from qwen3vl_seg_ros.types import Instance, SegmentationOutput, SegmenterError

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
}


class OutOfMemoryError(RuntimeError):
    """Same name and message shape as torch.cuda.OutOfMemoryError."""


class ColorBlobSegmenterDouble(Segmenter):
    name = "color_blob_double"

    def __init__(self, options: SegmenterOptions | None = None) -> None:
        self.options = options or SegmenterOptions()
        self.calls = 0
        self.warmed_up = False
        self.closed = False

    @classmethod
    def from_options(cls, options: SegmenterOptions, progress=None) -> ColorBlobSegmenterDouble:
        if progress:
            progress("colour-blob test double loaded")
        return cls(options)

    def warmup(self, progress=None) -> None:
        self.segment(np.zeros((32, 32, 3), np.uint8), "red")
        self.warmed_up = True

    def segment(self, rgb, command, depth=None) -> SegmentationOutput:
        self.calls += 1
        sleep = re.search(r"sleep:([0-9.]+)", command)
        if sleep:
            time.sleep(float(sleep.group(1)))
        if "raise:oom" in command:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if "raise:error" in command:
            raise RuntimeError("simulated model failure")
        if "raise:segmenter" in command:
            raise SegmenterError("simulated segmenter error with a reason")
        t0 = time.perf_counter()
        instances = []
        words = re.findall(r"[a-z]+", command.lower())
        for word in words:
            if word not in COLOURS:
                continue
            hit = np.all(rgb == np.array(COLOURS[word], np.uint8), axis=-1)
            n, labels, stats, _ = cv2.connectedComponentsWithStats(hit.astype(np.uint8), connectivity=4)
            for k in range(1, n):
                x, y, w, h, area = stats[k]
                if area < 20:
                    continue
                mask = labels == k
                fill = float(area) / float(w * h)
                instances.append(Instance(box=[x, y, x + w, y + h], label=f"{word} blob", score=fill,
                                          mask=mask, box_score=1.0, mask_score=fill, mask_source="decoder"))
        answer = str([{"bbox_2d": [int(v) for v in i.box], "label": i.label} for i in instances])
        out = SegmentationOutput(instances=instances, raw_answer=answer, query_source="mask_token",
                                 timings_ms={"grounding": 0.0, "mask": (time.perf_counter() - t0) * 1e3})
        if not instances:
            out.no_match_reason = f"no blob of the colours named in '{command}'"
        return out

    def close(self) -> None:
        self.closed = True

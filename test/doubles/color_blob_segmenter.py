"""Test double of the segmenter: finds coloured blobs named in the command.

It stands at the model boundary only (the node, conversions, geometry and publishing are all
real), so tests can check every field of a result against what they drew into the image.
Rules, chosen to be easy to predict from a test:

* the command's colour words (red, green, blue, yellow, white) select the pixels whose RGB
  value equals that colour exactly; each 4-connected component of at least 20 pixels is one
  instance with its tight box, label "<colour> blob" and score = its fill ratio of the box;
* "sleep:<seconds>" anywhere in the command sleeps that long first (slow model);
* "raise:oom" raises a torch-style CUDA out-of-memory error, "raise:error" a RuntimeError,
  "raise:segmenter" a SegmenterError (model failures);
* "emit:<kind>" returns malformed output on purpose (see :data:`MALFORMED`), the bugs a
  third-party segmenter may have, so that tests can check the node's handling of them;
* "answer:<name>" passes the canned Qwen3-VL answer ``ANSWERS[name]`` through the real parser
  (:func:`qwen3vl_seg_ros.grounding.parse_answer`) and returns its boxes as objects, so that
  node tests see what the real parser makes of bad model answers.
"""

from __future__ import annotations

import json
import re
import threading
import time

import cv2
import numpy as np

from qwen3vl_seg_ros.grounding import parse_answer
from qwen3vl_seg_ros.segmenter import Segmenter, SegmenterOptions
from qwen3vl_seg_ros.types import Instance, SegmentationOutput, SegmenterError

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
}


#: Kinds of malformed output for "emit:<kind>" (what the node receives, and why it is realistic).
MALFORMED = {
    "nan_score": "the red blobs, plus a copy of the first with a NaN score (a division by zero in scoring)",
    "all_nan": "every object with a NaN score",
    "inf_box": "one object whose box holds NaN and inf (a degenerate regression output)",
    "outside_box": "one box entirely outside the image and one reaching past its top-left corner",
    "swapped_box": "the red blob with x1 > x2 and y1 > y2",
    "wrong_mask_size": "the red blob with a mask of half the image's size (a forgotten resize)",
    "uint8_mask": "the red blob with a 0/255 uint8 mask instead of bool",
    "score_range": "the red blob with score 1.7 and box_score -0.2 (logits instead of probabilities)",
    "mask_past_box": "the red blob's box 10 px smaller on each side than its mask (a decoder without "
                     "refinement passes: a mask may reach past the model's box)",
    "many": "emit:many:<n>: n box-only objects spread over the image (a runaway answer)",
    "bad_label": "a label holding a lone surrogate, and one of 10,000 characters",
    "none_label": "a label that is None instead of a str",
    "huge_answer": "a raw answer of 1,000,000 characters",
    "not_output": "None instead of a SegmentationOutput",
    "not_list": "instances as a dict instead of a list",
}

#: Real-looking Qwen3-VL grounding answers for "answer:<name>" (coordinates on the 0..1000 scale).
ANSWERS = {
    "fenced": '```json\n[\n\t{"bbox_2d": [125, 250, 375, 667], "label": "red mug"}\n]\n```',
    "prose": "I'm sorry, but I can't find a red mug in this image. The table holds a laptop and a book.",
    "truncated": ('```json\n[\n\t{"bbox_2d": [125, 250, 375, 667], "label": "red mug"},\n'
                  '\t{"bbox_2d": [600, 3'),
    "out_of_range": '[{"bbox_2d": [-40, 250, 1375, 667], "label": "red mug"}]',
    "empty": "```json\n[]\n```",
    "point": '[{"point_2d": [250, 400], "label": "red mug"}]',
    "zero_area": '[{"bbox_2d": [300, 300, 300, 300], "label": "red mug"}]',
    "surrogate": '[{"bbox_2d": [125, 250, 375, 667], "label": "mug \\ud83d"}]',
    # 1000 distinct boxes on a 40 x 25 grid (runaway generation with a large max_new_tokens)
    "thousands": json.dumps([{"bbox_2d": [24 * (k % 40), 24 * (k // 40), 24 * (k % 40) + 20, 24 * (k // 40) + 20],
                              "label": f"screw {k}"} for k in range(1000)]),
}


class OutOfMemoryError(RuntimeError):
    """Same name and message shape as torch.cuda.OutOfMemoryError."""


class ColorBlobSegmenterDouble(Segmenter):
    name = "color_blob_double"

    def __init__(self, options: SegmenterOptions | None = None) -> None:
        self.options = options or SegmenterOptions()
        self.calls = 0
        self.warmed_up = False
        self.warmed_sizes: list[tuple[int, int]] = []
        self.events: list[tuple[str, tuple[int, int], str]] = []  # (call, (width, height), thread), in order
        self.closed = False

    @classmethod
    def from_options(cls, options: SegmenterOptions, progress=None) -> ColorBlobSegmenterDouble:
        if progress:
            progress("colour-blob test double loaded")
        return cls(options)

    def warmup(self, progress=None, image_size=None) -> None:
        width, height = image_size or (32, 32)
        self.segment(np.zeros((height, width, 3), np.uint8), "red")
        self.warmed_up = True
        self.warmed_sizes.append((width, height))
        self.events.append(("warmup", (width, height), threading.current_thread().name))

    def segment(self, rgb, command, depth=None) -> SegmentationOutput:
        self.calls += 1
        self.last_depth_shape = None if depth is None else depth.shape  # what the node handed over
        self.events.append(("segment", rgb.shape[1::-1], threading.current_thread().name))
        sleep = re.search(r"sleep:([0-9.]+)", command)
        if sleep:
            time.sleep(float(sleep.group(1)))
        if "raise:oom" in command:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if "raise:error" in command:
            raise RuntimeError("simulated model failure")
        if "raise:segmenter" in command:
            raise SegmenterError("simulated segmenter error with a reason")
        answer = re.search(r"answer:([a-z0-9_]+)", command)
        if answer:
            return self._from_answer(rgb, ANSWERS[answer.group(1)])
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
        emit = re.search(r"emit:([a-z0-9_]+)(?::(\d+))?", command)
        if emit:
            return self._malformed(out, rgb.shape[0], rgb.shape[1], emit.group(1), int(emit.group(2) or 0))
        return out

    @staticmethod
    def _from_answer(rgb: np.ndarray, text: str) -> SegmentationOutput:
        h, w = rgb.shape[:2]
        parsed = parse_answer(text, w, h)
        instances = [Instance(box=box, label=label, score=0.9, box_score=0.9, mask_score=1.0, mask_source="box")
                     for box, label in zip(parsed.boxes, parsed.labels)]
        return SegmentationOutput(instances=instances, raw_answer=text, query_source="none",
                                  no_match_reason=parsed.no_match_reason, warnings=list(parsed.warnings))

    @staticmethod
    def _malformed(out: SegmentationOutput, h: int, w: int, kind: str, n: int) -> SegmentationOutput | None:
        """The blobs found in ``out``, broken the way ``kind`` says (see MALFORMED)."""
        if kind not in MALFORMED:
            raise ValueError(f"unknown malformed kind '{kind}'")
        first = out.instances[0] if out.instances else Instance(box=[0, 0, 10, 10], label="x", score=1.0)
        if kind == "nan_score":
            out.instances.append(Instance(box=first.box.copy(), label="nan blob", score=float("nan"),
                                          mask=first.mask, mask_source="decoder"))
        elif kind == "all_nan":
            for inst in out.instances:
                inst.score = float("nan")
        elif kind == "inf_box":
            out.instances.append(Instance(box=[float("nan"), 0, float("inf"), 10], label="inf blob", score=1.0))
        elif kind == "outside_box":
            out.instances.append(Instance(box=[w + 10, h + 10, w + 60, h + 60], label="outside", score=1.0))
            out.instances.append(Instance(box=[-30, -30, 40, 40], label="corner", score=1.0))
        elif kind == "swapped_box":
            x1, y1, x2, y2 = first.box
            first.box = np.array([x2, y2, x1, y1], np.float32)
        elif kind == "wrong_mask_size":
            first.mask = np.ones((h // 2, w // 2), bool)
        elif kind == "uint8_mask":
            first.mask = first.mask.astype(np.uint8) * 255
        elif kind == "score_range":
            first.score, first.box_score = 1.7, -0.2
        elif kind == "mask_past_box":
            first.box = np.asarray(first.box, np.float32) + np.array([10, 10, -10, -10], np.float32)
        elif kind == "many":
            rng = np.random.default_rng(n)
            xy = rng.uniform(0, np.maximum([w - 8, h - 8], 1), size=(n, 2))  # images under 8 px too
            out.instances = [Instance(box=[x, y, x + 8, y + 8], label=f"thing {k}", score=float(s))
                             for k, ((x, y), s) in enumerate(zip(xy, rng.uniform(0.31, 1.0, n)))]
        elif kind == "bad_label":
            first.label = "mug \ud83d"
            out.instances.append(Instance(box=first.box.copy(), label="m" * 10_000, score=0.99))
        elif kind == "none_label":
            first.label = None  # type: ignore[assignment]
        elif kind == "huge_answer":
            out.raw_answer = "[" * 1_000_000
        elif kind == "not_output":
            return None
        elif kind == "not_list":
            out.instances = {"red": first}  # type: ignore[assignment]
        return out

    def close(self) -> None:
        self.closed = True


class SlowLoadingSegmenterDouble(ColorBlobSegmenterDouble):
    """The colour-blob double whose loading takes ``LOAD_S`` seconds, as a real checkpoint's does."""

    LOAD_S = 2.0

    @classmethod
    def from_options(cls, options: SegmenterOptions, progress=None) -> SlowLoadingSegmenterDouble:
        time.sleep(cls.LOAD_S)
        return cls(options)

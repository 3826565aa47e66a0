"""Property-based fuzzing (hypothesis) of what turns untrusted bytes and text into arrays and boxes.

Targets: the message-to-array conversions (colour and depth images, CameraInfo, raw depth to
metres), the Qwen3-VL answer parser (random text, and generated answers that look like the
model's, good and broken), the command cleaner and the node's check of a segmenter's objects.
The only exception allowed is the documented one (InputError for bad input, SegmenterError for
a broken segmenter); every output must satisfy the documented conventions. Each test asserts
that hypothesis really ran its number of examples; together they are >= 10,000.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sensor_msgs.msg import CameraInfo, Image

from qwen3vl_seg_ros.commands import clean_command
from qwen3vl_seg_ros.geometry import depth_from_raw
from qwen3vl_seg_ros.grounding import COORD_SCALE, SEG_TOKEN, format_answer, parse_answer
from qwen3vl_seg_ros.ros import conversions
from qwen3vl_seg_ros.ros.node import MAX_LABEL_CHARS, SegmentationNode
from qwen3vl_seg_ros.types import InputError, Instance, SegmenterError

#: Examples per property; a test fails if hypothesis ran fewer.
EXAMPLES = {
    "colour_image": 2500,
    "depth_image": 1500,
    "camera_info": 800,
    "answer_text": 2600,
    "answer_like_qwen": 1500,
    "answer_round_trip": 400,
    "command": 1500,
    "segmenter_objects": 800,
}
#: Of those, at least this many must get through the conversion to its output checks: where most
#: drawn messages are rightly refused, a converter that refused everything would pass otherwise.
#: (Well under the lowest of four runs here: colour 94-153 of 2,500, depth 71-135 of 1,500,
#: CameraInfo 64-94 of 800, segmenter objects 50-89 of 800; hypothesis draws differ per run.)
MIN_CONVERTED = {"colour_image": 40, "depth_image": 25, "camera_info": 25, "segmenter_objects": 15}
MAX_PIXELS = 64 * 64


def test_planned_examples_are_at_least_ten_thousand():
    assert sum(EXAMPLES.values()) >= 10_000


def fuzz(key: str, *strategies: st.SearchStrategy) -> Callable[[Callable[..., None]], Callable[[], None]]:
    """Runs the decorated property EXAMPLES[key] times and checks that it did, and that at least
    MIN_CONVERTED[key] of them returned True (reached the output checks)."""
    def decorate(prop: Callable[..., bool | None]) -> Callable[[], None]:
        calls, converted = [0], [0]

        @settings(max_examples=EXAMPLES[key], deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much])
        @given(st.tuples(*strategies))
        def run(args: tuple) -> None:
            calls[0] += 1
            converted[0] += prop(*args) is True

        def test() -> None:
            run()
            assert calls[0] >= EXAMPLES[key], f"hypothesis ran {calls[0]} of {EXAMPLES[key]} examples"
            floor = MIN_CONVERTED.get(key, 0)
            assert converted[0] >= floor, f"only {converted[0]} of {calls[0]} examples got through (need {floor})"

        test.__name__, test.__doc__ = prop.__name__, prop.__doc__
        return test
    return decorate


# ---------------------------------------------------------------------------------------------
# images and CameraInfo
# ---------------------------------------------------------------------------------------------
COLOUR = list(conversions.COLOR_ENCODINGS)
DEPTH = list(conversions.DEPTH_ENCODINGS)
OTHER_ENCODINGS = ["", "bayer_rggb16", "nv21", "8UC3", "16UC3", "32FC3", "64FC1", "jpeg", "RGB8", "rgb8 ",
                   "\u00e9ncoding"]
U32 = 2**32 - 1


DIMENSION = st.integers(0, 70) | st.sampled_from([1, U32, 2**16, 2**31])
BPP = st.integers(1, 8)
MODE = st.integers(0, 3)
PAD = st.integers(1, 16)
ANY_STEP = st.integers(0, 600)
ANY_SIZE = st.integers(0, 3000)
SEED = st.integers(0, 2**32 - 1)
BIT = st.integers(0, 1)
BYTES_PER_PIXEL = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "16UC1": 2, "mono16": 2, "32FC1": 4,
                   "yuv422": 2, "uyvy": 2, "yuv422_yuy2": 2, "yuyv": 2, "bayer_rggb8": 1, "bayer_bggr8": 1,
                   "bayer_gbrg8": 1, "bayer_grbg8": 1}


@st.composite
def image_messages(draw: st.DrawFn, encodings: st.SearchStrategy[str]) -> Image:
    """Image messages whose fields agree (often) or not (size, step, data length, endianness).

    Draws only from module-level strategies: building strategies per example is slow.
    """
    encoding = draw(encodings)
    width, height = draw(DIMENSION), draw(DIMENSION)
    bpp = BYTES_PER_PIXEL.get(encoding) or draw(BPP)
    row = min(width * bpp, U32)
    step = [row, row + draw(PAD), draw(ANY_STEP), U32][draw(MODE)]
    step = min(step, U32)
    exact = min(step * height, 70 * 600 + 64)
    size = [exact, max(0, exact - 1), exact + 7, draw(ANY_SIZE)][draw(MODE)]
    msg = Image(encoding=encoding, width=width, height=height, step=step, is_bigendian=draw(BIT))
    msg.data = np.random.default_rng(draw(SEED)).integers(0, 256, size, np.uint8).tobytes()
    return msg


COLOUR_ENCODINGS = st.sampled_from(COLOUR) | st.sampled_from(OTHER_ENCODINGS) | st.text(max_size=8)
DEPTH_ENCODINGS = st.sampled_from(DEPTH) | st.sampled_from(OTHER_ENCODINGS) | st.text(max_size=8)


@fuzz("colour_image", image_messages(COLOUR_ENCODINGS))
def test_colour_image_conversion_never_fails_unexpectedly(msg: Image) -> bool:
    """image_to_rgb: HxWx3 uint8 of the declared size, or InputError."""
    try:
        rgb = conversions.image_to_rgb(msg, MAX_PIXELS)
    except InputError as exc:
        assert str(exc)
        return
    assert rgb.dtype == np.uint8 and rgb.shape == (msg.height, msg.width, 3) and rgb.flags.c_contiguous
    assert msg.encoding in COLOUR and 0 < msg.width * msg.height <= MAX_PIXELS
    return True


@fuzz("depth_image", image_messages(DEPTH_ENCODINGS))
def test_depth_conversion_never_fails_unexpectedly(msg: Image) -> bool:
    """depth_to_raw + depth_from_raw: HxW float32 metres, finite and > 0 or NaN; or InputError."""
    try:
        raw = conversions.depth_to_raw(msg, MAX_PIXELS)
        depth = depth_from_raw(raw, msg.encoding)
    except InputError as exc:
        assert str(exc)
        return
    assert depth.dtype == np.float32 and depth.shape == (msg.height, msg.width)
    valid = depth[~np.isnan(depth)]
    assert np.all(np.isfinite(valid)) and np.all(valid > 0)
    return True


FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64) | st.sampled_from(
    [0.0, -0.0, 1e-300, 525.0, 319.5, -525.0, 1e308])


@fuzz("camera_info", st.lists(FLOATS, min_size=9, max_size=9), st.integers(0, U32), st.integers(0, U32),
      st.none() | st.lists(FLOATS, min_size=12, max_size=12), st.integers(0, U32), st.integers(0, U32))
def test_camera_info_conversion_never_fails_unexpectedly(k: list[float], width: int, height: int,
                                                         p: list[float] | None, binning: int, roi_x: int) -> bool:
    """camera_info_to_intrinsics: valid intrinsics (finite, fx, fy > 0, non-zero size) or InputError."""
    msg = CameraInfo(width=width, height=height, binning_x=binning, binning_y=binning)
    msg.k = k
    if p is not None:
        msg.p = p
    msg.roi.x_offset, msg.roi.width = roi_x, roi_x // 2
    try:
        intr = conversions.camera_info_to_intrinsics(msg)
    except InputError as exc:
        assert "CameraInfo" in str(exc)
        return
    assert intr.is_valid() and all(math.isfinite(v) for v in (intr.fx, intr.fy, intr.cx, intr.cy))
    return True


# ---------------------------------------------------------------------------------------------
# the answer parser
# ---------------------------------------------------------------------------------------------
def check_parsed(text: str, width: int, height: int) -> None:
    """The parser's contract for any text: no exception, boxes inside the image, reasons when empty."""
    parsed = parse_answer(text, width, height)
    assert parsed.boxes.dtype == np.float32 and parsed.boxes.shape == (len(parsed.labels), 4)
    assert len(parsed.objects) == len(parsed.labels)
    if len(parsed.labels):
        b = parsed.boxes
        assert np.all(np.isfinite(b))
        assert np.all(b[:, 0] >= 0) and np.all(b[:, 2] <= width) and np.all(b[:, 1] >= 0) and np.all(b[:, 3] <= height)
        assert np.all(b[:, 0] <= b[:, 2]) and np.all(b[:, 1] <= b[:, 3])
        assert parsed.no_match_reason == ""
        for obj in parsed.objects:
            assert 0 <= obj.span[0] < obj.span[1] <= len(text)
            assert obj.span[0] <= obj.coord_span[0] < obj.coord_span[1] <= obj.span[1]
            assert all(0.0 <= v <= COORD_SCALE for v in obj.relative_box)
    else:
        assert parsed.no_match_reason
    assert all(isinstance(label, str) for label in parsed.labels)
    assert all(isinstance(w, str) for w in parsed.warnings)


SIZES = st.integers(1, 4096)


@fuzz("answer_text", st.text(max_size=300) | st.text(alphabet='{}[]":,0123456789-. bboxlabel_2d\n`', max_size=300),
      SIZES, SIZES)
def test_parser_on_arbitrary_text(text: str, width: int, height: int) -> None:
    """parse_answer on any text (unicode, brackets, digits, quotes)."""
    check_parsed(text, width, height)


NUMBER = st.integers(-2000, 3000).map(str) | st.floats(-2000, 3000, allow_nan=False).map(lambda f: f"{f:.2f}") | \
    st.sampled_from(["1e3", "NaN", "inf", "-0", "007", "9" * 40, "1_000", "", " ", "null", '"500"'])
KEY = st.sampled_from(["bbox_2d", "bbox_2d", "bbox", "box_2d", "box", "point_2d", "BBOX_2D", "bbox-2d", "bounding_box"])
LABEL = st.text(max_size=20) | st.sampled_from(
    ["red mug", "mug \\ud83d", "cup \\ud83d\\ude00", 'a \\"quoted\\" cup', "cup {blue}", "杯子", "\\u0000", "\\x41",
     "back\\\\slash", "emoji 🤖"])


COORD_LISTS = st.lists(NUMBER, min_size=4, max_size=4) | st.lists(NUMBER, min_size=0, max_size=6)
QUOTE = st.sampled_from(['"', '"', "'", ""])
SEPARATOR = st.sampled_from([", ", ",\n\t", " "])
PREFIX = st.sampled_from(["", "Sure! ", "The objects are:\n", "addCriterion\n"])
SUFFIX = st.sampled_from(["", " I hope this helps.", "<|im_end|>", "\n"])
FLAGS = st.integers(0, 63)
N_OBJECTS = st.integers(0, 6)
FRACTION = st.floats(0.0, 1.0)


@st.composite
def qwen_like_answers(draw: st.DrawFn) -> str:
    """Answers shaped like Qwen3-VL's: JSON objects, fences, prose, seg tokens, cut anywhere."""
    objects = []
    for _ in range(draw(N_OBJECTS)):
        flags = draw(FLAGS)
        quote = draw(QUOTE)
        parts = [f'{quote}{draw(KEY)}{quote}: [{", ".join(draw(COORD_LISTS))}]']
        if flags & 1:
            parts.append(f"{quote}label{quote}: {quote}{draw(LABEL)}{quote}")
        if flags & 2:
            parts.reverse()
        objects.append("{" + ", ".join(parts) + "}" + (SEG_TOKEN if flags & 4 else ""))
    flags = draw(FLAGS)
    body = "[" + draw(SEPARATOR).join(objects) + "]"
    if flags & 1:
        body = f"```json\n{body}\n```"
    body = draw(PREFIX) + body + draw(SUFFIX)
    return body[: int(draw(FRACTION) * len(body))] if flags & 2 else body


@fuzz("answer_like_qwen", qwen_like_answers(), SIZES, SIZES)
def test_parser_on_answers_shaped_like_qwen(text: str, width: int, height: int) -> None:
    """parse_answer on generated model-like answers, good and broken (cut, swapped, out of range)."""
    check_parsed(text, width, height)


BOX = st.tuples(st.integers(0, 999), st.integers(0, 999), st.integers(1, 1000), st.integers(1, 1000)).filter(
    lambda b: b[0] < b[2] and b[1] < b[3])


@fuzz("answer_round_trip", st.lists(BOX, max_size=6, unique=True), st.booleans(), SIZES, SIZES)
def test_parser_round_trips_the_training_target(boxes: list, seg: bool, width: int, height: int) -> None:
    """format_answer -> parse_answer gives back every box, in order, with its label."""
    objects = [{"bbox_2d": list(b), "label": f"thing {k}"} for k, b in enumerate(boxes)]
    parsed = parse_answer(format_answer(objects, mask_token=seg), width, height)
    assert parsed.labels == [o["label"] for o in objects]
    assert [tuple(int(v) for v in o.relative_box) for o in parsed.objects] == [tuple(b) for b in boxes]


# ---------------------------------------------------------------------------------------------
# commands, and the node's check of a segmenter's objects
# ---------------------------------------------------------------------------------------------
@fuzz("command", st.text(max_size=200) | st.text(alphabet="\x00\x07\x1b\u200b\u202e \t\nab☕", max_size=50),
      st.integers(1, 300))
def test_command_cleaning(text: str, limit: int) -> None:
    """clean_command: a non-empty, trimmed command without control/format characters, or InputError."""
    try:
        cleaned, warnings = clean_command(text, limit)
    except InputError as exc:
        assert "command is" in str(exc)
        return
    assert cleaned and cleaned == cleaned.strip() and "  " not in cleaned and len(cleaned) <= len(text) <= limit
    assert not any(unicodedata.category(c) in ("Cc", "Cf") for c in cleaned)
    assert all(isinstance(w, str) for w in warnings)


SCORES = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.5, 1.0, -0.1, 1.5])
COORD = st.floats(allow_nan=True, allow_infinity=True, width=32) | st.floats(-50, 250)


@st.composite
def segmenter_objects(draw: st.DrawFn) -> tuple[Any, int, int]:
    h, w = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["instance", "instance", "instance", "none", "dict"]))
    if kind == "none":
        return None, h, w
    if kind == "dict":
        return {"box": [0, 0, 1, 1]}, h, w
    inst = Instance(box=draw(st.lists(COORD, min_size=4, max_size=4)), label="x", score=0.5)
    inst.score = draw(SCORES)
    inst.box_score, inst.mask_score = draw(SCORES), draw(SCORES)
    inst.label = draw(st.text(max_size=300) | st.sampled_from(["\ud800", "ok \udfff", None, 7]))
    mask_kind = draw(st.sampled_from(["none", "good", "good", "shape", "dtype", "ndim"]))
    inst.mask = {"none": None, "good": np.ones((h, w), bool), "shape": np.ones((h + 1, w), bool),
                 "dtype": np.ones((h, w), np.uint8), "ndim": np.ones((h, w, 1), bool)}[mask_kind]
    return inst, h, w


@fuzz("segmenter_objects", segmenter_objects())
def test_node_check_of_segmenter_objects(case: tuple[Any, int, int]) -> bool:
    """SegmentationNode._check_instance: a publishable object inside the image, None, or SegmenterError."""
    inst, h, w = case
    problems: dict[str, list[int]] = {}
    try:
        fixed = SegmentationNode._check_instance(0, inst, h, w, problems)
    except SegmenterError as exc:
        assert "segmenter" in str(exc)
        return
    if fixed is None:
        assert problems
        return
    box = fixed.box
    assert box.dtype == np.float32 and np.all(np.isfinite(box))
    assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h and box[2] - box[0] >= 1 - 1e-6
    assert all(0.0 <= s <= 1.0 for s in (fixed.score, fixed.box_score, fixed.mask_score))
    assert isinstance(fixed.label, str) and len(fixed.label) <= MAX_LABEL_CHARS + 40
    fixed.label.encode("utf-8")  # publishable: no lone surrogates
    assert fixed.mask is None or (fixed.mask.shape == (h, w) and fixed.mask.dtype == np.bool_)
    return True


def test_parser_labels_are_valid_utf8():
    parsed = parse_answer(json.dumps([{"bbox_2d": [1, 2, 30, 40], "label": "mug"}])[:-3] + '\\ud83d"}]', 100, 100)
    assert parsed.labels, parsed.no_match_reason
    for label in parsed.labels:
        label.encode("utf-8")

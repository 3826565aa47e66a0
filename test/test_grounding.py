"""Prompts, training targets and the parser of Qwen3-VL grounding answers."""

from __future__ import annotations

import numpy as np
import pytest

from qwen3vl_seg_ros.grounding import (
    SEG_TOKEN,
    boxes_to_relative,
    build_prompt,
    format_answer,
    normalize_command,
    parse_answer,
    split_targets,
)
from qwen3vl_seg_ros.types import InputError

W, H = 640, 480


def px(x1: float, y1: float, x2: float, y2: float) -> list[float]:
    """Relative 0..1000 coordinates to pixels of the W x H test image."""
    return [x1 * W / 1000, y1 * H / 1000, x2 * W / 1000, y2 * H / 1000]


# ------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize(
    ("command", "kind", "needle"),
    [
        ("the red mug left of the laptop", "referring", "Locate the red mug left of the laptop, output its bbox"),
        ("Pick up the red mug.", "referring", "Locate the red mug, output"),
        ("all screwdrivers", "category", "categories: 'screwdrivers'"),
        ("every blue cube", "category", "categories: 'blue cube'"),
        ("mugs", "category", "categories: 'mugs'"),
        ("all mugs and all cubes", "category", "categories: 'mugs, cubes'"),
        ("the red mug and the blue cube", "multi", "following: the red mug; the blue cube."),
        ("the red mug, the laptop and all screwdrivers", "multi", "the red mug; the laptop; all screwdrivers"),
        ("the cup between the laptop and the phone", "referring", "the cup between the laptop and the phone"),
        ("the black and white mug", "referring", "Locate the black and white mug,"),
    ],
)
def test_build_prompt_kinds(command: str, kind: str, needle: str) -> None:
    prompt, got_kind = build_prompt(command)
    assert got_kind == kind
    assert needle in prompt
    assert "JSON" in prompt


@pytest.mark.parametrize("command", ["  please find  ", "find", "pick up", "where is", "   "])
def test_build_prompt_rejects_a_command_with_nothing_to_find(command: str) -> None:
    """A command of verbs alone is the user's input error (the node answers it as such), not an
    internal failure: :class:`InputError`, which callers catching ``ValueError`` still see."""
    with pytest.raises(InputError, match=r"nothing to find|empty"):
        build_prompt(command)


def test_a_label_that_says_box_keeps_its_box() -> None:
    """"box:" inside a label is no box key: label-first answers with such labels parse back."""
    for label_first in (False, True):
        text = format_answer([([100, 200, 300, 400], "lunch box: blue")], False, label_first=label_first)
        parsed = parse_answer(text, 1000, 1000)
        assert parsed.labels == ["lunch box: blue"] and parsed.warnings == []
        assert np.allclose(parsed.boxes, [[100, 200, 300, 400]])


def test_a_label_with_a_comma_and_a_box_word_keeps_its_box() -> None:
    """In label-first order, ", bbox:" inside the label was read as the box key: object lost."""
    for label_first in (False, True):
        text = format_answer([([500, 200, 700, 400], "x, bbox: y")], False, label_first=label_first)
        parsed = parse_answer(text, 1000, 1000)
        assert parsed.labels == ["x, bbox: y"] and parsed.warnings == [], parsed.warnings
        assert np.allclose(parsed.boxes, [[500, 200, 700, 400]])


TWO_MUGS = '{"bbox_2d": [100, 200, 300, 400], "label": "mug"}, {"bbox_2d": [500, 200, 700, 400], "label": "mug"}'


@pytest.mark.parametrize("text", [
    '{"objects": [' + TWO_MUGS + ']}',
    '{"mug": [{"bbox_2d": [100, 200, 300, 400]}, {"bbox_2d": [500, 200, 700, 400]}]}',
    'Sure :-{ here: [' + TWO_MUGS + ']',
])
def test_objects_inside_a_wrapper_are_all_read(text: str) -> None:
    """A wrapper object (or a stray brace in prose) was read as one object: one box, no warning."""
    parsed = parse_answer(text, 1000, 1000)
    assert np.allclose(parsed.boxes, [[100, 200, 300, 400], [500, 200, 700, 400]]), (parsed.boxes, parsed.warnings)


def test_an_object_with_its_own_box_stays_one_object_whatever_it_holds() -> None:
    text = ('[{"bbox_2d": [10, 10, 900, 900], "label": "tray", "parts": [{"bbox_2d": [100, 200, 300, 400]}, '
            '{"bbox_2d": [500, 200, 700, 400]}]}]')
    assert np.allclose(parse_answer(text, 1000, 1000).boxes, [[10, 10, 900, 900]])


def test_an_object_with_repeated_box_keys_says_what_it_dropped() -> None:
    """Qwen3-VL-4B has answered with one flat object and repeated keys (QwenLM/Qwen3-VL#1720)."""
    text = '{"label": "monitor", "bbox": [195, 138, 617, 480], "label": "laptop", "bbox": [600, 500, 900, 800]}'
    parsed = parse_answer(text, 1000, 1000)
    assert len(parsed.objects) == 1 and any("holds 2 boxes; only the first was read" in w for w in parsed.warnings)


def test_a_looping_answer_gives_one_line_about_its_duplicates() -> None:
    """A model stuck in a loop repeated one object 330 times: 329 warnings, 17 kB of message."""
    text = "[" + ", ".join(['{"bbox_2d": [100, 200, 300, 400], "label": "mug"}'] * 330) + "]"
    parsed = parse_answer(text, 1000, 1000)
    assert len(parsed.objects) == 1
    shown = ", ".join(str(i) for i in range(1, 11))
    assert parsed.warnings == [f"329 duplicate(s) of earlier objects dropped (object {shown}, ...)"]


def test_a_thinking_checkpoints_reasoning_is_not_its_answer() -> None:
    """Qwen3-VL-*-Thinking writes draft boxes while it reasons: only the answer after </think>
    counts, and each object's spans still index the whole text (the token scores use them)."""
    text = ('<think>maybe {"bbox_2d": [1, 1, 50, 50], "label": "mug"}? no, the other one.</think>\n'
            '```json\n[{"bbox_2d": [100, 200, 300, 400], "label": "mug"}]\n```')
    parsed = parse_answer(text, 1000, 1000)
    assert np.allclose(parsed.boxes, [[100, 200, 300, 400]]) and parsed.warnings == []
    obj = parsed.objects[0]
    assert text[obj.span[0]] == "{" and text[obj.coord_span[0]:obj.coord_span[1]] == "[100, 200, 300, 400]"
    cut = parse_answer('<think>the mug is at {"bbox_2d": [1, 1, 50, 50]', 1000, 1000)
    assert cut.objects == [] and "ended inside the model's <think> reasoning" in cut.no_match_reason


def test_normalize_and_split() -> None:
    assert normalize_command("  Please pick up   the mug!! ") == "the mug"
    assert split_targets("the red cube; the green ball") == ["the red cube", "the green ball"]
    assert split_targets("the cube next to the ball") == ["the cube next to the ball"]


# ---------------------------------------------------------------------------- training targets


def test_format_answer_exact_text() -> None:
    objects = [{"bbox_2d": [10, 20, 300, 400], "label": "red mug"}, ([0, 0, 1000, 1000], "table")]
    assert format_answer(objects, mask_token=False) == (
        '[{"bbox_2d": [10, 20, 300, 400], "label": "red mug"}, {"bbox_2d": [0, 0, 1000, 1000], "label": "table"}]'
    )
    with_seg = format_answer(objects, mask_token=True)
    assert with_seg.count(SEG_TOKEN) == 2
    assert with_seg.startswith('[{"bbox_2d": [10, 20, 300, 400], "label": "red mug"}' + SEG_TOKEN + ", ")
    assert format_answer([], mask_token=True) == "[]"


@pytest.mark.parametrize("bad", [[10, 20, 5, 40], [0, 0, 1001, 5], [1, 2, 3]])
def test_format_answer_rejects_bad_boxes(bad: list[int]) -> None:
    with pytest.raises(ValueError):
        format_answer([(bad, "x")], mask_token=False)


def test_format_then_parse_round_trip() -> None:
    boxes_px = np.array([[64.0, 48.0, 320.0, 240.0], [10.0, 100.0, 600.0, 470.0]])
    rel = boxes_to_relative(boxes_px, W, H)
    text = format_answer([(b, f"obj {i}") for i, b in enumerate(rel)], mask_token=True)
    parsed = parse_answer(text.replace(SEG_TOKEN, ""), W, H)  # as decoded with special tokens skipped
    assert parsed.labels == ["obj 0", "obj 1"]
    np.testing.assert_allclose(parsed.boxes, boxes_px, atol=0.5)
    assert parsed.warnings == []


# ------------------------------------------------------------------------------------- parsing

CASES = [
    # (name, answer, expected pixel boxes (relative coords), expected labels, warning substring)
    ("qwen3 fenced json",
     '```json\n[\n\t{"bbox_2d": [135, 421, 318, 702], "label": "red mug"}\n]\n```',
     [[135, 421, 318, 702]], ["red mug"], None),
    ("qwen3 two instances one line",
     '[{"bbox_2d": [12, 34, 56, 78], "label": "screwdriver"}, '
     '{"bbox_2d": [500, 40, 620, 300], "label": "screwdriver"}]',
     [[12, 34, 56, 78], [500, 40, 620, 300]], ["screwdriver", "screwdriver"], None),
    ("qwen3 multi-line with indentation",
     '```json\n[\n    {"bbox_2d": [1, 2, 300, 400], "label": "cup"},\n    {"bbox_2d": [600, 2, 900, 400], '
     '"label": "laptop"}\n]\n```', [[1, 2, 300, 400], [600, 2, 900, 400]], ["cup", "laptop"], None),
    ("prose before and after",
     'Sure! Here is the object:\n```json\n[{"bbox_2d": [100, 100, 200, 200], "label": "ball"}]\n```\n'
     "Let me know if you need more.", [[100, 100, 200, 200]], ["ball"], None),
    ("no fence, trailing prose",
     '[{"bbox_2d": [100, 100, 200, 200], "label": "ball"}] The ball is on the left.',
     [[100, 100, 200, 200]], ["ball"], None),
    ("label before box", '[{"label": "can", "bbox_2d": [10, 10, 50, 90]}]', [[10, 10, 50, 90]], ["can"], None),
    ("single object without list", '{"bbox_2d": [10, 10, 50, 90], "label": "can"}', [[10, 10, 50, 90]], ["can"], None),
    ("python-style quotes", "[{'bbox_2d': [10, 10, 50, 90], 'label': 'can'}]", [[10, 10, 50, 90]], ["can"], None),
    ("bbox key", '[{"bbox": [10, 10, 50, 90], "label": "box"}]', [[10, 10, 50, 90]], ["box"], None),
    ("bare coordinate list", "[250, 250, 750, 750]", [[250, 250, 750, 750]], [""], None),
    ("float coordinates", '[{"bbox_2d": [10.5, 20.25, 50.0, 90.75], "label": "cup"}]',
     [[10.5, 20.25, 50.0, 90.75]], ["cup"], None),
    ("swapped corners", '[{"bbox_2d": [500, 600, 100, 200], "label": "mug"}]', [[100, 200, 500, 600]], ["mug"],
     "swapped"),
    ("out of range", '[{"bbox_2d": [-20, 100, 1080, 1200], "label": "table"}]', [[0, 100, 1000, 1000]], ["table"],
     "clipped"),
    ("exact duplicate", '[{"bbox_2d": [1, 1, 100, 100], "label": "a"}, {"bbox_2d": [1, 1, 100, 100], "label": "b"}]',
     [[1, 1, 100, 100]], ["a"], "duplicate"),
    ("near duplicate same label",
     '[{"bbox_2d": [100, 100, 300, 300], "label": "cube"}, {"bbox_2d": [101, 100, 300, 301], "label": "cube"}]',
     [[100, 100, 300, 300]], ["cube"], "duplicate"),
    ("close boxes different labels kept",
     '[{"bbox_2d": [100, 100, 300, 300], "label": "cube"}, {"bbox_2d": [101, 100, 300, 301], "label": "box"}]',
     [[100, 100, 300, 300], [101, 100, 300, 301]], ["cube", "box"], None),
    ("truncated inside second box",
     '[{"bbox_2d": [1, 2, 300, 400], "label": "cup"}, {"bbox_2d": [5, 6,', [[1, 2, 300, 400]], ["cup"],
     "cut off"),
    ("truncated inside label", '[{"bbox_2d": [1, 2, 300, 400], "label": "red cu', [[1, 2, 300, 400]], ["red cu"],
     "label cut off"),
    ("zero-area box dropped", '[{"bbox_2d": [100, 100, 100, 300], "label": "line"}, {"bbox_2d": [1, 1, 9, 9], '
     '"label": "dot"}]', [[1, 1, 9, 9]], ["dot"], "no area"),
    ("five numbers skipped", '[{"bbox_2d": [1, 2, 3, 4, 5], "label": "x"}, {"bbox_2d": [1, 2, 30, 40], '
     '"label": "y"}]', [[1, 2, 30, 40]], ["y"], "5 numbers"),
    ("escaped quote in label", r'[{"bbox_2d": [1, 2, 30, 40], "label": "the \"big\" cup"}]', [[1, 2, 30, 40]],
     ['the "big" cup'], None),
    ("brace inside label", '[{"bbox_2d": [1, 2, 30, 40], "label": "cup {blue}"}, {"bbox_2d": [50, 2, 90, 40], '
     '"label": "mug"}]', [[1, 2, 30, 40], [50, 2, 90, 40]], ["cup {blue}", "mug"], None),
    ("escape cut by the token limit", r'[{"bbox_2d": [1, 2, 30, 40], "label": "mug \ud83d"}]', [[1, 2, 30, 40]],
     ["mug \ufffd"], None),
    ("string box", '[{"bbox_2d": "[10, 10, 50, 90]", "label": "can"}]', [[10, 10, 50, 90]], ["can"], None),
]


@pytest.mark.parametrize(("name", "answer", "rel_boxes", "labels", "warning"), CASES, ids=[c[0] for c in CASES])
def test_parse_answer_cases(name: str, answer: str, rel_boxes: list, labels: list, warning: str | None) -> None:
    parsed = parse_answer(answer, W, H)
    assert parsed.no_match_reason == ""
    assert parsed.labels == labels
    np.testing.assert_allclose(parsed.boxes, np.array([px(*b) for b in rel_boxes]), atol=1e-3)
    assert parsed.boxes.dtype == np.float32
    if warning is None:
        assert parsed.warnings == []
    else:
        assert any(warning in w for w in parsed.warnings), parsed.warnings
    for obj in parsed.objects:  # spans point at the object and at its numbers
        assert answer[obj.span[0]:obj.span[1]].count("[") >= 1 or "[" in answer[obj.coord_span[0]:]
        assert any(ch.isdigit() for ch in answer[obj.coord_span[0]:obj.coord_span[1]])


@pytest.mark.parametrize(
    ("answer", "reason_part"),
    [
        ("[]", "empty list"),
        ("```json\n[]\n```", "empty list"),
        ("", "empty answer"),
        ("NO_MATCH", "NO_MATCH"),
        ("There is no red mug in the image.", "There is no red mug"),
        ('[{"point_2d": [100, 200], "label": "cup"}]', "point_2d"),
        ('[{"bbox_2d": [1, 2,', "bbox_2d"),
    ],
)
def test_parse_answer_no_match(answer: str, reason_part: str) -> None:
    parsed = parse_answer(answer, W, H)
    assert parsed.boxes.shape == (0, 4)
    assert parsed.labels == []
    assert reason_part in parsed.no_match_reason


def test_boxes_scale_with_image_size() -> None:
    answer = '[{"bbox_2d": [100, 200, 300, 400], "label": "cup"}]'
    small = parse_answer(answer, 100, 50).boxes[0]
    big = parse_answer(answer, 1000, 500).boxes[0]
    np.testing.assert_allclose(small, [10, 10, 30, 20])
    np.testing.assert_allclose(big, small * 10)


def test_coord_span_selects_the_numbers() -> None:
    answer = 'ok [{"label": "a", "bbox_2d": [11, 22, 33, 44]}]'
    obj = parse_answer(answer, W, H).objects[0]
    assert answer[obj.coord_span[0]:obj.coord_span[1]] == "[11, 22, 33, 44]"
    assert answer[obj.span[0]:obj.span[1]] == '{"label": "a", "bbox_2d": [11, 22, 33, 44]}'


def test_an_unescaped_quote_in_a_label_loses_no_object() -> None:
    """A model may write an inch mark unescaped; the quote is part of the label, since no JSON
    can follow it there, and the next object is still read."""
    text = ('[{"bbox_2d": [100, 200, 300, 400], "label": "12" screw"}, '
            '{"bbox_2d": [500, 500, 600, 600], "label": "nut"}]')
    parsed = parse_answer(text, 1000, 1000)
    assert parsed.labels == ['12" screw', "nut"]
    assert np.allclose(parsed.boxes, [[100, 200, 300, 400], [500, 500, 600, 600]])

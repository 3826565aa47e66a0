"""Qwen3-VL grounding: the prompt for a command, the training target text, and parsing of answers.

Qwen3-VL reports boxes as text, JSON like ``[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}]`` with
coordinates relative to the image on a 0..1000 scale, whatever the resize. A model trained with
our recipe also emits the mask token :data:`SEG_TOKEN` right after each object's closing brace;
it is a special token, so decoding with special tokens skipped gives plain JSON.

Real answers are not always clean JSON: code fences, prose around the list, a list cut off by the
token limit, swapped corners, coordinates past 1000, repeated objects, or no JSON at all. The
parser therefore scans for objects instead of calling ``json.loads`` on the whole answer, and it
keeps the character span of every object so that the caller can find the tokens behind it (the
mask token, the coordinate tokens and their probabilities).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from qwen3vl_seg_ros.training.metrics import box_iou_matrix
from qwen3vl_seg_ros.types import InputError

#: The mask token a Qwen3-VL-Seg model emits after each object's JSON.
SEG_TOKEN = "<|seg|>"

#: Kinds of prompt :func:`build_prompt` chooses between.
QUERY_KINDS = ("referring", "category", "multi")

#: Prompt templates; kept in one place so that the tiny tokenizer can cover their words.
REFERRING_TEMPLATE = "Locate the {target}, output its bbox coordinates using JSON format."
CATEGORY_TEMPLATE = (
    "Locate every instance that belongs to the following categories: '{targets}'. "
    "Report bbox coordinates in JSON format."
)
MULTI_TEMPLATE = (
    "Locate each of the following: {targets}. Report bbox coordinates and labels in JSON format."
)
PROMPT_TEMPLATES = (REFERRING_TEMPLATE, CATEGORY_TEMPLATE, MULTI_TEMPLATE)

#: Coordinate scale of Qwen3-VL boxes.
COORD_SCALE = 1000

_LEADING_VERBS = re.compile(
    r"^(?:please\s+)?(?:can you\s+|could you\s+)?"
    r"(?:find|locate|detect|segment|show(?:\s+me)?|highlight|mark|get|pick(?:\s+up)?|grab|take|"
    r"point\s+(?:at|to)|where\s+(?:is|are))(?:\s+|$)",
    re.IGNORECASE,
)
_QUANTIFIER = re.compile(r"^(?:all|every|each|any)(?:\s+of)?(?:\s+the)?\s+", re.IGNORECASE)
_ARTICLE = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)
_SPLIT = re.compile(r"\s*(?:;|,\s*and\s+|,|\s+and\s+)\s*", re.IGNORECASE)
_RELATION_WORDS = frozenset((
    "left", "right", "front", "back", "behind", "near", "next", "between", "on", "in", "under", "above",
    "below", "beside", "of", "to", "at", "with", "from", "inside", "outside", "top", "bottom", "middle",
    "center", "centre",
))
# Parts made only of these words describe a neighbour ("black and white mug"), not a target.
_MODIFIER_WORDS = frozenset((
    "red", "green", "blue", "yellow", "orange", "purple", "white", "black", "grey", "gray", "brown", "pink",
    "cyan", "dark", "light", "small", "big", "large", "tiny", "little", "tall", "short", "wide", "narrow",
    "round", "square",
))


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------


def normalize_command(command: str) -> str:
    """Strips what is no part of the target: leading verbs ("pick up"), punctuation, spaces."""
    text = " ".join(command.strip().split())
    text = text.rstrip(" .!?")
    previous = None
    while previous != text:
        previous = text
        text = _LEADING_VERBS.sub("", text)
    return text


def split_targets(command: str) -> list[str]:
    """Splits a command naming several targets ("the red mug and the blue cube").

    Splitting is cautious: a relation spanning "and" ("between the laptop and the phone") or a
    part that is only adjectives ("black and white mug") keeps the command whole.
    """
    text = normalize_command(command)
    if not text:
        return []
    if re.search(r"\bbetween\b", text, re.IGNORECASE):
        return [text]
    parts = [p.strip() for p in _SPLIT.split(text) if p.strip()]
    if len(parts) < 2:
        return [text]
    for part in parts:
        words = part.lower().split()
        nouns = [w for w in words if w not in ("the", "a", "an")]
        if all(w in _MODIFIER_WORDS for w in nouns) or words[0] in _RELATION_WORDS:
            return [text]
    return parts


def _is_plural_noun(word: str) -> bool:
    word = word.lower()
    return len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is"))


def _head_phrase(target: str) -> str:
    """The words before the first relation word: "red mugs left of the box" -> "red mugs"."""
    words = []
    for word in target.split():
        if word.lower() in _RELATION_WORDS:
            break
        words.append(word)
    return " ".join(words) or target


def _category_of(target: str) -> str | None:
    """The category a target asks for all instances of, or None for a referring expression."""
    stripped = _QUANTIFIER.sub("", target)
    if stripped != target:
        return stripped
    if _ARTICLE.match(target):
        return None
    head = _head_phrase(target).split()
    if head and _is_plural_noun(head[-1]) and head == target.split():
        return target
    return None


def build_prompt(command: str) -> tuple[str, str]:
    """Turns a user command into a Qwen3-VL grounding prompt.

    Returns ``(prompt_text, query_kind)`` with ``query_kind`` one of :data:`QUERY_KINDS`:
    ``"category"`` for "all screwdrivers" or "mugs" (every instance), ``"multi"`` for several
    targets in one command, ``"referring"`` for one described object ("the red mug left of the
    laptop"). Raises :class:`InputError` for a command with nothing to find, such as "find" or
    "pick up" alone (their verbs are dropped).
    """
    targets = split_targets(command)
    if not targets:
        what = f"'{command.strip()[:80]}' names nothing to find" if command.strip() else "is empty"
        raise InputError(f"the command {what}: say what to segment, e.g. 'the red mug'")
    categories = [_category_of(t) for t in targets]
    if all(c is not None for c in categories):
        joined = ", ".join(c for c in categories if c)
        return CATEGORY_TEMPLATE.format(targets=joined), "category"
    if len(targets) > 1:
        return MULTI_TEMPLATE.format(targets="; ".join(targets)), "multi"
    target = _ARTICLE.sub("", targets[0])
    return REFERRING_TEMPLATE.format(target=target), "referring"


# --------------------------------------------------------------------------------------------
# training targets
# --------------------------------------------------------------------------------------------


def boxes_to_relative(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pixel boxes ``(N, 4)`` to Qwen3-VL's relative integer coordinates (0..1000)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float64)
    rel = np.rint(boxes / scale * COORD_SCALE)
    return np.clip(rel, 0, COORD_SCALE).astype(np.int64)


def _object_fields(obj: Mapping | Sequence) -> tuple[list[int], str]:
    if isinstance(obj, Mapping):
        box, label = obj["bbox_2d"], obj.get("label", "")
    else:
        box, label = obj
    coords = [round(float(v)) for v in box]
    if len(coords) != 4:
        raise ValueError(f"a box needs 4 coordinates, got {box!r}")
    if not all(0 <= v <= COORD_SCALE for v in coords):
        raise ValueError(f"box {coords} is outside Qwen3-VL's 0..{COORD_SCALE} range")
    if coords[0] > coords[2] or coords[1] > coords[3]:
        raise ValueError(f"box {coords} has x1 > x2 or y1 > y2")
    return coords, str(label)


def format_answer(objects: Sequence[Mapping | Sequence], mask_token: bool, label_first: bool = False) -> str:
    """The exact answer text a model trained with our recipe produces (the training target).

    ``objects`` are ``{"bbox_2d": [x1, y1, x2, y2], "label": str}`` mappings or
    ``(box, label)`` pairs with relative integer coordinates (see :func:`boxes_to_relative`).
    With ``mask_token`` each object's JSON is followed by :data:`SEG_TOKEN`. No object gives
    ``"[]"``, the answer for "not in the image".

    ``label_first`` writes each object's label before its box (``{"label": ..., "bbox_2d": [...]}``),
    Qwen3-VL's order reversed: a model then names the object, word by word, before it places it,
    so the choice of object falls on a word, whose token says what is sought, instead of on the
    box's opening bracket (docs/training.md, "Round 17"). :func:`parse_answer` reads both orders.
    """
    entries = []
    for obj in objects:
        coords, label = _object_fields(obj)
        fields = {"label": label, "bbox_2d": coords} if label_first else {"bbox_2d": coords, "label": label}
        entry = json.dumps(fields, ensure_ascii=False)
        entries.append(entry + (SEG_TOKEN if mask_token else ""))
    return "[" + ", ".join(entries) + "]"


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------


@dataclass
class ParsedObject:
    """One object of an answer: its pixel box and where it stands in the answer text."""

    box: np.ndarray  # (4,) float32 pixels, [x1, y1, x2, y2], clipped to the image
    label: str
    relative_box: tuple[float, float, float, float]  # 0..1000 after fixes
    span: tuple[int, int]  # characters of the object in the answer
    coord_span: tuple[int, int]  # characters of its coordinate list


@dataclass
class ParsedAnswer:
    """What :func:`parse_answer` found; ``no_match_reason`` is set when ``objects`` is empty."""

    boxes: np.ndarray  # (N, 4) float32 pixels
    labels: list[str]
    no_match_reason: str = ""
    warnings: list[str] = field(default_factory=list)
    objects: list[ParsedObject] = field(default_factory=list)

    @classmethod
    def from_objects(cls, objects: list[ParsedObject], reason: str, warnings: list[str]) -> ParsedAnswer:
        boxes = np.stack([o.box for o in objects]) if objects else np.zeros((0, 4), np.float32)
        return cls(boxes.astype(np.float32), [o.label for o in objects], reason, warnings, objects)


_NUMBER = r"-?\d+(?:\.\d+)?"
# a key starts the object or follows a comma, so "lunch box: blue" inside a label is no key
_BOX_KEY = re.compile(r"""(?:^|(?<=[{,]))\s*["']?(bbox_2d|bbox|box_2d|box)["']?\s*:\s*""", re.IGNORECASE)
_POINT_KEY = re.compile(r"""["']?point_2d["']?\s*:""", re.IGNORECASE)
_LIST = re.compile(r"""["']?\[([^\[\]{}]*)(\]|$)""")
_QUAD = re.compile(
    rf"\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]"
)
# a double quote followed by something other than , : } ] (or the end) is part of the label
_LABEL = re.compile(r"""["']label["']\s*:\s*(?:"((?:[^"\\]|\\.|"(?!\s*(?:[,:}\]]|$)))*)("|$)|'([^']*)('|$))""",
                    re.IGNORECASE)
_AFTER_STRING = re.compile(r"\s*(?:[,:}\]]|$)")
THINK_START, THINK_END = "<think>", "</think>"
_EMPTY_LIST = re.compile(r"^\s*(?:```(?:json)?\s*)?\[\s*\]\s*(?:```)?\s*$", re.IGNORECASE)


def _object_segments(text: str) -> list[tuple[int, int]]:
    """Character spans of the outermost ``{...}`` in ``text``; a last unclosed one runs to the end.

    Braces inside double-quoted strings do not count, so a label like "cup {blue}" is safe. A
    quote ends a string only where JSON could go on after it (:func:`_closes_string`), so an
    unescaped quote inside a label ("12" screw") does not swallow the objects after it.
    """
    segments = []
    depth, start, in_string, escaped = 0, -1, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"' and _closes_string(text, i):
                in_string = False
            continue
        if ch == '"' and depth > 0:
            in_string = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                segments.append((start, i + 1))
    if depth > 0:
        segments.append((start, len(text)))
    return segments


def _closes_string(text: str, quote: int) -> bool:
    """Whether the quote at ``quote`` ends a JSON string: what follows it is the end, a comma,
    a colon or a closing bracket."""
    return _AFTER_STRING.match(text, quote + 1) is not None


def _read_label(segment: str) -> tuple[str, bool]:
    """The label in an object's text and whether it was cut off."""
    match = _LABEL.search(segment)
    if not match:
        return "", False
    if match.group(1) is not None:
        raw, closed = match.group(1), bool(match.group(2))
        try:
            label = json.loads(f'"{raw}"') if closed else raw
        except json.JSONDecodeError:
            label = raw
    else:
        label, closed = match.group(3), bool(match.group(4))
    return _valid_text(label).strip(), not closed


def _valid_text(text: str) -> str:
    """Replaces lone surrogates (an escape like \\ud83d cut off by the token limit) with U+FFFD,
    so that labels always encode to UTF-8 (ROS strings, logs)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _string_spans(segment: str) -> list[tuple[int, int]]:
    """Spans of the double-quoted strings of an object's text (as :func:`_object_segments` reads them)."""
    spans, start, escaped = [], -1, False
    for i, ch in enumerate(segment):
        if start >= 0:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"' and _closes_string(segment, i):
                spans.append((start, i))
                start = -1
        elif ch == '"':
            start = i
    if start >= 0:
        spans.append((start, len(segment)))
    return spans


def _box_keys(segment: str) -> list[re.Match[str]]:
    """The box keys of an object's text, outside its strings: in a label-first answer the label
    "x, bbox: y" holds a comma and a key word, which is no key."""
    spans = _string_spans(segment)
    return [m for m in _BOX_KEY.finditer(segment) if not any(a < m.start() <= b for a, b in spans)]


def _read_box(segment: str, keys: list[re.Match[str]]) -> tuple[list[float] | None, tuple[int, int] | None, str]:
    """The coordinate list of an object (``keys``: its :func:`_box_keys`): values, span within the
    segment, or a reason."""
    key = keys[0] if keys else None
    if key:
        lst = _LIST.match(segment, key.end())
        if not lst:
            return None, None, "its box is not a list"
        values = re.findall(_NUMBER, lst.group(1))
        if not lst.group(2):
            return None, None, "its box is cut off (answer truncated?)"
        if len(values) != 4:
            return None, None, f"its box has {len(values)} numbers instead of 4"
        return [float(v) for v in values], (lst.start(), lst.end()), ""
    quad = _QUAD.search(segment)
    if quad:
        return [float(v) for v in quad.groups()], (quad.start(), quad.end()), ""
    if _POINT_KEY.search(segment):
        return None, None, "it is a point, not a box"
    return None, None, "it has no box"


def _fix_relative_box(values: list[float], index: int, warnings: list[str]) -> list[float] | None:
    """Swaps reversed corners, clips to 0..1000; None for a box with no area left."""
    x1, y1, x2, y2 = values
    if x1 > x2 or y1 > y2:
        warnings.append(f"object {index}: swapped corners {values} put in order")
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
    fixed = [min(max(v, 0.0), float(COORD_SCALE)) for v in (x1, y1, x2, y2)]
    if fixed != [x1, y1, x2, y2]:
        warnings.append(f"object {index}: coordinates {values} clipped to 0..{COORD_SCALE}")
    if fixed[2] <= fixed[0] or fixed[3] <= fixed[1]:
        warnings.append(f"object {index}: box {values} has no area, dropped")
        return None
    return fixed


class _Deduplicator:
    """Finds duplicates in time linear in the answer for exact repeats and vectorised per label
    otherwise: a runaway answer with thousands of boxes must not take seconds to parse."""

    def __init__(self, iou_threshold: float) -> None:
        self.iou_threshold = iou_threshold
        self._exact: set[tuple[float, ...]] = set()
        self._by_label: dict[str, tuple[np.ndarray, int]] = {}  # label -> (boxes buffer, count)

    def is_duplicate(self, obj: ParsedObject) -> bool:
        key = tuple(float(v) for v in obj.box)
        if key in self._exact:
            return True
        buffer, count = self._by_label.get(obj.label, (np.empty((8, 4)), 0))
        if count:
            iou = box_iou_matrix(buffer[:count], np.asarray(obj.box, dtype=np.float64)[None])
            if np.any(iou >= self.iou_threshold):
                return True
        self._exact.add(key)
        if count == len(buffer):
            buffer = np.concatenate([buffer, np.empty_like(buffer)])
        buffer[count] = obj.box
        self._by_label[obj.label] = (buffer, count + 1)
        return False


def _to_pixels(rel: list[float], width: int, height: int) -> np.ndarray:
    scale = np.array([width, height, width, height], dtype=np.float64) / COORD_SCALE
    box = np.asarray(rel, dtype=np.float64) * scale
    box = np.clip(box, 0, [width, height, width, height])
    return box.astype(np.float32)


def _has_box(text: str, start: int, end: int) -> bool:
    return bool(_BOX_KEY.search(text, start, end) or _QUAD.search(text[start:end])
                or _POINT_KEY.search(text, start, end))


def _unwrap(text: str, segments: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Replaces a wrapper (``{"objects": [{...}, {...}]}``, ``{"red cube": [{...}, {...}]}``)
    by the objects inside it: read as one object, it gave the first box alone, silently."""
    out = []
    for start, end in segments:
        inner = [(start + 1 + a, start + 1 + b) for a, b in _object_segments(text[start + 1:end])]
        if sum(_has_box(text, a, b) for a, b in inner) >= 2 and not _own_box(text, start, end, inner):
            out.extend(_unwrap(text, inner))
        else:
            out.append((start, end))
    return out


def _own_box(text: str, start: int, end: int, inner: list[tuple[int, int]]) -> bool:
    """Whether a span has a box of its own, outside its inner objects (then it is an object)."""
    chars = list(text[start:end])
    for a, b in inner:
        chars[a - start:b - start] = " " * (b - a)
    return _has_box("".join(chars), 0, end - start)


def _candidate_spans(text: str) -> list[tuple[int, int]]:
    """Object spans: brace-delimited objects, else bare ``[x1, y1, x2, y2]`` lists."""
    segments = _unwrap(text, _object_segments(text))
    if any(_has_box(text, s, e) for s, e in segments):
        return segments  # (objects with points only stay, so that the warning says "a point")
    return [(m.start(), m.end()) for m in _QUAD.finditer(text)]


def parse_answer(
    text: str, width: int, height: int, dedupe_iou: float = 0.95
) -> ParsedAnswer:
    """Parses a Qwen3-VL grounding answer into pixel boxes of a ``width`` x ``height`` image.

    Tolerates code fences and prose around the JSON, a truncated last object, swapped or
    out-of-range coordinates, and duplicates (same box, or same label with IoU >= ``dedupe_iou``);
    each fix is reported in ``warnings``. An empty list or an answer without any box gives no
    objects and a ``no_match_reason`` that quotes the answer. A Qwen3-VL *Thinking* checkpoint
    reasons inside ``<think>...</think>`` first: only what follows is the answer (the draft boxes
    of its reasoning are not), and spans stay positions in ``text``.
    """
    warnings: list[str] = []
    if width <= 0 or height <= 0:
        return ParsedAnswer.from_objects([], f"the image has no pixels ({width}x{height})", warnings)
    offset = 0
    if THINK_END in text:
        offset = text.rindex(THINK_END) + len(THINK_END)
    elif THINK_START in text:
        return ParsedAnswer.from_objects([], "the answer ended inside the model's <think> reasoning, before any "
                                         "answer (raise max_new_tokens, or use an Instruct checkpoint)", warnings)
    text = text[offset:]
    if not text.strip():
        return ParsedAnswer.from_objects([], "the model gave an empty answer", warnings)
    if _EMPTY_LIST.match(text):
        return ParsedAnswer.from_objects([], "the model found no matching object (empty list)", warnings)
    objects: list[ParsedObject] = []
    duplicates: list[int] = []
    dedup = _Deduplicator(dedupe_iou)
    for index, (start, end) in enumerate(_candidate_spans(text)):
        segment = text[start:end]
        keys = _box_keys(segment)
        values, coord_span, problem = _read_box(segment, keys)
        if values is None:
            warnings.append(f"object {index}: skipped, {problem}: {segment[:80]!r}")
            continue
        extra = len(keys) - 1
        if extra > 0:  # {"label": "monitor", "bbox": [...], "label": "laptop", "bbox": [...]}
            warnings.append(f"object {index}: holds {extra + 1} boxes; only the first was read: {segment[:80]!r}")
        fixed = _fix_relative_box(values, index, warnings)
        if fixed is None:
            continue
        label, cut = _read_label(segment)
        if cut:
            warnings.append(f"object {index}: label cut off (answer truncated?), kept as {label!r}")
        obj = ParsedObject(
            box=_to_pixels(fixed, width, height),
            label=label,
            relative_box=(fixed[0], fixed[1], fixed[2], fixed[3]),
            span=(offset + start, offset + end),
            coord_span=(offset + start + coord_span[0], offset + start + coord_span[1]),
        )
        if dedup.is_duplicate(obj):
            duplicates.append(index)
            continue
        objects.append(obj)
    if duplicates:  # one line: a model stuck in a loop repeats one object hundreds of times
        shown = ", ".join(map(str, duplicates[:10])) + (", ..." if len(duplicates) > 10 else "")
        warnings.append(f"{len(duplicates)} duplicate(s) of earlier objects dropped (object {shown})")
    reason = ""
    if not objects:
        snippet = text.strip()
        snippet = snippet if len(snippet) <= 200 else snippet[:200] + "..."
        reason = f"no usable box in the model's answer: {snippet!r}"
    return ParsedAnswer.from_objects(objects, reason, warnings)

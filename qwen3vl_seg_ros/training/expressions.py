"""Referring expressions for synthetic scenes, with target sets computed from the scene.

The rule that makes the data trustworthy: an expression is emitted only if its meaning, evaluated
on the scene's attributes, picks out exactly the intended objects *and* no object sits in a grey
zone of a spatial word (say, a cube only slightly left of the mug, for "left of"). Spatial words
are therefore three-valued (true / false / unclear, with the margins below), and a candidate whose
evaluation touches an unclear case is dropped.

The vocabulary is small, fixed and exported as :data:`VOCABULARY`, because the tokenizer of the
small training model is built from it.

Meaning of the spatial words (all from the viewer's side):

* left / right: the column of the centroid of the object's *visible* mask (what the model sees);
* front / back, nearest / farthest, in front of / behind: the distance of the object's base
  centre along the camera's horizontal viewing direction;
* next to: the gap between the circles around the objects' footprints on the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from qwen3vl_seg_ros.training.synthetic import Scene

COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "black", "pink", "cyan")
SHAPES = ("cube", "ball", "can", "mug")
SIZES = ("small", "medium", "large")
QUERY_TYPES = ("referring", "category", "multi", "no_target")

#: Words for each canonical shape (synonyms), and the plural of every noun.
SHAPE_WORDS = {"cube": ("cube", "box"), "ball": ("ball", "sphere"), "can": ("can", "cylinder"), "mug": ("mug", "cup")}
PLURALS = {
    "cube": "cubes", "box": "boxes", "ball": "balls", "sphere": "spheres", "can": "cans",
    "cylinder": "cylinders", "mug": "mugs", "cup": "cups", "object": "objects",
}
#: Words for the size classes that have one; "medium" objects are never named by size.
SIZE_WORDS = {"small": ("small", "tiny"), "large": ("big", "large")}
SUPERLATIVES = ("leftmost", "rightmost", "nearest", "farthest")
PLACES = ("on the left", "on the right", "in the front", "in the back", "in the middle")
RELATIONS = ("left of", "right of", "in front of", "behind", "next to")
FUNCTION_WORDS = ("the", "all", "every", "and", "object", "objects")


def _vocabulary() -> tuple[str, ...]:
    words: set[str] = set(COLOURS) | set(FUNCTION_WORDS) | set(SUPERLATIVES) | set(PLURALS) | set(PLURALS.values())
    for group in (*SIZE_WORDS.values(), *PLACES, *RELATIONS):
        words.update(group.split() if isinstance(group, str) else group)
    return tuple(sorted(words))


#: Every word the generator can emit.
VOCABULARY: tuple[str, ...] = _vocabulary()

#: Margins of the spatial words: lateral ones as a fraction of the image width, the others in metres.
LATERAL_MARGIN = 0.04
DEPTH_MARGIN = 0.05
NEXT_TO_MAX_GAP = 0.04
APART_MIN_GAP = 0.10

TRUE, FALSE, UNCLEAR = 1, 0, -1


@dataclass(frozen=True)
class Query:
    """One expression and the ids (``SceneObject.id``) of the objects it refers to."""

    expression: str
    target_ids: tuple[int, ...]
    query_type: str  # one of QUERY_TYPES
    #: The command's own words for each target (singular, same synonyms), aligned with target_ids:
    #: "red mug" for "all red mugs", "mug" for "the mug left of the red can". Label-echo answers
    #: (``data.answer_format: label_echo``) label each object with them.
    target_words: tuple[str, ...] = ()


class Descriptor(NamedTuple):
    """An attribute phrase: size class, colour and canonical shape, each optional."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None

    def matches(self, shape: str, colour: str, size: str) -> bool:
        return (
            (self.size is None or self.size == size)
            and (self.colour is None or self.colour == colour)
            and (self.shape is None or self.shape == shape)
        )

    def words(self, rng: np.random.Generator) -> tuple[str, ...]:
        """Words for the descriptor, singular, with random synonyms: ``("tiny", "red", "box")``."""
        noun = _pick(rng, SHAPE_WORDS[self.shape]) if self.shape else "object"
        size = _pick(rng, SIZE_WORDS[self.size]) if self.size else None
        return tuple(w for w in (size, self.colour, noun) if w)

    def phrase(self, rng: np.random.Generator, plural: bool = False) -> str:
        """Words for the descriptor, with random synonyms: ``"tiny red boxes"``."""
        return _say(self.words(rng), plural)


def _say(words: tuple[str, ...], plural: bool = False) -> str:
    """``("tiny", "red", "box")`` as ``"tiny red box"``, or ``"tiny red boxes"``."""
    return " ".join((*words[:-1], PLURALS[words[-1]])) if plural else " ".join(words)


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


# ---------------------------------------------------------------------------------------------
# Spatial facts


@dataclass(frozen=True)
class Layout:
    """Where the objects are, as the spatial words see them (arrays indexed like ``scene.objects``)."""

    u: np.ndarray  # (N,) column of the visible mask's centroid, pixels
    s: np.ndarray  # (N,) distance from the camera along its horizontal viewing direction, metres
    xy: np.ndarray  # (N, 2) base centre on the table, metres
    radius: np.ndarray  # (N,) footprint radius, metres
    lateral_margin: float  # pixels

    @classmethod
    def of(cls, scene: Scene) -> Layout:
        cols = np.arange(scene.intrinsics.width)
        u = np.array([(o.mask.sum(axis=0) * cols).sum() / o.visible_pixels for o in scene.objects])
        forward = scene.cam_to_world[:2, 2] / np.linalg.norm(scene.cam_to_world[:2, 2])
        xy = np.array([o.position[:2] for o in scene.objects]).reshape(-1, 2)
        return cls(
            u=u.reshape(-1),
            s=(xy - scene.cam_to_world[:2, 3]) @ forward,
            xy=xy,
            radius=np.array([o.footprint_radius for o in scene.objects]),
            lateral_margin=LATERAL_MARGIN * scene.intrinsics.width,
        )


def _graded(diff: np.ndarray, margin: float) -> np.ndarray:
    """TRUE where ``diff >= margin``, FALSE where ``diff <= 0``, UNCLEAR in between."""
    return np.where(diff >= margin, TRUE, np.where(diff <= 0, FALSE, UNCLEAR)).astype(np.int8)


def relation_matrix(layout: Layout, relation: str) -> np.ndarray:
    """``M[a, b]``: whether object a is ``relation`` object b (TRUE, FALSE or UNCLEAR); diagonal FALSE."""
    u, s = layout.u, layout.s
    if relation == "left of":
        out = _graded(u[None, :] - u[:, None], layout.lateral_margin)
    elif relation == "right of":
        out = _graded(u[:, None] - u[None, :], layout.lateral_margin)
    elif relation == "in front of":
        out = _graded(s[None, :] - s[:, None], DEPTH_MARGIN)
    elif relation == "behind":
        out = _graded(s[:, None] - s[None, :], DEPTH_MARGIN)
    elif relation == "next to":
        gap = np.linalg.norm(layout.xy[:, None] - layout.xy[None, :], axis=-1) - layout.radius[:, None] - layout.radius
        out = np.where(gap <= NEXT_TO_MAX_GAP, TRUE, np.where(gap >= APART_MIN_GAP, FALSE, UNCLEAR)).astype(np.int8)
    else:
        raise ValueError(f"unknown relation {relation!r}")
    np.fill_diagonal(out, FALSE)
    return out


def extreme(layout: Layout, word: str, members: list[int]) -> int | None:
    """The member a superlative picks, or None when the runner-up is within the margin."""
    key, margin = {
        "leftmost": (layout.u, layout.lateral_margin),
        "rightmost": (-layout.u, layout.lateral_margin),
        "nearest": (layout.s, DEPTH_MARGIN),
        "farthest": (-layout.s, DEPTH_MARGIN),
    }[word]
    if len(members) < 2:
        return None
    values = key[members]
    order = np.argsort(values)
    return members[int(order[0])] if values[order[1]] - values[order[0]] >= margin else None


_PLACE_EXTREMES = {
    "on the left": "leftmost", "on the right": "rightmost", "in the front": "nearest", "in the back": "farthest"
}


def place(layout: Layout, phrase: str, members: list[int]) -> int | None:
    """The member that "on the left" (of two), "in the middle" (of three) etc. picks, if clear."""
    if phrase == "in the middle":
        if len(members) != 3:
            return None
        values = layout.u[members]
        order = np.argsort(values)
        gaps = np.diff(values[order])
        return members[int(order[1])] if np.all(gaps >= layout.lateral_margin) else None
    if len(members) != 2:
        return None
    return extreme(layout, _PLACE_EXTREMES[phrase], members)


# ---------------------------------------------------------------------------------------------
# Candidates


def _members(mask: int) -> list[int]:
    """Object indexes in a bit mask (bit i = scene.objects[i])."""
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


def _bit(i: int) -> int:
    return 1 << int(i)


def _bitmask(flags: np.ndarray) -> int:
    """Bit mask of the True entries of a bool vector."""
    return sum(_bit(i) for i in np.flatnonzero(flags))


class _Candidates:
    """Everything that can be said unambiguously about one scene, before wording is chosen."""

    def __init__(self, scene: Scene, rng: np.random.Generator) -> None:
        self.objects = scene.objects
        self.layout = Layout.of(scene)
        self.descriptors = self._descriptors()
        self.unique = {d: m for d, m in self.descriptors.items() if m.bit_count() == 1 and d != Descriptor()}
        self.attr = [(d, m) for d, m in self.unique.items()]
        # "the mug" alone (no colour or size): a form a training round may ask for by name only
        self.shape = [(d, m) for d, m in self.attr if d.shape and d.colour is None and d.size is None]
        self.superlative = self._superlatives()
        self.place = self._places()
        self.relation = self._relations(rng)
        self.category = self._categories()
        self.absent = self._absent()

    def _descriptors(self) -> dict[Descriptor, int]:
        """Every descriptor made of attributes of some object, with the objects it matches."""
        out: dict[Descriptor, int] = {}
        for obj in self.objects:
            size = obj.size if obj.size in SIZE_WORDS else None  # "medium" has no word
            for use in range(8):  # every subset of (size, colour, shape)
                if use & 1 and size is None:
                    continue
                d = Descriptor(
                    size if use & 1 else None, obj.colour if use & 2 else None, obj.shape if use & 4 else None
                )
                if d not in out:
                    out[d] = self.match(d)
        return out

    def match(self, d: Descriptor) -> int:
        return sum(_bit(i) for i, o in enumerate(self.objects) if d.matches(o.shape, o.colour, o.size))

    def _superlatives(self) -> list[tuple[str, Descriptor, int]]:
        out = []
        for d, mask in self.descriptors.items():
            members = _members(mask)
            for word in SUPERLATIVES:
                pick = extreme(self.layout, word, members)
                if pick is not None:
                    out.append((word, d, _bit(pick)))
        return out

    def _places(self) -> list[tuple[str, Descriptor, int]]:
        out = []
        for d, mask in self.descriptors.items():
            for phrase in PLACES:
                pick = place(self.layout, phrase, _members(mask))
                if pick is not None:
                    out.append((phrase, d, _bit(pick)))
        return out

    def _relations(self, rng: np.random.Generator) -> list[tuple[Descriptor, str, Descriptor, int]]:
        """"A <relation> B": B unique on its own, and the relation needed to single out one A.

        The anchor never counts as a candidate A, as in "the cube left of the red cube".
        """
        anchors: dict[int, list[Descriptor]] = {}
        for d, m in self.unique.items():
            anchors.setdefault(m, []).append(d)
        out = []
        for relation in RELATIONS:
            rel = relation_matrix(self.layout, relation)
            true_sets = [_bitmask(rel[:, b] == TRUE) for b in range(len(self.objects))]
            unclear_sets = [_bitmask(rel[:, b] == UNCLEAR) for b in range(len(self.objects))]
            for b_mask, b_descs in anchors.items():
                b = b_mask.bit_length() - 1
                b_desc = b_descs[int(rng.integers(len(b_descs)))]
                for d, mask in self.descriptors.items():
                    mask &= ~b_mask  # "the cube left of the red cube": the anchor is not a candidate
                    if mask.bit_count() < 2 or mask & unclear_sets[b]:
                        continue
                    target = mask & true_sets[b]
                    if target.bit_count() == 1:
                        out.append((d, relation, b_desc, target))
        return out

    def _sizes(self, d: Descriptor) -> set[str]:
        """The size classes of the objects ``d`` matches."""
        return {o.size for o in self.objects if d.matches(o.shape, o.colour, o.size)}

    def _categories(self) -> list[tuple[Descriptor, int]]:
        """ "all X": several targets, or one where X names a shape ("all mugs" with one mug)."""
        return [(d, m) for d, m in self.descriptors.items() if m.bit_count() >= 2 or (d.shape and m)]

    def _absent(self) -> dict[str, list[Descriptor]]:
        """Descriptors that match nothing, grouped so that each kind is drawn equally often."""
        colour_shape = [Descriptor(None, c, s) for c in COLOURS for s in SHAPES]
        # hard negatives: "the small red cube" when every red cube is large (and "the big red cube"
        # when every one is small). Only the opposite extreme: with a large and a medium red cube a
        # reader takes "the small red cube" for the smaller of the two, and a lone medium pink can
        # next to a large black one is "the small pink can" to anyone, so neither is a command
        # without a target.
        opposite = {"small": "large", "large": "small"}
        with_size = [Descriptor(z, d.colour, d.shape) for d in colour_shape for z in SIZE_WORDS
                     if self._sizes(d) == {opposite[z]}]
        groups = {
            "colour_shape": colour_shape,
            "size_colour_shape": with_size,
            "colour": [Descriptor(None, c, None) for c in COLOURS],
            "shape": [Descriptor(None, None, s) for s in SHAPES],
        }
        return {k: [d for d in v if self.match(d) == 0] for k, v in groups.items()}


# ---------------------------------------------------------------------------------------------
# Wording


def _say_single(form: str, item: tuple, rng: np.random.Generator) -> tuple[str, str]:
    """Words of a single-target candidate of one of the referring forms, and the target's own words.

    The random draws are those of the phrases alone, in the same order, so that every scene's
    commands stay what they were before the target's words were kept.
    """
    if form in ("attr", "shape"):
        words = item[0].words(rng)
        return f"the {_say(words)}", _say(words)
    if form == "superlative":
        words = item[1].words(rng)
        return f"the {item[0]} {_say(words)}", _say(words)
    if form == "place":
        words = item[1].words(rng)
        return f"the {_say(words)} {item[0]}", _say(words)
    d, relation, anchor, _ = item
    words = d.words(rng)
    return f"the {_say(words)} {relation} the {anchor.phrase(rng)}", _say(words)


#: What a command maker returns: the words, the bit mask of the targets, and each target's own
#: words by object index.
Made = tuple[str, int, dict[int, str]]


def _referring(
    c: _Candidates, rng: np.random.Generator, form_weights: dict[str, float] | None = None
) -> Made | None:
    """A single-target command of one of the forms the scene allows: uniform, or by ``form_weights``."""
    pools = [("attr", c.attr), ("superlative", c.superlative), ("place", c.place), ("relation", c.relation)]
    if form_weights is not None and form_weights.get("shape", 0.0) > 0:
        pools.append(("shape", c.shape))  # opt-in, so that the default mix (and the held-out splits) stay
    forms = [(f, pool) for f, pool in pools if pool and (form_weights is None or form_weights.get(f, 0.0) > 0)]
    if not forms:
        return None
    if form_weights is None:
        form, pool = forms[int(rng.integers(len(forms)))]
    else:
        p = np.array([form_weights[f] for f, _ in forms], dtype=np.float64)
        form, pool = forms[int(rng.choice(len(forms), p=p / p.sum()))]
    item = pool[int(rng.integers(len(pool)))]
    text, words = _say_single(form, item, rng)
    return text, item[-1], {m: words for m in _members(item[-1])}


def _category(c: _Candidates, rng: np.random.Generator) -> Made | None:
    if not c.category:
        return None
    d, mask = c.category[int(rng.integers(len(c.category)))]
    text, words = _say_all(d, rng)
    return text, mask, {m: words for m in _members(mask)}


def _say_all(d: Descriptor, rng: np.random.Generator) -> tuple[str, str]:
    """"all red mugs" or "every red mug", and the singular words ("red mug")."""
    plural = rng.random() < 0.5
    words = d.words(rng)
    return (f"all {_say(words, plural=True)}" if plural else f"every {_say(words)}"), _say(words)


def _multi(c: _Candidates, rng: np.random.Generator) -> Made | None:
    """Two or three single-target phrases joined by "and", each naming a different object."""
    by_target: dict[int, list[tuple[str, tuple]]] = {}
    for form, pool in (("attr", c.attr), ("superlative", c.superlative)):
        for item in pool:
            by_target.setdefault(item[-1], []).append((form, item))
    if len(by_target) < 2:
        return None
    k = 3 if len(by_target) >= 3 and rng.random() < 0.3 else 2
    targets = [list(by_target)[int(i)] for i in rng.choice(len(by_target), size=k, replace=False)]
    parts, own = [], {}
    for t in targets:
        form, item = by_target[t][int(rng.integers(len(by_target[t])))]
        (index,) = _members(t)
        text, own[index] = _say_single(form, item, rng)
        parts.append(text)
    return " and ".join(parts), sum(targets), own


def _no_target(c: _Candidates, rng: np.random.Generator) -> Made | None:
    groups = [g for g in c.absent.values() if g]
    if not groups:
        return None
    group = groups[int(rng.integers(len(groups)))]
    d = group[int(rng.integers(len(group)))]
    return (f"the {d.phrase(rng)}" if rng.random() < 0.6 else _say_all(d, rng)[0]), 0, {}


_MAKERS = {"referring": _referring, "category": _category, "multi": _multi, "no_target": _no_target}
DEFAULT_TYPE_WEIGHTS = {"referring": 0.45, "category": 0.2, "multi": 0.15, "no_target": 0.2}
REFERRING_FORMS = ("attr", "superlative", "place", "relation")
#: Forms a round may name in ``form_weights`` beyond the default ones: "shape" is an "attr" command
#: with the shape word alone ("the mug"), for rounds that must learn to find an object by shape.
EXTRA_REFERRING_FORMS = ("shape",)


def check_weights(weights: dict[str, float] | None, known: tuple[str, ...], what: str) -> None:
    """Refuse unknown names and negative or all-zero weights before any scene is drawn."""
    if weights is None:
        return
    unknown = set(weights) - set(known)
    if unknown:
        raise ValueError(f"unknown {what} {sorted(unknown)}; expected some of {known}")
    values = [float(w) for w in weights.values()]
    if any(not np.isfinite(w) or w < 0 for w in values) or not any(w > 0 for w in values):
        raise ValueError(f"{what} weights must be finite, >= 0 and not all 0, got {weights}")


def make_queries(
    scene: Scene, rng: np.random.Generator, n: int, type_weights: dict[str, float] | None = None,
    form_weights: dict[str, float] | None = None,
) -> list[Query]:
    """Up to ``n`` distinct queries about ``scene``, their types drawn by ``type_weights``.

    Fewer than ``n`` come back only when the scene cannot give more distinct expressions (a
    scene of one object has few). A type the scene cannot serve (multi with one object) is
    skipped and its share goes to the others. ``form_weights`` (keys of :data:`REFERRING_FORMS`)
    draws the form of "referring" commands; by default each form the scene allows is equally
    likely. Both exist so that a training round can dwell on one kind of command.
    """
    check_weights(type_weights, QUERY_TYPES, "query types")
    check_weights(form_weights, REFERRING_FORMS + EXTRA_REFERRING_FORMS, "referring forms")
    weights = dict(type_weights or DEFAULT_TYPE_WEIGHTS)
    makers = {**_MAKERS, "referring": partial(_referring, form_weights=form_weights)}
    cands = _Candidates(scene, rng)
    queries: list[Query] = []
    seen: set[str] = set()
    for _ in range(n * 10):
        if len(queries) == n or not any(w > 0 for w in weights.values()):
            break
        types = [t for t, w in weights.items() if w > 0]
        p = np.array([weights[t] for t in types], dtype=np.float64)
        qtype = types[int(rng.choice(len(types), p=p / p.sum()))]
        made = makers[qtype](cands, rng)
        if made is None:
            weights[qtype] = 0.0
            continue
        text, mask, own = made
        if text not in seen:
            seen.add(text)
            targets = sorted((scene.objects[i].id, own[i]) for i in _members(mask))
            queries.append(Query(text, tuple(t for t, _ in targets), qtype, tuple(w for _, w in targets)))
    return queries


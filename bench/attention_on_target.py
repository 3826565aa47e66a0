"""Does the language model look at the object it is asked for? The share of each attention head's
visual attention that falls on the target, at the position that writes the box's first number.
Not a test.

Run::

    source env.sh && python bench/attention_on_target.py --model models/tiny_qwen3vl_seg --out att.json

Why: the probes (``probe_visual_tokens.py``, ``train_visual_attributes.py``) ask what the visual
tokens hold; this asks whether the language model reads the right ones. Each held-out scene with
more than two objects gets the simplest commands there are, "the <colour> object" for each
object whose colour no other object shares and "the <shape>" for each whose shape no other shares,
answered correctly up to the first number (teacher forcing: the prompt, then ``[{"bbox_2d": [``).
At that position every head of every layer spreads its attention over the prompt; the script
reports which share of the part on visual tokens lands on the target's tokens (the merged tokens
whose 32x32 area the target covers at least a quarter of, or covers most of when it covers none
that much), against ``uniform``, the target's share of the visual tokens; which share lands on the
other objects' tokens, and the target's part of what lands on objects (attention that finds
objects but not the one asked for gives about the target's share of the tokens on objects,
``uniform_among_objects``); how often some head puts
more than half its visual attention there; and how often the number the model would write there
is within 100 units (a tenth of the frame) of the right one, against the same for the left edge
of an object of the scene picked at random. Last, a linear probe on the states at that position,
layer by layer, for the word the command names (``word_in_states``): whether the query that should
pick the object holds what it has to match; and how much of each layer's normalised input there
changes from one command to the next, and how much of it is the named word (``word_spread``): a
query whose size is nearly all the same for every command gives every command the same attention,
however well a probe can read the word in it.

A model trained with label-first answers (``training_info.json``'s ``answer_format``, see
docs/training.md, "Round 17") writes each object's label before its box, so its prefix up to the
first number holds the target's true label, ``[{"label": "red mug", "bbox_2d": [``, and the object
is chosen earlier, at a label word. For such models the script also reports ``label_word``: for
"the <colour> object", answered up to ``[{"label": "<colour>``, how often the most likely shape
word is the target's; for "the <shape>", answered up to ``[{"label": "``, how often the most
likely colour word is the target's; each against an object of the scene at random. And, with that
word in the label instead of the target's (the label as the model itself would write it), how often
the first number is within 100 units (``first_number_within_100``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other bench scripts

from probe_visual_tokens import linear_probe

from qwen3vl_seg_ros.grounding import build_prompt
from qwen3vl_seg_ros.model.tiny import ANSWER_PIECES, LABEL_FIRST_PIECES
from qwen3vl_seg_ros.training.dataset import LABEL_FIRST_FORMATS, DataConfig, object_label
from qwen3vl_seg_ros.training.synthetic import COLOURS, SHAPES, Scene, generate_sample, split_seed

#: The answer up to the box's first number, as the model writes it (Qwen3-VL's grounding format).
PREFIX = "[" + ANSWER_PIECES[0]  # '[{"bbox_2d": ['

#: The same for a model trained with label-first answers, before and after the label.
LABEL_FIRST_OPEN, LABEL_FIRST_CLOSE = "[" + LABEL_FIRST_PIECES[0], LABEL_FIRST_PIECES[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/tiny_qwen3vl_seg", help="Qwen3-VL-Seg folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--first-scene", type=int, default=600, help="past the val scenes evaluate is run on (0-599)")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--out", default="", help="write the results as JSON here")
    return parser.parse_args(argv)


def simple_commands(scene: Scene) -> list[tuple[str, str, int]]:
    """``(kind, command, object index)``: "the red object" / "the mug" for objects unique in that respect."""
    objects = scene.objects
    if len(objects) <= 2:
        return []
    out = []
    for k, o in enumerate(objects):
        if sum(p.colour == o.colour for p in objects) == 1:
            out.append(("colour", f"the {o.colour} object", k))
        if sum(p.shape == o.shape for p in objects) == 1:
            out.append(("shape", f"the {o.shape}", k))
    return out


def target_cells(mask: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """``(h * w,)`` bool: the merged tokens the object covers at least a quarter of, else the one it covers most."""
    h, w = grid_hw
    height, width = mask.shape
    rows = np.minimum(np.arange(height) * h // height, h - 1)
    cols = np.minimum(np.arange(width) * w // width, w - 1)
    covered = np.zeros((h, w))
    np.add.at(covered, (rows[:, None].repeat(width, 1), cols[None, :].repeat(height, 0)), mask.astype(float))
    fraction = (covered / (height * width / (h * w))).reshape(-1)
    cells = fraction >= 0.25
    if not cells.any():
        cells[fraction.argmax()] = True
    return cells


class Reading(NamedTuple):
    """One command's attention at the box's first number: ``(layers, heads)`` shares of the visual
    attention on the target's tokens and on the other objects' tokens, the target's share of the
    visual tokens and of the tokens on objects (what attention spread evenly would give), and the
    token the model would write."""

    on_target: np.ndarray
    on_others: np.ndarray
    uniform: float
    uniform_among_objects: float
    token: int
    states: np.ndarray | None = None


class Reader:
    """The checkpoint through the production loader, with eager attention so that weights come back."""

    def __init__(self, folder: str) -> None:
        from qwen3vl_seg_ros.model.segmenter import Qwen3VLSeg
        from qwen3vl_seg_ros.segmenter import SegmenterOptions

        self.seg = Qwen3VLSeg.from_options(SegmenterOptions(model=folder, device="cpu", mask_head="box"))
        self.model = self.seg.model
        self.model.set_attn_implementation("eager")
        self.tokenizer = self.seg.processor.tokenizer
        self.image_token_id = int(self.model.config.image_token_id)
        self.merge = int(self.seg.processor.image_processor.merge_size)
        info = Path(folder) / "training_info.json"
        recorded = json.loads(info.read_text()).get("answer_format") if info.is_file() else None
        self.answer_format = recorded or "box_first"
        self.label_first = self.answer_format in LABEL_FIRST_FORMATS

    def prefix(self, label: str) -> str:
        """The answer up to the box's first number for an object labelled ``label``."""
        return LABEL_FIRST_OPEN + label + LABEL_FIRST_CLOSE if self.label_first else PREFIX

    @torch.no_grad()
    def layer_inputs(self, states: np.ndarray) -> np.ndarray:
        """``(commands, layers, D)``: each layer's input norm applied to the states that enter it
        (``states`` as in :class:`Reading`, the input embeddings then each layer's output): what its
        query projection sees."""
        layers = self.model.model.language_model.layers
        return np.stack([layer.input_layernorm(torch.from_numpy(states[:, i])).float().numpy()
                         for i, layer in enumerate(layers)], axis=1)

    def inputs(self, rgb: np.ndarray, command: str, answer: str = PREFIX) -> dict[str, torch.Tensor]:
        """The node's inputs for ``command``, followed by the start of an ``answer`` (by default
        Qwen3-VL's, up to the box's first number)."""
        inputs = dict(self.seg._inputs(rgb, build_prompt(command)[0]))
        prefix = self.tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        length = inputs["input_ids"].shape[1]
        for key, value in list(inputs.items()):  # per-token side inputs (attention mask, token types) grow too
            if key != "input_ids" and value.dim() == 2 and value.shape == (1, length):
                inputs[key] = torch.cat([value, torch.full_like(prefix, 1 if key == "attention_mask" else 0)], 1)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], prefix], 1)
        return inputs

    @torch.no_grad()
    def label_word(self, rgb: np.ndarray, command: str, before: str, choices: tuple[str, ...]) -> str:
        """The most likely of ``choices`` as the next word of a label-first answer's label that
        begins with ``before`` ("" or a colour)."""
        inputs = self.inputs(rgb, command, LABEL_FIRST_OPEN + before)
        logits = self.model(**inputs).logits[0, -1]
        space = " " if before else ""
        ids = self.tokenizer.convert_tokens_to_ids([space + w for w in choices])
        return choices[int(logits[torch.tensor(ids)].argmax())]

    @torch.no_grad()
    def next_token(self, rgb: np.ndarray, command: str, answer: str) -> int:
        """The token the model would write after the start of an ``answer``."""
        return int(self.model(**self.inputs(rgb, command, answer)).logits[0, -1].argmax())

    @torch.no_grad()
    def read(self, rgb: np.ndarray, command: str, masks: np.ndarray, k: int, label: str) -> Reading:
        """Where the visual attention goes at the box's first number, for target ``k`` of ``masks``
        (labelled ``label``)."""
        inputs = self.inputs(rgb, command, self.prefix(label))
        out = self.model(**inputs, output_attentions=True, output_hidden_states=True)
        visual = (inputs["input_ids"][0] == self.image_token_id).nonzero()[:, 0]
        _, gh, gw = (int(v) for v in inputs["image_grid_thw"][0])
        grid = (gh // self.merge, gw // self.merge)
        cells = torch.from_numpy(target_cells(masks[k], grid))
        others = torch.zeros_like(cells)
        for j, mask in enumerate(masks):
            if j != k:
                others |= torch.from_numpy(target_cells(mask, grid))
        others &= ~cells
        target, other = [], []
        for attention in out.attentions:
            on_visual = attention[0, :, -1, visual].float()
            total = on_visual.sum(1).clamp_min(1e-9)
            target.append((on_visual[:, cells].sum(1) / total).numpy())
            other.append((on_visual[:, others].sum(1) / total).numpy())
        return Reading(np.stack(target), np.stack(other), float(cells.float().mean()),
                       float(cells.sum() / (cells | others).sum()), int(out.logits[0, -1].argmax()),
                       np.stack([h[0, -1].float().numpy() for h in out.hidden_states]))


def first_number_error(tokenizer: object, token: int, box: np.ndarray, width: int) -> float:
    """|written - right| of the box's left edge in 0..1000 units; inf when the token is not a number."""
    text = tokenizer.decode([token]).strip()  # type: ignore[attr-defined]
    return abs(int(text) - 1000.0 * box[0] / width) if text.isdigit() else float("inf")


def summarise(found: list[tuple[Reading, float, float]]) -> dict:
    """The commands of one kind: mean shares per layer and head, and how often the number is right.

    ``target_among_objects`` is the target's part of the attention that lands on objects, per layer
    and head: attention that finds objects but not the one asked for gives about
    ``uniform_among_objects``.
    """
    on_target = np.stack([r.on_target for r, _, _ in found])
    on_others = np.stack([r.on_others for r, _, _ in found])
    errors = np.array([e for _, e, _ in found])
    among = on_target / np.maximum(on_target + on_others, 1e-9)

    def table(values: np.ndarray) -> list:
        return np.round(values.mean(0).astype(float), 3).tolist()  # [layer][head]

    return {
        "commands": len(found),
        "uniform": float(np.mean([r.uniform for r, _, _ in found])),
        "share_on_target": table(on_target),
        "share_on_other_objects": table(on_others),
        "target_among_objects": table(among),
        "uniform_among_objects": float(np.mean([r.uniform_among_objects for r, _, _ in found])),
        "some_head_mostly_on_target": float((on_target.max(axis=(1, 2)) > 0.5).mean()),
        "first_number_within_100": float((errors <= 100).mean()),
        "any_object_within_100": float(np.mean([g for _, _, g in found])),
    }


def probe_states(states: np.ndarray, words: list[str], seed: int = 0) -> dict:
    """Held-out accuracy, per layer, of a linear probe for the word the command names (``states``
    ``(commands, layers + 1, D)``; 70 % of the commands fit it, 30 % score it).

    Why: attention that does not pick the named object either lacks the word in its query or does
    not match it with the tokens' keys; this tells the two apart.
    """
    names = sorted(set(words))
    y = np.array([names.index(w) for w in words])
    order = np.random.default_rng(seed).permutation(len(y))
    cut = round(0.7 * len(y))
    train, test = order[:cut], order[cut:]
    accuracy = [linear_probe(states[train, layer], y[train], states[test, layer], y[test], len(names))["test"]
                for layer in range(states.shape[1])]
    return {"per_layer": [round(float(a), 3) for a in accuracy], "classes": len(names),
            "majority": float(np.bincount(y[test], minlength=len(names)).max() / max(len(test), 1)),
            "test_commands": len(test)}


def word_spread(normed: np.ndarray, words: list[str]) -> dict:
    """Per layer, the share of the normalised inputs' mean square ``(commands, layers, D)`` that
    varies between commands (``varying``) and the part of it that tells the named words apart
    (``word``: the spread of the per-word means around the overall mean, weighted by commands).

    Why: a probe reads a word wherever it is linearly separable, even along a direction that is a
    hundredth of the vector; a query projection sees the whole vector, so a word that small changes
    the attention little, and gradient descent on the projection mostly meets the part that is
    the same for every command.
    """
    names = sorted(set(words))
    y = np.array([names.index(w) for w in words])
    total = (normed.astype(np.float64) ** 2).sum(-1).mean(0)  # (L,)
    mean = normed.mean(0)
    varying = ((normed - mean) ** 2).sum(-1).mean(0) / total
    between = sum((y == c).sum() * ((normed[y == c].mean(0) - mean) ** 2).sum(-1) for c in range(len(names)))
    def shown(values: np.ndarray) -> list[float]:  # 3 significant digits; rounding noise (the input embeddings) as 0
        return [float(f"{v:.3g}") if v > 1e-9 else 0.0 for v in values]

    return {"varying": shown(varying), "word": shown(between / len(y) / total)}


def label_choice(hits: list[tuple[bool, float, float]]) -> dict:
    """How often a label-first model's label word was the target's (``hits``: whether it was, the
    share of the scene's objects it would be right for, and the first number's error with the
    model's word in the label), against an object at random."""
    return {"right": float(np.mean([h for h, _, _ in hits])), "any_object": float(np.mean([g for _, g, _ in hits])),
            "first_number_within_100": float(np.mean([e <= 100 for _, _, e in hits]))}


def report(kind: str, r: dict) -> None:
    print(f"{kind}: {r['commands']} commands, uniform share {r['uniform']:.3f} (among objects "
          f"{r['uniform_among_objects']:.3f}), first number within 100 units {r['first_number_within_100']:.3f} "
          f"(an object of the scene at random: {r['any_object_within_100']:.3f})")
    for layer, heads in enumerate(r["share_on_target"]):
        print(f"  layer {layer}: share of visual attention per head on the target {heads}, on other objects "
              f"{r['share_on_other_objects'][layer]}, target among objects {r['target_among_objects'][layer]}")
    if "word_in_states" in r:
        w = r["word_in_states"]
        print(f"  the named word in the states there (input, then each layer): {w['per_layer']} "
              f"(majority {w['majority']:.3f}, {w['test_commands']} held-out commands)")
    if "word_spread" in r:
        w = r["word_spread"]
        print(f"  each layer's normalised input there: share that varies between commands {w['varying']}, "
              f"of it the named word {w['word']}")
    if "label_word" in r:
        w = r["label_word"]
        print(f"  label-first: the label's other word is the target's for {w['right']:.3f} "
              f"(an object of the scene at random: {w['any_object']:.3f}); with the model's word in the "
              f"label, first number within 100 units {w['first_number_within_100']:.3f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reader = Reader(args.model)
    scene_cfg = DataConfig(width=args.width, height=args.height).scene_config()
    rows: dict[str, list] = {"colour": [], "shape": []}
    words: dict[str, list[str]] = {"colour": [], "shape": []}
    labels: dict[str, list[tuple[bool, float, float]]] = {"colour": [], "shape": []}
    for index in range(args.first_scene, args.first_scene + args.scenes):
        scene, _ = generate_sample(split_seed(args.split, index), scene_cfg)
        masks, boxes = scene.masks(), scene.boxes()
        for kind, command, k in simple_commands(scene):
            target = scene.objects[k]
            # label-echo answers label the target with the command's words ("red object", "mug")
            label = (command.removeprefix("the ") if reader.answer_format == "label_echo"
                     else object_label(target.colour, target.shape, "object"))
            reading = reader.read(scene.rgb, command, masks, k, label)
            if reader.answer_format == "label_first":  # the label word the command does not name
                if kind == "colour":
                    attr, before, choices = "shape", target.colour, SHAPES
                else:
                    attr, before, choices = "colour", "", COLOURS
                word = reader.label_word(scene.rgb, command, before, choices)
                share = np.mean([getattr(o, attr) == getattr(target, attr) for o in scene.objects])
                own = f"{target.colour} {word}" if kind == "colour" else f"{word} {target.shape}"  # the model's label
                token = reader.next_token(scene.rgb, command, reader.prefix(own))
                own_error = first_number_error(reader.tokenizer, token, boxes[k], args.width)
                labels[kind].append((word == getattr(target, attr), float(share), own_error))
            error = first_number_error(reader.tokenizer, reading.token, boxes[k], args.width)
            # a guess at any object of the scene: the share of them whose left edge is near enough
            guess = float(np.mean(np.abs(boxes[:, 0] - boxes[k, 0]) * 1000.0 / args.width <= 100))
            rows[kind].append((reading, error, guess))
            words[kind].append(command.split()[1])  # "the red object" / "the mug"
    results: dict = {"model": args.model, "split": args.split, "scenes": [args.first_scene, args.scenes],
                     "answer_format": reader.answer_format}
    for kind, found in rows.items():
        if found:
            results[kind] = summarise(found)
            if len(found) >= 10:
                states = np.stack([r.states for r, _, _ in found])
                results[kind]["word_in_states"] = probe_states(states, words[kind])
                results[kind]["word_spread"] = word_spread(reader.layer_inputs(states), words[kind])
            if labels[kind]:
                results[kind]["label_word"] = label_choice(labels[kind])
            report(kind, results[kind])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

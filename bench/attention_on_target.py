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
that much), against ``uniform``, the target's share of the visual tokens; how often some head puts
more than half its visual attention there; and how often the number the model would write there
is within 100 units (a tenth of the frame) of the right one, against the same for the left edge
of an object of the scene picked at random.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen3vl_seg_ros.grounding import build_prompt
from qwen3vl_seg_ros.training.dataset import DataConfig
from qwen3vl_seg_ros.training.synthetic import Scene, generate_sample, split_seed

#: The answer up to the box's first number, as the model writes it (Qwen3-VL's grounding format).
PREFIX = '[{"bbox_2d": ['


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

    def inputs(self, rgb: np.ndarray, command: str) -> dict[str, torch.Tensor]:
        """The node's inputs for ``command``, followed by the answer up to its first number."""
        inputs = dict(self.seg._inputs(rgb, build_prompt(command)[0]))
        prefix = self.tokenizer(PREFIX, add_special_tokens=False, return_tensors="pt")["input_ids"]
        length = inputs["input_ids"].shape[1]
        for key, value in list(inputs.items()):  # per-token side inputs (attention mask, token types) grow too
            if key != "input_ids" and value.dim() == 2 and value.shape == (1, length):
                inputs[key] = torch.cat([value, torch.full_like(prefix, 1 if key == "attention_mask" else 0)], 1)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], prefix], 1)
        return inputs

    @torch.no_grad()
    def read(self, rgb: np.ndarray, command: str, mask: np.ndarray) -> tuple[np.ndarray, float, int]:
        """``(layers, heads)`` share of visual attention on the target, its uniform share, the next token."""
        inputs = self.inputs(rgb, command)
        out = self.model(**inputs, output_attentions=True)
        visual = (inputs["input_ids"][0] == self.image_token_id).nonzero()[:, 0]
        _, gh, gw = (int(v) for v in inputs["image_grid_thw"][0])
        cells = torch.from_numpy(target_cells(mask, (gh // self.merge, gw // self.merge)))
        shares = []
        for attention in out.attentions:
            on_visual = attention[0, :, -1, visual].float()
            shares.append((on_visual[:, cells].sum(1) / on_visual.sum(1).clamp_min(1e-9)).numpy())
        return np.stack(shares), float(cells.float().mean()), int(out.logits[0, -1].argmax())


def first_number_error(tokenizer: object, token: int, box: np.ndarray, width: int) -> float:
    """|written - right| of the box's left edge in 0..1000 units; inf when the token is not a number."""
    text = tokenizer.decode([token]).strip()  # type: ignore[attr-defined]
    return abs(int(text) - 1000.0 * box[0] / width) if text.isdigit() else float("inf")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reader = Reader(args.model)
    scene_cfg = DataConfig(width=args.width, height=args.height).scene_config()
    rows: dict[str, list] = {"colour": [], "shape": []}
    for index in range(args.first_scene, args.first_scene + args.scenes):
        scene, _ = generate_sample(split_seed(args.split, index), scene_cfg)
        masks, boxes = scene.masks(), scene.boxes()
        for kind, command, k in simple_commands(scene):
            shares, uniform, token = reader.read(scene.rgb, command, masks[k])
            error = first_number_error(reader.tokenizer, token, boxes[k], args.width)
            # a guess at any object of the scene: the share of them whose left edge is near enough
            guess = float(np.mean(np.abs(boxes[:, 0] - boxes[k, 0]) * 1000.0 / args.width <= 100))
            rows[kind].append((shares, uniform, error, guess))
    results: dict = {"model": args.model, "split": args.split, "scenes": [args.first_scene, args.scenes]}
    for kind, found in rows.items():
        if not found:
            continue
        shares = np.stack([r[0] for r in found])
        errors = np.array([r[2] for r in found])
        results[kind] = {
            "commands": len(found),
            "uniform": float(np.mean([r[1] for r in found])),
            "share_on_target": np.round(shares.mean(0).astype(float), 3).tolist(),  # [layer][head]
            "some_head_mostly_on_target": float((shares.max(axis=(1, 2)) > 0.5).mean()),
            "first_number_within_100": float((errors <= 100).mean()),
            "any_object_within_100": float(np.mean([r[3] for r in found])),
        }
        print(f"{kind}: {len(found)} commands, uniform share {results[kind]['uniform']:.3f}, "
              f"first number within 100 units {results[kind]['first_number_within_100']:.3f} "
              f"(an object of the scene at random: {results[kind]['any_object_within_100']:.3f})")
        for layer, heads in enumerate(results[kind]["share_on_target"]):
            print(f"  layer {layer}: share of visual attention on the target per head {heads}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

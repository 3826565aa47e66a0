"""What a checkpoint's visual tokens hold: linear probes for the colour and shape of the object
under each merged token, on synthetic held-out scenes. Not a test.

Run::

    source env.sh && python bench/probe_visual_tokens.py --model models/tiny_qwen3vl_seg
    python bench/probe_visual_tokens.py --model runs/tiny_cpu_r9/model --scenes 400 --out probe.json

Why: the language model can only match "the blue mug" with the token of the blue mug if that
token holds "blue" and "mug". Each merged token gets its object's colour and shape exactly as
the attribute loss labels it (:func:`~qwen3vl_seg_ros.training.collate.token_attributes`: the
object covering most of the token, at least a quarter), and a linear classifier (softmax
regression, features standardised) is fitted on the tokens of the first 75 % of the scenes and
scored on the rest; the same for the row and the column of the tokens on objects
(:func:`~qwen3vl_seg_ros.training.collate.token_places`: the place the language model must read
off the token it attends to). Probed features: ``merged`` (the tokens the language model reads),
the ViT's ``deepstack`` blocks (added to its first layers), and ``pixels`` (mean, spread and
centre colour of the token's image region: what a model gets for free). ``majority`` is the most frequent
class of the held-out tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen3vl_seg_ros.training.collate import token_attributes, token_places
from qwen3vl_seg_ros.training.dataset import scene_instances
from qwen3vl_seg_ros.training.expressions import COLOURS, SHAPES

GROUPS = {"colour": COLOURS, "shape": SHAPES}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/tiny_qwen3vl_seg", help="Qwen3-VL-Seg folder")
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--steps", type=int, default=500, help="optimiser steps of each probe")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    return parser.parse_args(argv)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 classes: int, steps: int = 500, seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of softmax regression (Adam, full batch, light weight decay)."""
    generator = torch.Generator().manual_seed(seed)
    xtr, xte = torch.tensor(train_x, dtype=torch.float32), torch.tensor(test_x, dtype=torch.float32)
    ytr, yte = torch.tensor(train_y, dtype=torch.long), torch.tensor(test_y, dtype=torch.long)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    layer = torch.nn.Linear(xtr.shape[1], classes)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.01, generator=generator)
        layer.bias.zero_()
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(layer(xtr), ytr).backward()
        optimizer.step()
    with torch.no_grad():
        train_acc = (layer(xtr).argmax(-1) == ytr).float().mean().item()
        test_acc = (layer(xte).argmax(-1) == yte).float().mean().item()
    majority = np.bincount(test_y, minlength=classes).max() / max(len(test_y), 1)
    return {"train": train_acc, "test": test_acc, "majority": float(majority), "test_tokens": len(test_y)}


def pixel_features(rgb: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """Per token region: mean and spread of its colour, and the mean of its central eighth."""
    h, w = grid_hw
    height, width = rgb.shape[:2]
    out = []
    for r in range(h):
        for c in range(w):
            y0, y1 = r * height // h, (r + 1) * height // h
            x0, x1 = c * width // w, (c + 1) * width // w
            region = rgb[y0:y1, x0:x1].reshape(-1, 3) / 255.0
            cy, cx, dy, dx = (y0 + y1) // 2, (x0 + x1) // 2, max(1, (y1 - y0) // 8), max(1, (x1 - x0) // 8)
            centre = rgb[cy - dy:cy + dy, cx - dx:cx + dx].reshape(-1, 3) / 255.0
            out.append(np.concatenate([region.mean(0), region.std(0), centre.mean(0)]))
    return np.array(out, dtype=np.float32)


def collect(model: torch.nn.Module, processor: object, split: str, scenes: int, width: int, height: int
            ) -> tuple[dict[str, list[np.ndarray]], list[np.ndarray], tuple[int, int]]:
    """Features of every merged token of each scene, its (colour, shape, row, column) classes, the grid."""
    from qwen3vl_seg_ros.training.dataset import DataConfig
    from qwen3vl_seg_ros.training.synthetic import generate_sample, split_seed

    cfg = DataConfig(width=width, height=height).scene_config()
    visual = model.model.visual
    merge = int(getattr(processor.image_processor, "merge_size", 2))  # type: ignore[attr-defined]
    features: dict[str, list[np.ndarray]] = {}
    labels = []
    for index in range(scenes):
        scene, _ = generate_sample(split_seed(split, index), cfg)
        inputs = processor.image_processor(images=[Image.fromarray(scene.rgb)], return_tensors="pt")  # type: ignore[attr-defined]
        with torch.no_grad():
            out = visual(inputs["pixel_values"].to(visual.dtype), grid_thw=inputs["image_grid_thw"], return_dict=True)
        _, gh, gw = (int(v) for v in inputs["image_grid_thw"][0])
        hw = (gh // merge, gw // merge)
        labels.append(token_places(token_attributes(*scene_instances(scene), hw, tuple(GROUPS.values())), hw))
        features.setdefault("merged", []).append(out.pooler_output.float().numpy())
        for k, block in enumerate(out.deepstack_features or []):
            features.setdefault(f"deepstack_{k}", []).append(block.float().numpy())
        features.setdefault("pixels", []).append(pixel_features(scene.rgb, hw))
    return features, labels, hw


def _rows(per_scene: list[np.ndarray], labels: list[np.ndarray], group: int, part: slice
          ) -> tuple[np.ndarray, np.ndarray]:
    """The features and classes of the labelled tokens of some scenes."""
    x = np.concatenate(per_scene[part])
    y = np.concatenate([lab[:, group] for lab in labels[part]])
    return x[y >= 0], y[y >= 0]


def probe_all(features: dict[str, list[np.ndarray]], labels: list[np.ndarray], steps: int,
              grid_hw: tuple[int, int]) -> dict[str, dict]:
    """Every feature x group (attributes, then the row and column of tokens on objects): fitted on the
    first 75 % of the scenes, scored on the rest."""
    split = max(1, int(len(labels) * 0.75))
    sizes = {**{group: len(words) for group, words in GROUPS.items()}, "row": grid_hw[0], "col": grid_hw[1]}
    results: dict[str, dict] = {}
    for name, per_scene in features.items():
        for g, (group, classes) in enumerate(sizes.items()):
            xtr, ytr = _rows(per_scene, labels, g, slice(0, split))
            xte, yte = _rows(per_scene, labels, g, slice(split, None))
            results[f"{name}/{group}"] = linear_probe(xtr, ytr, xte, yte, classes, steps)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qwen3vl_seg_ros.model.loading import load_processor, load_qwen3vl

    processor = load_processor(Path(args.model))
    model = load_qwen3vl(Path(args.model), torch.device("cpu"), torch.float32)
    features, labels, grid_hw = collect(model, processor, args.split, args.scenes, args.width, args.height)
    results = probe_all(features, labels, args.steps, grid_hw)
    print(f"| features / attribute | train acc | held-out acc | majority | held-out tokens |  ({args.model}, "
          f"{args.split} scenes 0..{args.scenes - 1})")
    print("|---|---:|---:|---:|---:|")
    for key, r in results.items():
        print(f"| {key} | {r['train']:.3f} | {r['test']:.3f} | {r['majority']:.3f} | {r['test_tokens']} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "split": args.split, "scenes": args.scenes,
                                              "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Can a checkpoint's vision tower learn an attribute? Trains a copy of its ViT and merger alone,
with a linear head per attribute on the merged tokens, and scores held-out tokens. Not a test.

Run::

    source env.sh && python bench/train_visual_attributes.py --steps 200 --out vis.json
    python bench/train_visual_attributes.py --reinit --steps 200        # the same tower from scratch
    python bench/train_visual_attributes.py --cnn-epochs 4 --steps 0    # a small CNN on the same tokens

Why: the linear probe (``probe_visual_tokens.py``) found no shape in the tiny model's tokens, and
round 9's attribute loss did not put it there. Before a round spends an hour on the language
model, this asks the cheaper question: can the tower's tokens hold the shape at all, given a
clean signal? Only the tower runs (about 1 s a step for 32 frames on 2 CPU cores, 16 times the
frames of a full training step; ``--device cuda`` trains it on a GPU). Labels are those of the attribute loss
(:func:`~qwen3vl_seg_ros.training.collate.token_attributes`). Frames are flipped left-right at
random. ``--scale 2`` upsamples the frames before the processor, so each object spans 4 times
the merged tokens (the same as 8-pixel patches), at 4-5 times the cost. ``--cnn-epochs`` trains
a 3-layer CNN on each labelled token's own 32x32 pixels as a reference for what the pixels of
one token tell.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen3vl_seg_ros.training.collate import token_attributes, token_places
from qwen3vl_seg_ros.training.dataset import DataConfig, scene_instances
from qwen3vl_seg_ros.training.expressions import COLOURS, SHAPES
from qwen3vl_seg_ros.training.synthetic import generate_sample, split_seed

GROUPS = {"colour": COLOURS, "shape": SHAPES}
#: Train scenes come from here on: past every training round's scenes (round 9: 1,100,000 + ~10,000).
FIRST_TRAIN_SCENE = 1_200_000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/tiny_qwen3vl_seg", help="Qwen3-VL-Seg folder")
    parser.add_argument("--train-scenes", type=int, default=6000)
    parser.add_argument("--val-scenes", type=int, default=300)
    parser.add_argument("--first-scene", type=int, default=FIRST_TRAIN_SCENE, help="first train scene")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps of the tower (0: none)")
    parser.add_argument("--batch", type=int, default=32, help="frames per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--scale", type=int, default=1, help="upsample frames by this before the processor")
    parser.add_argument("--reinit", action="store_true", help="reset the tower's weights first")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--cnn-epochs", type=int, default=0, help="also train the token-crop CNN")
    parser.add_argument("--workers", type=int, default=2, help="rendering processes")
    parser.add_argument("--device", default="cpu", help="where the tower trains: cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--position", action="store_true",
                        help="also heads for the row and column of each token on an object")
    parser.add_argument("--keep", type=float, default=0.0,
                        help="weight of the pull towards the starting tower's outputs (relative squared error)")
    parser.add_argument("--save-model", default="", help="write a copy of --model with the trained tower here")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# data


def _render(job: tuple[str, int, int, int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    split, index, width, height = job
    scene, _ = generate_sample(split_seed(split, index), DataConfig(width=width, height=height).scene_config())
    ids, labels = scene_instances(scene)
    return scene.rgb, ids, labels


def render_scenes(split: str, first: int, count: int, size: tuple[int, int], grid_hw: tuple[int, int],
                  workers: int, spawn: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(N, H, W, 3)`` frames and ``(N, h * w, G)`` token classes of scenes ``first..first+count-1``."""
    jobs = [(split, i, *size) for i in range(first, first + count)]
    if workers > 1:
        # spawn once CUDA is up in this process: forked children would inherit its context
        with multiprocessing.get_context("spawn" if spawn else None).Pool(workers) as pool:
            scenes = pool.map(_render, jobs, chunksize=16)
    else:
        scenes = [_render(job) for job in jobs]
    rgb = np.stack([s[0] for s in scenes])
    classes = np.stack([token_attributes(ids, labels, grid_hw, tuple(GROUPS.values())) for _, ids, labels in scenes])
    return rgb, classes


def flip(rgb: np.ndarray, classes: np.ndarray, grid_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The frames mirrored left-right, and their token classes with them."""
    n, groups = len(rgb), classes.shape[-1]
    mirrored = classes.reshape(n, *grid_hw, groups)[:, :, ::-1].reshape(n, -1, groups)
    return np.ascontiguousarray(rgb[:, :, ::-1]), np.ascontiguousarray(mirrored)


def token_crops(rgb: np.ndarray, classes: np.ndarray, grid_hw: tuple[int, int], group: int, side: int = 32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each labelled token's own image region, resized to ``side`` x ``side``, in -0.5..0.5, with its class."""
    h, w = grid_hw
    crops, ys = [], []
    for frame, cls in zip(rgb, classes):
        height, width = frame.shape[:2]
        for k in np.flatnonzero(cls[:, group] >= 0):
            r, c = divmod(int(k), w)
            region = frame[r * height // h:(r + 1) * height // h, c * width // w:(c + 1) * width // w]
            crops.append(cv2.resize(region, (side, side), interpolation=cv2.INTER_AREA))
            ys.append(int(cls[k, group]))
    x = torch.tensor(np.stack(crops) if crops else np.zeros((0, side, side, 3), np.uint8)).permute(0, 3, 1, 2)
    return x.float() / 255.0 - 0.5, torch.tensor(ys, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# the tower


class TokenEncoder:
    """The checkpoint's processor and vision tower: frames in, merged tokens ``(N, h * w, D)`` out."""

    def __init__(self, model_dir: Path, scale: int, reinit: bool, frame_pixels: int,
                 device: str | torch.device = "cpu") -> None:
        from qwen3vl_seg_ros.model.fast_generation import FastInputs
        from qwen3vl_seg_ros.model.loading import load_processor, load_qwen3vl

        self.scale = scale
        # upsampled frames must go through unresized: raise the processor's limit to their size
        limit = frame_pixels * scale * scale if scale > 1 else 0
        processor = load_processor(model_dir, image_max_pixels=limit)
        self.image_processor = processor.image_processor
        self.device = torch.device(device)
        self.visual = load_qwen3vl(model_dir, self.device, torch.float32).model.visual
        # The processor's pixel values by table lookup on the device, used per frame size once they
        # match the processor's exactly. On a GPU the processor (0.3 s for 64 frames on a CPU core)
        # would cost more than the tower's step; on a CPU the two take about as long.
        self.fast = FastInputs(processor, self.device, torch.float32)
        self.fast_sizes: dict[tuple[int, int], bool] = {}
        if reinit:
            for module in self.visual.modules():
                if module is not self.visual and hasattr(module, "reset_parameters"):
                    module.reset_parameters()

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The merged token grid of a ``height`` x ``width`` frame."""
        return self.inputs(np.zeros((1, height, width, 3), np.uint8))[1]

    def inputs(self, rgb: np.ndarray) -> tuple[dict, tuple[int, int]]:
        fast = self._fast_inputs(rgb)
        if fast is not None:
            return fast
        return self._processor_inputs(rgb)

    def _processor_inputs(self, rgb: np.ndarray) -> tuple[dict, tuple[int, int]]:
        if self.scale > 1:
            rgb = [cv2.resize(x, None, fx=self.scale, fy=self.scale) for x in rgb]
        frames = [Image.fromarray(x) for x in rgb]
        out = self.image_processor(images=frames, return_tensors="pt")
        merge = int(getattr(self.image_processor, "merge_size", 2))
        _, gh, gw = (int(v) for v in out["image_grid_thw"][0])
        return out, (gh // merge, gw // merge)

    def _fast_inputs(self, rgb: np.ndarray) -> tuple[dict, tuple[int, int]] | None:
        """The processor's inputs built by :class:`FastInputs`, or None where they could differ."""
        height, width = rgb.shape[1:3]
        if self.scale > 1 or rgb.dtype != np.uint8 or not self.fast.keeps_size(height, width):
            return None
        if (height, width) not in self.fast_sizes:
            reference, _ = self._processor_inputs(rgb[:1])
            mine = self.fast.pixel_values(rgb[0]).cpu()
            self.fast_sizes[(height, width)] = torch.equal(reference["pixel_values"], mine)
        if not self.fast_sizes[(height, width)]:
            return None
        patch, merge = self.fast.patch, self.fast.merge
        gh, gw = height // patch, width // patch
        pixels = torch.cat([self.fast.pixel_values(frame) for frame in rgb])
        grid = torch.tensor([[1, gh, gw]] * len(rgb), dtype=torch.long)
        return {"pixel_values": pixels, "image_grid_thw": grid}, (gh // merge, gw // merge)

    def __call__(self, rgb: np.ndarray) -> torch.Tensor:
        return self.outputs(rgb)[0]

    def outputs(self, rgb: np.ndarray, visual: nn.Module | None = None) -> list[torch.Tensor]:
        """What the language model receives: the merged tokens ``(N, h * w, D)``, then each deepstack feature."""
        inputs, (h, w) = self.inputs(rgb)
        out = (visual or self.visual)(inputs["pixel_values"].to(self.device),
                                      grid_thw=inputs["image_grid_thw"].to(self.device), return_dict=True)
        return [t.reshape(len(rgb), h * w, -1) for t in (out.pooler_output, *(out.deepstack_features or ()))]


def drift(new: list[torch.Tensor], old: list[torch.Tensor]) -> torch.Tensor:
    """Mean relative squared change of each token of each output, ``|new - old|^2 / |old|^2``."""
    return torch.stack([((n - o).square().sum(-1) / o.square().sum(-1).clamp_min(1e-6)).mean()
                        for n, o in zip(new, old)]).mean()


def head_loss(heads: nn.ModuleList, tokens: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Mean over the groups of the cross-entropy of each labelled token's class."""
    flat, labels = tokens.reshape(-1, tokens.shape[-1]), classes.reshape(-1, classes.shape[-1])
    losses = []
    for g, head in enumerate(heads):
        keep = labels[:, g] >= 0
        if keep.any():
            losses.append(F.cross_entropy(head(flat[keep]), labels[keep, g]))
    return torch.stack(losses).mean() if losses else tokens.sum() * 0.0


def head_accuracy(encoder: TokenEncoder, heads: nn.ModuleList, rgb: np.ndarray, classes: np.ndarray,
                  chunk: int = 50, names: tuple[str, ...] = tuple(GROUPS)) -> dict[str, float]:
    """Held-out accuracy of each group's head."""
    encoder.visual.eval()
    with torch.no_grad():
        tokens = torch.cat([encoder(rgb[i:i + chunk]) for i in range(0, len(rgb), chunk)])
    encoder.visual.train()
    flat = tokens.reshape(-1, tokens.shape[-1])
    labels = torch.tensor(classes.reshape(-1, classes.shape[-1]), device=flat.device)
    out = {}
    for g, (name, head) in enumerate(zip(names, heads)):
        keep = labels[:, g] >= 0
        with torch.no_grad():
            out[name] = float((head(flat[keep]).argmax(-1) == labels[keep, g]).float().mean())
    return out


def train_tower(args: argparse.Namespace, encoder: TokenEncoder, train: tuple[np.ndarray, np.ndarray],
                val: tuple[np.ndarray, np.ndarray], grid_hw: tuple[int, int]) -> list[dict]:
    """AdamW on the tower and the heads (warm-up, cosine to 10 %); held-out accuracy on the way."""
    width = encoder.visual.merger.linear_fc2.out_features
    groups = {**GROUPS, **({"row": range(grid_hw[0]), "col": range(grid_hw[1])} if args.position else {})}
    names = tuple(groups)
    heads = nn.ModuleList([nn.Linear(width, len(words)) for words in groups.values()]).to(encoder.device)
    place = (lambda c: token_places(c, grid_hw)) if args.position else (lambda c: c)
    val = (val[0], place(val[1]))
    params = list(encoder.visual.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.45 * (1 + np.cos(np.pi * min(s, args.steps) / max(args.steps, 1)))))
    rng = np.random.default_rng(args.seed)
    reference = copy.deepcopy(encoder.visual).eval().requires_grad_(False) if args.keep > 0 else None
    history = [{"step": 0, **head_accuracy(encoder, heads, *val, names=names)}]
    print(f"step 0 held-out {history[-1]}", flush=True)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        pick = rng.choice(len(train[0]), args.batch, replace=False)
        rgb, classes = train[0][pick], train[1][pick]
        if rng.random() < 0.5:
            rgb, classes = flip(rgb, classes, grid_hw)
        outputs = encoder.outputs(rgb)
        loss = head_loss(heads, outputs[0], torch.tensor(place(classes), device=encoder.device))
        moved = torch.zeros((), device=encoder.device)
        if reference is not None:
            with torch.no_grad():
                before = encoder.outputs(rgb, reference)
            moved = drift(outputs, before)
            loss = loss + args.keep * moved
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            history.append({"step": step, "loss": float(loss.detach()), "drift": float(moved.detach()),
                            "s": round(time.perf_counter() - start, 1),
                            **head_accuracy(encoder, heads, *val, names=names)})
            print(f"step {step} {history[-1]}", flush=True)
    return history


def save_model(source: Path, target: Path, visual: nn.Module) -> None:
    """A copy of the model folder ``source`` whose vision tower holds ``visual``'s weights (same dtypes).

    Why: a tower trained here on a clean attribute signal can then start a training round
    (``model.base``) through the ordinary loaders, with nothing else of the model changed.
    """
    from safetensors.torch import load_file, save_file

    if target.exists():
        raise FileExistsError(f"{target} exists; not overwriting it")
    shutil.copytree(source, target)
    weights = load_file(str(target / "model.safetensors"))
    tower = {f"model.visual.{k}": v for k, v in visual.state_dict().items()}
    missing = sorted(set(tower) - set(weights))
    if missing:
        raise KeyError(f"the tower's weights {missing[:3]} are not in {source}/model.safetensors")
    for key, value in tower.items():
        weights[key] = value.detach().to("cpu", weights[key].dtype).contiguous()
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})


def crop_cnn() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]

    return nn.Sequential(*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, len(SHAPES)))


def train_crop_cnn(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                   grid_hw: tuple[int, int], epochs: int, seed: int) -> list[float]:
    """Held-out shape accuracy, per epoch, of a small CNN on single-token crops (Adam, batch 128)."""
    torch.manual_seed(seed)
    group = list(GROUPS).index("shape")
    xtr, ytr = token_crops(*train, grid_hw, group)
    xte, yte = token_crops(*val, grid_hw, group)
    net = crop_cnn()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    accuracy = []
    for _ in range(epochs):
        for batch in torch.randperm(len(ytr)).split(128):
            loss = F.cross_entropy(net(xtr[batch]), ytr[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracy.append(float((net(xte).argmax(-1) == yte).float().mean()))
        print(f"crop CNN epoch {len(accuracy)}: held-out shape {accuracy[-1]:.3f}", flush=True)
    return accuracy


def majority(classes: np.ndarray, names: tuple[str, ...] = tuple(GROUPS)) -> dict[str, float]:
    """Each group's share of its most frequent class among the labelled tokens."""
    out = {}
    for g, name in enumerate(names):
        y = classes[..., g].reshape(-1)
        y = y[y >= 0]
        out[name] = float(np.bincount(y).max() / max(len(y), 1)) if len(y) else 0.0
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    encoder = TokenEncoder(Path(args.model), args.scale, args.reinit, args.width * args.height, args.device)
    grid_hw = encoder.grid(args.height, args.width)
    size = (args.width, args.height)
    spawn = encoder.device.type != "cpu"
    train = render_scenes("train", args.first_scene, args.train_scenes, size, grid_hw, args.workers, spawn)
    val = render_scenes("val", 0, args.val_scenes, size, grid_hw, args.workers, spawn)
    results: dict = {"model": args.model, "scale": args.scale, "reinit": args.reinit, "keep": args.keep,
                     "position": args.position,
                     "first_scene": args.first_scene, "grid": list(grid_hw),
                     "train_scenes": args.train_scenes, "val_scenes": args.val_scenes, "batch": args.batch,
                     "lr": args.lr, "device": args.device,
                     "majority": majority(token_places(val[1], grid_hw), (*GROUPS, "row", "col")) if args.position
                     else majority(val[1]),
                     "labelled_val_tokens": int((val[1][..., 0] >= 0).sum())}
    print(f"token grid {grid_hw}; held-out majority {results['majority']}", flush=True)
    if args.steps > 0:
        results["tower"] = train_tower(args, encoder, train, val, grid_hw)
    if args.cnn_epochs > 0:
        results["crop_cnn_shape"] = train_crop_cnn(train, val, grid_hw, args.cnn_epochs, args.seed)
    if args.save_model and args.steps > 0:
        save_model(Path(args.model), Path(args.save_model), encoder.visual)
        results["saved_model"] = args.save_model
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

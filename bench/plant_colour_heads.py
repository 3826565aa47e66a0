"""Plants a colour matcher in one attention layer of a tiny Qwen3-VL-Seg checkpoint, from linear
probes of that layer's inputs, and writes the changed model folder. Not a test; a starting point
for a training round (docs/training.md, "Round 14").

Run::

    source env.sh && python bench/plant_colour_heads.py --model models/tiny_qwen3vl_seg --out runs/planted_r7

Why: in scenes of three or more objects the tiny model's heads spread their attention evenly over
the objects, whatever the command names (``attention_on_target.py``), and thirteen training rounds,
two of them with losses on the attention itself, did not change that. Yet everything a match needs
is at layer 1's input: the state at the box's first number holds the named colour (a linear probe:
1.00 held out), the object tokens hold their colour (0.84) and their place (row and column 1.00).
What is missing is the query-key product that pairs the two, and gradient descent does not find it.
So it is written in: the query projection of some heads maps the state to "which colour is
named", the key projection of their key head maps each token to "which colour is this, or none",
both as the centred logits of a softmax regression fitted on train scenes, and the two codes meet
in the rotary dimensions that barely turn (the temporal section's lowest frequencies, the same for
every visual token of a frame), so that the match does not depend on where the token is. The
value and output projections are left as they are: training then teaches the model to use what
those heads read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other bench scripts

from attention_on_target import Reader, target_cells

from qwen3vl_seg_ros.training.dataset import DataConfig
from qwen3vl_seg_ros.training.synthetic import COLOURS, generate_sample, split_seed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the checkpoint folder to start from")
    parser.add_argument("--out", required=True, help="where to write the changed folder")
    parser.add_argument("--layer", type=int, default=1, help="the language-model layer to change")
    parser.add_argument("--kv-head", type=int, default=1, help="the key head to rewrite (its query heads match)")
    parser.add_argument("--split", default="train", help="scenes the probes are fitted on")
    parser.add_argument("--first-scene", type=int, default=1460000)
    parser.add_argument("--scenes", type=int, default=250)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--text-keys", type=int, default=12, help="text tokens per command taught as 'none'")
    return parser.parse_args(argv)


def code_dims(head_dim: int, mrope_section: list[int], rope_theta: float, count: int) -> list[int]:
    """``count`` dimensions of a head where the rotary embedding turns least and alike for every
    visual token: the temporal section's rotary pairs (with interleaved M-RoPE, the frequency indices
    that are neither height's ``1, 4, ..`` nor width's ``2, 5, ..``), lowest frequency first, each
    pair giving its two dimensions ``i`` and ``i + head_dim / 2``."""
    half = head_dim // 2
    spatial = {i for i in range(1, 3 * mrope_section[1], 3)} | {i for i in range(2, 3 * mrope_section[2], 3)}
    temporal = [i for i in range(half) if i not in spatial]
    pairs = sorted(temporal, key=lambda i: rope_theta ** (-2 * i / head_dim))  # slowest first
    dims = [d for i in pairs for d in (i, i + half)]
    if len(dims) < count:
        raise ValueError(f"only {len(dims)} temporal rotary dimensions for a code of {count}")
    return sorted(dims[:count])


def collect(reader: Reader, layer: int, split: str, first: int, scenes: int, size: tuple[int, int],
            text_keys: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the layer's projections read (its input after ``input_layernorm``) and the labels:
    visual tokens (the colour of the object on them, else "none"), some text tokens ("none"),
    and the position before the box's first number for "the <colour> object" (the colour) and
    "the <shape>" (none). Returns ``key_x, key_y, query_x, query_y``; labels index ``COLOURS``,
    ``len(COLOURS)`` meaning none."""
    block = reader.model.model.language_model.layers[layer]
    captured: list[torch.Tensor] = []
    hook = block.register_forward_pre_hook(
        lambda module, args, kwargs: captured.append(kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True)
    none = len(COLOURS)
    key_x, key_y, query_x, query_y = [], [], [], []
    rng = np.random.default_rng(first)
    cfg = DataConfig(width=size[0], height=size[1]).scene_config()
    try:
        for index in range(first, first + scenes):
            scene, _ = generate_sample(split_seed(split, index), cfg)
            masks, colours = scene.masks(), [o.colour for o in scene.objects]
            commands = [(f"the {c} object", COLOURS.index(c)) for c in sorted(set(colours)) if colours.count(c) == 1]
            commands.append((f"the {scene.objects[0].shape}", none))
            for command, word in commands:
                inputs = reader.inputs(scene.rgb, command)
                captured.clear()
                with torch.no_grad():
                    reader.model(**inputs)
                    states = block.input_layernorm(captured[0])[0]
                ids = inputs["input_ids"][0]
                visual = (ids == reader.image_token_id).nonzero()[:, 0]
                _, gh, gw = (int(v) for v in inputs["image_grid_thw"][0])
                owner = np.full(len(visual), -1)
                for j, mask in enumerate(masks):
                    owner[target_cells(mask, (gh // reader.merge, gw // reader.merge)) & (owner < 0)] = j
                key_x.append(states[visual])
                key_y.append(torch.tensor([COLOURS.index(colours[o]) if o >= 0 else none for o in owner]))
                text = np.setdiff1d(np.arange(len(ids)), visual.numpy())
                text = rng.choice(text, size=min(text_keys, len(text)), replace=False)
                key_x.append(states[torch.from_numpy(text)])
                key_y.append(torch.full((len(text),), none))
                query_x.append(states[-1:])
                query_y.append(torch.tensor([word]))
    finally:
        hook.remove()
    return torch.cat(key_x), torch.cat(key_y), torch.cat(query_x), torch.cat(query_y)


def fit_code(x: torch.Tensor, y: torch.Tensor, classes: int, iters: int = 300) -> tuple[torch.Tensor, dict]:
    """Softmax regression without bias (a projection row has none) on the first 80 % of rows,
    returned as ``(D, classes)`` weights centred over the classes (a code, not a level), with its
    accuracy on the last 20 %: on labelled rows and on "none" rows."""
    n = int(0.8 * len(x))
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:n] @ w, y[:n]) + 1e-4 * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    w = w.detach()
    with torch.no_grad():
        right = (x[n:] @ w).argmax(1) == y[n:]
        named = y[n:] < classes - 1
    scores = {"named": float(right[named].float().mean()) if named.any() else float("nan"),
              "none": float(right[~named].float().mean()) if (~named).any() else float("nan"),
              "held_out_rows": len(x) - n}
    return w - w.mean(1, keepdim=True), scores


def plant(attention: torch.nn.Module, query_code: torch.Tensor, key_code: torch.Tensor, kv_head: int,
          dims: list[int]) -> list[int]:
    """Rewrites the key head ``kv_head`` to the key code and its query heads to the query code, in
    ``dims`` only (their other rows zero); returns the query heads."""
    hd = attention.head_dim
    per_kv = attention.config.num_attention_heads // attention.config.num_key_value_heads
    heads = list(range(kv_head * per_kv, (kv_head + 1) * per_kv))
    with torch.no_grad():
        wk, wq = attention.k_proj.weight, attention.q_proj.weight
        wk[kv_head * hd:(kv_head + 1) * hd] = 0
        for c, d in enumerate(dims):
            wk[kv_head * hd + d] = key_code[:, c]
        for h in heads:
            wq[h * hd:(h + 1) * hd] = 0
            for c, d in enumerate(dims):
                wq[h * hd + d] = query_code[:, c]
    return heads


def write_folder(source: Path, target: Path, layer: int, attention: torch.nn.Module) -> None:
    """The source folder with the layer's query and key projections replaced (in their stored dtype)."""
    from safetensors.torch import load_file, save_file

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    weights = target / "model.safetensors"
    state = load_file(str(weights))
    prefix = f"model.language_model.layers.{layer}.self_attn."
    for name in ("q_proj.weight", "k_proj.weight"):
        param = getattr(attention, name.split(".")[0]).weight
        state[prefix + name] = param.detach().to(state[prefix + name].dtype).contiguous()
    save_file(state, str(weights), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reader = Reader(args.model)
    text = reader.model.config.text_config
    rope = text.rope_parameters
    classes = len(COLOURS) + 1
    dims = code_dims(text.head_dim, rope["mrope_section"], rope["rope_theta"], classes)
    key_x, key_y, query_x, query_y = collect(reader, args.layer, args.split, args.first_scene, args.scenes,
                                             (args.width, args.height), args.text_keys)
    key_code, key_scores = fit_code(key_x, key_y, classes)
    query_code, query_scores = fit_code(query_x, query_y, classes)
    # the query's "none" entry: a steady negative weight of the colour entries' size, so that keys
    # that look like nothing (background, text) lose against any colour
    colour_size = float((query_x @ query_code[:, :-1]).abs().mean())
    query_code[:, -1] = torch.linalg.lstsq(query_x, torch.full((len(query_x), 1), -colour_size)).solution[:, 0]
    attention = reader.model.model.language_model.layers[args.layer].self_attn
    heads = plant(attention, query_code, key_code, args.kv_head, dims)
    write_folder(Path(args.model), Path(args.out), args.layer, attention)
    summary = {"model": args.model, "layer": args.layer, "kv_head": args.kv_head, "query_heads": heads, "dims": dims,
               "scenes": [args.split, args.first_scene, args.scenes], "key_tokens": len(key_x),
               "queries": len(query_x), "key_probe": key_scores, "query_probe": query_scores}
    (Path(args.out) / "planted_colour_heads.json").write_text(json.dumps(summary, indent=2) + "\n")
    info_path = Path(args.out) / "training_info.json"  # the lineage a training round records from its base
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info["planted_colour_heads"] = summary
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Latency of the box-guided mask decoder (Qwen3-VL-4B sized, random weights). Not a test.

Run::

    source env.sh && python bench/bench_decoder.py --device cpu
    python bench/bench_decoder.py --device cuda --dtype bf16 --out decoder_h100.json

Inputs stand for one 640x480 frame (``--width``/``--height``): the vision features Qwen3-VL's
processor and ViT give for it (a 30x40 patch grid, four captured ViT blocks of width 1024, 300
merged tokens of width 2560), 2560-wide LLM query states, and 1 or 10 boxes (``--boxes``).
Latency does not depend on weight values, so random weights measure the real cost.

Three stages are timed per case (median, p90, min over ``--repeat`` runs after ``--warmup``):

* ``decoder``: the decoder forward (memory, queries, pixel fusion, two masks, IoU head);
* ``masks``: the segmenter's mask stage after generation (``model.segmenter.decode_masks``):
  image to tensor and device, the decoder forward, upsampling to the full image, thresholding,
  copy of the masks, scores and boxes to host, with ``box_refine_passes`` 0;
* ``masks+1``: the same with one refinement pass (the node's default ``box_refine_passes`` 1:
  a second decoder run on the boxes of the first masks).

each run eagerly and, on a GPU, by CUDA-graph replay (``GraphedMaskDecoder``, what the
segmenter uses on a GPU with ``fast_decode``).

The target (issue #3) is at most 3 ms for 10 boxes on an H100. Prints a Markdown table with the
machine and versions, and JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen3vl_seg_ros.model.configuration import MaskDecoderConfig
from qwen3vl_seg_ros.model.graphed_decoder import GraphedMaskDecoder
from qwen3vl_seg_ros.model.mask_decoder import BoxGuidedMaskDecoder
from qwen3vl_seg_ros.model.segmenter import decode_masks
from qwen3vl_seg_ros.model.tiny import reference_qwen3vl_config
from qwen3vl_seg_ros.model.vision_capture import VisionFeatures

TARGET_MS = 3.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--model", default="4B", help="Qwen3-VL size the decoder is built for (2B, 4B, 8B)")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--boxes", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--repeat", type=int, default=0, help="timed runs (default 20 on CPU, 200 on GPU)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed runs first (default 3 on CPU, 20 on GPU)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false",
                        help="on a GPU, time only the eager decoder (default: eager and CUDA graphs)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args()


def machine(device: torch.device) -> dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    info["cpu"] = f"{cpu}, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = str(torch.version.cuda)
    return info


def synthetic_inputs(config: MaskDecoderConfig, width: int, height: int, boxes: int, device: torch.device,
                     dtype: torch.dtype) -> tuple[np.ndarray, VisionFeatures, torch.Tensor, np.ndarray]:
    """Inputs shaped like Qwen3-VL's for one frame (patch 16, merge 2, sides rounded to 32)."""
    rng = np.random.default_rng(0)
    gh, gw = 2 * max(1, round(height / 32)), 2 * max(1, round(width / 32))
    m = config.merge_size
    vision = VisionFeatures(
        vit_maps=[torch.randn(1, config.vit_dim, gh, gw, device=device, dtype=dtype) for _ in config.vit_layers],
        merged_map=torch.randn(1, config.visual_token_dim, gh // m, gw // m, device=device, dtype=dtype),
    )
    queries = torch.randn(boxes, config.llm_dim, device=device, dtype=dtype)
    xy = rng.uniform(0, 0.6, size=(boxes, 2)) * [width, height]
    wh = rng.uniform(0.1, 0.4, size=(boxes, 2)) * [width, height]
    box_px = np.concatenate([xy, np.minimum(xy + wh, [width, height])], axis=1).astype(np.float32)
    rgb = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return rgb, vision, queries, box_px


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: callable, device: torch.device, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def bench_case(decoder: BoxGuidedMaskDecoder, args: argparse.Namespace, boxes: int, device: torch.device,
               dtype: torch.dtype, warmup: int, repeat: int) -> dict[str, dict[str, float]]:
    rgb, vision, queries, box_px = synthetic_inputs(decoder.config, args.width, args.height, boxes, device, dtype)
    height, width = rgb.shape[:2]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=device)
    norm_boxes = torch.as_tensor(box_px, device=device) / scale
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].to(device).float() / 255.0
    runners = {"eager": decoder}
    if device.type == "cuda" and args.graphs:
        runners["graphs"] = GraphedMaskDecoder(decoder)

    def forward(run: callable) -> None:
        run(image, vision, queries, norm_boxes)

    def masks(run: callable, refine_passes: int = 0) -> None:
        decode_masks(run, rgb, vision, queries, box_px, decoder.config.max_image_side, refine_passes)

    result = {}
    with torch.inference_mode():
        for mode, run in runners.items():
            for stage, fn in (("decoder", forward), ("masks", masks), ("masks+1", lambda r: masks(r, 1))):
                runs = time_runs(lambda fn=fn, run=run: fn(run), device, warmup, repeat)
                result[f"{stage} ({mode})"] = {
                    "median_ms": statistics.median(runs), "p90_ms": float(np.percentile(runs, 90)),
                    "min_ms": min(runs), "runs": len(runs)}
    return result


def main() -> int:
    args = parse_args()
    torch.set_num_threads(max(1, args.threads))
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    warmup = args.warmup or (20 if device.type == "cuda" else 3)
    repeat = args.repeat or (200 if device.type == "cuda" else 20)
    config = MaskDecoderConfig.for_qwen3vl(reference_qwen3vl_config(args.model))
    torch.manual_seed(0)
    decoder = BoxGuidedMaskDecoder(config).to(device=device, dtype=dtype).eval()
    params = sum(p.numel() for p in decoder.parameters())
    rows = []
    for boxes in args.boxes:
        stages = bench_case(decoder, args, boxes, device, dtype, warmup, repeat)
        rows.append({"boxes": boxes, **stages})
    report = {
        "benchmark": "mask_decoder", "model": f"Qwen3-VL-{args.model}", "parameters": params,
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "image": f"{args.width}x{args.height}",
        "machine": machine(device), "target_ms_10_boxes_h100": TARGET_MS, "results": rows,
    }
    print(f"Mask decoder for Qwen3-VL-{args.model} ({params / 1e6:.1f}M parameters), {args.width}x{args.height}, "
          f"{report['device']} {report['dtype']}, {repeat} runs after {warmup} warm-up")
    for key, value in report["machine"].items():
        print(f"- {key}: {value}")
    print("\n| boxes | stage | median ms | p90 ms | min ms |\n|---:|---|---:|---:|---:|")
    for row in rows:
        for stage, s in row.items():
            if stage != "boxes":
                print(f"| {row['boxes']} | {stage} | {s['median_ms']:.2f} | {s['p90_ms']:.2f} | {s['min_ms']:.2f} |")
    print("\n" + json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

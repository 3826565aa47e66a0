"""CPU time of the mask decoder by box size, with and without the box gate's floor.

Why: far outside a small box the gate's sigmoids multiply down to subnormal floats, which CPUs
compute on slowly; ``pixel_fusion.GATE_FLOOR`` zeroes them. This times the shipped tiny model's
decoder on one frame, for one centred box of each side, both ways in one process (without the
floor, then with it, box size by box size, so a shared machine's load hits both alike), and
checks that the logits are the same.

    python bench/bench_box_gate.py [--width 640 --height 480 --repeat 7 --threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import qwen3vl_seg_ros.model.pixel_fusion as pixel_fusion
from qwen3vl_seg_ros.model.checkpoint import load_decoder

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny_qwen3vl_seg"))
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--sides", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from bench_decoder import machine, synthetic_inputs  # bench/ is the script's folder

    decoder = load_decoder(args.model).eval()
    rgb, vision, queries, _ = synthetic_inputs(decoder.config, args.width, args.height, 1, torch.device("cpu"),
                                               torch.float32)
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    floor = pixel_fusion.GATE_FLOOR

    def timed(box: torch.Tensor, gate_floor: float) -> tuple[float, torch.Tensor]:
        pixel_fusion.GATE_FLOOR = gate_floor
        try:
            decoder(image, vision, queries, box)
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                out = decoder(image, vision, queries, box)
                times.append((time.perf_counter() - start) * 1e3)
        finally:
            pixel_fusion.GATE_FLOOR = floor
        return sorted(times)[len(times) // 2], out.final_logits

    info = machine(torch.device("cpu"))
    print(f"{info['cpu']}, Python {info['python']}, torch {info['torch']}, {args.width}x{args.height}, "
          f"median of {args.repeat}")
    print("| box side | no floor ms | floor ms | same logits |")
    print("|---:|---:|---:|---|")
    with torch.inference_mode():
        for side in args.sides:
            box = torch.tensor([[0.5 - side / 2, 0.5 - side / 2, 0.5 + side / 2, 0.5 + side / 2]])
            without, a = timed(box, -1.0)
            with_floor, b = timed(box, floor)
            print(f"| {side:.0%} | {without:.0f} | {with_floor:.0f} | {torch.equal(a, b)} |")


if __name__ == "__main__":
    main()

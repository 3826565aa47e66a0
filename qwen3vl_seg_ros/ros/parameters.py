"""Every parameter of the node, in one table: name, default, range, description, when it applies.

The node declares them from this table, ``config/params.yaml`` repeats them with the same
defaults (a test keeps the two in step), and the README's parameter table is generated from it
(``python -m qwen3vl_seg_ros.ros.parameters --markdown``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

#: When a change takes effect.
CONFIGURE = "configure"  # read when the node is configured (model, devices)
ACTIVATE = "activate"  # read when the node is activated (topics, QoS)
RUNTIME = "runtime"  # read on every command; change it any time with `ros2 param set`


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    description: str
    applies: str = RUNTIME
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    #: Set at startup only (launch, params file, command line), never through the parameter
    #: services: parameters that name files, folders or code to import (see docs/reliability.md).
    read_only: bool = False


PARAMETERS: tuple[Param, ...] = (
    # --- segmenter (configure) ---
    Param("segmenter", "qwen3vl_seg",
          "Segmenter to load: 'qwen3vl_seg' (the built-in Qwen3-VL-Seg) or 'package.module:ClassName' "
          "of a Segmenter subclass.", CONFIGURE, read_only=True),
    Param("model", "",
          "Qwen3-VL(-Seg) checkpoint: a Hugging Face hub id or a local folder. Empty: the shipped tiny "
          "demo model (models/tiny_qwen3vl_seg), trained on synthetic tabletop scenes only.", CONFIGURE,
          read_only=True),
    Param("decoder", "",
          "Folder with mask_decoder.safetensors + mask_decoder_config.json. Empty: the decoder inside "
          "the model folder, if any; otherwise the weight-free mask head (lower quality).", CONFIGURE,
          read_only=True),
    Param("device", "auto", "Torch device: 'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'.",
          CONFIGURE),
    Param("dtype", "auto", "Weights dtype: 'auto' (bf16 on a GPU that computes it natively, compute "
          "capability 8.0 on; fp16 on older GPUs such as V100, T4, Jetson Xavier; fp32 on CPU), 'fp32', 'bf16', "
          "'fp16'.",
          CONFIGURE, choices=("auto", "fp32", "bf16", "fp16")),
    Param("mask_head", "auto",
          "Mask head: 'auto' (decoder when present, else depth foreground when depth is valid, else "
          "GrabCut), 'decoder', 'grabcut', 'depth' or 'box'.", CONFIGURE,
          choices=("auto", "decoder", "grabcut", "depth", "box")),
    Param("box_refine_passes", 1,
          "Mask decoder runs after the first, each on the box of its previous mask; each object's box is "
          "then its final mask's box (the model's own box stays in model_answer). 0: boxes as the model "
          "gave them, grown only where a mask reaches past its box. Each pass is one more decoder call "
          "for all objects of the frame.", CONFIGURE, 0, 10),
    Param("calibrate_scores", True,
          "Use the model folder's score_calibration.json (the shipped model has one): each object's score "
          "becomes the probability, fitted on held-out data, that it is a right answer. It applies only with "
          "that folder's own decoder and the box_refine_passes it was fitted with (the log says when not). "
          "false: score = box_score * mask_score.", CONFIGURE),
    Param("local_files_only", True,
          "Never download: load the model from the local disk / Hugging Face cache only.", CONFIGURE,
          read_only=True),
    Param("max_new_tokens", 256, "Longest grounding answer generated (tokens).", CONFIGURE, 8, 8192),
    Param("fast_decode", True, "Static KV cache and CUDA graphs for decoding on GPU.", CONFIGURE),
    Param("compile_cache_dir", "",
          "Folder for the compilation cache that makes the second start faster ('' = default).", CONFIGURE,
          read_only=True),
    Param("image_max_pixels", 0,
          "Resize limit of the model's image processor in pixels (0 = the checkpoint's default).",
          CONFIGURE, 0, 1 << 26),
    Param("num_threads", 0,
          "CPU threads of the model (0 = PyTorch's default, one per core). Set it to the cores the node may "
          "use when other processes share the CPU: oversubscribed threads make inference many times slower.",
          CONFIGURE, 0, 256),
    Param("warmup", True, "Run a dummy command at configure, and again on the first frame of each new "
          "size, so the first real command is fast.", RUNTIME),
    # --- inputs and outputs (activate) ---
    Param("image_qos", "sensor_data",
          "QoS of the image, depth and camera_info subscriptions: 'sensor_data' (best effort, as most "
          "camera drivers publish), 'reliable' or 'best_effort'. A mismatch stalls the pipeline, with "
          "one 'incompatible QoS' warning in the log.",
          ACTIVATE, choices=("sensor_data", "reliable", "best_effort")),
    Param("use_depth", True, "Subscribe to 'depth' and compute 3D outputs.", ACTIVATE),
    Param("sync_slop_s", 0.05, "Largest stamp difference between a colour and a depth image of one frame (s).",
          RUNTIME, 0.0, 5.0),
    Param("sync_queue_size", 10, "Recent colour/depth messages kept for pairing.", ACTIVATE, 1, 1000),
    Param("depth_timeout_s", 1.0,
          "Without depth for this long, frames are served colour-only (2D results) instead of waiting.",
          RUNTIME, 0.01, 60.0),
    Param("publish_overlay", True, "Publish ~/overlay (bgr8 image with masks, boxes, labels, scores).", RUNTIME),
    Param("publish_mask", True, "Publish ~/mask (label image: 0 background, k for object k).", RUNTIME),
    Param("publish_cloud", True, "Publish ~/cloud (all objects' points, with rgb and instance id); switched off, "
          "it first clears the objects it shows (an empty cloud).", RUNTIME),
    Param("publish_markers", True, "Publish ~/markers (oriented boxes, labels, centroids for RViz); switched off, "
          "it first clears the objects it shows (DELETEALL).", RUNTIME),
    Param("publish_detections", True,
          "Publish ~/detections and ~/detections_3d (vision_msgs Detection2DArray / Detection3DArray; "
          "needs vision_msgs installed); switched off, they first clear the objects they show (empty arrays).",
          RUNTIME),
    Param("diagnostics_period_s", 1.0, "Period of /diagnostics status messages (s).", CONFIGURE, 0.1, 60.0),
    # --- commands (runtime) ---
    Param("score_threshold", 0.2, "Objects with a lower score are dropped.", RUNTIME, 0.0, 1.0),
    Param("max_objects", 50, "At most this many objects per result (highest scores kept). The Qwen3-VL "
          "segmenter makes masks for at most 100 objects a frame (the best box scores).", RUNTIME, 1, 10000),
    Param("max_rate_hz", 5.0, "Continuous mode runs at most this often, across changes of command too (0 = as fast as "
          "possible).",
          RUNTIME, 0.0, 1000.0),
    Param("max_input_age_s", 0.5,
          "Frames older than this (since arrival) are never used; one-shot requests wait for a newer one.",
          RUNTIME, 0.01, 3600.0),
    Param("default_timeout_s", 5.0, "Timeout of a ~/segment request whose timeout_s is 0.", RUNTIME, 0.01, 3600.0),
    Param("max_pending_requests", 16,
          "One-shot requests queued at most; more are refused at once (an ERROR answer each). The "
          "service's own queues hold 1024 requests and answers, so a burst is refused, never lost.",
          RUNTIME, 1, 63),
    Param("max_command_length", 1000,
          "Longest command accepted (characters); longer ones are refused with an error.", RUNTIME, 1, 100000),
    Param("max_image_pixels", 16777216, "Largest image accepted (pixels); larger ones are refused.",
          RUNTIME, 1, 1 << 30),
    Param("tracking", True,
          "Give each object a track_id that stays the same across results, whatever command found it, "
          "while some result holds it at least every track_max_age_s.", RUNTIME),
    Param("track_max_distance_m", 0.05,
          "Largest move of an object's 3D centroid between two results of its track (m); used when both "
          "have 3D in the same frame (a fixed target_frame survives camera motion).", RUNTIME, 0.001, 100.0),
    Param("track_iou_threshold", 0.3,
          "Smallest 2D box IoU between two results of one track; used when 3D is missing (0: any overlap).",
          RUNTIME, 0.0, 1.0),
    Param("track_max_age_s", 2.0, "A track not seen for this long is forgotten (s).", RUNTIME, 0.0, 3600.0),
    Param("track_max_colour_distance", 40.0,
          "Largest difference of an object's mean colour between two results of its track (CIELAB distance; "
          "red to blue is about 170, a shade under other light about 10). Keeps a new object next to a "
          "tracked one of another colour from taking its id. 0: colour not compared.", RUNTIME, 0.0, 500.0),
    # --- 3D (runtime) ---
    Param("target_frame", "",
          "Frame for 3D outputs ('' = the camera's optical frame). Looked up in TF at the image's stamp.",
          RUNTIME),
    Param("tf_timeout_s", 0.1, "How long to wait for the transform to target_frame (s).", RUNTIME, 0.0, 10.0),
    Param("erode_px", 2, "Mask edge erosion before projecting to 3D (pixels), against flying pixels. "
          "The cloud and box lose about erode_px * depth / fx per side (fx of the depth image; 2.7 mm at "
          "0.8 m with fx 600 and 2 px): a grasp planner should add that margin.",
          RUNTIME, 0, 50),
    Param("min_points", 30, "Fewer valid 3D points than this: has_3d is false, with the reason.",
          RUNTIME, 1, 1000000),
    Param("outlier_method", "mad", "Depth outlier rejection: 'mad' (median/MAD), 'mode' (histogram) or 'none'.",
          RUNTIME, choices=("mad", "mode", "none")),
    Param("outlier_threshold", 3.0,
          "Depths within this many robust standard deviations (1.4826 MAD) of the median ('mad') or of "
          "the histogram mode ('mode') are kept.",
          RUNTIME, 0.1, 100.0),
    Param("cluster_gap_m", 0.03,
          "Depth gap that splits an object's points into clusters; the dominant nearest one is kept (m).",
          RUNTIME, 0.0, 10.0),
    Param("voxel_size_m", 0.0, "Voxel downsampling of the published clouds (m; 0 = off); num_points, centroid and "
          "box use every point.", RUNTIME, 0.0, 1.0),
    Param("min_depth_m", 0.05, "Depth readings nearer than this are ignored (m).", RUNTIME, 0.0, 100.0),
    Param("max_depth_m", 10.0, "Depth readings farther than this are ignored (m).", RUNTIME, 0.0, 1000.0),
    # --- visualisation (runtime) ---
    Param("overlay_alpha", 0.5, "Opacity of the masks in ~/overlay.", RUNTIME, 0.0, 1.0),
    Param("marker_lifetime_s", 0.0, "Lifetime of the RViz markers (0 = until replaced).", RUNTIME, 0.0, 3600.0),
)

BY_NAME: dict[str, Param] = {p.name: p for p in PARAMETERS}


def _range(p: Param) -> str:
    """" Range [min, max]." with whole numbers written out (``:g`` shows 67108864 as 6.71089e+07),
    and a decimal parameter's ends as decimals ("[0, 5]" read as whole numbers only)."""
    def text(v: Any) -> str:
        return repr(float(v)) if isinstance(p.default, float) else str(int(v))
    return f" Range [{text(p.min)}, {text(p.max)}]."


def markdown_table() -> str:
    """The README's parameter table."""
    lines = ["| parameter | default | applies | description |", "|---|---|---|---|"]
    for p in PARAMETERS:
        rng = _range(p) if p.min is not None else ""
        choices = f" One of {', '.join(p.choices)}." if p.choices else ""
        default = f"`{_yaml_value(p.default)}`"  # as in params.yaml and -p (true, not True)
        applies = f"{p.applies}, read-only" if p.read_only else p.applies
        lines.append(f"| `{p.name}` | {default} | {applies} | {p.description}{rng}{choices} |")
    return "\n".join(lines)


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace('"', '\\"') + '"'
    return repr(value)


def params_yaml() -> str:
    """config/params.yaml: every parameter with its default and description."""
    lines = [
        "# Parameters of the qwen3vl_seg node (generated by",
        "#   python -m qwen3vl_seg_ros.ros.parameters --yaml > config/params.yaml",
        "# from qwen3vl_seg_ros/ros/parameters.py; edit the values freely, a test checks that every",
        "# parameter is here). 'applies': configure = read when the node is configured (model),",
        "# activate = when activated (topics), runtime = on every command (`ros2 param set`).",
        "# read-only = set at launch only (params file or -p), never at runtime: these choose code and",
        "# files to load, which no one on the network may change.",
        "/**:",
        "  ros__parameters:",
    ]
    for p in PARAMETERS:
        text = p.description
        if p.min is not None:
            text += _range(p)
        if p.choices:
            text += f" One of: {', '.join(p.choices)}."
        words, line = text.split(), ""
        wrapped = []
        for word in words:
            if len(line) + len(word) + 1 > 88:
                wrapped.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        wrapped.append(line)
        wrapped[-1] += f" [{p.applies}{', read-only' if p.read_only else ''}]"
        lines.extend(f"    # {w}" for w in wrapped)
        lines.append(f"    {p.name}: {_yaml_value(p.default)}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--markdown", action="store_true", help="print the README parameter table")
    parser.add_argument("--yaml", action="store_true", help="print config/params.yaml")
    args = parser.parse_args()
    if args.markdown:
        print(markdown_table())
    if args.yaml:
        print(params_yaml(), end="")


if __name__ == "__main__":
    main()

"""The shipped tiny model (models/tiny_qwen3vl_seg) on fixed held-out scenes, and through the node.

The held-out scenes come from the ``test`` split of the synthetic generator: layouts never seen in
training (``train`` split) nor used to pick the model (``val`` split, the end-of-training check).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from qwen3vl_seg_ros.training.dataset import DataConfig, synthetic_examples
from qwen3vl_seg_ros.training.evaluate import EvalSettings, eval_frame_size, run_evaluation

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "tiny_qwen3vl_seg"
SCENES = 50  # fixed held-out scenes (test split, indices 0..49), 2 queries each


def training_size() -> tuple[int, int]:
    """(width, height) of the synthetic frames the shipped model was trained on (evaluate's default)."""
    return eval_frame_size(str(MODEL), 0, 0)


pytestmark = pytest.mark.skipif(
    not (MODEL / "config.json").is_file(),
    reason="models/tiny_qwen3vl_seg is not there: it is part of the repository (git lfs is not needed); "
           "docs/training.md, 'The shipped model', says how it was trained",
)


@pytest.fixture(scope="module")
def report() -> dict:
    width, height = training_size()
    settings = EvalSettings(model=str(MODEL), split="test", scenes=SCENES, queries_per_scene=2, heads=("box",),
                            # one thread: two OpenMP threads on a 2-core machine that is busy with
                            # anything else spin at every barrier (300 s instead of 10 here once)
                            workers=1, threads=1, device="cpu", width=width, height=height)
    return run_evaluation(settings, log=lambda m: None)


def test_folder_is_small_and_safetensors_only() -> None:
    files = [p for p in MODEL.iterdir() if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    assert size_mb <= 30.0, f"{size_mb:.1f} MB"
    assert (MODEL / "mask_decoder.safetensors").is_file() and (MODEL / "tokenizer.json").is_file()


def test_quality_on_held_out_scenes(report: dict) -> None:
    """Regression floors of the shipped model on 100 held-out samples, not the issue's bars.

    The shipped model (round 19b) was trained in nine rounds (about 5.6 hours on 2 CPU cores and
    20 minutes on two lent H200s) and still localises poorly (issue #5 stays open;
    docs/training.md, "The shipped model"): on these 100 samples, with the default box refinement
    (one more decoder pass on each mask's own box), gIoU 0.710 and box accuracy 0.639 (the model's
    own boxes: 0.458; round 7, shipped before it: gIoU 0.577, box accuracy 0.518; box-as-mask
    0.450), against the targets 0.85 / 0.95 / 0.9. The floors sit below that with room for float
    noise but above round 7, so a broken export, loader, decoder or refinement, or a worse model,
    fails here (an untrained model scores ~0); the comparisons on the same answers say the decoder
    and the refinement work.
    """
    decoder = report["methods"]["decoder"]["overall"]
    box = report["methods"]["box"]["overall"]  # the model's own boxes, as masks
    assert report["complete"] and report["samples"] >= 90
    assert decoder["giou"] >= 0.65, decoder
    # the decoder's masks beat the predicted box used as the mask, on the same answers
    assert decoder["giou"] > box["giou"] + 0.15
    # the refined boxes (the final masks' boxes) are right far more often than the model's own
    assert decoder["box_acc@0.5"] > box["box_acc@0.5"] + 0.15, (decoder, box)


def test_scores_are_calibrated_probabilities(report: dict) -> None:
    """The shipped score_calibration.json makes a score the chance that the object is right.

    Fitted on val scenes 0-599; on test scenes 0-49 (400 samples) the stated probability is 0.078
    from the observed rate on average (expected calibration error), against 0.35 for the raw
    box_score * mask_score, which sits near 0.27 whether an object is right or not. On these 100
    samples: 0.100 calibrated (mean score 0.59, right 0.66), 0.382 raw (mean score 0.28).
    """
    reported = report["scores"]["reported"]
    assert reported["objects"] >= 50
    assert reported["ece"] < 0.2, reported
    assert abs(reported["score_mean"] - reported["right"]) < 0.15, reported


def test_the_node_serves_the_shipped_model_over_dds() -> None:
    """A few commands through the real node (default model = the shipped one), over DDS."""
    pytest.importorskip("rclpy")
    from qwen3vl_seg_ros.msg import SegmentationResult

    from ros_harness import Client, NodeHarness, Scene, camera_info_msg, image_msg, new_context

    width, height = training_size()
    cfg = DataConfig(width=width, height=height).scene_config()
    cases = []
    for index in range(SCENES, SCENES + 12):  # more test scenes, past the ones above
        for ex in synthetic_examples("test", index, cfg, with_depth=True):
            if ex.query_type == "referring" and len(cases) < 3:
                cases.append(ex)
                break
    no_target = next(ex for i in range(SCENES, SCENES + 12)
                     for ex in synthetic_examples("test", i, cfg, with_depth=True) if ex.query_type == "no_target")
    context = new_context()
    node = NodeHarness(context, {"segmenter": "qwen3vl_seg", "model": str(MODEL), "device": "cpu"})
    client = Client(context)
    answered_with_objects = 0
    try:
        client.wait_connected()
        for ex in [*cases, no_target]:
            _publish(client, ex, Scene, camera_info_msg, image_msg)
            result = client.call(ex.expression, timeout_s=30.0, wait=60.0).result
            answered_with_objects += result.status == SegmentationResult.OK and bool(result.objects)
            # exactly one answer, from the real model; whether it is right is the test above's business
            assert result.status in (SegmentationResult.OK, SegmentationResult.NO_MATCH), (ex.expression,
                                                                                          result.message)
            assert result.segmenter == "qwen3vl_seg" and result.model_answer, result
            if result.objects:
                assert result.query_source == "mask_token", result.query_source
            assert result.image_width == width and result.image_height == height
            for obj in result.objects:
                assert obj.mask_source == "decoder" and 0 < obj.score <= 1
                mask = _full_mask(obj, height, width)
                assert mask.any() and obj.box.width > 0 and obj.box.height > 0
            if result.objects:  # depth came with the frame: the objects get 3D (or say why not)
                assert any(o.has_3d for o in result.objects), [o.status_3d for o in result.objects]
        # the checks above hold for empty answers too: a node that dropped every object (its
        # calibration pushing scores under the threshold, say) would pass them. These fixed
        # scenes' single-target commands get objects (the first, 'the object on the left', does)
        assert answered_with_objects >= 1, "no command got an object through the node"
    finally:
        client.close()
        node.close()
        context.try_shutdown()


def _publish(client, ex, scene_cls, camera_info_msg, image_msg) -> None:
    """One RGB-D frame of a synthetic scene with its camera's intrinsics."""
    stamp = client.node.get_clock().now().to_msg()
    k = ex.intrinsics
    info = scene_cls(width=k.width, height=k.height, fx=k.fx, fy=k.fy, cx=k.cx, cy=k.cy)
    client.image_pub.publish(image_msg(ex.rgb, "rgb8", stamp=stamp))
    depth = np.nan_to_num(ex.depth, nan=0.0).astype(np.float32)  # 0 = no reading on the wire
    client.depth_pub.publish(image_msg(depth, "32FC1", stamp=stamp))
    client.info_pub.publish(camera_info_msg(info, stamp=stamp))


def _full_mask(obj, height: int, width: int) -> np.ndarray:
    crop = np.frombuffer(bytes(obj.mask.data), np.uint8).reshape(obj.mask.height, obj.mask.step)
    crop = crop[:, : obj.mask.width] > 0
    mask = np.zeros((height, width), bool)
    x, y = obj.box.x_offset, obj.box.y_offset
    mask[y:y + crop.shape[0], x:x + crop.shape[1]] = crop
    return mask

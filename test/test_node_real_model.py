"""The node with the real Qwen3-VL-Seg segmenter (a tiny checkpoint) over DDS, no test double.

The checkpoint is built in the test, saved, and loaded by the node through the production path
(``segmenter: qwen3vl_seg``, ``model: <folder>``): processor, Qwen3-VL, decoder checkpoint. It is
fitted to always answer one red cube at relative box [300, 350, 600, 750] with a ``<|seg|>``
token, so the result's box is known (with ``box_refine_passes`` 0); the mask comes from the
(untrained) decoder.
"""

from __future__ import annotations

import numpy as np
import pytest

from qwen3vl_seg_ros.model.tiny import DEFAULT_ANSWER, build_tiny_checkpoint
from qwen3vl_seg_ros.msg import SegmentationResult

from helpers import wait_for
from ros_harness import Client, NodeHarness, Scene, new_context

pytestmark = pytest.mark.ros


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_seg")))


def test_real_segmenter_answers_over_dds(checkpoint: str) -> None:
    context = new_context("real_model")
    harness = NodeHarness(context, {"segmenter": "qwen3vl_seg", "model": checkpoint, "device": "cpu",
                                    "score_threshold": 0.0, "min_points": 20, "box_refine_passes": 0})
    client = Client(context, node_fqn="/real_model/qwen3vl_seg")
    try:
        client.wait_connected()
        scene = Scene()
        client.publish_frame(scene, wait_node=harness.node)
        result = client.call("the red cube", timeout_s=30.0).result
        assert result.status == SegmentationResult.OK, result.message
        assert result.segmenter == "qwen3vl_seg" and result.query_source == "mask_token"
        assert '"bbox_2d": [300, 350, 600, 750]' in result.model_answer
        assert result.grounding_ms > 0 and result.mask_ms > 0
        (obj,) = result.objects
        assert obj.label == DEFAULT_ANSWER[0]["label"] and obj.mask_source == "decoder"
        scale = np.array([scene.width, scene.height, scene.width, scene.height]) / 1000
        x1, y1, x2, y2 = np.array(DEFAULT_ANSWER[0]["bbox_2d"]) * scale
        # without refinement the box is the model's, grown only where the mask reaches past it
        model = (int(np.floor(x1)), int(np.floor(y1)), int(np.ceil(x2)), int(np.ceil(y2)))
        box = (obj.box.x_offset, obj.box.y_offset, obj.box.x_offset + obj.box.width, obj.box.y_offset + obj.box.height)
        assert box[0] <= model[0] and box[1] <= model[1] and box[2] >= model[2] and box[3] >= model[3], (box, model)
        crop = np.frombuffer(bytes(obj.mask.data), np.uint8).reshape(obj.mask.height, obj.mask.step)[:, :obj.mask.width]
        grown = {"left": box[0] < model[0], "top": box[1] < model[1], "right": box[2] > model[2],
                 "bottom": box[3] > model[3]}
        edges = {"left": crop[:, 0], "top": crop[0], "right": crop[:, -1], "bottom": crop[-1]}
        assert all(edges[side].any() for side, was in grown.items() if was), grown  # grown to mask pixels only
        # the crop holds every pixel the label image (~/mask) gives this object: none lost past the box
        assert wait_for(lambda: client.snapshot(client.masks), 5)
        label = client.snapshot(client.masks)[-1]
        labels = np.frombuffer(bytes(label.data), np.uint8).reshape(label.height, label.step)[:, :label.width]
        assert int((crop == 255).sum()) == int((labels == obj.id).sum()) > 0
        assert 0.0 < obj.score <= 1.0 and 0.0 < obj.box_score <= 1.0 and 0.0 <= obj.mask_score <= 1.0
        assert obj.score == pytest.approx(obj.box_score * obj.mask_score, rel=1e-5)
        assert obj.mask.encoding == "mono8" and (obj.mask.width, obj.mask.height) == (obj.box.width, obj.box.height)
        assert result.header.frame_id == "camera_optical"
    finally:
        client.close()
        harness.close()
        context.try_shutdown()


def test_refined_box_is_the_mask_box_over_dds(checkpoint: str) -> None:
    """With the default box refinement the box on the wire is the mask's: the mask image (cropped
    to the box) has foreground in its first and last row and column."""
    context = new_context("real_model_refine")
    harness = NodeHarness(context, {"segmenter": "qwen3vl_seg", "model": checkpoint, "device": "cpu",
                                    "score_threshold": 0.0})
    client = Client(context, node_fqn="/real_model_refine/qwen3vl_seg")
    try:
        assert harness.node.get_parameter("box_refine_passes").value > 0
        client.wait_connected()
        client.publish_frame(Scene(), wait_node=harness.node)
        result = client.call("the red cube", timeout_s=30.0).result
        assert result.status == SegmentationResult.OK, result.message
        (obj,) = result.objects
        mask = np.frombuffer(bytes(obj.mask.data), np.uint8).reshape(obj.mask.height, obj.mask.step)[:, :obj.mask.width]
        inside = mask > 0  # (the tiny checkpoint is built from fixed seeds: its mask here is not empty)
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
    finally:
        client.close()
        harness.close()
        context.try_shutdown()

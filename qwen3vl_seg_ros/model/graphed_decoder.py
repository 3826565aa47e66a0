"""CUDA-graph replay of the mask decoder for inference on a GPU.

The decoder launches about 500 small kernels per frame; eager PyTorch spends ~20 µs of CPU per
launch, so a frame costs ~10 ms although the GPU is busy for under 2 ms. Replaying a captured
CUDA graph removes that overhead. A graph has fixed shapes, so objects are padded to a bucket
size (1, 2, 4, 8, ...) and marked invalid (``valid=False``), which keeps padding from affecting
real objects: results equal the eager decoder's. One graph is captured per (bucket, image
size, feature grid, dtype) on first use, a few tens of milliseconds; graphs share one memory
pool and at most ``max_graphs`` are kept.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from qwen3vl_seg_ros.model.configuration import MaskDecoderConfig
from qwen3vl_seg_ros.model.cuda_graph import capture_graph
from qwen3vl_seg_ros.model.mask_decoder import BoxGuidedMaskDecoder, DecoderOutput
from qwen3vl_seg_ros.model.vision_capture import VisionFeatures

BUCKETS = (1, 2, 4, 8, 16, 32, 64)

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    image: torch.Tensor
    vit_maps: list[torch.Tensor]
    merged: torch.Tensor
    llm_states: torch.Tensor
    boxes: torch.Tensor
    valid: torch.Tensor
    output: DecoderOutput


def bucket_for(count: int) -> int | None:
    """The smallest bucket holding ``count`` objects, or None past the largest."""
    return next((b for b in BUCKETS if b >= count), None)


class GraphedMaskDecoder:
    """Calls like ``BoxGuidedMaskDecoder.forward`` for one frame, replaying CUDA graphs."""

    def __init__(self, decoder: BoxGuidedMaskDecoder, max_graphs: int = 16) -> None:
        self.decoder = decoder.eval()
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._eager_keys: set[tuple] = set()  # shapes whose capture failed: decoded eagerly from then on
        self._pool = torch.cuda.graph_pool_handle()

    @property
    def config(self) -> MaskDecoderConfig:
        return self.decoder.config

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, vision: VisionFeatures, llm_states: torch.Tensor,
                 boxes: torch.Tensor) -> DecoderOutput:
        count = boxes.shape[0]
        bucket = bucket_for(count)
        if images.shape[0] != 1 or bucket is None or count == 0:
            return self.decoder(images, vision, llm_states, boxes)
        key = (bucket, tuple(images.shape), tuple(vision.vit_maps[0].shape), tuple(vision.merged_map.shape),
               llm_states.dtype, images.device)
        if key in self._eager_keys:
            return self.decoder(images, vision, llm_states, boxes)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(key, images, vision, llm_states, bucket)
            except Exception as exc:  # out of memory while capturing, a capture-unsafe op: decode eagerly
                # Without this every later frame of these shapes failed the same way; the eager
                # decoder gives the same masks, only slower.
                self._eager_keys.add(key)
                log.warning("mask decoder capture failed for %d object(s) at %s; decoding them eagerly "
                            "(%s: %s)", count, tuple(images.shape[-2:]), type(exc).__name__, exc)
                return self.decoder(images, vision, llm_states, boxes)
        else:
            self._graphs.move_to_end(key)
        with torch.cuda.device(images.device):  # replay on the captured device's stream (cuda:N)
            self._fill(entry, images, vision, llm_states, boxes)
            entry.graph.replay()
        out = entry.output
        return DecoderOutput(mask_logits=tuple(m[:count].clone() for m in out.mask_logits),  # type: ignore[arg-type]
                             iou=out.iou[:count].clone())

    @staticmethod
    def _fill(entry: _Graph, images: torch.Tensor, vision: VisionFeatures, llm_states: torch.Tensor,
              boxes: torch.Tensor) -> None:
        count = boxes.shape[0]
        entry.image.copy_(images)
        for static, live in zip(entry.vit_maps, vision.vit_maps):
            static.copy_(live)
        entry.merged.copy_(vision.merged_map)
        entry.llm_states[:count].copy_(llm_states)
        entry.llm_states[count:].zero_()
        entry.boxes[:count].copy_(boxes)
        entry.boxes[count:] = torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device)
        entry.valid.copy_(torch.arange(entry.valid.shape[0], device=boxes.device) < count)

    def _capture(self, key: tuple, images: torch.Tensor, vision: VisionFeatures, llm_states: torch.Tensor,
                 bucket: int) -> _Graph:
        device = images.device
        static = dict(
            image=images.clone(),
            vit_maps=[v.clone() for v in vision.vit_maps],
            merged=vision.merged_map.clone(),
            llm_states=torch.zeros((bucket, llm_states.shape[1]), dtype=llm_states.dtype, device=device),
            boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device).repeat(bucket, 1),
            valid=torch.ones(bucket, dtype=torch.bool, device=device),
        )

        def run() -> DecoderOutput:
            features = VisionFeatures(static["vit_maps"], static["merged"])
            return self.decoder(static["image"], features, static["llm_states"], static["boxes"],
                                valid=static["valid"])

        # thread_local: another thread's CUDA work (a model call a cleanup left running) must not
        # abort this capture, as in the generator's captures
        graph, output = capture_graph(run, device, pool=self._pool, capture_error_mode="thread_local")
        entry = _Graph(graph=graph, output=output, **static)
        self._graphs[key] = entry
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return entry

"""The box-guided mask decoder of Qwen3-VL-Seg: boxes + LLM states + vision features -> masks.

Four components (one file each): multi-scale feature injection (memory map), spatial-semantic
query construction, box-gated pixel fusion, and here iterative mask-aware refinement: each
query becomes a dynamic 1x1 kernel over the stride-4 pixel features (mask M1); features pooled
under sigmoid(M1) and one more memory attention with an M1-derived prior refine the query, whose
kernel gives the final mask M2; an IoU head predicts M2's quality (the mask score).

All objects of all frames are one batch: tensors are indexed by ``batch_index`` (the frame of
each object) instead of being padded per frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qwen3vl_seg_ros.model.configuration import MaskDecoderConfig
from qwen3vl_seg_ros.model.feature_injection import FeatureInjection
from qwen3vl_seg_ros.model.pixel_fusion import PixelFusion, log_prior
from qwen3vl_seg_ros.model.query_encoder import QueryEncoder, QueryLayer
from qwen3vl_seg_ros.model.vision_capture import VisionFeatures

#: The decoder image's sides are multiples of this (the CNN stem's deepest stride).
DECODER_SIDE_MULTIPLE = 8
#: Masks (and the box prior) come at this stride of the decoder image: one mask cell is 4 pixels.
MASK_STRIDE = 4


@dataclass
class DecoderOutput:
    """Mask logits at stride 4 of the decoder's input image, and predicted IoU."""

    mask_logits: tuple[torch.Tensor, torch.Tensor]  # (M1, M2), each (N, H/4, W/4)
    iou: torch.Tensor  # (N,) predicted IoU of M2 with the true mask, in 0..1

    @property
    def final_logits(self) -> torch.Tensor:
        return self.mask_logits[-1]


def gather_frames(per_frame: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
    """``(N, B, ...)`` -> ``(N, ...)``: each object's row for its own frame."""
    return per_frame[torch.arange(per_frame.shape[0], device=per_frame.device), batch_index]


def masked_mean(weights: torch.Tensor, features: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
    """Weighted mean of each object's frame features: weights ``(N, h, w)``, features
    ``(B, C, h, w)`` -> ``(N, C)``.

    One frame (inference) is one product over it. With several frames (training batches) each
    object's own frame is gathered first: products of every object with every frame would grow
    with objects x frames, in memory and work, and made training split its batches into chunks.
    """
    if features.shape[0] == 1:
        pooled = gather_frames(torch.einsum("nhw,bchw->nbc", weights, features), batch_index)
    else:
        pooled = torch.einsum("nhw,nchw->nc", weights, features[batch_index])
    return pooled / weights.flatten(1).sum(-1, keepdim=True).clamp(min=1e-6)


class DynamicMaskHead(nn.Module):
    """Query -> 1x1 kernel and bias over the pixel features, plus the scaled box log-prior."""

    def __init__(self, dim: int, pixel_dim: int, bias_init: float) -> None:
        super().__init__()
        self.kernel = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, pixel_dim + 1))
        with torch.no_grad():
            self.kernel[-1].bias[-1] = bias_init
        self.prior_scale = nn.Parameter(torch.ones(()))

    def forward(self, queries: torch.Tensor, pixel: torch.Tensor, batch_index: torch.Tensor,
                prior: torch.Tensor) -> torch.Tensor:
        params = self.kernel(queries)
        weight, bias = params[:, :-1], params[:, -1]
        if pixel.shape[0] == 1:  # one frame: one product (see masked_mean for several)
            logits = gather_frames(torch.einsum("nc,bchw->nbhw", weight, pixel), batch_index)
        else:
            logits = torch.einsum("nc,nchw->nhw", weight, pixel[batch_index])
        return logits + bias[:, None, None] + self.prior_scale * prior


class MaskRefinement(nn.Module):
    """Refines queries with what the first mask covers (mask-aware pooling + masked attention)."""

    def __init__(self, config: MaskDecoderConfig) -> None:
        super().__init__()
        dim = config.dim
        in_dim = 2 * dim + config.pixel_dim
        self.update = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.layer = QueryLayer(dim, config.num_heads, config.mlp_dim)

    def forward(self, queries: torch.Tensor, coarse_logits: torch.Tensor, memory: torch.Tensor,
                pixel: torch.Tensor, batch_index: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        soft = torch.sigmoid(coarse_logits)
        soft_memory = F.adaptive_avg_pool2d(soft, memory.shape[-2:])
        pooled_memory = masked_mean(soft_memory, memory, batch_index)
        pooled_pixel = masked_mean(soft, pixel, batch_index)
        queries = queries + self.update(torch.cat([queries, pooled_memory, pooled_pixel], dim=-1))
        memory_seq = memory.flatten(2).transpose(1, 2)
        return self.layer(queries, memory_seq, batch_index, log_prior(soft_memory).flatten(1), valid)


class IoUHead(nn.Module):
    """Predicts the IoU of the final mask from the query and the features under the mask."""

    def __init__(self, dim: int, pixel_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim + pixel_dim, dim), nn.GELU(), nn.Linear(dim, 1))

    def forward(self, queries: torch.Tensor, logits: torch.Tensor, pixel: torch.Tensor,
                batch_index: torch.Tensor) -> torch.Tensor:
        pooled = masked_mean(torch.sigmoid(logits), pixel, batch_index)
        return torch.sigmoid(self.mlp(torch.cat([queries, pooled], dim=-1))[:, 0])


class BoxGuidedMaskDecoder(nn.Module):
    """Turns each (box, LLM state) of a frame into a mask; about 17M parameters for Qwen3-VL-4B."""

    def __init__(self, config: MaskDecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.injection = FeatureInjection(config)
        self.query_encoder = QueryEncoder(config)
        self.pixel_fusion = PixelFusion(config)
        self.coarse_head = DynamicMaskHead(config.dim, config.pixel_dim, config.mask_bias_init)
        self.refinement = MaskRefinement(config)
        self.fine_head = DynamicMaskHead(config.dim, config.pixel_dim, config.mask_bias_init)
        self.iou_head = IoUHead(config.dim, config.pixel_dim)

    def forward(
        self,
        images: torch.Tensor,
        vision: VisionFeatures,
        llm_states: torch.Tensor,
        boxes: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """Masks for ``N`` objects in ``B`` frames.

        ``images``: ``(B, 3, H, W)`` RGB in 0..1 (any size; masks come at stride 4 of it);
        ``vision``: the frames' captured vision features; ``llm_states``: ``(N, llm_dim)``
        hidden states of the objects' mask (or last JSON) tokens; ``boxes``: ``(N, 4)``
        normalised xyxy in 0..1; ``batch_index``: ``(N,)`` frame of each object (default 0);
        ``valid``: ``(N,)`` bool, False for padding objects that must not affect the others
        (fixed-size batches, CUDA graphs); their outputs are meaningless.
        """
        n = boxes.shape[0]
        if batch_index is None:
            batch_index = torch.zeros(n, dtype=torch.long, device=boxes.device)
        if llm_states.shape[0] != n or batch_index.shape[0] != n:
            raise ValueError(f"got {n} boxes, {llm_states.shape[0]} LLM states, {batch_index.shape[0]} indices")
        memory = self.injection(vision)
        if images.shape[0] != memory.shape[0]:
            raise ValueError(f"{images.shape[0]} images for vision features of {memory.shape[0]} frames")
        memory_seq = memory.flatten(2).transpose(1, 2)
        box_prior = log_prior(self.pixel_fusion.gates(boxes, *memory.shape[-2:])).flatten(1)
        queries = self.query_encoder(llm_states, boxes, memory_seq, batch_index, box_prior, valid)
        pixel = self.pixel_fusion(images, memory, boxes, batch_index, valid)
        prior = log_prior(self.pixel_fusion.gates(boxes, *pixel.shape[-2:])).to(pixel.dtype)
        coarse = self.coarse_head(queries, pixel, batch_index, prior)
        queries = self.refinement(queries, coarse, memory, pixel, batch_index, valid)
        fine = self.fine_head(queries, pixel, batch_index, prior)
        iou = self.iou_head(queries, fine, pixel, batch_index)
        return DecoderOutput(mask_logits=(coarse, fine), iou=iou)


def upsample_logits(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Mask logits ``(N, h, w)`` to ``(N, height, width)`` (bilinear, pixel-centre aligned)."""
    if logits.shape[0] == 0:
        return logits.new_zeros((0, height, width))
    return F.interpolate(logits[:, None].float(), size=(height, width), mode="bilinear",
                         align_corners=False)[:, 0]


#: Most float logits :func:`upsampled_masks` holds at once (256 MB): bounds the mask stage's memory
#: whatever the frame size and object count (100 objects at 4096x4096 peaked at 10.4 GB).
UPSAMPLE_CHUNK_ELEMENTS = 1 << 26


def upsampled_masks(logits: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(N, h, w)`` logits -> ``(N, height, width)`` bool masks (logit > 0), a few objects at a
    time, so that only the bool masks are ever full size together."""
    step = max(1, UPSAMPLE_CHUNK_ELEMENTS // max(1, height * width))
    if logits.shape[0] <= step:
        return upsample_logits(logits, height, width) > 0
    out = torch.empty((logits.shape[0], height, width), dtype=torch.bool, device=logits.device)
    for start in range(0, logits.shape[0], step):
        out[start:start + step] = upsample_logits(logits[start:start + step], height, width) > 0
    return out


def decoder_image_uint8(rgb: np.ndarray, max_side: int) -> np.ndarray:
    """``(3, h, w)`` uint8: the image the decoder's CNN stem reads, before ``/ 255`` (inference
    and training both make it here): long side at most ``max_side``, area interpolation."""
    height, width = rgb.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    # sides a multiple of DECODER_SIDE_MULTIPLE: the stride-4/8 maps then cover the image exactly,
    # which upsample_logits assumes (a 145-row image gave 37 rows covering 148: masks shifted)
    m = DECODER_SIDE_MULTIPLE
    size = (max(m, round(width * scale / m) * m), max(m, round(height * scale / m) * m))
    if size != (width, height):
        shrink = size[0] < width or size[1] < height
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))

"""Multi-scale spatial feature injection: ViT block features -> the decoder's memory map.

The LLM only sees merged visual tokens (one per 2x2 patches, deep features); boundaries need
the finer and shallower ViT features. Each captured block's map passes a 1x1 projection and a
small residual depthwise-conv branch (GroupNorm, GELU) whose scale starts near zero, so training
starts from the plain projection; the levels are fused, then the projected merged tokens
(upsampled to patch resolution) and a learned 2-D positional embedding are added.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen3vl_seg_ros.model.configuration import MaskDecoderConfig
from qwen3vl_seg_ros.model.vision_capture import VisionFeatures


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups that divide ``channels`` (works for tiny widths too)."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ResidualDepthwise(nn.Module):
    """x + scale * (1x1 . GELU . GroupNorm . depthwise 3x3)(x), scale initialised small."""

    def __init__(self, channels: int, init_scale: float) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm = group_norm(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1)
        self.scale = nn.Parameter(torch.full((channels, 1, 1), float(init_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.pointwise(F.gelu(self.norm(self.depthwise(x))))
        return x + self.scale * branch


class FeatureInjection(nn.Module):
    """Builds the memory map ``(B, dim, gh, gw)`` from :class:`VisionFeatures`."""

    def __init__(self, config: MaskDecoderConfig) -> None:
        super().__init__()
        dim = config.dim
        levels = len(config.vit_layers)
        self.projections = nn.ModuleList(nn.Conv2d(config.vit_dim, dim, 1) for _ in range(levels))
        self.refiners = nn.ModuleList(ResidualDepthwise(dim, config.residual_init) for _ in range(levels))
        self.fuse = nn.Conv2d(dim * levels, dim, 1)
        self.token_norm = nn.LayerNorm(config.visual_token_dim)
        self.token_projection = nn.Linear(config.visual_token_dim, dim)
        self.position = nn.Parameter(torch.randn(1, dim, config.pos_grid, config.pos_grid) * 0.02)
        self.out_norm = group_norm(dim)

    def forward(self, vision: VisionFeatures) -> torch.Tensor:
        if len(vision.vit_maps) != len(self.projections):
            raise ValueError(f"expected {len(self.projections)} ViT maps, got {len(vision.vit_maps)}")
        levels = [
            refine(project(x.to(project.weight.dtype)))
            for x, project, refine in zip(vision.vit_maps, self.projections, self.refiners)
        ]
        memory = self.fuse(torch.cat(levels, dim=1))
        size = memory.shape[-2:]
        tokens = vision.merged_map.to(memory.dtype).permute(0, 2, 3, 1)
        tokens = self.token_projection(self.token_norm(tokens)).permute(0, 3, 1, 2)
        memory = memory + F.interpolate(tokens, size=size, mode="nearest")
        position = F.interpolate(self.position, size=size, mode="bilinear", align_corners=False)
        return self.out_norm(memory + position)

"""Capturing the vision tower's features during the language model's own prefill.

The mask decoder needs features of several ViT blocks and the merged visual tokens that feed the
LLM. Running the vision tower a second time for them would double the most expensive part of a
frame, so forward hooks record them while the prefill runs the tower once.

Qwen3-VL's image processor emits patches in *block-major* order: for each 2x2 merge group (the
groups in raster order), its four patches in raster order. :func:`patches_to_raster` undoes that
to build 2-D feature maps; merged tokens (one per group) already come in raster order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VisionFeatures:
    """What the decoder reads from the vision tower, as 2-D maps of a batch of equal-size images."""

    vit_maps: list[torch.Tensor]  # per captured block: (B, C_vit, gh, gw), patch resolution
    merged_map: torch.Tensor  # (B, C_out, gh / merge, gw / merge), the tokens fed to the LLM

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.vit_maps[0].shape[-2]), int(self.vit_maps[0].shape[-1])


def patches_to_raster(tokens: torch.Tensor, grid_h: int, grid_w: int, merge: int) -> torch.Tensor:
    """Reorders one image's block-major patch tokens ``(gh*gw, C)`` into a map ``(C, gh, gw)``."""
    channels = tokens.shape[-1]
    blocks = tokens.reshape(grid_h // merge, grid_w // merge, merge, merge, channels)
    return blocks.permute(4, 0, 2, 1, 3).reshape(channels, grid_h, grid_w)


def merged_to_map(tokens: torch.Tensor, grid_h: int, grid_w: int, merge: int) -> torch.Tensor:
    """One image's merged tokens ``(gh*gw/merge^2, C)`` (raster order) as a map ``(C, h, w)``."""
    return tokens.reshape(grid_h // merge, grid_w // merge, -1).permute(2, 0, 1)


def _split_images(tokens: torch.Tensor, grid_thw: torch.Tensor, per_token: int) -> list[torch.Tensor]:
    sizes = [int(t * h * w) // per_token for t, h, w in grid_thw.tolist()]
    return list(torch.split(tokens, sizes))


def build_vision_features(
    block_outputs: list[torch.Tensor], merged: torch.Tensor, grid_thw: torch.Tensor, merge: int
) -> VisionFeatures:
    """Turns captured flat token tensors of a batch of images into :class:`VisionFeatures`.

    All images must have the same grid (resize them to one size for batched training).
    """
    grids = {(int(h), int(w)) for _, h, w in grid_thw.tolist()}
    if len(grids) != 1:
        raise ValueError(f"images of one batch must share a patch grid, got {sorted(grids)}")
    if any(int(t) != 1 for t in grid_thw[:, 0].tolist()):
        raise ValueError("only still images are supported (temporal grid 1)")
    (gh, gw), = grids
    vit_maps = [
        torch.stack([patches_to_raster(x, gh, gw, merge) for x in _split_images(out, grid_thw, 1)])
        for out in block_outputs
    ]
    merged_maps = torch.stack(
        [merged_to_map(x, gh, gw, merge) for x in _split_images(merged, grid_thw, merge * merge)]
    )
    return VisionFeatures(vit_maps=vit_maps, merged_map=merged_maps)


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision tower (``model.model.visual``) of a Qwen3-VL model or of its inner model."""
    inner = getattr(model, "model", model)
    visual = getattr(inner, "visual", None)
    if visual is None:
        raise TypeError(f"{type(model).__name__} has no Qwen3-VL vision tower (model.visual)")
    return visual


class VisionCapture:
    """Context manager recording vision features while a Qwen3-VL forward runs its vision tower.

    ``layers`` are the ViT block indices to record; the merger's output (the visual tokens given
    to the LLM) is always recorded. ``calls`` counts vision tower forwards seen, so callers can
    check that a frame used exactly one.
    """

    def __init__(self, model: nn.Module, layers: tuple[int, ...] | list[int], detach: bool = True) -> None:
        self.visual = vision_tower(model)
        depth = len(self.visual.blocks)
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"ViT layers {bad} out of range for a vision tower of depth {depth}")
        self.layers = tuple(layers)
        self.detach = detach
        self.merge = int(self.visual.spatial_merge_size)
        self.calls = 0
        self._blocks: dict[int, torch.Tensor] = {}
        self._merged: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach() if self.detach else tensor

    def __enter__(self) -> VisionCapture:
        for index in self.layers:
            block = self.visual.blocks[index]
            self._handles.append(block.register_forward_hook(self._block_hook(index)))
        self._handles.append(self.visual.merger.register_forward_hook(self._merger_hook))
        self._handles.append(self.visual.register_forward_pre_hook(self._count_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _block_hook(self, index: int) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._blocks[index] = self._keep(output)

        return hook

    def _merger_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._merged = self._keep(output)

    def _count_hook(self, module: nn.Module, args: tuple) -> None:
        self.calls += 1

    def features(self, grid_thw: torch.Tensor) -> VisionFeatures:
        """The recorded features as maps; ``grid_thw`` is the processor's ``image_grid_thw``."""
        if self._merged is None or len(self._blocks) != len(self.layers):
            raise RuntimeError("no vision features were captured: the forward ran no vision tower")
        blocks = [self._blocks[i] for i in self.layers]
        return build_vision_features(blocks, self._merged, grid_thw, self.merge)

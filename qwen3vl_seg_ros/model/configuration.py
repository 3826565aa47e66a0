"""Configuration of the box-guided mask decoder, saved as JSON next to its weights.

Input sizes (ViT width, captured blocks, LLM width, visual token width) follow the Qwen3-VL model
the decoder is attached to: :meth:`MaskDecoderConfig.for_qwen3vl` derives them from a
``Qwen3VLConfig``. The internal sizes default to the ~17M-parameter decoder for Qwen3-VL-4B;
``size="tiny"`` gives a few-thousand-parameter one for tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Written into the JSON so that a wrong file is recognised.
CONFIG_FORMAT = "qwen3vl_seg_mask_decoder"
CONFIG_VERSION = 1

#: Internal sizes by name; ``for_qwen3vl(size=...)`` picks one.
DECODER_SIZES: dict[str, dict[str, Any]] = {
    "base": dict(dim=256, num_heads=8, mlp_dim=2048, num_query_layers=3, llm_hidden_dim=2048,
                 stem_channels=(48, 96, 192), pixel_dim=96, pos_grid=32, fourier_freqs=16),
    "tiny": dict(dim=32, num_heads=2, mlp_dim=64, num_query_layers=1, llm_hidden_dim=32,
                 stem_channels=(8, 16, 16), pixel_dim=16, pos_grid=8, fourier_freqs=4),
}


@dataclass
class MaskDecoderConfig:
    """Sizes and constants of :class:`~qwen3vl_seg_ros.model.mask_decoder.BoxGuidedMaskDecoder`."""

    # inputs, from the Qwen3-VL model
    vit_dim: int = 1024  # width of the ViT blocks
    vit_layers: tuple[int, ...] = (5, 11, 17, 23)  # blocks whose output is injected
    visual_token_dim: int = 2560  # width of the merged visual tokens fed to the LLM
    llm_dim: int = 2560  # width of the LLM hidden state used as query
    merge_size: int = 2  # ViT patches per merged token, per side
    # internal sizes
    dim: int = 256
    num_heads: int = 8
    mlp_dim: int = 2048
    num_query_layers: int = 3  # transformer layers refining the query over the memory
    llm_hidden_dim: int = 2048  # hidden width of the LLM-state projection
    fourier_freqs: int = 16
    pos_grid: int = 32  # side of the learned 2-D positional embedding (resized to the image)
    stem_channels: tuple[int, int, int] = (48, 96, 192)  # CNN stem at strides 2, 4, 8
    pixel_dim: int = 96  # width of the stride-4 fused features = dynamic kernel size
    # constants
    box_enlarge: float = 0.15  # the gate opens on the box grown by this fraction of its size
    gate_softness: float = 0.05  # gate edge width, fraction of the enlarged box size
    residual_init: float = 1e-3  # initial scale of the injection's residual branches
    mask_bias_init: float = 0.25  # initial logit inside the box: untrained masks follow the box
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    max_image_side: int = 1024  # the raw image is downscaled to this before the CNN stem
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (training run, data)

    def __post_init__(self) -> None:
        self.vit_layers = tuple(int(i) for i in self.vit_layers)
        self.stem_channels = tuple(int(c) for c in self.stem_channels)  # type: ignore[assignment]
        self.image_mean = tuple(float(v) for v in self.image_mean)  # type: ignore[assignment]
        self.image_std = tuple(float(v) for v in self.image_std)  # type: ignore[assignment]
        self._check_sizes()
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if len(self.stem_channels) != 3:
            raise ValueError("stem_channels needs three widths (strides 2, 4, 8)")
        if not self.vit_layers:
            raise ValueError("vit_layers must name at least one ViT block")

    def _check_sizes(self) -> None:
        """A hand-edited JSON (num_heads 0, a negative width, "16" as a string) would otherwise fail
        deep inside torch as a ZeroDivisionError or TypeError that names no field."""
        sizes = ("vit_dim", "visual_token_dim", "llm_dim", "merge_size", "dim", "num_heads", "mlp_dim",
                 "num_query_layers", "llm_hidden_dim", "fourier_freqs", "pos_grid", "pixel_dim", "max_image_side")
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if any(c <= 0 for c in self.stem_channels) or any(i < 0 for i in self.vit_layers):
            raise ValueError(f"stem_channels must be positive and vit_layers >= 0, got {self.stem_channels} "
                             f"and {self.vit_layers}")

    @classmethod
    def for_qwen3vl(cls, qwen_config: Any, size: str = "base", **overrides: Any) -> MaskDecoderConfig:
        """Derives the input sizes from a ``Qwen3VLConfig``; ``overrides`` set any field.

        The injected blocks are Qwen3-VL's deepstack blocks plus the last one, i.e. the
        intermediate layers the model itself found worth feeding to the LLM.
        """
        if size not in DECODER_SIZES:
            raise ValueError(f"unknown decoder size {size!r}; known: {sorted(DECODER_SIZES)}")
        vision, text = qwen_config.vision_config, qwen_config.text_config
        layers = sorted({*(int(i) for i in vision.deepstack_visual_indexes), int(vision.depth) - 1})
        values = dict(
            vit_dim=vision.hidden_size, vit_layers=tuple(layers), visual_token_dim=vision.out_hidden_size,
            llm_dim=text.hidden_size, merge_size=vision.spatial_merge_size, **DECODER_SIZES[size],
        )
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaskDecoderConfig:
        """Reads :meth:`to_dict`'s output; refuses other files and unknown fields."""
        data = dict(data)
        if data.pop("format", None) != CONFIG_FORMAT:
            raise ValueError(f"not a mask decoder configuration (no \"format\": \"{CONFIG_FORMAT}\")")
        version = data.pop("version", None)
        if version != CONFIG_VERSION:
            raise ValueError(f"mask decoder configuration version {version} is not supported "
                             f"(this package reads version {CONFIG_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown mask decoder configuration fields: {unknown}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> MaskDecoderConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

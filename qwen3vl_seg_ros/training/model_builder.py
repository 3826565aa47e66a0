"""The model a run trains: base checkpoint, mask decoder, LoRA, trainable parts, and export.

A run starts from a *base folder* in the Hugging Face layout: a real Qwen3-VL checkpoint (folder
or hub id), or, for ``base: tiny``, a randomly initialised Qwen3-VL with the task tokenizer that
:func:`~qwen3vl_seg_ros.model.tiny.build_tiny_checkpoint` writes into the run folder. Either way
the model and processor are then read by the production loaders, so training and inference see
the same tokenizer, chat template and image processor.

The exported folder (:func:`export_model`) is a combined Qwen3-VL-Seg checkpoint: it loads with
``Qwen3VLSeg.from_options(SegmenterOptions(model=folder))``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwen3vl_seg_ros.grounding import SEG_TOKEN
from qwen3vl_seg_ros.model.checkpoint import (
    DECODER_CONFIG,
    DECODER_WEIGHTS,
    has_decoder_file,
    load_decoder,
    save_decoder,
)
from qwen3vl_seg_ros.model.configuration import MaskDecoderConfig
from qwen3vl_seg_ros.model.mask_decoder import BoxGuidedMaskDecoder
from qwen3vl_seg_ros.model.token_choice import number_token_ids

#: LoRA targets: the language model's attention and MLP projections (not the vision tower's).
LLM_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
#: Files of a base folder that are weights or model configuration, i.e. not processor files.
_MODEL_FILES = re.compile(r".*\.safetensors$|.*\.safetensors\.index\.json$|^config\.json$|^generation_config\.json$")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelConfig:
    """The ``model`` section of a training configuration."""

    base: str = "tiny"  # "tiny" (new model from `sizes`), or a Qwen3-VL checkpoint folder / hub id
    sizes: dict[str, Any] = field(default_factory=dict)  # tiny: keys of model.tiny.TINY_SIZES
    decoder: dict[str, Any] = field(default_factory=lambda: {"size": "tiny"})  # for_qwen3vl(size=..., **rest)
    number_embedding_init: bool = True  # tiny: number tokens start with embeddings smooth in their value
    vision_position_init: bool = True  # tiny: the ViT's learned positions start as 2-D sines of the image x, y
    export_dtype: str = "fp32"  # dtype of the exported Qwen3-VL weights ("bf16" halves the folder)
    grow_text_layers: int = 0  # language-model layers appended to the base, each starting as the identity
    image_pixels: list[int] = field(default_factory=list)  # [min, max] pixels of a resized frame; []: the base's
    local_files_only: bool = True  # hub ids: only the local cache

    def __post_init__(self) -> None:
        if self.export_dtype not in _DTYPES:
            raise ValueError(f"model.export_dtype must be one of {sorted(_DTYPES)}, got {self.export_dtype!r}")
        self._check_sizes()
        self.decoder = dict(self.decoder)
        self.decoder.setdefault("size", "tiny")
        if self.grow_text_layers < 0:
            raise ValueError(f"model.grow_text_layers must be 0 or more, got {self.grow_text_layers}")
        self.image_pixels = [int(v) for v in self.image_pixels]
        if self.image_pixels and (len(self.image_pixels) != 2 or not 0 < self.image_pixels[0] <= self.image_pixels[1]):
            raise ValueError(f"model.image_pixels must be [min, max] with 0 < min <= max, got {self.image_pixels}")

    def _check_sizes(self) -> None:
        """``sizes`` and ``decoder`` keys by name: a typo there failed as a traceback once the
        model was being built (or, for ``decoder: tiny``, named no key at all)."""
        from qwen3vl_seg_ros.model.configuration import DECODER_SIZES
        from qwen3vl_seg_ros.model.tiny import TINY_SIZES

        for name, value, known in (("sizes", self.sizes, set(TINY_SIZES)),
                                   ("decoder", self.decoder, {"size"} | {f.name for f in fields(MaskDecoderConfig)})):
            if not isinstance(value, Mapping):
                raise ValueError(f"model.{name} must be a mapping of its keys, got {value!r}")
            unknown = sorted(set(value) - known, key=str)
            if unknown:
                raise ValueError(f"model.{name}: unknown keys {unknown}; known: {sorted(known)}")
        size = self.decoder.get("size", "tiny")
        if size not in DECODER_SIZES:
            raise ValueError(f"model.decoder.size must be one of {sorted(DECODER_SIZES)}, got {size!r}")

    @property
    def from_scratch(self) -> bool:
        return self.base == "tiny"


@dataclass
class LoraSettings:
    """LoRA of a stage (peft)."""

    r: int = 32
    alpha: float = 64  # peft scales by alpha / r; a fraction is fine
    dropout: float = 0.05
    target_modules: str = LLM_LORA_TARGETS


# ---------------------------------------------------------------------------------------------
# building


def prepare_base(cfg: ModelConfig, run_dir: Path, seed: int) -> Path:
    """The base folder: built once into ``run_dir/base`` for a tiny model (kept for resuming)."""
    if cfg.from_scratch:
        from qwen3vl_seg_ros.model.tiny import build_tiny_checkpoint

        folder = run_dir / "base"
        if not (folder / "config.json").is_file():
            build_tiny_checkpoint(folder, decoder=False, seed=seed, answer=None, **cfg.sizes)
        return folder
    from qwen3vl_seg_ros.model.loading import resolve_model_folder

    return resolve_model_folder(cfg.base, cfg.local_files_only)


def tied_embeddings(model: nn.Module) -> bool:
    """Whether the output projection is the input embedding table (2B and 4B; 8B is untied)."""
    output = model.get_output_embeddings()
    return output is not None and output.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def ensure_seg_token(model: nn.Module, tokenizer: Any) -> bool:
    """Adds ``<|seg|>`` to a tokenizer that lacks it (a plain Qwen3-VL-Instruct); returns whether
    the tokenizer changed (it must then be saved with the model).

    A real checkpoint's embedding table has spare rows past its tokenizer (151,936 for 151,669
    tokens), so the new id usually has a row already; the table grows only when it has none (it
    never shrinks: shrinking to the tokenizer's length dropped those rows). The row, never
    trained, starts as the mean of the known tokens' rows (and so does an untied output row),
    a neutral start that :func:`apply_lora`'s ``trainable_tokens`` then trains in a LoRA stage.
    """
    if SEG_TOKEN in tokenizer.get_vocab():
        return False
    from transformers import AddedToken

    # add_tokens(special) is the same call in transformers 4 and 5 (add_special_tokens' keyword
    # for keeping the other extra tokens was renamed in 5, and crashed here)
    tokenizer.add_tokens([AddedToken(SEG_TOKEN, special=True, normalized=False)], special_tokens=True)
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
    if seg_id >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(seg_id + 1, mean_resizing=False)
    tables = [model.get_input_embeddings()]
    if model.get_output_embeddings() is not None and not tied_embeddings(model):
        tables.append(model.get_output_embeddings())
    with torch.no_grad():
        for table in tables:
            table.weight[seg_id] = table.weight[:seg_id].mean(0)
    return True


def build_decoder(cfg: ModelConfig, base_folder: Path, model: nn.Module) -> BoxGuidedMaskDecoder:
    """The base folder's decoder when it has one (half of one is an error), else a new one."""
    if has_decoder_file(base_folder):
        return load_decoder(base_folder).float().train()
    options = dict(cfg.decoder)
    size = options.pop("size", "tiny")
    return BoxGuidedMaskDecoder(MaskDecoderConfig.for_qwen3vl(model.config, size=size, **options))


def load_base(cfg: ModelConfig, base_folder: Path) -> tuple[nn.Module, Any, BoxGuidedMaskDecoder, bool]:
    """Model (fp32, CPU), processor, decoder and whether the tokenizer changed, via the production
    loaders: a truncated base checkpoint is refused, not trained on top of random layers."""
    from qwen3vl_seg_ros.model.loading import check_qwen3vl_folder, load_processor, load_qwen3vl

    check_qwen3vl_folder(base_folder)  # first: "not a model folder" rather than a processor error
    processor = load_processor(base_folder)
    model = load_qwen3vl(base_folder, torch.device("cpu"), torch.float32)
    changed = ensure_seg_token(model, processor.tokenizer)
    grow_text_layers(model, cfg.grow_text_layers)
    if cfg.image_pixels:
        set_image_pixels(processor.image_processor, cfg.image_pixels)
    decoder = build_decoder(cfg, base_folder, model)
    return model, processor, decoder, changed


def grow_text_layers(model: nn.Module, count: int) -> None:
    """Appends ``count`` decoder layers to the language model, each the identity at first.

    Why: a trained model that looks too small should not have to start again from scratch. From
    round 3 on, five rounds of fresh data left the tiny model's training token accuracy at
    0.68-0.70, and after round 9 a fifth of the single targets named by colour were answered
    with an object of another colour, although the visual tokens held the colour. Growing keeps
    what the model learnt: a new layer's attention output and MLP down projections start at
    zero, so it adds nothing to the residual stream until training moves them (block expansion,
    as LLaMA Pro grows a trained model). The configuration's layer count grows with it, so the
    export loads as an ordinary deeper Qwen3-VL. Round 10 grew the tiny model from 3 to 5
    layers; in 59k samples it did not ground better (docs/training.md).
    """
    if count <= 0:
        return
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer

    language_model = model.model.language_model
    config = language_model.config
    if getattr(config, "layer_types", None):
        raise ValueError("model.grow_text_layers supports full-attention models without per-layer types")
    for _ in range(count):
        layer = Qwen3VLTextDecoderLayer(config, len(language_model.layers))
        layer.apply(model._init_weights)
        nn.init.zeros_(layer.self_attn.o_proj.weight)
        nn.init.zeros_(layer.mlp.down_proj.weight)
        language_model.layers.append(layer.to(next(language_model.parameters()).dtype))
    config.num_hidden_layers = len(language_model.layers)  # the model's text_config: the export's


def set_image_pixels(image_processor: Any, pixels: Sequence[int]) -> None:
    """Makes the image processor resize every frame to between ``pixels[0]`` and ``pixels[1]`` pixels.

    Why: at 256x192 a merged visual token covers 32x32 pixels, about a whole object, and the tiny
    tower learns an object's shape from its four 16-pixel patches far more slowly than a CNN does
    from the same pixels (docs/training.md). Upscaling the frame (``[196608, 196608]``: 512x384)
    spreads an object over 4 times the tokens without changing a weight: the ViT's learned
    positions are interpolated to the larger grid, the language model's rotary positions extend.
    The export writes these limits into its processor files, so the node resizes frames the same way.
    """
    image_processor.size = _size_limits(pixels)


def _size_limits(pixels: Sequence[int]) -> dict[str, int]:
    """The Qwen2-VL image processor's ``size`` for frames of ``pixels[0]`` to ``pixels[1]`` pixels."""
    return {"shortest_edge": int(pixels[0]), "longest_edge": int(pixels[1])}


def write_image_pixels(folder: Path, pixels: Sequence[int]) -> None:
    """Stores the limits of :func:`set_image_pixels` in a model folder's ``preprocessor_config.json``."""
    path = Path(folder) / "preprocessor_config.json"
    config = json.loads(path.read_text())
    config["size"] = _size_limits(pixels)
    config.pop("min_pixels", None)
    config.pop("max_pixels", None)
    path.write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def init_number_embeddings(model: nn.Module, tokenizer: Any) -> bool:
    """Gives the coordinate tokens "0".."1000" embeddings that vary smoothly with their value.

    A box is written as four of these tokens. With random embeddings the model must learn that
    417 lies between 416 and 418 separately for every value; with sine/cosine features of the
    value (wavelengths from 4 to 2000 units) neighbours start similar, for the input embedding
    and, tied to it, for the output head, so an error of one unit costs little from the start.
    Returns False (nothing done) when numbers are not single tokens.
    """
    ids = number_token_ids(tokenizer)
    if ids is None:
        return False
    weight = model.get_input_embeddings().weight
    features = sine_features(torch.arange(1001), weight.shape[1], shortest=4.0)
    scale = weight.float().std().item() / features.std().item()
    weight[torch.tensor(ids)] = (features * scale).to(weight.dtype)
    return True


def sine_features(values: torch.Tensor, channels: int, shortest: float) -> torch.Tensor:
    """``(N, channels)`` float64 sines and cosines of values in 0..1000 units, wavelengths 2000 down to
    ``shortest`` (geometric); a last zero column when ``channels`` is odd."""
    half = channels // 2
    wavelengths = torch.exp(torch.linspace(math.log(2000.0), math.log(shortest), half, dtype=torch.float64))
    angles = 2 * math.pi * values.double()[:, None] / wavelengths
    features = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(features, (0, channels - 2 * half))


@torch.no_grad()
def init_vision_positions(model: nn.Module) -> bool:
    """Starts the vision tower's learned position table as sines of each cell's image x and y.

    Why: a box is read off the visual token that shows the object, so that token must say where
    it is. With the default near-zero random table, position is a faint part of each token and a
    small model trained from scratch never learns to localise (seen: after 30k samples its
    coordinates did not depend on the image at all, and the visual tokens had collapsed onto one
    large constant direction). Sines of x and y in the 0..1000 units of the answer's numbers
    (half the channels each, wavelengths from 2000 units down to 2.5 table cells, shorter ones
    would alias on the table), scaled to the patch embedding's output, give every token a clear
    absolute position from the first step.
    The table is ``side x side`` cells that the model interpolates onto the patch grid, cell
    ``(r, c)`` landing at ``c / (side - 1)`` of the width. Returns False when the tower has no such
    table (nothing done). Only for models built from scratch: a pretrained table is kept.
    """
    visual = model.model.visual
    table = getattr(visual, "pos_embed", None)
    if not isinstance(table, nn.Embedding):
        return False
    count, dim = table.weight.shape
    side = math.isqrt(count)
    if side * side != count or side < 2 or dim < 4:
        return False
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    x = cols.flatten() * (1000.0 / (side - 1))
    y = rows.flatten() * (1000.0 / (side - 1))
    half = dim // 2
    shortest = 2.5 * 1000.0 / (side - 1)
    features = torch.cat([sine_features(x, half, shortest), sine_features(y, dim - half, shortest)], dim=1)
    proj = visual.patch_embed.proj
    fan_in = proj.weight[0].numel()
    patch_std = proj.weight.float().std().item() * math.sqrt(fan_in) * 0.5  # output std for inputs of std 0.5
    scale = patch_std / features.std().item()
    table.weight.copy_((features * scale).to(table.weight.dtype))
    return True


# ---------------------------------------------------------------------------------------------
# trainable parts


def vision_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if ".visual." in f".{n}."]


def language_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if ".visual." not in f".{n}."]


def lora_targets(model: nn.Module, pattern: str) -> list[str]:
    """The linear layers a LoRA ``target_modules`` pattern selects, as peft selects them (a
    string: the whole module name must match)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and re.fullmatch(pattern, name)]


def apply_lora(model: nn.Module, lora: LoraSettings, trainable_tokens: Sequence[int] = ()) -> nn.Module:
    """Wraps the language model's projections with LoRA adapters (peft), in place.

    The vision tower and the rest are left as they are; the caller sets what else trains.
    ``trainable_tokens``: token ids whose embedding rows train too (peft's trainable tokens):
    a ``<|seg|>`` just added to a real checkpoint, which would otherwise keep its starting row
    through the whole LoRA stage, as every embedding outside the adapters does. Returns the
    ``PeftModel`` (needed to merge); ``model`` itself keeps working and now runs the adapters.
    """
    from peft import LoraConfig, get_peft_model

    extra: dict[str, Any] = {}
    if trainable_tokens:
        ids = sorted(int(t) for t in trainable_tokens)
        extra["trainable_token_indices"] = {"embed_tokens": ids}
        output = model.get_output_embeddings()
        if output is not None and not tied_embeddings(model):
            # untied (8B): the output row is what makes the model write the token
            name = next(n for n, module in model.named_modules() if module is output)
            extra["trainable_token_indices"][name.rsplit(".", 1)[-1]] = ids
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, bias="none", **extra)
    return get_peft_model(model, config)


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Folds the adapters into the weights and removes them; returns the plain model."""
    return peft_model.merge_and_unload()


def is_lora(model: nn.Module) -> bool:
    return any("lora_" in n for n, _ in model.named_parameters())


def name_scale(name: str, lr_scales: Mapping[str, float]) -> float:
    """The factor of the first pattern of ``lr_scales`` that ``re.search`` finds in ``name`` (1 if none).

    Why: some parameters need their own pace, e.g. the attention's query and key projections of
    the layers that must learn which object a word names (docs/training.md, "Round 14"), and a
    scale of 0 freezes everything else for a focused run.
    """
    for pattern, scale in lr_scales.items():
        if re.search(pattern, name):
            return float(scale)
    return 1.0


def _named_parts(model: nn.Module, decoder: nn.Module) -> list[tuple[str, list[tuple[str, nn.Parameter]]]]:
    """The three parts that train at their own rate; decoder names get a ``decoder.`` prefix so
    that an ``lr_scales`` pattern can tell them apart."""
    return [("llm", language_parameters(model)), ("vision", vision_parameters(model)),
            ("decoder", [(f"decoder.{n}", p) for n, p in decoder.named_parameters()])]


def set_trainable(model: nn.Module, decoder: nn.Module, llm: str, vision_lr_scale: float,
                  lr_scales: Mapping[str, float] | None = None) -> None:
    """``llm``: "full", "lora" (only adapters) or "frozen"; the vision tower trains when its LR
    scale is above 0; the decoder always trains. Parameters that ``lr_scales`` scales by 0 are
    frozen whatever their part says."""
    lora = is_lora(model)
    for name, p in language_parameters(model):
        adapter = "lora_" in name or "trainable_tokens_" in name
        if llm == "lora":
            p.requires_grad_(adapter)
        else:
            p.requires_grad_(llm == "full" and not (lora and adapter))
    for _, p in vision_parameters(model):
        p.requires_grad_(vision_lr_scale > 0)
    for p in decoder.parameters():
        p.requires_grad_(True)
    if lr_scales:
        for _, named in _named_parts(model, decoder):
            for name, p in named:
                if name_scale(name, lr_scales) == 0:
                    p.requires_grad_(False)


def _decays(name: str, p: nn.Parameter) -> bool:
    """Weight decay on matrices and kernels; not on biases, norms, scales or embeddings (the
    token, position and patch embeddings: any name with "embed" or "position", so the ViT's
    patch-embedding kernel too)."""
    return p.ndim >= 2 and "embed" not in name and "position" not in name


def parameter_groups(model: nn.Module, decoder: nn.Module, lr: float, weight_decay: float,
                     vision_lr_scale: float, decoder_lr_scale: float,
                     lr_scales: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """AdamW groups (LLM / vision / decoder x decay / no decay x ``lr_scales`` factor) of the
    trainable parameters.

    Each group keeps its ``lr_scale`` (the part's scale times the name's factor) so that the
    schedule sets ``lr = base_lr(step) * lr_scale``.
    """
    part_scale = {"llm": 1.0, "vision": vision_lr_scale, "decoder": decoder_lr_scale}
    lr_scales = lr_scales or {}
    groups = []
    for part, named in _named_parts(model, decoder):
        buckets: dict[tuple[bool, float], list[nn.Parameter]] = {}
        for n, p in named:
            if p.requires_grad:
                buckets.setdefault((_decays(n, p), name_scale(n, lr_scales)), []).append(p)
        for (decay, factor), params in sorted(buckets.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
            scale = part_scale[part] * factor
            suffix = "" if factor == 1.0 else f" x{factor:g}"
            groups.append({"name": f"{part}/{'decay' if decay else 'no_decay'}{suffix}", "params": params,
                           "lr": lr * scale, "lr_scale": scale,
                           "weight_decay": weight_decay if decay else 0.0})
    return groups


# ---------------------------------------------------------------------------------------------
# export


def copy_processor_files(source: Path, target: Path) -> None:
    """Tokenizer, chat template and image/video processor files of a model folder."""
    for path in source.iterdir():
        if path.is_file() and not _MODEL_FILES.match(path.name) and path.name not in (DECODER_WEIGHTS, DECODER_CONFIG):
            shutil.copy2(path, target / path.name)


def export_model(model: nn.Module, decoder: BoxGuidedMaskDecoder, base_folder: Path, tokenizer: Any,
                 tokenizer_changed: bool, folder: Path, dtype: str = "fp32",
                 info: dict[str, Any] | None = None, image_pixels: Sequence[int] = ()) -> Path:
    """Writes a combined Qwen3-VL-Seg folder (model, processor, decoder) that the production
    loader reads; written next to ``folder`` and swapped in, so a reader never sees half of it.

    The model must have no LoRA adapters (merge first). ``dtype`` applies to the Qwen3-VL
    weights; the decoder is kept in float32 (small, and its thresholds are sensitive).
    ``image_pixels`` (``[min, max]``), when given, replaces the base's frame-size limits.
    """
    if is_lora(model):
        raise ValueError("merge the LoRA adapters before exporting")
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    target = _DTYPES[dtype]
    state = {k: v.detach().to("cpu", target if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    if tied_embeddings(model):
        # tied: the loader ties them again; the copy cost 621 MB (2B, bf16) in every export
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    copy_processor_files(base_folder, tmp)
    if image_pixels:
        write_image_pixels(tmp, image_pixels)
    if tokenizer_changed:
        tokenizer.save_pretrained(tmp)
    decoder.config.extra = dict(info or {})
    save_decoder(decoder.float(), tmp)
    if info:
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    sync_folder(tmp)
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    sync_folder(folder.parent, files=False)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def sync_folder(folder: Path, files: bool = True) -> None:
    """Flushes a folder's files (and the folder's own entries) to the disk.

    Why: the swap of a checkpoint renames folders whose files may still sit in the page cache; a
    power cut (a robot's battery, a pulled plug) then leaves the new name holding empty files,
    and --resume fails on them. A killed process does not need this; a machine that stops does.
    """
    if files:
        for path in folder.iterdir():
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_size_mb(folder: Path, pattern: str = "*.safetensors") -> float:
    return sum(p.stat().st_size for p in Path(folder).glob(pattern)) / 1e6

"""Decoder checkpoints: ``mask_decoder.safetensors`` + ``mask_decoder_config.json`` in a folder.

A decoder folder holds just these two files. A *combined* folder is a Qwen3-VL checkpoint
folder with the two files next to the model's own files (not in a subfolder), so that one hub
repository or one directory carries a whole Qwen3-VL-Seg model. Weights are read with
safetensors only; pickle-based formats are refused, never unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qwen3vl_seg_ros.model.configuration import MaskDecoderConfig
from qwen3vl_seg_ros.model.mask_decoder import BoxGuidedMaskDecoder

DECODER_WEIGHTS = "mask_decoder.safetensors"
DECODER_CONFIG = "mask_decoder_config.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class DecoderCheckpointError(ValueError):
    """A decoder checkpoint is missing, incomplete, or in a refused format."""


def has_decoder(folder: str | Path) -> bool:
    """Whether ``folder`` holds a decoder checkpoint (both files)."""
    folder = Path(folder)
    return (folder / DECODER_WEIGHTS).is_file() and (folder / DECODER_CONFIG).is_file()


def has_decoder_file(folder: str | Path) -> bool:
    """Whether ``folder`` holds either decoder file: such a folder is loaded as a decoder, so that
    half of one is an error naming the missing file, not a silent switch to another mask head."""
    folder = Path(folder)
    return (folder / DECODER_WEIGHTS).exists() or (folder / DECODER_CONFIG).exists()


def save_decoder(decoder: BoxGuidedMaskDecoder, folder: str | Path) -> Path:
    """Writes the decoder's weights and configuration into ``folder`` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in decoder.state_dict().items()}
    save_file(tensors, str(folder / DECODER_WEIGHTS), metadata={"format": "pt"})
    decoder.config.save(folder / DECODER_CONFIG)
    return folder


def _check_folder(folder: Path) -> None:
    if folder.is_file():
        if folder.suffix in _PICKLE_SUFFIXES:
            raise DecoderCheckpointError(
                f"{folder} is a pickle-based file; only safetensors decoder checkpoints are loaded "
                f"(a folder with {DECODER_WEIGHTS} and {DECODER_CONFIG})")
        raise DecoderCheckpointError(f"{folder} is a file; give the folder holding {DECODER_WEIGHTS}")
    if not folder.is_dir():
        raise DecoderCheckpointError(f"decoder folder {folder} does not exist")
    missing = [name for name in (DECODER_WEIGHTS, DECODER_CONFIG) if not (folder / name).is_file()]
    if missing:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = f"; found {pickles}, which are not loaded (convert them to safetensors)" if pickles else ""
        raise DecoderCheckpointError(f"decoder folder {folder} lacks {', '.join(missing)}{hint}")


#: How a Git LFS pointer file begins: what a model repository cloned without git-lfs holds in
#: place of each weight file (a few hundred bytes of text).
_LFS_POINTER = b"version https://git-lfs"


def lfs_pointer_note(path: Path) -> str:
    """A note for an error message when ``path`` is a Git LFS pointer, else "": the most common
    reason a weight file is not a safetensors file (a clone without git-lfs)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LFS_POINTER))
    except OSError:
        return ""
    if head != _LFS_POINTER:
        return ""
    return (f"; {path.name} is a Git LFS pointer, not the weights: run `git lfs install && git lfs pull` "
            f"in the model's repository, or download it with `hf download`")


def load_decoder(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> BoxGuidedMaskDecoder:
    """Builds the decoder from a checkpoint folder, in eval mode on ``device`` and ``dtype``.

    All weights must match the configuration exactly: a missing or extra tensor is an error,
    not a silently random layer.
    """
    folder = Path(folder)
    _check_folder(folder)
    try:
        config = MaskDecoderConfig.load(folder / DECODER_CONFIG)
    except (ValueError, TypeError) as exc:
        raise DecoderCheckpointError(f"{folder / DECODER_CONFIG}: {exc}") from exc
    try:
        decoder = BoxGuidedMaskDecoder(config)
    except (ValueError, TypeError, RuntimeError) as exc:  # sizes torch refuses, e.g. far too large
        raise DecoderCheckpointError(f"{folder / DECODER_CONFIG}: cannot build the decoder: {exc}") from exc
    try:
        state = load_file(str(folder / DECODER_WEIGHTS), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:  # e.g. a pickle renamed to .safetensors
        raise DecoderCheckpointError(
            f"{folder / DECODER_WEIGHTS} is not a valid safetensors file ({exc}); only safetensors "
            f"decoder checkpoints are loaded{lfs_pointer_note(folder / DECODER_WEIGHTS)}") from exc
    try:
        decoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DecoderCheckpointError(f"{folder / DECODER_WEIGHTS} does not fit its configuration: {exc}") from exc
    return decoder.to(device=device, dtype=dtype).eval()

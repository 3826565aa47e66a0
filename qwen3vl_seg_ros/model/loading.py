"""Finding and loading a Qwen3-VL checkpoint: folder or hub id, processor, model, device, dtype.

Everything is read from a local folder. A hub id is first resolved to a folder of the local
Hugging Face cache (``local_files_only``) or downloaded into it; a missing model is one
:class:`~qwen3vl_seg_ros.types.SegmenterError` naming what is missing and how to supply it.
Only safetensors weights are fetched and loaded, and remote code is never trusted.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoProcessor, ProcessorMixin, Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

from qwen3vl_seg_ros.model.checkpoint import DECODER_WEIGHTS, lfs_pointer_note
from qwen3vl_seg_ros.types import SegmenterError

PACKAGE = "qwen3vl_seg_ros"
#: The shipped demo model, under the repository root or the package's share folder.
DEMO_MODEL = Path("models") / "tiny_qwen3vl_seg"
#: Files fetched from a hub repository: configs, safetensors weights, tokenizer data; never code.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def demo_model_candidates() -> list[Path]:
    """Where the shipped demo model may be: the source tree, then each ament prefix's share."""
    candidates = [Path(__file__).resolve().parents[2] / DEMO_MODEL]
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            candidates.append(Path(prefix) / "share" / PACKAGE / DEMO_MODEL)
    return candidates


def default_model_folder() -> Path:
    """The shipped demo model's folder, or a :class:`SegmenterError` saying where it was sought."""
    for candidate in demo_model_candidates():
        if (candidate / "config.json").is_file():
            return candidate
    searched = ", ".join(str(c) for c in demo_model_candidates())
    raise SegmenterError(
        "no model given and the shipped demo model is missing (looked in " + searched + "). "
        "Set the 'model' parameter to a Qwen3-VL checkpoint folder or hub id "
        "(e.g. Qwen/Qwen3-VL-4B-Instruct), or build a tiny demo model with "
        "qwen3vl_seg_ros.model.tiny.build_tiny_checkpoint('models/tiny_qwen3vl_seg')."
    )


def training_frame_size(folder: str | Path) -> tuple[int, int] | None:
    """(width, height) of the frames a checkpoint of ours was trained on, from its training_info.json.

    Why: a small model trained at one resolution is judged fairly only at that resolution, so
    evaluation defaults to it. Older exports only have ``"data": "synthetic 256x192"``; None when
    the folder has no such record (a real Qwen3-VL checkpoint).
    """
    try:
        info = json.loads((Path(folder) / "training_info.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(info.get("image_width"), int) and isinstance(info.get("image_height"), int):
        return info["image_width"], info["image_height"]
    match = re.search(r"(\d+)x(\d+)$", str(info.get("data", "")))
    return (int(match[1]), int(match[2])) if match else None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?$")


def resolve_model_folder(spec: str, local_files_only: bool = True) -> Path:
    """A local folder for ``spec``: "" (demo model), a folder, or a hub id ("org/name")."""
    spec = spec.strip()
    if not spec:
        return default_model_folder()
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not _HUB_ID.match(spec):
        raise SegmenterError(f"model folder '{spec}' does not exist (or is not a folder)")
    return _hub_snapshot(spec, local_files_only)


def _hub_snapshot(repo_id: str, local_files_only: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, local_files_only=local_files_only, allow_patterns=_HUB_PATTERNS)
    except Exception as exc:
        if local_files_only:
            raise SegmenterError(
                f"model '{repo_id}' is neither a local folder nor in the local Hugging Face cache, and "
                f"local_files_only is set, so nothing is downloaded. Download it once where there is network "
                f"(hf download {repo_id}) and copy the cache (HF_HOME), set 'model' to a local folder, "
                f"or set the parameter local_files_only to false (params file, or -p local_files_only:=false "
                f"with ros2 run; it is no launch argument). ({type(exc).__name__})"
            ) from exc
        raise SegmenterError(f"could not download model '{repo_id}': {exc}") from exc
    return Path(folder)


def check_qwen3vl_folder(folder: Path) -> None:
    """Fails clearly for a folder that is not a Qwen3-VL checkpoint or has no safetensors."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise SegmenterError(f"'{folder}' has no config.json: it is not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SegmenterError(f"'{config_path}' is not readable JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise SegmenterError(f"'{config_path}' holds a JSON {type(config).__name__}, not a model config object")
    model_type = config.get("model_type")
    if model_type != "qwen3_vl":
        raise SegmenterError(f"'{folder}' holds a '{model_type}' model; a Qwen3-VL (qwen3_vl) one is needed")
    if not any(path.name != DECODER_WEIGHTS for path in folder.glob("*.safetensors")):
        pickles = sorted(path.name for path in folder.glob("*.bin")) + sorted(path.name for path in folder.glob("*.pt"))
        found = f" ({', '.join(pickles[:3])} found: pickle files, which are never loaded)" if pickles else ""
        raise SegmenterError(f"'{folder}' has no .safetensors weights for the model{found}; "
                             "convert the checkpoint to safetensors")
    if (folder / "adapter_config.json").is_file():
        # transformers would apply it inside from_pretrained, unmerged, under a decoder and a
        # score calibration fitted without it (and the GPU fast path turns off for it)
        raise SegmenterError(f"'{folder}' holds a PEFT adapter (adapter_config.json): this node loads merged "
                             "checkpoints only; merge it into the weights (peft's merge_and_unload, or this "
                             "package's training export) and remove adapter_config.json")


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """A ``Qwen3VLProcessor`` without its video processor, whose class needs torchvision.

    Used only when ``AutoProcessor`` cannot build the full processor for that reason; images are
    processed by the same Qwen3-VL image processor either way.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:
        ids = tokenizer.convert_tokens_to_ids
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or ids(self.image_token)
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.vision_start_token = getattr(tokenizer, "vision_start_token", None) or "<|vision_start|>"
        self.vision_end_token = getattr(tokenizer, "vision_end_token", None) or "<|vision_end|>"
        self.vision_start_token_id = ids(self.vision_start_token)
        self.vision_end_token_id = ids(self.vision_end_token)


def _read_processor(folder: Path) -> ProcessorMixin:
    try:
        return AutoProcessor.from_pretrained(folder, local_files_only=True)
    except ImportError as exc:
        if "torchvision" not in str(exc).lower():
            raise
    return ImageOnlyQwen3VLProcessor.from_pretrained(folder, local_files_only=True)


def load_processor(folder: Path, image_max_pixels: int = 0) -> ProcessorMixin:
    """The checkpoint's processor; ``image_max_pixels`` > 0 lowers/raises its resize limit."""
    try:
        processor = _read_processor(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise SegmenterError(
            f"cannot load the processor (tokenizer, image processor, chat template) from '{folder}': {exc}"
        ) from exc
    if not getattr(processor, "chat_template", None):  # else every command fails at apply_chat_template
        # older exports keep it in tokenizer_config.json only, which the processor does not read
        processor.chat_template = getattr(processor.tokenizer, "chat_template", None)
    if not processor.chat_template:
        raise SegmenterError(f"'{folder}' has no chat template (chat_template.jinja or chat_template.json, or "
                             "'chat_template' in tokenizer_config.json): copy it from the base checkpoint")
    if image_max_pixels > 0:
        size = processor.image_processor.size  # a dict or a SizeDict, by version and backend
        shortest = size.get("shortest_edge") if isinstance(size, Mapping) else getattr(size, "shortest_edge", 0)
        processor.image_processor.size = {
            "shortest_edge": min(int(shortest or 0), int(image_max_pixels)),
            "longest_edge": int(image_max_pixels),
        }
    return processor


def resolve_device(name: str) -> torch.device:
    name = (name or "auto").strip().lower()  # as dtype: "CUDA:0" means what "cuda:0" does
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SegmenterError(f"device '{name}' is not understood; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SegmenterError(f"device '{name}' was asked for but CUDA is not available here; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SegmenterError(f"device '{name}' does not exist ({torch.cuda.device_count()} GPUs)")
    elif device.type != "cpu":
        raise SegmenterError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    name = (name or "auto").strip().lower()
    if name == "auto":
        if device.type == "cuda":
            # bf16 where the GPU computes it natively (compute capability 8.0 on: Ampere, Hopper,
            # Jetson Orin); torch.cuda.is_bf16_supported() is also true where it is emulated, slowly
            # (V100, T4, Jetson Xavier), and asks the current device, not the one requested.
            return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
        return torch.float32
    if name not in _DTYPES:
        raise SegmenterError(f"dtype '{name}' is not supported; use auto, fp32, bf16 or fp16")
    if name == "fp16" and device.type == "cpu":
        raise SegmenterError("dtype fp16 is not supported on the CPU; use fp32 or bf16")
    return _DTYPES[name]


def load_qwen3vl(folder: Path, device: torch.device, dtype: torch.dtype) -> Qwen3VLForConditionalGeneration:
    """Loads the model from safetensors in ``folder`` onto ``device``, in eval mode.

    A tensor the architecture has and the files lack (a truncated merge or export, keys of
    another layout), or one the files have and the architecture lacks (a config.json with fewer
    layers than the weights: a trained layer thrown away), is an error, as it is for the mask
    decoder: transformers would only print a table, and the node would answer nonsense.
    """
    check_qwen3vl_folder(folder)
    try:
        model, info = Qwen3VLForConditionalGeneration.from_pretrained(
            folder, dtype=dtype, local_files_only=True, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a corrupt or LFS-pointer file
        notes = "".join(lfs_pointer_note(path) for path in sorted(folder.glob("*.safetensors")))
        raise SegmenterError(f"cannot load the Qwen3-VL weights from '{folder}': "
                             f"{type(exc).__name__}: {exc}{notes}") from exc
    except RuntimeError as exc:  # transformers 5 raises it for a tensor of another shape
        shapes = "ignore_mismatched_sizes" in str(exc)
        why = ("some tensors have another shape than config.json says (transformers' load report on stderr names "
               "them): another model's config.json, or a vocab_size not updated after adding tokens"
               if shapes else f"{type(exc).__name__}: {exc}")
        raise SegmenterError(f"cannot load the Qwen3-VL weights from '{folder}': {why}") from exc
    problems = [f"{what} {sorted(map(str, info.get(key) or []))[:5]}{' ...' if len(info.get(key) or []) > 5 else ''}"
                for key, what in (("missing_keys", "missing"), ("unexpected_keys", "not in the architecture"),
                                  ("mismatched_keys", "of another shape"))
                if info.get(key)]
    if problems:
        raise SegmenterError(f"the Qwen3-VL weights in '{folder}' do not fit its config.json: tensors "
                             + "; ".join(problems) + " (a truncated or partial checkpoint, another model's files, "
                             "or a config.json of another size)")
    return model.to(device).eval()

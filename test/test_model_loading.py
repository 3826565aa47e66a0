"""Checkpoint folders that are wrong in the ways real ones are: each refused with a message that
names the folder and what to do, before the node serves nonsense or fails every command.

Every folder here is a copy of one tiny checkpoint built from a config in code and saved, read
back through the same ``from_options`` path that loads a real checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3vl_seg_ros.grounding import SEG_TOKEN
from qwen3vl_seg_ros.model.checkpoint import DECODER_CONFIG, DECODER_WEIGHTS, DecoderCheckpointError, load_decoder
from qwen3vl_seg_ros.model.loading import resolve_device
from qwen3vl_seg_ros.model.segmenter import Qwen3VLSeg
from qwen3vl_seg_ros.model.tiny import build_tiny_checkpoint
from qwen3vl_seg_ros.segmenter import Segmenter, SegmenterOptions, create_segmenter
from qwen3vl_seg_ros.types import SegmenterError

ANSWER = ({"bbox_2d": [100, 200, 400, 600], "label": "red cube"},)
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "tiny_qwen3vl_seg"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("built"), answer=ANSWER)


@pytest.fixture
def folder(built: Path, tmp_path: Path) -> Path:
    """A copy of the tiny checkpoint that a test may break."""
    return Path(shutil.copytree(built, tmp_path / "model"))


def load(folder: Path, **options) -> tuple[Qwen3VLSeg, list[str]]:
    said: list[str] = []
    seg = Qwen3VLSeg.from_options(SegmenterOptions(model=str(folder), device="cpu", **options), said.append)
    return seg, said


def edit_config(folder: Path, **text_config) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(text_config)
    (folder / "config.json").write_text(json.dumps(config))


def test_the_copy_loads(folder: Path) -> None:
    """The baseline every other test breaks one thing of."""
    seg, said = load(folder)
    assert seg.decoder is not None and any("loaded mask decoder" in line for line in said)
    assert not any(line.startswith("warning:") for line in said), said


def test_a_decoder_beside_a_tokenizer_without_the_mask_token_is_warned_about(folder: Path) -> None:
    """A base checkpoint with a trained decoder (as the docs once said to run it): the decoder's
    queries came from another token than in training, and masks collapsed without a word."""
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace(SEG_TOKEN, "<|not_seg|>"))
    seg, said = load(folder)
    assert seg.seg_token_id is None and seg.decoder is not None
    assert any(line.startswith(f"warning: the tokenizer in {folder} has no {SEG_TOKEN} token") for line in said), said


def test_a_config_with_fewer_layers_than_the_weights_is_refused(folder: Path) -> None:
    """The weights' last layer was dropped without a word and the model answered garbage."""
    layers = json.loads((folder / "config.json").read_text())["text_config"]["num_hidden_layers"]
    edit_config(folder, num_hidden_layers=layers - 1)
    with pytest.raises(SegmenterError, match=rf"do not fit its config.json: tensors not in the architecture "
                                             rf"\[.*layers\.{layers - 1}\."):
        load(folder)


def test_a_tensor_of_another_shape_is_named_as_such(folder: Path) -> None:
    """transformers 5 raises a RuntimeError that the node reported as an "internal error"."""
    vocab = json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]
    edit_config(folder, vocab_size=vocab - 1)
    with pytest.raises(SegmenterError, match=rf"cannot load the Qwen3-VL weights from '{folder}'.*(another shape)"):
        load(folder)


@pytest.mark.parametrize("missing", [DECODER_WEIGHTS, DECODER_CONFIG])
def test_half_a_decoder_is_an_error_naming_the_missing_file(folder: Path, missing: str) -> None:
    """It made the node switch to the weight-free heads, saying "no mask decoder"."""
    (folder / missing).unlink()
    with pytest.raises(SegmenterError, match=rf"cannot load the mask decoder: .* lacks {missing}"):
        load(folder)


def test_without_any_decoder_file_the_weight_free_heads_are_said(folder: Path) -> None:
    for name in (DECODER_WEIGHTS, DECODER_CONFIG):
        (folder / name).unlink()
    seg, said = load(folder)
    assert seg.decoder is None and any("no mask decoder in" in line for line in said)


def test_mask_head_decoder_without_a_decoder_is_refused_before_the_model_loads(folder: Path) -> None:
    for name in (DECODER_WEIGHTS, DECODER_CONFIG):
        (folder / name).unlink()
    said: list[str] = []
    with pytest.raises(SegmenterError, match="mask_head 'decoder' needs a trained mask decoder"):
        Qwen3VLSeg.from_options(SegmenterOptions(model=str(folder), device="cpu", mask_head="decoder"), said.append)
    assert not any(line.startswith("loading Qwen3-VL") for line in said), said


def test_a_folder_without_a_chat_template_is_refused_at_load(folder: Path) -> None:
    """It loaded, then every command failed as an "internal error". A template kept only in
    tokenizer_config.json (as the message allows) is used: the processor does not read it."""
    (template,) = [path.read_text() for path in folder.glob("chat_template.*")]
    for path in folder.glob("chat_template.*"):
        path.unlink()
    tokenizer_config = folder / "tokenizer_config.json"
    config = json.loads(tokenizer_config.read_text())
    config.pop("chat_template", None)
    tokenizer_config.write_text(json.dumps(config))
    with pytest.raises(SegmenterError, match="has no chat template"):
        load(folder)
    tokenizer_config.write_text(json.dumps({**config, "chat_template": template}))
    seg, _ = load(folder)
    assert seg.segment(np.zeros((96, 128, 3), np.uint8), "the red cube").instances  # the prompt is built


def test_a_peft_adapter_in_the_folder_is_refused(folder: Path) -> None:
    """transformers applied it inside from_pretrained, under a decoder fitted without it."""
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"]}))
    with pytest.raises(SegmenterError, match=r"holds a PEFT adapter .*merge it"):
        load(folder)


def test_pickle_model_weights_beside_a_safetensors_decoder_are_named(folder: Path) -> None:
    """The decoder's own .safetensors made the "has safetensors" check pass."""
    for path in folder.glob("model*.safetensors"):
        path.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(SegmenterError, match=r"no \.safetensors weights for the model \(pytorch_model\.bin found"):
        load(folder)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("num_heads", 0, "num_heads must be a positive integer, got 0"),
    ("dim", -32, "dim must be a positive integer, got -32"),
    ("fourier_freqs", "4", "fourier_freqs must be a positive integer, got '4'"),
    ("stem_channels", [8, 0, 16], "stem_channels must be positive"),
])
def test_bad_values_in_the_decoder_config_name_the_file_and_field(folder: Path, field: str, value,
                                                                  message: str) -> None:
    """They came out as a bare ZeroDivisionError, RuntimeError or TypeError."""
    config = json.loads((folder / DECODER_CONFIG).read_text())
    config[field] = value
    (folder / DECODER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(DecoderCheckpointError, match=rf"{DECODER_CONFIG}: {message}"):
        load_decoder(folder)


def test_the_device_name_is_read_regardless_of_case() -> None:
    assert resolve_device("CPU") == torch.device("cpu") and resolve_device(" Auto ").type in ("cpu", "cuda")


def test_a_custom_segmenter_that_returns_no_segmenter_is_an_error() -> None:
    """The node went to ERROR with an empty reason."""
    with pytest.raises(SegmenterError, match="from_options returned NoneType, not a Segmenter"):
        create_segmenter(f"{__name__}:ForgetsToReturn", SegmenterOptions())


class ForgetsToReturn(Segmenter):
    name = "forgets"

    @classmethod
    def from_options(cls, options, progress=None):  # type: ignore[override]
        cls(options)  # built, never returned

    def __init__(self, options) -> None:
        self.options = options

    def segment(self, rgb, command, depth=None):  # pragma: no cover - never reached
        raise AssertionError


def test_the_calibration_follows_the_decoder_in_use_wherever_it_was_loaded_from(tmp_path: Path) -> None:
    """``decoder`` set to the model folder itself (or a copy of its decoder) turned the score
    calibration off, saying the folder's decoder was not in use; another decoder still does."""
    seg, said = load(SHIPPED, decoder=str(SHIPPED))
    assert seg.calibration is not None, said
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in (DECODER_WEIGHTS, DECODER_CONFIG):
        shutil.copy(SHIPPED / name, copy / name)
    assert load(SHIPPED, decoder=str(copy))[0].calibration is not None
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(SHIPPED / DECODER_CONFIG, other / DECODER_CONFIG)
    decoder = load_decoder(copy)
    with torch.no_grad():
        next(decoder.parameters()).add_(1.0)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(other / DECODER_WEIGHTS))
    seg, said = load(SHIPPED, decoder=str(other))
    assert seg.calibration is None
    assert any(f"it was fitted for another mask decoder than {other / DECODER_WEIGHTS}" in line for line in said), said


def test_training_refuses_a_truncated_base_checkpoint(folder: Path) -> None:
    """load_base called from_pretrained directly: training went on over a random layer."""
    from safetensors.torch import load_file, save_file

    from qwen3vl_seg_ros.training.model_builder import ModelConfig, load_base

    (weights,) = sorted(folder.glob("model*.safetensors"))
    tensors = load_file(str(weights))
    kept = {k: v for k, v in tensors.items() if not (".layers.1." in k and "language_model" in k)}
    assert len(kept) < len(tensors)
    save_file(kept, str(weights), metadata={"format": "pt"})
    with pytest.raises(SegmenterError, match=r"tensors missing \[.*layers\.1\."):
        load_base(ModelConfig(), folder)

"""The tiny Qwen3-VL checkpoint: tokenizer, saved files, loading, generation and vision capture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3vl_seg_ros.grounding import SEG_TOKEN, build_prompt, format_answer
from qwen3vl_seg_ros.model.checkpoint import has_decoder, load_decoder
from qwen3vl_seg_ros.model.generation import EagerGreedyGenerator
from qwen3vl_seg_ros.model.loading import load_processor, load_qwen3vl
from qwen3vl_seg_ros.model.tiny import (
    DEFAULT_ANSWER,
    LABEL_FIRST_PIECES,
    build_tiny_checkpoint,
    build_tokenizer,
    tokenizer_vocabulary,
)
from qwen3vl_seg_ros.model.vision_capture import VisionCapture, merged_to_map, patches_to_raster

torch.set_num_threads(1)  # tiny models: threads only add contention on a shared machine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def loaded(tiny: Path) -> tuple:
    return load_processor(tiny), load_qwen3vl(tiny, torch.device("cpu"), torch.float32)


def prompt_inputs(processor: object, command: str, shape: tuple[int, int] = (96, 128), seed: int = 0) -> dict:
    image = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_prompt(command)[0]}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return dict(processor(text=[text], images=[image], return_tensors="pt"))


# ---------------------------------------------------------------------------------- tokenizer


def test_tokenizer_covers_the_task() -> None:
    tok = build_tokenizer()
    unk = tok.unk_token_id
    for number in ("0", "7", "123", "1000"):
        assert len(tok(number)["input_ids"]) == 1
    for word in ("bbox_2d", "label", "red", "cylinder", "leftmost", "next", "every", "locate", "json"):
        ids = tok(word)["input_ids"]
        assert len(ids) == 1 and ids[0] != unk, word
    assert tok("xylophone")["input_ids"] == [unk]
    answer = format_answer([([1, 20, 300, 1000], "red mug"), ([5, 5, 6, 6], "blue cube")], mask_token=True)
    ids = tok(answer)["input_ids"]
    assert unk not in ids
    assert ids.count(tok.convert_tokens_to_ids(SEG_TOKEN)) == 2
    assert tok.decode(ids, skip_special_tokens=True) == answer.replace(SEG_TOKEN, "")
    assert tok.decode(ids) == answer
    for prompt_command in ("the red mug left of the box", "all cubes", "the green ball and the cup"):
        assert unk not in tok(build_prompt(prompt_command)[0])["input_ids"]


def test_label_first_answers_tokenize_as_compactly() -> None:
    """Each fixed piece of a label-first answer is one token, as for Qwen3-VL's order, and the pieces
    come last in the vocabulary, so every other token keeps the id older tokenizers gave it."""
    tok = build_tokenizer()
    objects = [([1, 20, 300, 1000], "red mug"), ([5, 5, 6, 6], "blue cube")]
    first = format_answer(objects, mask_token=True, label_first=True)
    assert first.startswith('[{"label": "red mug", "bbox_2d": [1, 20, 300, 1000]}')
    ids = tok(first)["input_ids"]
    assert tok.unk_token_id not in ids and tok.decode(ids) == first
    assert len(ids) == len(tok(format_answer(objects, mask_token=True))["input_ids"])
    assert all(len(tok(p)["input_ids"]) == 1 for p in LABEL_FIRST_PIECES)
    assert tokenizer_vocabulary()[-len(LABEL_FIRST_PIECES):] == list(LABEL_FIRST_PIECES)


# ------------------------------------------------------------------------------- checkpoint


def test_checkpoint_folder_layout(tiny: Path) -> None:
    names = {p.name for p in tiny.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "chat_template.jinja", "generation_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert has_decoder(tiny)
    config = json.loads((tiny / "config.json").read_text())
    assert config["model_type"] == "qwen3_vl"
    decoder = load_decoder(tiny)
    assert decoder.config.llm_dim == config["text_config"]["hidden_size"]


def test_processor_loads_through_production_path(loaded: tuple) -> None:
    processor, model = loaded
    out = prompt_inputs(processor, "the red cube")
    assert out["image_grid_thw"].tolist() == [[1, 6, 8]]  # 96x128 stays 96x128: 6x8 patches of 16
    n_image = int((out["input_ids"] == model.config.image_token_id).sum())
    assert n_image == 6 * 8 // 4
    assert "mm_token_type_ids" in out
    smaller = load_processor(Path(processor.tokenizer.name_or_path), image_max_pixels=64 * 64)
    # 96x128 shrunk to at most 64*64 pixels in multiples of 32: 32x64, i.e. 2x4 patches
    assert prompt_inputs(smaller, "the red cube")["image_grid_thw"].tolist() == [[1, 2, 4]]


def test_larger_sizes_build(tmp_path: Path) -> None:
    folder = build_tiny_checkpoint(tmp_path, answer=None, text_hidden=128, text_layers=3, head_dim=32,
                                   vision_hidden=64, vision_depth=4, deepstack=(1, 2))
    model = load_qwen3vl(folder, torch.device("cpu"), torch.float32)
    assert model.config.text_config.hidden_size == 128
    assert load_decoder(folder).config.vit_layers == (1, 2, 3)
    with pytest.raises(ValueError, match="unknown size keys"):
        build_tiny_checkpoint(tmp_path / "x", text_width=3)


# ------------------------------------------------------------------------------- generation


def test_fitted_model_gives_its_answer(loaded: tuple) -> None:
    processor, model = loaded
    generator = EagerGreedyGenerator(model, model.generation_config.eos_token_id)
    for command, shape in (("the blue ball", (64, 64)), ("all mugs", (96, 128))):
        out = generator.generate(prompt_inputs(processor, command, shape), 80)
        text = processor.tokenizer.decode(out.token_ids, skip_special_tokens=False)
        assert text == format_answer(DEFAULT_ANSWER, mask_token=True) + "<|im_end|>"
        assert out.finished


@pytest.mark.parametrize("max_new_tokens", [80, 7])
def test_greedy_loop_matches_hf_generate(loaded: tuple, max_new_tokens: int) -> None:
    processor, model = loaded
    inputs = prompt_inputs(processor, "the cube left of the mug", seed=3)
    generator = EagerGreedyGenerator(model, model.generation_config.eos_token_id)
    ours = generator.generate(inputs, max_new_tokens)
    ref = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    assert ours.token_ids.tolist() == ref[0, inputs["input_ids"].shape[1]:].tolist()
    assert ours.finished == (max_new_tokens == 80)
    assert len(ours.hidden_states) == len(ours.token_ids) - int(ours.finished)
    assert torch.all((ours.token_probs > 0) & (ours.token_probs <= 1))


def test_random_model_matches_hf_generate(tmp_path: Path) -> None:
    """An unfitted model's output is arbitrary: a harder check of positions and cache."""
    folder = build_tiny_checkpoint(tmp_path, answer=None, decoder=False, seed=5)
    processor, model = load_processor(folder), load_qwen3vl(folder, torch.device("cpu"), torch.float32)
    inputs = prompt_inputs(processor, "every red cylinder", seed=1)
    ours = EagerGreedyGenerator(model, model.generation_config.eos_token_id).generate(inputs, 24)
    ref = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert ours.token_ids.tolist() == ref[0, inputs["input_ids"].shape[1]:].tolist()


def test_hidden_states_are_those_of_a_full_forward(loaded: tuple) -> None:
    """hidden_states[i] must be the final-norm state at token i's position, as one forward over
    prompt + answer computes it."""
    processor, model = loaded
    inputs = prompt_inputs(processor, "the red cube")
    out = EagerGreedyGenerator(model, model.generation_config.eos_token_id).generate(inputs, 80)
    fed = out.token_ids[: len(out.hidden_states)]
    full_ids = torch.cat([inputs["input_ids"], fed[None]], dim=1)
    with torch.no_grad():
        full = model.model(
            input_ids=full_ids,
            attention_mask=torch.ones_like(full_ids),
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(fed)[None]], dim=1),
        ).last_hidden_state[0, inputs["input_ids"].shape[1]:]
    torch.testing.assert_close(out.hidden_states, full, rtol=1e-4, atol=1e-4)


def test_vision_capture_records_one_pass_in_raster_order(loaded: tuple) -> None:
    processor, model = loaded
    inputs = prompt_inputs(processor, "the red cube")
    layers = (0, len(model.model.visual.blocks) - 1)
    with VisionCapture(model, layers) as capture:
        EagerGreedyGenerator(model, model.generation_config.eos_token_id).generate(inputs, 10)
    assert capture.calls == 1
    features = capture.features(inputs["image_grid_thw"])
    with torch.no_grad():
        direct = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    torch.testing.assert_close(features.vit_maps[-1][0], patches_to_raster(direct.last_hidden_state, 6, 8, 2))
    torch.testing.assert_close(features.merged_map[0], merged_to_map(direct.pooler_output, 6, 8, 2))
    assert features.vit_maps[0].shape == (1, model.config.vision_config.hidden_size, 6, 8)
    with pytest.raises(ValueError, match="out of range"):
        VisionCapture(model, (99,))

"""The fast decoding path (static KV cache, own prefill, CUDA-graph bookkeeping) against the eager one.

Runs on the CPU with tiny random Qwen3-VL models in fp32: the fast path must give the same tokens,
probabilities and hidden states as :class:`EagerGreedyGenerator`. CUDA graphs cannot run here, so
"graph mode" is emulated by a fake capture whose replay re-runs the captured function into the
same static output tensors: that exercises the padding of prompts to buckets, the static buffers,
the reuse of captured graphs across frames and the emulated vision hooks. Compilation is tested
only with QWEN3VL_SEG_TEST_COMPILE=1 (Inductor on a CPU takes a minute).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3vl_seg_ros.grounding import build_prompt
from qwen3vl_seg_ros.model import fast_generation
from qwen3vl_seg_ros.model.fast_generation import (
    PROMPT_BUCKET,
    FastGreedyGenerator,
    FastInputs,
    FastPathUnavailableError,
    capacity_for,
    rotated_sin,
    text_rope,
)
from qwen3vl_seg_ros.model.generation import EagerGreedyGenerator
from qwen3vl_seg_ros.model.loading import load_processor, load_qwen3vl
from qwen3vl_seg_ros.model.tiny import build_tiny_checkpoint
from qwen3vl_seg_ros.model.token_choice import number_tokens
from qwen3vl_seg_ros.model.vision_capture import VisionCapture

torch.set_num_threads(1)  # tiny models: threads only add contention on a shared machine

H, W = 96, 128


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A random (unfitted) model: quick to build; its answers are long and never stop by themselves.
    return build_tiny_checkpoint(tmp_path_factory.mktemp("fast"), decoder=False, answer=None, seed=3)


@pytest.fixture(scope="module")
def model(folder: Path) -> torch.nn.Module:
    return load_qwen3vl(folder, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def processor(folder: Path) -> object:
    return load_processor(folder)


def prompt_text(processor: object, command: str = "the red cube") -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_prompt(command)[0]}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def make_inputs(processor: object, seed: int = 0, command: str = "the red cube", size: tuple[int, int] = (H, W)):
    from PIL import Image

    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    batch = processor(text=[prompt_text(processor, command)], images=[Image.fromarray(rgb)], return_tensors="pt")
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


NEVER = (10**9,)  # a stop token id no model emits


def assert_same(fast, ref, atol: float = 2e-5) -> None:
    assert fast.token_ids.tolist() == ref.token_ids.tolist()
    assert fast.finished == ref.finished
    torch.testing.assert_close(fast.token_probs, ref.token_probs, atol=atol, rtol=1e-4)
    assert fast.hidden_states.shape == ref.hidden_states.shape
    torch.testing.assert_close(fast.hidden_states, ref.hidden_states, atol=atol, rtol=1e-4)


# ------------------------------------------------------------------------------- emulated graphs


class FakeGraphDouble:
    """Replays by re-running the captured function into the outputs returned at capture."""

    def __init__(self, fn, outputs) -> None:
        self.fn, self.outputs, self.replays = fn, outputs, 0

    def replay(self) -> None:
        _copy_into(self.outputs, self.fn())
        self.replays += 1


def _copy_into(static, fresh) -> None:
    if isinstance(static, torch.Tensor):
        static.copy_(fresh)
    elif isinstance(static, (list, tuple)):
        for s, f in zip(static, fresh):
            _copy_into(s, f)


@pytest.fixture()
def fake_graphs(monkeypatch: pytest.MonkeyPatch) -> list[FakeGraphDouble]:
    graphs: list[FakeGraphDouble] = []

    def capture(fn, device):
        fn()
        out = fn()
        graphs.append(FakeGraphDouble(fn, out))
        return graphs[-1], out

    monkeypatch.setattr(fast_generation, "_capture", capture)
    return graphs


def graph_mode(gen: FastGreedyGenerator) -> FastGreedyGenerator:
    gen.use_graphs = gen._graph_steps = gen._graph_prefill = True
    return gen


# ------------------------------------------------------------------------------- the decode step


def test_rotary_reduction_matches_hf_mrope(model: torch.nn.Module) -> None:
    """For text after an image the three M-RoPE components are equal: plain RoPE with inv_freq."""
    lm = model.model.language_model
    assert lm.config.rope_parameters.get("mrope_interleaved", True)
    positions = torch.tensor([0, 7, 40, 333, 1023, 4095])
    x = torch.zeros(1, len(positions), lm.config.hidden_size)
    cos_hf, sin_hf = lm.rotary_emb(x, positions.view(1, 1, -1).expand(3, 1, -1))
    cos, sin = text_rope(positions, lm.rotary_emb.inv_freq, lm.rotary_emb.attention_scaling, x.dtype)
    torch.testing.assert_close(cos, cos_hf[0], atol=0, rtol=0)
    torch.testing.assert_close(sin, sin_hf[0], atol=0, rtol=0)
    # and roll(x, half) * rotated_sin == HF's rotate_half(x) * sin, bit for bit
    from transformers.models.qwen3_vl.modeling_qwen3_vl import rotate_half

    x = torch.randn(len(positions), 4, cos.shape[-1]).transpose(0, 1)
    ours = torch.roll(x, cos.shape[-1] // 2, dims=-1) * rotated_sin(sin)
    assert torch.equal(ours, rotate_half(x) * sin)


def test_step_logits_match_hf_forward(model: torch.nn.Module, processor: object) -> None:
    """Same cache state (the prompt plus fed tokens): our step's logits equal HF's forward's."""
    inputs = make_inputs(processor)
    eager = EagerGreedyGenerator(model, NEVER)
    state, logits = eager.prefill(inputs)
    fed = [int(logits.argmax()), 11, 500, 7]
    ref_logits = []
    for token in fed:
        logits, _ = eager.decode_step(state, token)
        ref_logits.append(logits[0])
    gen = FastGreedyGenerator(model, NEVER)
    _, hidden, _, _ = gen.teacher_forced(inputs, fed)
    with torch.inference_mode():
        ours = model.lm_head(hidden).float()
    torch.testing.assert_close(ours, torch.stack(ref_logits), atol=2e-5, rtol=1e-4)


def test_generate_matches_eager(model: torch.nn.Module, processor: object) -> None:
    inputs = make_inputs(processor, seed=1)
    ref = EagerGreedyGenerator(model, NEVER).generate(inputs, 24)
    fast = FastGreedyGenerator(model, NEVER).generate(inputs, 24)
    assert len(ref.token_ids) == 24 and not ref.finished
    assert_same(fast, ref)


def test_coordinate_windows_alike_in_both_paths(model: torch.nn.Module, processor: object,
                                                fake_graphs: list[FakeGraphDouble]) -> None:
    """With coordinates chosen by their window (:mod:`token_choice`) the graphed path writes what the
    eager one does. The random model spreads most of its mass over the 1001 numbers, so every token
    is a number, where plain greedy writes words too."""
    numbers = number_tokens(processor.tokenizer, 3)
    inputs = make_inputs(processor, seed=8)
    ref = EagerGreedyGenerator(model, NEVER, numbers).generate(inputs, 12)
    fast = graph_mode(FastGreedyGenerator(model, NEVER, numbers=numbers)).generate(inputs, 12)
    assert_same(fast, ref)
    values = set(numbers.ids.tolist())
    assert all(t in values for t in ref.token_ids.tolist())
    plain = EagerGreedyGenerator(model, NEVER).generate(inputs, 12)
    assert not all(t in values for t in plain.token_ids.tolist())


@pytest.mark.parametrize("check_every", [1, 4])
def test_stop_token_mid_chunk_is_trimmed(model: torch.nn.Module, processor: object, check_every: int) -> None:
    inputs = make_inputs(processor, seed=2)
    free = EagerGreedyGenerator(model, NEVER).generate(inputs, 24).token_ids.tolist()
    stop = free[6]  # its first occurrence ends the answer; with chunks of 4 it is mid-chunk
    ref = EagerGreedyGenerator(model, [stop]).generate(inputs, 24)
    fast = FastGreedyGenerator(model, [stop], check_every=check_every).generate(inputs, 24)
    assert ref.finished and ref.token_ids.tolist()[-1] == stop
    assert_same(fast, ref)


def test_stop_as_first_token_and_zero_tokens(model: torch.nn.Module, processor: object) -> None:
    inputs = make_inputs(processor, seed=3)
    first = EagerGreedyGenerator(model, NEVER).generate(inputs, 1).token_ids.tolist()[0]
    ref = EagerGreedyGenerator(model, [first]).generate(inputs, 10)
    fast = FastGreedyGenerator(model, [first]).generate(inputs, 10)
    assert ref.token_ids.tolist() == [first] and ref.hidden_states.shape[0] == 0
    assert_same(fast, ref)
    empty = FastGreedyGenerator(model, NEVER).generate(inputs, 0)
    assert empty.token_ids.numel() == 0 and not empty.finished


def test_hf_prefill_fallback_for_text_only_prompts(model: torch.nn.Module, processor: object) -> None:
    """Inputs the fast prefill does not cover use HF's prefill, then the same static decode."""
    ids = processor.tokenizer(["<|im_start|>user\nthe red cube<|im_end|>\n<|im_start|>assistant\n"],
                              return_tensors="pt")
    inputs = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"],
              "mm_token_type_ids": torch.zeros_like(ids["input_ids"])}
    gen = FastGreedyGenerator(model, NEVER)
    assert not gen._plan(inputs).fast
    assert_same(gen.generate(inputs, 12), EagerGreedyGenerator(model, NEVER).generate(inputs, 12))


def test_vision_capture_sees_one_pass_with_the_same_features(model: torch.nn.Module, processor: object) -> None:
    inputs = make_inputs(processor, seed=4)
    layers = (0, 2)
    with VisionCapture(model, layers) as ref_capture:
        EagerGreedyGenerator(model, NEVER).generate(inputs, 3)
    with VisionCapture(model, layers) as capture:
        FastGreedyGenerator(model, NEVER).generate(inputs, 3)
    assert capture.calls == 1
    ref, ours = ref_capture.features(inputs["image_grid_thw"]), capture.features(inputs["image_grid_thw"])
    for a, b in zip(ours.vit_maps, ref.vit_maps):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.merged_map, ref.merged_map, atol=1e-5, rtol=1e-4)


def test_unsupported_model_is_refused(model: torch.nn.Module) -> None:
    class Wrapped(torch.nn.Linear):
        pass

    head = model.lm_head
    model.lm_head = Wrapped(head.in_features, head.out_features, bias=False)
    try:
        with pytest.raises(FastPathUnavailableError, match="lm_head"):
            FastGreedyGenerator(model, NEVER)
    finally:
        model.lm_head = head


def test_capacity_buckets() -> None:
    assert capacity_for(1) == 1024 and capacity_for(1024) == 1024
    assert capacity_for(1025) == 2048 and capacity_for(5000) == 8192


# ------------------------------------------------------------------------------- graph mode (emulated)


def test_graph_mode_pads_prompts_and_reuses_graphs(model: torch.nn.Module, processor: object,
                                                   fake_graphs: list[FakeGraphDouble]) -> None:
    gen = graph_mode(FastGreedyGenerator(model, NEVER))
    eager = EagerGreedyGenerator(model, NEVER)
    for seed, command in ((5, "the red cube"), (6, "the red cube"), (7, "the small blue ball left of the big mug")):
        inputs = make_inputs(processor, seed=seed, command=command)
        plan = gen._plan(inputs)
        assert plan.fast and plan.padded % PROMPT_BUCKET == 0 and plan.padded > plan.length
        layers = (1,)
        with VisionCapture(model, layers) as ref_capture:
            ref = eager.generate(inputs, 16)
        with VisionCapture(model, layers) as capture:
            fast = gen.generate(inputs, 16)
        assert_same(fast, ref)
        assert capture.calls == 1
        torch.testing.assert_close(capture.features(inputs["image_grid_thw"]).vit_maps[0],
                                   ref_capture.features(inputs["image_grid_thw"]).vit_maps[0], atol=1e-5, rtol=1e-4)
    # one step graph, one vision graph, and one prefill graph per padded prompt length (captured the
    # second time it is needed: the first frame ran eagerly)
    state = gen._state
    assert state.step_graph is not None and len(gen._vision) == 1
    assert len(state.prefills) == len({k[1] for k in state.prefills})
    assert len(fake_graphs) == 2 + len(state.prefills)
    assert state.step_graph.replays >= 48


def test_graph_mode_frame_sizes_beyond_the_cache(model: torch.nn.Module, processor: object,
                                                  fake_graphs: list[FakeGraphDouble]) -> None:
    """Five frame sizes evict the first size's vision graph; coming back to it recaptures both graphs."""
    gen = graph_mode(FastGreedyGenerator(model, NEVER))
    gen.capture_after = 1
    eager = EagerGreedyGenerator(model, NEVER)
    sizes = [(64, 64), (64, 96), (96, 96), (96, 128), (128, 128), (64, 64)]
    for seed, size in enumerate(sizes):
        inputs = make_inputs(processor, seed=20 + seed, size=size)
        assert_same(gen.generate(inputs, 6), eager.generate(inputs, 6))
    assert len(gen._vision) == 4
    assert {k[0] for k in gen._state.prefills} <= set(gen._vision)


def test_sizes_seen_once_keep_the_camera_sizes_graphs(model: torch.nn.Module, processor: object,
                                                      fake_graphs: list[FakeGraphDouble]) -> None:
    """Frames whose prefill runs eagerly (a size seen once) went into the 4-grid vision cache and
    evicted the camera size's warmed graphs: the next camera frame captured them again."""
    gen = graph_mode(FastGreedyGenerator(model, NEVER))
    gen.warmup(make_inputs(processor, seed=0), 6, check=False)
    warmed = len(fake_graphs)
    for seed, size in enumerate([(64, 64), (64, 96), (96, 96), (128, 128)]):
        gen.generate(make_inputs(processor, seed=10 + seed, size=size), 6)
    assert len(fake_graphs) == warmed  # nothing captured for sizes seen once
    ref = EagerGreedyGenerator(model, NEVER).generate(make_inputs(processor, seed=30), 6)
    assert_same(gen.generate(make_inputs(processor, seed=30), 6), ref)
    assert len(fake_graphs) == warmed  # the camera size replayed its warm-up graphs


def test_warmup_captures_buckets_and_self_checks(model: torch.nn.Module, processor: object,
                                                 fake_graphs: list[FakeGraphDouble]) -> None:
    gen = graph_mode(FastGreedyGenerator(model, NEVER))
    inputs = make_inputs(processor, seed=8)
    lines: list[str] = []
    info = gen.warmup(inputs, 64, lines.append, prompt_buckets=2)
    assert info["self_check"]["ok"] and info["self_check"]["tokens_equal"]
    assert info["self_check"]["prefill_logits_cos"] > 0.9999
    assert "CUDA graphs" in info["path"] and not gen.eager_only
    padded = gen._plan(inputs).padded
    assert {k[1] for k in gen._state.prefills} >= {padded, padded + PROMPT_BUCKET}
    assert any("ready" in line for line in lines)
    # a longer command lands in the second bucket, captured at warm-up: no new graph
    before = len(fake_graphs)
    longer = make_inputs(processor, seed=9, command=" ".join(["the red cube"] * 8))
    if gen._plan(longer).padded == padded + PROMPT_BUCKET:
        assert_same(gen.generate(longer, 8), EagerGreedyGenerator(model, NEVER).generate(longer, 8))
        assert len(fake_graphs) == before


def test_failed_self_check_falls_back_to_eager(model: torch.nn.Module, processor: object,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    gen = FastGreedyGenerator(model, NEVER)
    inputs = make_inputs(processor, seed=10)
    broken = fast_generation.decode_layer

    def wrong_layer(x, *args, **kwargs):
        return broken(x, *args, **kwargs) * 0.0 + torch.randn_like(x)

    monkeypatch.setattr(gen, "_layer_fn", wrong_layer)
    info = gen.warmup(inputs, 16)
    assert not info["self_check"]["ok"] and gen.eager_only
    assert "eager" in gen.describe()
    assert_same(gen.generate(inputs, 6), EagerGreedyGenerator(model, NEVER).generate(inputs, 6))


# ------------------------------------------------------------------------------- inputs


def test_fast_inputs_equal_the_processor(processor: object) -> None:
    from PIL import Image

    fast = FastInputs(processor, torch.device("cpu"), torch.float32)
    rgb = np.random.default_rng(11).integers(0, 256, (H, W, 3), dtype=np.uint8)
    text = prompt_text(processor)
    ours = fast(rgb, text)
    assert ours is not None and not fast.disabled
    ref = processor(text=[text], images=[Image.fromarray(rgb)], return_tensors="pt")
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
        assert torch.equal(ours[key], ref[key]), key
    other = np.random.default_rng(12).integers(0, 256, (H, W, 3), dtype=np.uint8)  # checked size: no reference run
    assert torch.equal(fast(other, text)["pixel_values"],
                       processor(text=[text], images=[Image.fromarray(other)], return_tensors="pt")["pixel_values"])
    assert fast(np.zeros((100, 130, 3), np.uint8), text) is None  # would be resampled: the processor's job


class TensorOnlyImageProcessorDouble:
    """The torchvision backend's shape (picked where torchvision is installed, as on the GPU image):
    its rescale and normalize take tensors and raise TypeError on numpy arrays."""

    def __init__(self, real: object) -> None:
        self.do_rescale, self.rescale_factor = real.do_rescale, real.rescale_factor
        self.do_normalize, self.image_mean, self.image_std = real.do_normalize, real.image_mean, real.image_std

    @staticmethod
    def _tensor(image: object) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"expected a tensor, got {type(image)}")
        return image

    def rescale(self, image: object, scale: float) -> torch.Tensor:
        return self._tensor(image) * scale

    def normalize(self, image: object, mean: list[float], std: list[float]) -> torch.Tensor:
        shape = (-1, 1, 1)
        return (self._tensor(image) - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def test_lookup_table_with_a_tensor_only_image_processor(processor: object) -> None:
    """The GPU image's processor refused numpy (a TypeError at warm-up); both backends give one table."""
    import copy

    fast = FastInputs(processor, torch.device("cpu"), torch.float32)
    numpy_table = fast.table
    fast.processor = copy.copy(processor)
    fast.processor.image_processor = TensorOnlyImageProcessorDouble(processor.image_processor)
    table = fast._lookup_table()
    assert table.shape == (3, 256)
    torch.testing.assert_close(table, numpy_table)


def test_segmenter_with_the_fast_generator(model: torch.nn.Module, processor: object) -> None:
    """The segmenter's fast-path plumbing (warm-up, GPU-style inputs) gives the eager answers."""
    from qwen3vl_seg_ros.model.segmenter import Qwen3VLSeg
    from qwen3vl_seg_ros.segmenter import SegmenterOptions

    options = SegmenterOptions(device="cpu", mask_head="box", max_new_tokens=20)
    eager = Qwen3VLSeg(model, processor, None, options)
    fast = Qwen3VLSeg(model, processor, None, options,
                      generator=FastGreedyGenerator(model, eager._stop_tokens(), use_graphs=False))
    lines: list[str] = []
    fast.warmup(lines.append)
    assert fast.warmup_info["self_check"]["ok"] and any("fast decode ready" in line for line in lines)
    fast.fast_inputs = FastInputs(processor, torch.device("cpu"), torch.float32)
    rgb = np.random.default_rng(14).integers(0, 256, (H, W, 3), dtype=np.uint8)
    a, b = eager.segment(rgb, "the red cube"), fast.segment(rgb, "the red cube")
    assert a.raw_answer == b.raw_answer and a.warnings == b.warnings
    assert fast.fast_inputs.checked.get((H, W))


def _left_padded(inputs: dict, pads: int) -> dict:
    out = dict(inputs)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in inputs:
            out[key] = torch.cat([torch.zeros(1, pads, dtype=inputs[key].dtype), inputs[key]], dim=1)
    return out


@pytest.mark.parametrize("pads", [1, 8])
def test_a_padded_prompt_decodes_as_the_unpadded_one(model: torch.nn.Module, processor: object, pads: int) -> None:
    """A row of a padded batch: the pads carried into the decode positions (eager) or into the
    attended cache (fast) and changed the answer; both paths now drop them first."""
    inputs = make_inputs(processor, seed=2)
    ref = EagerGreedyGenerator(model, NEVER).generate(inputs, 12)
    padded = _left_padded(inputs, pads)
    assert_same(EagerGreedyGenerator(model, NEVER).generate(padded, 12), ref)
    assert_same(FastGreedyGenerator(model, NEVER).generate(padded, 12), ref)


def test_an_input_neither_path_takes_leaves_the_fast_path_on(model: torch.nn.Module, processor: object) -> None:
    gen = FastGreedyGenerator(model, NEVER)
    one = make_inputs(processor, seed=3)
    two = {k: torch.cat([v, v]) for k, v in one.items()}  # a batch of two: the input's fault
    with pytest.raises(ValueError, match="one sequence at a time"):
        gen.generate(two, 4)
    assert not gen.eager_only and gen.fallbacks == 0
    assert_same(gen.generate(one, 6), EagerGreedyGenerator(model, NEVER).generate(one, 6))


def test_a_fast_path_failure_mid_frame_still_answers_that_frame(model: torch.nn.Module, processor: object,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The eager retry after a failed decode step runs the vision tower a second time; the
    segmenter used to call that an internal error and fail the frame."""
    from qwen3vl_seg_ros.model.segmenter import Qwen3VLSeg
    from qwen3vl_seg_ros.segmenter import SegmenterOptions

    options = SegmenterOptions(device="cpu", mask_head="box", max_new_tokens=12)
    eager = Qwen3VLSeg(model, processor, None, options)
    gen = FastGreedyGenerator(model, eager._stop_tokens(), use_graphs=False)
    fast = Qwen3VLSeg(model, processor, None, options, generator=gen)
    step = gen._step

    def fails_once(state) -> None:
        monkeypatch.setattr(gen, "_step", step)
        raise RuntimeError("simulated failure in a decode step")

    monkeypatch.setattr(gen, "_step", fails_once)
    rgb = np.random.default_rng(15).integers(0, 256, (H, W, 3), dtype=np.uint8)
    out = fast.segment(rgb, "the red cube")
    assert gen.eager_only and gen.fallbacks == 1
    assert out.raw_answer == eager.segment(rgb, "the red cube").raw_answer


def test_segmenter_keeps_eager_decoding_on_cpu(folder: Path) -> None:
    from qwen3vl_seg_ros.model.segmenter import Qwen3VLSeg
    from qwen3vl_seg_ros.segmenter import SegmenterOptions

    seg = Qwen3VLSeg.from_options(SegmenterOptions(model=str(folder), device="cpu", mask_head="box"))
    assert type(seg.generator) is EagerGreedyGenerator and seg.fast_inputs is None


# ------------------------------------------------------------------------------- compilation (opt-in)


@pytest.mark.skipif(os.environ.get("QWEN3VL_SEG_TEST_COMPILE") != "1",
                    reason="Inductor on a CPU takes about a minute; set QWEN3VL_SEG_TEST_COMPILE=1")
def test_compiled_step_matches_eager(model: torch.nn.Module, processor: object, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))  # restored afterwards
    inputs = make_inputs(processor, seed=13)
    gen = FastGreedyGenerator(model, NEVER, compile=True, compile_cache_dir=str(tmp_path / "cache"))
    fast = gen.generate(inputs, 12)
    assert gen.compiled, gen.compile_error
    assert_same(fast, EagerGreedyGenerator(model, NEVER).generate(inputs, 12), atol=1e-4)
    assert any((tmp_path / "cache").iterdir())

"""The box-guided mask decoder: shapes, gradients, size, checkpoints, and vision feature layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3vl_seg_ros.model.checkpoint import (
    DECODER_CONFIG,
    DECODER_WEIGHTS,
    DecoderCheckpointError,
    has_decoder,
    load_decoder,
    save_decoder,
)
from qwen3vl_seg_ros.model.configuration import MaskDecoderConfig
from qwen3vl_seg_ros.model.mask_decoder import BoxGuidedMaskDecoder, upsample_logits
from qwen3vl_seg_ros.model.pixel_fusion import box_gate, frame_gate
from qwen3vl_seg_ros.model.query_encoder import box_features
from qwen3vl_seg_ros.model.tiny import TINY_SIZES, qwen3vl_config, reference_qwen3vl_config
from qwen3vl_seg_ros.model.vision_capture import VisionFeatures, build_vision_features, patches_to_raster

torch.set_num_threads(1)  # tiny models: threads only add contention on a shared machine


def tiny_config() -> MaskDecoderConfig:
    return MaskDecoderConfig.for_qwen3vl(qwen3vl_config({**TINY_SIZES, "vocab_size": 100}), size="tiny")


def inputs(config: MaskDecoderConfig, frames: int = 2, objects: int = 3, gh: int = 6, gw: int = 8,
           image_hw: tuple[int, int] = (90, 120), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    m = config.merge_size
    vision = VisionFeatures(
        vit_maps=[torch.randn(frames, config.vit_dim, gh, gw, generator=g) for _ in config.vit_layers],
        merged_map=torch.randn(frames, config.visual_token_dim, gh // m, gw // m, generator=g),
    )
    xy = torch.rand(objects, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.2 + torch.rand(objects, 2, generator=g) * 0.3], dim=1)
    return dict(
        images=torch.rand(frames, 3, *image_hw, generator=g),
        vision=vision,
        llm_states=torch.randn(objects, config.llm_dim, generator=g),
        boxes=boxes,
        batch_index=torch.arange(objects) % frames,
    )


def test_decoder_output_shapes() -> None:
    config = tiny_config()
    decoder = BoxGuidedMaskDecoder(config).eval()
    out = decoder(**inputs(config, frames=2, objects=3, image_hw=(90, 120)))
    coarse, fine = out.mask_logits
    assert coarse.shape == fine.shape == (3, 23, 30)  # stride 4, rounded up by the stem
    assert out.iou.shape == (3,)
    assert torch.all((out.iou >= 0) & (out.iou <= 1))
    assert torch.isfinite(fine).all()
    assert upsample_logits(fine, 90, 120).shape == (3, 90, 120)


def test_objects_are_decoded_independently_of_their_batch_position() -> None:
    """Batching all objects of a frame must give each the mask it would get alone."""
    config = tiny_config()
    decoder = BoxGuidedMaskDecoder(config).eval()
    data = inputs(config, frames=1, objects=3)
    data["batch_index"] = torch.zeros(3, dtype=torch.long)
    together = decoder(**data).final_logits
    # self-attention lets objects of a frame see each other, so compare against two frames
    # holding the same image: an object alone in its frame must differ only through that.
    two = inputs(config, frames=2, objects=3)
    two["vision"] = VisionFeatures([torch.cat([v, v]) for v in data["vision"].vit_maps],
                                   torch.cat([data["vision"].merged_map] * 2))
    two["images"] = torch.cat([data["images"]] * 2)
    two["llm_states"], two["boxes"] = data["llm_states"], data["boxes"]
    two["batch_index"] = torch.tensor([0, 0, 1])
    split = decoder(**two).final_logits
    single = dict(data, llm_states=data["llm_states"][2:], boxes=data["boxes"][2:],
                  batch_index=torch.zeros(1, dtype=torch.long))
    alone = decoder(**single).final_logits
    torch.testing.assert_close(split[2], alone[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(together[2], alone[0], atol=1e-4)


def test_several_frames_decode_as_each_frame_alone() -> None:
    """A training batch (several frames, objects gathered per frame) gives every object the
    masks and IoU it gets when its frame is decoded alone (the one-frame inference path)."""
    config = tiny_config()
    decoder = BoxGuidedMaskDecoder(config).eval()
    data = inputs(config, frames=3, objects=6, seed=4)
    data["batch_index"] = torch.tensor([0, 0, 1, 2, 2, 2])
    with torch.no_grad():
        together = decoder(**data)
        for frame in range(3):
            mine = data["batch_index"] == frame
            alone = decoder(images=data["images"][frame:frame + 1],
                            vision=VisionFeatures([m[frame:frame + 1] for m in data["vision"].vit_maps],
                                                  data["vision"].merged_map[frame:frame + 1]),
                            llm_states=data["llm_states"][mine], boxes=data["boxes"][mine],
                            batch_index=torch.zeros(int(mine.sum()), dtype=torch.long))
            for ours, ref in zip(together.mask_logits, alone.mask_logits):
                torch.testing.assert_close(ours[mine], ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(together.iou[mine], alone.iou, rtol=1e-4, atol=1e-5)


def test_backward_reaches_every_component() -> None:
    config = tiny_config()
    decoder = BoxGuidedMaskDecoder(config).train()
    out = decoder(**inputs(config))
    target = (torch.rand_like(out.final_logits) > 0.5).float()
    loss = sum(torch.nn.functional.binary_cross_entropy_with_logits(m, target) for m in out.mask_logits)
    loss = loss + (out.iou - 0.5).pow(2).mean()
    loss.backward()
    missing = [n for n, p in decoder.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []
    for component in ("injection", "query_encoder", "pixel_fusion", "coarse_head", "refinement", "fine_head",
                      "iou_head"):
        grads = [p.grad.abs().sum() for p in getattr(decoder, component).parameters()]
        assert torch.stack(grads).sum() > 0, component


def test_parameter_count_for_qwen3vl_4b() -> None:
    config = MaskDecoderConfig.for_qwen3vl(reference_qwen3vl_config("4B"))
    assert config.vit_dim == 1024 and config.llm_dim == 2560 and config.visual_token_dim == 2560
    assert config.vit_layers == (5, 11, 17, 23)
    with torch.device("meta"):
        decoder = BoxGuidedMaskDecoder(config)
    count = sum(p.numel() for p in decoder.parameters())
    assert 15_000_000 <= count <= 20_000_000, count


def test_untrained_decoder_follows_the_box() -> None:
    """The initial mask bias makes an untrained decoder's mask roughly the box (usable default)."""
    config = tiny_config()
    torch.manual_seed(0)
    decoder = BoxGuidedMaskDecoder(config).eval()
    data = inputs(config, frames=1, objects=1, image_hw=(96, 128))
    data["boxes"] = torch.tensor([[0.25, 0.25, 0.75, 0.75]])
    data["batch_index"] = torch.zeros(1, dtype=torch.long)
    mask = upsample_logits(decoder(**data).final_logits, 96, 128)[0] > 0
    box = torch.zeros(96, 128, dtype=torch.bool)
    box[24:72, 32:96] = True
    assert (mask & box).sum() / (mask | box).sum() > 0.5
    assert not mask[:10].any() and not mask[:, :16].any()


def test_box_gate_and_frame_gate() -> None:
    boxes = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    gates = box_gate(boxes, 40, 40, enlarge=0.15, softness=0.05)
    assert gates.shape == (2, 40, 40)
    assert gates[0, 15, 15] > 0.95 and gates[0, 2, 2] < 1e-3 and gates[0, 35, 35] < 1e-3
    merged = frame_gate(gates, torch.tensor([0, 0]), 1)
    torch.testing.assert_close(merged[0], gates.max(0).values)
    per_frame = frame_gate(gates, torch.tensor([0, 1]), 2)
    torch.testing.assert_close(per_frame, gates)


def test_box_gate_has_no_subnormal_floats_far_from_a_small_box() -> None:
    """Subnormal gate values far outside a small box made the CPU decoder 2.5-5x slower
    (bench: 268 vs 52 ms at 640x480 for a box of a tenth of the side); they are zero instead."""
    side = 0.1
    gates = box_gate(torch.tensor([[0.5 - side / 2, 0.5 - side / 2, 0.5 + side / 2, 0.5 + side / 2]]),
                     120, 160, enlarge=0.15, softness=0.05)
    nonzero = gates[gates > 0]
    assert (gates == 0).any() and nonzero.min() >= torch.finfo(torch.float32).tiny
    assert gates[0, 60, 80] > 0.95


def test_a_bf16_box_encoding_keeps_the_fp32_frequencies() -> None:
    """The octave frequencies were a buffer: a decoder loaded in bf16 rounded them (the base
    decoder's top one, 2^15 pi, by 26 rad), so its box features were not those it trained on."""
    from qwen3vl_seg_ros.model.query_encoder import BoxFourierEncoding

    encoder = BoxFourierEncoding(16, 32)
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.33, 0.01, 0.34, 0.02]])
    seen: dict[torch.dtype, torch.Tensor] = {}
    for dtype in (torch.float32, torch.bfloat16):
        encoder.to(dtype)
        hook = encoder.mlp.register_forward_pre_hook(lambda _m, args, d=dtype: seen.__setitem__(d, args[0]))
        encoder(boxes)
        hook.remove()
    torch.testing.assert_close(seen[torch.bfloat16], seen[torch.float32].to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("width, height", [(848, 480), (424, 240), (640, 480), (1280, 720), (320, 240), (100, 75)])
def test_the_decoder_image_has_sides_its_stride_maps_cover(width: int, height: int) -> None:
    """A side that is no multiple of the stem's stride (848x480 -> 256x145) made the stride-4 map
    cover 148 rows, which the upsampling stretched onto 145: masks pulled up to the top left
    (about 10 px at the bottom of an 848x480 frame; mask IoU 0.83 against 0.95)."""
    from qwen3vl_seg_ros.model.mask_decoder import DECODER_SIDE_MULTIPLE, decoder_image_uint8

    image = decoder_image_uint8(np.zeros((height, width, 3), np.uint8), 256)
    _, h, w = image.shape
    assert h % DECODER_SIDE_MULTIPLE == 0 and w % DECODER_SIDE_MULTIPLE == 0, (w, h)
    assert max(h, w) <= 256 and abs(w / h - width / height) < 0.05 * width / height


def test_box_features_are_normalised() -> None:
    feats = box_features(torch.tensor([[0.1, 0.2, 1.1, 1.2], [0.5, 0.5, 0.5005, 0.5005]]))
    torch.testing.assert_close(feats[0], torch.tensor([0.1, 0.2, 1.0, 1.0]))
    assert torch.all((feats >= 0) & (feats <= 1))


# -------------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    config = tiny_config()
    decoder = BoxGuidedMaskDecoder(config).eval()
    save_decoder(decoder, tmp_path)
    assert has_decoder(tmp_path)
    assert json.loads((tmp_path / DECODER_CONFIG).read_text())["format"] == "qwen3vl_seg_mask_decoder"
    loaded = load_decoder(tmp_path)
    assert loaded.config == config
    data = inputs(config)
    torch.testing.assert_close(loaded(**data).final_logits, decoder(**data).final_logits)


def test_checkpoint_refuses_pickles_and_mismatches(tmp_path: Path) -> None:
    config = tiny_config()
    (tmp_path / "mask_decoder.bin").write_bytes(b"not loaded")
    with pytest.raises(DecoderCheckpointError, match="pickle"):
        load_decoder(tmp_path / "mask_decoder.bin")
    with pytest.raises(DecoderCheckpointError, match=r"mask_decoder\.safetensors.*not loaded"):
        load_decoder(tmp_path)
    save_decoder(BoxGuidedMaskDecoder(config), tmp_path)
    other = MaskDecoderConfig.for_qwen3vl(qwen3vl_config({**TINY_SIZES, "vocab_size": 100}), size="tiny",
                                          pixel_dim=24)
    other.save(tmp_path / DECODER_CONFIG)
    with pytest.raises(DecoderCheckpointError, match="does not fit"):
        load_decoder(tmp_path)
    bad = json.loads((tmp_path / DECODER_CONFIG).read_text())
    bad["format"] = "something else"
    (tmp_path / DECODER_CONFIG).write_text(json.dumps(bad))
    with pytest.raises(DecoderCheckpointError, match="not a mask decoder configuration"):
        load_decoder(tmp_path)
    (tmp_path / DECODER_WEIGHTS).unlink()
    with pytest.raises(DecoderCheckpointError, match="lacks"):
        load_decoder(tmp_path)


# --------------------------------------------------------------------- vision feature layout


def test_patches_to_raster_hand_made_example() -> None:
    """A 4x4 patch grid, merge 2: the processor emits 2x2 groups, each in raster order."""
    # raster ids r = row * 4 + col; block-major order lists group (0,0): 0 1 4 5, group (0,1): 2 3 6 7, ...
    block_major = torch.tensor([0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15], dtype=torch.float32)
    tokens = torch.stack([block_major, -block_major], dim=1)  # two channels
    grid = patches_to_raster(tokens, 4, 4, 2)
    assert grid.shape == (2, 4, 4)
    torch.testing.assert_close(grid[0], torch.arange(16, dtype=torch.float32).view(4, 4))
    torch.testing.assert_close(grid[1], -grid[0])


def test_processor_patch_order_is_undone() -> None:
    """Against the real Qwen3-VL image processor: each 16x16 patch of the image is a constant
    brightness that encodes its position; after reordering, the maps read back in raster order."""
    from qwen3vl_seg_ros.model.tiny import build_image_processor

    gh, gw = 4, 6
    ids = np.arange(gh * gw).reshape(gh, gw)
    image = np.repeat(np.repeat(ids * 10, 16, 0), 16, 1).astype(np.uint8)
    image = np.stack([image] * 3, axis=-1)
    processor = build_image_processor(16 * 16, 64 * 96)
    out = processor(images=[image], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, gh, gw]]
    patch_means = out["pixel_values"].mean(dim=1, keepdim=True)  # (gh*gw, 1), block-major
    raster = patches_to_raster(patch_means, gh, gw, 2)[0]
    assert torch.equal(torch.argsort(raster.flatten()), torch.arange(gh * gw))
    features = build_vision_features([patch_means], patch_means[::4], out["image_grid_thw"], 2)
    assert features.vit_maps[0].shape == (1, 1, gh, gw) and features.merged_map.shape == (1, 1, 2, 3)


def test_padding_objects_do_not_change_real_ones() -> None:
    """Fixed-size batches (CUDA graphs) pad with invalid objects; real results must not move."""
    config = tiny_config()
    decoder = BoxGuidedMaskDecoder(config).eval()
    data = inputs(config, frames=1, objects=3)
    data["batch_index"] = torch.zeros(3, dtype=torch.long)
    plain = decoder(**data)
    padded = dict(data, llm_states=torch.cat([data["llm_states"], torch.randn(5, config.llm_dim)]),
                  boxes=torch.cat([data["boxes"], torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 5)]),
                  batch_index=torch.zeros(8, dtype=torch.long), valid=torch.arange(8) < 3)
    out = decoder(**padded)
    torch.testing.assert_close(out.final_logits[:3], plain.final_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.iou[:3], plain.iou, rtol=1e-5, atol=1e-5)
    unmasked = decoder(**dict(padded, valid=None))
    assert not torch.allclose(unmasked.final_logits[:3], plain.final_logits, atol=1e-4)


def test_a_failed_decoder_capture_decodes_eagerly_from_then_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture that fails (out of memory on a GPU) raised out of segment(), and every later frame
    of the same shapes failed the same way. Emulated on the CPU: the capture itself raises."""
    from qwen3vl_seg_ros.model import graphed_decoder

    attempts: list[int] = []

    def failing_capture(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError("CUDA out of memory while capturing (emulated)")

    monkeypatch.setattr(graphed_decoder.torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(graphed_decoder, "capture_graph", failing_capture)
    config = tiny_config()
    decoder = BoxGuidedMaskDecoder(config).eval()
    graphed = graphed_decoder.GraphedMaskDecoder(decoder)
    data = inputs(config, frames=1, objects=3, seed=4)
    del data["batch_index"]
    with torch.inference_mode():
        eager = decoder(**data)
        for _ in range(2):
            out = graphed(data["images"], data["vision"], data["llm_states"], data["boxes"])
            torch.testing.assert_close(out.final_logits, eager.final_logits)
    assert len(attempts) == 1  # the failed shapes are not captured again on every frame


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_match_eager() -> None:
    from qwen3vl_seg_ros.model.graphed_decoder import GraphedMaskDecoder

    config = tiny_config()
    decoder = BoxGuidedMaskDecoder(config).cuda().eval()
    graphed = GraphedMaskDecoder(decoder)
    for objects in (1, 3, 3, 5):
        data = inputs(config, frames=1, objects=objects, seed=objects)
        data = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in data.items()}
        data["vision"] = VisionFeatures([v.cuda() for v in data["vision"].vit_maps], data["vision"].merged_map.cuda())
        del data["batch_index"]
        with torch.inference_mode():
            eager = decoder(**data)
            replay = graphed(data["images"], data["vision"], data["llm_states"], data["boxes"])
        torch.testing.assert_close(replay.final_logits, eager.final_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(replay.iou, eager.iou, rtol=1e-4, atol=1e-4)
    assert len(graphed._graphs) == 3  # buckets 1, 4 and 8


def test_upsampled_masks_in_chunks_equal_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mask stage upsamples a few objects at a time (its memory bound); the masks are the same."""
    from qwen3vl_seg_ros.model import mask_decoder

    logits = torch.randn(7, 12, 16)
    whole = upsample_logits(logits, 45, 60) > 0
    monkeypatch.setattr(mask_decoder, "UPSAMPLE_CHUNK_ELEMENTS", 2 * 45 * 60)  # two objects a chunk
    chunked = mask_decoder.upsampled_masks(logits, 45, 60)
    assert chunked.dtype == torch.bool and torch.equal(chunked, whole)
    assert mask_decoder.upsampled_masks(logits[:0], 45, 60).shape == (0, 45, 60)

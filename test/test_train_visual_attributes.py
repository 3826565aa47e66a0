"""``bench/train_visual_attributes.py``: the flip, the token crops, the head loss, and a short run on
the shipped model (the measurement behind docs/training.md, "What the tower can learn")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import SHIPPED_MODEL, load_bench

MODEL = SHIPPED_MODEL


def _bench():
    return load_bench("train_visual_attributes")


def test_flip_mirrors_frames_and_token_classes_together() -> None:
    rgb = np.zeros((1, 4, 6, 3), np.uint8)
    rgb[0, :, :3] = 255  # left half white
    classes = np.full((1, 2 * 3, 2), -1)
    classes[0, 0] = (4, 1)  # row 0, column 0
    classes[0, 5] = (7, 2)  # row 1, column 2
    frames, mirrored = _bench().flip(rgb, classes, (2, 3))
    assert frames[0, :, 3:].min() == 255 and frames[0, :, :3].max() == 0
    assert mirrored[0, 2].tolist() == [4, 1] and mirrored[0, 3].tolist() == [7, 2]
    assert (mirrored[0, [0, 1, 4, 5]] == -1).all()


def test_token_crops_take_each_labelled_token_region() -> None:
    rgb = np.zeros((1, 64, 96, 3), np.uint8)
    rgb[0, 32:, 32:64] = (255, 0, 0)  # token (1, 1) of a 2x3 grid
    classes = np.full((1, 6, 2), -1)
    classes[0, 4, 1] = 3
    classes[0, 0, 1] = 0
    classes[0, 2, 0] = 5  # a colour label only: not a shape crop
    x, y = _bench().token_crops(rgb, classes, (2, 3), group=1, side=16)
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 3]
    assert x[1, 0].min() == pytest.approx(0.5) and x[1, 1].max() == pytest.approx(-0.5)
    assert x[0].max() == pytest.approx(-0.5)


def test_head_loss_ignores_unlabelled_tokens_and_matches_cross_entropy() -> None:
    torch.manual_seed(0)
    heads = torch.nn.ModuleList([torch.nn.Linear(5, 3), torch.nn.Linear(5, 2)])
    tokens = torch.randn(1, 4, 5)
    classes = torch.tensor([[[0, -1], [2, 1], [-1, -1], [-1, 0]]])
    loss = _bench().head_loss(heads, tokens, classes)
    flat = tokens[0]
    expected = (torch.nn.functional.cross_entropy(heads[0](flat[[0, 1]]), torch.tensor([0, 2]))
                + torch.nn.functional.cross_entropy(heads[1](flat[[1, 3]]), torch.tensor([1, 0]))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    none = _bench().head_loss(heads, tokens, torch.full((1, 4, 2), -1))
    assert none.item() == 0.0


@pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="no shipped model")
def test_short_run_on_the_shipped_model(tmp_path: Path) -> None:
    out = tmp_path / "vis.json"
    argv = ["--model", str(MODEL), "--train-scenes", "8", "--val-scenes", "4", "--steps", "2", "--batch", "4",
            "--eval-every", "1", "--cnn-epochs", "1", "--workers", "1", "--out", str(out),
            "--keep", "1.0", "--position", "--save-model", str(tmp_path / "model")]
    assert _bench().main(argv) == 0
    results = json.loads(out.read_text())
    assert results["grid"] == [6, 8] and results["labelled_val_tokens"] > 0
    assert set(results["majority"]) == {"colour", "shape", "row", "col"}
    assert [h["step"] for h in results["tower"]] == [0, 1, 2]
    assert all(0.0 <= h[g] <= 1.0 for h in results["tower"] for g in ("colour", "shape", "row", "col"))
    assert np.isfinite(results["tower"][-1]["loss"]) and len(results["crop_cnn_shape"]) == 1
    assert 0.0 < results["tower"][-1]["drift"] < 1.0  # step 2 compares the once-updated tower with the start
    # the saved copy: the tower changed, everything else byte for byte the shipped model's
    from safetensors.torch import load_file

    before = load_file(str(MODEL / "model.safetensors"))
    after = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.visual.") for k in changed)
    assert all(after[k].dtype == before[k].dtype for k in before)
    with pytest.raises(FileExistsError):
        _bench().save_model(MODEL, tmp_path / "model", torch.nn.Linear(1, 1))


def test_drift_is_the_relative_squared_change() -> None:
    old = [torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])]
    new = [torch.tensor([[[3.0, 5.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])]
    # first output: |(0, 1)|^2 / |(3, 4)|^2 = 1 / 25; second unchanged; the mean of the two
    assert _bench().drift(new, old).item() == pytest.approx(0.5 / 25)
    assert _bench().drift(old, old).item() == 0.0


@pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="no shipped model")
def test_fast_pixel_values_equal_the_processors() -> None:
    """The bench builds pixel values by table lookup; they must be the processor's, bit for bit."""
    encoder = _bench().TokenEncoder(MODEL, scale=1, reinit=False, frame_pixels=256 * 192)
    rgb = np.random.default_rng(0).integers(0, 256, size=(3, 192, 256, 3), dtype=np.uint8)
    fast, grid = encoder.inputs(rgb)
    assert encoder.fast_sizes == {(192, 256): True}
    slow, slow_grid = encoder._processor_inputs(rgb)
    assert grid == slow_grid == (6, 8)
    assert torch.equal(fast["pixel_values"], slow["pixel_values"])
    assert torch.equal(fast["image_grid_thw"], slow["image_grid_thw"])
    # a size the processor resizes goes through the processor
    odd = np.zeros((1, 100, 130, 3), np.uint8)
    assert encoder._fast_inputs(odd) is None

"""``bench/plant_colour_heads.py``: the rotary dimensions it writes into, the probe it fits, and a
short run on the shipped model whose output loads and differs only where it should."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import SHIPPED_MODEL, load_bench


def _bench():
    return load_bench("plant_colour_heads")


def test_code_dims_are_the_slowest_temporal_pairs() -> None:
    # head dim 48 = 24 rotary pairs; interleaved M-RoPE [10, 7, 7]: height 1, 4, .., 19, width 2, 5, .., 20,
    # time the rest (0, 3, .., 18, 21, 22, 23); the slowest pairs are the highest indices
    dims = _bench().code_dims(48, [10, 7, 7], 5e6, 6)
    assert dims == [21, 22, 23, 45, 46, 47]
    assert _bench().code_dims(48, [10, 7, 7], 5e6, 8) == [18, 21, 22, 23, 42, 45, 46, 47]
    with pytest.raises(ValueError, match="temporal"):
        _bench().code_dims(48, [10, 7, 7], 5e6, 21)


def test_fit_code_separates_classes_and_is_centred() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g)
    x = torch.nn.functional.one_hot(y, 4).float() * 3 + 0.3 * torch.randn(400, 4, generator=g)
    x = torch.cat([x, torch.randn(400, 6, generator=g)], 1)
    code, scores = _bench().fit_code(x, y, 4)
    assert code.shape == (10, 4)
    torch.testing.assert_close(code.sum(1), torch.zeros(10), atol=1e-5, rtol=0)
    assert scores["named"] > 0.95 and scores["none"] > 0.95 and scores["held_out_rows"] == 80


@pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").is_file(), reason="no shipped model")
def test_short_run_changes_only_the_layers_query_and_key(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "planted"
    assert _bench().main(["--model", str(SHIPPED_MODEL), "--out", str(out), "--scenes", "4"]) == 0
    summary = json.loads((out / "planted_colour_heads.json").read_text())
    assert json.loads((out / "training_info.json").read_text())["planted_colour_heads"] == summary
    assert summary["query_heads"] == [2, 3] and len(summary["dims"]) == 11
    before, after = load_file(str(SHIPPED_MODEL / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    prefix = "model.language_model.layers.1.self_attn."
    assert changed == {prefix + "q_proj.weight", prefix + "k_proj.weight"}
    hd = 48
    k, q = after[prefix + "k_proj.weight"], after[prefix + "q_proj.weight"]
    torch.testing.assert_close(k[:hd], before[prefix + "k_proj.weight"][:hd])  # key head 0 kept
    torch.testing.assert_close(q[:2 * hd], before[prefix + "q_proj.weight"][:2 * hd])  # its query heads kept
    outside = [d for d in range(hd) if d not in summary["dims"]]
    assert k[hd:][outside].abs().max() == 0 and q[2 * hd:3 * hd][outside].abs().max() == 0
    assert k[hd:][summary["dims"]].abs().max() > 0 and torch.equal(q[2 * hd:3 * hd], q[3 * hd:])
    from qwen3vl_seg_ros.model.segmenter import Qwen3VLSeg
    from qwen3vl_seg_ros.segmenter import SegmenterOptions

    Qwen3VLSeg.from_options(SegmenterOptions(model=str(out), device="cpu", mask_head="box"))  # loads as a checkpoint

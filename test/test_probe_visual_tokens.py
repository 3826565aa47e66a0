"""``bench/probe_visual_tokens.py``: the linear probe, the per-token pixel features, and a run on
the shipped model (the measurement behind the attribute loss; docs/training.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import SHIPPED_MODEL, load_bench

MODEL = SHIPPED_MODEL


def _bench():
    return load_bench("probe_visual_tokens")


def test_linear_probe_reads_what_the_features_hold() -> None:
    probe = _bench().linear_probe
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    centres = np.array([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    x = np.concatenate([centres[y] + rng.normal(0, 0.5, (600, 2)), rng.normal(0, 1, (600, 6))], axis=1)
    held = probe(x[:450], y[:450], x[450:], y[450:], 3, steps=200)
    assert held["test"] > 0.97 and held["test_tokens"] == 150
    noise = probe(rng.normal(0, 1, (600, 8))[:450], y[:450], rng.normal(0, 1, (150, 8)), y[450:], 3, steps=200)
    assert noise["test"] < 0.5  # chance is a third
    assert held["majority"] == pytest.approx(np.bincount(y[450:]).max() / 150)


def test_pixel_features_describe_each_token_region() -> None:
    rgb = np.zeros((64, 96, 3), np.uint8)
    rgb[:32, :32] = (255, 0, 0)
    rgb[32:, 64:, 1] = np.tile(np.arange(32, dtype=np.uint8)[None, :] * 8, (32, 1))
    feats = _bench().pixel_features(rgb, (2, 3))
    assert feats.shape == (6, 9)
    assert feats[0].tolist()[:3] == [1.0, 0.0, 0.0] and feats[0][3:6].tolist() == [0.0, 0.0, 0.0]
    assert feats[5][4] > 0.2 and feats[5][1] == pytest.approx(np.arange(32).mean() * 8 / 255, rel=1e-5)
    assert not feats[1].any()


@pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="no shipped model")
def test_probe_runs_on_the_shipped_model(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    assert _bench().main(["--model", str(MODEL), "--scenes", "6", "--steps", "20", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    expected = {"merged/colour", "merged/shape", "merged/row", "merged/col", "pixels/colour", "deepstack_0/shape"}
    assert expected <= set(results)
    assert all(0.0 <= r["test"] <= 1.0 and r["test_tokens"] > 0 for r in results.values())

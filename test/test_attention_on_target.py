"""``bench/attention_on_target.py``: the target's tokens, the simple commands, and a short run on the
shipped model (the measurement behind docs/training.md, "Where the language model looks")."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import SHIPPED_MODEL, load_bench

MODEL = SHIPPED_MODEL


def _bench():
    return load_bench("attention_on_target")


def test_target_cells_are_the_tokens_the_object_covers() -> None:
    mask = np.zeros((64, 96), bool)  # a 2x3 grid of 32x32 tokens
    mask[0:32, 32:64] = True  # all of token (0, 1)
    mask[40:50, 70:80] = True  # 100 of token (1, 2)'s 1024 pixels: under a quarter
    assert _bench().target_cells(mask, (2, 3)).tolist() == [False, True, False, False, False, False]
    small = np.zeros((64, 96), bool)
    small[40:50, 70:80] = True  # covers no token by a quarter: the one it covers most
    assert _bench().target_cells(small, (2, 3)).tolist() == [False, False, False, False, False, True]


def test_simple_commands_name_only_what_is_unique() -> None:
    from qwen3vl_seg_ros.training.dataset import DataConfig
    from qwen3vl_seg_ros.training.synthetic import generate_sample, split_seed

    cfg = DataConfig(width=128, height=96, min_objects=3, max_objects=6).scene_config()
    seen = 0
    for i in range(6):
        scene, _ = generate_sample(split_seed("val", i), cfg)
        for kind, command, k in _bench().simple_commands(scene):
            target = scene.objects[k]
            word = target.colour if kind == "colour" else target.shape
            assert word in command.split()
            assert sum(getattr(o, kind) == word for o in scene.objects) == 1
            seen += 1
    assert seen > 0


@pytest.mark.skipif(not (MODEL / "config.json").is_file(), reason="no shipped model")
def test_short_run_on_the_shipped_model(tmp_path: Path) -> None:
    out = tmp_path / "att.json"
    assert _bench().main(["--model", str(MODEL), "--scenes", "6", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    found = [results[k] for k in ("colour", "shape") if k in results]
    assert found
    for r in found:
        shares = np.array(r["share_on_target"])
        assert shares.ndim == 2 and ((shares >= 0) & (shares <= 1)).all()
        assert 0 < r["uniform"] < 1 and 0 <= r["first_number_within_100"] <= 1
        assert 0 < r["any_object_within_100"] <= 1  # the target itself is always near enough
        on_target, on_others = np.array(r["share_on_target"]), np.array(r["share_on_other_objects"])
        assert on_others.shape == shares.shape and (on_target + on_others <= 1 + 1e-6).all()
        among = np.array(r["target_among_objects"])
        assert ((among >= 0) & (among <= 1)).all() and 0 < r["uniform_among_objects"] <= 1
        if "word_in_states" in r:
            assert len(r["word_in_states"]["per_layer"]) == shares.shape[0] + 1
            spread = r["word_spread"]
            assert len(spread["varying"]) == len(spread["word"]) == shares.shape[0]
            assert all(0 <= w <= v <= 1 for v, w in zip(spread["varying"], spread["word"]))


def test_label_first_model_reads_its_label_words(tmp_path: Path) -> None:
    """A checkpoint trained with label-first answers (its training_info.json says so) is read with the
    target's label before the first number, and gets the label-word choice as well."""
    from qwen3vl_seg_ros.model.tiny import build_tiny_checkpoint

    folder = build_tiny_checkpoint(tmp_path / "model", decoder=False, answer=None, seed=5)
    (folder / "training_info.json").write_text(json.dumps({"answer_format": "label_first"}))
    bench = _bench()
    reader = bench.Reader(str(folder))
    assert reader.label_first and reader.prefix("red mug") == '[{"label": "red mug", "bbox_2d": ['
    out = tmp_path / "att.json"
    args = ["--model", str(folder), "--scenes", "8", "--width", "128", "--height", "96", "--out", str(out)]
    assert bench.main(args) == 0
    results = json.loads(out.read_text())
    assert results["answer_format"] == "label_first"
    found = [results[k]["label_word"] for k in ("colour", "shape") if k in results]
    assert found and all(0 <= r["right"] <= 1 and 0 < r["any_object"] <= 1 for r in found)
    assert all(0 <= r["first_number_within_100"] <= 1 for r in found)


def test_label_echo_model_is_read_with_the_commands_words(tmp_path: Path, monkeypatch) -> None:
    """A label-echo checkpoint is read with the command's own words as the label ("red object",
    "mug"), and has no label word of its own to choose."""
    from qwen3vl_seg_ros.model.tiny import build_tiny_checkpoint

    folder = build_tiny_checkpoint(tmp_path / "model", decoder=False, answer=None, seed=5)
    (folder / "training_info.json").write_text(json.dumps({"answer_format": "label_echo"}))
    bench = _bench()
    labels: list[str] = []
    read = bench.Reader.read
    monkeypatch.setattr(bench.Reader, "read", lambda self, rgb, command, masks, k, label: (
        labels.append((command, label)), read(self, rgb, command, masks, k, label))[1])
    out = tmp_path / "att.json"
    args = ["--model", str(folder), "--scenes", "6", "--width", "128", "--height", "96", "--out", str(out)]
    assert bench.main(args) == 0
    results = json.loads(out.read_text())
    assert results["answer_format"] == "label_echo"
    assert labels and all(command == f"the {label}" for command, label in labels)
    assert not any("label_word" in results[k] for k in ("colour", "shape") if k in results)


def test_label_choice_of_hand_made_hits() -> None:
    r = _bench().label_choice([(True, 0.25, 50.0), (False, 0.5, 300.0), (True, 1 / 3, 100.0),
                               (False, 0.25, float("inf"))])
    assert r["right"] == 0.5 and r["any_object"] == pytest.approx((0.25 + 0.5 + 1 / 3 + 0.25) / 4)
    assert r["first_number_within_100"] == 0.5


def test_summary_of_hand_made_readings() -> None:
    """Two commands, one layer of two heads: the means, and the target's part of the attention on objects."""
    bench = _bench()
    a = bench.Reading(np.array([[0.6, 0.2]]), np.array([[0.2, 0.6]]), 0.1, 0.5, 7)
    b = bench.Reading(np.array([[0.2, 0.0]]), np.array([[0.2, 0.0]]), 0.3, 0.25, 7)
    r = bench.summarise([(a, 50.0, 0.5), (b, 300.0, 1.0)])
    assert r["commands"] == 2 and r["uniform"] == pytest.approx(0.2) and r["uniform_among_objects"] == 0.375
    assert r["share_on_target"] == [[0.4, 0.1]] and r["share_on_other_objects"] == [[0.2, 0.3]]
    assert r["target_among_objects"] == [[0.625, 0.125]]  # (0.75 + 0.5) / 2 and (0.25 + 0) / 2
    assert r["some_head_mostly_on_target"] == 0.5 and r["first_number_within_100"] == 0.5
    assert r["any_object_within_100"] == 0.75


def test_probe_states_finds_the_layer_that_holds_the_word() -> None:
    """Layer 0 says nothing of the word, layer 1 holds it along one axis each."""
    rng = np.random.default_rng(0)
    words = [["red", "blue", "green"][i % 3] for i in range(90)]
    states = rng.normal(size=(90, 2, 6)).astype(np.float32)
    for i, w in enumerate(words):
        states[i, 1, ["red", "blue", "green"].index(w)] += 5.0
    r = _bench().probe_states(states, words)
    assert r["classes"] == 3 and r["test_commands"] == 27
    assert r["per_layer"][1] == 1.0 and r["per_layer"][0] < 0.7


def test_word_spread_of_hand_made_states() -> None:
    """A constant vector of mean square 99, plus +-1 along one axis by word (layer 1) or by command
    alone (layer 0): 1 % of the mean square varies in both, and only layer 1's is the word."""
    words = ["red", "blue"] * 4
    states = np.zeros((8, 2, 100))
    states[:, :, 1:] = 1.0
    for i, w in enumerate(words):
        states[i, 1, 0] = 1.0 if w == "red" else -1.0
        states[i, 0, 0] = 1.0 if i < 4 else -1.0  # half the commands of each word on each side
    r = _bench().word_spread(states, words)
    assert r["varying"] == [0.01, 0.01] and r["word"] == [0.0, 0.01]

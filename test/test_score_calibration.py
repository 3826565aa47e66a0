"""Score calibration: the fit, the file, the CLI and the segmenter that applies it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3vl_seg_ros import calibrate
from qwen3vl_seg_ros.model.score_calibration import (
    CALIBRATION_FILE,
    CalibrationError,
    ScoreCalibration,
    expected_calibration_error,
    file_sha256,
    fit_calibration,
    from_json,
    load_calibration,
)
from qwen3vl_seg_ros.model.segmenter import Qwen3VLSeg
from qwen3vl_seg_ros.model.tiny import build_tiny_checkpoint
from qwen3vl_seg_ros.segmenter import SegmenterOptions
from qwen3vl_seg_ros.types import SegmenterError

torch.set_num_threads(1)


def synthetic_outcomes(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw scores crowded into 0.2-0.35 (as the tiny model's are) whose true chance of being right
    rises from about 0.1 to 0.9 across that range: ranked well, stated badly."""
    rng = np.random.default_rng(seed)
    box = rng.uniform(0.25, 0.4, n)
    mask = rng.uniform(0.8, 0.95, n)
    truth = 1 / (1 + np.exp(-(40 * (box - 0.32) + 10 * (mask - 0.875))))
    right = rng.random(n) < truth
    return box, mask, right


def test_expected_calibration_error_against_hand_values() -> None:
    # bin [0.2, 0.3): stated 0.25, observed 0.5 (weight 0.5); bin [0.9, 1]: stated 0.95, observed 1.0
    ece = expected_calibration_error([0.25, 0.25, 0.95, 0.95], [True, False, True, True])
    assert ece == pytest.approx(0.5 * 0.25 + 0.5 * 0.05)
    assert np.isnan(expected_calibration_error([], []))


def test_fit_turns_ranked_scores_into_probabilities() -> None:
    box, mask, right = synthetic_outcomes()
    cal = fit_calibration(box, mask, right)
    assert min(cal.weights) >= 0 and cal.fitted_on["objects"] == len(right)
    raw_ece = expected_calibration_error(box * mask, right)
    box2, mask2, right2 = synthetic_outcomes(seed=1)  # judged on other draws
    stated = cal.probabilities(box2, mask2)
    assert raw_ece > 0.2
    assert expected_calibration_error(stated, right2) < 0.05
    # a more confident box never lowers the probability
    grid = cal.probabilities(np.linspace(0.01, 1, 50), np.full(50, 0.9))
    assert np.all(np.diff(grid) >= 0) and grid[-1] > grid[0]
    assert cal.probability(0.3, 0.9) == pytest.approx(float(cal.probabilities([0.3], [0.9])[0]))


def test_fit_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(CalibrationError, match="at least 20"):
        fit_calibration([0.3] * 5, [0.9] * 5, [True, False] * 2 + [True])
    with pytest.raises(CalibrationError, match="every object was right"):
        fit_calibration([0.3] * 30, [0.9] * 30, [True] * 30)


def test_non_finite_scores_are_left_out_of_the_fit() -> None:
    """One NaN box score (a low-precision evaluation) made every mean NaN: the file was written,
    exit 0, and the node then refused it at configure."""
    box, mask, right = synthetic_outcomes(500)
    box[3], mask[7] = np.nan, np.inf
    cal = fit_calibration(box, mask, right)
    assert cal.fitted_on["non_finite_dropped"] == 2 and cal.fitted_on["objects"] == 498
    assert from_json(cal.to_json()).weights == cal.weights  # a file that loads


def test_file_round_trip(tmp_path: Path) -> None:
    box, mask, right = synthetic_outcomes(500)
    cal = fit_calibration(box, mask, right, box_refine_passes=2, note="unit test")
    cal.save(tmp_path / CALIBRATION_FILE)
    loaded = load_calibration(tmp_path)
    assert isinstance(loaded, ScoreCalibration) and loaded.box_refine_passes == 2
    np.testing.assert_allclose(loaded.probabilities(box, mask), cal.probabilities(box, mask))
    assert loaded.fitted_on["note"] == "unit test"
    assert load_calibration(tmp_path / "elsewhere") is None


@pytest.mark.parametrize("edit, message", [
    (lambda d: "{not json", "not valid JSON"),
    (lambda d: {**d, "format": "something/else"}, "not a score calibration"),
    (lambda d: {**d, "weights": [1.0, float("nan")]}, "'weights' must be two finite numbers"),
    (lambda d: {**d, "weights": [1.0]}, "'weights' must be two finite numbers"),
    (lambda d: {**d, "std": [0.1, 0.0]}, "'std' must be two finite positive numbers"),
    (lambda d: {**d, "bias": "high"}, "'bias' must be a finite number"),
    (lambda d: {**d, "box_refine_passes": True}, "'box_refine_passes' must be an integer"),
    # a negative weight lowers the score as the box grows more confident
    (lambda d: {**d, "weights": [-0.5, 0.38]}, "'weights' must be two finite numbers >= 0"),
    # another source would never be applied, while the log said the scores were calibrated
    (lambda d: {**d, "mask_source": "Decoder"}, "'mask_source' must be \"decoder\", got 'Decoder'"),
])
def test_malformed_files_are_refused_with_the_reason(edit, message) -> None:
    good = json.loads(ScoreCalibration((1.0, 1.0), 0.0, (0.0, 0.0), (1.0, 1.0)).to_json())
    bad = edit(good)
    text = bad if isinstance(bad, str) else json.dumps(bad)
    with pytest.raises(CalibrationError, match=message):
        from_json(text, "x.json")


def _evaluation(folder: Path, box: np.ndarray, mask: np.ndarray, right: np.ndarray, passes: int = 1) -> Path:
    """An evaluation folder as evaluate writes it: one object per sample, its box on the target or not."""
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps({"settings": {"model": "m", "box_refine_passes": passes}}))
    with (folder / "samples.jsonl").open("w") as f:
        for b, m, r in zip(box, mask, right):
            target = [10.0, 10.0, 30.0, 30.0]
            pred = target if r else [60.0, 60.0, 80.0, 80.0]
            f.write(json.dumps({"pred_boxes": [pred], "gt_boxes": [target], "box_scores": [float(b)],
                                "mask_scores": [float(m)], "scores": [float(b * m)],
                                "mask_sources": ["decoder"]}) + "\n")
        # a no-target sample with one (wrong) answer, and one answered by another mask head
        f.write(json.dumps({"pred_boxes": [[0, 0, 5, 5]], "gt_boxes": [], "box_scores": [0.3],
                            "mask_scores": [0.9], "scores": [0.27], "mask_sources": ["decoder"]}) + "\n")
        f.write(json.dumps({"pred_boxes": [[0, 0, 5, 5]], "gt_boxes": [], "box_scores": [0.3],
                            "mask_scores": [0.9], "scores": [0.27], "mask_sources": ["grabcut"]}) + "\n")
    return folder


def test_cli_fits_on_one_evaluation_and_judges_on_another(tmp_path: Path, capsys) -> None:
    fit_dir = _evaluation(tmp_path / "val", *synthetic_outcomes(600, seed=2))
    check_dir = _evaluation(tmp_path / "test", *synthetic_outcomes(600, seed=3))
    settings, outcomes = calibrate.read_evaluation(fit_dir)
    assert len(outcomes) == 601 and outcomes[-1][2] is False  # the grabcut object is left out
    out = tmp_path / CALIBRATION_FILE
    assert calibrate.main([str(fit_dir), "--check", str(check_dir), "--out", str(out)]) == 0
    held_out = load_calibration(tmp_path).fitted_on["held_out"]
    assert held_out["objects"] == 601
    assert held_out["ece_calibrated"] < held_out["ece_raw_score"]
    assert 0.5 < held_out["auc_calibrated"] <= 1


def test_cli_judges_held_out_evaluations_without_objects(tmp_path: Path) -> None:
    """Held-out evaluations whose answers were all empty: the fit is still written, and the
    judgement says it saw no object (it raised before, and the fitted file was lost)."""
    fit_dir = _evaluation(tmp_path / "val", *synthetic_outcomes(200, seed=2))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "report.json").write_text(json.dumps({"settings": {"model": "m", "box_refine_passes": 1}}))
    (empty / "samples.jsonl").write_text(json.dumps({"pred_boxes": [], "gt_boxes": [[1, 1, 5, 5]], "box_scores": [],
                                                     "mask_scores": [], "scores": [], "mask_sources": []}) + "\n")
    out = tmp_path / CALIBRATION_FILE
    assert calibrate.main([str(fit_dir), "--check", str(empty), "--out", str(out)]) == 0
    assert load_calibration(tmp_path).fitted_on["held_out"]["objects"] == 0


def test_box_on_a_target_at_iou_exactly_half_is_wrong_as_in_box_accuracy() -> None:
    """The calibration counts an object right exactly where box accuracy counts a hit (IoU > 0.5)."""
    from qwen3vl_seg_ros.training.metrics import evaluate_sample

    target, half = [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0]  # IoU exactly 0.5
    record = {"pred_boxes": [half], "gt_boxes": [target], "box_scores": [0.5], "mask_scores": [0.5],
              "mask_sources": ["decoder"]}
    assert calibrate.object_outcomes(record) == [(0.5, 0.5, False)]
    mask = np.zeros((1, 10, 10), bool)
    mask[0, :5] = True
    full = np.ones((1, 10, 10), bool)
    assert evaluate_sample(np.array([half]), mask, np.array([target]), full, "referring").box_matches == 0


def test_cli_refuses_mixed_setups_and_non_evaluations(tmp_path: Path, capsys) -> None:
    one = _evaluation(tmp_path / "a", *synthetic_outcomes(100), passes=1)
    two = _evaluation(tmp_path / "b", *synthetic_outcomes(100), passes=2)
    assert calibrate.main([str(one), str(two), "--out", str(tmp_path / "c.json")]) == 2
    assert "box_refine_passes" in capsys.readouterr().err
    assert calibrate.main([str(tmp_path), "--out", str(tmp_path / "c.json")]) == 2
    assert "not an evaluation folder" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


@pytest.fixture(scope="module")
def seg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    answer = ({"bbox_2d": [100, 200, 400, 600], "label": "red cube"},)
    return build_tiny_checkpoint(tmp_path_factory.mktemp("cal"), answer=answer)


def _image() -> np.ndarray:
    rgb = np.random.default_rng(0).integers(0, 60, (96, 128, 3), dtype=np.uint8)
    rgb[19:58, 13:51] = (220, 30, 30)
    return rgb


def test_segmenter_states_calibrated_scores_where_the_calibration_applies(seg_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(seg_folder, folder)
    cal = ScoreCalibration(weights=(2.0, 1.0), bias=0.5, mean=(-1.0, -0.1), std=(0.2, 0.1))
    cal.save(folder / CALIBRATION_FILE)
    notes: list[str] = []
    seg = Qwen3VLSeg.from_options(SegmenterOptions(model=str(folder), device="cpu"), notes.append)
    (inst,) = seg.segment(_image(), "the red cube").instances
    assert inst.score == pytest.approx(cal.probability(inst.box_score, inst.mask_score))
    assert inst.score != pytest.approx(inst.box_score * inst.mask_score)
    assert any("scores calibrated" in n for n in notes)

    def raw_score(**options) -> float:
        said: list[str] = []
        seg = Qwen3VLSeg.from_options(SegmenterOptions(model=str(folder), device="cpu", **options), said.append)
        (inst,) = seg.segment(_image(), "the red cube").instances
        assert inst.score == pytest.approx(inst.box_score * inst.mask_score)
        return said

    assert not any("calibration" in n for n in raw_score(calibrate_scores=False))
    assert any("box_refine_passes=1, not 2" in n for n in raw_score(box_refine_passes=2))
    assert any("not in use" in n for n in raw_score(mask_head="box"))
    ScoreCalibration(weights=(2.0, 1.0), bias=0.5, mean=(-1.0, -0.1), std=(0.2, 0.1),
                     decoder_sha256="0" * 64).save(folder / CALIBRATION_FILE)
    assert any("another mask decoder" in n for n in raw_score())


def test_cli_fingerprints_the_evaluated_models_decoder(seg_folder: Path, tmp_path: Path) -> None:
    folder = _evaluation(tmp_path / "val", *synthetic_outcomes(200))
    (folder / "report.json").write_text(json.dumps({"settings": {"model": str(seg_folder), "box_refine_passes": 1}}))
    out = tmp_path / CALIBRATION_FILE
    assert calibrate.main([str(folder), "--out", str(out)]) == 0
    assert load_calibration(tmp_path).decoder_sha256 == file_sha256(seg_folder / "mask_decoder.safetensors")


def test_segmenter_refuses_a_broken_calibration_file(seg_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(seg_folder, folder)
    (folder / CALIBRATION_FILE).write_text('{"format": "qwen3vl_seg_ros/score_calibration/1"}')
    with pytest.raises(SegmenterError, match=r"'bias' must be a finite number.*calibrate_scores to false"):
        Qwen3VLSeg.from_options(SegmenterOptions(model=str(folder), device="cpu"))
    Qwen3VLSeg.from_options(SegmenterOptions(model=str(folder), device="cpu", calibrate_scores=False))

"""Evaluation through the production segmenter, on tiny checkpoints whose answers are known."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pool_tasks
import pytest
import torch

from qwen3vl_seg_ros.grounding import format_answer, parse_answer
from qwen3vl_seg_ros.model.tiny import build_tiny_checkpoint
from qwen3vl_seg_ros.training.dataset import DataConfig, synthetic_examples
from qwen3vl_seg_ros.training.evaluate import EvalSettings, main, run_evaluation, run_in_processes

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
W, H = 128, 96
SCENES = 4
ANSWER = ({"bbox_2d": [100, 200, 450, 700], "label": "red cube"},)


@pytest.fixture(scope="module")
def box_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Always answers one fixed box (with its mask token), whatever the image and command."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("box"), answer=ANSWER)


@pytest.fixture(scope="module")
def empty_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Always answers "[]": finds nothing."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("empty"), answer=())


def settings(model: Path, **changes: object) -> EvalSettings:
    base = dict(model=str(model), split="val", scenes=SCENES, queries_per_scene=2, width=W, height=H,
                workers=1, heads=("box", "grabcut", "depth"))
    base.update(changes)
    return EvalSettings(**base)


def samples() -> list:
    cfg = DataConfig(width=W, height=H).scene_config()
    return [ex for i in range(SCENES) for ex in synthetic_examples("val", i, cfg, with_depth=True)[:2]]


@pytest.fixture(scope="module")
def box_report(box_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("report")
    return run_evaluation(settings(box_model, out=str(out)), log=lambda m: None), out


def test_box_head_metrics_match_a_hand_computation(box_report: tuple[dict, Path]) -> None:
    report, tmp_path = box_report
    exs = samples()
    assert report["complete"] and report["samples"] == len(exs)
    # what the box head must score, computed here with plain numpy from the recorded answers: the
    # weight-free heads take the grounding model's boxes (the decoder's may be refined from its masks)
    records = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    fixed = parse_answer(format_answer(ANSWER, mask_token=False), W, H).boxes
    fitted = [len(r["model_boxes"]) == 1 and np.allclose(r["model_boxes"], fixed) for r in records]
    assert sum(fitted) >= len(exs) - 2  # the fitted answer, for (almost) every command
    ious = []
    for ex, r in zip(exs, records):
        assert r["expression"] == ex.expression
        assert all(box in r["scene_boxes"] for box in np.asarray(ex.boxes).tolist())  # targets among the objects
        pred = np.zeros((H, W), bool)
        for bx in r["model_boxes"]:
            x1, y1, x2, y2 = int(np.floor(bx[0])), int(np.floor(bx[1])), int(np.ceil(bx[2])), int(np.ceil(bx[3]))
            pred[y1:y2, x1:x2] = True
        if len(ex.masks) == 0:
            ious.append(float(not r["model_boxes"]))  # right only when nothing is predicted
            continue
        gt = ex.masks.any(0)
        ious.append((pred & gt).sum() / (pred | gt).sum())
    box_metrics = report["methods"]["box"]["overall"]
    assert box_metrics["giou"] == pytest.approx(float(np.mean(ious)), abs=1e-6)
    assert box_metrics["num_samples"] == len(exs)
    no_target = [r for ex, r in zip(exs, records) if len(ex.masks) == 0]
    if no_target:
        assert box_metrics["no_target_acc"] == pytest.approx(np.mean([not r["model_boxes"] for r in no_target]))
    # every head was scored on the same boxes; the per-type breakdown covers the samples
    assert set(report["methods"]) == {"decoder", "box", "grabcut", "depth", "decoder@score"}
    by_type = report["methods"]["decoder"]["by_type"]
    assert sum(m["num_samples"] for m in by_type.values()) == len(exs)
    assert set(by_type) == {ex.query_type for ex in exs}
    # files: the JSON report, per-sample answers, and a PNG figure
    saved = json.loads((tmp_path / "report.json").read_text(), parse_constant=_refuse)  # strict JSON
    assert saved["methods"]["box"]["overall"]["giou"] == pytest.approx(box_metrics["giou"])
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert len(lines) == len(exs)
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert report["timing"]["ms_per_command_median"] > 0


def _refuse(constant: str) -> None:
    raise AssertionError(f"report.json holds {constant}, which strict JSON readers (jq, JavaScript) reject")


def test_a_report_is_strict_json_when_a_statistic_is_undefined(box_model: Path, tmp_path: Path) -> None:
    """A score AUC over objects that are all right, or all wrong, is NaN: written as null."""
    report = run_evaluation(settings(box_model, scenes=1, queries_per_scene=1, heads=(), examples=0,
                                     out=str(tmp_path)), log=lambda m: None)
    saved = json.loads((tmp_path / "report.json").read_text(), parse_constant=_refuse)
    auc = report["scores"]["reported"]["auc"]
    assert auc != auc and saved["scores"]["reported"]["auc"] is None  # NaN -> null


def test_a_model_that_finds_nothing(empty_model: Path) -> None:
    report = run_evaluation(settings(empty_model, heads=("box",)), log=lambda m: None)
    exs = samples()
    with_target = sum(1 for ex in exs if len(ex.masks))
    overall = report["methods"]["decoder"]["overall"]
    assert overall["giou"] == pytest.approx(1 - with_target / len(exs))  # only no-target samples score 1
    assert overall["box_acc@0.5"] == 0.0 and overall["precision@0.5"] == 0.0 and overall["ciou"] == 0.0
    if len(exs) > with_target:
        assert overall["no_target_acc"] == 1.0


def test_workers_give_the_same_numbers_and_the_time_limit_stops(box_model: Path, box_report: tuple) -> None:
    one = box_report[0]
    two = run_evaluation(settings(box_model, workers=2), log=lambda m: None)
    assert two["samples"] == one["samples"]
    for method in one["methods"]:
        assert two["methods"][method] == one["methods"][method]
    # a limit no machine meets (0.5 s stopped 50 scenes here, but a machine 10x faster would not)
    for workers in (1, 2):
        cut = run_evaluation(settings(box_model, scenes=50, heads=(), time_limit_s=1e-6, workers=workers),
                             log=lambda m: None)
        assert not cut["complete"] and cut["tasks_done"] < 50, workers


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_a_model_that_does_not_load_ends_the_run_with_workers_too(tmp_path: Path, folder: str) -> None:
    """With 2 workers, a failing worker start made the process pool start new ones forever. A
    missing folder is refused before any worker starts; an empty one fails in the workers."""
    if folder == "empty":
        (tmp_path / folder).mkdir()
    done = subprocess.run([sys.executable, "-m", "qwen3vl_seg_ros.evaluate", "--model", str(tmp_path / folder),
                           "--scenes", "2", "--workers", "2", "--heads", "box", "--width", str(W), "--height", str(H)],
                          capture_output=True, text=True, timeout=240, cwd=REPO, env=dict(os.environ))
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("evaluate: ") and str(tmp_path / folder) in last, done.stderr[-2000:]
    assert ("tasks on 2 process(es)" in done.stdout) == (folder == "empty"), done.stdout[-2000:]


def test_a_pool_worker_ignores_the_stop_signals_the_parent_decides(tmp_path: Path) -> None:
    """Ctrl-C reaches every process of the group: a worker re-raised KeyboardInterrupt into the
    trainer through its task (no summary written) or died of it (the evaluation lost)."""
    import signal

    from qwen3vl_seg_ros.training.evaluate import _init_pool_worker

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _init_pool_worker(settings(tmp_path / "none"))  # the model need not load for this
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in before)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_worker_processes_return_every_result_and_a_dead_worker_ends_the_run() -> None:
    """multiprocessing.Pool waited for ever for the task of a worker that died (a kill, a crash)."""
    assert sorted(run_in_processes(pool_tasks.square_or_fail, [0, 1, 3], 2, pool_tasks.no_setup, (), None)) == [0, 1, 9]
    with pytest.raises(BrokenProcessPool):
        list(run_in_processes(pool_tasks.square_or_die, [0, 1, 2, 3], 2, pool_tasks.no_setup, (), None))
    with pytest.raises(ValueError, match="task 2 is bad"):
        list(run_in_processes(pool_tasks.square_or_fail, [0, 1, 2, 3], 2, pool_tasks.no_setup, (), None))


@pytest.mark.parametrize("args, message", [
    (["--scenes", "-3"], "--scenes must be >= 0"),
    (["--scenes", "0"], "--scenes must be > 0"),
    (["--width", "-5", "--height", "96"], "--width and --height must both be > 0"),
    (["--heads", "grabcutt"], "--heads: unknown ['grabcutt']"),
    (["--coco", "/nonexistent/refs.json"], "--coco: no such file"),
])
def test_the_command_line_refuses_what_would_give_an_empty_or_wrong_report(
        args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_coco_split_with_no_expressions_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qwen3vl_seg_ros.training.synthetic import main as write_synthetic

    write_synthetic(["--out", str(tmp_path / "val"), "--num", "1", "--split", "val", "--width", str(W),
                     "--height", str(H)])
    coco = str(tmp_path / "val" / "annotations.json")
    assert main(["--coco", coco, "--coco-split", "vall", "--heads", "box", "--out", str(tmp_path / "r")]) == 1
    assert "holds no referring expressions of split 'vall'" in capsys.readouterr().err


def test_command_line(box_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(box_model), "--scenes", "1", "--width", str(W), "--height", str(H),
                 "--heads", "box", "--examples", "0", "--out", str(tmp_path)]) == 0
    assert "giou" in capsys.readouterr().out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["scenes"] == 1 and report["samples"] >= 1


def test_frame_size_defaults_to_the_models_training_size(box_model: Path, tmp_path: Path) -> None:
    """A model is judged at the resolution it was trained at unless told otherwise."""
    from qwen3vl_seg_ros.model.loading import training_frame_size
    from qwen3vl_seg_ros.training.evaluate import eval_frame_size

    assert training_frame_size(box_model) is None  # no training record: 320x240, or what was asked
    assert eval_frame_size(str(box_model), 0, 0) == (320, 240)
    assert eval_frame_size(str(box_model), 64, 0) == (64, 240)
    (tmp_path / "training_info.json").write_text(json.dumps({"data": "synthetic 256x192"}))  # older exports
    assert training_frame_size(tmp_path) == (256, 192)
    (tmp_path / "training_info.json").write_text(json.dumps({"data": "x", "image_width": 200, "image_height": 150}))
    assert training_frame_size(tmp_path) == (200, 150)
    (tmp_path / "training_info.json").write_text("not json")
    assert training_frame_size(tmp_path) is None


def test_settings_without_a_size_use_the_models_training_size(box_model: Path, tmp_path: Path) -> None:
    """Scripts that build EvalSettings by hand get the same frames as the command line."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(box_model, folder)
    (folder / "training_info.json").write_text(json.dumps({"image_width": 96, "image_height": 64}))
    report = run_evaluation(EvalSettings(model=str(folder), scenes=1, queries_per_scene=1, heads=("box",),
                                         examples=0), log=lambda m: None)
    assert (report["settings"]["width"], report["settings"]["height"]) == (96, 64)
    assert report["samples"] == 1


def test_grounding_statistics_by_hand(box_report: tuple[dict, Path]) -> None:
    from qwen3vl_seg_ros.training.evaluate import grounding_statistics

    target = [10, 10, 30, 30]
    scene = [target, [60, 60, 80, 80]]

    def record(gt: list, model: list, reported: list) -> dict:
        return {"gt_boxes": gt, "model_boxes": model, "pred_boxes": reported, "scene_boxes": scene}

    records = [
        record([target], [[14, 10, 34, 30]], [[10, 10, 30, 30]]),  # model 4 px off (IoU 320/480), refined exact
        record([target], [[60, 60, 80, 80]], [[62, 60, 82, 80]]),  # another object: 70.7 / 72.1 px off, IoU 0
        record([target], [[10, 10, 30, 90]], [[10, 10, 30, 50]]),  # centre 30 / 10 px below; IoU 0.25 / 0.5
        record([target], [], []),  # target left unanswered
        record([target, [50, 50, 60, 60]], [[10, 10, 30, 30]], [[10, 10, 30, 30]]),  # two targets: not counted
        record([], [[0, 0, 5, 5]], [[0, 0, 5, 5]]),  # no target, answered
        record([], [], []),  # no target, nothing answered
    ]
    g = grounding_statistics(records)
    assert g["single_target_samples"] == 3
    assert g["model_box"]["median_centre_error_px"] == pytest.approx(30.0)
    assert g["model_box"]["within_10px"] == pytest.approx(1 / 3)
    assert g["model_box"]["iou_above_0.5"] == pytest.approx(1 / 3)
    assert g["reported_box"]["median_centre_error_px"] == pytest.approx(10.0)
    assert g["reported_box"]["within_10px"] == pytest.approx(1 / 3)  # 10 px is not within 10
    assert g["reported_box"]["iou_above_0.5"] == pytest.approx(1 / 3)  # nor is 0.5 above 0.5
    assert g["targets_unanswered"] == pytest.approx(1 / 5) and g["no_target_answered"] == pytest.approx(1 / 2)
    for name in ("model_box", "reported_box"):  # the misses: the second on the other object, the third on none
        assert g[name]["samples_with_scene"] == 3
        assert g[name]["on_another_object"] == pytest.approx(1 / 3) and g[name]["on_no_object"] == pytest.approx(1 / 3)
    records[2]["scene_boxes"] = None  # a COCO-style sample: no scene, left out of the split
    partial = grounding_statistics(records)["reported_box"]
    assert partial["samples_with_scene"] == 2 and partial["on_another_object"] == pytest.approx(1 / 2)
    assert partial["on_no_object"] == 0.0
    for r in records:
        r["scene_boxes"] = None
    assert "on_another_object" not in grounding_statistics(records)["reported_box"]
    assert grounding_statistics([]) == {"single_target_samples": 0, "targets_unanswered": None,
                                        "no_target_answered": None}
    report, _ = box_report  # the fixed-box model: its report carries the same section
    assert report["grounding"] == grounding_statistics(
        [json.loads(line) for line in (box_report[1] / "samples.jsonl").read_text().splitlines()])

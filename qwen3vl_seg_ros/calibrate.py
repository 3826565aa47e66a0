"""Fit a checkpoint's score calibration from held-out evaluations (``score_calibration.json``).

Run::

    python -m qwen3vl_seg_ros.evaluate --model M --split val --scenes 200 --heads box --out runs/ev_val
    python -m qwen3vl_seg_ros.calibrate runs/ev_val --check runs/ev_test --out M/score_calibration.json

Each object of an evaluation's ``samples.jsonl`` is right when its reported box overlaps a
target box at IoU > 0.5 (as box accuracy counts a hit);
:func:`~qwen3vl_seg_ros.model.score_calibration.fit_calibration` fits
the chance of that from the object's raw box and mask scores (evaluations record both raw,
whatever calibration the model had). ``--check`` reports, on other evaluations (another split),
how far stated probabilities are from observed accuracy before and after: fit on one split,
judge on another. The evaluations must come from one model with one ``box_refine_passes``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu

from qwen3vl_seg_ros.model.checkpoint import DECODER_WEIGHTS
from qwen3vl_seg_ros.model.score_calibration import (
    CalibrationError,
    ScoreCalibration,
    expected_calibration_error,
    file_sha256,
    fit_calibration,
)
from qwen3vl_seg_ros.training.metrics import BOX_IOU_THRESHOLD, box_iou_matrix


def object_outcomes(record: dict[str, Any], decoder_only: bool = True) -> list[tuple[float, float, bool]]:
    """(box score, mask score, right) of each object of one evaluation sample: only those masked by
    the decoder (what a calibration is fitted on), or all of them."""
    boxes = np.asarray(record["pred_boxes"], dtype=np.float64).reshape(-1, 4)
    targets = np.asarray(record["gt_boxes"], dtype=np.float64).reshape(-1, 4)
    iou = box_iou_matrix(boxes, targets)
    right = iou.max(axis=1) > BOX_IOU_THRESHOLD if iou.shape[1] else np.zeros(len(boxes), bool)
    sources = record.get("mask_sources") or ["decoder"] * len(boxes)
    return [(float(b), float(m), bool(r))
            for b, m, r, s in zip(record["box_scores"], record["mask_scores"], right, sources)
            if s == "decoder" or not decoder_only]


def read_evaluation(folder: str | Path) -> tuple[dict[str, Any], list[tuple[float, float, bool]]]:
    """An evaluation folder's settings and its objects' outcomes."""
    folder = Path(folder)
    report, samples = folder / "report.json", folder / "samples.jsonl"
    if not report.is_file() or not samples.is_file():
        raise CalibrationError(f"{folder} is not an evaluation folder (needs report.json and samples.jsonl "
                               "from python -m qwen3vl_seg_ros.evaluate)")
    settings = json.loads(report.read_text()).get("settings", {})
    outcomes = []
    with samples.open() as f:
        for line in f:
            if line.strip():
                outcomes.extend(object_outcomes(json.loads(line)))
    return settings, outcomes


def _same_setup(settings: list[dict[str, Any]], folders: Sequence[str]) -> tuple[str, int]:
    """The evaluations' common model and box_refine_passes; an error where they differ."""
    models = {s.get("model") for s in settings}
    passes = {int(s.get("box_refine_passes", 1)) for s in settings}
    if len(models) > 1 or len(passes) > 1:
        raise CalibrationError(f"evaluations {list(folders)} differ in model {sorted(map(str, models))} or "
                               f"box_refine_passes {sorted(passes)}: calibrate one setup at a time")
    return str(models.pop()), passes.pop()


def auc(scores: np.ndarray, right: np.ndarray) -> float:
    """Chance that a right object outscores a wrong one (ties count half)."""
    if right.all() or not right.any():
        return float("nan")
    return float(mannwhitneyu(scores[right], scores[~right]).statistic / (right.sum() * (~right).sum()))


def judge(calibration: ScoreCalibration, outcomes: list[tuple[float, float, bool]]) -> dict[str, float]:
    """Calibration error and ranking quality of raw and calibrated scores on ``outcomes``
    (``{"objects": 0}`` for none: held-out evaluations whose answers were all empty)."""
    if not outcomes:
        return {"objects": 0}
    box, mask, right = (np.array(v) for v in zip(*outcomes))
    raw = box * mask
    stated = calibration.probabilities(box, mask)
    return {"objects": len(right), "right": float(right.mean()),
            "ece_raw_score": expected_calibration_error(raw, right),
            "ece_calibrated": expected_calibration_error(stated, right),
            "auc_raw_score": auc(raw, right), "auc_calibrated": auc(stated, right)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("evaluations", nargs="+", help="evaluation folders to fit on (report.json + samples.jsonl)")
    parser.add_argument("--check", nargs="*", default=[], help="held-out evaluation folders to judge the fit on")
    parser.add_argument("--out", required=True, help="where to write score_calibration.json")
    parser.add_argument("--l2", type=float, default=1e-2, help="weight penalty of the logistic fit")
    args = parser.parse_args(argv)
    try:
        read = [read_evaluation(f) for f in args.evaluations]
        checks = [read_evaluation(f) for f in args.check]
        model, passes = _same_setup([s for s, _ in read + checks], [*args.evaluations, *args.check])
        outcomes = [o for _, objs in read for o in objs]
        if not outcomes:
            raise CalibrationError("the evaluations hold no decoder-masked objects")
        box, mask, right = zip(*outcomes)
        decoder = Path(model) / DECODER_WEIGHTS
        digest = file_sha256(decoder) if decoder.is_file() else ""
        if not digest:
            print(f"calibrate: no {decoder} to fingerprint: the calibration will not check which decoder it "
                  "is used with", file=sys.stderr)
        calibration = fit_calibration(box, mask, right, l2=args.l2, box_refine_passes=passes,
                                      note=f"fitted on {', '.join(args.evaluations)}", decoder_sha256=digest)
        if checks:
            held_out = [o for _, objs in checks for o in objs]
            calibration.fitted_on["held_out"] = {"evaluations": list(args.check), **judge(calibration, held_out)}
    except (CalibrationError, OSError, json.JSONDecodeError, KeyError) as exc:
        print(f"calibrate: {exc}", file=sys.stderr)
        return 2
    Path(args.out).write_text(calibration.to_json())
    print(json.dumps(calibration.fitted_on, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

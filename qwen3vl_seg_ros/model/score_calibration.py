"""Scores that mean what they say: the probability that an object is a right answer.

Why: the raw score (``box_score * mask_score``) ranks objects but is no probability. On the
shipped tiny model, raw scores between 0.25 and 0.30 held both the objects that were right 14 %
of the time and those right 58 % of the time, so a planner could not pick a threshold from it.
A checkpoint may carry ``score_calibration.json``: a logistic model of the chance that an
object's box overlaps a target at IoU > 0.5, from the log of its box and mask scores, fitted
on a held-out evaluation (``python -m qwen3vl_seg_ros.calibrate``). Both weights are kept
non-negative, so a more confident box or mask never lowers the probability.

It is JSON (numbers only), never pickle, and checked on load: a file that is not what it should
be is an error that says so, not a silent fallback.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

#: The file name inside a model folder.
CALIBRATION_FILE = "score_calibration.json"
FORMAT = "qwen3vl_seg_ros/score_calibration/1"
#: Raw scores are clipped here before the log (a score of 0 would be minus infinity).
_FLOOR = 1e-6


class CalibrationError(ValueError):
    """A calibration file or fit that cannot be used; the message says why."""


def _features(box_scores: Sequence[float] | np.ndarray, mask_scores: Sequence[float] | np.ndarray) -> np.ndarray:
    box = np.clip(np.asarray(box_scores, dtype=np.float64), _FLOOR, 1.0)
    mask = np.clip(np.asarray(mask_scores, dtype=np.float64), _FLOOR, 1.0)
    return np.stack([np.log(box), np.log(mask)], axis=-1)


@dataclass(frozen=True)
class ScoreCalibration:
    """P(right) = sigmoid(w . (log(box, mask) - mean) / std + bias)."""

    weights: tuple[float, float]
    bias: float
    mean: tuple[float, float]
    std: tuple[float, float]
    #: Conditions of the fit: scores of other mask heads or refinement settings are not calibrated.
    mask_source: str = "decoder"
    box_refine_passes: int = 1
    #: SHA-256 of the mask_decoder.safetensors it was fitted with ("" = not recorded): every training
    #: round changes the decoder, so a calibration copied along with an older model is caught.
    decoder_sha256: str = ""
    #: How it was fitted and what it achieved (samples, expected calibration error before/after).
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def probability(self, box_score: float, mask_score: float) -> float:
        return float(self.probabilities([box_score], [mask_score])[0])

    def probabilities(self, box_scores: Sequence[float], mask_scores: Sequence[float]) -> np.ndarray:
        z = (_features(box_scores, mask_scores) - np.asarray(self.mean)) / np.asarray(self.std)
        return expit(z @ np.asarray(self.weights) + self.bias)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())


def from_json(text: str, source: str = "score calibration") -> ScoreCalibration:
    """Parses and checks a calibration; :class:`CalibrationError` names what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"{source} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CalibrationError(f"{source} is not a score calibration (expected \"format\": \"{FORMAT}\")")

    def pair(name: str, positive: bool = False, non_negative: bool = False) -> tuple[float, float]:
        value = data.get(name)
        ok = (isinstance(value, list) and len(value) == 2
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
        if not ok or (positive and min(value) <= 0) or (non_negative and min(value) < 0):
            need = ("two finite positive numbers" if positive else
                    "two finite numbers >= 0 (a more confident box or mask must never lower the score)"
                    if non_negative else "two finite numbers")
            raise CalibrationError(f"{source}: '{name}' must be {need}, got {value!r}")
        return float(value[0]), float(value[1])

    bias = data.get("bias")
    if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not math.isfinite(bias):
        raise CalibrationError(f"{source}: 'bias' must be a finite number, got {bias!r}")
    passes = data.get("box_refine_passes", 1)
    if not isinstance(passes, int) or isinstance(passes, bool) or passes < 0:
        raise CalibrationError(f"{source}: 'box_refine_passes' must be an integer >= 0, got {passes!r}")
    digest = data.get("decoder_sha256", "")
    if not isinstance(digest, str):
        raise CalibrationError(f"{source}: 'decoder_sha256' must be a string, got {digest!r}")
    fitted_on = data.get("fitted_on", {})
    mask_source = data.get("mask_source", "decoder")
    if mask_source != "decoder":  # the only source calibrate fits on; another would never apply
        raise CalibrationError(f"{source}: 'mask_source' must be \"decoder\", got {mask_source!r}")
    return ScoreCalibration(weights=pair("weights", non_negative=True), bias=float(bias), mean=pair("mean"),
                            std=pair("std", True), mask_source=mask_source, box_refine_passes=passes,
                            decoder_sha256=digest, fitted_on=fitted_on if isinstance(fitted_on, dict) else {})


def load_calibration(folder: str | Path) -> ScoreCalibration | None:
    """The calibration of a model folder, or None where it has none."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    return from_json(path.read_text(), str(path))


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks (a decoder is tens of MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expected_calibration_error(probabilities: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray,
                               bins: int = 10) -> float:
    """Mean gap between stated and observed accuracy over ``bins`` equal-width probability bins,
    weighted by the share of objects in each."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if p.size == 0:
        return float("nan")
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in np.unique(which):
        sel = which == b
        total += sel.mean() * abs(p[sel].mean() - y[sel].mean())
    return float(total)


def fit_calibration(box_scores: Sequence[float], mask_scores: Sequence[float], correct: Sequence[bool],
                    l2: float = 1e-2, box_refine_passes: int = 1, note: str = "",
                    decoder_sha256: str = "") -> ScoreCalibration:
    """Logistic regression of ``correct`` on the standardised log scores, weights >= 0.

    Objects with a non-finite score (NaN probabilities of an overflowing low-precision run) are
    left out and counted in ``fitted_on["non_finite_dropped"]``: one NaN made every mean NaN,
    and the file that was written could not be loaded.
    """
    box = np.asarray(box_scores, dtype=np.float64).reshape(-1)
    mask = np.asarray(mask_scores, dtype=np.float64).reshape(-1)
    y = np.asarray(correct, dtype=np.float64).reshape(-1)
    if not (len(box) == len(mask) == len(y)):
        raise CalibrationError(f"{len(box)} box scores, {len(mask)} mask scores and {len(y)} outcomes differ")
    finite = np.isfinite(box) & np.isfinite(mask)
    box_scores, mask_scores, y = box[finite], mask[finite], y[finite]
    x = _features(box_scores, mask_scores)
    if len(y) < 20:
        raise CalibrationError(f"need at least 20 objects with finite scores and outcomes, got {len(y)}")
    if y.min() == y.max():
        raise CalibrationError("every object was right, or every one wrong: nothing to calibrate against")
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    z = (x - mean) / std

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        p = np.clip(expit(z @ theta[:2] + theta[2]), 1e-12, 1 - 1e-12)
        nll = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)) + l2 * float(theta[:2] @ theta[:2])
        grad_z = (p - y) / len(y)
        grad = np.concatenate([z.T @ grad_z + 2 * l2 * theta[:2], [grad_z.sum()]])
        return float(nll), grad

    fit = minimize(loss, np.zeros(3), jac=True, method="L-BFGS-B", bounds=[(0, None), (0, None), (None, None)])
    if not fit.success or not np.all(np.isfinite(fit.x)):
        raise CalibrationError(f"the fit did not converge: {fit.message}")
    raw = np.exp(x).prod(axis=1)
    calibration = ScoreCalibration(weights=(float(fit.x[0]), float(fit.x[1])), bias=float(fit.x[2]),
                                   mean=(float(mean[0]), float(mean[1])), std=(float(std[0]), float(std[1])),
                                   box_refine_passes=int(box_refine_passes), decoder_sha256=decoder_sha256)
    stated = calibration.probabilities(box_scores, mask_scores)
    fitted_on = {"objects": len(y), "non_finite_dropped": int((~finite).sum()), "right": float(y.mean()),
                 "ece_raw_score": expected_calibration_error(raw, y),
                 "ece_calibrated": expected_calibration_error(stated, y)}
    if note:
        fitted_on["note"] = note
    return replace(calibration, fitted_on=fitted_on)

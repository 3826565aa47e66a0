"""Held-out evaluation of a Qwen3-VL-Seg checkpoint through the production segmenter.

``python -m qwen3vl_seg_ros.evaluate --model FOLDER [--split val --scenes 200 | --coco FILE.json]``

Every sample runs :meth:`Qwen3VLSeg.segment` exactly as the node calls it (prompt, generation,
parsing, decoder), loaded by ``Qwen3VLSeg.from_options``. On the *same predicted boxes* the masks
of the weight-free heads are scored too, so the decoder's gain is measured, not assumed:

* ``decoder``: the segmenter's own output (the trained mask decoder);
* ``box``: the box itself as the mask;
* ``grabcut`` and ``depth``: the weight-free heads of :mod:`qwen3vl_seg_ros.masks`;
* ``decoder@score``: the decoder's output after the node's default ``score_threshold``
  (what a user of the node receives).

Metrics (:mod:`.metrics`): gIoU, cIoU, precision@0.5/0.7/0.9, box accuracy@0.5 with Hungarian
matching of several targets, no-target accuracy, overall and per query type. Written to
``report.json`` and ``report.png`` (examples with ground truth and prediction, and bar charts).

Samples are spread over worker processes (``--workers``), each with its own CPU segmenter and
one thread: the tiny model decodes token by token, so many CPU processes beat one GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from qwen3vl_seg_ros.segmenter import SegmenterOptions

#: The node's default ``score_threshold`` (config/params.yaml); ``decoder@score`` applies it.
NODE_SCORE_THRESHOLD = 0.2
METHODS = ("decoder", "box", "grabcut", "depth", "decoder@score")


@dataclass
class EvalSettings:
    """What to evaluate and how."""

    model: str = ""  # checkpoint folder ("" = the shipped model)
    split: str = "val"  # synthetic split (val or test); ignored with coco_json
    scenes: int = 200  # synthetic scenes
    first_scene: int = 0
    queries_per_scene: int = 0  # 0 = every query of a scene
    width: int = 0  # synthetic frame size; 0 = the model's training size (training_info.json), else 320x240
    height: int = 0
    coco_json: str = ""  # evaluate a COCO-style referring file instead
    coco_image_root: str = ""
    coco_split: str = ""
    max_samples: int = 0  # coco: at most this many samples (0 = all)
    device: str = "cpu"
    dtype: str = "auto"
    workers: int = 1  # processes (0 = one per CPU core, at most 14)
    threads: int = 1  # torch threads per process
    time_limit_s: float = 0.0  # 0 = none; otherwise stop and report what is done
    heads: tuple[str, ...] = ("box", "grabcut", "depth")  # weight-free heads compared on the same boxes
    examples: int = 6  # samples drawn in the figure
    out: str = ""  # report folder ("" = no files)
    score_threshold: float = NODE_SCORE_THRESHOLD
    box_refine_passes: int = SegmenterOptions.box_refine_passes  # as the node's parameter of that name
    coordinate_window: int = SegmenterOptions.coordinate_window  # SegmenterOptions only: no node parameter
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# work items


def eval_frame_size(model: str, width: int, height: int) -> tuple[int, int]:
    """The synthetic frame size: what was asked, else the model's training size, else 320x240."""
    if width > 0 and height > 0:
        return width, height
    from qwen3vl_seg_ros.model.loading import resolve_model_folder, training_frame_size
    from qwen3vl_seg_ros.types import SegmenterError

    trained = None
    with contextlib.suppress(SegmenterError):
        trained = training_frame_size(resolve_model_folder(model))
    default = trained or (320, 240)
    return (width if width > 0 else default[0]), (height if height > 0 else default[1])


def _tasks(settings: EvalSettings) -> list[tuple[str, int]]:
    """Units of work: synthetic scene indices or COCO sample indices."""
    if settings.coco_json:
        from qwen3vl_seg_ros.training.coco import RefDataset

        n = len(RefDataset(settings.coco_json, settings.coco_image_root or None, settings.coco_split or None,
                           load_images=False))
        if n == 0:  # a report of 0 samples marked complete reads as a success
            split = f" of split '{settings.coco_split}'" if settings.coco_split else ""
            raise ValueError(f"{settings.coco_json} holds no referring expressions{split} to evaluate")
        if settings.max_samples:
            n = min(n, settings.max_samples)
        return [("coco", i) for i in range(n)]
    return [(settings.split, settings.first_scene + i) for i in range(settings.scenes)]


_WORKER: dict[str, Any] = {}


def _init_worker(settings: EvalSettings) -> None:
    """Loads a worker's segmenter. A failure is kept and raised by the worker's first task: a
    process pool whose initializer raises starts new workers forever (the run hung)."""
    import torch

    from qwen3vl_seg_ros.model.segmenter import Qwen3VLSeg

    torch.set_num_threads(max(1, settings.threads))
    _WORKER.clear()
    _WORKER["settings"] = settings
    _WORKER["dataset"] = None
    options = SegmenterOptions(model=settings.model, device=settings.device, dtype=settings.dtype,
                               box_refine_passes=settings.box_refine_passes,
                               coordinate_window=settings.coordinate_window)
    try:
        _WORKER["seg"] = Qwen3VLSeg.from_options(options)
    except Exception as exc:
        _WORKER["init_error"] = exc


def _init_pool_worker(settings: EvalSettings) -> None:
    """A spawned worker's start: it ignores Ctrl-C and SIGTERM, which a terminal or a batch system
    sends to the whole process group. The parent decides (the trainer ends its evaluation with
    what it has); a worker that died of them, or re-raised KeyboardInterrupt into the parent
    through its task's result, lost the evaluation."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _init_worker(settings)


def _examples(task: tuple[str, int]) -> list[Any]:
    from qwen3vl_seg_ros.training.dataset import DataConfig, coco_example, synthetic_examples

    settings: EvalSettings = _WORKER["settings"]
    kind, index = task
    if kind == "coco":
        if _WORKER["dataset"] is None:
            from qwen3vl_seg_ros.training.coco import RefDataset

            _WORKER["dataset"] = RefDataset(settings.coco_json, settings.coco_image_root or None,
                                            settings.coco_split or None)
        return [coco_example(_WORKER["dataset"], index)]
    cfg = DataConfig(width=settings.width, height=settings.height).scene_config()
    examples = synthetic_examples(kind, index, cfg, with_depth=True)
    return examples[: settings.queries_per_scene or len(examples)]


def _evaluate_task(task: tuple[str, int]) -> list[dict[str, Any]]:
    """Runs the segmenter and the comparison heads on one task's samples (in a worker)."""
    from qwen3vl_seg_ros.masks import box_mask, weight_free_mask
    from qwen3vl_seg_ros.training.metrics import evaluate_sample

    if "init_error" in _WORKER:
        raise _WORKER["init_error"]
    settings: EvalSettings = _WORKER["settings"]
    seg = _WORKER["seg"]
    out = []
    for q, ex in enumerate(_examples(task)):
        t0 = time.perf_counter()
        result = seg.segment(ex.rgb, ex.expression, ex.depth)
        ms = (time.perf_counter() - t0) * 1000.0
        shape = ex.rgb.shape[:2]
        inst = result.instances
        boxes = np.stack([i.box for i in inst]) if inst else np.zeros((0, 4), np.float32)
        # the weight-free heads (and the box score's hits) take the grounding model's own boxes
        model_boxes = np.stack([i.model_box for i in inst]) if inst else np.zeros((0, 4), np.float32)
        masks: dict[str, np.ndarray] = {}
        empty = np.zeros((0, *shape), bool)
        masks["decoder"] = np.stack([i.mask if i.mask is not None else box_mask(shape, i.box) for i in inst]) \
            if inst else empty
        for head in settings.heads:
            if head == "depth" and ex.depth is None:
                continue
            made = [box_mask(shape, b) if head == "box" else weight_free_mask(head, ex.rgb, b, ex.depth).mask
                    for b in model_boxes]
            masks[head] = np.stack(made) if made else empty
        keep = np.array([i.score >= settings.score_threshold for i in inst], bool)
        results = {name: asdict(evaluate_sample(boxes if name == "decoder" else model_boxes, m, ex.boxes, ex.masks,
                                                ex.query_type))
                   for name, m in masks.items()}
        results["decoder@score"] = asdict(evaluate_sample(boxes[keep], masks["decoder"][keep], ex.boxes, ex.masks,
                                                          ex.query_type))
        # box scores of predictions that hit a target (IoU > 0.5) and of those that do not
        from qwen3vl_seg_ros.training.metrics import box_iou_matrix

        iou = box_iou_matrix(model_boxes, ex.boxes)
        hit = iou.max(axis=1) > 0.5 if iou.size else np.zeros(len(inst), bool)
        out.append({
            "task": list(task), "query": q, "expression": ex.expression, "query_type": ex.query_type,
            "answer": result.raw_answer, "ms": ms, "timings_ms": result.timings_ms, "results": results,
            "box_scores": [float(i.box_score) for i in inst], "mask_scores": [float(i.mask_score) for i in inst],
            "scores": [float(i.score) for i in inst], "mask_sources": [i.mask_source for i in inst],
            "hit": hit.tolist(),
            "pred_boxes": boxes.tolist(), "model_boxes": model_boxes.tolist(),
            "gt_boxes": np.asarray(ex.boxes).tolist(), "scene_boxes": scene_boxes(ex),
            "pred_mask": np.packbits(masks["decoder"].any(0) if len(inst) else np.zeros(shape, bool)),
        })
    return out


def scene_boxes(example: Any) -> list[list[float]] | None:
    """Every object's box in the frame, targets or not (from the instance map), where it is known.

    Why: a miss on a single target is either a box on another object (grounding) or a box on
    nothing (drawing); only the scene's other objects tell them apart. COCO-style samples have no
    instance map: None.
    """
    from qwen3vl_seg_ros.masks import mask_box

    if example.instances is None:
        return None
    ids, labels = example.instances
    return [mask_box(ids == k).tolist() for k in range(1, len(labels) + 1)]


def _iterate(settings: EvalSettings, tasks: list[tuple[str, int]], deadline: float | None,
             log: Callable[[str], None]) -> Iterator[list[dict[str, Any]]]:
    workers = settings.workers or min(14, os.cpu_count() or 1)
    if settings.device != "cpu":
        workers = 1  # one model on one accelerator
    workers = max(1, min(workers, len(tasks)))
    log(f"[eval] {len(tasks)} tasks on {workers} process(es), device {settings.device}")
    if workers == 1:
        _init_worker(settings)
        for task in tasks:
            if deadline is not None and time.monotonic() > deadline:
                return
            yield _evaluate_task(task)
        return
    yield from run_in_processes(_evaluate_task, tasks, workers, _init_pool_worker, (settings,), deadline)


def run_in_processes(work: Callable[[Any], Any], tasks: Sequence[Any], workers: int,
                     initializer: Callable[..., None], initargs: tuple[Any, ...],
                     deadline: float | None) -> Iterator[Any]:
    """``work(task)`` for every task in ``workers`` spawned processes, results as they finish.

    Why concurrent.futures and not multiprocessing.Pool: Pool.terminate() SIGTERMs workers that
    may hold a queue's lock and can then hang for ever (CPython issues 78178 and 96995; one
    evaluation with a failing worker hung in CI), and a worker that dies (killed for memory,
    crashed) loses its task so that Pool waits for ever. Here no worker is killed: a task's error
    or the deadline cancels the tasks not started and waits for the running ones (one task each),
    and a dead worker raises :class:`BrokenProcessPool`.
    """
    ctx = mp.get_context("spawn")  # the parent may hold CUDA and many threads; spawn is clean
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs) as pool:
        futures = [pool.submit(work, task) for task in tasks]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            for future in as_completed(futures, timeout=timeout):
                yield future.result()
        except FuturesTimeout:
            return
        finally:  # also when the consumer stops early or a task raised
            pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# summaries


def summarise(records: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
    """Metrics per method (overall and by query type) from per-sample records."""
    from qwen3vl_seg_ros.training.metrics import SampleResult, SegmentationMetrics

    out: dict[str, Any] = {}
    for method in methods:
        metrics = SegmentationMetrics()
        for r in records:
            if method in r["results"]:
                metrics.results.append(SampleResult(**r["results"][method]))
        if not len(metrics):
            continue
        summary = metrics.summary()
        by_type = summary.pop("by_type")
        out[method] = {"overall": summary, "by_type": by_type}
    return out


def score_statistics(records: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """How the segmenter's scores separate right boxes from wrong ones."""
    hits = [(b, s) for r in records for b, s, h in zip(r["box_scores"], r["scores"], r["hit"]) if h]
    misses = [(b, s) for r in records for b, s, h in zip(r["box_scores"], r["scores"], r["hit"]) if not h]

    def stats(pairs: list[tuple[float, float]]) -> dict[str, Any]:
        if not pairs:
            return {"count": 0}
        box, score = np.array(pairs).T
        return {"count": len(pairs), "box_score_mean": float(box.mean()), "box_score_median": float(np.median(box)),
                "score_mean": float(score.mean()), "kept_at_threshold": float((score >= threshold).mean())}

    return {"threshold": threshold, "hits": stats(hits), "misses": stats(misses),
            "reported": reported_score_quality(records)}


def reported_score_quality(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Is ``score`` a probability? Each reported object is right when its reported box overlaps a
    target at IoU > 0.5; the expected calibration error compares the stated and the observed rate."""
    from qwen3vl_seg_ros.calibrate import auc, object_outcomes
    from qwen3vl_seg_ros.model.score_calibration import expected_calibration_error

    scores, right = [], []
    for r in records:
        outcomes = object_outcomes(r, decoder_only=False)
        scores.extend(r["scores"])
        right.extend(o[2] for o in outcomes)
    if not scores:
        return {"objects": 0}
    score, ok = np.asarray(scores, float), np.asarray(right, bool)
    return {"objects": len(score), "right": float(ok.mean()), "score_mean": float(score.mean()),
            "ece": expected_calibration_error(score, ok), "auc": auc(score, ok)}


def grounding_statistics(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether the answers are on the right object, apart from how well they are drawn.

    On samples with one target and at least one answer, the first answer's box (the model's own,
    and the reported one after ``box_refine_passes``) against the target: median centre error
    in pixels, share within 10 pixels, share with IoU > 0.5. A refined box is either on its
    object or on another one, so its IoU > 0.5 share is the grounding rate. Where the samples
    know their scene's objects (``scene_boxes``), the misses are split: ``on_another_object``
    (IoU > 0.5 with an object that is not the target) and ``on_no_object`` (with none), as
    shares of those samples. Also how often a target is left unanswered and a command with no
    target gets an answer.
    """
    from qwen3vl_seg_ros.training.metrics import box_iou_matrix

    single = [r for r in records if len(r["gt_boxes"]) == 1 and r["pred_boxes"]]
    out: dict[str, Any] = {"single_target_samples": len(single)}
    gt = np.array([r["gt_boxes"][0] for r in single], dtype=np.float64).reshape(-1, 4)
    for key, name in (("model_boxes", "model_box"), ("pred_boxes", "reported_box")):
        if not single:
            break
        pred = np.array([r[key][0] for r in single], dtype=np.float64)
        centre_error = np.hypot(*((pred[:, :2] + pred[:, 2:]) / 2 - (gt[:, :2] + gt[:, 2:]) / 2).T)
        iou = np.diag(box_iou_matrix(pred, gt))
        out[name] = {"median_centre_error_px": float(np.median(centre_error)),
                     "within_10px": float((centre_error < 10).mean()), "iou_above_0.5": float((iou > 0.5).mean())}
        out[name].update(_misses(single, key, iou > 0.5))
    targets = [r for r in records if r["gt_boxes"]]
    empty = [r for r in records if not r["gt_boxes"]]
    out["targets_unanswered"] = float(np.mean([not r["pred_boxes"] for r in targets])) if targets else None
    out["no_target_answered"] = float(np.mean([bool(r["pred_boxes"]) for r in empty])) if empty else None
    return out


def _misses(single: list[dict[str, Any]], key: str, on_target: np.ndarray) -> dict[str, float]:
    """Of the single-target samples that know their scene's objects: first box on another object / on none.

    ``on_target`` says per sample of ``single`` whether its first box has IoU > 0.5 with the target.
    """
    from qwen3vl_seg_ros.training.metrics import box_iou_matrix

    known = [(r, hit) for r, hit in zip(single, on_target) if r.get("scene_boxes")]
    if not known:
        return {}
    other = none = 0
    for r, hit in known:
        if hit:
            continue
        box = np.array(r[key][:1], dtype=np.float64).reshape(-1, 4)
        if box_iou_matrix(box, np.array(r["scene_boxes"], dtype=np.float64).reshape(-1, 4)).max() > 0.5:
            other += 1
        else:
            none += 1
    return {"samples_with_scene": len(known), "on_another_object": other / len(known),
            "on_no_object": none / len(known)}


def timing_statistics(records: list[dict[str, Any]]) -> dict[str, Any]:
    ms = np.array([r["ms"] for r in records], dtype=np.float64)
    if not ms.size:
        return {}
    by_objects: dict[str, list[float]] = {}
    for r in records:
        by_objects.setdefault(str(min(len(r["pred_boxes"]), 3)), []).append(r["ms"])
    return {"ms_per_command_median": float(np.median(ms)), "ms_per_command_mean": float(ms.mean()),
            "ms_per_command_p90": float(np.percentile(ms, 90)),
            "median_ms_by_predicted_objects": {k: float(np.median(v)) for k, v in sorted(by_objects.items())}}


def run_evaluation(settings: EvalSettings, log: Callable[[str], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Evaluates, writes ``report.json`` and ``report.png`` into ``settings.out`` (when set), returns the report.

    ``should_stop`` (asked after each task) ends it early with what it has, as the time limit does
    (the trainer's final evaluation, when Ctrl-C or a SIGTERM comes during it)."""
    from tqdm import tqdm

    log = log or (lambda m: print(m, flush=True))
    from qwen3vl_seg_ros.model.loading import resolve_model_folder

    resolve_model_folder(settings.model)  # a missing folder: SegmenterError before any process starts
    # resolved once here, so that the workers and the report see the size that was used
    width, height = eval_frame_size(settings.model, settings.width, settings.height)
    settings = replace(settings, width=width, height=height)
    t0 = time.monotonic()
    deadline = t0 + settings.time_limit_s if settings.time_limit_s > 0 else None
    tasks = _tasks(settings)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(tasks), desc="eval", unit="task", disable=None, mininterval=5.0)
    for chunk in _iterate(settings, tasks, deadline, log):
        records.extend(chunk)
        bar.update(1)
        if should_stop is not None and should_stop():
            break
    bar.close()
    done_tasks = len({tuple(r["task"]) for r in records})
    records.sort(key=lambda r: (r["task"][1], r["query"]))
    methods = summarise(records, METHODS)
    report = {
        "settings": asdict(settings),
        "complete": done_tasks == len(tasks),
        "tasks_done": done_tasks,
        "tasks": len(tasks),
        "samples": len(records),
        "wall_s": round(time.monotonic() - t0, 1),
        "methods": methods,
        "scores": score_statistics(records, settings.score_threshold),
        "grounding": grounding_statistics(records),
        "timing": timing_statistics(records),
    }
    if settings.out:
        out = Path(settings.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(_finite(report), indent=2, allow_nan=False) + "\n")
        (out / "samples.jsonl").write_text("".join(
            json.dumps({k: v for k, v in r.items() if k not in ("results", "pred_mask")}) + "\n" for r in records))
        try:
            draw_report(report, records, settings, out / "report.png")
        except Exception as exc:  # a figure must never lose the numbers
            log(f"[eval] could not draw the figure: {exc}")
    log(format_report(report))
    return report


def _finite(value: Any) -> Any:
    """The report with NaN and infinities as null: strict JSON readers (jq, JavaScript) reject
    NaN, which a score AUC over objects that are all right (or all wrong) is."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def format_report(report: dict[str, Any]) -> str:
    """A short text table of the main metrics per method."""
    keys = ("giou", "ciou", "precision@0.5", "precision@0.7", "precision@0.9", "box_acc@0.5", "no_target_acc")
    lines = [f"[eval] {report['samples']} samples ({report['tasks_done']}/{report['tasks']} tasks"
             f"{'' if report['complete'] else ', stopped by the time limit'}) in {report['wall_s']} s"]
    lines.append("[eval] " + f"{'method':<14}" + "".join(f"{k:>15}" for k in keys))
    for name, m in report["methods"].items():
        o = m["overall"]
        lines.append("[eval] " + f"{name:<14}" + "".join(
            f"{o[k]:>15.4f}" if o.get(k) is not None else f"{'-':>15}" for k in keys))
    dec = report["methods"].get("decoder", {}).get("by_type", {})
    for qtype, m in dec.items():
        lines.append(f"[eval] decoder {qtype:<10} n={m['num_samples']:<5} gIoU {m['giou']:.4f}"
                     + (f"  box_acc {m['box_acc@0.5']:.4f}" if m.get("box_acc@0.5") is not None else ""))
    g = report.get("grounding", {})
    if g.get("reported_box"):
        model, ours = g["model_box"], g["reported_box"]
        lines.append(f"[eval] single targets (n={g['single_target_samples']}): box IoU > 0.5 "
                     f"{ours['iou_above_0.5']:.3f} (model's box {model['iou_above_0.5']:.3f}), median centre error "
                     f"{ours['median_centre_error_px']:.1f} px ({model['median_centre_error_px']:.1f})"
                     + (f", on another object {ours['on_another_object']:.3f}, on none {ours['on_no_object']:.3f}"
                        if "on_another_object" in ours else ""))
    t = report.get("timing", {})
    if t:
        lines.append(f"[eval] ms per command: median {t['ms_per_command_median']:.0f}, "
                     f"p90 {t['ms_per_command_p90']:.0f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# figure


def _overlay(rgb: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Image with the prediction filled in red and the ground truth outlined in green."""
    import cv2

    out = rgb.astype(np.float32).copy()
    out[pred] = 0.45 * out[pred] + 0.55 * np.array([255, 40, 40])
    contours, _ = cv2.findContours(gt.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    img = np.ascontiguousarray(out.astype(np.uint8))
    cv2.drawContours(img, contours, -1, (40, 255, 40), 1)
    return img


def draw_report(report: dict[str, Any], records: list[dict[str, Any]], settings: EvalSettings, path: Path) -> None:
    """Examples (ground truth outlined green, decoder mask red, boxes) and metric bar charts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = _pick_examples(records, settings.examples)
    cols = max(3, len(picks))
    fig = plt.figure(figsize=(3.2 * cols, 7.5))
    grid = fig.add_gridspec(2, cols, height_ratios=[1.0, 1.1])
    _WORKER["settings"] = settings  # the examples' images and ground truth are made again (cheap)
    _WORKER["dataset"] = None  # one left by an earlier run in this process may be another file
    for k, r in enumerate(picks):
        ax = fig.add_subplot(grid[0, k])
        ex = _examples(tuple(r["task"]))[r["query"]]
        shape = ex.rgb.shape[:2]
        gt = ex.masks.any(0) if len(ex.masks) else np.zeros(shape, bool)
        pred = np.unpackbits(r["pred_mask"], count=shape[0] * shape[1]).reshape(shape).astype(bool)
        ax.imshow(_overlay(ex.rgb, gt, pred))
        for b in r["pred_boxes"]:
            ax.add_patch(plt.Rectangle((b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, color="yellow", lw=1))
        iou = r["results"]["decoder"]["iou"]
        ax.set_title(f"{ex.expression}\n[{r['query_type']}] IoU {iou:.2f}", fontsize=7)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, : max(1, cols // 2 + 1)])
    keys = ("giou", "ciou", "precision@0.5", "precision@0.7", "precision@0.9", "box_acc@0.5", "no_target_acc")
    methods = [m for m in METHODS if m in report["methods"]]
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        o = report["methods"][m]["overall"]
        vals = [o.get(k) if o.get(k) is not None else 0.0 for k in keys]
        ax.bar(np.arange(len(keys)) + j * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(keys)) + width * (len(methods) - 1) / 2)
    ax.set_xticklabels(keys, rotation=30, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title(f"{report['samples']} samples, same predicted boxes for every mask head", fontsize=8)
    ax2 = fig.add_subplot(grid[1, max(1, cols // 2 + 1):])
    by_type = report["methods"].get("decoder", {}).get("by_type", {})
    types = list(by_type)
    ax2.bar(types, [by_type[t]["giou"] or 0.0 for t in types], color="tab:blue")
    ax2.set_ylim(0, 1.05)
    ax2.set_title("decoder gIoU by query type", fontsize=8)
    ax2.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pick_examples(records: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """A spread of samples: one per query type first, then the lowest indices."""
    picks, seen = [], set()
    for r in records:
        if r["query_type"] not in seen and len(picks) < count:
            picks.append(r)
            seen.add(r["query_type"])
    for r in records:
        if len(picks) >= count:
            break
        if r not in picks:
            picks.append(r)
    return picks


# ---------------------------------------------------------------------------------------------
# command line


def _argument_problem(args: argparse.Namespace) -> str:
    """What is wrong with the command line, or "": each of these ran to a report of 0 samples
    marked complete, or failed only once the model had loaded."""
    for name in ("scenes", "first_scene", "queries_per_scene", "max_samples", "time_limit_s", "examples"):
        if getattr(args, name) < 0:
            return f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}"
    if args.workers < 0 or args.threads < 1:
        return "--workers must be >= 0 and --threads >= 1"
    if (args.width or args.height) and (args.width <= 0 or args.height <= 0):
        return f"--width and --height must both be > 0 (or both left out), got {args.width}x{args.height}"
    from qwen3vl_seg_ros.masks import WEIGHT_FREE_HEADS

    unknown = [h for h in args.heads.split(",") if h and h not in WEIGHT_FREE_HEADS]
    if unknown:
        return f"--heads: unknown {unknown}; known: {', '.join(WEIGHT_FREE_HEADS)}"
    if args.coco and not Path(args.coco).is_file():
        return f"--coco: no such file: {args.coco}"
    if not args.coco and args.scenes == 0:
        return "--scenes must be > 0"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwen3vl_seg_ros.evaluate",
        description="Evaluate a Qwen3-VL-Seg checkpoint on held-out synthetic scenes or a COCO-style file.")
    parser.add_argument("--model", default="", help="checkpoint folder (default: the shipped tiny model)")
    parser.add_argument("--split", default="val", choices=("val", "test", "train"), help="synthetic split")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--first-scene", type=int, default=0)
    parser.add_argument("--queries-per-scene", type=int, default=0, help="0 = all queries of each scene")
    parser.add_argument("--width", type=int, default=0,
                        help="synthetic frame width (default: the model's training width, else 320)")
    parser.add_argument("--height", type=int, default=0,
                        help="synthetic frame height (default: the model's training height, else 240)")
    parser.add_argument("--coco", default="", help="COCO-style referring file instead of synthetic scenes")
    parser.add_argument("--coco-image-root", default="")
    parser.add_argument("--coco-split", default="")
    parser.add_argument("--max-samples", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--workers", type=int, default=1, help="processes (0 = one per core, at most 14)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--time-limit-s", type=float, default=0.0)
    parser.add_argument("--heads", default="box,grabcut,depth", help="weight-free heads compared on the same boxes")
    parser.add_argument("--examples", type=int, default=6)
    parser.add_argument("--box-refine-passes", type=int, default=SegmenterOptions.box_refine_passes,
                        help="decoder passes on its own mask's box, as the node's parameter (0 = the model's boxes)")
    parser.add_argument("--coordinate-window", type=int, default=SegmenterOptions.coordinate_window,
                        help="choose box numbers by the probability of +-N units (SegmenterOptions."
                             "coordinate_window, not a node parameter; -1 = plain greedy)")
    parser.add_argument("--out", default="", help="report folder (report.json, report.png, samples.jsonl)")
    args = parser.parse_args(argv)
    problem = _argument_problem(args)
    if problem:
        parser.error(problem)  # usage and one line, exit 2, before any model loads
    settings = EvalSettings(
        model=args.model, split=args.split, scenes=args.scenes, first_scene=args.first_scene,
        queries_per_scene=args.queries_per_scene, width=args.width, height=args.height, coco_json=args.coco,
        coco_image_root=args.coco_image_root, coco_split=args.coco_split, max_samples=args.max_samples,
        device=args.device, dtype=args.dtype, workers=args.workers, threads=args.threads,
        time_limit_s=args.time_limit_s, heads=tuple(h for h in args.heads.split(",") if h), examples=args.examples,
        out=args.out, box_refine_passes=args.box_refine_passes, coordinate_window=args.coordinate_window)
    from qwen3vl_seg_ros.types import SegmenterError

    try:
        run_evaluation(settings)
    except (SegmenterError, ValueError, OSError) as exc:  # a model that does not load, a bad file
        print(f"evaluate: {exc}", file=sys.stderr, flush=True)
        return 1
    except BrokenProcessPool as exc:
        print(f"evaluate: a worker process died (killed for memory? try fewer --workers): {exc}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

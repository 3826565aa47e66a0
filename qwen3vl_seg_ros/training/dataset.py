"""Training data streams: synthetic scenes rendered on the fly, or a COCO-style referring file.

Both are ``torch`` ``IterableDataset`` s of *items*: each item is one collated micro-batch
(:class:`~qwen3vl_seg_ros.training.collate.Batch`) and is a pure function of its index. Loader
worker ``w`` of ``W`` builds items ``w, w + W, w + 2W, ...`` and the loader hands them out in
index order, so the stream, and with it a resumed run, does not depend on the number of workers:
resuming at step ``s`` restarts the stream at item ``s * items_per_step``.

Synthetic item ``k`` renders the scenes ``first_scene + k * stride, first_scene + k * stride + 1, ...``
of the ``train``
split (:func:`~qwen3vl_seg_ros.training.synthetic.split_seed`; validation and test layouts
never occur) and takes up to ``queries_per_scene`` queries from each: rendering is the costly
part, the queries are almost free.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from qwen3vl_seg_ros.training.collate import Batch, Collator, RefExample, box_jitter_scales

if TYPE_CHECKING:
    from qwen3vl_seg_ros.training.coco import RefDataset, RefSample
    from qwen3vl_seg_ros.training.synthetic import Scene, SceneConfig


#: Target answers (``grounding.format_answer``): Qwen3-VL's box then label; the label first; the
#: label first, made of the command's own words for each target (``Query.target_words``:
#: "red object" for "the red object"), so that it never needs a word the command does not give.
ANSWER_FORMATS = ("box_first", "label_first", "label_echo")
#: The formats whose answers name each object before its box.
LABEL_FIRST_FORMATS = ("label_first", "label_echo")


@dataclass
class DataConfig:
    """The ``data`` section of a training configuration."""

    source: str = "synthetic"  # "synthetic" or "coco"
    width: int = 320  # synthetic image size; COCO images are resized to it
    height: int = 240
    queries_per_scene: int = 8  # synthetic: queries taken from each rendered scene
    min_objects: int = 1
    max_objects: int = 6
    coco_json: str = ""  # coco: the annotation file
    coco_image_root: str = ""  # coco: folder the file names are relative to ("" = the JSON's folder)
    coco_split: str = ""  # coco: keep only refs of this split ("" = all)
    box_jitter: float | list[float] = 0.05  # decoder input boxes' edge noise, fraction of the side (list: per box)
    num_workers: int = 0  # data-loader processes (0 = in the training process)
    prefetch_factor: int = 4  # items each worker keeps ready
    micro_batch: int = 0  # samples per item; 0 = the whole step batch in one item
    first_scene: int = 0  # synthetic: index of the first train scene (a later round starts past the last one's)
    type_weights: dict[str, float] | None = None  # synthetic: query types drawn (None: the generator's mix)
    form_weights: dict[str, float] | None = None  # synthetic: forms of single-target commands (None: uniform)
    answer_format: str = "box_first"  # target answers: one of ANSWER_FORMATS

    def __post_init__(self) -> None:
        if self.source not in ("synthetic", "coco"):
            raise ValueError(f"data.source must be 'synthetic' or 'coco', got {self.source!r}")
        if self.source == "coco" and not self.coco_json:
            raise ValueError("data.source 'coco' needs data.coco_json (a COCO-style referring file)")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"data.answer_format must be one of {ANSWER_FORMATS}, got {self.answer_format!r}")
        if self.answer_format == "label_echo" and self.source != "synthetic":
            raise ValueError("data.answer_format 'label_echo' needs synthetic data: a COCO-style file does not "
                             "say which words of an expression name which target")
        if self.first_scene < 0:
            raise ValueError(f"data.first_scene must be >= 0, got {self.first_scene}")
        box_jitter_scales(self.box_jitter)
        if self.source == "synthetic":
            self.scene_config()  # refuses unknown or negative query weights before training starts

    def scene_config(self) -> SceneConfig:
        from qwen3vl_seg_ros.training.synthetic import SceneConfig

        return SceneConfig(width=self.width, height=self.height, queries_per_scene=self.queries_per_scene,
                           min_objects=self.min_objects, max_objects=self.max_objects,
                           type_weights=self.type_weights, form_weights=self.form_weights)


# ---------------------------------------------------------------------------------------------
# samples


def object_label(colour: str | None, shape: str | None, fallback: str) -> str:
    """The label an answer gives an object: "red mug" (colour and shape) when known."""
    words = [w for w in (colour, shape) if w]
    return " ".join(words) if words else fallback


def scene_instances(scene: Scene) -> tuple[np.ndarray, list[str]]:
    """Every object of a scene as ``RefExample.instances``: the instance-id map and each id's label."""
    return scene.instance_ids, [object_label(o.colour, o.shape, "object") for o in scene.objects]


def scene_examples(scene: Scene, queries: list, image_key: object = None, with_depth: bool = False,
                   echo: bool = False) -> list[RefExample]:
    """The referring samples of one synthetic scene, one per query; ``echo`` labels each target with
    the command's own words for it (``label_echo`` answers) instead of its colour and shape."""
    masks, boxes = scene.masks(), scene.boxes()
    everything = scene_instances(scene)
    out = []
    for q in queries:
        index = [i - 1 for i in q.target_ids]
        labels = list(q.target_words) if echo else [everything[1][i] for i in index]
        out.append(RefExample(scene.rgb, q.expression, q.query_type, boxes[index].reshape(-1, 4), masks[index],
                              labels, image_key=image_key, depth=scene.depth if with_depth else None,
                              intrinsics=scene.intrinsics, instances=everything))
    return out


def synthetic_examples(split: str, index: int, scene_cfg: SceneConfig, with_depth: bool = False,
                       echo: bool = False) -> list[RefExample]:
    """All samples of scene ``index`` of a split (deterministic)."""
    from qwen3vl_seg_ros.training.synthetic import generate_sample, split_seed

    scene, queries = generate_sample(split_seed(split, index), scene_cfg)
    return scene_examples(scene, queries, image_key=(split, index), with_depth=with_depth, echo=echo)


def coco_labels(dataset: RefDataset, ann_ids: tuple[int, ...], fallback: str) -> list[str]:
    """Labels of annotations: their colour and shape attributes, else their category's name."""
    labels = []
    for a in ann_ids:
        ann = dataset.annotations[a]
        attrs = ann.get("attributes") or {}
        category = dataset.categories.get(ann.get("category_id"), None)
        labels.append(object_label(attrs.get("colour"), attrs.get("shape") or category, fallback))
    return labels


def resize_example(example: RefExample, width: int, height: int) -> RefExample:
    """The sample at ``width`` x ``height`` (batches need one size): image, masks and boxes scaled."""
    h, w = example.rgb.shape[:2]
    if (w, h) == (width, height):
        return example
    rgb = cv2.resize(example.rgb, (width, height), interpolation=cv2.INTER_AREA if w > width else cv2.INTER_LINEAR)
    masks = np.zeros((len(example.masks), height, width), bool)
    for k, m in enumerate(example.masks):
        masks[k] = cv2.resize(m.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) > 0.5
    scale = np.array([width / w, height / h, width / w, height / h], dtype=np.float32)
    depth = None
    if example.depth is not None:
        depth = cv2.resize(example.depth, (width, height), interpolation=cv2.INTER_NEAREST)
    intrinsics = example.intrinsics.scaled_to(width, height) if example.intrinsics is not None else None
    return RefExample(rgb, example.expression, example.query_type, example.boxes * scale, masks, example.labels,
                      example.image_key, depth, intrinsics)


def coco_example(dataset: RefDataset, index: int, sample: RefSample | None = None) -> RefExample:
    """Sample ``index`` of a COCO-style referring file as a :class:`RefExample`."""
    s = sample if sample is not None else dataset[index]
    labels = coco_labels(dataset, s.ann_ids, s.expression)
    return RefExample(s.rgb, s.expression, s.query_type, s.boxes, s.masks, labels, image_key=("coco", s.image_id),
                      depth=s.depth, intrinsics=s.intrinsics)


# ---------------------------------------------------------------------------------------------
# streams


class _ItemStream(IterableDataset):
    """Items ``start, start + 1, ...`` split over loader workers by index (see the module doc)."""

    def __init__(self, collator: Collator, micro_batch: int, start_item: int, seed: int) -> None:
        super().__init__()
        self.collator = collator
        self.micro_batch = int(micro_batch)
        self.start_item = int(start_item)
        self.seed = int(seed)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:  # workers are many: one thread each avoids oversubscribing the cores
            torch.set_num_threads(1)
            cv2.setNumThreads(1)
        k = self.start_item + worker
        while True:
            yield self.item(k)
            k += workers

    def item(self, k: int) -> Batch:
        rng = np.random.default_rng([self.seed, k])
        return self.collator(self.examples(k), rng)

    def examples(self, k: int) -> list[RefExample]:
        raise NotImplementedError


def scenes_per_item(micro_batch: int) -> int:
    """Scene indices a synthetic item reserves: twice its samples, for scenes with few queries."""
    return 2 * int(micro_batch)


def train_scene_range(first_scene: int, micro_batch: int, samples: int) -> tuple[int, int]:
    """``[first, end)``: the ``train`` scene indices a synthetic run of ``samples`` may have rendered.

    Item *k* renders from ``first + k * scenes_per_item``, so a run reaches far past
    ``first + samples / queries_per_scene``; a later round must start at ``end`` to see new scenes.
    """
    items = -(-int(samples) // int(micro_batch))
    return int(first_scene), int(first_scene) + items * scenes_per_item(micro_batch)


def scene_overlaps(first_scene: int, lineage: dict | None) -> list[tuple[int, int]]:
    """The recorded ``train_scenes`` ranges of a model's earlier rounds that reach ``first_scene``.

    ``lineage`` is a ``training_info.json`` (each round's under ``base_training``); exports made
    before the range was recorded have none and are not checked.
    """
    out = []
    while isinstance(lineage, dict):
        scenes = lineage.get("train_scenes")
        if isinstance(scenes, (list, tuple)) and len(scenes) == 2 and int(scenes[1]) > first_scene:
            out.append((int(scenes[0]), int(scenes[1])))
        lineage = lineage.get("base_training")
    return out


class SyntheticStream(_ItemStream):
    """Micro-batches of on-the-fly synthetic scenes of the ``train`` split."""

    def __init__(self, collator: Collator, micro_batch: int, data: DataConfig, start_item: int = 0,
                 seed: int = 0, split: str = "train") -> None:
        super().__init__(collator, micro_batch, start_item, seed)
        self.scene_cfg = data.scene_config()
        self.queries_per_scene = max(1, int(data.queries_per_scene))
        self.split = split
        self.stride = scenes_per_item(self.micro_batch)
        self.first_scene = int(data.first_scene)
        self.echo = data.answer_format == "label_echo"

    def examples(self, k: int) -> list[RefExample]:
        out: list[RefExample] = []
        for i in range(self.stride):
            if len(out) == self.micro_batch:
                return out
            index = (self.first_scene + k * self.stride + i) % 1_000_000_000
            scene = synthetic_examples(self.split, index, self.scene_cfg, echo=self.echo)
            out.extend(scene[: min(self.queries_per_scene, self.micro_batch - len(out))])
        if len(out) < self.micro_batch:
            raise RuntimeError(f"{self.stride} scenes gave only {len(out)} queries for item {k}")
        return out


class CocoStream(_ItemStream):
    """Micro-batches of a COCO-style referring file, reshuffled every epoch, resized to one size."""

    def __init__(self, collator: Collator, micro_batch: int, data: DataConfig, start_item: int = 0,
                 seed: int = 0) -> None:
        super().__init__(collator, micro_batch, start_item, seed)
        from qwen3vl_seg_ros.training.coco import RefDataset

        root = data.coco_image_root or None
        self.dataset = RefDataset(Path(data.coco_json), image_root=root, split=data.coco_split or None)
        if len(self.dataset) == 0:
            where = f" in split {data.coco_split}" if data.coco_split else ""
            raise ValueError(f"{data.coco_json} has no samples{where}")
        self.size = (data.width, data.height)

    def examples(self, k: int) -> list[RefExample]:
        n = len(self.dataset)
        out = []
        for pos in range(k * self.micro_batch, (k + 1) * self.micro_batch):
            epoch, offset = divmod(pos, n)
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            out.append(resize_example(coco_example(self.dataset, int(order[offset])), *self.size))
        return out


def build_stream(data: DataConfig, collator: Collator, micro_batch: int, start_item: int, seed: int) -> _ItemStream:
    """The training stream the configuration asks for."""
    if data.source == "coco":
        return CocoStream(collator, micro_batch, data, start_item, seed)
    return SyntheticStream(collator, micro_batch, data, start_item, seed)


def _leave_stop_signals_to_the_trainer(_worker_id: int) -> None:
    """A terminal's Ctrl-C and a batch system's SIGTERM reach every process of the group: a
    worker that died of them failed the step in progress, so the trainer, which stops after
    that step with a checkpoint, lost the run. The workers ignore both; the trainer ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(stream: _ItemStream, num_workers: int, prefetch_factor: int, pin_memory: bool,
                spawn: bool = False) -> DataLoader:
    """A loader yielding the stream's items in index order (``batch_size=None``: items are batches).

    ``spawn`` starts the workers in fresh interpreters even when this process runs no other
    Python thread: for a process that has run DDS participants, whose native threads the check
    below cannot see (the test suite; workers forked from it sometimes died at shutdown with
    "terminate called without an active exception")."""
    kwargs: dict = {}
    if num_workers > 0:
        kwargs = dict(prefetch_factor=max(1, prefetch_factor), persistent_workers=False,
                      worker_init_fn=_leave_stop_signals_to_the_trainer)
        if spawn or threading.active_count() > 1:
            # Forking a process that runs other threads (a ROS executor, a progress monitor) can
            # copy a held lock into the child, which then hangs; a fresh interpreter cannot.
            kwargs["multiprocessing_context"] = "spawn"
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)

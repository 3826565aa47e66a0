"""COCO-style referring-segmentation data: a reader and a writer.

The format is the one RefCOCO-style and SA-1B-derived sets come in, one JSON file::

    {
      "images": [{"id", "file_name", "width", "height",
                  "depth_file"?   (16-bit PNG, millimetres, 0 = no reading),
                  "intrinsics"?   ({"fx", "fy", "cx", "cy"} or {"K": 3x3 row-major, 9 numbers}),
                  ...}],
      "annotations": [{"id", "image_id", "segmentation" (polygons, or RLE with compressed or
                       uncompressed counts), "bbox"? [x, y, w, h], "area"?, "category_id"?,
                       "attributes"?, ...}],
      "categories": [{"id", "name"}],
      "refs": [{"ref_id"?, "image_id",
                "ann_ids" (list, empty = no target) or "ann_id" (one id, or a list; -1 = none),
                "sentences" ([str] or [{"sent" or "raw": str}]) or "expressions" [str]
                or "expression" str,
                "query_type"?, "split"?, "no_target"?}]
    }

File names are relative to the JSON's folder unless another image root is given. Every sentence
of a ref is one sample. Without ``query_type`` a ref's type follows from its target count:
``no_target`` (0), ``referring`` (1), ``multi`` (more).

Masks are decoded with pycocotools. Malformed input raises :class:`DatasetFormatError` naming the
file and the field, e.g. ``refs.json: annotations[3].segmentation: ...``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import cv2
import numpy as np

from qwen3vl_seg_ros.masks import mask_box
from qwen3vl_seg_ros.types import CameraIntrinsics, InputError


class DatasetFormatError(InputError):
    """A dataset file is malformed; the message names the file and the field."""


@dataclass
class RefSample:
    """One expression with its image and its target instances (K = 0 for a no-target sample)."""

    image_path: Path
    rgb: np.ndarray | None  # (H, W, 3) uint8 RGB; None when the dataset was opened without images
    depth: np.ndarray | None  # (H, W) float32 metres, NaN = no reading; None when the image has none
    intrinsics: CameraIntrinsics | None
    expression: str
    query_type: str
    boxes: np.ndarray  # (K, 4) float32 [x1, y1, x2, y2], right/bottom edges exclusive
    masks: np.ndarray  # (K, H, W) bool
    ann_ids: tuple[int, ...]
    image_id: int
    ref_id: int
    split: str | None = None


@dataclass(frozen=True)
class ImageInfo:
    """One entry of ``images``: where the files are and how large the image is."""

    id: int
    file_name: str
    width: int
    height: int
    depth_file: str | None
    intrinsics: CameraIntrinsics | None


@dataclass(frozen=True)
class _Ref:
    ref_id: int
    image_id: int
    ann_ids: tuple[int, ...]
    sentences: tuple[str, ...]
    query_type: str
    split: str | None


def default_query_type(num_targets: int) -> str:
    """The type of a ref that does not say: by its number of targets."""
    return "no_target" if num_targets == 0 else "referring" if num_targets == 1 else "multi"


# ---------------------------------------------------------------------------------------------
# Depth and masks


def depth_to_png_mm(depth: np.ndarray) -> np.ndarray:
    """Metres (NaN = none) -> uint16 millimetres (0 = none), as 16UC1 depth images store them.

    Depths beyond 65.535 m do not fit and are stored as 0 (no reading), as are depths that round
    to 0 mm.
    """
    mm = np.round(np.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0) * 1000.0)
    return np.where((mm > 0) & (mm <= 65535), mm, 0).astype(np.uint16)


def depth_from_png_mm(png: np.ndarray) -> np.ndarray:
    """uint16 millimetres (0 = none) -> float32 metres with NaN where there is no reading."""
    depth = png.astype(np.float32) / 1000.0
    depth[png == 0] = np.nan
    return depth


def _mask_utils() -> Any:
    """pycocotools' mask module, imported on first use: rendering synthetic scenes and training on
    them never touch RLE, so machines without pycocotools (a training GPU box) can run them."""
    from pycocotools import mask as mask_utils

    return mask_utils


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Compressed RLE of a bool mask, JSON-ready (``counts`` as text)."""
    rle = _mask_utils().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _compressed_runs(data: bytes) -> list[int] | None:
    """The run lengths a compressed COCO RLE string holds, or None when it is not one.

    Why: pycocotools checks nothing here. Counts that stop short decode without an error, the
    missing pixels taken from uninitialised memory (different on every call), so a truncated
    file would train on random masks. The format (pycocotools' maskApi.c): each run is a
    little-endian series of 5-bit groups, one character each (value + 48; bit 0x20: more
    groups follow; 0x10 in the last group: negative), and from the fourth run on, each is
    stored as the difference from the run two before.
    """
    runs: list[int] = []
    pos = 0
    while pos < len(data):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(data):
                return None
            group = data[pos] - 48
            if not 0 <= group < 64:
                return None
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos, shift = pos + 1, shift + 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _rle(segm: Any, height: int, width: int, where: str) -> dict:
    """pycocotools RLE of a polygon list or an RLE (compressed or not); ``where`` prefixes errors."""
    mask_utils = _mask_utils()
    if isinstance(segm, list):
        if not segm or not all(
            isinstance(p, list) and len(p) % 2 == 0 and all(isinstance(v, int | float) for v in p) for p in segm
        ):
            raise DatasetFormatError(f"{where}: polygons must be lists of x, y pairs of numbers")
        # COCO-derived files hold slivers of one or two points beside an object's real polygons
        # (detectron2 drops them too): they cover no area, so they are left out, not fatal
        polygons = [p for p in segm if len(p) >= 6]
        if not polygons:
            raise DatasetFormatError(f"{where}: polygons must be lists of at least 3 x, y pairs of numbers")
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        size = segm["size"]
        if list(size) != [height, width]:
            raise DatasetFormatError(f"{where}.size: {size} differs from the image's [height, width] {[height, width]}")
        counts = segm["counts"]
        if isinstance(counts, list):
            if not all(isinstance(c, int) and c >= 0 for c in counts) or sum(counts) != height * width:
                raise DatasetFormatError(f"{where}.counts: uncompressed counts must be ints >= 0 summing to H*W")
            return mask_utils.frPyObjects(segm, height, width)
        if isinstance(counts, str | bytes):
            try:
                data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
            except UnicodeEncodeError:  # "replace" would make each such character a valid "?"
                data = b"\x00"
            runs = _compressed_runs(data)
            if runs is None or min(runs, default=0) < 0 or sum(runs) != height * width:
                raise DatasetFormatError(f"{where}.counts: compressed counts must decode to runs >= 0 summing "
                                         f"to H*W = {height * width}" + (f" (they sum to {sum(runs)})" if runs else ""))
            return {"size": [height, width], "counts": data}
        raise DatasetFormatError(f"{where}.counts: expected a string or a list of ints, got {type(counts).__name__}")
    raise DatasetFormatError(f"{where}: expected polygons (list) or RLE (dict with 'size' and 'counts')")


def decode_segmentation(segm: Any, height: int, width: int, where: str = "segmentation") -> np.ndarray:
    """A COCO segmentation (polygons or RLE) as an ``(H, W)`` bool mask."""
    rle = _rle(segm, height, width, where)
    try:
        with warnings.catch_warnings():
            # pycocotools 2.0.x on numpy 2 warns about its own array wrapper on every decode
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="pycocotools")
            mask = _mask_utils().decode(rle)
    except Exception as exc:  # pycocotools raises assorted errors on corrupt counts
        raise DatasetFormatError(f"{where}: cannot decode RLE: {exc}") from exc
    if mask.shape != (height, width):
        raise DatasetFormatError(f"{where}: decodes to {mask.shape}, expected {(height, width)}")
    return mask.astype(bool)


# ---------------------------------------------------------------------------------------------
# Reading


class _Fields:
    """Typed access to one JSON object with errors naming the file and the field."""

    def __init__(self, path: Path, where: str, obj: Any) -> None:
        if not isinstance(obj, dict):
            raise DatasetFormatError(f"{path}: {where}: expected an object, got {type(obj).__name__}")
        self.path, self.where, self.obj = path, where, obj

    def error(self, key: str, what: str) -> DatasetFormatError:
        return DatasetFormatError(f"{self.path}: {self.where}.{key}: {what}")

    def has(self, key: str) -> bool:
        return self.obj.get(key) is not None

    def get(self, key: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.obj or self.obj[key] is None:
            if default is ...:
                raise self.error(key, "missing")
            return default
        value = self.obj[key]
        allowed = types if isinstance(types, tuple) else (types,)
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, types):
            names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
            raise self.error(key, f"expected {names}, got {type(value).__name__} {value!r:.60}")
        return value

    def number_list(self, key: str, length: int) -> list[float]:
        value = self.get(key, list)
        if len(value) != length or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise self.error(key, f"expected {length} numbers, got {value!r:.80}")
        return [float(v) for v in value]


def _parse_intrinsics(f: _Fields, width: int, height: int) -> CameraIntrinsics | None:
    if not f.has("intrinsics"):
        return None
    k = _Fields(f.path, f"{f.where}.intrinsics", f.obj["intrinsics"])
    if k.has("K"):
        m = k.number_list("K", 9)
        fx, fy, cx, cy = m[0], m[4], m[2], m[5]
    else:
        fx, fy, cx, cy = (float(k.get(n, int | float)) for n in ("fx", "fy", "cx", "cy"))
    intr = CameraIntrinsics(fx=fx, fy=fy, cx=cx, cy=cy, width=width, height=height)
    if not intr.is_valid():
        raise f.error("intrinsics", f"not a valid pinhole camera: {intr}")
    return intr


def _parse_image(path: Path, i: int, obj: Any) -> ImageInfo:
    f = _Fields(path, f"images[{i}]", obj)
    width, height = f.get("width", int), f.get("height", int)
    if width <= 0 or height <= 0:
        raise f.error("width", f"image size must be positive, got {width}x{height}")
    return ImageInfo(
        id=f.get("id", int),
        file_name=f.get("file_name", str),
        width=width,
        height=height,
        depth_file=f.get("depth_file", str, None),
        intrinsics=_parse_intrinsics(f, width, height),
    )


def _parse_annotation(path: Path, i: int, obj: Any, images: dict[int, ImageInfo]) -> dict:
    f = _Fields(path, f"annotations[{i}]", obj)
    f.get("id", int)
    image_id = f.get("image_id", int)
    if image_id not in images:
        raise f.error("image_id", f"no image has id {image_id}")
    if not f.has("segmentation"):
        raise f.error("segmentation", "missing (masks are needed for referring segmentation)")
    if f.has("bbox"):
        f.number_list("bbox", 4)
    return obj


def _sentences(f: _Fields) -> tuple[str, ...]:
    if f.has("sentences"):
        out = []
        for j, s in enumerate(f.get("sentences", list)):
            if isinstance(s, dict):
                s = s.get("sent", s.get("raw"))
            if not isinstance(s, str) or not s.strip():
                raise f.error(f"sentences[{j}]", "expected a non-empty string or an object with 'sent' or 'raw'")
            out.append(s.strip())
    elif f.has("expressions"):
        out = [e.strip() for e in f.get("expressions", list) if isinstance(e, str) and e.strip()]
    else:
        out = [f.get("expression", str).strip()]
    if not out or not all(out):
        raise f.error("sentences", "a ref needs at least one non-empty sentence or expression")
    return tuple(out)


def _target_ids(f: _Fields) -> tuple[int, ...]:
    key = "ann_ids" if f.has("ann_ids") else "ann_id"
    raw = f.get(key, (list, int))
    ids = raw if isinstance(raw, list) else [raw]
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in ids):
        raise f.error(key, f"expected annotation ids (ints), got {raw!r:.80}")
    ids = [a for a in ids if a != -1]  # gRefCOCO writes -1 for "no target"
    if f.get("no_target", bool, False) and ids:
        raise f.error(key, "the ref says no_target but lists annotations")
    return tuple(ids)


def _parse_ref(path: Path, i: int, obj: Any, images: dict[int, ImageInfo], anns: dict[int, dict]) -> _Ref:
    f = _Fields(path, f"refs[{i}]", obj)
    image_id = f.get("image_id", int)
    if image_id not in images:
        raise f.error("image_id", f"no image has id {image_id}")
    ann_ids = _target_ids(f)
    for a in ann_ids:
        if a not in anns:
            raise f.error("ann_ids", f"no annotation has id {a}")
        if anns[a]["image_id"] != image_id:
            raise f.error("ann_ids", f"annotation {a} belongs to image {anns[a]['image_id']}, not {image_id}")
    return _Ref(
        ref_id=f.get("ref_id", int, i),
        image_id=image_id,
        ann_ids=ann_ids,
        sentences=_sentences(f),
        query_type=f.get("query_type", str, default_query_type(len(ann_ids))),
        split=f.get("split", str, None),
    )


def _section(path: Path, data: dict, key: str, required: bool = True) -> list:
    if key not in data:
        if required:
            raise DatasetFormatError(f"{path}: {key}: missing")
        return []
    if not isinstance(data[key], list):
        raise DatasetFormatError(f"{path}: {key}: expected a list, got {type(data[key]).__name__}")
    return data[key]


def _index_by_id(path: Path, key: str, items: list[Any], ids: Iterable[int]) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for i, (item_id, item) in enumerate(zip(ids, items)):
        if item_id in out:
            raise DatasetFormatError(f"{path}: {key}[{i}].id: duplicate id {item_id}")
        out[item_id] = item
    return out


class RefDataset(Sequence[RefSample]):
    """The samples of one COCO-style referring file: one per (ref, sentence).

    Opening validates the whole index (ids, references between sections, field types) so a
    broken file fails at once rather than mid-training; images, depth and masks are read when a
    sample is accessed, which keeps the dataset cheap to hand to data-loader workers.
    """

    def __init__(
        self, json_path: str | Path, image_root: str | Path | None = None, split: str | None = None,
        load_images: bool = True,
    ) -> None:
        self.json_path = Path(json_path)
        self.image_root = Path(image_root) if image_root is not None else self.json_path.parent
        self.load_images = load_images
        try:
            data = json.loads(self.json_path.read_text())
        except OSError as exc:
            raise DatasetFormatError(f"{self.json_path}: cannot read: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{self.json_path}: not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise DatasetFormatError(f"{self.json_path}: expected a JSON object with images, annotations and refs")
        path = self.json_path
        images = [_parse_image(path, i, o) for i, o in enumerate(_section(path, data, "images"))]
        self.images: dict[int, ImageInfo] = _index_by_id(path, "images", images, (im.id for im in images))
        anns = [_parse_annotation(path, i, o, self.images) for i, o in enumerate(_section(path, data, "annotations"))]
        self.annotations: dict[int, dict] = _index_by_id(path, "annotations", anns, (a["id"] for a in anns))
        self._ann_index = {a["id"]: i for i, a in enumerate(anns)}
        self.categories: dict[int, str] = {
            c["id"]: str(c.get("name", c["id"])) for c in _section(path, data, "categories", required=False)
            if isinstance(c, dict) and "id" in c
        }
        refs = [
            _parse_ref(path, i, o, self.images, self.annotations) for i, o in enumerate(_section(path, data, "refs"))
        ]
        self.refs = [r for r in refs if split is None or r.split == split]
        self._entries = [(r, s) for r in self.refs for s in r.sentences]
        self._check_masks()

    def _check_masks(self) -> None:
        """The structure of every target's mask (types, size, polygon lengths, run sums), checked
        at open as the rest of the index is: one bad mask would otherwise stop a training run
        when its sample comes up. Only the masks a kept ref targets (a RefCOCO file's source
        holds many more); decoding stays with the sample."""
        for ann_id in sorted({a for r in self.refs for a in r.ann_ids}):
            ann = self.annotations[ann_id]
            image = self.images[ann["image_id"]]
            where = f"{self.json_path}: annotations[{self._ann_index[ann_id]}].segmentation"
            _rle(ann["segmentation"], image.height, image.width, where)

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> RefSample: ...

    @overload
    def __getitem__(self, index: slice) -> list[RefSample]: ...

    def __getitem__(self, index: int | slice) -> RefSample | list[RefSample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        ref, sentence = self._entries[index]
        image = self.images[ref.image_id]
        masks, boxes = self.targets(ref.ann_ids, image)
        rgb = depth = None
        if self.load_images:
            rgb = self._read_rgb(image)
            depth = self._read_depth(image) if image.depth_file else None
        return RefSample(
            image_path=self.image_root / image.file_name, rgb=rgb, depth=depth, intrinsics=image.intrinsics,
            expression=sentence, query_type=ref.query_type, boxes=boxes, masks=masks, ann_ids=ref.ann_ids,
            image_id=image.id, ref_id=ref.ref_id, split=ref.split,
        )

    def targets(self, ann_ids: Sequence[int], image: ImageInfo) -> tuple[np.ndarray, np.ndarray]:
        """Masks ``(K, H, W)`` and boxes ``(K, 4)`` of annotations (boxes from ``bbox`` when given)."""
        masks = np.zeros((len(ann_ids), image.height, image.width), dtype=bool)
        boxes = np.zeros((len(ann_ids), 4), dtype=np.float32)
        for k, a in enumerate(ann_ids):
            ann = self.annotations[a]
            where = f"{self.json_path}: annotations[{self._ann_index[a]}].segmentation"
            masks[k] = decode_segmentation(ann["segmentation"], image.height, image.width, where)
            if ann.get("bbox") is not None:
                x, y, w, h = (float(v) for v in ann["bbox"])
                boxes[k] = (x, y, x + w, y + h)
            else:
                boxes[k] = mask_box(masks[k])
        return masks, boxes

    def _read_rgb(self, image: ImageInfo) -> np.ndarray:
        path = self.image_root / image.file_name
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DatasetFormatError(f"{self.json_path}: images[id={image.id}].file_name: cannot read {path}")
        if bgr.shape[:2] != (image.height, image.width):
            raise DatasetFormatError(
                f"{self.json_path}: images[id={image.id}]: {path} is {bgr.shape[1]}x{bgr.shape[0]}, "
                f"the file says {image.width}x{image.height}"
            )
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def _read_depth(self, image: ImageInfo) -> np.ndarray:
        path = self.image_root / str(image.depth_file)
        png = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        where = f"{self.json_path}: images[id={image.id}].depth_file"
        if png is None:
            raise DatasetFormatError(f"{where}: cannot read {path}")
        if png.dtype != np.uint16 or png.ndim != 2:
            raise DatasetFormatError(f"{where}: {path} must be a one-channel 16-bit PNG (millimetres), got {png.dtype}")
        if png.shape != (image.height, image.width):
            raise DatasetFormatError(
                f"{where}: {path} is {png.shape[1]}x{png.shape[0]}, not {image.width}x{image.height}"
            )
        return depth_from_png_mm(png)


# ---------------------------------------------------------------------------------------------
# Writing


class CocoRefWriter:
    """Builds a COCO-style referring file: images (and depth) go to disk as added, the JSON on ``write``.

    Layout under ``root``: ``annotations.json``, ``images/NNNNNN.png``, ``depth/NNNNNN.png``.
    """

    def __init__(self, root: str | Path, annotation_file: str = "annotations.json") -> None:
        self.root = Path(root)
        self.annotation_file = annotation_file
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.refs: list[dict] = []
        self.categories: dict[str, int] = {}
        self._sizes: dict[int, tuple[int, int]] = {}

    def add_image(
        self, rgb: np.ndarray, *, depth: np.ndarray | None = None, intrinsics: CameraIntrinsics | None = None,
        extra: dict[str, Any] | None = None,
    ) -> int:
        """Writes an RGB image (and its depth as 16-bit millimetres) and returns its image id."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise InputError(f"rgb must be HxWx3 uint8, got {rgb.shape} {rgb.dtype}")
        image_id = len(self.images) + 1
        height, width = rgb.shape[:2]
        record: dict[str, Any] = {
            "id": image_id, "file_name": f"images/{image_id:06d}.png", "width": width, "height": height
        }
        self._imwrite(record["file_name"], cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if depth is not None:
            if depth.shape != (height, width):
                raise InputError(f"depth is {depth.shape}, the image is {(height, width)}")
            record["depth_file"] = f"depth/{image_id:06d}.png"
            self._imwrite(record["depth_file"], depth_to_png_mm(depth))
        if intrinsics is not None:
            record["intrinsics"] = {k: float(getattr(intrinsics, k)) for k in ("fx", "fy", "cx", "cy")}
        record.update(extra or {})
        self.images.append(record)
        self._sizes[image_id] = (height, width)
        return image_id

    def add_annotation(
        self, image_id: int, mask: np.ndarray, *, category: str, bbox: Sequence[float] | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> int:
        """Adds one instance (mask as compressed RLE; ``bbox`` as [x1, y1, x2, y2], default the mask's)."""
        if mask.shape != self._sizes[image_id]:
            raise InputError(f"mask is {mask.shape}, image {image_id} is {self._sizes[image_id]}")
        x1, y1, x2, y2 = (float(v) for v in (mask_box(mask) if bbox is None else bbox))
        ann_id = len(self.annotations) + 1
        category_id = self.categories.setdefault(category, len(self.categories) + 1)
        record = {
            "id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": encode_mask(mask),
            "area": int(mask.sum()), "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0,
        }
        if attributes:
            record["attributes"] = attributes
        self.annotations.append(record)
        return ann_id

    def add_ref(
        self, image_id: int, ann_ids: Sequence[int], sentences: Sequence[str], query_type: str | None = None,
        split: str | None = None,
    ) -> int:
        """Adds an expression (or several phrasings of it) referring to ``ann_ids`` (empty: no target)."""
        ref_id = len(self.refs) + 1
        record: dict[str, Any] = {
            "ref_id": ref_id, "image_id": image_id, "ann_ids": [int(a) for a in ann_ids],
            "sentences": [{"sent": s} for s in sentences],
            "query_type": query_type or default_query_type(len(ann_ids)),
        }
        if split is not None:
            record["split"] = split
        self.refs.append(record)
        return ref_id

    def write(self) -> Path:
        """Writes the JSON file and returns its path."""
        path = self.root / self.annotation_file
        path.parent.mkdir(parents=True, exist_ok=True)
        categories = [{"id": i, "name": n} for n, i in self.categories.items()]
        data = {"images": self.images, "annotations": self.annotations, "categories": categories, "refs": self.refs}
        path.write_text(json.dumps(data))
        return path

    def _imwrite(self, rel: str, image: np.ndarray) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(path), image):
            raise OSError(f"cannot write {path}")

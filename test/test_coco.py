"""COCO-style referring data: reading a hand-made file, writer -> reader round trip, clear errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from qwen3vl_seg_ros.training.coco import (
    CocoRefWriter,
    DatasetFormatError,
    RefDataset,
    decode_segmentation,
    depth_from_png_mm,
    depth_to_png_mm,
)
from qwen3vl_seg_ros.types import CameraIntrinsics

H, W = 10, 12


def rect(rows: slice, cols: slice, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[rows, cols] = True
    return m


# Uncompressed RLE, column-major, of a 10x12 mask with rows 1-2 of columns 1-2 set:
# column 0 = 10 zeros, then in column 1: 1 zero, 2 ones, 7 zeros + column 2: 1 zero, 2 ones, ...
UNCOMPRESSED = {"size": [H, W], "counts": [11, 2, 8, 2, 97]}
COMPRESSED_MASK = rect(slice(6, 9), slice(9, 12))


@pytest.fixture
def dataset_file(tmp_path: Path) -> Path:
    """Two images (one with depth and intrinsics), four annotations, five refs in several dialects."""
    rgb1 = np.arange(H * W * 3, dtype=np.uint8).reshape(H, W, 3)
    rgb2 = np.full((H, W, 3), 200, dtype=np.uint8)
    (tmp_path / "img").mkdir()
    cv2.imwrite(str(tmp_path / "img" / "a.png"), cv2.cvtColor(rgb1, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "img" / "b.png"), cv2.cvtColor(rgb2, cv2.COLOR_RGB2BGR))
    depth_mm = np.full((H, W), 1234, dtype=np.uint16)
    depth_mm[0, 0] = 0
    cv2.imwrite(str(tmp_path / "img" / "a_depth.png"), depth_mm)
    compressed = mask_utils.encode(np.asfortranarray(COMPRESSED_MASK.astype(np.uint8)))
    data = {
        "images": [
            {"id": 1, "file_name": "img/a.png", "width": W, "height": H, "depth_file": "img/a_depth.png",
             "intrinsics": {"fx": 100.0, "fy": 101.0, "cx": 5.5, "cy": 4.5}},
            {"id": 2, "file_name": "img/b.png", "width": W, "height": H,
             "intrinsics": {"K": [90, 0, 6, 0, 91, 5, 0, 0, 1]}},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 2, 6, 4],
             "segmentation": [[2, 2, 8, 2, 8, 6, 2, 6]]},
            {"id": 11, "image_id": 1, "category_id": 1, "segmentation": UNCOMPRESSED},
            {"id": 12, "image_id": 1, "category_id": 2,
             "segmentation": {"size": [H, W], "counts": compressed["counts"].decode("ascii")}},
            {"id": 20, "image_id": 2, "category_id": 2, "bbox": [0, 0, 3, 3],
             "segmentation": [[0, 0, 3, 0, 3, 3, 0, 3]]},
        ],
        "categories": [{"id": 1, "name": "cube"}, {"id": 2, "name": "ball"}],
        "refs": [
            {"ref_id": 1, "image_id": 1, "ann_ids": [10, 11], "query_type": "multi", "split": "val",
             "sentences": [{"sent": "the two cubes"}, "both cubes"]},
            {"ref_id": 2, "image_id": 1, "ann_ids": [], "expressions": ["the purple ball"], "split": "val"},
            # RefCOCO-like: one ann_id, tokenised sentences, no query type
            {"ref_id": 3, "image_id": 1, "ann_id": 12, "split": "train", "category_id": 2,
             "sentences": [{"tokens": ["ball"], "raw": "The ball.", "sent": "the ball"}]},
            # gRefCOCO-like no target
            {"image_id": 2, "ann_id": [-1], "no_target": True, "sentences": [{"raw": "the red mug"}]},
            {"ref_id": 5, "image_id": 2, "ann_id": 20, "expression": "the ball in the corner"},
        ],
    }
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(data))
    return path


def test_reads_every_dialect(dataset_file: Path) -> None:
    data = RefDataset(dataset_file)
    assert [s.expression for s in data] == [
        "the two cubes", "both cubes", "the purple ball", "the ball", "the red mug", "the ball in the corner"
    ]
    assert [s.query_type for s in data] == ["multi", "multi", "no_target", "referring", "no_target", "referring"]
    assert [s.ann_ids for s in data] == [(10, 11), (10, 11), (), (12,), (), (20,)]
    assert data.categories == {1: "cube", 2: "ball"}


def test_polygon_and_uncompressed_rle_masks_and_boxes(dataset_file: Path) -> None:
    sample = RefDataset(dataset_file)[0]
    assert sample.masks.shape == (2, H, W) and sample.masks.dtype == bool
    # the polygon's corners (2, 2) and (8, 6) are pixel edges: columns 2..7, rows 2..5
    np.testing.assert_array_equal(sample.masks[0], rect(slice(2, 6), slice(2, 8)))
    np.testing.assert_array_equal(sample.masks[1], rect(slice(1, 3), slice(1, 3)))
    # the first box is the annotation's bbox, the second (no bbox given) the mask's
    np.testing.assert_array_equal(sample.boxes, [[2, 2, 8, 6], [1, 1, 3, 3]])


def test_compressed_rle_no_target_and_images(dataset_file: Path) -> None:
    data = RefDataset(dataset_file)
    refcoco = data[3]
    np.testing.assert_array_equal(refcoco.masks[0], COMPRESSED_MASK)
    np.testing.assert_array_equal(refcoco.boxes, [[9, 6, 12, 9]])
    assert refcoco.rgb.shape == (H, W, 3)
    np.testing.assert_array_equal(refcoco.rgb, np.arange(H * W * 3, dtype=np.uint8).reshape(H, W, 3))
    assert refcoco.depth[0, 0] != refcoco.depth[0, 0]  # 0 mm is no reading: NaN
    assert refcoco.depth[5, 5] == pytest.approx(1.234)
    assert refcoco.intrinsics == CameraIntrinsics(100.0, 101.0, 5.5, 4.5, W, H)
    empty = data[2]
    assert empty.masks.shape == (0, H, W) and empty.boxes.shape == (0, 4)
    other = data[4]
    assert other.depth is None and other.ref_id == 3  # refs without ref_id are numbered by position
    assert other.intrinsics == CameraIntrinsics(90.0, 91.0, 6.0, 5.0, W, H)


def test_split_filter_and_index_only_mode(dataset_file: Path) -> None:
    val = RefDataset(dataset_file, split="val", load_images=False)
    assert len(val) == 3 and all(s.split == "val" for s in val)
    assert val[0].rgb is None and val[0].depth is None
    assert val[0].masks.shape == (2, H, W)


def test_writer_reader_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    depth = rng.uniform(0.3, 5.0, (H, W)).astype(np.float32)
    depth[3, 4] = np.nan
    k = CameraIntrinsics(fx=50.0, fy=51.0, cx=5.5, cy=4.5, width=W, height=H)
    masks = [rng.random((H, W)) < 0.3, rect(slice(0, 4), slice(5, 9))]
    writer = CocoRefWriter(tmp_path / "out")
    image_id = writer.add_image(rgb, depth=depth, intrinsics=k, extra={"note": "x"})
    ann = [writer.add_annotation(image_id, m, category="blob", attributes={"colour": "red"}) for m in masks]
    writer.add_ref(image_id, ann, ["both blobs"], "multi", "train")
    writer.add_ref(image_id, [ann[1]], ["the square"])
    writer.add_ref(image_id, [], ["the ghost"], split="test")
    path = writer.write()

    data = RefDataset(path)
    assert [(s.expression, s.query_type, s.split) for s in data] == [
        ("both blobs", "multi", "train"), ("the square", "referring", None), ("the ghost", "no_target", "test")
    ]
    first = data[0]
    np.testing.assert_array_equal(first.rgb, rgb)
    np.testing.assert_array_equal(first.masks, np.stack(masks))
    np.testing.assert_array_equal(first.boxes[1], [5, 0, 9, 4])
    np.testing.assert_allclose(first.depth, depth, atol=5e-4, equal_nan=True)
    assert np.isnan(first.depth[3, 4])
    assert first.intrinsics == k
    assert data[2].masks.shape == (0, H, W)
    raw = json.loads(path.read_text())
    assert raw["annotations"][1]["area"] == 16 and raw["annotations"][1]["bbox"] == [5, 0, 4, 4]
    assert raw["annotations"][0]["attributes"] == {"colour": "red"} and raw["images"][0]["note"] == "x"
    assert raw["categories"] == [{"id": 1, "name": "blob"}]


def test_depth_png_conversion() -> None:
    # millimetres, rounded; no reading, negative or out of range (> 65.535 m) -> 0
    depth = np.array([[0.0016, 1.2344, np.nan, 70.0, -1.0, 65.535, np.inf]], dtype=np.float32)
    png = depth_to_png_mm(depth)
    assert png.dtype == np.uint16
    np.testing.assert_array_equal(png, [[2, 1234, 0, 0, 0, 65535, 0]])
    back = depth_from_png_mm(png)
    np.testing.assert_allclose(back, [[0.002, 1.234, np.nan, np.nan, np.nan, 65.535, np.nan]], equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Malformed input


def _break(dataset_file: Path, edit) -> Path:
    data = json.loads(dataset_file.read_text())
    data = copy.deepcopy(data)
    edit(data)
    dataset_file.write_text(json.dumps(data))
    return dataset_file


def test_compressed_counts_are_read_as_pycocotools_writes_them() -> None:
    """The check on compressed counts reads them as pycocotools does (its own encoder's output)."""
    from pycocotools import mask as mask_utils

    from qwen3vl_seg_ros.training.coco import _compressed_runs, encode_mask

    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        mask = rng.random((h, w)) < rng.random()
        counts = encode_mask(mask)["counts"].encode("ascii")
        runs = _compressed_runs(counts)
        assert runs is not None and sum(runs) == h * w and min(runs) >= 0
        assert sum(runs[1::2]) == int(mask.sum()) == int(mask_utils.area({"size": [h, w], "counts": counts}))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["annotations"][1].pop("segmentation"), r"annotations\[1\]\.segmentation: missing"),
        (lambda d: d["images"][0].update(width="12"), r"images\[0\]\.width: expected int, got str"),
        (lambda d: d["refs"][0].update(ann_ids=[10, 99]), r"refs\[0\]\.ann_ids: no annotation has id 99"),
        (lambda d: d["refs"][4].update(ann_id=10), r"refs\[4\]\.ann_ids: annotation 10 belongs to image 1"),
        (lambda d: d["refs"][1].pop("expressions"), r"refs\[1\]\.expression: missing"),
        (lambda d: d["refs"][3].update(ann_id=[20]), r"refs\[3\]\.ann_id: the ref says no_target"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotations\[0\]\.bbox: expected 4 numbers"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), r"annotations\[4\]\.id: duplicate id 10"),
        (lambda d: d["images"][1].update(intrinsics={"fx": 1.0}), r"images\[1\]\.intrinsics\.fy: missing"),
        (lambda d: d.pop("refs"), r"refs: missing"),
    ],
)
def test_malformed_index_names_file_and_field(dataset_file: Path, edit, message: str) -> None:
    path = _break(dataset_file, edit)
    with pytest.raises(DatasetFormatError, match=rf"refs\.json: {message}"):
        RefDataset(path)


@pytest.mark.parametrize(
    ("segmentation", "message"),
    [
        ([[1, 1, 2, 2]], "at least 3 x, y pairs"),
        ({"size": [H, W + 1], "counts": "abc"}, r"size: \[10, 13\] differs"),
        ({"size": [H, W], "counts": [5, 5]}, "summing to H\\*W"),
        ({"size": [H, W], "counts": 17}, "expected a string or a list of ints"),
        # compressed counts that stop short (pycocotools filled the rest from uninitialised memory)
        ({"size": [H, W], "counts": "T3b1"}, r"compressed counts must decode to runs >= 0 summing to H\*W = 120"),
        ({"size": [H, W], "counts": "\x7f\x7f~~zz"}, "compressed counts must decode"),  # not RLE at all
        ({"size": [H, W], "counts": "e"}, "compressed counts must decode"),  # ends inside a run (0x20 set)
        ({"size": [H, W], "counts": "\u00e9" * 4}, "compressed counts must decode"),  # not ASCII
        ("nonsense", "expected polygons"),
    ],
)
def test_malformed_masks_are_reported_when_the_file_opens(dataset_file: Path, segmentation, message: str) -> None:
    """Not when the sample comes up: one bad mask would stop a training run midway."""
    path = _break(dataset_file, lambda d: d["annotations"][0].update(segmentation=segmentation))
    with pytest.raises(DatasetFormatError, match=rf"refs\.json: annotations\[0\]\.segmentation.*{message}"):
        RefDataset(path)


def test_a_sliver_polygon_beside_a_real_one_is_left_out(dataset_file: Path) -> None:
    """COCO-derived files hold 1- and 2-point polygons next to an object's real ones."""
    data = RefDataset(dataset_file)
    before = data[0].masks
    ann = data.annotations[data.refs[0].ann_ids[0]]
    polygons = ann["segmentation"] if isinstance(ann["segmentation"], list) else None
    if polygons is None:
        pytest.skip("the first target is stored as RLE")
    path = _break(dataset_file, lambda d: d["annotations"][0].update(segmentation=[*polygons, [7.5, 7.5, 7.5, 7.5]]))
    np.testing.assert_array_equal(RefDataset(path)[0].masks, before)


def test_missing_image_file(dataset_file: Path) -> None:
    (dataset_file.parent / "img" / "a.png").unlink()
    data = RefDataset(dataset_file)  # the index is fine; the image is read with the sample
    with pytest.raises(DatasetFormatError, match=r"refs\.json: images\[id=1\]\.file_name: cannot read .*a\.png"):
        data[0]


def test_image_of_the_wrong_size(dataset_file: Path) -> None:
    cv2.imwrite(str(dataset_file.parent / "img" / "a.png"), np.zeros((H + 1, W, 3), dtype=np.uint8))
    with pytest.raises(DatasetFormatError, match=r"a\.png is 12x11, the file says 12x10"):
        RefDataset(dataset_file)[0]


def test_depth_that_is_not_16_bit(dataset_file: Path) -> None:
    cv2.imwrite(str(dataset_file.parent / "img" / "a_depth.png"), np.zeros((H, W), dtype=np.uint8))
    with pytest.raises(DatasetFormatError, match=r"images\[id=1\]\.depth_file: .* one-channel 16-bit PNG"):
        RefDataset(dataset_file)[0]


def test_not_json(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(DatasetFormatError, match=r"broken\.json: not valid JSON"):
        RefDataset(path)
    with pytest.raises(DatasetFormatError, match="cannot read"):
        RefDataset(tmp_path / "absent.json")


def test_decode_segmentation_direct() -> None:
    np.testing.assert_array_equal(decode_segmentation(UNCOMPRESSED, H, W), rect(slice(1, 3), slice(1, 3)))

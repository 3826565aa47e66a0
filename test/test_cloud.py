"""Structured point clouds: the packed colour bits, the layout, voxel downsampling."""

from __future__ import annotations

import struct
from collections import defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3vl_seg_ros.cloud import (
    CLOUD_DTYPE,
    DEFAULT_COLOR,
    concat_clouds,
    make_cloud,
    pack_rgb,
    unpack_rgb,
    voxel_downsample,
    voxel_downsample_points,
)


def test_layout_is_the_wire_layout() -> None:
    assert CLOUD_DTYPE.itemsize == 20
    assert [CLOUD_DTYPE.fields[n][1] for n in ("x", "y", "z", "rgb", "id")] == [0, 4, 8, 12, 16]
    assert all(CLOUD_DTYPE.fields[n][0].byteorder in ("<", "=", "|") for n in CLOUD_DTYPE.names)


@pytest.mark.parametrize(("rgb", "bits"), [((255, 0, 0), 0x00FF0000), ((0, 255, 0), 0x0000FF00),
                                          ((0, 0, 255), 0x000000FF), ((18, 52, 86), 0x00123456),
                                          ((1, 0, 0), 0x00010000)])
def test_pack_rgb_bits(rgb: tuple[int, int, int], bits: int) -> None:
    packed = pack_rgb(np.array([rgb], dtype=np.uint8))
    assert packed.dtype == np.float32
    # Independent check: the float's 4 little-endian bytes are 0x00RRGGBB.
    assert struct.unpack("<I", packed.tobytes())[0] == bits


def test_pack_unpack_round_trip_every_value() -> None:
    v = np.arange(256, dtype=np.uint8)
    colors = np.stack((v, v[::-1], np.roll(v, 7)), axis=1)
    np.testing.assert_array_equal(unpack_rgb(pack_rgb(colors)), colors)


def test_make_cloud_fields() -> None:
    pts = np.array([[0.1, 0.2, 0.3], [1.0, -2.0, 3.5]], dtype=np.float32)
    cols = np.array([[10, 20, 30], [200, 100, 0]], dtype=np.uint8)
    cloud = make_cloud(pts, cols, 7)
    np.testing.assert_array_equal(np.stack((cloud["x"], cloud["y"], cloud["z"]), 1), pts)
    np.testing.assert_array_equal(unpack_rgb(cloud["rgb"]), cols)
    np.testing.assert_array_equal(cloud["id"], [7, 7])
    grey = make_cloud(pts)
    np.testing.assert_array_equal(unpack_rgb(grey["rgb"]), [DEFAULT_COLOR, DEFAULT_COLOR])
    with pytest.raises(ValueError, match="ids"):
        make_cloud(pts, cols, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="colors"):
        make_cloud(pts, cols[:1])


def test_concat_keeps_ids() -> None:
    a = make_cloud(np.zeros((2, 3), np.float32), None, 1)
    b = make_cloud(np.ones((3, 3), np.float32), None, 2)
    both = concat_clouds([a, b])
    np.testing.assert_array_equal(both["id"], [1, 1, 2, 2, 2])
    assert concat_clouds([]).dtype == CLOUD_DTYPE and concat_clouds([]).shape == (0,)


def test_voxel_means_by_hand() -> None:
    # Voxels of 0.1 m: the first two points share voxel (0, 0, 0), the third is alone.
    pts = np.array([[0.01, 0.02, 0.03], [0.05, 0.06, 0.07], [0.25, 0.0, 0.0]], dtype=np.float32)
    cols = np.array([[0, 0, 0], [100, 50, 10], [255, 255, 255]], dtype=np.uint8)
    out_p, out_c = voxel_downsample_points(pts, 0.1, cols)
    order = np.argsort(out_p[:, 0])
    np.testing.assert_allclose(out_p[order], [[0.03, 0.04, 0.05], [0.25, 0.0, 0.0]], atol=1e-7)
    np.testing.assert_array_equal(out_c[order], [[50, 25, 5], [255, 255, 255]])


def test_voxel_never_mixes_objects() -> None:
    pts = np.array([[0.01, 0.01, 0.01], [0.02, 0.02, 0.02], [0.03, 0.03, 0.03]], dtype=np.float32)
    cloud = make_cloud(pts, None, np.array([1, 2, 1]))
    out = voxel_downsample(cloud, 0.1)
    assert sorted(out["id"].tolist()) == [1, 2]
    one = out[out["id"] == 1][0]
    assert (one["x"], one["y"], one["z"]) == pytest.approx((0.02, 0.02, 0.02), abs=1e-7)


def test_voxel_drops_non_finite_and_zero_size_is_identity() -> None:
    pts = np.array([[0.0, 0.0, 0.0], [np.nan, 0.0, 0.0]], dtype=np.float32)
    out = voxel_downsample(make_cloud(pts, None, 0), 0.05)
    assert out.shape == (1,)
    cloud = make_cloud(pts, None, 0)
    assert voxel_downsample(cloud, 0.0) is cloud
    nothing = np.full((2, 3), np.nan, np.float32)  # no finite point at all: empty, not an exception
    assert voxel_downsample(make_cloud(nothing, None, 1), 0.05).shape == (0,)
    out_p, out_c = voxel_downsample_points(nothing, 0.05, np.zeros((2, 3), np.uint8))
    assert out_p.shape == (0, 3) and out_p.dtype == np.float32 and out_c.shape == (0, 3)


def _reference_groups(pts: np.ndarray, ids: np.ndarray, size: float) -> dict:
    """Naive grouping, one point at a time, for comparison."""
    groups: dict = defaultdict(list)
    for p, i in zip(pts.astype(np.float64), ids):
        groups[(int(i), *np.floor(p / size).astype(np.int64).tolist())].append(p)
    return {k: np.mean(v, axis=0) for k, v in groups.items()}


def _check_against_reference(pts: np.ndarray, ids: np.ndarray, size: float) -> None:
    out = voxel_downsample(make_cloud(pts, None, ids), size)
    ref = _reference_groups(pts, ids, size)
    assert out.shape[0] == len(ref)
    got = sorted((int(r["id"]), float(r["x"]), float(r["y"]), float(r["z"])) for r in out)
    want = sorted((k[0], *v.tolist()) for k, v in ref.items())
    for g, w in zip(got, want):
        assert g[0] == w[0]
        np.testing.assert_allclose(g[1:], w[1:], rtol=1e-6, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.floats(min_value=0.01, max_value=0.5), st.integers(0, 2**31))
def test_voxel_matches_naive_grouping(n: int, size: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-1.0, 1.0, (n, 3)).astype(np.float32)
    ids = rng.integers(0, 3, n).astype(np.uint32)
    _check_against_reference(pts, ids, size)


def test_voxel_huge_extent_uses_the_safe_path() -> None:
    # 1 um voxels over kilometres: packed int64 keys would overflow; results must still be right.
    pts = np.array([[0.0, 0.0, 0.0], [5e3, -5e3, 5e3], [5e3, -5e3, 5e3], [1e-7, 0.0, 0.0]], dtype=np.float32)
    ids = np.array([0, 1, 1, 0], dtype=np.uint32)
    _check_against_reference(pts, ids, 1e-6)

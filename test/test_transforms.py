"""Rigid-transform maths against hand-computed cases, plus algebraic properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3vl_seg_ros.transforms import (
    Transform,
    interpolate,
    quat_from_axis_angle,
    quat_from_matrix,
    quat_multiply,
    quat_rotate,
    quat_slerp,
    quat_to_matrix,
)

S = math.sqrt(0.5)
ROT_Z_90 = np.array([0.0, 0.0, S, S])  # +90 degrees about z
ROT_X_180 = np.array([1.0, 0.0, 0.0, 0.0])


def angle_between(q0: np.ndarray, q1: np.ndarray) -> float:
    """Rotation angle from q0 to q1 (radians, in [0, pi])."""
    return 2.0 * math.acos(min(1.0, abs(float(np.dot(q0, q1)))))


# ---- hand-computed cases --------------------------------------------------------------------
def test_rotation_about_z_then_translation() -> None:
    tf = Transform(translation=(1.0, 2.0, 3.0), rotation=ROT_Z_90)
    pts = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # Rz(90): x -> y, y -> -x, z -> z; then + (1, 2, 3).
    expected = np.array([[1.0, 3.0, 3.0], [0.0, 2.0, 3.0], [1.0, 2.0, 4.0]])
    np.testing.assert_allclose(tf.apply(pts), expected, atol=1e-12)


def test_matrix_of_rotation_about_z() -> None:
    m = Transform(translation=(1.0, 2.0, 3.0), rotation=ROT_Z_90).as_matrix()
    expected = np.array([[0.0, -1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 3.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(m, expected, atol=1e-12)


def test_compose_reads_right_to_left() -> None:
    t_a_b = Transform(translation=(1.0, 0.0, 0.0), rotation=ROT_Z_90)
    t_b_c = Transform(translation=(0.0, 1.0, 0.0))
    t_a_c = t_a_b @ t_b_c
    # Origin of c is (0, 1, 0) in b; Rz(90) takes it to (-1, 0, 0), + (1, 0, 0) = origin of a.
    np.testing.assert_allclose(t_a_c.translation, [0.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(t_a_c.apply(np.array([1.0, 0.0, 0.0])), [0.0, 1.0, 0.0], atol=1e-12)


def test_inverse_by_hand() -> None:
    tf = Transform(translation=(1.0, 2.0, 3.0), rotation=ROT_Z_90)
    inv = tf.inverse()
    # p = R^T (q - t): (1, 3, 3) -> R^T (0, 1, 0) = (1, 0, 0).
    np.testing.assert_allclose(inv.apply(np.array([1.0, 3.0, 3.0])), [1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(inv.translation, [-2.0, 1.0, -3.0], atol=1e-12)


def test_quaternion_of_half_turns() -> None:
    # 180 degrees about x: the case where w = 0 and the naive formula fails.
    np.testing.assert_allclose(quat_from_matrix(np.diag([1.0, -1.0, -1.0])), ROT_X_180, atol=1e-12)
    # 180 degrees about (1, 1, 0)/sqrt(2): R = 2 n n^T - I.
    n = np.array([S, S, 0.0])
    r = 2.0 * np.outer(n, n) - np.eye(3)
    q = quat_from_matrix(r)
    expected = np.array([S, S, 0.0, 0.0])
    assert min(np.abs(q - expected).max(), np.abs(q + expected).max()) < 1e-12


def test_axis_angle_and_matrix_agree() -> None:
    q = quat_from_axis_angle([0.0, 0.0, 2.0], math.pi / 2)
    np.testing.assert_allclose(q, ROT_Z_90, atol=1e-12)
    np.testing.assert_allclose(quat_to_matrix(q), [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)


def test_pose_transform_by_hand() -> None:
    t_a_b = Transform(rotation=ROT_X_180)  # Rx(180): y -> -y, z -> -z
    pos, quat = t_a_b.apply_pose(np.array([1.0, 2.0, 3.0]), ROT_Z_90)
    np.testing.assert_allclose(pos, [1.0, -2.0, -3.0], atol=1e-12)
    # The pose's x axis (Rz(90) x = +y in b) becomes -y in a.
    np.testing.assert_allclose(quat_rotate(quat, [1.0, 0.0, 0.0]), [0.0, -1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(quat_rotate(quat, [0.0, 0.0, 1.0]), [0.0, 0.0, -1.0], atol=1e-12)


def test_slerp_halfway_is_45_degrees() -> None:
    q = quat_slerp([0, 0, 0, 1], ROT_Z_90, 0.5)
    np.testing.assert_allclose(q, [0.0, 0.0, math.sin(math.pi / 8), math.cos(math.pi / 8)], atol=1e-12)


def test_slerp_takes_the_short_way() -> None:
    # -q1 is the same rotation as q1; the halfway point must still be 45 degrees, not 135.
    q = quat_slerp([0, 0, 0, 1], -ROT_Z_90, 0.5)
    assert angle_between(q, [0, 0, 0, 1]) == pytest.approx(math.pi / 4, abs=1e-12)


def test_interpolate_translation_and_rotation() -> None:
    a = Transform(translation=(0.0, 0.0, 0.0))
    b = Transform(translation=(4.0, -2.0, 0.0), rotation=ROT_Z_90)
    mid = interpolate(a, b, 0.25)
    np.testing.assert_allclose(mid.translation, [1.0, -0.5, 0.0], atol=1e-12)
    assert angle_between(mid.rotation, [0, 0, 0, 1]) == pytest.approx(math.pi / 8, abs=1e-12)


def test_float32_points_far_from_origin_stay_accurate() -> None:
    tf = Transform(translation=(1000.0, -2000.0, 5.0), rotation=ROT_Z_90)
    pts = np.array([[0.123, 0.456, 0.789]], dtype=np.float32)
    out = tf.apply(pts)
    assert out.dtype == np.float32
    exact = np.array([1000.0 - 0.456, -2000.0 + 0.123, 5.789])
    np.testing.assert_allclose(out[0], exact, atol=2e-4)  # float32 spacing at 2000 m is 1.2e-4


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="zero or non-finite"):
        Transform(rotation=(0.0, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="not a rotation"):
        Transform.from_matrix(np.diag([2.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="last row"):
        m = np.eye(4)
        m[3, 0] = 1.0
        Transform.from_matrix(m)
    with pytest.raises(ValueError, match="not a rotation"):
        Transform.from_matrix(np.diag([-1.0, 1.0, 1.0, 1.0]))  # a reflection


def test_denormalised_quaternion_is_normalised() -> None:
    tf = Transform(rotation=2.0 * ROT_Z_90)
    np.testing.assert_allclose(tf.rotation, ROT_Z_90, atol=1e-12)


# ---- properties -----------------------------------------------------------------------------
finite = st.floats(min_value=-100.0, max_value=100.0, allow_nan=False)
quats = st.tuples(*(st.floats(min_value=-1.0, max_value=1.0) for _ in range(4))).filter(
    lambda q: np.linalg.norm(q) > 0.1
)
transforms = st.builds(
    lambda t, q: Transform(translation=t, rotation=q), st.tuples(finite, finite, finite), quats
)


@settings(max_examples=60, deadline=None)
@given(transforms, transforms, transforms)
def test_matches_matrix_algebra(a: Transform, b: Transform, c: Transform) -> None:
    np.testing.assert_allclose((a @ b).as_matrix(), a.as_matrix() @ b.as_matrix(), atol=1e-9)
    assert ((a @ b) @ c).almost_equal(a @ (b @ c), atol=1e-9)
    assert (a @ a.inverse()).almost_equal(Transform.identity(), atol=1e-9)
    assert Transform.from_matrix(a.as_matrix()).almost_equal(a, atol=1e-9)
    pts = np.array([[0.3, -1.2, 2.0], [5.0, 0.0, -1.0]])
    homog = np.c_[pts, np.ones(2)] @ a.as_matrix().T
    np.testing.assert_allclose(a.apply(pts), homog[:, :3], atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(quats, quats, st.floats(min_value=0.0, max_value=1.0))
def test_slerp_has_constant_angular_speed(q0, q1, t: float) -> None:
    q0 = np.asarray(q0) / np.linalg.norm(q0)
    q1 = np.asarray(q1) / np.linalg.norm(q1)
    total = angle_between(q0, q1)
    qt = quat_slerp(q0, q1, t)
    assert angle_between(q0, qt) == pytest.approx(t * total, abs=1e-6)
    assert angle_between(qt, q1) == pytest.approx((1.0 - t) * total, abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(quats, quats)
def test_quaternion_product_is_rotation_composition(qa, qb) -> None:
    ra, rb = quat_to_matrix(qa), quat_to_matrix(qb)
    np.testing.assert_allclose(quat_to_matrix(quat_multiply(qa, qb)), ra @ rb, atol=1e-9)

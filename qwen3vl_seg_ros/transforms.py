"""Rigid transforms: unit quaternions (x, y, z, w), 4x4 matrices, points and poses.

Convention (the same as tf2 and ``geometry_msgs/Transform``): a :class:`Transform` from frame
``source`` into frame ``target`` holds the pose of ``source`` expressed in ``target``, so
``T_target_source.apply(p_source) == p_target``. Composition reads right to left like the matrix
product: ``T_a_c = T_a_b @ T_b_c``.

Quaternions are ``(x, y, z, w)`` float64 arrays, as in ROS messages; every function that returns
one returns it normalised with ``w >= 0`` where the sign is free, so results compare easily.
Everything is plain numpy: the ROS layer converts messages at its edge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

#: Rotation matrices built from data are accepted when ``R @ R.T`` is this close to identity.
_ORTHONORMAL_TOL = 1e-6
#: Below this ``|dot|`` distance from 1, slerp falls back to normalised lerp (no division by ~0).
_SLERP_LINEAR_EPS = 1e-9


def quat_normalize(q: np.ndarray) -> np.ndarray:
    """Returns ``q / |q|`` (last axis); raises ``ValueError`` for zero or non-finite quaternions.

    Messages often carry slightly denormalised quaternions (float32 round trips); an all-zero one
    (an uninitialised message) is a bug upstream and must not become a silent identity.
    """
    q = np.asarray(q, dtype=np.float64)
    if q.shape[-1] != 4:
        raise ValueError(f"a quaternion has 4 components (x, y, z, w), got shape {q.shape}")
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    if not np.all(np.isfinite(norm)) or np.any(norm < 1e-12):
        raise ValueError(f"quaternion {q.tolist()} has zero or non-finite norm")
    return q / norm


def _canonical(q: np.ndarray) -> np.ndarray:
    """Picks the representative with ``w >= 0`` (q and -q are the same rotation)."""
    return np.where(q[..., 3:4] < 0.0, -q, q)


def quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product ``a * b`` (rotate by ``b`` first, then by ``a``); broadcasts over ``...x4``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ax, ay, az, aw = np.moveaxis(a, -1, 0)
    bx, by, bz, bw = np.moveaxis(b, -1, 0)
    return np.stack(
        (
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ),
        axis=-1,
    )


def quat_conjugate(q: np.ndarray) -> np.ndarray:
    """Inverse rotation of a unit quaternion."""
    q = np.asarray(q, dtype=np.float64)
    return q * np.array([-1.0, -1.0, -1.0, 1.0])


def quat_to_matrix(q: np.ndarray) -> np.ndarray:
    """3x3 rotation matrix of a quaternion (normalised first)."""
    x, y, z, w = quat_normalize(q)
    xx, yy, zz = x * x, y * y, z * z
    xy, xz, yz = x * y, x * z, y * z
    wx, wy, wz = w * x, w * y, w * z
    return np.array(
        [
            [1.0 - 2.0 * (yy + zz), 2.0 * (xy - wz), 2.0 * (xz + wy)],
            [2.0 * (xy + wz), 1.0 - 2.0 * (xx + zz), 2.0 * (yz - wx)],
            [2.0 * (xz - wy), 2.0 * (yz + wx), 1.0 - 2.0 * (xx + yy)],
        ]
    )


def _check_rotation_matrix(r: np.ndarray) -> np.ndarray:
    r = np.asarray(r, dtype=np.float64)
    if r.shape != (3, 3) or not np.all(np.isfinite(r)):
        raise ValueError(f"a rotation matrix is a finite 3x3 array, got shape {r.shape}")
    if np.abs(r @ r.T - np.eye(3)).max() > _ORTHONORMAL_TOL or np.linalg.det(r) <= 0.0:
        raise ValueError("matrix is not a rotation (not orthonormal or a reflection)")
    return r


def quat_from_matrix(r: np.ndarray) -> np.ndarray:
    """Quaternion of a 3x3 rotation matrix, ``w >= 0`` (raises ValueError if not a rotation)."""
    return quat_of_rotation(_check_rotation_matrix(r))


def quat_of_rotation(r: np.ndarray) -> np.ndarray:
    """:func:`quat_from_matrix` without the validity check, for matrices built orthonormal.

    Uses the largest of the four "diagonal" candidates as the pivot (Shepperd's method), which
    stays accurate for rotations near 180 degrees where the naive ``w = sqrt(1 + trace)/2`` loses
    all precision. Plain Python floats: ~10x faster than numpy scalars for 3x3 input.
    """
    (m00, m01, m02), (m10, m11, m12), (m20, m21, m22) = np.asarray(r, dtype=np.float64).tolist()
    trace = m00 + m11 + m22
    k = max(range(4), key=(trace, m00, m11, m22).__getitem__)
    if k == 0:
        s = 2.0 * math.sqrt(1.0 + trace)
        q = ((m21 - m12) / s, (m02 - m20) / s, (m10 - m01) / s, 0.25 * s)
    elif k == 1:
        s = 2.0 * math.sqrt(1.0 + m00 - m11 - m22)
        q = (0.25 * s, (m01 + m10) / s, (m02 + m20) / s, (m21 - m12) / s)
    elif k == 2:
        s = 2.0 * math.sqrt(1.0 + m11 - m00 - m22)
        q = ((m01 + m10) / s, 0.25 * s, (m12 + m21) / s, (m02 - m20) / s)
    else:
        s = 2.0 * math.sqrt(1.0 + m22 - m00 - m11)
        q = ((m02 + m20) / s, (m12 + m21) / s, 0.25 * s, (m10 - m01) / s)
    norm = math.sqrt(sum(v * v for v in q))
    sign = -1.0 if q[3] < 0.0 else 1.0
    return np.array([sign * v / norm for v in q])


def quat_from_axis_angle(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation of ``angle`` radians about ``axis`` (normalised here)."""
    axis = np.asarray(axis, dtype=np.float64).reshape(3)
    n = np.linalg.norm(axis)
    if not np.isfinite(n) or n < 1e-12:
        raise ValueError(f"rotation axis {axis.tolist()} has zero or non-finite length")
    half = 0.5 * float(angle)
    return _canonical(np.concatenate((axis / n * np.sin(half), [np.cos(half)])))


def quat_rotate(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Rotates vectors ``v`` (``...x3``) by the unit quaternion ``q``, vectorised, float64."""
    q = quat_normalize(q)
    v = np.asarray(v, dtype=np.float64)
    u = q[:3]
    t = 2.0 * np.cross(u, v)
    return v + q[3] * t + np.cross(u, t)


def quat_slerp(q0: np.ndarray, q1: np.ndarray, t: float) -> np.ndarray:
    """Spherical linear interpolation along the shorter arc; ``t=0`` gives q0, ``t=1`` gives q1.

    TF samples a moving frame at discrete stamps; slerp is the constant-angular-velocity motion
    between two samples, which is what tf2 assumes too.
    """
    a = quat_normalize(q0)
    b = quat_normalize(q1)
    dot = float(np.dot(a, b))
    if dot < 0.0:  # the other sign of q1 is the same rotation and closer
        b = -b
        dot = -dot
    if dot > 1.0 - _SLERP_LINEAR_EPS:
        return _canonical(quat_normalize(a + t * (b - a)))
    theta = np.arccos(min(dot, 1.0))
    sin_theta = np.sin(theta)
    wa = np.sin((1.0 - t) * theta) / sin_theta
    wb = np.sin(t * theta) / sin_theta
    return _canonical(quat_normalize(wa * a + wb * b))


def _vec3(v: np.ndarray | tuple[float, float, float], name: str) -> np.ndarray:
    out = np.asarray(v, dtype=np.float64).reshape(-1)
    if out.shape != (3,) or not np.all(np.isfinite(out)):
        raise ValueError(f"{name} must be 3 finite numbers, got {np.asarray(v).tolist()}")
    return out


@dataclass(frozen=True, eq=False)
class Transform:
    """A rigid transform: rotate by ``rotation`` (x, y, z, w), then translate by ``translation``.

    Immutable: the arrays are private read-only copies, so a Transform can be shared between
    threads (the TF buffer hands them to the worker thread).
    """

    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))
    rotation: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 0.0, 1.0]))

    def __post_init__(self) -> None:
        t = _vec3(self.translation, "translation").copy()
        q = _canonical(quat_normalize(np.asarray(self.rotation, dtype=np.float64).reshape(-1))).copy()
        t.setflags(write=False)
        q.setflags(write=False)
        object.__setattr__(self, "translation", t)
        object.__setattr__(self, "rotation", q)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def identity(cls) -> Transform:
        return cls()

    @classmethod
    def from_matrix(cls, m: np.ndarray) -> Transform:
        """From a 4x4 homogeneous matrix; rejects non-rigid matrices (scale, shear, projection)."""
        m = np.asarray(m, dtype=np.float64)
        if m.shape != (4, 4):
            raise ValueError(f"a homogeneous transform is 4x4, got shape {m.shape}")
        if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0], atol=1e-9):
            raise ValueError(f"last row of a rigid transform must be [0, 0, 0, 1], got {m[3].tolist()}")
        return cls(translation=m[:3, 3], rotation=quat_from_matrix(m[:3, :3]))

    @classmethod
    def from_rotation_matrix(cls, r: np.ndarray, translation: np.ndarray | None = None) -> Transform:
        t = np.zeros(3) if translation is None else translation
        return cls(translation=t, rotation=quat_from_matrix(r))

    # ---- views --------------------------------------------------------------------------
    def rotation_matrix(self) -> np.ndarray:
        return quat_to_matrix(self.rotation)

    def as_matrix(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.rotation_matrix()
        m[:3, 3] = self.translation
        return m

    # ---- algebra ------------------------------------------------------------------------
    def compose(self, other: Transform) -> Transform:
        """``self @ other``: apply ``other`` first, then ``self``."""
        return Transform(
            translation=self.translation + quat_rotate(self.rotation, other.translation),
            rotation=quat_multiply(self.rotation, other.rotation),
        )

    def __matmul__(self, other: Transform) -> Transform:
        if not isinstance(other, Transform):
            return NotImplemented
        return self.compose(other)

    def inverse(self) -> Transform:
        q_inv = quat_conjugate(self.rotation)
        return Transform(translation=-quat_rotate(q_inv, self.translation), rotation=q_inv)

    def almost_equal(self, other: Transform, atol: float = 1e-9) -> bool:
        """Same transform up to ``atol`` (quaternion sign ignored)."""
        same_t = np.allclose(self.translation, other.translation, atol=atol)
        dq = min(np.abs(self.rotation - other.rotation).max(), np.abs(self.rotation + other.rotation).max())
        return bool(same_t and dq <= atol)

    # ---- application --------------------------------------------------------------------
    def apply(self, points: np.ndarray) -> np.ndarray:
        """Transforms ``Nx3`` (or ``3``) points; float32 input stays float32 (computed in float64).

        Computing in float64 matters when the target frame is far from the camera (a map frame
        hundreds of metres away): float32 would lose millimetres in the product.
        """
        p = np.asarray(points)
        out_dtype = np.float32 if p.dtype == np.float32 else np.float64
        if p.shape[-1] != 3:
            raise ValueError(f"points must be ...x3, got shape {p.shape}")
        r = self.rotation_matrix()
        res = p.astype(np.float64, copy=False) @ r.T + self.translation
        return res.astype(out_dtype, copy=False)

    def apply_pose(self, position: np.ndarray, quaternion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Transforms a pose (position, orientation xyzw) given in the source frame."""
        pose = self @ Transform(translation=position, rotation=quaternion)
        return np.array(pose.translation), np.array(pose.rotation)

    def __repr__(self) -> str:
        t = ", ".join(f"{v:.6g}" for v in self.translation)
        q = ", ".join(f"{v:.6g}" for v in self.rotation)
        return f"Transform(translation=[{t}], rotation=[{q}])"


def interpolate(a: Transform, b: Transform, t: float) -> Transform:
    """Transform at fraction ``t`` between ``a`` (t=0) and ``b`` (t=1): lerp + slerp.

    ``t`` outside [0, 1] extrapolates; callers (the TF buffer) decide whether that is allowed.
    """
    trans = a.translation + float(t) * (b.translation - a.translation)
    return Transform(translation=trans, rotation=quat_slerp(a.rotation, b.rotation, float(t)))

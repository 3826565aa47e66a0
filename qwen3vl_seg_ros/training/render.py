"""Analytic ray casting of synthetic tabletop scenes: primitives, camera rays, z-buffer, shading.

Why ray casting rather than drawing 2-D shapes: every pixel's depth, instance id and surface
normal then come from the same exact intersection, so depth, masks and image agree to floating
point precision, which the training data and its tests rely on.

Frames: the *world* has the table top in the plane ``z = 0`` with ``z`` up. The camera's optical
frame is x right, y down, z forward. Pixel ``(u, v)`` (integer = pixel centre) is seen along the
camera-frame direction ``((u - cx) / fx, (v - cy) / fy, 1)``; because that direction's z is 1,
the ray parameter ``t`` of a hit *is* the hit's depth (z in the camera frame).

Every primitive answers ``intersect(origins, dirs) -> (t, normals)`` for many rays at once:
``origins`` is ``(3,)`` (one eye) or ``(M, 3)`` (shadow rays), ``dirs`` is ``(M, 3)`` and need not
be unit length; ``t`` is ``(M,)`` with ``inf`` for a miss and ``normals`` ``(M, 3)`` outward unit
normals in the world frame (undefined where ``t`` is ``inf``). Only hits at ``t > EPS`` count:
rays start outside every solid (the eye above the table, shadow rays nudged off a surface).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np

from qwen3vl_seg_ros.types import CameraIntrinsics

#: Smallest ray parameter that counts as a hit (metres of depth): keeps shadow rays off their own surface.
EPS = 1e-6


def _split(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The x, y, z components of ``(3,)`` or ``(M, 3)`` arrays (scalars or ``(M,)`` views)."""
    return a[..., 0], a[..., 1], a[..., 2]


def _nearest(*candidates: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per ray, the nearest of several ``(t, normals)`` candidates (a union of surfaces)."""
    ts = np.stack([c[0] for c in candidates])
    best = np.argmin(ts, axis=0)
    rows = np.arange(ts.shape[1])
    normals = np.stack([c[1] for c in candidates])[best, rows]
    return ts[best, rows], normals


def _disc_hit(
    ox: np.ndarray, oy: np.ndarray, oz: np.ndarray, d: np.ndarray, z: float, r2_min: float, r2_max: float,
    normal_z: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Hit of a horizontal disc or ring (``r2_min <= x² + y² <= r2_max`` at height ``z``), axis at the origin."""
    dx, dy, dz = _split(d)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (z - oz) / dz
    rho2 = (ox + t * dx) ** 2 + (oy + t * dy) ** 2
    ok = (t > EPS) & (rho2 >= r2_min) & (rho2 <= r2_max)
    normals = np.zeros(d.shape, dtype=np.float64)
    normals[:, 2] = normal_z
    return np.where(ok, t, np.inf), normals


def _side_hit(
    ox: np.ndarray, oy: np.ndarray, oz: np.ndarray, d: np.ndarray, radius: float, z0: float, z1: float,
    inside: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Hit of the side of a vertical cylinder (axis through the origin) between heights z0 and z1.

    ``inside=False`` gives the entry point seen from outside (outward normal); ``inside=True`` the
    far wall seen from within the cylinder, as the inside of a mug is (normal pointing inwards).
    """
    dx, dy, dz = _split(d)
    a = dx * dx + dy * dy
    b = ox * dx + oy * dy
    c = ox * ox + oy * oy - radius * radius
    disc = b * b - a * c
    root = np.sqrt(np.maximum(disc, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = ((-b + root) if inside else (-b - root)) / a
    z = oz + t * dz
    ok = (disc >= 0) & (a > 0) & (t > EPS) & (z >= z0) & (z <= z1)
    sign = -1.0 if inside else 1.0
    normals = np.zeros(d.shape, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        normals[:, 0] = sign * (ox + t * dx) / radius
        normals[:, 1] = sign * (oy + t * dy) / radius
    return np.where(ok, t, np.inf), normals


@dataclass(frozen=True)
class Sphere:
    """A ball of ``radius`` centred at ``centre`` (world metres)."""

    centre: tuple[float, float, float]
    radius: float

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        oc = origins - np.asarray(self.centre)
        a = np.einsum("ij,ij->i", dirs, dirs)
        b = (oc * dirs).sum(-1)
        c = (oc * oc).sum(-1) - self.radius**2
        disc = b * b - a * c
        t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
        ok = (disc >= 0) & (t > EPS)
        normals = (oc + t[:, None] * dirs) / self.radius
        return np.where(ok, t, np.inf), normals

    def aabb(self) -> tuple[np.ndarray, np.ndarray]:
        c = np.asarray(self.centre)
        return c - self.radius, c + self.radius


@dataclass(frozen=True)
class Box:
    """A box with half sizes ``half`` along its own axes, turned by ``yaw`` (radians) about world z."""

    centre: tuple[float, float, float]
    half: tuple[float, float, float]
    yaw: float = 0.0

    def _to_local(self, v: np.ndarray, translate: bool) -> np.ndarray:
        if translate:
            v = v - np.asarray(self.centre)
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        x, y, z = _split(v)
        return np.stack(np.broadcast_arrays(c * x + s * y, -s * x + c * y, z), axis=-1)

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Slab method: the ray is inside the box between the largest entry and smallest exit
        # parameter over the three pairs of parallel faces.
        o = self._to_local(origins, translate=True)
        d = self._to_local(dirs, translate=False)
        h = np.asarray(self.half)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / d
            t1 = (-h - o) * inv
            t2 = (h - o) * inv
        near = np.minimum(t1, t2)
        axis = np.argmax(near, axis=1)
        rows = np.arange(len(d))
        t_near = near[rows, axis]
        t_far = np.maximum(t1, t2).min(axis=1)
        ok = (t_near <= t_far) & (t_near > EPS)
        local = np.zeros(d.shape, dtype=np.float64)
        local[rows, axis] = -np.sign(d[rows, axis])
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        normals = np.stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1], local[:, 2]], 1)
        return np.where(ok, t_near, np.inf), normals

    def corners(self) -> np.ndarray:
        """The 8 corners in the world frame, ``(8, 3)``."""
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
        local = signs * np.asarray(self.half)
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        return local @ rot.T + np.asarray(self.centre)

    def aabb(self) -> tuple[np.ndarray, np.ndarray]:
        pts = self.corners()
        return pts.min(0), pts.max(0)


@dataclass(frozen=True)
class Cylinder:
    """A closed vertical cylinder (a can) standing with its base centre at ``base``."""

    base: tuple[float, float, float]
    radius: float
    height: float

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ox, oy, oz = _split(origins - np.asarray(self.base))
        r2 = self.radius**2
        return _nearest(
            _side_hit(ox, oy, oz, dirs, self.radius, 0.0, self.height, inside=False),
            _disc_hit(ox, oy, oz, dirs, self.height, 0.0, r2, 1.0),
            _disc_hit(ox, oy, oz, dirs, 0.0, 0.0, r2, -1.0),
        )

    def aabb(self) -> tuple[np.ndarray, np.ndarray]:
        b = np.asarray(self.base)
        extent = np.array([self.radius, self.radius, self.height])
        return b - extent * [1, 1, 0], b + extent


@dataclass(frozen=True)
class Mug:
    """An open cup: a cylinder with a cylindrical cavity from the rim down to a floor, and a handle.

    The handle is a bracket of three thin boxes on the side the mug's ``yaw`` points to (local +x),
    which reads as a handle at tabletop image sizes and keeps the intersection analytic.
    """

    base: tuple[float, float, float]
    radius: float
    height: float
    yaw: float = 0.0
    wall: float = 0.12  # wall thickness as a fraction of the radius
    floor: float = 0.12  # height of the cavity's floor as a fraction of the height
    handle_boxes: tuple[Box, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        r, h = self.radius, self.height
        reach = 0.55 * r  # how far the handle stands off the wall
        thick = 0.09 * h + 0.06 * r
        depth = 0.22 * r  # width of the handle seen from its side
        parts = [  # (local centre x, z, half sizes x, z)
            (r + reach / 2 - 0.02 * r, 0.78 * h, reach / 2 + 0.04 * r, thick / 2),  # upper arm
            (r + reach / 2 - 0.02 * r, 0.28 * h, reach / 2 + 0.04 * r, thick / 2),  # lower arm
            (r + reach - thick / 2, 0.53 * h, thick / 2, 0.25 * h + thick / 2),  # grip
        ]
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        bx, by, bz = self.base
        boxes = tuple(
            Box((bx + c * x, by + s * x, bz + z), (hx, depth / 2, hz), self.yaw) for x, z, hx, hz in parts
        )
        object.__setattr__(self, "handle_boxes", boxes)

    @property
    def inner_radius(self) -> float:
        return self.radius * (1.0 - self.wall)

    @property
    def floor_height(self) -> float:
        return self.height * self.floor

    @property
    def reach(self) -> float:
        """Distance from the axis to the farthest point of the handle: the radius of the footprint."""
        corners = np.concatenate([b.corners() for b in self.handle_boxes])[:, :2] - np.asarray(self.base[:2])
        return float(np.hypot(corners[:, 0], corners[:, 1]).max())

    def intersect(self, origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # The solid is (ri < rho < r, 0 < z < h) plus the floor slab (rho < ri, 0 < z < f); the
        # nearest of its boundary surfaces is the first one a ray from outside meets.
        ox, oy, oz = _split(origins - np.asarray(self.base))
        r, ri, h, f = self.radius, self.inner_radius, self.height, self.floor_height
        return _nearest(
            _side_hit(ox, oy, oz, dirs, r, 0.0, h, inside=False),
            _disc_hit(ox, oy, oz, dirs, h, ri * ri, r * r, 1.0),  # rim
            _side_hit(ox, oy, oz, dirs, ri, f, h, inside=True),  # cavity wall
            _disc_hit(ox, oy, oz, dirs, f, 0.0, ri * ri, 1.0),  # cavity floor
            _disc_hit(ox, oy, oz, dirs, 0.0, 0.0, r * r, -1.0),  # bottom
            *(b.intersect(origins, dirs) for b in self.handle_boxes),
        )

    def aabb(self) -> tuple[np.ndarray, np.ndarray]:
        pts = np.stack([*Cylinder(self.base, self.radius, self.height).aabb(), *(
            corner for box in self.handle_boxes for corner in box.aabb()
        )])
        return pts.min(0), pts.max(0)


Primitive = Sphere | Box | Cylinder | Mug


# ---------------------------------------------------------------------------------------------
# Camera


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera->world 4x4 pose of an optical frame at ``eye`` looking at ``target``, no roll.

    The camera's x axis stays horizontal (world z up), so "left" in the image is a horizontal
    direction on the table.
    """
    forward = np.asarray(target, dtype=np.float64) - np.asarray(eye, dtype=np.float64)
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1)
    pose[:3, 3] = eye
    return pose


@lru_cache(maxsize=8)
def camera_rays(intrinsics: CameraIntrinsics) -> np.ndarray:
    """Camera-frame ray directions through every pixel centre, ``(H, W, 3)`` with z = 1 (read-only)."""
    u = (np.arange(intrinsics.width, dtype=np.float64) - intrinsics.cx) / intrinsics.fx
    v = (np.arange(intrinsics.height, dtype=np.float64) - intrinsics.cy) / intrinsics.fy
    rays = np.empty((intrinsics.height, intrinsics.width, 3))
    rays[..., 0] = u[None, :]
    rays[..., 1] = v[:, None]
    rays[..., 2] = 1.0
    rays.flags.writeable = False
    return rays


def project(points_world: np.ndarray, intrinsics: CameraIntrinsics, cam_to_world: np.ndarray) -> np.ndarray:
    """Pixel coordinates ``(N, 2)`` and depth ``(N,)`` stacked as ``(N, 3)`` of world points."""
    rot, eye = cam_to_world[:3, :3], cam_to_world[:3, 3]
    pc = (np.asarray(points_world, dtype=np.float64) - eye) @ rot
    with np.errstate(divide="ignore", invalid="ignore"):
        u = intrinsics.fx * pc[:, 0] / pc[:, 2] + intrinsics.cx
        v = intrinsics.fy * pc[:, 1] / pc[:, 2] + intrinsics.cy
    return np.stack([u, v, pc[:, 2]], axis=1)


def _aabb_corners(prim: Primitive) -> np.ndarray:
    """The 8 corners ``(8, 3)`` of a primitive's axis-aligned bounding box."""
    lo, hi = prim.aabb()
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])


def _image_rect(points: np.ndarray, intrinsics: CameraIntrinsics, cam_to_world: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns of the image rectangle around the projections of world ``points``.

    It holds the projection of anything inside the points' convex hull as long as every point is
    in front of the camera; otherwise it is the whole image.
    """
    uvz = project(points, intrinsics, cam_to_world)
    w, h = intrinsics.width, intrinsics.height
    if np.any(uvz[:, 2] <= 1e-3):
        return slice(0, h), slice(0, w)
    u0, u1 = np.clip([np.floor(uvz[:, 0].min()), np.ceil(uvz[:, 0].max()) + 1], 0, w).astype(int)
    v0, v1 = np.clip([np.floor(uvz[:, 1].min()), np.ceil(uvz[:, 1].max()) + 1], 0, h).astype(int)
    return slice(v0, v1), slice(u0, u1)


def _pixel_window(prim: Primitive, intrinsics: CameraIntrinsics, cam_to_world: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns whose rays can hit ``prim``: the image rectangle of its bounding box."""
    return _image_rect(_aabb_corners(prim), intrinsics, cam_to_world)


@dataclass
class ObjectHits:
    """Where one object's surface is hit inside its pixel window, ignoring the other objects."""

    rows: slice
    cols: slice
    t: np.ndarray  # (h, w) depth of the hit, inf where the ray misses
    normals: np.ndarray  # (h, w, 3) world normals

    @property
    def footprint(self) -> int:
        """Pixels the object would cover were nothing in front of it (within the image)."""
        return int(np.isfinite(self.t).sum())


def world_rays(intrinsics: CameraIntrinsics, cam_to_world: np.ndarray) -> np.ndarray:
    """World-frame directions of the eye's rays, ``(H, W, 3)``, scaled so that ``t`` = depth."""
    return camera_rays(intrinsics) @ cam_to_world[:3, :3].T


def cast_object(
    prim: Primitive, rays: np.ndarray, intrinsics: CameraIntrinsics, cam_to_world: np.ndarray
) -> ObjectHits:
    """Casts the eye's rays (``world_rays``) through the pixel window of one primitive."""
    rows, cols = _pixel_window(prim, intrinsics, cam_to_world)
    window = rays[rows, cols]
    shape = window.shape[:2]
    if window.size == 0:
        return ObjectHits(rows, cols, np.full(shape, np.inf), np.zeros((*shape, 3)))
    t, normals = prim.intersect(cam_to_world[:3, 3], window.reshape(-1, 3))
    return ObjectHits(rows, cols, t.reshape(shape), normals.reshape(*shape, 3))


@dataclass
class GeometryBuffers:
    """Per pixel: depth (``t``, inf where nothing is hit), instance id, normal and surface kind."""

    t: np.ndarray  # (H, W) float64
    ids: np.ndarray  # (H, W) uint8, 0 = no object
    normals: np.ndarray  # (H, W, 3) float64
    surface: np.ndarray  # (H, W) int8, one of SURFACE_*


SURFACE_NONE, SURFACE_FLOOR, SURFACE_TABLE, SURFACE_OBJECT = 0, 1, 2, 3


def cast_background(table: Box, floor_z: float, rays: np.ndarray, eye: np.ndarray) -> GeometryBuffers:
    """The table (an axis-aligned box whose top is ``z = 0``) in front of an endless floor at ``floor_z``.

    Most rays land on the table top, which a ray-plane test settles; only the others run the
    full box test (for the table's edges) and the floor plane.
    """
    h, w = rays.shape[:2]
    dirs = rays.reshape(-1, 3)
    dz = dirs[:, 2]
    t = np.full(len(dirs), np.inf)
    normals = np.zeros((len(dirs), 3))
    normals[:, 2] = 1.0
    surface = np.full(len(dirs), SURFACE_NONE, dtype=np.int8)
    down = dz < 0
    with np.errstate(divide="ignore", invalid="ignore"):
        t_top = np.where(down, -eye[2] / dz, np.inf)
    top_x = eye[0] + t_top * dirs[:, 0] - table.centre[0]
    top_y = eye[1] + t_top * dirs[:, 1] - table.centre[1]
    top = down & (np.abs(top_x) <= table.half[0]) & (np.abs(top_y) <= table.half[1])
    t[top] = t_top[top]
    surface[top] = SURFACE_TABLE
    rest = np.flatnonzero(~top)
    t_edge, n_edge = table.intersect(eye, dirs[rest])
    with np.errstate(divide="ignore", invalid="ignore"):
        t_floor = np.where(dz[rest] < 0, (floor_z - eye[2]) / dz[rest], np.inf)
    edge = t_edge < t_floor
    t[rest] = np.where(edge, t_edge, t_floor)
    normals[rest[edge]] = n_edge[edge]
    surface[rest] = np.where(edge, SURFACE_TABLE, np.where(np.isfinite(t_floor), SURFACE_FLOOR, SURFACE_NONE))
    return GeometryBuffers(t.reshape(h, w), np.zeros((h, w), np.uint8), normals.reshape(h, w, 3), surface.reshape(h, w))


def composite(background: GeometryBuffers, objects: list[ObjectHits], ids: list[int]) -> GeometryBuffers:
    """Z-buffers objects over the background: the nearest hit wins each pixel."""
    out = GeometryBuffers(
        background.t.copy(), background.ids.copy(), background.normals.copy(), background.surface.copy()
    )
    for hits, obj_id in zip(objects, ids):
        win_t = out.t[hits.rows, hits.cols]
        front = hits.t < win_t
        win_t[front] = hits.t[front]
        out.ids[hits.rows, hits.cols][front] = obj_id
        out.normals[hits.rows, hits.cols][front] = hits.normals[front]
        out.surface[hits.rows, hits.cols][front] = SURFACE_OBJECT
    return out


# ---------------------------------------------------------------------------------------------
# Shading


@dataclass(frozen=True)
class Light:
    """A directional light (unit ``direction`` pointing *towards* the light) plus ambient light."""

    direction: tuple[float, float, float]
    intensity: float
    ambient: float
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)


def _shadow_window(
    prim: Primitive, ldir: np.ndarray, intrinsics: CameraIntrinsics, cam_to_world: np.ndarray
) -> tuple[slice, slice]:
    """Pixels where ``prim`` can shade something standing on the table (z >= 0).

    The shadow volume down to the table lies inside the hull of the bounding box's corners and
    of their shadows on the plane z = 0; its image rectangle bounds the candidates.
    """
    corners = _aabb_corners(prim)
    ground = corners - (np.maximum(corners[:, 2], 0.0) / ldir[2])[:, None] * ldir
    return _image_rect(np.concatenate([corners, ground]), intrinsics, cam_to_world)


def shadow_mask(
    buffers: GeometryBuffers, rays: np.ndarray, eye: np.ndarray, light: Light, casters: list[Primitive],
    intrinsics: CameraIntrinsics, cam_to_world: np.ndarray,
) -> np.ndarray:
    """``(H, W)`` bool: pixels whose surface point cannot see the light because a caster is in the way.

    Only surface points on or above the table top (z >= 0) that face the light are tested: the
    casters stand on the table, the light comes from above, and shading already darkens the
    rest. Per caster, only pixels in its shadow window whose ray towards the light passes its
    bounding sphere run the exact intersection; surface points are computed inside the windows.
    """
    ldir = np.asarray(light.direction, dtype=np.float64)
    shadowed = np.zeros(buffers.t.shape, dtype=bool)
    if ldir[2] <= 0:
        return shadowed
    for prim in casters:
        rows, cols = _shadow_window(prim, ldir, intrinsics, cam_to_world)
        t = buffers.t[rows, cols]
        hit = np.isfinite(t)
        points = eye + np.where(hit, t, 0.0)[..., None] * rays[rows, cols]
        origins = points + 1e-5 * buffers.normals[rows, cols]
        lo, hi = prim.aabb()
        centre, radius = (lo + hi) / 2, np.linalg.norm(hi - lo) / 2
        w = centre - origins
        along = w @ ldir
        facing = buffers.normals[rows, cols] @ ldir > 0  # surfaces facing away are dark anyway
        near = hit & facing & (points[..., 2] >= -1e-6) & (along > -radius) & ((w * w).sum(-1) - along**2 < radius**2)
        if not near.any():
            continue
        t_shadow, _ = prim.intersect(origins[near], np.broadcast_to(ldir, (int(near.sum()), 3)))
        window = shadowed[rows, cols]
        window[near] |= np.isfinite(t_shadow)
    return shadowed


def plane_texture(
    texture: Callable[[np.random.Generator, np.ndarray, np.ndarray], np.ndarray], rng: np.random.Generator,
    z: float, intrinsics: CameraIntrinsics, cam_to_world: np.ndarray, factor: int = 2,
) -> np.ndarray:
    """``(H, W, 3)`` albedo of a textured horizontal plane at height ``z``, as the camera sees it.

    The texture is evaluated at the plane points of a ``factor``-times smaller image and resized:
    four times fewer evaluations at ``factor`` 2, and the resize anti-aliases fine patterns.
    Pixels whose ray never meets the plane get the texture at the plane's origin.
    """
    small = intrinsics.scaled_to(max(1, intrinsics.width // factor), max(1, intrinsics.height // factor))
    rot, eye = cam_to_world[:3, :3], cam_to_world[:3, 3]
    xn = ((np.arange(small.width) - small.cx) / small.fx)[None, :]
    yn = ((np.arange(small.height) - small.cy) / small.fy)[:, None]
    dx, dy, dz = (rot[i, 0] * xn + rot[i, 1] * yn + rot[i, 2] for i in range(3))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(dz < 0, (z - eye[2]) / dz, np.nan)
    x = np.nan_to_num(eye[0] + t * dx).astype(np.float32)
    y = np.nan_to_num(eye[1] + t * dy).astype(np.float32)
    albedo = texture(rng, x.ravel(), y.ravel()).reshape(small.height, small.width, 3).astype(np.float32)
    return cv2.resize(albedo, (intrinsics.width, intrinsics.height), interpolation=cv2.INTER_LINEAR)


def shade(albedo: np.ndarray, normals: np.ndarray, lit: np.ndarray, light: Light) -> np.ndarray:
    """Lambertian + ambient shading per pixel (``(M, 3)`` arrays; ``lit`` 0 in shadow, 1 in light)."""
    ldir = np.asarray(light.direction, dtype=np.float32)
    lambert = np.clip(normals @ ldir, 0.0, None) * lit
    return albedo * (light.ambient + light.intensity * lambert)[:, None]


def highlight(
    normals: np.ndarray, view_dirs: np.ndarray, lit: np.ndarray, light: Light, weight: np.ndarray
) -> np.ndarray:
    """Blinn-Phong specular term ``(M,)`` of glossy surfaces; ``view_dirs`` point from surface to eye."""
    half = view_dirs + np.asarray(light.direction, dtype=np.float32)
    half /= np.sqrt((half * half).sum(-1, keepdims=True))
    return weight * np.clip((normals * half).sum(-1), 0.0, None) ** 40 * lit * light.intensity


# ---------------------------------------------------------------------------------------------
# Procedural textures, evaluated at world coordinates so they are in perspective on the table


def value_noise(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, cells: int = 64) -> np.ndarray:
    """Smooth noise in [0, 1] at float coordinates (one unit = one cell), tiling every ``cells``.

    Bilinear interpolation of a blurred random grid, with flat gathers: cheap and vectorised over
    any number of points. ``cells`` must be a power of two (the wrap is a bit mask).
    """
    grid = np.pad(rng.random((cells, cells), dtype=np.float32), 3, mode="wrap")
    grid = cv2.GaussianBlur(grid, (0, 0), 0.8)[3:-3, 3:-3]
    flat = ((grid - grid.min()) / max(float(grid.max() - grid.min()), 1e-6)).ravel()
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32)
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    wrap = cells - 1
    i0, j0 = x0.astype(np.int32) & wrap, y0.astype(np.int32) & wrap
    i1, r1 = (i0 + 1) & wrap, ((j0 + 1) & wrap) * cells
    r0 = j0 * cells
    top = flat.take(r0 + i0) * (1 - fx) + flat.take(r0 + i1) * fx
    bottom = flat.take(r1 + i0) * (1 - fx) + flat.take(r1 + i1) * fx
    return top * (1 - fy) + bottom * fy


def _mix(c0: np.ndarray, c1: np.ndarray, w: np.ndarray) -> np.ndarray:
    w = np.clip(w, 0.0, 1.0)[..., None]
    return c0 * (1.0 - w) + c1 * w


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    pixel = np.array([[[h * 179.0, s * 255.0, v * 255.0]]], dtype=np.float32)
    return cv2.cvtColor(pixel.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255.0


def wood_texture(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Planks with wavy grain in light-oak to walnut browns."""
    angle = rng.uniform(0, np.pi)
    a = x * np.cos(angle) + y * np.sin(angle)
    b = -x * np.sin(angle) + y * np.cos(angle)
    light = _hsv(rng.uniform(0.05, 0.10), rng.uniform(0.35, 0.6), rng.uniform(0.55, 0.85))
    dark = light * rng.uniform(0.45, 0.7)
    warp = value_noise(rng, a * 4.0, b * 12.0)
    grain = 0.5 + 0.5 * np.sin(2 * np.pi * (b * rng.uniform(25, 45) + 3.0 * warp))
    streaks = value_noise(rng, a * 3.0, b * 80.0)
    colour = _mix(dark, light, 0.55 * grain + 0.45 * streaks)
    plank = rng.uniform(0.1, 0.2)
    seam = np.mod(b, plank) < 0.004
    colour[seam] *= 0.55
    return colour


def cloth_texture(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A muted gingham or striped table cloth."""
    hue = rng.uniform(0, 1)
    c0 = _hsv(hue, rng.uniform(0.05, 0.3), rng.uniform(0.55, 0.9))
    c1 = _hsv(hue, rng.uniform(0.1, 0.35), rng.uniform(0.25, 0.5))
    period = rng.uniform(0.03, 0.08)
    sx = (np.mod(x, period) < period / 2).astype(np.float32)
    sy = (np.mod(y, period) < period / 2).astype(np.float32) if rng.random() < 0.6 else np.zeros_like(x)
    fibre = value_noise(rng, x * 300.0, y * 300.0)
    return _mix(c0, c1, 0.5 * (sx + sy)) * (0.93 + 0.14 * fibre)[..., None]


def stone_texture(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Neutral fractal noise, like a laminate or stone top."""
    c0 = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.15), rng.uniform(0.25, 0.45))
    c1 = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.15), rng.uniform(0.6, 0.9))
    n = value_noise(rng, x * 8.0, y * 8.0) + 0.5 * value_noise(rng, x * 40.0, y * 40.0)
    return _mix(c0, c1, n / 1.5)


TABLE_TEXTURES = {"wood": wood_texture, "cloth": cloth_texture, "stone": stone_texture}


def floor_texture(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Square tiles or a plain rough floor, darker than most table tops."""
    base = _hsv(rng.uniform(0, 1), rng.uniform(0.0, 0.25), rng.uniform(0.2, 0.45))
    colour = base * (0.85 + 0.3 * value_noise(rng, x * 8.0, y * 8.0))[..., None]
    if rng.random() < 0.5:
        tile = rng.uniform(0.3, 0.6)
        grout = (np.mod(x, tile) < 0.01) | (np.mod(y, tile) < 0.01)
        colour[grout] *= 0.6
    return colour

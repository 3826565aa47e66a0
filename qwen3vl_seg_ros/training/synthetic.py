"""Synthetic tabletop RGB-D scenes with exact depth, instance masks and referring expressions.

No real weights or data can be downloaded for this package, so the small model trains on scenes
made here: coloured primitives (cubes, balls, cans, mugs) standing on a textured table, seen by a
known pinhole camera from a known pose, rendered by analytic ray casting (:mod:`.render`), with
referring expressions whose target sets are computed from the scene (:mod:`.expressions`).

``generate_sample(seed, cfg)`` is deterministic in its seed; :func:`split_seed` maps (split,
index) to disjoint seed ranges so that validation and test layouts never occur in training.

World frame: the table top is the plane ``z = 0``, z up. ``Scene.cam_to_world`` is the 4x4
**camera->world** pose of the camera's optical frame (x right, y down, z forward);
``Scene.world_to_cam`` is its inverse.

Command line (writes the COCO-style format of :mod:`.coco`)::

    python -m qwen3vl_seg_ros.training.synthetic --out DIR --num N --seed S \
        [--width W --height H] [--queries-per-scene K] [--split train]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qwen3vl_seg_ros.masks import mask_box
from qwen3vl_seg_ros.training import render
from qwen3vl_seg_ros.training.coco import CocoRefWriter
from qwen3vl_seg_ros.training.expressions import (
    COLOURS,
    EXTRA_REFERRING_FORMS,
    QUERY_TYPES,
    REFERRING_FORMS,
    SHAPES,
    SIZES,
    Query,
    check_weights,
    make_queries,
)
from qwen3vl_seg_ros.types import CameraIntrinsics

#: Linear RGB albedo of each colour name. Grey and brown are left out on purpose: under the
#: lighting range used here grey falls between a shadowed white and a lit black, and brown is a
#: dark orange in the colours of the wooden tables.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.80, 0.08, 0.08),
    "green": (0.12, 0.62, 0.18),
    "blue": (0.10, 0.22, 0.85),
    "yellow": (0.92, 0.84, 0.10),
    "orange": (0.97, 0.48, 0.05),
    "purple": (0.48, 0.15, 0.68),
    "white": (0.92, 0.92, 0.90),
    "black": (0.06, 0.06, 0.07),
    "pink": (0.96, 0.52, 0.72),
    "cyan": (0.08, 0.78, 0.85),
}
assert tuple(PALETTE) == COLOURS

#: Size ranges in metres per shape and size class: cube edge, ball radius, (radius, height) of
#: cans and mugs. The classes do not overlap, so "small" names a physical size, not a ranking.
SIZE_RANGES: dict[str, dict[str, tuple[tuple[float, float], ...]]] = {
    "cube": {"small": ((0.032, 0.042),), "medium": ((0.052, 0.066),), "large": ((0.080, 0.100),)},
    "ball": {"small": ((0.018, 0.024),), "medium": ((0.030, 0.037),), "large": ((0.045, 0.055),)},
    "can": {
        "small": ((0.018, 0.023), (0.05, 0.07)),
        "medium": ((0.028, 0.034), (0.09, 0.115)),
        "large": ((0.040, 0.048), (0.135, 0.17)),
    },
    "mug": {
        "small": ((0.024, 0.029), (0.05, 0.065)),
        "medium": ((0.034, 0.040), (0.075, 0.09)),
        "large": ((0.046, 0.053), (0.095, 0.115)),
    },
}

#: First seed of each split; a split holds the next ``SPLIT_STRIDE`` seeds.
SPLIT_OFFSETS = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000}
SPLIT_STRIDE = 1_000_000_000


def split_seed(split: str, index: int) -> int:
    """The seed of the ``index``-th scene of a split; the splits' seed ranges never overlap."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_OFFSETS)}")
    if not 0 <= index < SPLIT_STRIDE:
        raise ValueError(f"scene index {index} is outside [0, {SPLIT_STRIDE})")
    return SPLIT_OFFSETS[split] + index


@dataclass(frozen=True)
class SceneConfig:
    """What varies between scenes, and within which ranges."""

    width: int = 320
    height: int = 240
    hfov_deg: tuple[float, float] = (55.0, 65.0)  # horizontal field of view
    intrinsics: CameraIntrinsics | None = None  # fixed intrinsics instead of a random field of view
    camera_height: tuple[float, float] = (0.40, 0.75)  # metres above the table top
    camera_elevation_deg: tuple[float, float] = (40.0, 75.0)  # optical axis below the horizon
    min_objects: int = 1
    max_objects: int = 6
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    repeat_colour_prob: float = 0.35  # chance an object reuses a colour already in the scene
    min_visible_pixels: int | None = None  # None: 0.1 % of the image
    min_visible_fraction: float = 0.25  # visible share of the object's unoccluded image area
    min_gap: float = 0.005  # metres between the footprints of neighbouring objects
    ambient: tuple[float, float] = (0.30, 0.45)
    light_intensity: tuple[float, float] = (0.55, 0.85)
    light_elevation_deg: tuple[float, float] = (35.0, 80.0)
    noise_std: tuple[float, float] = (0.5, 3.0)  # image noise, in 8-bit grey levels
    shadows: bool = True
    queries_per_scene: int = 8
    type_weights: dict[str, float] | None = None  # query types; None: DEFAULT_TYPE_WEIGHTS
    form_weights: dict[str, float] | None = None  # forms of "referring" commands; None: uniform

    def __post_init__(self) -> None:
        if not 1 <= self.min_objects <= self.max_objects <= 255:
            raise ValueError("need 1 <= min_objects <= max_objects <= 255")
        check_weights(self.type_weights, QUERY_TYPES, "query types")
        check_weights(self.form_weights, REFERRING_FORMS + EXTRA_REFERRING_FORMS, "referring forms")
        for name in self.shapes:
            if name not in SHAPES:
                raise ValueError(f"unknown shape {name!r}; expected some of {SHAPES}")
        for name in self.colours:
            if name not in COLOURS:
                raise ValueError(f"unknown colour {name!r}; expected some of {COLOURS}")

    @property
    def visible_pixel_floor(self) -> int:
        if self.min_visible_pixels is not None:
            return self.min_visible_pixels
        return max(1, round(0.001 * self.width * self.height))


@dataclass(frozen=True)
class Table:
    """The table: a box ``2*half`` wide whose top is the plane z = 0, above a floor at ``floor_z``."""

    centre: tuple[float, float]
    half: tuple[float, float]
    thickness: float
    floor_z: float
    texture: str

    @property
    def box(self) -> render.Box:
        return render.Box(
            (self.centre[0], self.centre[1], -self.thickness / 2), (self.half[0], self.half[1], self.thickness / 2)
        )


@dataclass
class SceneObject:
    """One object of a scene, with everything the expressions and the annotations need."""

    id: int  # value in Scene.instance_ids (1..N)
    shape: str  # canonical shape, one of SHAPES
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    position: np.ndarray  # (3,) world metres: centre of the base, on the table (z = 0)
    yaw: float  # radians about world z (the handle of a mug points along yaw)
    primitive: render.Primitive  # exact geometry, world frame
    footprint_radius: float  # radius of a circle on the table containing the object
    box: np.ndarray  # (4,) float32 [x1, y1, x2, y2] of the visible mask, exclusive right/bottom
    mask: np.ndarray  # (H, W) bool, visible pixels
    visible_pixels: int
    visible_fraction: float  # visible pixels / pixels it would cover in the image unoccluded


@dataclass
class Scene:
    """One rendered RGB-D frame and its ground truth."""

    rgb: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32 metres (camera z), NaN where no surface is hit
    instance_ids: np.ndarray  # (H, W) uint8, 0 = table/floor, k = objects[k - 1]
    objects: list[SceneObject]
    intrinsics: CameraIntrinsics
    cam_to_world: np.ndarray  # (4, 4) camera optical frame -> world
    table: Table
    light: render.Light

    @property
    def world_to_cam(self) -> np.ndarray:
        return np.linalg.inv(self.cam_to_world)

    def masks(self) -> np.ndarray:
        """Instance masks, ``(N, H, W)`` bool, in the order of ``objects``."""
        if not self.objects:
            return np.zeros((0, *self.instance_ids.shape), dtype=bool)
        return np.stack([o.mask for o in self.objects])

    def boxes(self) -> np.ndarray:
        """Boxes, ``(N, 4)`` float32 ``[x1, y1, x2, y2]``, in the order of ``objects``."""
        return np.array([o.box for o in self.objects], dtype=np.float32).reshape(-1, 4)

    def object(self, obj_id: int) -> SceneObject:
        return self.objects[obj_id - 1]


# ---------------------------------------------------------------------------------------------
# Sampling


def _sample_intrinsics(rng: np.random.Generator, cfg: SceneConfig) -> CameraIntrinsics:
    if cfg.intrinsics is not None:
        return cfg.intrinsics
    hfov = np.deg2rad(rng.uniform(*cfg.hfov_deg))
    f = cfg.width / 2 / np.tan(hfov / 2)
    return CameraIntrinsics(
        fx=float(f), fy=float(f), cx=(cfg.width - 1) / 2, cy=(cfg.height - 1) / 2, width=cfg.width, height=cfg.height
    )


def _sample_pose(rng: np.random.Generator, cfg: SceneConfig) -> np.ndarray:
    """A camera at a random height, elevation and azimuth, looking at a point near the world origin."""
    height = rng.uniform(*cfg.camera_height)
    elevation = np.deg2rad(rng.uniform(*cfg.camera_elevation_deg))
    azimuth = rng.uniform(-np.pi, np.pi)
    target = np.array([*rng.uniform(-0.03, 0.03, 2), 0.0])
    back = height / np.tan(elevation)
    eye = target + np.array([-back * np.cos(azimuth), -back * np.sin(azimuth), height])
    return render.look_at(eye, target)


def _sample_table(rng: np.random.Generator) -> Table:
    return Table(
        centre=(float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.1, 0.1))),
        half=(float(rng.uniform(0.45, 0.9)), float(rng.uniform(0.35, 0.7))),
        thickness=float(rng.uniform(0.02, 0.05)),
        floor_z=-float(rng.uniform(0.7, 0.78)),
        texture=str(rng.choice(list(render.TABLE_TEXTURES))),
    )


def _sample_light(rng: np.random.Generator, cfg: SceneConfig) -> render.Light:
    elevation = np.deg2rad(rng.uniform(*cfg.light_elevation_deg))
    azimuth = rng.uniform(-np.pi, np.pi)
    direction = (np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), np.sin(elevation))
    tint = 1.0 + rng.uniform(-0.04, 0.04, 3)
    return render.Light(
        direction=tuple(float(v) for v in direction),
        intensity=float(rng.uniform(*cfg.light_intensity)),
        ambient=float(rng.uniform(*cfg.ambient)),
        tint=tuple(float(v) for v in tint),
    )


def _make_primitive(
    shape: str, size: str, position: np.ndarray, yaw: float, rng: np.random.Generator
) -> tuple[render.Primitive, float]:
    """The geometry of one object and the radius of its footprint on the table."""
    ranges = SIZE_RANGES[shape][size]
    x, y = float(position[0]), float(position[1])
    if shape == "cube":
        edge = rng.uniform(*ranges[0])
        half = edge / 2 * rng.uniform(0.9, 1.1, 3)
        return render.Box((x, y, float(half[2])), tuple(float(h) for h in half), yaw), float(np.hypot(*half[:2]))
    if shape == "ball":
        r = float(rng.uniform(*ranges[0]))
        return render.Sphere((x, y, r), r), r
    r, h = float(rng.uniform(*ranges[0])), float(rng.uniform(*ranges[1]))
    if shape == "can":
        return render.Cylinder((x, y, 0.0), r, h), r
    mug = render.Mug((x, y, 0.0), r, h, yaw)
    return mug, mug.reach


def _table_point(
    rng: np.random.Generator, intrinsics: CameraIntrinsics, cam_to_world: np.ndarray
) -> np.ndarray | None:
    """A point of the table plane seen near a random pixel of the image's inner part."""
    u = rng.uniform(0.1, 0.9) * intrinsics.width
    v = rng.uniform(0.15, 0.92) * intrinsics.height
    ray = cam_to_world[:3, :3] @ np.array([(u - intrinsics.cx) / intrinsics.fx, (v - intrinsics.cy) / intrinsics.fy, 1])
    eye = cam_to_world[:3, 3]
    if ray[2] >= 0:
        return None
    return eye - eye[2] / ray[2] * ray


@dataclass
class _Placed:
    shape: str
    colour: str
    size: str
    position: np.ndarray
    yaw: float
    primitive: render.Primitive
    radius: float


def _sample_objects(
    rng: np.random.Generator, cfg: SceneConfig, intrinsics: CameraIntrinsics, cam_to_world: np.ndarray, table: Table
) -> list[_Placed]:
    """Objects at random visible places on the table, their footprint circles apart by ``min_gap``.

    Circles around whole footprints (handles included) make interpenetration impossible, since
    everything stands on the same plane.
    """
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    placed: list[_Placed] = []
    for _ in range(count * 30):
        if len(placed) == count:
            break
        shape = str(rng.choice(cfg.shapes))
        used = [p.colour for p in placed]
        if used and rng.random() < cfg.repeat_colour_prob:
            colour = str(rng.choice(used))
        else:
            colour = str(rng.choice(cfg.colours))
        size = str(rng.choice(SIZES))
        point = _table_point(rng, intrinsics, cam_to_world)
        if point is None:
            continue
        yaw = float(rng.uniform(-np.pi, np.pi))
        prim, radius = _make_primitive(shape, size, point, yaw, rng)
        local = point[:2] - np.asarray(table.centre)
        if np.any(np.abs(local) + radius > np.asarray(table.half)):
            continue
        if any(np.hypot(*(point[:2] - p.position[:2])) < radius + p.radius + cfg.min_gap for p in placed):
            continue
        placed.append(_Placed(shape, colour, size, point, yaw, prim, radius))
    return placed


def _visible_objects(
    placed: list[_Placed], hits: list[render.ObjectHits], background: render.GeometryBuffers, cfg: SceneConfig
) -> tuple[list[int], render.GeometryBuffers]:
    """Drops objects that show too little, one at a time, until every one left is visible enough.

    Dropping the worst first matters: removing an occluder can make the object behind it pass.
    """
    keep = list(range(len(placed)))
    while True:
        buffers = render.composite(background, [hits[i] for i in keep], [k + 1 for k in range(len(keep))])
        counts = np.bincount(buffers.ids.ravel(), minlength=len(keep) + 1)[1:]
        share = counts / np.maximum([hits[i].footprint for i in keep], 1)
        bad = (counts < cfg.visible_pixel_floor) | (share < cfg.min_visible_fraction)
        if not bad.any():
            return keep, buffers
        del keep[int(np.argmin(np.where(bad, share, np.inf)))]


def _under_table(points: np.ndarray, light: render.Light, table: Table) -> np.ndarray:
    """Which floor points the table top hides from the light (its edges' thickness neglected)."""
    ldir = np.asarray(light.direction)
    up = -points[:, 2] / ldir[2]
    x = points[:, 0] + up * ldir[0] - table.centre[0]
    y = points[:, 1] + up * ldir[1] - table.centre[1]
    return (np.abs(x) <= table.half[0]) & (np.abs(y) <= table.half[1])


def _render_rgb(
    rng: np.random.Generator, buffers: render.GeometryBuffers, rays: np.ndarray, placed: list[_Placed],
    table: Table, light: render.Light, intrinsics: CameraIntrinsics, cam_to_world: np.ndarray, cfg: SceneConfig,
) -> np.ndarray:
    """Colours every pixel from its surface kind, normal, albedo and the light; adds sensor noise.

    Shading runs in float32: depth stays exact in ``buffers.t`` and colours end as 8 bits.
    """
    h, w = buffers.t.shape
    eye = cam_to_world[:3, 3]
    surface, ids = buffers.surface.reshape(-1), buffers.ids.reshape(-1)
    on_floor = surface == render.SURFACE_FLOOR

    # the table's texture everywhere first, then what is not table on top of it
    table_tex = render.TABLE_TEXTURES[table.texture]
    albedo = render.plane_texture(table_tex, rng, 0.0, intrinsics, cam_to_world).reshape(-1, 3)
    floor_points = None
    if on_floor.any():
        floor = render.plane_texture(render.floor_texture, rng, table.floor_z, intrinsics, cam_to_world)
        albedo = np.where(on_floor[:, None], floor.reshape(-1, 3), albedo)
        floor_points = eye + buffers.t.reshape(-1)[on_floor, None] * rays.reshape(-1, 3)[on_floor]
    missed = surface == render.SURFACE_NONE
    albedo[missed] = 0.55  # where no ray hits anything: a grey wall
    colours = np.array([PALETTE[p.colour] for p in placed], dtype=np.float32).reshape(-1, 3)
    colours = np.clip(colours + rng.uniform(-0.04, 0.04, colours.shape), 0.0, 1.0).astype(np.float32)
    gloss = rng.uniform(0.05, 0.35, len(placed)).astype(np.float32)
    obj = np.flatnonzero(ids)
    albedo[obj] = colours[ids[obj] - 1]

    lit = np.ones(h * w, dtype=np.float32)
    if cfg.shadows:
        casters = [p.primitive for p in placed]
        shadowed = render.shadow_mask(buffers, rays, eye, light, casters, intrinsics, cam_to_world).reshape(-1)
        if floor_points is not None:
            shadowed[on_floor] |= _under_table(floor_points, light, table)
        lit[shadowed] = 0.0
    normals = buffers.normals.reshape(-1, 3).astype(np.float32)
    colour = render.shade(albedo, normals, lit, light)
    colour[missed] = albedo[missed] * (light.ambient + 0.5 * light.intensity)
    if obj.size:
        view = -rays.reshape(-1, 3)[obj].astype(np.float32)
        view /= np.sqrt((view * view).sum(-1, keepdims=True))
        colour[obj] += render.highlight(normals[obj], view, lit[obj], light, gloss[ids[obj] - 1])[:, None]
    # Uniform noise of the drawn standard deviation: as mild as Gaussian noise, and cheaper to draw.
    spread = np.float32(rng.uniform(*cfg.noise_std) * np.sqrt(3.0))
    noise = (rng.random((h * w, 3), dtype=np.float32) * 2 - 1) * spread
    colour *= np.asarray(light.tint, dtype=np.float32) * 255.0
    colour += noise + 0.5
    return np.clip(colour, 0, 255).astype(np.uint8).reshape(h, w, 3)


def generate_scene(rng: np.random.Generator, cfg: SceneConfig | None = None) -> Scene:
    """Renders one random scene; every draw comes from ``rng``, so equal generators give equal scenes."""
    cfg = cfg or SceneConfig()
    intrinsics = _sample_intrinsics(rng, cfg)
    cam_to_world = _sample_pose(rng, cfg)
    table = _sample_table(rng)
    light = _sample_light(rng, cfg)
    rays = render.world_rays(intrinsics, cam_to_world)
    background = render.cast_background(table.box, table.floor_z, rays, cam_to_world[:3, 3])
    for _ in range(20):
        placed = _sample_objects(rng, cfg, intrinsics, cam_to_world, table)
        hits = [render.cast_object(p.primitive, rays, intrinsics, cam_to_world) for p in placed]
        keep, buffers = _visible_objects(placed, hits, background, cfg)
        if len(keep) >= cfg.min_objects:
            break
    else:
        raise RuntimeError("could not place enough visible objects; loosen SceneConfig's visibility limits")
    placed = [placed[i] for i in keep]
    rgb = _render_rgb(rng, buffers, rays, placed, table, light, intrinsics, cam_to_world, cfg)
    depth = np.where(np.isfinite(buffers.t), buffers.t, np.nan).astype(np.float32)
    objects = []
    for k, (p, i) in enumerate(zip(placed, keep), start=1):
        mask = buffers.ids == k
        visible = int(mask.sum())
        objects.append(SceneObject(
            id=k, shape=p.shape, colour=p.colour, size=p.size, position=p.position, yaw=p.yaw,
            primitive=p.primitive, footprint_radius=p.radius, box=mask_box(mask), mask=mask,
            visible_pixels=visible, visible_fraction=visible / max(hits[i].footprint, 1),
        ))
    return Scene(rgb, depth, buffers.ids, objects, intrinsics, cam_to_world, table, light)


def generate_sample(seed: int, cfg: SceneConfig | None = None) -> tuple[Scene, list[Query]]:
    """The scene and ``cfg.queries_per_scene`` queries of one seed (same seed -> same sample)."""
    cfg = cfg or SceneConfig()
    rng = np.random.default_rng(seed)
    scene = generate_scene(rng, cfg)
    return scene, make_queries(scene, rng, cfg.queries_per_scene, cfg.type_weights, cfg.form_weights)


# ---------------------------------------------------------------------------------------------
# Export


def add_to_dataset(writer: CocoRefWriter, scene: Scene, queries: Sequence[Query], split: str | None = None) -> int:
    """Adds one scene (image, depth, instances) and its queries (as refs) to a COCO-style writer."""
    image_id = writer.add_image(
        scene.rgb, depth=scene.depth, intrinsics=scene.intrinsics,
        extra={"cam_to_world": scene.cam_to_world.round(9).tolist(), "table_texture": scene.table.texture},
    )
    ann_ids = {}
    for obj in scene.objects:
        ann_ids[obj.id] = writer.add_annotation(
            image_id, obj.mask, category=obj.shape, bbox=obj.box,
            attributes={
                "shape": obj.shape, "colour": obj.colour, "size": obj.size,
                "position": [round(float(v), 6) for v in obj.position], "yaw": round(obj.yaw, 6),
                "visible_pixels": obj.visible_pixels, "visible_fraction": round(obj.visible_fraction, 4),
            },
        )
    for q in queries:
        writer.add_ref(image_id, [ann_ids[i] for i in q.target_ids], [q.expression], q.query_type, split)
    return image_id


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write synthetic tabletop RGB-D referring-segmentation data.")
    parser.add_argument("--out", type=Path, required=True, help="output folder (annotations.json, images/, depth/)")
    parser.add_argument("--num", type=int, required=True, help="number of scenes")
    parser.add_argument(
        "--seed", type=int, default=0,
        help="index of the first scene within the split (scene i gets seed split_seed(split, seed + i))",
    )
    parser.add_argument("--split", default="train", choices=sorted(SPLIT_OFFSETS))
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--queries-per-scene", type=int, default=8)
    args = parser.parse_args(argv)

    cfg = SceneConfig(width=args.width, height=args.height, queries_per_scene=args.queries_per_scene)
    writer = CocoRefWriter(args.out)
    for i in tqdm(range(args.num), desc="scenes", unit="scene"):
        scene, queries = generate_sample(split_seed(args.split, args.seed + i), cfg)
        add_to_dataset(writer, scene, queries, args.split)
    path = writer.write()
    print(f"wrote {args.num} scenes to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

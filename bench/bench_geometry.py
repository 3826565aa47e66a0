"""Benchmark of the 3D stage on the CPU: projection, per-object extraction, PointCloud2 packing.

Run:  python bench/bench_geometry.py [--repeat 50] [--write-docs]

Measures, on a synthetic RGB-D tabletop (a table plane and five objects, 2 mm depth noise,
16-bit millimetre depth, masks that leak 3 px onto the table):

* full-frame back-projection at 640x480 and 1280x720 (organised HxWx3, and valid points Nx3);
* extract_objects for 5 objects (erosion, clustering, outliers, centroid, upright box);
* the same plus packing: 5 per-object PointCloud2 and the combined ~/cloud message.

Targets (issue #4): 640x480 full frame <= 3 ms; 5 objects incl. packing <= 10 ms.
``--write-docs`` replaces the "## Geometry" section of docs/benchmarks.md with the figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from qwen3vl_seg_ros.cloud import concat_clouds
from qwen3vl_seg_ros.geometry import (
    GeometryConfig,
    backproject,
    depth_from_raw,
    depth_to_points,
    extract_objects,
)
from qwen3vl_seg_ros.types import CameraIntrinsics

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
Row = tuple[str, float, float, float, str]  # case, median ms, p90 ms, min ms, notes
TARGETS_MS = {"full frame 640x480": 3.0, "5 objects + packing 640x480": 10.0}


def intrinsics(width: int, height: int) -> CameraIntrinsics:
    f = 0.94 * width  # about 65 degrees horizontal field of view, like common RGB-D cameras
    return CameraIntrinsics(f, f, (width - 1) / 2, (height - 1) / 2, width, height)


def tabletop(intr: CameraIntrinsics, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """16UC1 depth, 5 object masks (image resolution) and an RGB image of a synthetic tabletop."""
    rng = np.random.default_rng(seed)
    u = (np.arange(intr.width) - intr.cx) / intr.fx
    v = (np.arange(intr.height) - intr.cy) / intr.fy
    d = np.stack(np.broadcast_arrays(u[None, :], v[:, None], np.ones((1, 1))), axis=-1)
    # Table: a plane seen 40 degrees from above, 0.9 m ahead along the optical axis.
    normal = np.array([0.0, -np.cos(np.radians(40)), -np.sin(np.radians(40))])
    with np.errstate(divide="ignore"):
        t_table = (np.array([0.0, 0.0, 0.9]) @ normal) / (d @ normal)
    depth = np.where(t_table > 0, t_table, np.inf)
    ids = np.full(depth.shape, -1)
    for k in range(5):
        centre = np.array([-0.24 + 0.12 * k, 0.02 * (k % 2), 0.75 + 0.05 * k])
        radius = 0.035 + 0.01 * k
        b = -2.0 * (d @ centre)
        disc = b * b - 4.0 * np.einsum("...i,...i", d, d) * (centre @ centre - radius**2)
        with np.errstate(invalid="ignore"):
            t = (-b - np.sqrt(disc)) / (2.0 * np.einsum("...i,...i", d, d))
        hit = (disc >= 0) & (t < depth)
        depth[hit], ids[hit] = t[hit], k
    depth = depth + rng.normal(0.0, 0.002, depth.shape)
    mm = np.where(np.isfinite(depth), np.rint(depth * 1000.0), 0).clip(0, 65535).astype(np.uint16)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    masks = [cv2.dilate((ids == k).astype(np.uint8), kernel).astype(bool) for k in range(5)]
    rgb = rng.integers(0, 256, (intr.height, intr.width, 3), dtype=np.uint8)
    return mm, masks, rgb


def timeit(fn: Callable[[], object], repeat: int) -> tuple[float, float, float]:
    """Median, 90th percentile and minimum wall time in ms (after two warm-up calls).

    The minimum approximates the cost on an idle machine; the median is what a shared one gives.
    """
    fn()
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 90)), float(np.min(times))


def extract_and_pack(masks, depth, rgb, intr, cfg, objects, header):
    """What the node does per frame: geometry, 5 per-object clouds, one combined ~/cloud.

    ``objects`` are SegmentedObject messages made beforehand (the node builds them in its 2D
    stage; their construction is not part of the 3D stage).
    """
    from qwen3vl_seg_ros.ros.pointcloud import cloud_to_msg, fill_object_3d

    geoms = extract_objects(masks, depth, rgb, intr, cfg)
    clouds = [fill_object_3d(obj, g, obj.id, header) for obj, g in zip(objects, geoms)]
    return cloud_to_msg(concat_clouds(clouds), header)


def _bench_size(width: int, height: int, cfg: GeometryConfig, repeat: int) -> list[Row]:
    from std_msgs.msg import Header

    from qwen3vl_seg_ros.msg import SegmentedObject

    intr = intrinsics(width, height)
    mm, masks, rgb = tabletop(intr)
    depth = depth_from_raw(mm, "16UC1")
    n_valid = int(np.count_nonzero(depth > 0))
    size = f"{width}x{height}"
    objects = [SegmentedObject(id=i + 1) for i in range(len(masks))]
    header = Header(frame_id="camera_color_optical_frame")
    kept = sum(g.num_points for g in extract_objects(masks, depth, rgb, intr, cfg))
    return [
        (f"depth_from_raw 16UC1 {size}", *timeit(lambda: depth_from_raw(mm, "16UC1"), repeat), ""),
        (f"full frame {size}", *timeit(lambda: backproject(depth, intr), repeat), "organised HxWx3 float32"),
        (f"valid points {size}", *timeit(lambda: depth_to_points(depth, intr), repeat), f"Nx3, N = {n_valid}"),
        (f"5 objects {size}", *timeit(lambda: extract_objects(masks, depth, rgb, intr, cfg), repeat),
         f"extract_objects, {kept} points kept"),
        (f"5 objects + packing {size}",
         *timeit(lambda: extract_and_pack(masks, depth, rgb, intr, cfg, objects, header), repeat),
         "+ 5 per-object PointCloud2 (fill_object_3d) + combined ~/cloud"),
    ]


def per_result_case() -> tuple[object, Callable[[], list[int]]]:
    """A result of five objects with 3D, and a call that tracks them (one more frame each time).

    Five objects against five live tracks (the continuous-mode case: every object matched),
    observations built by the node's own ``track_observations``.
    """
    from sensor_msgs.msg import RegionOfInterest

    from qwen3vl_seg_ros.msg import SegmentationResult, SegmentedObject
    from qwen3vl_seg_ros.ros.node import track_observations
    from qwen3vl_seg_ros.tracking import ObjectTracker

    result = SegmentationResult(geometry_frame_id="camera_color_optical_frame")
    result.header.frame_id = "camera_color_optical_frame"
    for k in range(5):
        obj = SegmentedObject(id=k + 1, label="red mug", score=0.8, has_3d=True, track_id=k + 1,
                              box=RegionOfInterest(x_offset=40 + 110 * k, y_offset=200, width=60, height=80))
        obj.centroid.x, obj.centroid.y, obj.centroid.z = -0.24 + 0.12 * k, 0.0, 0.75 + 0.05 * k
        result.objects.append(obj)
    observations = track_observations(result)
    tracker, clock = ObjectTracker(), [0.0]

    def track() -> list[int]:
        clock[0] += 0.033  # a 30 Hz stream
        return tracker.update(observations, clock[0])

    return result, track


def _bench_per_result(repeat: int) -> list[Row]:
    """What each result costs after its 3D stage: track ids and the two vision_msgs arrays."""
    from qwen3vl_seg_ros.ros import detections

    result, track = per_result_case()
    rows: list[Row] = [("track ids, 5 objects", *timeit(track, repeat),
                        "ObjectTracker.update: 5 observations against 5 live tracks (Hungarian on 3D centroids)")]
    if detections.AVAILABLE:
        rows.append(("vision_msgs, 5 objects",
                     *timeit(lambda: (detections.detections_2d(result), detections.detections_3d(result)), repeat),
                     "Detection2DArray + Detection3DArray built from the result"))
    return rows


def run(repeat: int) -> tuple[list[Row], dict[str, str]]:
    cfg = GeometryConfig()
    env = environment()
    rows = _bench_size(640, 480, cfg, repeat) + _bench_size(1280, 720, cfg, repeat) + _bench_per_result(repeat)
    return rows, env


def environment() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    from importlib.metadata import PackageNotFoundError, version

    try:
        rclpy_version = f"ros-rclpy {version('ros-rclpy')} (ROS 2 Kilted wheels)"
    except PackageNotFoundError:
        rclpy_version = "rclpy from the ROS install"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return {
        "CPU": f"{cpu}, {os.cpu_count()} logical cores visible, shared with other work while measured "
               f"(load average before the run: {load})",
        "Python": platform.python_version(),
        "NumPy": np.__version__,
        "OpenCV": cv2.__version__,
        "rclpy": rclpy_version,
    }


def table(rows: list[Row]) -> str:
    lines = ["| case | median ms | p90 ms | min ms | target (on the median) | notes |",
             "|---|---:|---:|---:|---|---|"]
    for name, med, p90, low, note in rows:
        target = TARGETS_MS.get(name)
        tgt = f"<= {target:g} ms {'met' if med <= target else 'MISSED'}" if target else ""
        lines.append(f"| {name} | {med:.2f} | {p90:.2f} | {low:.2f} | {tgt} | {note} |")
    return "\n".join(lines)


def section(rows, env, repeat: int) -> str:
    env_lines = "\n".join(f"- {k}: {v}" for k, v in env.items())
    return (
        "## Geometry\n\n"
        f"`python bench/bench_geometry.py --repeat {repeat}` (median, 90th percentile and minimum of "
        f"{repeat} runs after warm-up; the machine's {os.cpu_count()} cores may be shared with other work, so "
        "the minimum is the closest to an idle machine). Synthetic tabletop: a table plane and five "
        "objects, 16UC1 depth with 2 mm noise, masks leaking 3 px onto the table, default "
        "GeometryConfig (erode 2 px, MAD, upright boxes).\n\n"
        f"{env_lines}\n\n{table(rows)}\n"
    )


def write_docs(text: str) -> None:
    old = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Geometry\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(old):
        new = pattern.sub(lambda _: text + "\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + text
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(new.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args(argv)
    rows, env = run(args.repeat)
    text = section(rows, env, args.repeat)
    print(text)
    if args.write_docs:
        write_docs(text)
        print(f"written to {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

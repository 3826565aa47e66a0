"""The node ``sim_camera``: a simulated RGB-D camera showing synthetic tabletop scenes.

It stands in for a camera driver (RealSense, ZED, ...) so that the demo, the launch file and
RViz work on a laptop without hardware, and it publishes what a driver publishes:

* ``image`` (rgb8), ``depth`` (32FC1 metres or 16UC1 millimetres, ``depth_encoding``) and
  ``camera_info``, with one stamp per frame and frame id ``camera_color_optical_frame``, at
  ``rate_hz``; depth is aligned to the colour image (same intrinsics, same size);
* a static transform (``/tf_static``, transient local) from ``world`` to the camera's optical
  frame and to a ``table`` frame, so ``target_frame:=world`` gives 3D outputs on the table,
  whose top is the plane z = 0 (z up). A known limit: the pose changes with the scene, and a
  static transform holds at every stamp, so when a scene's pose arrives late (Fast DDS repairs
  a lost reliable sample at its next heartbeat, seconds later on a loaded machine) the new
  scene's first frames are put in the world with the old pose. The pose on ``/tf`` with each
  frame's stamp was tried: samples were lost the same way for 2.6 s at a time, and the node
  then gave no world 3D at all (it says so), which broke the demo more often;
* the scene's ground truth, latched (transient local), for programs that want to check
  answers (the demo does): ``~/ground_truth`` (std_msgs/String, JSON: objects with their
  attributes and world positions, referring expressions with their target ids, the pose and
  the intrinsics) and ``~/ground_truth_labels`` (mono8 image, 0 = table, k = object k).

Scenes come from the held-out **test** split of the synthetic generator
(:func:`~qwen3vl_seg_ros.training.synthetic.split_seed`), so the demo never shows a layout
the tiny model was trained on. Rendering takes tens of milliseconds, so each scene is rendered
once and its messages are republished with fresh stamps. The scene changes every
``scene_period_s`` seconds (0: only when ``~/next_scene`` is called, which the demo uses to
step through scenes at its own pace).

Run: ``ros2 run qwen3vl_seg_ros sim_camera --ros-args -p rate_hz:=5.0`` (or through the launch
file with ``sim_camera:=true``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.utilities import remove_ros_args
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header, String
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage

from qwen3vl_seg_ros.ros.conversions import array_to_image
from qwen3vl_seg_ros.ros.tf import transform_to_msg
from qwen3vl_seg_ros.training import render
from qwen3vl_seg_ros.training.expressions import Query
from qwen3vl_seg_ros.training.synthetic import Scene, SceneConfig, SceneObject, generate_sample, split_seed
from qwen3vl_seg_ros.transforms import Transform
from qwen3vl_seg_ros.types import CameraIntrinsics

NODE_NAME = "sim_camera"
SPLIT = "test"
DEPTH_ENCODINGS = ("32FC1", "16UC1")
#: Rendered scenes kept for reuse when `scene_seeds` cycles (about 1 MB each at 320x240).
MAX_CACHED_SCENES = 32

#: Saturated colours for ``flat_colours``: each object one exact RGB value, no shading or noise.
#: Colour-threshold segmenters (the test double) then find the objects exactly, which lets a
#: test check the whole pipeline's masks and 3D against the ground truth.
FLAT_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "orange": (255, 128, 0),
    "purple": (128, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "pink": (255, 128, 192),
    "cyan": (0, 255, 255),
}


@dataclass
class RenderedScene:
    """One scene of the test split, rendered once, with what its messages need."""

    index: int  # index in the test split (what `scene_seeds` lists)
    seed: int  # generator seed: split_seed("test", index)
    scene: Scene
    queries: list[Query]
    rgb: np.ndarray  # (H, W, 3) uint8, what is published (flat colours applied)


def render_scene(index: int, width: int = 320, height: int = 240, flat_colours: bool = False,
                 queries_per_scene: int = 8) -> RenderedScene:
    """Renders test-split scene ``index`` (deterministic: same index, same scene)."""
    seed = split_seed(SPLIT, index)
    cfg = SceneConfig(width=width, height=height, queries_per_scene=queries_per_scene)
    scene, queries = generate_sample(seed, cfg)
    rgb = scene.rgb
    if flat_colours:
        rgb = rgb.copy()
        for obj in scene.objects:
            rgb[obj.mask] = FLAT_RGB[obj.colour]
    return RenderedScene(index, seed, scene, list(queries), rgb)


def depth_image(depth_m: np.ndarray, encoding: str) -> np.ndarray:
    """Metres with NaN -> the array of a depth Image: 32FC1 as is, 16UC1 in mm with 0 = no reading."""
    if encoding == "32FC1":
        return depth_m.astype(np.float32, copy=False)
    if encoding == "16UC1":
        mm = np.where(np.isfinite(depth_m), np.round(depth_m * 1000.0), 0.0)
        return np.clip(mm, 0, 65535).astype(np.uint16)
    raise ValueError(f"depth_encoding must be one of {', '.join(DEPTH_ENCODINGS)}, not '{encoding}'")


def camera_info(intr: CameraIntrinsics, frame_id: str) -> CameraInfo:
    """A distortion-free pinhole CameraInfo (the renderer is an ideal pinhole camera)."""
    msg = CameraInfo()
    msg.header.frame_id = frame_id
    msg.width, msg.height = int(intr.width), int(intr.height)
    msg.distortion_model = "plumb_bob"
    msg.d = [0.0] * 5
    msg.k = [intr.fx, 0.0, intr.cx, 0.0, intr.fy, intr.cy, 0.0, 0.0, 1.0]
    msg.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    msg.p = [intr.fx, 0.0, intr.cx, 0.0, 0.0, intr.fy, intr.cy, 0.0, 0.0, 0.0, 1.0, 0.0]
    return msg


def top_z(prim: render.Primitive) -> float:
    """Height of the object's top above the table (world z)."""
    if isinstance(prim, render.Sphere):
        return float(prim.centre[2] + prim.radius)
    if isinstance(prim, render.Box):
        return float(prim.centre[2] + prim.half[2])
    return float(prim.base[2] + prim.height)  # Cylinder, Mug


def _object_json(obj: SceneObject) -> dict[str, Any]:
    return {
        "id": obj.id,
        "shape": obj.shape,
        "colour": obj.colour,
        "size": obj.size,
        "position": [round(float(v), 5) for v in obj.position],  # base centre on the table, world frame
        "top_z": round(top_z(obj.primitive), 5),
        "footprint_radius": round(float(obj.footprint_radius), 5),
        "box": [round(float(v), 2) for v in obj.box],
        "visible_pixels": int(obj.visible_pixels),
    }


def ground_truth(rendered: RenderedScene, number: int, stamp: Any, frames: dict[str, str]) -> dict[str, Any]:
    """The JSON document of ``~/ground_truth``: everything a checker needs, in plain types.

    ``number`` counts scenes since the node started (0-based), so a listener can tell a new
    scene from a repeated index; ``stamp`` is the stamp of the scene's first frame: results
    on frames stamped earlier belong to the previous scene.
    """
    scene = rendered.scene
    intr = scene.intrinsics
    return {
        "number": number,
        "split": SPLIT,
        "index": rendered.index,
        "seed": rendered.seed,
        "stamp": {"sec": int(stamp.sec), "nanosec": int(stamp.nanosec)},
        "frame_id": frames["camera"],
        "world_frame": frames["world"],
        "table_frame": frames["table"],
        "width": int(intr.width),
        "height": int(intr.height),
        "intrinsics": {"fx": intr.fx, "fy": intr.fy, "cx": intr.cx, "cy": intr.cy},
        "cam_to_world": [[round(float(v), 9) for v in row] for row in scene.cam_to_world],
        "table": {"centre": list(scene.table.centre), "half": list(scene.table.half)},
        "objects": [_object_json(o) for o in scene.objects],
        "queries": [{"expression": q.expression, "target_ids": list(q.target_ids), "type": q.query_type}
                    for q in rendered.queries],
    }


def static_transforms(scene: Scene, frames: dict[str, str], stamp: Any) -> TFMessage:
    """world -> camera optical frame (Scene.cam_to_world) and world -> table (its centre, top surface)."""
    from geometry_msgs.msg import TransformStamped

    camera = TransformStamped()
    camera.header.stamp = stamp
    camera.header.frame_id = frames["world"]
    camera.child_frame_id = frames["camera"]
    camera.transform = transform_to_msg(Transform.from_matrix(scene.cam_to_world))
    table = TransformStamped()
    table.header.stamp = stamp
    table.header.frame_id = frames["world"]
    table.child_frame_id = frames["table"]
    cx, cy = scene.table.centre
    table.transform = transform_to_msg(Transform(translation=(cx, cy, 0.0), rotation=(0.0, 0.0, 0.0, 1.0)))
    return TFMessage(transforms=[camera, table])


def describe(rendered: RenderedScene) -> str:
    """One line for the log and the ~/next_scene answer."""
    objects = ", ".join(f"{o.size} {o.colour} {o.shape}" for o in rendered.scene.objects)
    return (f"test scene {rendered.index} (seed {rendered.seed}): {len(rendered.scene.objects)} object(s): "
            f"{objects}")


def latched_qos() -> QoSProfile:
    """Reliable + transient local, depth 1: late joiners get the last message (like /tf_static)."""
    return QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                      history=HistoryPolicy.KEEP_LAST)


class SimCamera(Node):
    """Publishes the synthetic scenes like an RGB-D driver; see the module docstring."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        p = self._declare
        self.rate_hz = float(p("rate_hz", 5.0, "Frames per second (image, depth and camera_info)."))
        self.width = int(p("width", 320, "Image width in pixels."))
        self.height = int(p("height", 240, "Image height in pixels."))
        self.depth_encoding = str(p("depth_encoding", "32FC1", "Depth encoding: '32FC1' (metres) or '16UC1' (mm)."))
        seeds = p("scene_seeds", Parameter.Type.INTEGER_ARRAY, "Indices of held-out test-split scenes to cycle "
                  "through (scene seed = split_seed('test', index)). Unset: seed, seed + 1, seed + 2, ...")
        self.first_index = int(p("seed", 0, "First test-split scene index when scene_seeds is unset."))
        self.scene_period_s = float(p("scene_period_s", 10.0, "A new scene every this many seconds "
                                      "(0 = only on ~/next_scene)."))
        self.flat_colours = bool(p("flat_colours", False, "Draw objects in flat saturated colours, without "
                                   "shading or noise (for pipeline tests with colour-threshold segmenters)."))
        self.queries_per_scene = int(p("queries_per_scene", 8, "Referring expressions in the ground truth."))
        qos_name = str(p("qos", "reliable", "QoS of image/depth/camera_info: 'reliable' (matches every "
                         "subscriber) or 'sensor_data' (best effort, like many drivers)."))
        self.frames = {
            "camera": str(p("frame_id", "camera_color_optical_frame", "Optical frame of the camera.")),
            "world": str(p("world_frame", "world", "World frame: the table top is z = 0, z up.")),
            "table": str(p("table_frame", "table", "Frame at the table's centre, on its top surface.")),
        }
        if self.depth_encoding not in DEPTH_ENCODINGS:
            raise ValueError(f"depth_encoding must be one of {', '.join(DEPTH_ENCODINGS)}, "
                             f"not '{self.depth_encoding}'")
        if not (self.rate_hz > 0 and math.isfinite(self.rate_hz)):
            raise ValueError(f"rate_hz must be a positive number, not {self.rate_hz}")
        if not (8 <= self.width <= 4096 and 8 <= self.height <= 4096):  # 0 was a ZeroDivisionError traceback
            raise ValueError(f"width and height must be 8 to 4096 pixels, not {self.width}x{self.height}")
        if qos_name not in ("reliable", "sensor_data"):
            raise ValueError(f"qos must be 'reliable' or 'sensor_data', not '{qos_name}'")
        self.indices = [int(s) for s in seeds or []]
        if any(i < 0 for i in [*self.indices, self.first_index]):
            raise ValueError(f"scene indices must be >= 0 (scene_seeds {self.indices}, seed {self.first_index})")

        sensor_qos = qos_profile_sensor_data if qos_name == "sensor_data" else QoSProfile(
            depth=5, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        self._image_pub = self.create_publisher(Image, "image", sensor_qos)
        self._depth_pub = self.create_publisher(Image, "depth", sensor_qos)
        self._info_pub = self.create_publisher(CameraInfo, "camera_info", sensor_qos)
        self._tf_pub = self.create_publisher(TFMessage, "/tf_static", latched_qos())
        self._gt_pub = self.create_publisher(String, "~/ground_truth", latched_qos())
        self._gt_labels_pub = self.create_publisher(Image, "~/ground_truth_labels", latched_qos())
        self._service = self.create_service(Trigger, "~/next_scene", self._on_next_scene)

        self._number = -1  # scenes shown so far - 1
        self._rendered: dict[int, RenderedScene] = {}  # by index: a cycle of scenes renders each once
        self._current: RenderedScene | None = None
        self._messages: tuple[Image, Image, CameraInfo] | None = None
        self._scene_started = 0.0
        self._next_scene()
        self._timer = self.create_timer(1.0 / self.rate_hz, self._on_timer)
        self.get_logger().info(
            f"publishing {self.width}x{self.height} rgb8 + {self.depth_encoding} depth at {self.rate_hz:g} Hz on "
            f"'{self.resolve_topic_name('image')}', '{self.resolve_topic_name('depth')}', "
            f"'{self.resolve_topic_name('camera_info')}' ({qos_name} QoS); TF {self.frames['world']} -> "
            f"{self.frames['camera']}; new scene "
            + (f"every {self.scene_period_s:g} s" if self.scene_period_s > 0 else "on ~/next_scene"))

    def _declare(self, name: str, default: Any, description: str) -> Any:
        """Declares a start-time parameter (read only: changing it later would not take effect)."""
        return self.declare_parameter(name, default, ParameterDescriptor(description=description, read_only=True)).value

    def _index(self, number: int) -> int:
        if not self.indices:
            return self.first_index + number
        return self.indices[number % len(self.indices)]

    @property
    def current(self) -> RenderedScene | None:
        return self._current

    def _next_scene(self) -> RenderedScene:
        """Renders the next scene and publishes its TF and ground truth, then its first frame."""
        for _ in range(10):
            self._number += 1
            index = self._index(self._number)
            t0 = time.monotonic()
            try:
                rendered = self._rendered.get(index) or render_scene(
                    index, self.width, self.height, self.flat_colours, self.queries_per_scene)
                break
            except RuntimeError as exc:  # the generator could not place objects: skip this layout
                self.get_logger().warning(f"test scene {index} skipped: {exc}")
        else:
            raise RuntimeError("ten scenes in a row could not be generated; check SceneConfig")
        render_ms = (time.monotonic() - t0) * 1e3
        if len(self._rendered) < MAX_CACHED_SCENES:
            self._rendered[index] = rendered
        stamp = self.get_clock().now().to_msg()
        header = Header(stamp=stamp, frame_id=self.frames["camera"])
        scene = rendered.scene
        self._messages = (
            array_to_image(rendered.rgb, "rgb8", header),
            array_to_image(depth_image(scene.depth, self.depth_encoding), self.depth_encoding, header),
            camera_info(scene.intrinsics, self.frames["camera"]),
        )
        # Order matters for listeners: the transform and the ground truth go out before the
        # scene's first frame, so a frame of the new scene never meets the old camera pose.
        self._tf_pub.publish(static_transforms(scene, self.frames, stamp))
        self._gt_labels_pub.publish(array_to_image(scene.instance_ids.astype(np.uint8), "mono8", header))
        self._gt_pub.publish(String(data=json.dumps(ground_truth(rendered, self._number, stamp, self.frames))))
        self._current = rendered
        self._scene_started = time.monotonic()
        self.get_logger().info(f"scene {self._number}: {describe(rendered)} (rendered in {render_ms:.0f} ms)")
        self._publish_frame(stamp)
        return rendered

    def _publish_frame(self, stamp: Any) -> None:
        assert self._messages is not None
        image, depth, info = self._messages
        for msg in (image, depth, info):
            msg.header.stamp = stamp
        # CameraInfo first: the node keeps the latest one, and a new scene's intrinsics differ, so
        # a frame that arrived before its CameraInfo could be projected with the last scene's K.
        self._info_pub.publish(info)
        self._image_pub.publish(image)
        self._depth_pub.publish(depth)

    def _on_timer(self) -> None:
        if self.scene_period_s > 0 and time.monotonic() - self._scene_started >= self.scene_period_s:
            self._next_scene()  # publishes the new scene's first frame
            return
        self._publish_frame(self.get_clock().now().to_msg())

    def _on_next_scene(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        try:
            rendered = self._next_scene()
        except Exception as exc:  # report it to the caller instead of killing the node
            response.success, response.message = False, f"could not render the next scene: {exc}"
            return response
        response.success = True
        response.message = json.dumps({"number": self._number, "index": rendered.index, "text": describe(rendered)})
        return response


def main(args: list[str] | None = None) -> int:
    """Entry point: ``sim_camera --ros-args -p rate_hz:=5.0 -p scene_period_s:=10.0``."""
    argv = args if args is not None else sys.argv
    own = remove_ros_args(argv)[1:]
    if "-h" in own or "--help" in own:  # answered without publishing anything on the user's domain
        print("usage: sim_camera [-h] [--ros-args -p NAME:=VALUE ...]\n\n" + (__doc__ or "")
              + "\nIts parameters (all read at start-up): the README's 'The simulated camera "
              "sim_camera' section, or `ros2 param describe /sim_camera <name>` while it runs.")
        return 0
    rclpy.init(args=argv)
    code = 0
    node = None
    try:
        node = SimCamera()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ValueError as exc:  # a bad parameter: say which, without a traceback
        print(f"sim_camera: {exc}", file=sys.stderr)
        code = 2
    finally:
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())

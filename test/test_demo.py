"""The demo: its helpers, a whole run end to end (node + camera as processes), failures and Ctrl-C.

The end-to-end runs use the colour-blob test double on the camera's flat-colour scenes, so the
answers are predictable enough to check against the ground truth.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest

from qwen3vl_seg_ros.cloud import make_cloud
from qwen3vl_seg_ros.msg import SegmentedObject
from qwen3vl_seg_ros.ros import demo as demo_module
from qwen3vl_seg_ros.ros.demo import choose_commands, format_table, iou, object_mask, read_ply, write_ply
from qwen3vl_seg_ros.ros.sim_camera import FLAT_RGB, render_scene

from helpers import wait_for
from ros_harness import DOUBLE

ROOT = Path(__file__).resolve().parents[1]
DOUBLE_COLOURS = {"red", "green", "blue", "yellow", "white"}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def test_choose_commands_mixes_the_kinds_of_question():
    queries = [{"expression": f"{kind} {k}", "type": kind, "target_ids": []}
               for k in range(3) for kind in ("category", "no_target", "multi", "referring")]
    chosen = [q["expression"] for q in choose_commands(queries, 6)]
    assert chosen == ["referring 0", "multi 0", "no_target 0", "category 0", "referring 1", "multi 1"]
    assert [q["expression"] for q in choose_commands(queries[:2], 5)] == ["no_target 0", "category 0"]
    assert choose_commands([], 3) == []


def test_object_mask_and_iou():
    obj = SegmentedObject()
    obj.box.x_offset, obj.box.y_offset, obj.box.width, obj.box.height = 2, 1, 3, 2
    obj.mask.width, obj.mask.height, obj.mask.step, obj.mask.encoding = 3, 2, 4, "mono8"  # padded rows
    obj.mask.data = bytes([255, 0, 255, 7, 0, 255, 0, 7])
    mask = object_mask(obj, 6, 4)
    expected = np.zeros((4, 6), bool)
    expected[1, 2] = expected[1, 4] = expected[2, 3] = True
    np.testing.assert_array_equal(mask, expected)
    other = np.zeros((4, 6), bool)
    other[1, 2:5] = True
    assert iou(mask, other) == pytest.approx(2 / 4)
    assert iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0  # nothing asked, nothing found


def test_ply_round_trip(tmp_path):
    points = np.array([[0.1, -0.2, 0.3], [1.0, 2.0, 3.0]], np.float32)
    colours = np.array([[255, 0, 10], [1, 2, 3]], np.uint8)
    path = tmp_path / "c.ply"
    write_ply(path, make_cloud(points, colours, np.array([4, 5])), "world")
    vertices, comments = read_ply(path)
    assert comments == ["qwen3vl_seg_ros object clouds, metres, frame world"]
    np.testing.assert_array_equal(np.stack([vertices["x"], vertices["y"], vertices["z"]], 1), points)
    np.testing.assert_array_equal(np.stack([vertices["red"], vertices["green"], vertices["blue"]], 1), colours)
    assert list(vertices["id"]) == [4, 5]
    assert path.read_bytes().startswith(b"ply\nformat binary_little_endian 1.0\n")


@pytest.mark.ros
def test_an_answer_on_the_previous_scene_is_not_scored(tmp_path):
    """The real node keeps answering on a frame stamped before the scene began (its camera lags):
    after three tries the demo marks the row STALE (exit code 1) and never scores that answer
    against the new scene's ground truth."""
    from builtin_interfaces.msg import Time

    from ros_harness import Client, NodeHarness, Scene, new_context

    context = new_context()  # the demo's client calls /qwen3vl_seg/segment
    node = NodeHarness(context, {"max_input_age_s": 60.0})
    camera = Client(context)
    client = demo_module.DemoClient(context)
    try:
        camera.wait_connected()
        camera.publish_frame(Scene(), stamp=Time(sec=99, nanosec=800_000_000), wait_node=node.node)
        scene = Scene()
        labels = np.zeros((scene.height, scene.width), np.uint8)
        x1, y1, x2, y2, _ = scene.rects["red"]
        labels[y1:y2, x1:x2] = 1
        client.gt_labels[100 * 10**9] = labels  # the new scene began at 100 s
        gt = {"number": 1, "stamp": {"sec": 100, "nanosec": 0}, "world_frame": "world",
              "objects": [{"size": "small", "colour": "red", "shape": "cube", "position": [0, 0, 0]}]}
        query = {"expression": "red", "type": "referring", "target_ids": [1]}
        calls = node.node._segmenter.calls
        row = demo_module._run_command(client, argparse.Namespace(request_timeout=5.0), gt, query, tmp_path, "s",
                                       time.monotonic() + 60)
        assert node.node._segmenter.calls - calls == 3  # asked again twice, for a newer frame
        assert row.status == "STALE" and "previous scene" in row.message
        assert row.iou is None and row.objects == []
    finally:
        client.close()
        camera.close()
        node.close()
        context.try_shutdown()


@pytest.mark.ros
def test_the_demo_refuses_a_domain_where_another_camera_runs():
    """A second camera on the domain (another demo, a launched sim_camera) would mix its frames
    and ground truth into the run: the demo stops (exit 2) instead of scoring that."""
    from rclpy.node import Node
    from sensor_msgs.msg import Image

    from ros_harness import new_context

    context = new_context("demo_alone")
    client = demo_module.DemoClient(context)
    cameras = [Node(f"camera_{k}", context=context) for k in range(2)]
    try:
        demo_module._check_alone(client)  # nobody else yet
        publishers = [n.create_publisher(Image, "image", 1) for n in cameras]
        assert publishers and wait_for(lambda: client.node.count_publishers("/demo_alone/image") == 2, 10)
        with pytest.raises(demo_module.StartupError, match="2 publishers on /demo_alone/image"):
            demo_module._check_alone(client)
    finally:
        for n in cameras:
            n.destroy_node()
        client.close()
        context.try_shutdown()


def test_a_wrong_object_is_named_not_measured_as_the_target():
    """The demo printed "IoU 0.00 (1 target), x-y off by 1.2 cm" for an answer on another object:
    the distance was that object's, read as the target's 3D error."""
    row = demo_module.Row(scene=0, command="the red can", query_type="referring", target_ids=[2], status="OK",
                          iou=0.0, objects=[{"gt_id": 3, "gt_object": "small green ball", "xy_error_m": 0.012}])
    assert demo_module._gt_text(row) == ["IoU 0.00 (1 target)", "not a target: small green ball"]
    row.objects.append({"gt_id": 2, "gt_object": "big red can", "xy_error_m": 0.004})
    row.iou = 0.5
    assert demo_module._gt_text(row) == ["IoU 0.50 (1 target)", "x-y off by 0.4 cm", "not a target: small green ball"]


def test_format_table_puts_one_object_per_line():
    text = format_table(["#", "objects", "ms"], [["1", ["a 0.9", "bb 0.8"], "12"], ["2", [], "3"]])
    assert text.splitlines() == ["#  objects  ms", "-  -------  --", "1  a 0.9    12", "   bb 0.8", "2           3"]


# ---------------------------------------------------------------------------------------------
# whole runs
# ---------------------------------------------------------------------------------------------
def checkable(command: str, targets: list[int], objects: list) -> bool:
    """Whether the colour-blob double's answer should equal the ground truth for this command.

    It finds every object of each colour named, so it is right when the command names only
    colours it knows and the targets are exactly the objects of those colours.
    """
    named = set(re.findall(r"[a-z]+", command)) & {o.colour for o in objects}
    if not named or not named <= DOUBLE_COLOURS:
        return False
    return set(targets) == {o.id for o in objects if o.colour in named}


def scene_with_a_checkable_command() -> int:
    for index in range(60):
        rendered = render_scene(index, flat_colours=True)
        queries = [{"expression": q.expression, "type": q.query_type, "target_ids": list(q.target_ids)}
                   for q in rendered.queries]
        if any(checkable(q["expression"], q["target_ids"], rendered.scene.objects) and q["target_ids"]
               for q in choose_commands(queries, 3)):
            return index
    raise AssertionError("no test scene where the double can answer a demo command exactly")


def _default_sigint() -> None:
    """In the demo's child process before it runs: SIGINT back to its default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class DemoProcess:
    """The demo as a child process; records its own children's pids while it runs."""

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ)  # conftest put test/ on PYTHONPATH and chose our ROS_DOMAIN_ID
        # Ctrl-C as at a terminal: a test runner started in the background (``nohup ... &``) has
        # SIGINT ignored, and its children would inherit that and never see the test's SIGINT
        self.proc = subprocess.Popen([sys.executable, "-m", "qwen3vl_seg_ros.ros.demo", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_default_sigint)
        self.children: set[int] = set()
        self.stdout: list[str] = []
        self._watch = threading.Thread(target=self._watch_children, daemon=True)
        self._watch.start()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.stdout.append(line)

    def _watch_children(self) -> None:
        while self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                self.children |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
            time.sleep(0.1)

    def wait(self, timeout: float) -> tuple[int, str, str]:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._reader.join(5)
        return code, "".join(self.stdout), self.proc.stderr.read()

    def wait_for_output(self, text: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if text in "".join(self.stdout):
                return True
            time.sleep(0.05)
        return False

    def children_alive(self) -> list[int]:
        alive = []
        for pid in self.children:
            with contextlib.suppress(psutil.NoSuchProcess):
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        return alive


@pytest.mark.ros
def test_demo_end_to_end_with_the_test_double(tmp_path):
    index = scene_with_a_checkable_command()
    out = tmp_path / "out"
    demo = DemoProcess(["--segmenter", DOUBLE, "--flat-colours", "--seed", str(index), "--scenes", "2",
                        "--continuous-s", "1.5", "--rate-hz", "10", "--timeout", "90", "--out", str(out)])
    code, stdout, stderr = demo.wait(120)
    assert code == 0, stdout + stderr
    assert len(demo.children) >= 2 and demo.children_alive() == []
    # loading progress was shown, then the table, continuous mode and diagnostics
    assert "[node] colour-blob test double loaded" in stdout and "[node] ready: waiting for images" in stdout
    assert re.search(r"^#\s+scene\s+command\s+status\s+objects: label, score, centroid x y z in 'world' \(m\)",
                     stdout, re.M), stdout
    assert re.search(r"continuous mode: \d+ results in 1\.\d s", stdout), stdout
    assert "[demo] /diagnostics: OK 'serving'" in stdout

    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    scenes = summary["scenes"]
    assert [g["index"] for g in scenes.values()] == [index, index + 1]
    assert 2 <= len(rows) <= 6 and all(r["status"] in ("OK", "NO_MATCH") for r in rows)
    assert summary["continuous"]["results"] >= 2

    truths = {number: render_scene(g["index"], flat_colours=True).scene.objects for number, g in
              ((int(k), g) for k, g in scenes.items())}
    checked = 0
    for row in rows:
        objects = truths[row["scene"]]
        if row["target_ids"] and checkable(row["command"], row["target_ids"], objects):
            assert row["status"] == "OK" and row["iou"] >= 0.9, row
            checked += 1
        for obj in row["objects"]:
            # every 3D centroid, in the world frame via the camera's TF, sits over its object
            if obj["has_3d"] and "gt_id" in obj:
                truth = objects[obj["gt_id"] - 1]
                assert obj["xy_error_m"] < truth.footprint_radius + 0.01, obj
        for kind, name in row["files"].items():
            path = out / name
            if kind == "overlay":
                image = cv2.imread(str(path))
                assert image.shape == (240, 320, 3)
            elif kind == "mask":
                labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
                assert labels.shape == (240, 320) and labels.max() == len(row["objects"])
            else:
                vertices, comments = read_ply(path)
                assert comments[0].endswith("frame world")
                assert len(vertices) == sum(o["num_points"] for o in row["objects"] if o["has_3d"])
                colours = np.stack([vertices["red"], vertices["green"], vertices["blue"]], 1)
                known = {FLAT_RGB[c] for c in DOUBLE_COLOURS}
                assert {tuple(c) for c in colours.tolist()} <= known  # the objects' own flat colours
        if row["status"] == "OK":
            assert {"overlay", "mask"} <= set(row["files"])
    assert checked >= 1
    assert (out / "node.log").read_text().count("ready: waiting for images and commands") == 1


@pytest.mark.ros
def test_readme_images_are_one_command(tmp_path):
    index = first_scene_with_two_double_colours()
    demo = DemoProcess(["--segmenter", DOUBLE, "--flat-colours", "--seed", str(index), "--scenes", "1",
                        "--command", "the red, green, blue, yellow and white objects", "--continuous-s", "0",
                        "--timeout", "90", "--out", str(tmp_path), "--readme-images"])
    code, stdout, stderr = demo.wait(120)
    assert code == 0, stdout + stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_cloud.png", "demo_overlay.png"]  # nothing else
    overlay = cv2.imread(str(tmp_path / "demo_overlay.png"))
    cloud = cv2.imread(str(tmp_path / "demo_cloud.png"))
    assert overlay.shape == (240, 320, 3) and cloud.shape == (480, 640, 3)
    assert all((tmp_path / name).stat().st_size < 300_000 for name in ("demo_cloud.png", "demo_overlay.png"))
    assert (cloud < 250).any(axis=2).mean() > 0.02  # something was drawn on the white figure


@pytest.mark.ros
def test_continuous_mode_keeps_each_objects_track_id(tmp_path):
    """A still scene streamed at 10 Hz: every result names each object by the same track id."""
    index = first_scene_with_two_double_colours()
    demo = DemoProcess(["--segmenter", DOUBLE, "--flat-colours", "--seed", str(index), "--scenes", "1",
                        "--command", "the red, green, blue, yellow and white objects", "--continuous-s", "1.5",
                        "--rate-hz", "10", "--timeout", "90", "--out", str(tmp_path)])
    code, stdout, stderr = demo.wait(120)
    assert code == 0, stdout + stderr
    continuous = json.loads((tmp_path / "summary.json").read_text())["continuous"]
    assert continuous["statuses"] == ["OK"] and continuous["results"] >= 2, continuous
    assert len(continuous["track_ids"]) >= 2, continuous
    assert set(continuous["track_ids"].values()) == {continuous["results"]}, continuous
    assert "object track ids (results holding each)" in stdout


def first_scene_with_two_double_colours() -> int:
    for index in range(60):
        if len({o.colour for o in render_scene(index).scene.objects} & DOUBLE_COLOURS) >= 2:
            return index
    raise AssertionError("no scene with two colours the double knows")


@pytest.mark.ros
def test_demo_reports_a_segmenter_that_cannot_load(tmp_path):
    demo = DemoProcess(["--segmenter", "no_such_module:Nope", "--timeout", "60", "--out", str(tmp_path)])
    code, stdout, stderr = demo.wait(90)
    assert code == 2, stdout + stderr
    assert "[demo] stopped: the node could not load its segmenter" in stderr
    assert "segmenter module 'no_such_module' cannot be imported" in stderr
    assert demo.children_alive() == []


@pytest.mark.ros
def test_demo_stops_its_children_on_ctrl_c(tmp_path):
    demo = DemoProcess(["--segmenter", DOUBLE, "--flat-colours", "--scenes", "1", "--commands", "1",
                        "--continuous-s", "20",
                        "--timeout", "90", "--out", str(tmp_path)])
    try:
        assert demo.wait_for_output("continuous mode for 20 s", 60), "".join(demo.stdout)
        assert len(demo.children) >= 2
        demo.proc.send_signal(signal.SIGINT)
        code, stdout, stderr = demo.wait(30)
    finally:
        if demo.proc.poll() is None:
            demo.proc.kill()
    assert code == 130, stdout + stderr
    assert "interrupted; stopping the node and the camera" in stderr
    assert demo.children_alive() == []


# ---------------------------------------------------------------------------------------------
# RViz layout and documentation
# ---------------------------------------------------------------------------------------------
RVIZ_TYPES = {
    "rviz_default_plugins/Image": "sensor_msgs/msg/Image",
    "rviz_default_plugins/PointCloud2": "sensor_msgs/msg/PointCloud2",
    "rviz_default_plugins/MarkerArray": "visualization_msgs/msg/MarkerArray",
}


def rviz_layout() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "rviz" / "segmentation.rviz").read_text())


def test_rviz_layout_has_the_structure_rviz2_reads():
    layout = rviz_layout()
    assert {"Panels", "Visualization Manager", "Window Geometry"} <= set(layout)
    manager = layout["Visualization Manager"]
    assert {"Displays", "Global Options", "Tools", "Views", "Class", "Name", "Enabled"} <= set(manager)
    assert manager["Global Options"]["Fixed Frame"] == "world"
    assert manager["Views"]["Current"]["Class"] == "rviz_default_plugins/Orbit"
    assert all(tool["Class"].startswith("rviz_default_plugins/") for tool in manager["Tools"])
    displays = manager["Displays"]
    assert len({d["Name"] for d in displays}) == len(displays)
    for display in displays:
        assert display["Class"].startswith("rviz_default_plugins/") and isinstance(display["Enabled"], bool)
        if "Topic" in display:
            topic = display["Topic"]
            assert topic["Value"].startswith("/") and topic["Reliability Policy"] in ("Reliable", "Best Effort")
    classes = [d["Class"] for d in displays]
    assert "rviz_default_plugins/TF" in classes
    cloud = next(d for d in displays if d["Class"] == "rviz_default_plugins/PointCloud2")
    assert cloud["Color Transformer"] == "RGB8" and cloud["Topic"]["Value"] == "/qwen3vl_seg/cloud"
    for name in ("Overlay (~/overlay)", "Label mask (~/mask, 0 = background, k = object k)"):
        assert name in layout["Window Geometry"], name  # the image panels' dock entries


@pytest.mark.ros
def test_rviz_topics_are_what_the_node_publishes():
    from ros_harness import NodeHarness, new_context

    shown = {d["Topic"]["Value"]: RVIZ_TYPES[d["Class"]] for d in rviz_layout()["Visualization Manager"]["Displays"]
             if d["Class"] in RVIZ_TYPES and d["Topic"]["Value"].startswith("/qwen3vl_seg/")}
    assert set(shown) == {"/qwen3vl_seg/overlay", "/qwen3vl_seg/mask", "/qwen3vl_seg/cloud", "/qwen3vl_seg/markers"}
    # A namespace of its own: a node named qwen3vl_seg in "/" can still be in the graph (the demo
    # tests' node process, until discovery drops it), and a lookup by name may find that one.
    namespace = "rviz_topics_check"
    context = new_context(namespace)
    harness = NodeHarness(context)
    try:
        from helpers import wait_for

        def published() -> dict[str, list[str]]:
            found = harness.node.get_publisher_names_and_types_by_node("qwen3vl_seg", f"/{namespace}")
            return {topic.removeprefix(f"/{namespace}"): types for topic, types in found}

        # the graph cache learns about the node's own publishers asynchronously (slowly on a
        # loaded machine: CI once saw only one of them after 10 s)
        assert wait_for(lambda: all(t in published() for t in shown), 30), published()
        for topic, msg_type in shown.items():
            assert msg_type in published()[topic], (topic, published())
    finally:
        harness.close()
        context.try_shutdown()


def test_readme_documents_the_launch_arguments_demo_and_client_options():
    import ast

    readme = (ROOT / "README.md").read_text()
    tree = ast.parse((ROOT / "launch" / "segmentation.launch.py").read_text())
    arguments = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                     and getattr(n.targets[0], "id", "") == "LAUNCH_ARGUMENTS")
    for name, _default, _text in arguments:
        assert f"`{name}`" in readme, name
    for option in ("--model", "--device", "--scenes", "--command", "--out", "--timeout", "--readme-images"):
        assert f"{option}" in readme, option
    for option in ("--node", "--timeout", "--continuous", "--command-topic", "--wait"):
        assert f"`{option}" in readme, option
    for image in ("docs/images/demo_overlay.png", "docs/images/demo_cloud.png"):
        assert image in readme
        assert (ROOT / image).stat().st_size < 300_000


@pytest.mark.ros
def test_demo_stops_when_a_child_dies(tmp_path):
    demo = DemoProcess(["--segmenter", DOUBLE, "--flat-colours", "--scenes", "1", "--commands", "1",
                        "--continuous-s", "20", "--timeout", "90", "--out", str(tmp_path)])
    try:
        assert demo.wait_for_output("continuous mode for 20 s", 60), "".join(demo.stdout)
        camera = next(p for p in (psutil.Process(pid) for pid in demo.children)
                      if "qwen3vl_seg_ros.ros.sim_camera" in p.cmdline())
        camera.kill()
        code, stdout, stderr = demo.wait(30)
    finally:
        if demo.proc.poll() is None:
            demo.proc.kill()
    assert code == 2, stdout + stderr
    assert not re.search(r"continuous mode: \d+ results in", stdout), stdout  # stopped, not run to its end
    assert "[demo] stopped: the camera process exited with code -9" in stderr
    assert demo.children_alive() == []

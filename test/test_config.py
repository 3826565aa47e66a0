"""Configuration files agree with the node: params.yaml, the launch file, package.xml, setup.py."""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from qwen3vl_seg_ros.ros.parameters import PARAMETERS, markdown_table, params_yaml

ROOT = Path(__file__).resolve().parents[1]


def yaml_params() -> dict:
    data = yaml.safe_load((ROOT / "config" / "params.yaml").read_text())
    return data["/**"]["ros__parameters"]


def test_params_yaml_lists_every_parameter_with_its_default():
    values = yaml_params()
    assert set(values) == {p.name for p in PARAMETERS}
    for p in PARAMETERS:
        assert values[p.name] == p.default, p.name
        assert type(values[p.name]) is type(p.default), p.name


def test_params_yaml_is_the_generated_one():
    assert (ROOT / "config" / "params.yaml").read_text() == params_yaml()


def test_evaluation_and_node_share_their_defaults():
    """``evaluate`` reports what the node serves: its score threshold and box refinement."""
    from qwen3vl_seg_ros.segmenter import SegmenterOptions
    from qwen3vl_seg_ros.training.evaluate import NODE_SCORE_THRESHOLD

    defaults = {p.name: p.default for p in PARAMETERS}
    assert defaults["score_threshold"] == NODE_SCORE_THRESHOLD
    assert SegmenterOptions().box_refine_passes == defaults["box_refine_passes"]


def test_every_parameter_has_a_description_and_valid_default():
    for p in PARAMETERS:
        assert len(p.description) > 20, p.name
        if p.min is not None:
            assert p.min <= p.default <= p.max, p.name
        if p.choices:
            assert p.default in p.choices, p.name


@pytest.mark.ros
def test_node_declares_exactly_the_table():
    from rclpy.parameter import Parameter

    from ros_harness import NodeHarness, new_context

    context = new_context()
    harness = NodeHarness(context, autostart=False)
    try:
        node = harness.node
        builtin = {"use_sim_time", "start_type_description_service"}
        declared = {name for name in node._parameters if name not in builtin}
        assert declared == {p.name for p in PARAMETERS}
        desc = node.describe_parameter("score_threshold")
        assert "lower score" in desc.description and desc.floating_point_range[0].to_value == 1.0
        # ranges and choices are enforced
        assert not node.set_parameters([Parameter("score_threshold", value=1.5)])[0].successful
        refused = node.set_parameters([Parameter("outlier_method", value="median")])[0]
        assert not refused.successful and "one of mad, mode, none" in refused.reason
        assert node.set_parameters([Parameter("score_threshold", value=0.7)])[0].successful
        assert node.p("score_threshold") == 0.7
        # 0 made every request time out, pairing of depth impossible, every 3D match blocked
        for name in ("max_input_age_s", "depth_timeout_s", "track_max_distance_m"):
            assert not node.set_parameters([Parameter(name, value=0.0)])[0].successful, name
    finally:
        harness.close()
        context.try_shutdown()


def launch_literals() -> tuple[list[tuple[str, str, str]], list[str]]:
    """LAUNCH_ARGUMENTS and NODE_PARAMETER_ARGUMENTS read from the launch file without launch_ros."""
    tree = ast.parse((ROOT / "launch" / "segmentation.launch.py").read_text())
    found = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if isinstance(target, ast.Name) and target.id in ("LAUNCH_ARGUMENTS", "NODE_PARAMETER_ARGUMENTS"):
            found[target.id] = ast.literal_eval(node.value)
    return found["LAUNCH_ARGUMENTS"], found["NODE_PARAMETER_ARGUMENTS"]


def test_launch_arguments_match_node_parameters():
    arguments, node_params = launch_literals()
    names = [a[0] for a in arguments]
    assert len(names) == len(set(names))
    table = {p.name: p for p in PARAMETERS}
    for name in node_params:
        assert name in names, f"{name} is passed to the node but not declared"
        assert name in table, f"launch argument {name} sets no node parameter"
        default = dict((a[0], a[1]) for a in arguments)[name]
        expected = table[name].default
        expected = str(expected).lower() if isinstance(expected, bool) else expected
        assert default == expected, f"{name}: launch default {default!r} != {table[name].default!r}"
    for required in ("model", "decoder", "device", "dtype", "image", "depth", "camera_info", "target_frame",
                     "namespace", "params_file"):
        assert required in names
    assert all(len(a[2]) > 10 for a in arguments)


def launch_module_without_launch_ros() -> dict:
    """The launch file's constants and explicit_overrides, run without its launch imports."""
    tree = ast.parse((ROOT / "launch" / "segmentation.launch.py").read_text())
    kept = [n for n in tree.body if isinstance(n, ast.Assign)
            or (isinstance(n, ast.FunctionDef) and n.name in ("explicit_overrides", "launch_bool"))]
    namespace: dict = {}
    exec(compile(ast.Module(body=kept, type_ignores=[]), "segmentation.launch.py", "exec"), namespace)
    return namespace


def test_launch_arguments_left_at_their_default_leave_the_params_file_alone():
    """launch_ros applies the overrides after params_file: only arguments the user changed may be
    in them, or a params file's model, device or target_frame would be reset to the defaults."""
    launch = launch_module_without_launch_ros()
    defaults = {name: default for name, default, _ in launch["LAUNCH_ARGUMENTS"]}
    given = {name: defaults[name] for name in [*launch["NODE_PARAMETER_ARGUMENTS"], "autostart", "use_sim_time"]}
    assert launch["explicit_overrides"](given) == {}
    given.update(device="cuda", target_frame="base_link", use_depth="False", autostart="true", use_sim_time="true")
    assert launch["explicit_overrides"](given) == {"device": "cuda", "target_frame": "base_link",
                                                   "use_depth": False, "use_sim_time": True}


@pytest.mark.parametrize("value", ["ture", "yes", "on", ""])
def test_a_boolean_launch_argument_that_is_no_boolean_stops_the_launch(value):
    """Read as "true or not", autostart:=ture left the node unconfigured without a word; "yes" is
    refused too, since IfCondition (sim_camera, rviz) refuses it."""
    launch = launch_module_without_launch_ros()
    defaults = {name: default for name, default, _ in launch["LAUNCH_ARGUMENTS"]}
    given = {name: defaults[name] for name in [*launch["NODE_PARAMETER_ARGUMENTS"], "autostart", "use_sim_time"]}
    given["autostart"] = value
    with pytest.raises(ValueError, match=f"launch argument autostart:={value!r} is not a boolean"):
        launch["explicit_overrides"](given)
    given.update(autostart="0", use_sim_time="1")  # what IfCondition accepts, the node accepts
    assert launch["explicit_overrides"](given) == {"autostart": False, "use_sim_time": True}


def test_launch_file_is_valid_python_and_uses_the_installed_executable():
    text = (ROOT / "launch" / "segmentation.launch.py").read_text()
    compile(text, "segmentation.launch.py", "exec")
    assert 'executable="segmentation_node"' in text and "LifecycleNode" in text
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert "scripts/segmentation_node" in cmake and "install(DIRECTORY launch config rviz" in cmake


def test_the_node_and_rviz_follow_use_sim_time_and_the_simulated_camera_does_not():
    """With a bag's /clock, RViz on wall time drops the bag's TF and markers. The simulated camera
    is a clock of its own: on sim time with no /clock it sent one frame in 12 s."""
    tree = ast.parse((ROOT / "launch" / "segmentation.launch.py").read_text())
    calls = {ast.unparse(next(k.value for k in n.keywords if k.arg in ("executable",))): n for n in ast.walk(tree)
             if isinstance(n, ast.Call) and getattr(n.func, "id", "") in ("Node", "LifecycleNode")}
    assert set(calls) == {"'segmentation_node'", "'sim_camera'", "'rviz2'"}
    params = {name: ast.unparse(next(k.value for k in call.keywords if k.arg == "parameters"))
              for name, call in calls.items()}
    assert "explicit_overrides" in params["'segmentation_node'"]  # use_sim_time among them
    assert "use_sim_time" in params["'rviz2'"] and "use_sim_time" not in params["'sim_camera'"]


def test_package_xml_is_format_3_and_names_what_we_import():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.attrib["format"] == "3" and root.findtext("name") == "qwen3vl_seg_ros"
    deps = {e.text for e in root if e.tag.endswith("depend")}
    for needed in ("rclpy", "sensor_msgs", "geometry_msgs", "std_msgs", "visualization_msgs", "diagnostic_msgs",
                   "lifecycle_msgs", "rosidl_default_generators", "rosidl_default_runtime", "tf2_ros_py", "cv_bridge",
                   "python3-pil", "python3-matplotlib", "python3-opencv", "python3-scipy", "ament_index_python",
                   "rcl_interfaces"):
        assert needed in deps, needed
    assert "tf2_ros" not in deps  # the C++ package: rosdep would not bring the Python module we import
    # `colcon test` runs the suite: the pytest test is registered, and its CMake helper declared
    assert "ament_cmake_pytest" in {e.text for e in root if e.tag == "test_depend"}
    assert "ament_add_pytest_test(" in (ROOT / "CMakeLists.txt").read_text()
    # pip-only packages live in requirements/robot.txt: rosdep lacks some keys (it stops on an
    # unknown key) and its -pip rules would put PyPI's CPU torch over a robot's CUDA build
    assert not [d for d in deps if d.endswith("-pip") or d == "python3-pycocotools"]
    assert root.find("export/build_type").text == "ament_cmake"
    assert root.find("member_of_group").text == "rosidl_interface_packages"


def test_setup_py_entry_points_exist():
    import importlib

    tree = ast.parse((ROOT / "setup.py").read_text())
    scripts = [ast.literal_eval(n) for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str) and " = qwen3vl_seg_ros." in n.value]
    assert scripts
    for spec in scripts:
        name, target = (s.strip() for s in spec.split("="))
        module, func = target.split(":")
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), spec
        if module.endswith(".node"):
            assert callable(getattr(importlib.import_module(module), func))


def test_readme_documents_every_parameter():
    readme = (ROOT / "README.md").read_text()
    for p in PARAMETERS:
        assert f"`{p.name}`" in readme, p.name
    assert markdown_table() in readme, "README parameter table is stale: regenerate it"


def test_robot_requirements_are_ranges_over_the_tested_pins():
    """requirements/robot.txt names every runtime dependency of base.txt (OpenCV comes from rosdep
    there), each as a range the tested pin satisfies, so a robot's Python 3.10 can resolve it."""
    from packaging.requirements import Requirement

    def read(name: str, python: str = "3.11") -> dict:
        lines = (ROOT / "requirements" / name).read_text().splitlines()
        reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
        return {r.name.lower(): r for r in reqs if r.marker is None or r.marker.evaluate({"python_version": python})}

    # Humble (Python 3.10): its apt OpenCV and cv_bridge need NumPy 1
    assert not read("robot.txt", "3.10")["numpy"].specifier.contains("2.0.0")
    base, robot = read("base.txt"), read("robot.txt")
    assert set(robot) == set(base) - {"opencv-python-headless"}
    for name, req in robot.items():
        pinned = next(iter(base[name].specifier)).version
        assert "==" not in str(req.specifier) and req.specifier.contains(pinned, prereleases=True), (name, pinned)

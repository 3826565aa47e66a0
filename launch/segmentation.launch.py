"""Start the qwen3vl_seg node (and optionally a simulated camera and RViz).

    ros2 launch qwen3vl_seg_ros segmentation.launch.py
    ros2 launch qwen3vl_seg_ros segmentation.launch.py sim_camera:=true rviz:=true target_frame:=world
    ros2 launch qwen3vl_seg_ros segmentation.launch.py \\
        model:=Qwen/Qwen3-VL-4B-Instruct device:=cuda dtype:=bf16 \\
        image:=/camera/camera/color/image_raw \\
        depth:=/camera/camera/aligned_depth_to_color/image_raw \\
        camera_info:=/camera/camera/color/camera_info target_frame:=base_link

Every launch argument is listed in LAUNCH_ARGUMENTS (name, default, description); those that
set a node parameter of the same name are in NODE_PARAMETER_ARGUMENTS. Such an argument is
passed to the node only when it differs from its default, so that a params_file's value is
not reset by a launch argument nobody gave. A test checks both lists against the node's
parameter table, and explicit_overrides itself, without needing launch_ros installed.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.parameter_descriptions import ParameterValue

from launch import LaunchDescription

LAUNCH_ARGUMENTS = [
    ("namespace", "", "Namespace of the node (and of the simulated camera)."),
    ("node_name", "qwen3vl_seg", "Name of the segmentation node (two nodes in one namespace need two names); "
                                 "also the namespace of its RViz markers."),
    ("params_file", "", "Parameters YAML (default: the package's config/params.yaml)."),
    ("segmenter", "qwen3vl_seg", "Segmenter: 'qwen3vl_seg' or 'package.module:ClassName'."),
    ("model", "", "Qwen3-VL(-Seg) hub id or local folder ('' = the shipped tiny demo model)."),
    ("decoder", "", "Mask decoder checkpoint folder ('' = inside the model folder, if any)."),
    ("device", "auto", "Torch device: auto, cpu, cuda, cuda:N."),
    ("dtype", "auto", "Weights dtype: auto, fp32, bf16, fp16."),
    ("mask_head", "auto", "Mask head: auto, decoder, grabcut, depth, box."),
    ("target_frame", "", "Frame of the 3D outputs ('' = the camera's optical frame)."),
    ("image_qos", "sensor_data", "QoS of the camera subscriptions: sensor_data, reliable, best_effort."),
    ("image", "image", "Colour image topic (sensor_msgs/Image)."),
    ("depth", "depth", "Depth image topic aligned to the colour image (16UC1 or mono16 mm, or 32FC1 m)."),
    ("camera_info", "camera_info", "CameraInfo topic of the colour image."),
    ("command", "command", "Command topic (std_msgs/String) for continuous mode."),
    ("use_depth", "true", "Subscribe to the depth topic and compute 3D outputs (false: 2D results only)."),
    ("autostart", "true", "Configure and activate the node at startup."),
    ("use_sim_time", "false", "Use /clock (bag playback or a simulator) for the time and TF lookups of the "
                              "node and RViz (not the simulated camera, which runs on its own clock)."),
    ("log_level", "info", "Log level of the node."),
    ("sim_camera", "false", "Also start the simulated RGB-D tabletop camera (demo)."),
    ("sim_rate_hz", "5.0", "Frame rate of the simulated camera."),
    ("sim_scene_period_s", "10.0", "Seconds between the simulated camera's scenes (0 = only on ~/next_scene)."),
    ("sim_depth_encoding", "32FC1", "Depth encoding of the simulated camera: 32FC1 (m) or 16UC1 (mm)."),
    ("rviz", "false", "Also start RViz with rviz/segmentation.rviz."),
    ("rviz_config", "", "RViz configuration file (default: the package's rviz/segmentation.rviz)."),
    ("rviz_fixed_frame", "world", "RViz fixed frame (e.g. base_link or the camera's optical frame on a robot)."),
]

# Launch arguments that set the node parameter of the same name.
NODE_PARAMETER_ARGUMENTS = ["segmenter", "model", "decoder", "device", "dtype", "mask_head",
                            "target_frame", "image_qos", "use_depth"]
# Arguments passed to the node as booleans (autostart and use_sim_time are not in the table).
BOOLEAN_ARGUMENTS = ["use_depth", "autostart", "use_sim_time"]


def launch_bool(name, value):
    """A boolean launch argument: true/false/1/0, any case, as IfCondition reads them.

    Why strict: read as "true or not", autostart:=ture left the node unconfigured and
    use_depth:=ture switched 3D off, without a word; and RViz's bool parameter refused "1",
    which the node accepted. A typo now stops the launch with the argument's name.
    """
    words = {"true": True, "1": True, "false": False, "0": False}
    text = value.strip().lower()
    if text not in words:
        raise ValueError(f"launch argument {name}:={value!r} is not a boolean: use true or false")
    return words[text]


def explicit_overrides(values):
    """The node parameters set by launch arguments given a value other than their default.

    Why: launch_ros applies a parameters dict after params_file, so passing every argument at
    its default would reset what a params file says (model, device, target_frame, ...).
    """
    defaults = {name: default for name, default, _ in LAUNCH_ARGUMENTS}
    out = {}
    for name in [*NODE_PARAMETER_ARGUMENTS, "autostart", "use_sim_time"]:
        value = values[name]
        if value.strip().lower() == defaults[name].lower():
            continue
        out[name] = launch_bool(name, value) if name in BOOLEAN_ARGUMENTS else value
    return out


def generate_launch_description():
    share = get_package_share_directory("qwen3vl_seg_ros")
    default_params = os.path.join(share, "config", "params.yaml")
    defaults = {"params_file": default_params, "rviz_config": os.path.join(share, "rviz", "segmentation.rviz")}
    declared = [DeclareLaunchArgument(name, default_value=defaults.get(name, default), description=text)
                for name, default, text in LAUNCH_ARGUMENTS]
    arg = LaunchConfiguration

    def segmentation_node(context):
        given = {name: LaunchConfiguration(name).perform(context)
                 for name in [*NODE_PARAMETER_ARGUMENTS, "autostart", "use_sim_time"]}
        return [LifecycleNode(
            package="qwen3vl_seg_ros",
            executable="segmentation_node",
            name=arg("node_name"),
            namespace=arg("namespace"),
            parameters=[arg("params_file"), explicit_overrides(given)],
            remappings=[
                ("image", arg("image")),
                ("depth", arg("depth")),
                ("camera_info", arg("camera_info")),
                ("command", arg("command")),
            ],
            arguments=["--ros-args", "--log-level", arg("log_level")],
            output="screen",
            emulate_tty=True,
        )]

    sim_camera = Node(
        package="qwen3vl_seg_ros",
        executable="sim_camera",
        name="sim_camera",
        namespace=arg("namespace"),
        parameters=[{
            "rate_hz": ParameterValue(arg("sim_rate_hz"), value_type=float),
            "scene_period_s": ParameterValue(arg("sim_scene_period_s"), value_type=float),
            "depth_encoding": ParameterValue(arg("sim_depth_encoding"), value_type=str),
        }],  # no use_sim_time: the simulated camera is a clock of its own (with no /clock it stalled)
        remappings=[
            ("image", arg("image")),
            ("depth", arg("depth")),
            ("camera_info", arg("camera_info")),
        ],
        condition=IfCondition(arg("sim_camera")),
        output="screen",
    )
    def rviz(context):
        sim_time = launch_bool("use_sim_time", LaunchConfiguration("use_sim_time").perform(context))
        return [Node(
            package="rviz2",
            executable="rviz2",
            arguments=["-d", arg("rviz_config"), "-f", arg("rviz_fixed_frame")],
            # a bag's TF and markers are stamped in its time: RViz on wall time would drop them
            parameters=[{"use_sim_time": sim_time}],
            condition=IfCondition(arg("rviz")),
            output="screen",
        )]

    return LaunchDescription([*declared, OpaqueFunction(function=segmentation_node), sim_camera,
                              OpaqueFunction(function=rviz)])

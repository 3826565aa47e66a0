"""The installed entry point with a params file, as `ros2 run` / the launch file start it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3vl_seg_ros.msg import SegmentationResult

from ros_harness import DOUBLE, Client, NodeHarness, Scene, new_context

pytestmark = pytest.mark.ros
ROOT = Path(__file__).resolve().parents[1]


def test_node_process_with_params_file_serves_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, "-m", "qwen3vl_seg_ros.ros.node", "--ros-args",
           "--params-file", str(ROOT / "config" / "params.yaml"),
           "-p", f"segmenter:={DOUBLE}", "-p", "max_input_age_s:=2.0", "-p", "score_treshold:=0.6",
           "-p", "qos_overrides./camera/color/image_raw.subscription.reliability:=reliable"]
    log_path = tmp_path / "node.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    context = new_context()
    client = Client(context)
    try:
        client.wait_connected(timeout=30.0)
        with client.streaming(Scene()):
            result = client.call("red", request_id="from-process").result
        assert result.status == SegmentationResult.OK, result.message
        assert result.request_id == "from-process" and result.objects[0].label == "red blob"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        client.close()
        context.try_shutdown()
    text = log_path.read_text()
    assert "ready: waiting for images and commands" in text, text
    assert "no such parameter, ignored: score_treshold" in text, text  # a misspelt name is said, not dropped
    assert "QoS overrides are not read by this node, ignored: qos_overrides./camera/color/image_raw" in text, text
    assert "threads still running" not in text, text  # every thread joined: no hard exit needed


def test_whole_numbers_for_decimal_parameters_are_accepted():
    """``max_rate_hz: 10`` in a params file is an integer to ROS; declaring the double parameter
    with it used to raise at start-up and end the process."""
    context = new_context("test_entry_integer_overrides")
    try:
        node = NodeHarness(context, {"max_rate_hz": 10, "max_input_age_s": 2}, autostart=False)
        try:
            values = (node.node.p("max_rate_hz"), node.node.p("max_input_age_s"))
            assert values == (10.0, 2.0) and all(isinstance(v, float) for v in values)
        finally:
            node.close()
    finally:
        context.try_shutdown()


@pytest.mark.parametrize("values, named", [
    (["max_rate_hz:=fast"], "max_rate_hz"),
    # checked at start-up as a runtime set checks them: these started and behaved otherwise
    (["image_qos:=Reliable"], "image_qos must be one of sensor_data, reliable, best_effort"),
    (["min_depth_m:=5.0", "max_depth_m:=1.0"], "min_depth_m (5) must be below max_depth_m (1)"),
])
def test_a_bad_parameter_value_ends_start_up_with_a_clear_message(values: list[str], named: str):
    cmd = [sys.executable, "-m", "qwen3vl_seg_ros.ros.node", "--ros-args", "-p", f"segmenter:={DOUBLE}"]
    for value in values:
        cmd += ["-p", value]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 2, done.stderr
    assert "bad parameter" in done.stderr and named in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_sim_camera_help_prints_usage_without_publishing():
    """`sim_camera --help` used to start the camera: a publisher on the user's /image and /tf_static."""
    done = subprocess.run([sys.executable, "-m", "qwen3vl_seg_ros.ros.sim_camera", "--help"],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: sim_camera") and "publishing" not in done.stdout + done.stderr


def test_help_lists_the_parameters_without_loading_anything():
    """`ros2 run qwen3vl_seg_ros segmentation_node --help` used to start loading the model."""
    done = subprocess.run([sys.executable, "-m", "qwen3vl_seg_ros.ros.node", "--help"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: segmentation_node") and "    max_rate_hz: 5.0" in done.stdout
    assert "configuring" not in done.stdout + done.stderr

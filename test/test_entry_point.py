"""The installed entry point with a params file, as `ros2 run` / the launch file start it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3vl_seg_ros.msg import SegmentationResult

from ros_harness import DOUBLE, Client, Scene, new_context

pytestmark = pytest.mark.ros
ROOT = Path(__file__).resolve().parents[1]


def test_node_process_with_params_file_serves_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, "-m", "qwen3vl_seg_ros.ros.node", "--ros-args",
           "--params-file", str(ROOT / "config" / "params.yaml"),
           "-p", f"segmenter:={DOUBLE}", "-p", "max_input_age_s:=2.0"]
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
    assert "threads still running" not in text, text  # every thread joined: no hard exit needed

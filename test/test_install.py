"""The package as `colcon build` installs it: CMake configure, build and install into a temporary
prefix, then the installed package is imported without the source tree.

Why: scripts/setup.sh builds only the interfaces (INSTALL_PYTHON_PACKAGE=OFF) and runs the Python
package from the checkout, so the install path a ROS user takes was never exercised, and it failed
at configure (a second ament_python_install_package for the same package, rosidl_python#141).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("msg", "srv", "CMakeLists.txt", "package.xml", "LICENSE", "qwen3vl_seg_ros", "scripts", "launch", "config",
           "rviz", "models")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("cmake") is None or not os.environ.get("VIRTUAL_ENV"):
        pytest.skip("needs cmake and the environment of scripts/setup.sh (source env.sh)")
    base = tmp_path_factory.mktemp("install")
    src, build, prefix = base / "src", base / "build", base / "install"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy(path, src / name)
    venv = os.environ["VIRTUAL_ENV"]
    steps = [
        ["cmake", "-S", str(src), "-B", str(build), f"-DCMAKE_INSTALL_PREFIX={prefix}",
         f"-DCMAKE_PREFIX_PATH={venv};{ROOT / '.ros' / 'install'}", f"-DPython3_EXECUTABLE={sys.executable}",
         "-DINSTALL_PYTHON_PACKAGE=ON", "-DBUILD_TESTING=OFF"],
        ["cmake", "--build", str(build), "-j", "2"],
        ["cmake", "--install", str(build)],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{' '.join(step[:2])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return prefix


def test_install_holds_what_the_launch_file_and_the_node_load(installed: Path) -> None:
    share = installed / "share" / "qwen3vl_seg_ros"
    for path in ("launch/segmentation.launch.py", "config/params.yaml", "rviz/segmentation.rviz",
                 "models/tiny_qwen3vl_seg/config.json", "models/tiny_qwen3vl_seg/model.safetensors", "LICENSE",
                 "package.xml"):
        assert (share / path).is_file(), path
    for exe in ("segmentation_node", "sim_camera", "demo", "example_client"):
        assert os.access(installed / "lib" / "qwen3vl_seg_ros" / exe, os.X_OK), exe


def test_installed_package_imports_and_finds_its_model_without_the_source_tree(installed: Path) -> None:
    site = next(installed.glob("lib/python3*/site-packages"))
    code = ("import qwen3vl_seg_ros, qwen3vl_seg_ros.ros.node\n"
            "from qwen3vl_seg_ros.msg import SegmentationResult\n"
            "from qwen3vl_seg_ros.model.loading import default_model_folder\n"
            "print(qwen3vl_seg_ros.__file__)\nprint(default_model_folder())\n")
    env = dict(os.environ, PYTHONPATH=str(site),
               AMENT_PREFIX_PATH=f"{installed}{os.pathsep}{os.environ.get('AMENT_PREFIX_PATH', '')}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=env, cwd=installed)
    assert done.returncode == 0, done.stderr[-3000:]
    package_file, model = done.stdout.split()
    assert Path(package_file).is_relative_to(site)  # the installed copy, not the checkout
    assert Path(model).is_relative_to(installed / "share" / "qwen3vl_seg_ros")

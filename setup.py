"""Python packaging of qwen3vl_seg_ros.

On a ROS 2 install, colcon builds the package through CMakeLists.txt (ament_cmake: messages plus
this Python package). This setup.py serves pip: the development environment of scripts/setup.sh
installs the package from source with it, which also creates the console scripts below.
"""

from setuptools import find_packages, setup

setup(
    name="qwen3vl_seg_ros",
    version="0.1.0",
    description="Language-conditioned instance segmentation with 3D outputs for ROS 2 (Qwen3-VL-Seg)",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["qwen3vl_seg_ros", "qwen3vl_seg_ros.*"]),
    package_data={"qwen3vl_seg_ros": ["py.typed"]},
    entry_points={
        "console_scripts": [
            "segmentation_node = qwen3vl_seg_ros.ros.node:main",
            "sim_camera = qwen3vl_seg_ros.ros.sim_camera:main",
            "qwen3vl_seg_demo = qwen3vl_seg_ros.ros.demo:main",
            "qwen3vl_seg_client = qwen3vl_seg_ros.ros.example_client:main",
        ],
    },
)

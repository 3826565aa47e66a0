"""qwen3vl_seg_ros: language-conditioned instance segmentation with 3D outputs for ROS 2.

The package is split in two:

* a ROS-free core (``types``, ``segmenter``, ``grounding``, ``masks``, ``geometry``, ``model``,
  ``training``) usable from any Python program, and
* a thin ROS 2 layer in ``qwen3vl_seg_ros.ros`` (the only place that imports ``rclpy``).

The generated message modules ``qwen3vl_seg_ros.msg`` and ``qwen3vl_seg_ros.srv`` are installed
by the interface build into another ``site-packages`` folder; extending ``__path__`` lets them be
found next to the source tree during development (on a colcon install both live in one folder).
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"

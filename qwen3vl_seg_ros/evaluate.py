"""``python -m qwen3vl_seg_ros.evaluate --model FOLDER``: see :mod:`qwen3vl_seg_ros.training.evaluate`."""

from qwen3vl_seg_ros.training.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())

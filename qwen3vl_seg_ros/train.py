"""``python -m qwen3vl_seg_ros.train CONFIG.yaml --out RUN_DIR``: see :mod:`qwen3vl_seg_ros.training.train`."""

from qwen3vl_seg_ros.training.train import main

if __name__ == "__main__":
    raise SystemExit(main())

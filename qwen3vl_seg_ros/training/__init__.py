"""Training data, training and evaluation of Qwen3-VL-Seg (ROS-free; the data modules need no torch).

* :mod:`.synthetic`: tabletop RGB-D scenes with exact depth and masks, and their queries
  (``generate_sample(seed, cfg)``); command line to write them as a dataset.
* :mod:`.render`: the analytic ray caster behind the scenes (primitives, shading, textures).
* :mod:`.expressions`: referring expressions with ground-truth targets, and the fixed
  ``VOCABULARY`` the task tokenizer is built from.
* :mod:`.coco`: COCO-style referring-segmentation files (RefCOCO / SA-1B-derived): reader, writer.
* :mod:`.metrics`: gIoU, cIoU, precision@IoU, box accuracy with Hungarian matching, no-target
  accuracy, per query type.
* :mod:`.collate`, :mod:`.dataset`, :mod:`.losses`, :mod:`.model_builder`, :mod:`.train`: the
  staged training recipe (``python -m qwen3vl_seg_ros.train``, see docs/training.md).
* :mod:`.evaluate`: held-out evaluation through the production segmenter
  (``python -m qwen3vl_seg_ros.evaluate``).
"""

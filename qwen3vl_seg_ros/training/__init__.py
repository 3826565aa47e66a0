"""Training data and evaluation for the small Qwen3-VL-Seg model (ROS-free, no torch needed here).

* :mod:`.synthetic`: tabletop RGB-D scenes with exact depth and masks, and their queries
  (``generate_sample(seed, cfg)``); command line to write them as a dataset.
* :mod:`.render`: the analytic ray caster behind the scenes (primitives, shading, textures).
* :mod:`.expressions`: referring expressions with ground-truth targets, and the fixed
  ``VOCABULARY`` the task tokenizer is built from.
* :mod:`.coco`: COCO-style referring-segmentation files (RefCOCO / SA-1B-derived): reader, writer.
* :mod:`.metrics`: gIoU, cIoU, precision@IoU, box accuracy with Hungarian matching, no-target
  accuracy, per query type.
"""

"""The segmenter interface: what the node needs from a model, and how one is chosen.

The node only ever talks to a :class:`Segmenter`. The real one is
:class:`qwen3vl_seg_ros.model.segmenter.Qwen3VLSeg`; others (a test double, an integrator's own
model) are chosen by the ``segmenter`` parameter as ``"package.module:ClassName"``. Such a class
must subclass :class:`Segmenter` and provide ``from_options``. The import path comes only from
the node's parameters (set by whoever launches the node), never from a topic or service.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from qwen3vl_seg_ros.types import SegmentationOutput, SegmenterError

#: Name of the built-in Qwen3-VL-Seg segmenter in the ``segmenter`` parameter.
QWEN3VL_SEG = "qwen3vl_seg"


@dataclass
class SegmenterOptions:
    """Everything a segmenter may need to load; filled from the node's parameters."""

    model: str = ""  # hub id or local folder of a Qwen3-VL(-Seg) checkpoint; "" = shipped tiny model
    decoder: str = ""  # folder of a mask decoder checkpoint; "" = the one inside `model`, if any
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    dtype: str = "auto"  # "auto", "fp32", "bf16", "fp16"
    mask_head: str = "auto"  # "auto", "decoder", "grabcut", "depth", "box"
    local_files_only: bool = True  # never reach the network unless asked to
    max_new_tokens: int = 256
    max_objects: int = 50  # the first N objects of the answer are kept; 0 = all (the node cuts by score itself)
    box_refine_passes: int = 1  # more decoder runs, each on its previous mask's box (which becomes the box)
    fast_decode: bool = True  # static KV cache + CUDA graphs on GPU
    coordinate_window: int = -1  # choose a number token by its +-N-unit window's probability; -1 = plain greedy
    compile_cache_dir: str = ""  # persistent compilation cache ("" = default location)
    image_max_pixels: int = 0  # processor resize limit; 0 = the checkpoint's default
    num_threads: int = 0  # CPU threads for the model (torch.set_num_threads); 0 = torch's default
    calibrate_scores: bool = True  # use the model folder's score_calibration.json where it applies


#: Receives loading and warm-up steps, one line each; the node logs them, a line that starts
#: with "warning: " as a warning.
ProgressFn = Callable[[str], None]


class Segmenter(ABC):
    """Finds the objects a command describes in one RGB image.

    Implementations must be safe to call from one worker thread at a time (the node never calls
    ``segment`` concurrently) and must raise :class:`SegmenterError` with a human-readable
    reason for failures they can explain; any other exception is reported as an internal error.
    """

    #: Short name reported in results.
    name: str = "segmenter"

    @classmethod
    def from_options(cls, options: SegmenterOptions, progress: ProgressFn | None = None) -> Segmenter:
        """Builds the segmenter from node parameters; ``progress`` receives log lines."""
        raise NotImplementedError(f"{cls.__name__} does not implement from_options")

    def warmup(self, progress: ProgressFn | None = None,  # noqa: B027 - optional hook
               image_size: tuple[int, int] | None = None) -> None:
        """Runs the slow first-call work (allocation, compilation) before the first command.

        ``image_size`` is ``(width, height)`` of the frames to expect: the node calls this again
        for each new camera resolution, on its inference thread, before serving such frames.
        """

    @abstractmethod
    def segment(self, rgb: np.ndarray, command: str, depth: np.ndarray | None = None) -> SegmentationOutput:
        """Segments what ``command`` describes in ``rgb`` (HxWx3 uint8 RGB).

        ``depth`` (HxW float32 metres, NaN = no reading), when given, is aligned to ``rgb`` and
        may be used by depth-aware mask heads.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases memory (GPU included); the object is not used afterwards."""


def load_segmenter_class(spec: str) -> type[Segmenter]:
    """Resolves the ``segmenter`` parameter to a class.

    ``"qwen3vl_seg"`` is the built-in model; anything else must be ``"module.path:ClassName"``.
    """
    spec = spec.strip()
    if spec in ("", QWEN3VL_SEG):
        from qwen3vl_seg_ros.model.segmenter import Qwen3VLSeg

        return Qwen3VLSeg
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise SegmenterError(
            f"segmenter '{spec}' is neither '{QWEN3VL_SEG}' nor of the form 'package.module:ClassName'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SegmenterError(f"segmenter module '{module_name}' cannot be imported: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Segmenter)):
        raise SegmenterError(f"'{spec}' is not a subclass of qwen3vl_seg_ros.segmenter.Segmenter")
    return cls


def create_segmenter(spec: str, options: SegmenterOptions, progress: ProgressFn | None = None) -> Segmenter:
    """Builds the segmenter named by ``spec`` (see :func:`load_segmenter_class`)."""
    segmenter = load_segmenter_class(spec).from_options(options, progress)
    if not isinstance(segmenter, Segmenter):  # an integrator's from_options without its return
        raise SegmenterError(f"'{spec}'.from_options returned {type(segmenter).__name__}, not a Segmenter")
    return segmenter

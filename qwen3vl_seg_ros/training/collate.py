"""Turning referring samples into padded training batches, exactly as inference feeds the model.

Inference (:class:`~qwen3vl_seg_ros.model.segmenter.Qwen3VLSeg`) builds the prompt with
:func:`~qwen3vl_seg_ros.grounding.build_prompt` and the processor's chat template, runs the
processor on one image, and the model then writes the answer token by token. Training feeds the
same prompt tokens followed by the target answer of
:func:`~qwen3vl_seg_ros.grounding.format_answer` (boxes, labels and one ``<|seg|>`` per object)
and ``<|im_end|>``; the loss covers the answer tokens only. The decoder's query of each object is
the hidden state at its ``<|seg|>`` position, the same token inference picks.

Work done here, in data-loader workers, so that the training process only launches kernels:

* each distinct image of a batch once (the queries of one scene share it): its patches, its
  decoder image; ``image_index`` maps samples to images, and the trainer runs the vision tower
  once per distinct image;

* the prompt ids: the chat template's text with the image placeholder expanded to the image's
  token count, tokenized (what the processor does; a test checks the ids are equal);
* the multimodal rotary positions (what the model's ``get_rope_index`` computes; checked at the
  first training step and in a test);
* the image patches, sent as ``uint8`` (one temporal copy) instead of the processor's float32
  ``pixel_values`` with the frame duplicated for the temporal patch: 8x less shared memory
  between workers and the trainer; :func:`pixel_values_from_patches` rebuilds the exact floats.

Padding is on the right: positions of real tokens are then those of the unpadded sequence, as at
inference (batch of one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import cv2
import numpy as np
import torch
from PIL import Image

from qwen3vl_seg_ros.grounding import SEG_TOKEN, boxes_to_relative, build_prompt, format_answer
from qwen3vl_seg_ros.model.mask_decoder import decoder_image_uint8
from qwen3vl_seg_ros.types import CameraIntrinsics

#: Text appended to every answer: the token at which generation stops.
END_OF_ANSWER = "<|im_end|>"
IGNORE_INDEX = -100


@dataclass
class RefExample:
    """One training sample: an image, a command and its K targets (K = 0: nothing matches).

    Samples with the same ``image_key`` in one batch share the image, which is then processed
    once (several queries per rendered scene amortise the rendering and the image processor).
    """

    rgb: np.ndarray  # (H, W, 3) uint8
    expression: str
    query_type: str
    boxes: np.ndarray  # (K, 4) float32 pixels, exclusive right/bottom
    masks: np.ndarray  # (K, H, W) bool
    labels: list[str]
    image_key: object = None
    depth: np.ndarray | None = None  # (H, W) float32 metres, NaN = none; evaluation's depth head only
    intrinsics: CameraIntrinsics | None = None  # of the camera that took ``rgb``, when known
    # every object of the image, for the attribute loss: instance ids (H, W), 0 = none, and the
    # label of id k at index k - 1 ("blue mug"); None when unknown (COCO-style data)
    instances: tuple[np.ndarray, list[str]] | None = None


@dataclass
class Batch:
    """A padded batch; tensors only, so that the data loader can pin and move it."""

    input_ids: torch.Tensor  # (B, L) int64, right-padded
    attention_mask: torch.Tensor  # (B, L) int64
    position_ids: torch.Tensor  # (4, B, L) int64: text positions, then the 3 M-RoPE rows
    labels: torch.Tensor  # (B, L) int64: the token at each answer position, IGNORE_INDEX elsewhere
    lm_rows: torch.Tensor  # (M,) int64: sample of each position whose next token is an answer token
    lm_cols: torch.Tensor  # (M,) int64: that position (its hidden state predicts the answer token)
    patches: torch.Tensor  # (P, 3, ps, ps) uint8: the patches of each distinct image, block-major like the processor's
    image_grid_thw: torch.Tensor  # (U, 3) int64: grid of each distinct image
    image_index: torch.Tensor  # (B,) int64: the distinct image of each sample
    decoder_images: torch.Tensor  # (U, 3, h, w) uint8: the raw images as the decoder's CNN stem sees them
    object_boxes: torch.Tensor  # (N, 4) float32 normalised xyxy given to the decoder (jittered)
    object_batch: torch.Tensor  # (N,) int64: sample of each object
    object_seg_positions: torch.Tensor  # (N,) int64: sequence position of each object's <|seg|>
    object_masks: torch.Tensor  # (N, h, w) uint8: ground truth at the decoder image's size
    num_targets: torch.Tensor  # (B,) int64
    query_types: list[str] = field(default_factory=list)
    object_counts: list[int] = field(default_factory=list)  # objects per sample, on the host (no device sync)
    # (T, G) int64: per merged visual token of each distinct image (raster order, images in
    # order), the class in each attribute group of the object covering it; -1 = none or unknown
    token_attributes: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 0), dtype=torch.long))
    # (U, T) int64: per distinct image and merged visual token, the instance id (1..) of the object
    # covering most of it, if a tenth or more (token_objects), 0 = none, -1 = unknown (no instance map)
    token_objects: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 0), dtype=torch.long))
    # (N,) int64: each object's instance id in its image's map (0 = unknown)
    object_instances: torch.Tensor = field(default_factory=lambda: torch.zeros((0,), dtype=torch.long))

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    def _map(self, fn: object) -> Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})  # type: ignore[operator]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by the data loader's pinning thread (``pin_memory=True``)."""
        return self._map(lambda t: t.pin_memory())


def concat_batches(batches: Sequence[Batch], pad_id: int) -> Batch:
    """Joins micro-batches (from different loader workers) into one step's batch."""
    if len(batches) == 1:
        return batches[0]
    length = max(b.input_ids.shape[1] for b in batches)

    def pad(t: torch.Tensor, value: int, dim: int = -1) -> torch.Tensor:
        extra = length - t.shape[dim]
        if extra == 0:
            return t
        shape = list(t.shape)
        shape[dim] = extra
        return torch.cat([t, t.new_full(shape, value)], dim=dim)

    offsets = np.cumsum([0] + [b.size for b in batches[:-1]])
    image_offsets = np.cumsum([0] + [int(b.image_grid_thw.shape[0]) for b in batches[:-1]])
    position_ids = torch.cat([pad(b.position_ids, 0) for b in batches], dim=1)
    position_ids[0] = torch.arange(length, device=position_ids.device)  # the text row counts on through padding
    return Batch(
        input_ids=torch.cat([pad(b.input_ids, pad_id) for b in batches]),
        attention_mask=torch.cat([pad(b.attention_mask, 0) for b in batches]),
        position_ids=position_ids,
        labels=torch.cat([pad(b.labels, IGNORE_INDEX) for b in batches]),
        lm_rows=torch.cat([b.lm_rows + int(o) for b, o in zip(batches, offsets)]),
        lm_cols=torch.cat([b.lm_cols for b in batches]),
        patches=torch.cat([b.patches for b in batches]),
        image_grid_thw=torch.cat([b.image_grid_thw for b in batches]),
        image_index=torch.cat([b.image_index + int(o) for b, o in zip(batches, image_offsets)]),
        decoder_images=torch.cat([b.decoder_images for b in batches]),
        object_boxes=torch.cat([b.object_boxes for b in batches]),
        object_batch=torch.cat([b.object_batch + int(o) for b, o in zip(batches, offsets)]),
        object_seg_positions=torch.cat([b.object_seg_positions for b in batches]),
        object_masks=torch.cat([b.object_masks for b in batches]),
        num_targets=torch.cat([b.num_targets for b in batches]),
        query_types=[q for b in batches for q in b.query_types],
        object_counts=[c for b in batches for c in b.object_counts],
        token_attributes=torch.cat([b.token_attributes for b in batches]),
        token_objects=torch.cat([b.token_objects for b in batches]),
        object_instances=torch.cat([b.object_instances for b in batches]),
    )


# ---------------------------------------------------------------------------------------------
# answers


def answer_order(boxes: np.ndarray) -> np.ndarray:
    """Order of the objects in a target answer: left to right, then top to bottom.

    One fixed, visible rule makes the order learnable (the metrics match objects one to one,
    so the order itself is never scored).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.lexsort((boxes[:, 1], boxes[:, 0]))


def target_answer(boxes: np.ndarray, labels: Sequence[str], width: int, height: int,
                  label_first: bool = False) -> tuple[str, np.ndarray]:
    """The answer text a sample is trained to give, and the order of its objects in it."""
    order = answer_order(boxes)
    rel = boxes_to_relative(np.asarray(boxes)[order], width, height) if len(order) else np.zeros((0, 4), np.int64)
    objects = [{"bbox_2d": [int(v) for v in r], "label": labels[i]} for r, i in zip(rel, order)]
    return format_answer(objects, mask_token=True, label_first=label_first), order


def jitter_boxes(rel: np.ndarray, rng: np.random.Generator, scale: float | Sequence[float]) -> np.ndarray:
    """Moves each edge of 0..1000 boxes by a normal step of ``scale`` times the box side.

    Predicted boxes are never exact; a decoder trained on perturbed boxes relies on the image
    for the edges instead of copying the box. With several scales each box draws one of them:
    a small model's boxes are sometimes close and sometimes far off, and the decoder (run again
    on its own mask's box at inference) must both keep a good box and pull in a poor one.
    """
    rel = np.asarray(rel, dtype=np.float64).reshape(-1, 4)
    scales = np.atleast_1d(np.asarray(scale, dtype=np.float64))
    if scales.max(initial=0.0) <= 0 or rel.size == 0:
        return rel
    side = np.concatenate([rel[:, 2:] - rel[:, :2]] * 2, axis=1)
    sigma = scales[0] if len(scales) == 1 else rng.choice(scales, size=(len(rel), 1))
    moved = rel + rng.normal(0.0, 1.0, rel.shape) * sigma * np.maximum(side, 1.0)
    moved = np.clip(moved, 0.0, 1000.0)
    x1, y1 = np.minimum(moved[:, 0], moved[:, 2]), np.minimum(moved[:, 1], moved[:, 3])
    x2, y2 = np.maximum(moved[:, 0], moved[:, 2]), np.maximum(moved[:, 1], moved[:, 3])
    out = np.stack([x1, y1, np.maximum(x2, x1 + 1.0), np.maximum(y2, y1 + 1.0)], axis=1)
    return np.clip(out, 0.0, 1000.0)


def box_jitter_scales(value: float | Sequence[float]) -> tuple[float, ...]:
    """``data.box_jitter`` as a tuple of scales, refusing what cannot be one."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        scales = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise ValueError(f"data.box_jitter must be a number or a list of numbers, got {value!r}") from None
    if not scales or any(not np.isfinite(v) or v < 0 for v in scales):
        raise ValueError(f"data.box_jitter must hold numbers >= 0, got {value!r}")
    return scales


# ---------------------------------------------------------------------------------------------
# per visual token: what object is there


def token_attributes(instance_ids: np.ndarray, labels: Sequence[str], grid_hw: tuple[int, int],
                     groups: Sequence[Sequence[str]], min_cover: float = 0.25) -> np.ndarray:
    """``(h * w, G)``: per merged visual token (raster order), each group's class of its object.

    A token's object is the instance covering most of its share of the image, if it covers at
    least ``min_cover`` of it; the class in group ``g`` is the index in ``groups[g]`` of the
    word of the object's label found there ("blue mug" -> "blue" among the colours). -1 where
    no object covers the token or its label has no word of the group. The instance map is
    resampled to 8x8 cells per token (nearest), enough to tell a quarter's coverage.
    """
    h, w = grid_hw
    out = np.full((h * w, len(groups)), -1, dtype=np.int64)
    if not len(labels) or not len(groups):
        return out
    owner = token_objects(instance_ids, len(labels), grid_hw, min_cover)
    classes = np.array([[next((i for i, word in enumerate(group) if word in label.split()), -1) for group in groups]
                        for label in labels], dtype=np.int64)  # (N, G)
    covered = owner > 0
    out[covered] = classes[owner[covered] - 1]
    return out


def token_objects(instance_ids: np.ndarray, objects: int, grid_hw: tuple[int, int],
                  min_cover: float = 0.1) -> np.ndarray:
    """``(h * w,)``: per merged visual token (raster order), the instance id (1..``objects``) of the
    object covering most of it, if it covers at least ``min_cover`` of it, 0 where none does.

    A tenth by default, where :func:`token_attributes` asks a quarter: at 256x192 (48 tokens) a
    quarter leaves 28 % of the objects without a token, a tenth 7 % (100 val scenes). The
    instance map is resampled to 8x8 cells per token (nearest), enough to tell such shares.
    """
    h, w = grid_hw
    if objects == 0:
        return np.zeros(h * w, dtype=np.int64)
    cells = cv2.resize(np.asarray(instance_ids, np.uint8), (w * 8, h * 8), interpolation=cv2.INTER_NEAREST)
    blocks = cells.reshape(h, 8, w, 8).transpose(0, 2, 1, 3).reshape(h * w, 64)
    counts = np.stack([(blocks == k).sum(1) for k in range(1, objects + 1)], axis=1)  # (T, N)
    best = counts.argmax(1)
    covered = counts[np.arange(len(best)), best] >= min_cover * 64
    return np.where(covered, best + 1, 0).astype(np.int64)


def instance_of(instance_ids: np.ndarray, mask: np.ndarray) -> int:
    """The instance id most of ``mask`` lies on (0 when the mask is empty or on no instance)."""
    under = np.asarray(instance_ids)[np.asarray(mask, bool)]
    under = under[under > 0]
    return int(np.bincount(under).argmax()) if under.size else 0


def token_places(classes: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """``classes`` (``(..., h * w, G)``, as :func:`token_attributes` gives them) plus two groups: each
    token's row and column, on tokens that lie on an object (class of group 0 set), else -1.

    Why: the language model learns where an object is from its token's value (the rotary
    positions only steer which tokens it reads), and the tiny model's tokens on objects hold
    little of it (docs/training.md, "Where the language model looks"). The probes label it so.
    """
    h, w = grid_hw
    rows, cols = np.divmod(np.arange(h * w), w)
    on = classes[..., 0] >= 0
    place = np.stack([np.where(on, rows, -1), np.where(on, cols, -1)], axis=-1)
    return np.concatenate([classes, place.astype(classes.dtype)], axis=-1)


# ---------------------------------------------------------------------------------------------
# images


def resize_masks(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(K, H, W)`` bool masks at another size (area-weighted, then > 0.5), as uint8."""
    masks = np.asarray(masks)
    if masks.shape[1:] == (height, width):
        return masks.astype(np.uint8)
    out = np.zeros((len(masks), height, width), np.uint8)
    for k, m in enumerate(masks):
        out[k] = cv2.resize(m.astype(np.float32), (width, height), interpolation=cv2.INTER_AREA) > 0.5
    return out


@dataclass(frozen=True)
class PatchFormat:
    """What the processor's image processor does after resizing: scale, normalise, patchify."""

    patch_size: int
    temporal_patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float

    @classmethod
    def of(cls, image_processor: object) -> PatchFormat:
        mean = getattr(image_processor, "image_mean", (0.5, 0.5, 0.5))
        std = getattr(image_processor, "image_std", (0.5, 0.5, 0.5))
        return cls(
            patch_size=int(image_processor.patch_size),
            temporal_patch_size=int(image_processor.temporal_patch_size),
            mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
            std=tuple(float(v) for v in std),  # type: ignore[arg-type]
            rescale=float(getattr(image_processor, "rescale_factor", 1 / 255)),
        )


def patches_to_uint8(pixel_values: torch.Tensor, fmt: PatchFormat) -> torch.Tensor:
    """The processor's ``pixel_values`` ``(P, 3*T*ps*ps)`` back to ``uint8`` ``(P, 3, ps, ps)``.

    Raises ``ValueError`` when that would lose information (temporal copies that differ, or
    values that are not rescaled 8-bit pixels), so that no silent approximation enters training.
    """
    ps, t = fmt.patch_size, fmt.temporal_patch_size
    x = pixel_values.float().reshape(-1, 3, t, ps, ps)
    if t > 1 and not torch.equal(x[:, :, :1].expand_as(x), x):
        raise ValueError("the temporal copies of an image patch differ; cannot send patches as uint8")
    mean = torch.tensor(fmt.mean).view(1, 3, 1, 1)
    std = torch.tensor(fmt.std).view(1, 3, 1, 1)
    pixels = (x[:, :, 0] * std + mean) / fmt.rescale
    rounded = pixels.round()
    if (rounded - pixels).abs().max() > 1e-2 or rounded.min() < 0 or rounded.max() > 255:
        raise ValueError("pixel_values are not rescaled 8-bit pixels; cannot send patches as uint8")
    return rounded.to(torch.uint8)


def pixel_values_from_patches(patches: torch.Tensor, fmt: PatchFormat) -> torch.Tensor:
    """Inverse of :func:`patches_to_uint8` on any device: ``(P, 3*T*ps*ps)`` float32."""
    mean = torch.tensor(fmt.mean, device=patches.device).view(1, 3, 1, 1)
    std = torch.tensor(fmt.std, device=patches.device).view(1, 3, 1, 1)
    x = (patches.float() * fmt.rescale - mean) / std
    x = x[:, :, None].expand(-1, -1, fmt.temporal_patch_size, -1, -1)
    return x.reshape(patches.shape[0], -1)


def mrope_positions(input_ids: np.ndarray, image_token_id: int, grid_thw: Sequence[int], merge: int) -> np.ndarray:
    """Qwen3-VL's 3-D rotary positions ``(3, L)`` of one unpadded sequence with one image.

    Text tokens count up on all three rows; the image's merged tokens get (t, row, column)
    offsets from the position where the image starts, and the text after it resumes at that
    position plus the larger side of the merged grid (``get_rope_index`` of the model).
    """
    ids = np.asarray(input_ids)
    is_image = ids == image_token_id
    gh, gw = int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    if int(is_image.sum()) != int(grid_thw[0]) * gh * gw:
        raise ValueError(f"{int(is_image.sum())} image tokens for a grid of {list(grid_thw)}")
    out = np.zeros((3, len(ids)), dtype=np.int64)
    starts = np.flatnonzero(is_image)
    if starts.size == 0:
        out[:] = np.arange(len(ids))
        return out
    first, last = int(starts[0]), int(starts[-1]) + 1
    if last - first != starts.size:
        raise ValueError("the image tokens of a sequence must be contiguous")
    out[:, :first] = np.arange(first)
    rows, cols = np.divmod(np.arange(gh * gw), gw)
    out[0, first:last] = first
    out[1, first:last] = first + rows
    out[2, first:last] = first + cols
    resume = first + max(gh, gw)
    out[:, last:] = resume + np.arange(len(ids) - last)
    return out


# ---------------------------------------------------------------------------------------------
# collation


class Collator:
    """Builds :class:`Batch` es from :class:`RefExample` s with a Qwen3-VL processor.

    ``max_image_side`` is the decoder's (``MaskDecoderConfig.max_image_side``); ``box_jitter``
    the relative edge noise of the decoder's input boxes (0 = the exact ground-truth boxes), or
    several such scales, one drawn per box. ``attribute_groups`` (such as the colour words and
    the shape words) give each visual token its object's classes (:func:`token_attributes`)
    for the attribute loss; empty, the batch carries none. ``label_first`` trains answers that name
    each object before its box (``data.answer_format``).
    """

    def __init__(self, processor: object, max_image_side: int, box_jitter: float | Sequence[float] = 0.0,
                 attribute_groups: Sequence[Sequence[str]] = (), label_first: bool = False) -> None:
        self.processor = processor
        self.label_first = bool(label_first)
        self.attribute_groups = tuple(tuple(g) for g in attribute_groups)
        self.tokenizer = processor.tokenizer  # type: ignore[attr-defined]
        self.image_processor = processor.image_processor  # type: ignore[attr-defined]
        self.max_image_side = int(max_image_side)
        self.box_jitter = box_jitter_scales(box_jitter)
        self.merge = int(getattr(self.image_processor, "merge_size", 2))
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")
        ids = self.tokenizer.convert_tokens_to_ids
        self.image_token_id = int(ids(self.image_token))
        self.seg_token_id = int(ids(SEG_TOKEN))
        if self.seg_token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {SEG_TOKEN} token; add it before training")
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                          else ids("<|endoftext|>"))
        self.patch_format = PatchFormat.of(self.image_processor)

    # -- per sample ------------------------------------------------------------------------

    def prompt_text(self, expression: str) -> str:
        """The chat-formatted prompt, exactly as ``Qwen3VLSeg`` builds it."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                     "text": build_prompt(expression)[0]}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]

    def image_inputs(self, rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(patches uint8 (P, 3, ps, ps), grid_thw (3,))`` of one image, via the image processor."""
        out = self.image_processor(images=[Image.fromarray(rgb)], return_tensors="pt")
        return patches_to_uint8(out["pixel_values"], self.patch_format), out["image_grid_thw"][0]

    def prompt_ids(self, prompt: str, grid_thw: torch.Tensor) -> list[int]:
        """Prompt token ids with the image placeholder expanded (the processor's own rule)."""
        count = int(grid_thw.prod()) // (self.merge ** 2)
        text = prompt.replace(self.image_token, self.image_token * count)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def answer_ids(self, answer: str) -> list[int]:
        return list(self.tokenizer(answer + END_OF_ANSWER, add_special_tokens=False)["input_ids"])

    # -- batch ----------------------------------------------------------------------------

    def __call__(self, examples: Sequence[RefExample], rng: np.random.Generator | None = None) -> Batch:
        rng = rng or np.random.default_rng(0)
        images: dict[object, int] = {}
        patches, grids, dec_images, image_index, attributes, objects_map = [], [], [], [], [], []
        instances = []
        sequences, positions, label_rows = [], [], []
        boxes, owners, seg_positions, masks, counts = [], [], [], [], []
        for b, ex in enumerate(examples):
            key = ex.image_key if ex.image_key is not None else ("sample", b)
            if key not in images:
                images[key] = len(images)
                sample_patches, grid = self.image_inputs(ex.rgb)
                patches.append(sample_patches)
                grids.append(grid)
                dec_images.append(decoder_image_uint8(ex.rgb, self.max_image_side))
                attributes.append(self.image_attributes(ex, grid))
                objects_map.append(self.image_objects(ex, grid))
            u = images[key]
            image_index.append(u)
            grid, dec_image = grids[u], dec_images[u]
            height, width = ex.rgb.shape[:2]
            prompt = self.prompt_ids(self.prompt_text(ex.expression), grid)
            answer, order = target_answer(ex.boxes, ex.labels, width, height, self.label_first)
            answer_ids = self.answer_ids(answer)
            ids = prompt + answer_ids
            seg = [len(prompt) + i for i, t in enumerate(answer_ids) if t == self.seg_token_id]
            if len(seg) != len(order):
                raise ValueError(f"answer {answer!r} has {len(seg)} {SEG_TOKEN} tokens for {len(order)} objects")
            sequences.append(ids)
            positions.append(mrope_positions(np.array(ids), self.image_token_id, grid.tolist(), self.merge))
            label_rows.append([IGNORE_INDEX] * len(prompt) + answer_ids)
            if len(order):
                rel = boxes_to_relative(np.asarray(ex.boxes)[order], width, height)
                boxes.append(jitter_boxes(rel, rng, self.box_jitter) / 1000.0)
                owners.extend([b] * len(order))
                seg_positions.extend(seg)
                masks.append(resize_masks(np.asarray(ex.masks)[order], *dec_image.shape[1:]))
                instances.extend(0 if ex.instances is None else instance_of(ex.instances[0], np.asarray(ex.masks)[k])
                                 for k in order)
            counts.append(len(order))
        if len({d.shape for d in dec_images}) != 1 or len({tuple(g.tolist()) for g in grids}) != 1:
            raise ValueError("all images of a batch must have the same size (resize them to one training size)")
        length = max(len(s) for s in sequences)
        batch_size = len(examples)
        input_ids = torch.full((batch_size, length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((batch_size, length), dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((4, batch_size, length), dtype=torch.long)
        for b, (ids, pos, lab) in enumerate(zip(sequences, positions, label_rows)):
            n = len(ids)
            input_ids[b, :n] = torch.tensor(ids)
            attention[b, :n] = 1
            labels[b, :n] = torch.tensor(lab)
            position_ids[1:, b, :n] = torch.from_numpy(pos)
        position_ids[0] = torch.arange(length)  # the text row, as the generator's prefill builds it
        lm_rows, lm_cols = torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)
        h, w = dec_images[0].shape[1:]
        return Batch(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=position_ids,
            labels=labels,
            lm_rows=lm_rows,
            lm_cols=lm_cols,
            patches=torch.cat(patches),
            image_grid_thw=torch.stack(grids).long(),
            image_index=torch.tensor(image_index, dtype=torch.long),
            decoder_images=torch.from_numpy(np.stack(dec_images)),
            object_boxes=torch.from_numpy(np.concatenate(boxes).astype(np.float32)) if boxes
            else torch.zeros((0, 4)),
            object_batch=torch.tensor(owners, dtype=torch.long),
            object_seg_positions=torch.tensor(seg_positions, dtype=torch.long),
            object_masks=torch.from_numpy(np.concatenate(masks)) if masks
            else torch.zeros((0, h, w), dtype=torch.uint8),
            num_targets=torch.tensor(counts, dtype=torch.long),
            query_types=[ex.query_type for ex in examples],
            object_counts=counts,
            token_attributes=torch.from_numpy(np.concatenate(attributes)),
            token_objects=torch.from_numpy(np.stack(objects_map)),
            object_instances=torch.tensor(instances, dtype=torch.long),
        )

    def image_objects(self, example: RefExample, grid_thw: torch.Tensor) -> np.ndarray:
        """``(tokens,)`` instance id of the object on each of one image's merged visual tokens (-1 = unknown)."""
        t, gh, gw = (int(v) for v in grid_thw)
        hw = (gh // self.merge, gw // self.merge)
        if example.instances is None:
            return np.full(t * hw[0] * hw[1], -1, dtype=np.int64)
        ids, labels = example.instances
        return np.tile(token_objects(ids, len(labels), hw), t)

    def image_attributes(self, example: RefExample, grid_thw: torch.Tensor) -> np.ndarray:
        """``(tokens, G)`` attribute classes of one image's merged visual tokens (-1 = none)."""
        t, gh, gw = (int(v) for v in grid_thw)
        hw = (gh // self.merge, gw // self.merge)
        if example.instances is None or not self.attribute_groups:
            return np.full((t * hw[0] * hw[1], len(self.attribute_groups)), -1, dtype=np.int64)
        ids, labels = example.instances
        return np.tile(token_attributes(ids, labels, hw, self.attribute_groups), (t, 1))

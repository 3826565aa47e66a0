"""``Qwen3VLSeg``: the segmenter the node uses: Qwen3-VL grounding + box-guided mask decoder.

Per frame: build the grounding prompt (:mod:`qwen3vl_seg_ros.grounding`), run the processor,
generate greedily while hooks record the vision features of the prefill's single vision pass,
parse the boxes, pick each object's query (hidden state of its ``<|seg|>`` token, or of its last
JSON token for a base Instruct model), and decode all masks of the frame in one batch. Without a
trained decoder, or when asked, a weight-free head (:mod:`qwen3vl_seg_ros.masks`) makes masks.

Scores: ``box_score`` is the geometric mean of the probabilities of the tokens that wrote the
box's coordinates; ``mask_score`` is the decoder's predicted IoU (or the weight-free head's
heuristic). ``score`` is the probability that the object is a right answer from the model
folder's ``score_calibration.json`` (:mod:`qwen3vl_seg_ros.model.score_calibration`) where one
applies, else ``box_score * mask_score``, the chance that both are right if independent.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from qwen3vl_seg_ros.commands import markup_pattern, markup_tokens, strip_markup_tokens
from qwen3vl_seg_ros.grounding import SEG_TOKEN, ParsedAnswer, build_prompt, normalize_command, parse_answer
from qwen3vl_seg_ros.masks import MaskEstimate, mask_box, weight_free_mask
from qwen3vl_seg_ros.model.checkpoint import (
    DECODER_WEIGHTS,
    DecoderCheckpointError,
    has_decoder_file,
    load_decoder,
)
from qwen3vl_seg_ros.model.fast_generation import (
    FastGreedyGenerator,
    FastInputs,
    FastPathUnavailableError,
    compile_enabled_by_env,
)
from qwen3vl_seg_ros.model.generation import EagerGreedyGenerator, GenerationOutput, Generator
from qwen3vl_seg_ros.model.graphed_decoder import GraphedMaskDecoder
from qwen3vl_seg_ros.model.loading import (
    check_qwen3vl_folder,
    load_processor,
    load_qwen3vl,
    resolve_device,
    resolve_dtype,
    resolve_model_folder,
)
from qwen3vl_seg_ros.model.mask_decoder import (
    MASK_STRIDE,
    BoxGuidedMaskDecoder,
    DecoderOutput,
    decoder_image_uint8,
    upsampled_masks,
)
from qwen3vl_seg_ros.model.score_calibration import (
    CALIBRATION_FILE,
    CalibrationError,
    ScoreCalibration,
    file_sha256,
    load_calibration,
)
from qwen3vl_seg_ros.model.token_choice import number_tokens
from qwen3vl_seg_ros.model.vision_capture import VisionCapture, VisionFeatures
from qwen3vl_seg_ros.segmenter import ProgressFn, Segmenter, SegmenterOptions
from qwen3vl_seg_ros.types import InputError, Instance, SegmentationOutput, SegmenterError

MASK_HEADS = ("auto", "decoder", "grabcut", "depth", "box")
MAX_ASPECT_RATIO = 200  # the Qwen3-VL image processor refuses images at or beyond this
#: Objects the mask stage runs on at most per frame; beyond it, those with the best box scores.
#: An answer that runs on (a repetition loop under a large max_new_tokens) would otherwise get a
#: full-resolution mask each before any cut: 500 boxes at 1920x1080 took 32 s and 6 GB on CPU.
MAX_MASKED_OBJECTS = 100
#: PyTorch's thread count before a segmenter first set its own (``num_threads: 0`` puts it back).
_THREADS_BEFORE: list[int] = []


def _say(progress: ProgressFn | None, message: str) -> None:
    if progress is not None:
        progress(message)


@dataclass
class TokenText:
    """Decoded answer (special tokens skipped) and each token's character span in it."""

    text: str
    starts: np.ndarray  # (T,) int
    ends: np.ndarray  # (T,) int; special tokens have empty spans


def token_text(tokenizer: object, token_ids: list[int]) -> TokenText:
    """Decodes ``token_ids`` and locates each token in the text.

    Decoding tokens one by one and concatenating is exact for byte-level BPE on ASCII answers.
    When it is not (a multi-byte character split over tokens), each run of tokens that ends
    inside a character is decoded together with the tokens that complete it: the spans of
    decoding every prefix, in linear time (decoding every prefix took seconds on a long,
    looping answer).
    """
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    pieces = tokenizer.batch_decode([[t] for t in token_ids], skip_special_tokens=True)
    if "".join(pieces) != text:
        ends = _split_character_ends(tokenizer, token_ids, text)
    else:
        ends = np.cumsum([len(p) for p in pieces]).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64) if len(ends) else ends
    return TokenText(text=text, starts=starts, ends=ends)


def _split_character_ends(tokenizer: object, token_ids: list[int], text: str) -> np.ndarray:
    """Each token's end in ``text`` when some characters are split over tokens: a token that
    ends inside a character ends where the text decoded so far ends (as prefix decoding says)."""
    ends, done, run = [], 0, 0
    for i in range(len(token_ids)):
        chunk = tokenizer.decode(token_ids[run:i + 1], skip_special_tokens=True)
        if "\ufffd" in chunk and not text.startswith(chunk, done) and i + 1 < len(token_ids):
            ends.append(done + len(chunk))  # an incomplete character: the run stays open
            continue
        done += len(chunk)
        ends.append(done)
        run = i + 1
    return np.minimum(np.array(ends, dtype=np.int64), len(text))


def _tokens_overlapping(tt: TokenText, start: int, end: int) -> np.ndarray:
    return np.nonzero((tt.starts < end) & (tt.ends > start))[0]


def box_score(tt: TokenText, probs: torch.Tensor, coord_span: tuple[int, int]) -> float:
    """Geometric mean of the probabilities of the tokens that wrote a coordinate list."""
    index = _tokens_overlapping(tt, *coord_span)
    if index.size == 0:
        return 0.0
    p = probs[torch.as_tensor(index)].double().clamp(min=1e-12)
    return float(torch.exp(torch.log(p).mean()))


def query_tokens(
    tt: TokenText, token_ids: list[int], parsed: ParsedAnswer, seg_token_id: int | None
) -> tuple[list[int], bool]:
    """The token whose hidden state is each object's query, and whether all are mask tokens.

    An object's mask token is a ``<|seg|>`` placed between its closing brace and the next
    object; without one, the token holding the object's last character (its ``}``) is used.
    """
    seg_positions = [i for i, t in enumerate(token_ids) if seg_token_id is not None and t == seg_token_id]
    chosen, all_seg = [], True
    for k, obj in enumerate(parsed.objects):
        limit = parsed.objects[k + 1].span[0] if k + 1 < len(parsed.objects) else len(tt.text)
        seg = next((i for i in seg_positions if obj.span[1] <= tt.starts[i] <= limit), None)
        if seg is None:
            all_seg = False
            covering = _tokens_overlapping(tt, obj.span[1] - 1, obj.span[1])
            seg = int(covering[-1]) if covering.size else len(token_ids) - 1
        chosen.append(int(seg))
    return chosen, all_seg


@dataclass
class Grounding:
    """What one frame's grounding produced, for the mask stage."""

    text: TokenText
    generated: GenerationOutput
    parsed: ParsedAnswer
    capture: VisionCapture
    grid_thw: torch.Tensor


class Qwen3VLSeg(Segmenter):
    """Qwen3-VL grounding with the box-guided mask decoder (or a weight-free mask head)."""

    name = "qwen3vl_seg"

    def __init__(
        self,
        model: torch.nn.Module,
        processor: object,
        decoder: BoxGuidedMaskDecoder | None,
        options: SegmenterOptions,
        generator: Generator | None = None,
        calibration: ScoreCalibration | None = None,
    ) -> None:
        self.model = model
        self.calibration = calibration
        self.processor = processor
        self.decoder = decoder
        self.options = options
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        tokenizer = processor.tokenizer
        self.seg_token_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN) if SEG_TOKEN in tokenizer.get_vocab() else None
        self.markup_tokens = markup_tokens(_added_tokens(tokenizer))
        self._markup = markup_pattern(self.markup_tokens)
        fast = options.fast_decode and self.device.type == "cuda"
        self.fast_inputs: FastInputs | None = None
        self.fast_note = ""  # why the fast decoding path is not used, when it is not
        self.warmup_info: dict = {}  # what the fast path's warm-up did (timings, self-check)
        window = options.coordinate_window
        self.numbers = number_tokens(tokenizer, window, self.device) if window >= 0 else None
        self.generator = generator or (self._fast_generator() if fast else None) or EagerGreedyGenerator(
            model, self._stop_tokens(), self.numbers)
        if fast:
            try:
                self.fast_inputs = FastInputs(processor, self.device, self.dtype)
            except Exception:
                self.fast_inputs = None
        self.run_decoder = decoder
        if decoder is not None and fast:
            self.run_decoder = GraphedMaskDecoder(decoder)
        self.mask_head = _valid_mask_head(options.mask_head)
        if self.mask_head == "decoder" and decoder is None:
            raise SegmenterError(NO_DECODER_FOR_MASK_HEAD)

    # ---------------------------------------------------------------------------------- loading

    @classmethod
    def from_options(cls, options: SegmenterOptions, progress: ProgressFn | None = None) -> Qwen3VLSeg:
        _valid_mask_head(options.mask_head)
        apply_thread_count(options.num_threads)
        folder = resolve_model_folder(options.model, options.local_files_only)
        check_qwen3vl_folder(folder)
        if options.mask_head == "decoder" and _decoder_folder(options, folder) is None:
            raise SegmenterError(NO_DECODER_FOR_MASK_HEAD)  # before minutes of loading, not after
        device = resolve_device(options.device)
        dtype = resolve_dtype(options.dtype, device)
        _say(progress, f"loading Qwen3-VL from {folder} on {device} ({str(dtype).removeprefix('torch.')})")
        processor = load_processor(folder, options.image_max_pixels)
        model = load_qwen3vl(folder, device, dtype)
        decoder = cls._load_decoder(options, folder, model, device, dtype, progress)
        calibration = cls._load_calibration(options, folder, decoder, progress)
        segmenter = cls(model, processor, decoder, options, calibration=calibration)
        if segmenter._uses_decoder() and segmenter.seg_token_id is None:
            _say(progress, f"warning: the tokenizer in {folder} has no {SEG_TOKEN} token, so the mask decoder's "
                           "queries come from the last JSON token, which a decoder trained by this package never "
                           "saw: masks will be poor. Load the training export (its model folder, which holds the "
                           "decoder) as 'model' instead of a base checkpoint beside a 'decoder' folder")
        if options.fast_decode and device.type == "cuda":
            if isinstance(segmenter.generator, FastGreedyGenerator):
                compiled = "compiled, " if segmenter.generator.compiled else ""
                _say(progress, f"language model: static KV cache + CUDA graphs ({compiled}prepared at warm-up); "
                               "mask decoder: CUDA graphs")
            else:
                _say(progress, f"language model: eager decoding ({segmenter.fast_note}); mask decoder: CUDA graphs")
        return segmenter

    def _fast_generator(self) -> FastGreedyGenerator | None:
        """The GPU decoding path (static cache, CUDA graphs, compiled step), or None if unsupported."""
        try:
            return FastGreedyGenerator(self.model, self._stop_tokens(), compile=compile_enabled_by_env(),
                                       compile_cache_dir=self.options.compile_cache_dir, numbers=self.numbers)
        except FastPathUnavailableError as exc:
            self.fast_note = str(exc)
            return None

    @staticmethod
    def _load_decoder(options: SegmenterOptions, folder: Path, model: torch.nn.Module, device: torch.device,
                      dtype: torch.dtype, progress: ProgressFn | None) -> BoxGuidedMaskDecoder | None:
        if options.mask_head in ("grabcut", "depth", "box"):
            return None
        decoder_folder = _decoder_folder(options, folder)
        if decoder_folder is None:
            _say(progress, f"no mask decoder in {folder}: masks come from weight-free heads (lower quality)")
            return None
        try:
            decoder = load_decoder(decoder_folder, device, dtype)
        except DecoderCheckpointError as exc:
            raise SegmenterError(f"cannot load the mask decoder: {exc}") from exc
        _check_decoder_fits(decoder, model)
        _say(progress, f"loaded mask decoder from {decoder_folder}")
        return decoder

    @staticmethod
    def _load_calibration(options: SegmenterOptions, folder: Path, decoder: BoxGuidedMaskDecoder | None,
                          progress: ProgressFn | None) -> ScoreCalibration | None:
        """The folder's score calibration where it fits this setup; says why where it does not."""
        if not options.calibrate_scores:
            return None
        try:
            calibration = load_calibration(folder)
        except CalibrationError as exc:
            raise SegmenterError(f"{exc}; fix or delete the file, or set calibrate_scores to false") from exc
        if calibration is None:
            return None
        why_not = _decoder_mismatch(calibration, options, folder, decoder)
        if not why_not and calibration.box_refine_passes != options.box_refine_passes:
            why_not = (f"it was fitted with box_refine_passes={calibration.box_refine_passes}, "
                       f"not {options.box_refine_passes}")
        if why_not:
            _say(progress, f"score calibration in {folder} not used ({why_not}): scores are box_score * mask_score")
            return None
        _say(progress, f"scores calibrated by {folder / CALIBRATION_FILE}")
        return calibration

    def _score(self, box_score: float, estimate: MaskEstimate) -> float:
        if self.calibration is not None and estimate.source == self.calibration.mask_source:
            return self.calibration.probability(box_score, estimate.score)
        return box_score * estimate.score

    def _stop_tokens(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        tokenizer = self.processor.tokenizer
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
            ids.add(im_end)
        return {int(i) for i in ids}

    def warmup(self, progress: ProgressFn | None = None, image_size: tuple[int, int] | None = None) -> None:
        """A short command on a synthetic frame of ``image_size`` (default 640x480, a common
        camera size): allocates buffers, loads kernels and, on a GPU, captures the CUDA graphs
        of that frame size (the decoder's for up to 8 objects)."""
        width, height = image_size or (640, 480)
        _say(progress, f"warming up the segmenter for {width}x{height} frames")
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        if isinstance(self.generator, FastGreedyGenerator):
            # Sized for real commands (max_new_tokens), with the prompt buckets of longer commands.
            try:
                inputs = self._inputs(image, build_prompt("the object")[0])
                self.warmup_info = self.generator.warmup(inputs, self.options.max_new_tokens, progress)
            except Exception as exc:
                self.fast_note = f"the fast path failed to warm up: {type(exc).__name__}: {exc}"
                _say(progress, f"{self.fast_note}; using eager decoding")
                self.generator = self.generator.eager
        grounding = self._ground(image, "the object", max_new_tokens=8)
        if not self._uses_decoder():
            return
        vision = grounding.capture.features(grounding.grid_thw)
        hidden = self.model.config.text_config.hidden_size
        counts = (1, 2, 4, 8) if isinstance(self.run_decoder, GraphedMaskDecoder) else (1,)
        for count in counts:
            box = [width / 4, height / 4, 3 * width / 4, 3 * height / 4]
            boxes = np.tile(np.array([box], dtype=np.float32), (count, 1))
            queries = torch.zeros(count, hidden, device=self.device, dtype=self.dtype)
            self._decoder_masks(image, vision, queries, boxes, self.options.box_refine_passes)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        self.decoder = None
        self.run_decoder = None
        self.generator = None  # type: ignore[assignment]
        self.fast_inputs = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------- inference

    def segment(self, rgb: np.ndarray, command: str, depth: np.ndarray | None = None) -> SegmentationOutput:
        if self.model is None:
            raise SegmenterError("the segmenter was closed")
        return self._segment(rgb, command, depth, self.options.max_new_tokens)

    def _inputs(self, rgb: np.ndarray, prompt: str) -> dict[str, torch.Tensor]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if self.fast_inputs is not None:  # on the GPU, bit-identical to the processor (checked per frame size)
            inputs = self.fast_inputs(rgb, text)
            if inputs is not None:
                return inputs
        batch = self.processor(text=[text], images=[Image.fromarray(rgb)], return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def _uses_decoder(self) -> bool:
        return _decoder_in_use(self.decoder, self.mask_head)

    def _segment(self, rgb: np.ndarray, command: str, depth: np.ndarray | None,
                 max_new_tokens: int) -> SegmentationOutput:
        _check_inputs(rgb, command, depth)
        command, stripped = strip_markup_tokens(command, self._markup)
        t0 = time.perf_counter()
        grounding = self._ground(rgb, command, max_new_tokens)
        parsed = grounding.parsed
        output = SegmentationOutput(raw_answer=grounding.text.text, warnings=stripped + list(parsed.warnings))
        if not grounding.generated.finished:
            output.warnings.append(f"the answer reached max_new_tokens={max_new_tokens} and may be cut off")
        if not parsed.objects:
            output.no_match_reason = parsed.no_match_reason
            output.timings_ms = {"grounding": _ms(t0), "mask": 0.0}
            return output
        _cap_objects(parsed, self.options.max_objects, output.warnings)
        self._keep_best_boxes(grounding, MAX_MASKED_OBJECTS, output.warnings)
        t1 = time.perf_counter()
        output.timings_ms["grounding"] = (t1 - t0) * 1000.0
        estimates = self._masks(rgb, depth, grounding, output)
        default_label = normalize_command(command)
        for obj, estimate in zip(parsed.objects, estimates):
            bscore = box_score(grounding.text, grounding.generated.token_probs, obj.coord_span)
            output.instances.append(Instance(
                box=obj.box if estimate.box is None else estimate.box, label=obj.label or default_label,
                score=self._score(bscore, estimate), mask=estimate.mask, box_score=bscore, mask_score=estimate.score,
                mask_source=estimate.source, model_box=obj.box,
            ))
        output.timings_ms["mask"] = _ms(t1)
        return output

    @staticmethod
    def _keep_best_boxes(grounding: Grounding, limit: int, warnings: list[str]) -> None:
        """Keeps the ``limit`` objects with the best box scores, in the answer's order."""
        parsed = grounding.parsed
        if len(parsed.objects) <= limit:
            return
        scores = [box_score(grounding.text, grounding.generated.token_probs, o.coord_span) for o in parsed.objects]
        keep = sorted(int(i) for i in np.argsort(-np.asarray(scores), kind="stable")[:limit])
        warnings.append(f"{len(parsed.objects)} objects in the answer; masks were made for the {limit} "
                        f"with the best box scores")
        _keep_objects(parsed, keep)

    def _ground(self, rgb: np.ndarray, command: str, max_new_tokens: int) -> Grounding:
        """Prompt, processor, generation (recording vision features when the decoder runs), parse."""
        inputs = self._inputs(rgb, build_prompt(command)[0])
        layers = self.decoder.config.vit_layers if self._uses_decoder() else ()
        fallbacks = getattr(self.generator, "fallbacks", 0)
        with VisionCapture(self.model, layers) as capture:
            generated = self.generator.generate(inputs, max_new_tokens)
        # A fast generator that failed mid-call answers it eagerly: one more vision pass, whose
        # features overwrite the first's, so they stay one frame's.
        allowed = 1 + (getattr(self.generator, "fallbacks", 0) - fallbacks)
        if capture.calls > allowed:  # the decoder must reuse the prefill's vision pass, never add one
            raise SegmenterError(f"internal error: the vision tower ran {capture.calls} times for one frame")
        text = token_text(self.processor.tokenizer, generated.token_ids.tolist())
        parsed = parse_answer(text.text, rgb.shape[1], rgb.shape[0])
        return Grounding(text, generated, parsed, capture, inputs["image_grid_thw"])

    def _masks(self, rgb: np.ndarray, depth: np.ndarray | None, grounding: Grounding,
               output: SegmentationOutput) -> list[MaskEstimate]:
        """One mask per parsed object: the decoder's (one batch) or a weight-free head's."""
        parsed = grounding.parsed
        if not self._uses_decoder():
            head = "auto" if self.mask_head in ("auto", "decoder") else self.mask_head
            return [weight_free_mask(head, rgb, box, depth) for box in parsed.boxes]
        token_ids = grounding.generated.token_ids.tolist()
        queries, from_seg = self._queries(grounding.text, token_ids, parsed, grounding.generated)
        output.query_source = "mask_token" if from_seg else "last_json_token"
        if not from_seg and self.seg_token_id is not None:
            output.warnings.append("some objects had no mask token; their query is the last JSON token")
        vision = grounding.capture.features(grounding.grid_thw)
        masks, scores, boxes = self._decoder_masks(rgb, vision, queries, parsed.boxes,
                                                   self.options.box_refine_passes)
        for k, (obj, mask) in enumerate(zip(parsed.objects, masks)):
            if not mask.any():
                output.warnings.append(f"the decoder's mask for object {k} ('{obj.label}') is empty; it scores 0")
        return [MaskEstimate(m, score, "decoder", box) for m, score, box in zip(masks, scores, boxes)]

    def _queries(self, tt: TokenText, token_ids: list[int], parsed: ParsedAnswer,
                 generated: GenerationOutput) -> tuple[torch.Tensor, bool]:
        index, from_seg = query_tokens(tt, token_ids, parsed, self.seg_token_id)
        last = generated.hidden_states.shape[0] - 1
        index = [min(i, last) for i in index]
        return generated.hidden_states[torch.as_tensor(index, device=generated.hidden_states.device)], from_seg

    def _decoder_masks(self, rgb: np.ndarray, vision: VisionFeatures, queries: torch.Tensor,
                       boxes: np.ndarray, refine_passes: int = 0) -> tuple[np.ndarray, list[float], np.ndarray]:
        """:func:`decode_masks` with this segmenter's decoder (CUDA graphs on a GPU)."""
        return decode_masks(self.run_decoder, rgb, vision, queries.to(self.dtype), boxes,
                            self.decoder.config.max_image_side, refine_passes)


@torch.inference_mode()
def decode_masks(run_decoder: Callable[..., DecoderOutput], rgb: np.ndarray, vision: VisionFeatures,
                 queries: torch.Tensor, boxes: np.ndarray, max_image_side: int,
                 refine_passes: int = 0) -> tuple[np.ndarray, list[float], np.ndarray]:
    """The mask stage: all masks of a frame in one decoder batch, at the original resolution,
    their IoU-head scores and their boxes (``bench/bench_decoder.py`` times this same function).

    With ``refine_passes`` > 0 the decoder runs again that many times, each on the boxes of its
    previous masks (:func:`mask_parts`), and each object's box and mask become its final mask's
    chosen parts: a grounding model's box can be loose or shifted, and the mask has seen the
    pixels. A pass that empties a mask keeps the pass before it. With 0 the boxes are returned as
    given. An empty final mask scores 0: its IoU with any object is 0, and its IoU head's guess
    (measured up to 0.87) let it pass ``score_threshold`` with no pixels.
    """
    device = queries.device
    height, width = rgb.shape[:2]
    image = _decoder_image(rgb, max_image_side).to(device)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=device)
    cell = (MASK_STRIDE * width / image.shape[-1], MASK_STRIDE * height / image.shape[-2])
    box_px = torch.as_tensor(np.asarray(boxes, dtype=np.float32), device=device)
    previous: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for _ in range(1 + max(0, refine_passes)):
        out = run_decoder(image, vision, queries, at_least_one_cell(box_px, cell) / scale)
        mask_t = upsampled_masks(out.final_logits, height, width)
        iou = out.iou.float().clamp(0, 1)
        if previous is not None:
            emptied = ~mask_t.flatten(1).any(1)
            mask_t = torch.where(emptied[:, None, None], previous[0], mask_t)
            iou = torch.where(emptied, previous[1], iou)
            box_px = torch.where(emptied[:, None], previous[2], box_px)
        if refine_passes > 0:
            previous = (mask_t, iou, box_px)
            box_px, mask_t = mask_parts(mask_t, box_px)
    masks = mask_t.cpu().numpy()
    scores = [float(v) if m.any() else 0.0 for v, m in zip(iou.cpu(), masks)]
    return masks, scores, box_px.cpu().numpy()


def apply_thread_count(num_threads: int) -> None:
    """``num_threads`` > 0: PyTorch's CPU threads. On a robot's shared CPU, more threads than free
    cores make every call slower (OpenMP workers spin waiting for each other), not faster.
    0: the count from before the first segmenter set one. The setting is the process's, so a
    node configured with 1 thread, cleaned up and configured with 0 stayed at 1."""
    if num_threads > 0:
        if not _THREADS_BEFORE:
            _THREADS_BEFORE.append(torch.get_num_threads())
        torch.set_num_threads(num_threads)
    elif _THREADS_BEFORE:
        torch.set_num_threads(_THREADS_BEFORE.pop())


def at_least_one_cell(box_px: torch.Tensor, cell: tuple[float, float]) -> torch.Tensor:
    """Boxes narrower or lower than one mask cell, grown about their centre to one cell.

    Why: under one cell the decoder's box prior is its floor value everywhere, so the box's place
    is lost and the mask lands on whatever the query matches (another object, measured). Only
    the decoder sees the grown box; boxes of a cell or more are passed unchanged, bit for bit.
    """
    size = box_px[:, 2:] - box_px[:, :2]
    minimum = box_px.new_tensor(cell)
    small = (size < minimum).any(dim=1, keepdim=True)
    centre, half = (box_px[:, :2] + box_px[:, 2:]) / 2, torch.maximum(size, minimum) / 2
    return torch.where(small, torch.cat([centre - half, centre + half], dim=1), box_px)


def _valid_mask_head(head: str) -> str:
    if head not in MASK_HEADS:
        raise SegmenterError(f"mask_head '{head}' is unknown; use one of {', '.join(MASK_HEADS)}")
    return head


NO_DECODER_FOR_MASK_HEAD = (
    "mask_head 'decoder' needs a trained mask decoder: set 'decoder' to a folder with "
    "mask_decoder.safetensors and mask_decoder_config.json, or use mask_head auto/grabcut/depth/box")


def _decoder_folder(options: SegmenterOptions, folder: Path) -> Path | None:
    """Where the mask decoder is loaded from: the ``decoder`` option, else the model folder when
    it holds either decoder file (half a decoder is loaded, so that the error names the missing
    file, rather than silently replaced by the weight-free heads); None when there is none."""
    if options.decoder.strip():
        return Path(options.decoder).expanduser()
    if has_decoder_file(folder):
        return folder
    return None


def _decoder_mismatch(calibration: ScoreCalibration, options: SegmenterOptions, folder: Path,
                      decoder: BoxGuidedMaskDecoder | None) -> str:
    """Why ``folder``'s calibration does not fit the decoder in use, or "". Judged by the hash of
    the weights in use, wherever they were loaded from: ``decoder`` set to the model folder itself
    (or to a copy of its decoder) keeps the calibration."""
    decoder_folder = _decoder_folder(options, folder)
    if not _decoder_in_use(decoder, options.mask_head) or decoder_folder is None:
        return "it was fitted on this folder's own mask decoder, which is not in use"
    if calibration.decoder_sha256:
        if calibration.decoder_sha256 != file_sha256(decoder_folder / DECODER_WEIGHTS):
            return f"it was fitted for another mask decoder than {decoder_folder / DECODER_WEIGHTS}"
        return ""
    if decoder_folder.resolve() != folder.resolve():  # an old file without a hash: same folder only
        return "it was fitted on this folder's own mask decoder, which is not in use"
    return ""


def _decoder_in_use(decoder: BoxGuidedMaskDecoder | None, mask_head: str) -> bool:
    """Whether masks come from the trained decoder: "auto" and "decoder" use it when one is loaded."""
    return decoder is not None and mask_head in ("auto", "decoder")


def mask_parts(masks: torch.Tensor, given: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H, W) bool masks and the (N, 4) boxes their pass was given -> each mask's chosen
    connected components and their box (xyxy, pixel edges). Chosen: the parts that overlap the
    given box; when none does (a shifted box), the part(s) nearest to it. An empty mask keeps its
    given box. When no mask loses a part, ``masks`` itself is returned (not a copy).

    Why parts: with several targets the decoder's frame gate opens the image at the other targets
    too, and 17 % of masks carried specks of 1-3 px on them; the box of every pixel then spanned
    two objects and the next pass spoiled the mask (exact boxes: mask IoU 0.965 -> 0.843, a fifth
    of the boxes below IoU 0.5; with parts 0.965 and none). The mask keeps only the chosen parts,
    so that it and its box agree (the node grows a box to cover its mask).
    """
    boxes = given.detach().cpu().numpy().astype(np.float64)
    host = masks.cpu().numpy()  # read only: a mask that loses parts is written into a new array
    changed: dict[int, np.ndarray] = {}
    for k, mask in enumerate(host):
        extent = mask_box(mask).astype(int)
        if not extent.any():
            continue
        chosen = _chosen_parts(mask, extent, boxes[k])
        if chosen is not None:
            changed[k] = chosen
        boxes[k] = mask_box(chosen) if chosen is not None else extent
    out = masks
    if changed:
        out = masks.clone()
        for k, chosen in changed.items():
            out[k] = torch.from_numpy(chosen).to(masks.device)
    return torch.as_tensor(boxes, dtype=given.dtype, device=given.device), out


def _chosen_parts(mask: np.ndarray, extent: np.ndarray, given: np.ndarray) -> np.ndarray | None:
    """The mask's parts that overlap ``given`` (else the nearest), or None when it keeps them all.
    The components are labelled in the crop of the mask's extent only: on a 640x480 frame that
    took a third to a tenth of the full frame's time per mask."""
    x0, y0, x1, y1 = (int(v) for v in extent)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask[y0:y1, x0:x1].view(np.uint8), connectivity=8)
    if count <= 2:
        return None
    gx1, gy1 = (max(0, int(np.floor(v))) for v in given[:2])
    gx2, gy2 = (int(np.ceil(v)) for v in given[2:])
    held = labels[max(0, gy1 - y0):max(0, gy2 - y0), max(0, gx1 - x0):max(0, gx2 - x0)]
    inside = np.flatnonzero(np.bincount(held.ravel(), minlength=count)[1:]) + 1  # np.unique took 5x as long
    if inside.size == 0:
        parts = stats[1:, :4] + np.array([x0, y0, 0, 0])
        gap = _box_gaps(parts, given)
        inside = np.flatnonzero(gap == gap.min()) + 1
    if inside.size == count - 1:
        return None
    chosen = np.zeros_like(mask)
    chosen[y0:y1, x0:x1] = np.isin(labels, inside)
    return chosen


def _box_gaps(xywh: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Chebyshev gap in pixels between each component's box (x, y, w, h) and ``box`` (xyxy)."""
    x, y, w, h = xywh.T
    dx = np.maximum(0, np.maximum(box[0] - (x + w), x - box[2]))
    dy = np.maximum(0, np.maximum(box[1] - (y + h), y - box[3]))
    return np.maximum(dx, dy)


def _ms(since: float) -> float:
    return (time.perf_counter() - since) * 1000.0


def _decoder_image(rgb: np.ndarray, max_side: int) -> torch.Tensor:
    """The raw image for the CNN stem: ``(1, 3, h, w)`` in 0..1, long side at most ``max_side``."""
    return torch.from_numpy(decoder_image_uint8(rgb, max_side))[None].float() / 255.0


def _cap_objects(parsed: ParsedAnswer, max_objects: int, warnings: list[str]) -> None:
    if max_objects > 0 and len(parsed.objects) > max_objects:
        warnings.append(f"{len(parsed.objects)} objects found; only the first {max_objects} (max_objects) are kept")
        _keep_objects(parsed, list(range(max_objects)))


def _keep_objects(parsed: ParsedAnswer, keep: list[int]) -> None:
    """Keeps the objects ``keep`` (indices in the answer's order) in all three parallel lists."""
    parsed.objects = [parsed.objects[i] for i in keep]
    parsed.boxes = parsed.boxes[keep]
    parsed.labels = [parsed.labels[i] for i in keep]


def _added_tokens(tokenizer: object) -> list[str]:
    """Every added token's text (special or not); a tokenizer without that table gives its specials."""
    table = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(table, dict):
        return [str(getattr(token, "content", token)) for token in table.values()]
    return list(getattr(tokenizer, "all_special_tokens", []))


def _check_inputs(rgb: np.ndarray, command: str, depth: np.ndarray | None) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        shape = getattr(rgb, "shape", None)
        raise InputError(f"the image must be an HxWx3 uint8 RGB array, got {shape} {getattr(rgb, 'dtype', '')}")
    if min(rgb.shape[:2]) < 2:
        raise InputError(f"the image is too small ({rgb.shape[1]}x{rgb.shape[0]})")
    if max(rgb.shape[:2]) >= MAX_ASPECT_RATIO * min(rgb.shape[:2]):
        raise InputError(f"the image ({rgb.shape[1]}x{rgb.shape[0]}) is too elongated: Qwen3-VL takes sides "
                         f"less than {MAX_ASPECT_RATIO}:1")
    if not command or not command.strip():
        raise InputError("the command is empty: say what to segment, e.g. 'the red mug'")
    if depth is not None and (not isinstance(depth, np.ndarray) or depth.shape != rgb.shape[:2]):
        raise InputError(f"depth {getattr(depth, 'shape', None)} is not aligned with the image {rgb.shape[:2]} "
                         "(an HxW float32 array in metres is needed)")


def _check_decoder_fits(decoder: BoxGuidedMaskDecoder, model: torch.nn.Module) -> None:
    """A decoder trained for another Qwen3-VL size would fail deep inside; say so up front."""
    cfg, vision, text = decoder.config, model.config.vision_config, model.config.text_config
    expected = {"vit_dim": vision.hidden_size, "visual_token_dim": vision.out_hidden_size, "llm_dim": text.hidden_size}
    wrong = {k: (getattr(cfg, k), v) for k, v in expected.items() if getattr(cfg, k) != v}
    if wrong or max(cfg.vit_layers) >= vision.depth:
        raise SegmenterError(
            f"the mask decoder does not fit this Qwen3-VL model ({wrong or 'ViT layers out of range'}; "
            "decoder value, model value): use the decoder trained for this model size")

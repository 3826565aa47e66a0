"""Training Qwen3-VL-Seg: ``python -m qwen3vl_seg_ros.train CONFIG.yaml --out RUN_DIR``.

The recipe is a list of *stages* in the configuration, run one after the other on one data
stream. Each stage says what trains and how fast:

* ``llm: lora`` (peft adapters on the language model's attention and MLP projections, merged
  into the weights when the stage ends), ``full`` or ``frozen``;
* ``vision_lr_scale``: the vision tower's learning rate relative to the stage's (0 freezes it);
* the decoder always trains (``decoder_lr_scale``).

The paper's recipe for a real checkpoint is stage 1 LoRA (rank 32) + vision at 0.01x + decoder,
then stage 2 LLM + decoder fully, vision frozen. The tiny model trained from scratch runs a
``full`` stage (everything, random init) and then a short stage with the vision tower frozen.

One step: the processor-equivalent inputs of a padded batch (:mod:`.collate`) go through the
Qwen3-VL forward once, with :class:`~qwen3vl_seg_ros.model.vision_capture.VisionCapture`
recording the ViT features of that single vision pass; the language-model loss covers the
answer tokens; the decoder reads the hidden states at the ``<|seg|>`` positions (the tokens
inference uses as queries) with the ground-truth boxes, slightly jittered, and its masks are
scored by BCE + Dice (both refinement iterations) and the IoU head loss (:mod:`.losses`).

Run folder::

    config.json            the resolved configuration
    base/                  tiny runs: the randomly initialised model and task tokenizer
    checkpoint/            resumable state: weights, optimizer, RNG (safetensors) + state.json
    model/                 the latest exported Qwen3-VL-Seg folder (production loader reads it)
    train_log.jsonl        one line per logged step
    eval_<split>/          the final evaluation (report.json, report.png)

``--resume`` continues from ``checkpoint/`` exactly where it stopped (same data, same RNG).
``--time-budget-s`` stops cleanly (checkpoint + export) before a wall-clock limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from tqdm import tqdm

from qwen3vl_seg_ros.grounding import SEG_TOKEN
from qwen3vl_seg_ros.model.mask_decoder import BoxGuidedMaskDecoder, DecoderOutput
from qwen3vl_seg_ros.model.vision_capture import VisionCapture, VisionFeatures
from qwen3vl_seg_ros.training.collate import Batch, Collator, concat_batches, pixel_values_from_patches
from qwen3vl_seg_ros.training.config import TrainConfig, load_config
from qwen3vl_seg_ros.training.dataset import (
    LABEL_FIRST_FORMATS,
    build_stream,
    make_loader,
    scene_overlaps,
    train_scene_range,
)
from qwen3vl_seg_ros.training.expressions import COLOURS, SHAPES
from qwen3vl_seg_ros.training.losses import (
    CoordinateTable,
    attribute_loss,
    choice_loss,
    lm_loss,
    lookup_loss,
    mask_losses,
    pointer_loss,
)
from qwen3vl_seg_ros.training.model_builder import (
    LLM_LORA_TARGETS,
    LoraSettings,
    apply_lora,
    export_model,
    folder_size_mb,
    init_number_embeddings,
    init_vision_positions,
    is_lora,
    load_base,
    lora_targets,
    merge_lora,
    number_token_ids,
    parameter_groups,
    prepare_base,
    set_trainable,
    sync_folder,
)
from qwen3vl_seg_ros.types import SegmenterError


def check_run_folder(run_dir: Path, resume: bool) -> None:
    """Refuses a run folder that does not fit ``resume`` (before any model is built).

    A process killed between the two renames of :meth:`Trainer.save_checkpoint` leaves no
    ``checkpoint/`` but a complete ``checkpoint.tmp`` (its state.json is written last) or the
    previous ``checkpoint.old``: that one is put back, so ``--resume`` finds it and a new run in
    the folder is refused instead of deleting both with its first save.
    """
    checkpoint = run_dir / "checkpoint"
    if not (checkpoint / "state.json").is_file():
        for spare in (run_dir / "checkpoint.tmp", run_dir / "checkpoint.old"):
            if (spare / "state.json").is_file():
                shutil.rmtree(checkpoint, ignore_errors=True)
                spare.rename(checkpoint)
                break
    if resume and not (checkpoint / "state.json").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint}")
    if not resume and checkpoint.exists():
        raise FileExistsError(f"{run_dir} already holds a run; use --resume or another --out")


# ---------------------------------------------------------------------------------------------
# state saved for resuming


@dataclass
class TrainState:
    """Where a run stands; saved as JSON next to the tensors of a checkpoint."""

    step: int = 0  # optimizer steps over all stages (also the position in the data stream)
    stage: int = 0  # index of the current stage
    stage_step: int = 0  # steps done in the current stage
    samples: int = 0
    train_seconds: float = 0.0
    finished: bool = False
    planned_steps: list[int] | None = None  # stage lengths fitted to --train-time-s (None: the config's)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state as flat tensors (safetensors) plus a JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for name, value in rest["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


# ---------------------------------------------------------------------------------------------
# the step


#: The word groups of the attribute loss: an object's colour and its shape, as its label names them.
ATTRIBUTE_GROUPS = (COLOURS, SHAPES)


def attribute_word_ids(tokenizer: object, words: tuple[str, ...]) -> list[int]:
    """The token of each word as a command has it (after a space), else bare; one known token each."""
    unknown = getattr(tokenizer, "unk_token_id", None)
    ids = []
    for word in words:
        for form in (" " + word, word):
            tokens = tokenizer(form, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            if len(tokens) == 1 and tokens[0] != unknown:
                ids.append(int(tokens[0]))
                break
        else:
            raise ValueError(f"loss.attribute needs each attribute word to be one known token; {word!r} is not")
    return ids


def multimodal_forward(model: nn.Module, batch: Batch, pixel_values: torch.Tensor) -> torch.Tensor:
    """The final-norm hidden states of :func:`multimodal_outputs`."""
    return multimodal_outputs(model, batch, pixel_values).last_hidden_state


def multimodal_outputs(model: nn.Module, batch: Batch, pixel_values: torch.Tensor,
                       output_attentions: bool = False) -> Any:
    """Qwen3-VL's forward for still images, with one vision pass per *distinct* image of the batch.

    The queries of one rendered scene share its image; running the vision tower once for them
    and handing each sample its image's tokens gives the same hidden states as
    ``Qwen3VLModel.forward`` on duplicated images (checked at the first step and in a test) at
    a fraction of the cost. The steps are those of that forward: merged visual tokens scattered
    into the placeholder embeddings, the deepstack features added to the first decoder layers
    at the image positions, then the language model. Returns the language model's output: the
    final-norm hidden states ``(B, L, D)`` (the states inference takes its mask-token queries
    from) and, with ``output_attentions`` (eager attention only), each layer's attention.
    """
    inner = model.model
    vision = inner.visual(pixel_values.to(inner.visual.dtype), grid_thw=batch.image_grid_thw, return_dict=True)
    merged = vision.pooler_output
    images = batch.image_grid_thw.shape[0]
    per_image = merged.shape[0] // images

    def per_sample(features: torch.Tensor) -> torch.Tensor:
        return features.reshape(images, per_image, -1)[batch.image_index].reshape(-1, features.shape[-1])

    embeds = inner.get_input_embeddings()(batch.input_ids)
    image_mask = batch.input_ids == model.config.image_token_id
    embeds = embeds.masked_scatter(image_mask[..., None], per_sample(merged).to(embeds.dtype))
    deepstack = [per_sample(f) for f in (vision.deepstack_features or [])]
    out = inner.language_model(input_ids=None, inputs_embeds=embeds, attention_mask=batch.attention_mask,
                               position_ids=batch.position_ids, visual_pos_masks=image_mask,
                               deepstack_visual_embeds=deepstack or None, use_cache=False,
                               output_attentions=output_attentions)
    return out


def reference_forward(model: nn.Module, batch: Batch, pixel_values: torch.Tensor,
                      patches_per_image: int) -> torch.Tensor:
    """The same hidden states through ``Qwen3VLModel.forward`` itself, each sample with its own
    copy of its image (what inference does, one sample at a time); for checks only."""
    chunks = pixel_values.reshape(batch.image_grid_thw.shape[0], patches_per_image, -1)
    duplicated = chunks[batch.image_index].reshape(-1, pixel_values.shape[-1])
    out = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, pixel_values=duplicated,
                      image_grid_thw=batch.image_grid_thw[batch.image_index], use_cache=False)
    return out.last_hidden_state


def run_decoder(decoder: BoxGuidedMaskDecoder, images: torch.Tensor, vision: VisionFeatures, queries: torch.Tensor,
                boxes: torch.Tensor, batch_index: torch.Tensor, chunk: int, frame_counts: list[int]) -> DecoderOutput:
    """The decoder on all objects of a batch, ``chunk`` frames per call (0 = one call).

    One call issues the fewest operations, which is what a GPU step of a small model costs (a
    batch of 256 frames: 20.6k operations in a step against 52.7k in chunks of 32); on a CPU,
    chunks of 32 frames are faster (the working set stays in cache). Objects must be ordered by
    frame (the collator's order); ``frame_counts`` is objects per frame.
    """
    frames = images.shape[0]
    if chunk <= 0 or frames <= chunk:
        return decoder(images, vision, queries, boxes, batch_index)
    coarse, fine, iou = [], [], []
    start_obj = 0
    for s in range(0, frames, chunk):
        e = min(frames, s + chunk)
        n = sum(frame_counts[s:e])
        if n == 0:
            continue
        sub = VisionFeatures([m[s:e] for m in vision.vit_maps], vision.merged_map[s:e])
        sel = slice(start_obj, start_obj + n)
        out = decoder(images[s:e], sub, queries[sel], boxes[sel], batch_index[sel] - s)
        coarse.append(out.mask_logits[0])
        fine.append(out.mask_logits[1])
        iou.append(out.iou)
        start_obj += n
    return DecoderOutput(mask_logits=(torch.cat(coarse), torch.cat(fine)), iou=torch.cat(iou))


def _first_samples(batch: Batch, count: int) -> Batch:
    """The first ``count`` samples of a batch with their images and objects (for checks)."""
    count = min(count, batch.size)
    used = torch.unique(batch.image_index[:count])
    remap = torch.full((int(batch.image_grid_thw.shape[0]),), -1, dtype=torch.long, device=used.device)
    remap[used] = torch.arange(len(used), device=used.device)
    per_image = batch.patches.shape[0] // batch.image_grid_thw.shape[0]
    patches = batch.patches.reshape(batch.image_grid_thw.shape[0], per_image, *batch.patches.shape[1:])[used]
    objects = batch.object_batch < count
    rows = batch.lm_rows < count
    return Batch(
        input_ids=batch.input_ids[:count], attention_mask=batch.attention_mask[:count],
        position_ids=batch.position_ids[:, :count], labels=batch.labels[:count],
        lm_rows=batch.lm_rows[rows], lm_cols=batch.lm_cols[rows],
        patches=patches.reshape(-1, *batch.patches.shape[1:]), image_grid_thw=batch.image_grid_thw[used],
        image_index=remap[batch.image_index[:count]], decoder_images=batch.decoder_images[used],
        object_boxes=batch.object_boxes[objects], object_batch=batch.object_batch[objects],
        object_seg_positions=batch.object_seg_positions[objects], object_masks=batch.object_masks[objects],
        num_targets=batch.num_targets[:count], query_types=batch.query_types[:count],
        object_counts=batch.object_counts[:count],
        token_attributes=_per_image(batch.token_attributes, int(batch.image_grid_thw.shape[0]))[used].flatten(0, 1),
        token_objects=batch.token_objects[used], object_instances=batch.object_instances[objects],
    )


def _per_image(rows: torch.Tensor, images: int) -> torch.Tensor:
    """``(T, G)`` rows of equally many per image as ``(images, T / images, G)``."""
    return rows.reshape(images, rows.shape[0] // max(images, 1), rows.shape[-1])


class Trainer:
    """Runs the stages of a configuration in a run folder (see the module docstring)."""

    def __init__(self, config: TrainConfig, run_dir: str | Path, resume: bool = False,
                 time_budget_s: float | None = None, final_eval: bool = True,
                 log: Any = None, stop_at_step: int | None = None, command: str = "") -> None:
        self.cfg = config
        self.command = command  # the command line, recorded in the export (a round is rerun from it)
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.time_budget_s = time_budget_s
        self.stop_at_step = stop_at_step
        self.final_eval = final_eval and config.eval.enabled
        self.t0 = time.monotonic()
        self.log = log or (lambda msg: print(msg, flush=True))
        self.state = TrainState()
        self.stopped_early = False
        self.stop_reason = ""  # set by request_stop (a signal): stop at the next step boundary
        self.evaluating = False  # the final evaluation runs (a stop then ends it)
        self.finite: torch.Tensor | None = None  # every loss of this command so far was finite (on the device)

    def request_stop(self, reason: str) -> None:
        """Asks the run to stop after the step in progress, with a checkpoint and an export (what
        the time budget does). Safe from a signal handler: it only sets a field the loop reads
        between steps, so no step is cut in half (an optimizer update interrupted midway would
        leave weights that no checkpoint should hold)."""
        self.stop_reason = reason

    def _check_finite(self) -> None:
        """Refuses to save once a step's loss was NaN or inf: its update made the weights NaN, and
        a run that went on saved and exported them with exit status 0. Checked where the run
        synchronises anyway (log lines, checkpoints, export), not at every step."""
        if self.finite is not None and not bool(self.finite):
            raise DivergedError(
                f"the loss was NaN or inf at or before step {self.state.step}: nothing after the last checkpoint "
                f"is saved; lower the learning rate (or train in fp32) and --resume")

    def stop_plan(self) -> str:
        """What a stop asked for now does: after the step with a checkpoint, or, once the model
        is exported, the final evaluation ends with the samples it has."""
        if self.evaluating:
            return "the evaluation with the samples it has (the model is exported)"
        return "after this step with a checkpoint"

    # -- setup ----------------------------------------------------------------------------

    def _device(self) -> torch.device:
        from qwen3vl_seg_ros.model.loading import resolve_device

        return resolve_device(self.cfg.run.device)

    def _autocast_dtype(self) -> torch.dtype | None:
        precision = self.cfg.run.precision
        if precision == "fp32" or (precision == "auto" and self.device.type != "cuda"):
            return None
        if precision in ("auto", "bf16"):
            return torch.bfloat16
        raise ValueError(f"run.precision must be auto, bf16 or fp32, got {precision!r}")

    def _deadline(self) -> float | None:
        if self.time_budget_s is None:
            return None
        reserve = self.cfg.eval.reserve_s if self.final_eval else 0.0
        return self.t0 + self.time_budget_s - reserve - 15.0  # 15 s for the last checkpoint and export

    def _check_lora_targets(self) -> None:
        """Every LoRA stage's pattern against the loaded model, now: a typo in a later stage's
        was found by peft only once the stages before it had trained (hours, on a real model)."""
        for stage in self.cfg.stages:
            lora = stage.lora if stage.llm == "lora" else None
            if lora is not None and not lora_targets(self.model, lora.target_modules):
                raise SetupError(f"stage {stage.name!r}: lora.target_modules {lora.target_modules!r} matches "
                                 f"no linear layer of the model (the default: {LLM_LORA_TARGETS!r})")

    def setup(self) -> None:
        cfg = self.cfg
        check_run_folder(self.run_dir, self.resume)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = self.run_dir / "checkpoint"
        if self.resume:
            self._trim_log()
        if cfg.run.torch_threads > 0:
            torch.set_num_threads(cfg.run.torch_threads)
        self.device = self._device()
        self.amp_dtype = self._autocast_dtype()
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        random.seed(cfg.run.seed)
        np.random.seed(cfg.run.seed % 2**32)
        torch.manual_seed(cfg.run.seed)
        saved_config = self.run_dir / "config.json"
        resolved = json.loads(json.dumps(cfg.to_dict(), default=str))
        if self.resume and saved_config.is_file():
            before = json.loads(saved_config.read_text())
            changed = sorted(k for k in resolved if before.get(k) != resolved[k])
            if changed:
                self.log(f"[train] warning: resuming with a configuration that differs in {changed}")
        saved_config.write_text(json.dumps(resolved, indent=2) + "\n")
        self.base_folder = prepare_base(cfg.model, self.run_dir, cfg.run.seed)
        self.base_info = self._base_lineage()
        torch.manual_seed(cfg.run.seed + 1)  # decoder init, independent of how the base was made
        self.model, self.processor, self.decoder, self.tokenizer_changed = load_base(cfg.model, self.base_folder)
        self._check_lora_targets()
        self.tokenizer = self.processor.tokenizer
        if cfg.loss.lookup > 0 or cfg.loss.choice > 0 or cfg.loss.choice_first > 0:
            # they read attention probabilities: eager attention only
            self.model.set_attn_implementation("eager")
        if cfg.model.from_scratch and cfg.model.number_embedding_init and not self.resume:
            init_number_embeddings(self.model, self.tokenizer)
        if cfg.model.from_scratch and cfg.model.vision_position_init and not self.resume:
            init_vision_positions(self.model)
        numbers = number_token_ids(self.tokenizer)
        vocab = self.model.get_input_embeddings().weight.shape[0]
        self.coords = CoordinateTable(numbers, vocab, self.device) if numbers else None
        groups = ATTRIBUTE_GROUPS if cfg.loss.attribute > 0 else ()
        self.attribute_ids = [torch.tensor(attribute_word_ids(self.tokenizer, g), device=self.device) for g in groups]
        self.collator = Collator(self.processor, self.decoder.config.max_image_side, cfg.data.box_jitter, groups,
                                 label_first=cfg.data.answer_format in LABEL_FIRST_FORMATS)
        micro = cfg.data.micro_batch or cfg.optim.batch_size  # a multiple: checked when the configuration loads
        self.micro_batch = micro
        self.items_per_step = cfg.optim.batch_size // micro
        self.peft_model: nn.Module | None = None
        if self.resume:
            self.state = TrainState(**json.loads((checkpoint / "state.json").read_text())["state"])
        self._log_header()
        self._warn_on_seen_scenes()

    def _warn_on_seen_scenes(self) -> None:
        """A round continued from an export should render scenes the model has not trained on.

        Not an error (repeating data can be meant), but rounds 5-8, 13 and 14d repeated part of
        their base's scenes unnoticed, because a run reserves about twice the scene indices its
        samples suggest (``train_scene_range``; docs/training.md, "Data").
        """
        if self.cfg.data.source != "synthetic" or self.resume:
            return
        first = self.cfg.data.first_scene
        for start, end in scene_overlaps(first, self.base_info):
            self.log(f"[train] warning: data.first_scene {first} is below the end of the train scenes "
                     f"[{start}, {end}) an earlier round of this model used; set it to {end} or more "
                     f"for new scenes")

    def _log_header(self) -> None:
        cfg = self.cfg
        n_model = sum(p.numel() for p in self.model.parameters())
        n_dec = sum(p.numel() for p in self.decoder.parameters())
        self.log(f"[train] run {self.run_dir} | device {self.device} | "
                 f"autocast {self.amp_dtype or 'off (fp32)'} | torch {torch.__version__}")
        self.log(f"[train] Qwen3-VL {n_model / 1e6:.2f}M params + decoder {n_dec / 1e6:.2f}M | "
                 f"vocab {len(self.tokenizer)} | base {self.base_folder}")
        self.log(f"[train] batch {cfg.optim.batch_size} ({self.items_per_step} x {self.micro_batch}) | "
                 f"workers {cfg.data.num_workers} | stages " +
                 ", ".join(f"{s.name}({s.llm}, {s.steps} steps, lr {s.lr:g})" for s in cfg.stages) +
                 (f" | resuming at step {self.state.step}" if self.resume else ""))

    # -- stages -----------------------------------------------------------------------------

    def _enter_stage(self, index: int, load_weights: bool) -> torch.optim.Optimizer:
        """Puts the model in the stage's form (LoRA or not, what trains) and builds its optimizer.

        ``load_weights``: the checkpoint holds this stage's own form (saved mid-stage); it is
        loaded after the form is set up (LoRA weights included), else before.
        """
        stage = self.cfg.stages[index]
        checkpoint = self.run_dir / "checkpoint"
        if self.resume and not load_weights and (checkpoint / "model.safetensors").is_file() and not self._loaded:
            self._load_weights(checkpoint)
        if self.resume and not load_weights and not self._rng_restored:
            # at a stage boundary: the RNG as the uninterrupted run had it, before new LoRA
            # adapters draw their initial weights (and their dropout follows)
            _restore_rng(load_file(str(checkpoint / "rng.safetensors")))
            self._rng_restored = True
        if stage.llm == "lora" and not is_lora(self.model):
            # a <|seg|> just added to the base's tokenizer trains with the adapters
            seg = [self.tokenizer.convert_tokens_to_ids(SEG_TOKEN)] if self.tokenizer_changed else []
            self.peft_model = apply_lora(self.model, stage.lora or LoraSettings(), seg)
        set_trainable(self.model, self.decoder, stage.llm, stage.vision_lr_scale, stage.lr_scales)
        self.model.to(self.device)
        self.decoder.to(self.device)
        self.model.train()
        self.decoder.train()
        if self.resume and load_weights and not self._loaded:
            self._load_weights(checkpoint)
        groups = parameter_groups(self.model, self.decoder, stage.lr, self.cfg.optim.weight_decay,
                                  stage.vision_lr_scale, stage.decoder_lr_scale, stage.lr_scales)
        kwargs: dict[str, Any] = dict(betas=self.cfg.optim.betas, eps=self.cfg.optim.eps)
        if self.device.type == "cuda":
            kwargs["fused"] = True
        optimizer = torch.optim.AdamW(groups, **kwargs)
        if self.resume and not self._rng_restored:
            if load_weights and (checkpoint / "optimizer.safetensors").is_file():
                rest = json.loads((checkpoint / "state.json").read_text())["optimizer"]
                tensors = load_file(str(checkpoint / "optimizer.safetensors"), device=str(self.device))
                _load_optimizer(optimizer, tensors, rest)
            _restore_rng(load_file(str(checkpoint / "rng.safetensors")))
            self._rng_restored = True
        trainable = sum(p.numel() for g in groups for p in g["params"])
        self.log(f"[train] stage {index + 1}/{len(self.cfg.stages)} '{stage.name}': llm {stage.llm}, vision lr x"
                 f"{stage.vision_lr_scale:g}, decoder lr x{stage.decoder_lr_scale:g}, {trainable / 1e6:.2f}M trainable"
                 + (f", lr_scales {stage.lr_scales}" if stage.lr_scales else ""))
        return optimizer

    def _load_weights(self, checkpoint: Path) -> None:
        load_model(self.model, str(checkpoint / "model.safetensors"), strict=True, device=str(self.device))
        load_model(self.decoder, str(checkpoint / "decoder.safetensors"), strict=True, device=str(self.device))
        self._loaded = True
        self.log(f"[train] resumed weights from {checkpoint} (step {self.state.step})")

    def _leave_stage(self, index: int) -> None:
        stage = self.cfg.stages[index]
        if stage.llm == "lora" and self.peft_model is not None:
            self.model = merge_lora(self.peft_model)
            self.peft_model = None
            self.log(f"[train] stage '{stage.name}': LoRA merged into the weights")

    # -- checkpoints ------------------------------------------------------------------------

    def _trim_log(self) -> None:
        """Drops the log lines of steps past the checkpoint: a resumed run trains them again, and
        a plot or a "last loss" read from the file would otherwise mix the lost run with the replay."""
        log_path = self.run_dir / "train_log.jsonl"
        if not log_path.is_file():
            return
        step = json.loads((self.run_dir / "checkpoint" / "state.json").read_text())["state"]["step"]
        kept = []
        for line in log_path.read_text().splitlines(keepends=True):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by a full disk or a power loss
                continue
            if record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        log_path.write_text("".join(kept))

    def save_checkpoint(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Resumable state, written to ``checkpoint.tmp`` and swapped in (never half-written)."""
        self._check_finite()
        final = self.run_dir / "checkpoint"
        tmp = self.run_dir / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(self.model, str(tmp / "model.safetensors"))
        save_model(self.decoder, str(tmp / "decoder.safetensors"))
        info: dict[str, Any] = {"state": dataclasses.asdict(self.state)}
        if optimizer is not None:
            tensors, rest = _optimizer_tensors(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            info["optimizer"] = rest
        save_file({k: v.contiguous() for k, v in _rng_tensors().items()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps(info, indent=1, default=float) + "\n")
        sync_folder(tmp)
        old = self.run_dir / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        sync_folder(self.run_dir, files=False)  # the renames themselves
        shutil.rmtree(old, ignore_errors=True)

    def _base_lineage(self) -> dict | None:
        """The base checkpoint's own ``training_info``, kept in the run folder.

        A model trained in rounds is usually continued from, and then copied over, the same
        folder (the shipped model), so its history would be lost with each round; kept at the
        run's start, it goes into the export and the whole chain of rounds travels with the model.
        """
        kept = self.run_dir / "base_training_info.json"
        if not kept.is_file():
            source = Path(self.cfg.model.base) / "training_info.json"
            if self.cfg.model.from_scratch or not source.is_file():
                return None
            kept.write_text(source.read_text())
        return json.loads(kept.read_text())

    def export(self) -> Path:
        """Writes ``model/``: the production-loadable folder (LoRA merged on a CPU copy if active)."""
        import copy

        self._check_finite()
        model = self.model
        if is_lora(model):
            assert self.peft_model is not None
            model = merge_lora(copy.deepcopy(self.peft_model).to("cpu"))
        info = {"trained_with": "qwen3vl_seg_ros.train", "step": self.state.step, "samples": self.state.samples,
                "stages_done": self.state.stage, "finished": self.state.finished,
                "data": f"{self.cfg.data.source} {self.cfg.data.width}x{self.cfg.data.height}",
                "image_width": self.cfg.data.width, "image_height": self.cfg.data.height,
                "answer_format": self.cfg.data.answer_format, "base": self.cfg.model.base}
        if self.cfg.data.source == "synthetic":
            info["train_scenes"] = list(train_scene_range(self.cfg.data.first_scene, self.micro_batch,
                                                          self.state.samples))
        if self.command:
            info["config"] = self.command
        if self.base_info:
            info["base_training"] = self.base_info
        folder = export_model(model, self.decoder, self.base_folder, self.tokenizer, self.tokenizer_changed,
                              self.run_dir / "model", self.cfg.model.export_dtype, info,
                              self.cfg.model.image_pixels)
        self.log(f"[train] exported {folder} ({folder_size_mb(folder):.1f} MB of safetensors)")
        return folder

    # -- the step -----------------------------------------------------------------------------

    def _check_inputs(self, batch: Batch) -> None:
        """Once per run, on the first batch: the collator's rotary positions equal the model's own
        ``get_rope_index``, and the shared-vision forward equals ``Qwen3VLModel.forward``."""
        mm = (batch.input_ids == self.collator.image_token_id).long()
        grids = batch.image_grid_thw[batch.image_index]
        expected, _ = self.model.model.get_rope_index(batch.input_ids, mm_token_type_ids=mm, image_grid_thw=grids,
                                                      attention_mask=batch.attention_mask)
        if not torch.equal(expected, batch.position_ids[1:]):
            raise RuntimeError("the collator's M-RoPE positions differ from the model's get_rope_index: "
                               "training would not match inference (transformers version change?)")
        few = _first_samples(batch, 2)
        pixel_values = pixel_values_from_patches(few.patches, self.collator.patch_format)
        per_image = few.patches.shape[0] // few.image_grid_thw.shape[0]
        was_training = self.model.training
        self.model.eval()
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # compare in full fp32
        try:
            with torch.no_grad():
                ours = multimodal_forward(self.model, few, pixel_values)
                ref = reference_forward(self.model, few, pixel_values, per_image)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            self.model.train(was_training)
        keep = few.attention_mask.bool()
        err = (ours[keep] - ref[keep]).abs().max().item()
        scale = ref[keep].abs().max().item()
        # a wrong image or token order differs by O(scale); kernels' rounding by ~1e-6 of it
        if not err <= 1e-3 * max(1.0, scale):
            raise RuntimeError(f"the shared-vision forward differs from Qwen3VLModel.forward by {err:.3g}")
        self.log(f"[train] first batch checked: positions = get_rope_index, hidden states = Qwen3VLModel.forward "
                 f"(max difference {err:.2g})")

    def forward_losses(self, batch: Batch, sigma: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its parts for one batch on the device."""
        cfg = self.cfg
        pixel_values = pixel_values_from_patches(batch.patches, self.collator.patch_format)
        vision_trainable = any(p.requires_grad for p in self.model.model.visual.parameters())
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        with autocast:
            has_objects = batch.object_batch.shape[0] > 0
            boxes = has_objects and self.coords is not None  # the box-grounding losses have something to train
            lookup = cfg.loss.lookup > 0 and boxes
            choice = (cfg.loss.choice > 0 or cfg.loss.choice_first > 0) and boxes
            with VisionCapture(self.model, self.decoder.config.vit_layers, detach=not vision_trainable) as capture:
                out = multimodal_outputs(self.model, batch, pixel_values, output_attentions=lookup or choice)
                hidden = out.last_hidden_state
            if capture.calls != 1:
                raise RuntimeError(f"the vision tower ran {capture.calls} times in one step")
            loss_lm, stats = lm_loss(hidden, self.model.lm_head, batch.labels, batch.lm_rows, batch.lm_cols,
                                     self.coords, sigma, cfg.loss.coord_l1)
            total = cfg.loss.lm * loss_lm
            stats["lm"] = loss_lm.detach()
            # what the box-grounding losses share: the answer positions, each sample's image grid, and
            # the coordinate and image tokens
            answers = (batch.input_ids, batch.labels, batch.lm_rows, batch.lm_cols,
                       batch.image_grid_thw[batch.image_index])
            tokens = (self.coords, self.collator.image_token_id, self.collator.merge)
            if cfg.loss.pointer > 0 and boxes:
                loss_ptr, pstats = pointer_loss(hidden, *answers, batch.object_boxes, batch.object_batch, *tokens)
                total = total + cfg.loss.pointer * loss_ptr
                stats.update(pstats, pointer=loss_ptr.detach())
            if lookup:
                loss_look, lstats = lookup_loss(out.attentions or (), *answers, batch.object_boxes, batch.object_batch,
                                                *tokens)
                total = total + cfg.loss.lookup * loss_look
                stats.update(lstats, lookup=loss_look.detach())
            if choice:
                loss_choice, loss_first, cstats = choice_loss(out.attentions or (), *answers, batch.object_batch,
                                                              batch.object_instances,
                                                              batch.token_objects[batch.image_index], *tokens)
                stats.update(cstats, choice=loss_choice.detach())
                total = total + cfg.loss.choice * loss_choice + cfg.loss.choice_first * loss_first
            with_attributes = bool(self.attribute_ids) and vision_trainable and batch.token_attributes.numel() > 0
            if has_objects or with_attributes:
                unique = capture.features(batch.image_grid_thw)
            if with_attributes:
                merged = unique.merged_map.permute(0, 2, 3, 1).reshape(-1, unique.merged_map.shape[1])
                table = self.model.get_input_embeddings().weight
                loss_attr, astats = attribute_loss(merged, batch.token_attributes,
                                                   [table[ids] for ids in self.attribute_ids])
                total = total + cfg.loss.attribute * loss_attr
                stats.update(astats, attribute=loss_attr.detach())
            if has_objects:
                index = batch.image_index
                vision = VisionFeatures([m[index] for m in unique.vit_maps], unique.merged_map[index])
                queries = hidden[batch.object_batch, batch.object_seg_positions]
                images = batch.decoder_images[index].float() / 255.0
                dec = run_decoder(self.decoder, images, vision, queries, batch.object_boxes, batch.object_batch,
                                  cfg.run.decoder_chunk, batch.object_counts)
        if has_objects:
            loss_mask, mstats = mask_losses(dec, batch.object_masks, cfg.loss)
            total = total + loss_mask
            stats.update(mstats)
            stats["mask"] = loss_mask.detach()
        stats["loss"] = total.detach()
        return total, stats

    def _next_batch(self, iterator: Iterator[Batch]) -> Batch:
        """The step's micro-batches, each copied to the device from pinned memory (asynchronously),
        then joined there."""
        parts = [next(iterator).to(self.device, non_blocking=True) for _ in range(self.items_per_step)]
        return concat_batches(parts, self.collator.pad_id)

    # -- schedule -----------------------------------------------------------------------------

    def stage_steps(self, index: int) -> int:
        planned = self.state.planned_steps
        return planned[index] if planned else self.cfg.stages[index].steps

    def total_steps(self) -> int:
        return sum(self.stage_steps(i) for i in range(len(self.cfg.stages)))

    def _plan(self, seconds_per_step: float) -> None:
        """Rescales every stage so that the whole schedule takes ``run.train_time_s`` of training.

        Called once, early in the run (during warm-up, whose length does not change): the cosine
        schedule then ends when the time does, whatever the machine's speed. The plan is saved
        with the state, so resumed runs keep it. A short first stage may be over by then: the
        stages already finished keep the steps they ran, and the rest share what is left.
        """
        target = self.cfg.run.train_time_s
        total = max(1, round(target / seconds_per_step))
        configured = self.cfg.total_steps
        current = self.state.stage
        finished = [s.steps for s in self.cfg.stages[:current]]
        rest = self.cfg.stages[current:]
        left, rest_configured = max(1, total - sum(finished)), max(1, sum(s.steps for s in rest))
        plan = finished + [max(1, round(s.steps * left / rest_configured)) for s in rest]
        plan[current] = max(plan[current], self.state.stage_step + 1)
        self.state.planned_steps = plan
        self.log(f"[train] {seconds_per_step * 1000:.0f} ms per step: stages planned as {plan} steps "
                 f"({sum(plan)} in all, {target:.0f} s of training; configured {configured})")

    # -- the loop ---------------------------------------------------------------------------

    def train(self) -> bool:
        """Runs the remaining stages; returns True when all finished (False: stopped by the budget)."""
        cfg = self.cfg
        self._loaded = False
        self._rng_restored = False
        stream = build_stream(cfg.data, self.collator, self.micro_batch, self.state.step * self.items_per_step,
                              cfg.run.seed)
        workers, prefetch = self._loader_size()
        # A CUDA parent's workers are spawned, not forked: forked from a process whose CUDA runtime
        # threads were running, the GPU rounds' workers died with SIGABRT when torn down at exit.
        cuda = self.device.type == "cuda"
        loader = make_loader(stream, workers, prefetch, pin_memory=cuda, spawn=cuda)
        iterator = iter(loader)
        deadline = self._deadline()
        log_path = self.run_dir / "train_log.jsonl"
        last_ckpt = time.monotonic()
        checked = self.state.step > 0
        bar = tqdm(total=self.total_steps(), initial=self.state.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=None, mininterval=5.0, file=sys.stderr)
        step_time = None
        plan_window: list[float] = []
        try:
            while self.state.stage < len(cfg.stages):
                index = self.state.stage
                stage = cfg.stages[index]
                if self.state.stage_step == 0 and self._must_stop(deadline, step_time):
                    # at a stage boundary the last checkpoint is already this state (before the
                    # first step there is none yet: one is written, so that --resume works)
                    self.log(f"[train] stopping at step {self.state.step}, before stage '{stage.name}'")
                    if not (self.run_dir / "checkpoint" / "state.json").is_file():
                        self.save_checkpoint(None)
                    self.stopped_early = True
                    return False
                optimizer = self._enter_stage(index, load_weights=self.state.stage_step > 0)
                sums: dict[str, float] = {}
                count, wait, t_log, n_log = 0, 0.0, time.monotonic(), 0
                factor = 0.0

                def write_window(now: float, stage_name: str, lr: float) -> float:
                    """One train_log.jsonl line for the steps since the last; returns their mean time."""
                    nonlocal sums, count, wait, t_log, n_log
                    elapsed = now - t_log
                    means = {k: round(float(v) / count, 5) for k, v in sums.items()}
                    self.state.train_seconds += elapsed
                    record = {"step": self.state.step, "stage": stage_name, "lr": lr,
                              "samples_per_s": round(n_log / max(elapsed, 1e-9), 1),
                              "data_wait": round(wait / max(elapsed, 1e-9), 3),
                              "elapsed_s": round(now - self.t0, 1), "train_s": round(self.state.train_seconds, 1),
                              **means}
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.write(self._format(record), file=sys.stdout)
                    sys.stdout.flush()
                    self._check_finite()
                    mean = elapsed / count
                    sums, count, wait, t_log, n_log = {}, 0, 0.0, now, 0
                    return mean
                while self.state.stage_step < self.stage_steps(index):
                    if self._must_stop(deadline, step_time):
                        self.stopped_early = True
                        if count:  # the window the stop cut short: its steps get their line too
                            write_window(time.monotonic(), stage.name, stage.lr * factor)
                        break
                    t_start = time.monotonic()
                    batch = self._next_batch(iterator)
                    t_data = time.monotonic()
                    if not checked:
                        self._check_inputs(batch)
                        checked = True
                    steps = self.stage_steps(index)
                    factor = stage.lr_factor(self.state.stage_step, steps)
                    for group in optimizer.param_groups:
                        group["lr"] = stage.lr * factor * group["lr_scale"]
                    loss, stats = self.forward_losses(batch, stage.sigma(self.state.stage_step, steps))
                    finite = torch.isfinite(loss.detach())
                    self.finite = finite if self.finite is None else self.finite & finite
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.optim.grad_clip > 0:
                        params = [p for g in optimizer.param_groups for p in g["params"]]
                        stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                    optimizer.step()
                    self.state.step += 1
                    self.state.stage_step += 1
                    self.state.samples += batch.size
                    count += 1
                    n_log += batch.size
                    wait += t_data - t_start
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v.detach().float()  # type: ignore[operator]
                    bar.update(1)
                    now = time.monotonic()
                    if cfg.run.train_time_s > 0 and self.state.planned_steps is None:
                        plan_window.append(now)  # steps 20..60 of this run: past start-up costs
                        if len(plan_window) == 61:
                            self._plan((plan_window[60] - plan_window[20]) / 40)
                            bar.total = self.total_steps()
                    # windows end at multiples of log_every in the stage, so that a resumed run
                    # logs the same steps together as an uninterrupted one
                    if (self.state.stage_step % cfg.run.log_every == 0
                            or self.state.stage_step == self.stage_steps(index)):
                        step_time = write_window(now, stage.name, stage.lr * factor)
                    if step_time is None and self.state.stage_step >= 2:
                        step_time = (now - t_start) * 2  # a first guess until the first log line
                    if now - last_ckpt > cfg.run.checkpoint_every_s:
                        self.save_checkpoint(optimizer)
                        last_ckpt = time.monotonic()
                if self.stopped_early:
                    why = self.stop_reason or ("--stop-at-step" if self.stop_at_step is not None
                                               and self.state.step >= self.stop_at_step else "the time budget")
                    if self.state.stage_step > 0:
                        self.log(f"[train] stopping at step {self.state.step} ({why}): saving a checkpoint")
                        self.save_checkpoint(optimizer)
                    else:  # the stage's form (LoRA) is set up but unsaved: the boundary checkpoint is this state
                        self.log(f"[train] stopping at step {self.state.step} ({why}), before the stage's first "
                                 "step: the last checkpoint holds this state")
                    return False
                self._leave_stage(index)
                self.state.stage += 1
                self.state.stage_step = 0
                self.state.finished = self.state.stage >= len(cfg.stages)
                self.save_checkpoint(None)
                last_ckpt = time.monotonic()
            return True
        finally:
            bar.close()
            del iterator, loader

    def _loader_size(self) -> tuple[int, int]:
        """Workers and prefetch that fit in the free shared memory (/dev/shm), where items wait.

        A container with a small /dev/shm would otherwise crash the loader mid-run; fewer items in
        flight only costs throughput, which the log then shows as data wait.
        """
        workers, prefetch = self.cfg.data.num_workers, max(1, self.cfg.data.prefetch_factor)
        shm = Path("/dev/shm")
        if workers == 0 or not shm.is_dir():
            return workers, prefetch
        item_bytes = 0.8e6 * self.micro_batch  # measured ~0.6 MB a sample at 320x240, with margin
        free = shutil.disk_usage(shm).free
        fits = lambda w, p: w * p * item_bytes <= 0.5 * free  # noqa: E731
        while prefetch > 1 and not fits(workers, prefetch):
            prefetch -= 1
        while workers > 1 and not fits(workers, prefetch):
            workers -= 1
        if (workers, prefetch) != (self.cfg.data.num_workers, self.cfg.data.prefetch_factor):
            self.log(f"[train] /dev/shm has {free / 1e9:.2f} GB free: loader reduced to {workers} workers x "
                     f"prefetch {prefetch} (configured {self.cfg.data.num_workers} x {self.cfg.data.prefetch_factor})")
        return workers, prefetch

    def _must_stop(self, deadline: float | None, step_time: float | None) -> bool:
        """Whether another step would pass the time budget (or --stop-at-step is reached, or a
        stop was requested)."""
        if self.stop_reason:
            return True
        if self.stop_at_step is not None and self.state.step >= self.stop_at_step:
            return True
        return deadline is not None and step_time is not None and time.monotonic() + step_time > deadline

    @staticmethod
    def _format(r: dict[str, Any]) -> str:
        keys = ("loss", "lm", "token_acc", "coord_mae", "pointer_acc", "lookup_share", "choice_share",
                "choice_first_share", "attr_acc", "mask", "m2_dice", "mask_iou", "iou_loss", "grad_norm")
        parts = " ".join(f"{k} {r[k]:.4f}" for k in keys if k in r)
        return (f"[train] step {r['step']} ({r['stage']}) {parts} | lr {r['lr']:.2e} | "
                f"{r['samples_per_s']:.1f} samples/s | data wait {100 * r['data_wait']:.0f}% | {r['elapsed_s']:.0f} s")

    def run(self) -> dict[str, Any]:
        """Setup, training, export and the final evaluation; returns a summary."""
        self.setup()
        if self.state.finished:
            self.log("[train] the run already finished all stages; exporting and evaluating again")
            self._loaded = False
            self._load_weights(self.run_dir / "checkpoint")
            done = True
        else:
            done = self.train()
        folder = self.export()
        if self.stop_reason:
            self.log(f"[train] stopped ({self.stop_reason}); continue with --resume --out {self.run_dir}")
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "model": str(folder), "finished": done,
                                   "step": self.state.step, "samples": self.state.samples,
                                   "model_mb": round(folder_size_mb(folder), 2),
                                   "wall_s": round(time.monotonic() - self.t0, 1)}
        if self.final_eval and not self.stop_reason:  # a user who stopped the run wants it to end now
            summary["eval"] = self._final_eval(folder)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        self.log(f"[train] done: {json.dumps(summary, default=str)}")
        return summary

    def _final_eval(self, folder: Path) -> dict[str, Any]:
        from qwen3vl_seg_ros.training.evaluate import EvalSettings, run_evaluation

        ev = self.cfg.eval
        limit = ev.time_limit_s  # 0: no limit
        if self.time_budget_s is not None:
            left = max(10.0, self.t0 + self.time_budget_s - time.monotonic() - 20.0)
            limit = min(limit, left) if limit > 0 else left
        settings = EvalSettings(model=str(folder), split=ev.split, scenes=ev.scenes,
                                queries_per_scene=ev.queries_per_scene, device=ev.device, workers=ev.workers,
                                time_limit_s=limit, width=self.cfg.data.width, height=self.cfg.data.height,
                                out=str(self.run_dir / f"eval_{ev.split}"))
        # free the training copies first: evaluation workers load their own
        self.model.to("cpu")
        self.decoder.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.evaluating = True
        try:
            report = run_evaluation(settings, log=self.log, should_stop=lambda: bool(self.stop_reason))
        except Exception as exc:  # the model is exported already: report, do not lose the run
            self.log(f"[train] the final evaluation failed: {type(exc).__name__}: {exc}")
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            self.evaluating = False
        overall = report["methods"].get("decoder", {}).get("overall", {})
        return {k: overall.get(k) for k in ("giou", "ciou", "box_acc@0.5", "no_target_acc", "num_samples")}


# ---------------------------------------------------------------------------------------------
# command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwen3vl_seg_ros.train",
        description="Train Qwen3-VL-Seg (grounding LLM + box-guided mask decoder) with a staged recipe.")
    parser.add_argument("config", type=Path, help="YAML configuration (see config/train_tiny.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, model, logs, evaluation)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="wall-clock budget of this command: training stops in time to checkpoint, export "
                             "and evaluate before it")
    parser.add_argument("--train-time-s", type=float, default=None,
                        help="fit the schedule to this much training time in all (over resumed runs too): the "
                             "stage lengths are rescaled from the speed measured at steps 20-60 (sets "
                             "run.train_time_s)")
    parser.add_argument("--stop-at-step", type=int, default=None,
                        help="stop (checkpoint + export) after this many steps in all; --resume continues")
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation at the end")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration value, e.g. --set optim.batch_size=64 --set stages.0.steps=100")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are processes already
    if args.resume:
        saved = args.out / "config.json"
        if not saved.is_file():
            parser.error(f"--resume: {saved} not found")
    overrides = list(args.overrides)
    if args.train_time_s is not None:
        overrides.append(f"run.train_time_s={args.train_time_s}")
    try:
        config = load_config(args.config, overrides)
        check_run_folder(args.out, args.resume)
        check_machine(config, evaluate=not args.no_eval)
    except (OSError, yaml.YAMLError, ValueError, TypeError, SegmenterError) as exc:
        parser.error(str(exc))  # usage and one line, exit 2: no traceback for a typo
    command = "python -m qwen3vl_seg_ros.train " + shlex.join(sys.argv[1:] if argv is None else [str(a) for a in argv])
    trainer = Trainer(config, args.out, resume=args.resume, time_budget_s=args.time_budget_s,
                      final_eval=not args.no_eval, stop_at_step=args.stop_at_step, command=command)
    previous = install_stop_handlers(trainer)
    try:
        trainer.run()
    except SetupError as exc:  # found once the model is loaded, before any step
        print(f"train: {exc}", file=sys.stderr, flush=True)
        return 2
    except DivergedError as exc:
        print(f"train: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:  # main() may be called from a program with its own handlers
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + STOP_SIGNALS[trainer.stop_reason] if trainer.stop_reason else 0


STOP_SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}


class SetupError(ValueError):
    """A configuration that does not fit the loaded model, found before the first step."""


class DivergedError(RuntimeError):
    """A loss became NaN or inf: the run stops without saving what followed."""


def check_machine(config: TrainConfig, evaluate: bool = True) -> None:
    """What the configuration asks of this machine, before any model is built: the devices (a
    run.device of cuda on a CPU host failed as a traceback at setup) and a base model folder."""
    from qwen3vl_seg_ros.model.loading import resolve_device, resolve_model_folder

    resolve_device(config.run.device)
    if evaluate and config.eval.enabled:
        resolve_device(config.eval.device)
    if not config.model.from_scratch:
        resolve_model_folder(config.model.base, config.model.local_files_only)


def install_stop_handlers(trainer: Trainer) -> dict[int, Any]:
    """Ctrl-C or a SIGTERM (a batch system's time limit, ``kill``) stops the run after the step in
    progress, with a checkpoint and the export, instead of losing the work since the last
    checkpoint (up to ``run.checkpoint_every_s``). A second signal stops at once. The data
    loader's workers ignore both (see ``dataset.make_loader``). Returns the handlers replaced."""

    def on_signal(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if trainer.stop_reason:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            raise KeyboardInterrupt
        trainer.log(f"[train] {name}: stopping {trainer.stop_plan()} (again to stop at once)")
        trainer.request_stop(name)

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS.values()}
    for sig in STOP_SIGNALS.values():
        signal.signal(sig, on_signal)
    return previous


if __name__ == "__main__":
    raise SystemExit(main())

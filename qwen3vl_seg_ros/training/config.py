"""The training configuration: one YAML file, read into dataclasses and checked when it loads.

A value out of range (a negative learning-rate scale, a batch of 0) is refused here with its
key's name, before any model is built: it would otherwise train silently wrong or fail a step
into training with an error naming no key. The sections and their keys are documented in
``docs/training.md`` ("The recipe: stages") and in the shipped ``config/train_*.yaml`` files.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qwen3vl_seg_ros.training.dataset import DataConfig
from qwen3vl_seg_ros.training.losses import LossWeights
from qwen3vl_seg_ros.training.model_builder import LoraSettings, ModelConfig

LLM_MODES = ("full", "lora", "frozen")
EVAL_SPLITS = ("val", "test", "train")


@dataclass
class StageConfig:
    """One stage of the recipe."""

    name: str
    steps: int
    lr: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    llm: str = "full"  # "full", "lora" or "frozen"
    vision_lr_scale: float = 1.0  # 0 freezes the vision tower
    decoder_lr_scale: float = 1.0
    # regex on parameter names (the decoder's prefixed "decoder.") -> a further LR factor; the first
    # match wins, 0 freezes: e.g. {"layers\\.[12]\\.self_attn\\.[qk]_": 10}
    lr_scales: dict[str, float] = field(default_factory=dict)
    lora: LoraSettings | None = None  # llm: lora
    coord_sigma: float = 0.0  # soft coordinate labels at the stage start (0..1000 units), 0 = off
    coord_sigma_until: float = 0.5  # fraction of the stage over which coord_sigma decays to 0

    def __post_init__(self) -> None:
        if self.llm not in LLM_MODES:
            raise ValueError(f"stage {self.name!r}: llm must be one of {LLM_MODES}, got {self.llm!r}")
        if isinstance(self.lora, dict):
            self.lora = _build(LoraSettings, self.lora, f"stage {self.name!r}: lora")
        elif self.lora is not None and not isinstance(self.lora, LoraSettings):
            raise ValueError(f"stage {self.name!r}: lora must be a mapping (r, alpha, dropout, target_modules)")
        if self.llm == "lora" and self.lora is None:
            self.lora = LoraSettings()
        if self.lora is not None:
            _check(self.lora, f"stage {self.name!r}: lora", r=">= 1", alpha="> 0", dropout="in [0, 1)")
        if not isinstance(self.lr_scales, dict):
            raise ValueError(f"stage {self.name!r}: lr_scales must map name patterns to factors")
        for pattern, scale in self.lr_scales.items():
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"stage {self.name!r}: lr_scales pattern {pattern!r}: {err}") from None
            scale = _number(scale, "float", f"stage {self.name!r}: lr_scales[{pattern!r}]")
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
                raise ValueError(f"stage {self.name!r}: lr_scales[{pattern!r}] must be a number >= 0, got {scale!r}")
            self.lr_scales[pattern] = float(scale)
        if self.steps < 0 or self.warmup_steps < 0 or not 0 < self.lr < math.inf:  # nan trained a NaN model
            raise ValueError(f"stage {self.name!r}: steps and warmup_steps must be >= 0 and lr a number > 0")
        if self.lora is not None:
            try:
                re.compile(self.lora.target_modules)
            except re.error as err:
                raise ValueError(f"stage {self.name!r}: lora.target_modules "
                                 f"{self.lora.target_modules!r}: {err}") from None
        # a negative scale trains by gradient ascent, a negative min_lr_ratio ends the cosine below
        # zero: the run finishes without an error and its model is just worse
        _check(self, f"stage {self.name!r}", vision_lr_scale=">= 0", decoder_lr_scale=">= 0",
               coord_sigma=">= 0", coord_sigma_until=">= 0", min_lr_ratio="in [0, 1]")

    def lr_factor(self, step: int, steps: int | None = None) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_ratio`` at the last of ``steps`` (step
        ``steps - 1``: steps count from 0).

        The warm-up is at most a fifth of the *configured* stage, so a plan that shortens the
        stage after the warm-up began (``Trainer._plan``) does not change its length.
        """
        steps = self.steps if steps is None else steps
        warmup = min(self.warmup_steps, max(1, self.steps // 5), max(0, steps - 1))
        if warmup and step < warmup:
            return (step + 1) / warmup
        span = max(1, steps - warmup - 1)
        progress = min(1.0, (step - warmup) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def sigma(self, step: int, steps: int | None = None) -> float:
        if self.coord_sigma <= 0:
            return 0.0
        end = max(1.0, self.coord_sigma_until * (self.steps if steps is None else steps))
        return max(0.0, self.coord_sigma * (1 - step / end))


@dataclass
class OptimConfig:
    """The ``optim`` section."""

    batch_size: int = 32
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm, 0 = off

    def __post_init__(self) -> None:
        betas = self.betas
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        _check(self, "optim", batch_size=">= 1", weight_decay=">= 0", eps="> 0", grad_clip=">= 0")


@dataclass
class RunConfig:
    """The ``run`` section: devices, precision, logging and checkpoints."""

    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16", "fp32"
    log_every: int = 20  # steps
    train_time_s: float = 0.0  # > 0: stage lengths rescaled to fill this much training time (--train-time-s)
    checkpoint_every_s: float = 300.0  # wall-clock seconds between resumable checkpoints
    decoder_chunk: int = 0  # frames per decoder call in a step (0 = all at once)
    torch_threads: int = 0  # 0 = torch's default

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"run.precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}")
        _check_device(self.device, "run.device")
        _check(self, "run", seed=">= 0", log_every=">= 1", train_time_s=">= 0", checkpoint_every_s=">= 0",
               decoder_chunk=">= 0", torch_threads=">= 0")
        if self.seed >= 2**63:  # torch.manual_seed's limit (an overflow traceback at setup)
            raise ValueError(f"run.seed must be below 2**63, got {self.seed!r}")


@dataclass
class EvalConfig:
    """The ``eval`` section: the held-out evaluation at the end of a run."""

    enabled: bool = True
    split: str = "val"
    scenes: int = 200
    queries_per_scene: int = 2
    device: str = "cpu"  # the tiny model decodes faster on many CPU processes than eagerly on a GPU
    workers: int = 0  # 0 = one per CPU core (at most 14)
    time_limit_s: float = 150.0  # evaluation stops early (with what it has) after this
    reserve_s: float = 180.0  # with a time budget, training stops this long before it for the evaluation

    def __post_init__(self) -> None:
        if self.split not in EVAL_SPLITS:  # else found only after the whole run had trained
            raise ValueError(f"eval.split must be one of {EVAL_SPLITS}, got {self.split!r}")
        _check_device(self.device, "eval.device")
        _check(self, "eval", scenes=">= 0", queries_per_scene=">= 1", workers=">= 0", time_limit_s=">= 0",
               reserve_s=">= 0")


@dataclass
class TrainConfig:
    """A whole training configuration (one YAML file)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossWeights = field(default_factory=LossWeights)
    stages: list[StageConfig] = field(default_factory=list)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_RULES = {">= 0": lambda v: v >= 0, "> 0": lambda v: v > 0, ">= 1": lambda v: v >= 1,
          "in [0, 1]": lambda v: 0 <= v <= 1, "in [0, 1)": lambda v: 0 <= v < 1}


def _check_device(name: str, where: str) -> None:
    """The form of a device name, as ``resolve_device`` takes it ("" is auto); whether this
    machine has it is checked before the run starts."""
    if not re.fullmatch(r"\s*(auto|cpu(:\d+)?|cuda(:\d+)?)?\s*", name):
        raise ValueError(f"{where} must be auto, cpu, cuda or cuda:N, got {name!r}")


def _check(section: Any, where: str, **rules: str) -> None:
    """Refuses a field outside its range (``rules``: field -> a key of ``_RULES``), with its name.

    Why: out-of-range values otherwise either train silently wrong (a negative learning-rate
    scale) or fail after the model is built, as a ZeroDivisionError or an IndexError that names
    no key.
    """
    for name, rule in rules.items():
        value = getattr(section, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _RULES[rule](value):
            raise ValueError(f"{where}: {name} must be a number {rule}, got {value!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    """A dataclass from a mapping, refusing unknown and missing keys (a typo must not pass silently)."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
    missing = sorted(f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    types = {f.name: f.type for f in fields}
    return cls(**{k: _number(v, str(types[k]), f"{where}.{k}") for k, v in data.items()})


def _number(value: Any, type_name: str, where: str) -> Any:
    """A number field's value as a number (and a yes/no field's as a bool).

    PyYAML follows YAML 1.1, which reads ``4e-4`` and ``1e3`` (no dot) as strings; in a file or a
    ``--set`` they mean numbers, so they are taken as such, and a word where a number belongs (or
    a fraction where a count belongs) is refused here with the key's name rather than as a
    TypeError deep in training. ``true`` is not a number (``steps: true`` would train one step),
    and a quoted ``"no"`` is not a bool (it would count as true).
    """
    if type_name == "bool" and not isinstance(value, bool):
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if type_name == "str" and value is None:
        return ""  # a key left blank in YAML (coco_image_root:) means its default, "" (none)
    if type_name == "str" and not isinstance(value, str):
        raise ValueError(f"{where}: expected a text, got {value!r}")
    if type_name in ("float", "int") and isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if type_name not in ("float", "int") or not isinstance(value, (str, float)):
        return value
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if type_name == "float":
        return number
    if not number.is_integer():
        raise ValueError(f"{where}: expected a whole number, got {value!r}")
    return int(number)


def set_dotted(data: dict, assignment: str) -> None:
    """Applies ``a.b.0.c=value`` (value parsed as YAML) to a nested configuration mapping."""
    key, sep, raw = assignment.partition("=")
    if not sep:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    parts = key.strip().split(".")
    node: Any = data
    try:
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        last = parts[-1]
        value = yaml.safe_load(raw)
        if isinstance(node, list):
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise TypeError(f"{'.'.join(parts[:-1])} is {node!r}, not a section")
    except (IndexError, ValueError, TypeError, AttributeError, yaml.YAMLError) as exc:
        raise ValueError(f"--set {assignment!r}: {exc}") from None


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"configuration: unknown sections {unknown}; known: {sorted(known)}")
    stages = [_build(StageConfig, s, f"stages[{i}]") for i, s in enumerate(data.get("stages") or [])]
    if not stages:
        raise ValueError("configuration: 'stages' must list at least one stage")
    loss = _build(LossWeights, data.get("loss"), "loss")
    _check(loss, "loss", **{f.name: ">= 0" for f in dataclasses.fields(LossWeights)})
    data_cfg = _build(DataConfig, data.get("data"), "data")
    _check(data_cfg, "data", width=">= 1", height=">= 1", queries_per_scene=">= 1", num_workers=">= 0",
           prefetch_factor=">= 0", micro_batch=">= 0")
    if data_cfg.source == "coco" and not Path(data_cfg.coco_json).is_file():
        raise ValueError(f"data.coco_json: no such file: {data_cfg.coco_json}")
    optim = _build(OptimConfig, data.get("optim"), "optim")
    micro = data_cfg.micro_batch or optim.batch_size
    if optim.batch_size % micro:
        raise ValueError(f"optim.batch_size {optim.batch_size} is not a multiple of data.micro_batch {micro}")
    return TrainConfig(
        model=_build(ModelConfig, data.get("model"), "model"),
        data=data_cfg,
        optim=optim,
        loss=loss,
        stages=stages,
        run=_build(RunConfig, data.get("run"), "run"),
        eval=_build(EvalConfig, data.get("eval"), "eval"),
    )


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reads a YAML configuration and applies ``key=value`` overrides."""
    with open(path) as stream:  # from the stream, a YAML error names the file
        data = yaml.safe_load(stream) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections (model, data, optim, loss, stages, run, "
                         f"eval), got a {type(data).__name__}")
    for assignment in overrides:
        set_dotted(data, assignment)
    return config_from_dict(data)
